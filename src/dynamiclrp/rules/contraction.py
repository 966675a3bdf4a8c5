"""Contraction ops: ``mm``, ``addmm``, ``bmm``, ``baddbmm``, convolutions (any dimension, stride,
padding, dilation, groups, transposed).

- One data operand and one constant (a weight): the preset's contraction rule (epsilon by default,
  see :mod:`.linear`) with ``z`` the full output including the bias, which absorbs its share.
  The weight's own relevance (the same rule read from the weight's side; for epsilon
  ``R_w = w * J_w^T (R / stab(z))``) is computed only when the weight was requested.
- Two data operands (``q @ k^T``, ``attention @ v``): the uniform bilinear rule, half to each
  (for ``addmm``/``baddbmm`` of two data operands the added term is left out of ``z``).  With
  ``Rules.attention = "cp"`` (CP-LRP) an operand that is a softmax output is a constant: the
  epsilon rule (no bias) gives all of ``R`` to the other operand.
- ``mv`` and ``dot`` are contractions like ``mm``.
- ``Rules.first``: the rule of the first contractions (nearest to the input, found by the plan).
- ``Rules.canonize_batchnorm``: a convolution, ``mm`` or ``addmm`` whose output only feeds an
  eval-mode batch norm (paired by the plan) is explained as one affine contraction with the merged
  weight ``w * s`` and bias ``(b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``; the batch
  norm passes relevance through and the merged bias's share is absorbed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import UncoveredOpError
from .base import (
    OpEntry,
    RuleContext,
    frozen_bias,
    product_term_unrecorded,
    saved,
    sum_to_shape,
    with_facts,
)
from .elementwise import _output_or_explain, split_sum
from .linear import (
    Epsilon,
    LinearMap,
    bilinear_uniform,
    convolution_map,
    matmul_map,
    parameter_relevance,
    safe_divide,
)
from .normalisation import batchnorm_affine


def _swap(m: LinearMap) -> LinearMap:
    """The same contraction with the operands' roles exchanged."""
    return LinearMap(
        forward=lambda x, w: m.forward(w, x),
        vjp_x=lambda g, x, w: m.vjp_w(g, w, x),
        vjp_w=lambda g, x, w: m.vjp_x(g, w, x),
    )


def contract(
    ctx: RuleContext,
    m: LinearMap,
    kind: str,
    slots: tuple[int, int],
    bias_slot: int | None,
    bias_fn=None,
    r: Tensor | None = None,
    weight_scale: float = 1,
):
    """Apply the contraction rules to ``z = m(a, b) + bias`` where ``a, b`` sit in ``slots``.

    ``r``: the relevance of the product term alone when the node's output is more than
    ``m(a, b) + bias`` (``addmm`` whose added term was split off like an add); the node's output
    value, batch-norm merging and bias fusion then do not apply.  ``weight_scale``: a scalar
    ``a`` of ``a * f(x, w)`` (``addmm``'s ``alpha``), taken into the weight: ``f(x, a * w)``."""
    whole = r is None
    r = ctx.r if whole else r
    sa, sb = slots
    a, b = ctx.input_value(sa), ctx.input_value(sb)
    outs: list[Tensor | None] = [None] * ctx.n_inputs()
    bias = None
    if bias_fn is not None:
        bias = bias_fn(ctx, a, b, m)
    if ctx.data[sa] and ctx.data[sb]:
        held = _attention_probabilities(ctx, (sa, sb))
        if held is None:
            outs[sa], outs[sb] = bilinear_uniform(m, a, b, r, ctx.eps)
        else:  # CP-LRP: P v with P constant, the epsilon rule on the linear map of v
            g = safe_divide(r, m.forward(a, b), ctx.eps)
            if held == sa:
                outs[sb] = b * m.vjp_w(g, a, b)
            else:
                outs[sa] = a * m.vjp_x(g, a, b)
        return outs
    if ctx.data[sb] and not ctx.data[sa]:
        (sx, x), (sw, w), mm = (sb, b), (sa, a), _swap(m)
    else:
        (sx, x), (sw, w), mm = (sa, a), (sb, b), m
    rule = ctx.layer_rule(kind, w)
    bn = ctx.partner() if whole else None
    affine = None if bn is None else batchnorm_affine(bn)
    fused = ctx.bias_partner() if whole else None
    coef = ctx.fused_coefficient() if fused is not None else weight_scale
    if coef != 1:  # the layer is c + a * f(x, w) = f(x, a * w) + c
        w = coef * w
    if affine is not None:  # one affine contraction with the batch norm it feeds
        scale, shift = affine
        w = _merged_weight(ctx.fn, kind, w, scale)
        bias = (shift if bias is None else bias * scale + shift).expand(r.shape)
        z = bn.known_output()
    elif fused is not None:  # one affine contraction with the constant added to its output
        z = ctx.fused_output()
        bias = z - mm.forward(x, w)  # this layer's own bias, if any, and the added constant
    else:
        z = ctx.known_output() if whole else None
    if isinstance(rule, Epsilon) and z is not None:
        res = rule(mm, x, w, bias, r, ctx.eps, z=z)  # the forward value is at hand
    else:
        res = rule(mm, x, w, bias, r, ctx.eps)
    outs[sx] = res.x
    if fused is not None and res.bias is not None and _has_infinity(bias):
        # a -inf mask added as the bias (scores + causal mask): it takes nothing, never
        # -inf * 0 = NaN, as an infinite summand of add takes nothing (elementwise.split_sum)
        res = res._replace(bias=res.bias.masked_fill(bias.isinf(), 0.0))
    if (affine is not None or fused is not None) and res.bias is not None:
        ctx.absorb(res.bias)  # the merged bias: this layer's and the batch norm's / constant's
        if fused is not None:  # a requested constant (the bias of x @ W + b) gets its share
            ctx.give_fused_constant(res.bias)
    elif fused is not None:  # a rule that gives the bias nothing: R_z all to the product
        ctx.give_fused_constant(torch.zeros_like(ctx.r))
    elif bias_slot is not None and res.bias is not None and ctx.fn.next_functions[bias_slot][0]:
        if kind == "conv":  # the bias is per channel, dimension 1
            rb = res.bias.sum([d for d in range(res.bias.dim()) if d != 1])
        else:
            rb = sum_to_shape(res.bias, ctx.input_shape(bias_slot))
        outs[bias_slot] = rb
    elif res.bias is not None:  # a frozen bias (not recorded): it absorbs its share all the same
        ctx.absorb(res.bias)
    if ctx.wanted[sw]:
        ctx.parameter[sw] = parameter_relevance(rule, mm, x, w, bias, r, ctx.eps)
    return outs


def _has_infinity(t: Tensor) -> bool:
    """Whether ``t`` may hold an infinity (always ``True`` off the CPU, where the test would
    synchronise)."""
    return t.device.type != "cpu" or bool(t.isinf().any())


def _attention_probabilities(ctx: RuleContext, slots: tuple[int, int]) -> int | None:
    """With ``Rules.attention = "cp"``: the slot of the operand that is a softmax output (through
    reshapes and casts), held constant by CP-LRP; ``None`` otherwise."""
    if ctx.rules.attention != "cp":
        return None
    held = [s for s in slots if (p := ctx.producer(s)) is not None and p.probabilities]
    return held[0] if len(held) == 1 else None


def _merged_weight(fn, kind: str, w: Tensor, scale: Tensor) -> Tensor:
    """``w'`` with ``f(x, w') = scale * f(x, w)``, ``scale`` per output channel (dimension 1)."""
    s = scale.reshape(-1)
    if kind == "dense":  # z = x @ w: the channels are w's columns
        return w * s
    if not fn._saved_transposed:  # (C_out, C_in / groups, *kernel)
        return w * s.view(-1, *([1] * (w.dim() - 1)))
    # transposed: (C_in, C_out / groups, *kernel); input channel i, column j feed output channel
    # (i // (C_in / groups)) * (C_out / groups) + j
    groups, (c_in, per) = int(fn._saved_groups), w.shape[:2]
    s = s.view(groups, 1, per).expand(groups, c_in // groups, per).reshape(c_in, per)
    return w * s.view(c_in, per, *([1] * (w.dim() - 2)))


def _addmm_bias(ctx: RuleContext, a, b, m):
    """``beta * c`` of ``addmm``; an unrecorded ``c`` as ``z - alpha * (a @ b)``."""
    if ctx.fn.next_functions[0][0] is None:
        return frozen_bias(ctx, getattr(ctx.fn, "_saved_alpha", 1) * m.forward(a, b))
    beta = getattr(ctx.fn, "_saved_beta", 1)
    v = ctx.input_value(0)
    return (v if beta == 1 else beta * v).expand(ctx.r.shape)


def conv_bias_unrecorded(fn) -> bool:
    """A convolution whose bias does not require grad (``OpEntry.unrecorded``)."""
    return fn.next_functions[2][0] is None and conv_has_bias(fn)


def conv_has_bias(fn) -> bool:
    """Autograd records the bias's sizes, ``(0,)`` when there is no bias."""
    sizes = getattr(fn, "_saved_bias_sym_sizes_opt", None)
    return bool(sizes) and tuple(sizes) != (0,)


def _conv_bias(ctx: RuleContext, a, b, m):
    if ctx.fn.next_functions[2][0] is None:
        if not conv_has_bias(ctx.fn):
            return None
        return frozen_bias(ctx, m.forward(a, b))
    v = ctx.input_value(2)
    return v.view(1, -1, *([1] * (ctx.r.dim() - 2))).expand(ctx.r.shape)


def _conv_map(fn) -> LinearMap:
    return convolution_map(
        tuple(saved(fn, "_saved_stride")),
        tuple(saved(fn, "_saved_padding")),
        tuple(fn._saved_dilation),
        bool(fn._saved_transposed),
        tuple(fn._saved_output_padding),
        int(fn._saved_groups),
    )


def _mv_map() -> LinearMap:
    """``z = A @ v`` with ``A`` (m, n) and ``v`` (n,)."""
    return LinearMap(
        forward=lambda a, v: a @ v,
        vjp_x=lambda g, a, v: g.unsqueeze(-1) * v,
        vjp_w=lambda g, a, v: a.transpose(-1, -2) @ g,
    )


def _dot_map() -> LinearMap:
    """``z = a . b`` for two vectors."""
    return LinearMap(
        forward=lambda a, b: a @ b,
        vjp_x=lambda g, a, b: g * b,
        vjp_w=lambda g, a, b: g * a,
    )


def _mv_rule(ctx: RuleContext):
    return contract(ctx, _mv_map(), "dense", (0, 1), None)


def _dot_rule(ctx: RuleContext):
    return contract(ctx, _dot_map(), "dense", (0, 1), None)


def _mm_rule(ctx: RuleContext):
    return contract(ctx, matmul_map(), "dense", (0, 1), None)


def _added_rule(m: Callable[[], LinearMap]):
    """``z = beta * c + alpha * m(a, b)`` with ``c`` in slot 0, ``a, b`` in 1, 2 (``addmm``,
    ``baddbmm``, ``addmv``, ``addr``, ``addbmm``), explained as its expansion
    ``beta * c + alpha * m(a, b)``.

    With at most one data factor and a constant ``c``, ``beta * c`` is the bias of the layer
    ``m(x, alpha * w)`` (as the fused ``c + alpha * (x @ W)``): the contraction rule with ``z``
    the full output.  Otherwise (``c`` is data, or both factors are) ``R`` is split over the
    summands ``beta * c`` and ``alpha * m(a, b)`` like add (``Rules.add``), a constant ``c``
    absorbing its share, and the product term's share goes through the contraction rule without a
    bias (``alpha`` passes it on, as ``alpha * x`` does).  Neither factor recorded: see
    :func:`_constant_product`."""

    def rule(ctx: RuleContext):
        outs = _constant_product(ctx)  # census (issue 14): only the added input is recorded
        if outs is not None:
            return outs
        alpha = getattr(ctx.fn, "_saved_alpha", 1)
        mm = m()
        if not ctx.data[0] and not (ctx.data[1] and ctx.data[2]):
            return contract(ctx, mm, "dense", (1, 2), 0, _addmm_bias, weight_scale=alpha)
        beta = getattr(ctx.fn, "_saved_beta", 1)
        p = mm.forward(ctx.input_value(1), ctx.input_value(2))
        p = p if alpha == 1 else alpha * p
        if ctx.fn.next_functions[0][0] is None:
            c = _output_or_explain(ctx, 0) - p
        else:
            c = ctx.input_value(0)
            c = (c if beta == 1 else beta * c).expand(p.shape)
        rc, rp = split_sum(ctx, [c, p], ctx.rules.add)
        outs = contract(ctx, mm, "dense", (1, 2), None, r=rp)  # alpha passes R on, as x * alpha
        if ctx.fn.next_functions[0][0] is None:
            ctx.absorb(rc)
        else:
            outs[0] = sum_to_shape(rc, ctx.input_shape(0))
        return outs

    return rule


_addmm_rule = _added_rule(matmul_map)


def _conv_rule(ctx: RuleContext):
    return contract(ctx, _conv_map(ctx.fn), "conv", (0, 1), 2, _conv_bias)


def _conv_replay(c):
    fn = c.fn
    x, w = c.inputs[0], c.inputs[1]
    z = _conv_map(fn).forward(x, w)
    if c.inputs[2] is not None:
        z = z + c.inputs[2].view(1, -1, *([1] * (z.dim() - 2)))
    return (z,)


def _product(rule, first: str, second: str, canonize: str | None = None) -> OpEntry:
    """``z = a @ b`` with both operands saved under ``first`` / ``second``."""
    return OpEntry(
        "contraction",
        rule,
        saved_inputs={0: first, 1: second},
        replay=lambda c: (c.inputs[0] @ c.inputs[1],),
        kind="dense",
        operands=(0, 1),
        canonize=canonize,
        fuses_bias=True,
    )


def _added_product(first: str, second: str, canonize: str | None = None) -> OpEntry:
    """``z = beta * input + alpha * (a @ b)`` (``addmm``, ``baddbmm``)."""
    return OpEntry(
        "contraction",
        _addmm_rule,
        saved_inputs={1: first, 2: second},
        replay=lambda c: (
            c.saved("_saved_beta") * c.inputs[0]
            + c.saved("_saved_alpha") * (c.inputs[1] @ c.inputs[2]),
        ),
        kind="dense",
        operands=(1, 2),
        canonize=canonize,
    )


# --- census (issue 14): more contractions, each a LinearMap for contract() -----------------------


def _outer_map() -> LinearMap:
    """``z = outer(a, b)``, ``z_ij = a_i b_j`` (``addr``)."""
    return LinearMap(
        forward=lambda a, b: torch.outer(a, b),
        vjp_x=lambda g, a, b: g @ b,
        vjp_w=lambda g, a, b: g.transpose(-1, -2) @ a,
    )


def _summed_bmm_map() -> LinearMap:
    """``z = sum_k a[k] @ b[k]`` over the batch (``addbmm``)."""
    return LinearMap(
        forward=lambda a, b: (a @ b).sum(0),
        vjp_x=lambda g, a, b: g @ b.transpose(-1, -2),
        vjp_w=lambda g, a, b: a.transpose(-1, -2) @ g,
    )


def _cross_map(dim: int) -> LinearMap:
    """``z = a x b`` (``linalg.cross`` along ``dim``), linear in each operand:
    ``J_a^T g = b x g``, ``J_b^T g = g x a`` (summed back over broadcast dimensions)."""
    return LinearMap(
        forward=lambda a, b: torch.linalg.cross(a, b, dim=dim),
        vjp_x=lambda g, a, b: sum_to_shape(torch.linalg.cross(b, g, dim=dim), a.shape),
        vjp_w=lambda g, a, b: sum_to_shape(torch.linalg.cross(g, a, dim=dim), b.shape),
    )


def _cross_rule(ctx: RuleContext):
    return contract(ctx, _cross_map(ctx.saved("_saved_dim")), "dense", (0, 1), None)


def _constant_product(ctx: RuleContext) -> list[Tensor | None] | None:
    """``z = beta * input + P`` where neither factor of the product ``P`` was recorded (they do
    not require grad, so the node saved neither): ``P = z - beta * input`` is a constant added to
    the data ``input``, split from it by the add rule (``Rules.add``) and absorbing its share,
    as for ``x + c``.  ``None`` when a factor is recorded (the contraction rules apply)."""
    fn = ctx.fn
    if fn.next_functions[1][0] is not None or fn.next_functions[2][0] is not None:
        return None
    if ctx.partner() is not None or ctx.bias_partner() is not None:
        return None  # paired by the plan as a layer: contract() refuses, the factors are unknown
    from .elementwise import split_sum

    beta = getattr(fn, "_saved_beta", 1)
    term = beta * ctx.input_value(0)
    out = ctx.output_value(0)
    r_input, r_product = split_sum(ctx, [term.expand(out.shape), out - term], ctx.rules.add)
    ctx.absorb(r_product)
    return [sum_to_shape(r_input, ctx.input_shape(0)), None, None]


def _added(m: Callable[[], LinearMap], first: str, second: str) -> OpEntry:
    """``addmv`` / ``addr`` / ``addbmm``: an added product, like :func:`_added_product`."""
    return OpEntry(
        "contraction",
        _added_rule(m),
        saved_inputs={1: first, 2: second},
        replay=lambda c: (
            c.saved("_saved_beta") * c.inputs[0]
            + c.saved("_saved_alpha") * m().forward(c.inputs[1], c.inputs[2]),
        ),
        kind="dense",
        operands=(1, 2),
    )


# --- issue 14: the bilinear form of F.bilinear (TrilinearBackward0) ------------------------------


def _bilinear_second_map() -> LinearMap:
    """``y_bo = sum_j t_boj x2_bj`` (the second contraction of ``x1^T W x2``)."""
    return LinearMap(
        forward=lambda t, x: (t @ x.unsqueeze(-1)).squeeze(-1),
        vjp_x=lambda g, t, x: g.unsqueeze(-1) * x.unsqueeze(-2),
        vjp_w=lambda g, t, x: (g.unsqueeze(-1) * t).sum(-2),
    )


def _pair_rule(
    ctx: RuleContext, m: LinearMap, a, b, da: bool, db: bool, r, weight_slot=None, first=None
):
    """Relevance of ``z = m(a, b)`` (no bias) to ``a`` and ``b`` by the contraction rules: the
    uniform rule between two data operands, else the layer rule (``Rules.dense``) of the data
    operand with the other as its weight; ``None`` for a constant operand.  ``weight_slot``: the
    node's slot of ``b`` when it is a weight that was requested (``ctx.parameter``, the rule read
    from the weight's side, as :func:`contract` gives it).  ``first=False``: not a first layer
    (``Rules.first`` does not apply), else the node's own standing (:meth:`RuleContext.layer_rule`)."""
    if da and db:
        return bilinear_uniform(m, a, b, r, ctx.eps)
    if not (da or db):
        return None, None
    if db:
        ra, rb = _pair_rule(ctx, _swap(m), b, a, True, False, r, first=first)
        return rb, ra
    if first is False:
        rule = ctx.rules.rule_for("dense", (b,), first=False)
    else:
        rule = ctx.layer_rule("dense", b)
    if weight_slot is not None:
        ctx.parameter[weight_slot] = parameter_relevance(rule, m, a, b, None, r, ctx.eps)
    return rule(m, a, b, None, r, ctx.eps).x, None


_BILINEAR = ((1, 3), (0,), (1, 2), (2, 3))


def bilinear_form_rule(ctx: RuleContext):
    """``y_bo = sum_ij x1_bi W_oij x2_bj`` (``F.bilinear`` without its bias, which is added by a
    node of its own): the map of the written-out ``torch.einsum("bi,oij,bj->bo", x1, W, x2)``,
    which contracts ``x1`` with ``W`` first: ``t_boj = sum_i x1_bi W_oij``, then
    ``y_bo = sum_j t_boj x2_bj``.  Each contraction takes the contraction rules
    (:func:`_pair_rule`): between two data operands the uniform rule (half of each product term
    to each factor, ``R_t = t (g x2) / 2``, ``R_x2 = x2 (t^T g) / 2``, ``g = R / stab(y)``), and
    the dense rule (``Rules.dense``, epsilon by default) where the other operand is a constant
    (the weight ``W``): ``R_x1 = x1 * J^T(R_t / stab(t))`` for epsilon.  ``t`` is data where
    ``x1`` or ``W`` is."""
    fn = ctx.fn
    layout = tuple(saved(fn, f"_saved_{k}") for k in ("expand1", "expand2", "expand3", "sumdim"))
    x1, w, x2 = (ctx.input_value(s) for s in range(3))
    if layout != _BILINEAR or x1.dim() != 2:
        raise UncoveredOpError(
            f"{fn.name()} (node {ctx.idx}): torch._trilinear with expand/sumdim {layout} is not "
            "the bilinear form of F.bilinear ((1, 3), (0,), (1, 2), (2, 3)) and has no rule; "
            "write it out with torch.einsum."
        )
    d1, dw, d2 = (fn.next_functions[s][0] is not None and ctx.data[s] for s in range(3))
    o, i, j = w.shape
    wm = w.permute(1, 0, 2).reshape(i, o * j)  # t = x1 @ wm, (B, o * j)
    t = (x1 @ wm).reshape(-1, o, j)
    # the second contraction is a first layer only where t is a constant (x2 its data operand)
    second_first = None if not (d1 or dw) else False
    rt, r2 = _pair_rule(ctx, _bilinear_second_map(), t, x2, d1 or dw, d2, ctx.r, first=second_first)
    r1 = rw = None
    if rt is not None:
        asked = 1 if d1 and not dw and ctx.wanted[1] else None  # a requested weight W
        r1, rwm = _pair_rule(ctx, matmul_map(), x1, wm, d1, dw, rt.reshape(-1, o * j), asked)
        if rwm is not None:
            rw = rwm.reshape(i, o, j).permute(1, 0, 2)
        if asked is not None:
            ctx.parameter[1] = ctx.parameter[1].reshape(i, o, j).permute(1, 0, 2)
    return [r1, rw, r2]


def _bilinear_replay(c):
    fn = c.fn
    return (
        torch._trilinear(
            *c.inputs,
            saved(fn, "_saved_expand1"),
            saved(fn, "_saved_expand2"),
            saved(fn, "_saved_expand3"),
            saved(fn, "_saved_sumdim"),
        ),
    )


TABLE = {
    "MmBackward0": _product(_mm_rule, "_saved_self", "_saved_mat2", "contraction"),
    "BmmBackward0": _product(_mm_rule, "_saved_self", "_saved_mat2"),
    "MvBackward0": _product(_mv_rule, "_saved_self", "_saved_vec"),
    "DotBackward0": _product(_dot_rule, "_saved_self", "_saved_tensor"),
    "AddmmBackward0": with_facts(
        _added_product("_saved_mat1", "_saved_mat2", "contraction"),
        unrecorded=product_term_unrecorded,
    ),
    "BaddbmmBackward0": with_facts(
        _added_product("_saved_batch1", "_saved_batch2"), unrecorded=product_term_unrecorded
    ),
    "ConvolutionBackward0": OpEntry(
        "contraction",
        _conv_rule,
        saved_inputs={0: "_saved_input", 1: "_saved_weight"},
        replay=_conv_replay,
        kind="conv",
        operands=(0, 1),
        canonize="contraction",
        fuses_bias=True,
        unrecorded=conv_bias_unrecorded,
    ),
    # --- census (issue 14)
    "AddmvBackward0": with_facts(
        _added(_mv_map, "_saved_mat", "_saved_vec"), unrecorded=product_term_unrecorded
    ),
    "AddrBackward0": with_facts(
        _added(_outer_map, "_saved_vec1", "_saved_vec2"), unrecorded=product_term_unrecorded
    ),
    "AddbmmBackward0": with_facts(
        _added(_summed_bmm_map, "_saved_batch1", "_saved_batch2"),
        unrecorded=product_term_unrecorded,
    ),
    "VdotBackward0": _product(_dot_rule, "_saved_self", "_saved_other"),
    "LinalgCrossBackward0": OpEntry(
        "contraction",
        _cross_rule,
        saved_inputs={0: "_saved_self", 1: "_saved_other"},
        replay=lambda c: (torch.linalg.cross(c.inputs[0], c.inputs[1], dim=c.saved("_saved_dim")),),
        kind="dense",
        operands=(0, 1),
    ),
    # --- issue 14, docs/rules.md 2.20
    "TrilinearBackward0": OpEntry(
        "contraction",
        bilinear_form_rule,
        saved_inputs={0: "_saved_i1", 1: "_saved_i2", 2: "_saved_i3"},
        replay=_bilinear_replay,
        kind="dense",
        operands=(0, 1),
    ),
}
