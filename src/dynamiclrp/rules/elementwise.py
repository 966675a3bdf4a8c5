"""Element-wise ops: binary (add, sub, mul, div) and unary (activations and friends).

Binary, with broadcasting (``sum_to_shape`` undoes it, as the gradient does):

- ``add`` / ``sub``, preset ``add="proportional"`` (the paper's eq. 4):
  ``R_a = R |a| / (|a| + |b|)``, ``R_b = R |b| / (|a| + |b|)``, where ``b`` is the term as added
  (``alpha * b``, ``-alpha * b`` for sub); where ``|a| + |b|`` is 0 or infinite (a ``-inf``
  mask) nothing is passed on.
  ``add="signed"``: ``R_a = R a / stab(a + b)``.  A constant operand (bias, buffer) absorbs its share.
  A constant autograd did not record (a Python scalar or a tensor without grad) is rebuilt as
  ``out - a`` when the sum's value is known, and absorbs its share like a bias.  (Ops that do
  record a scalar separately, ``AddBackward1`` / ``RsubBackward1``, use the identity rule.)
- ``mul`` / ``div`` of two data operands: uniform rule, ``R_a = R_b = R / 2`` (AttnLRP).  An operand
  broadcast over dimensions the other spans (a per-row statistic such as ``rsqrt(var)``) counts as
  constant, so all relevance goes to the full-shape operand (AttnLRP's identity rule for normalisers
  written out of primitives); if both are broadcast, half each.  Times a constant: ``R_x = R``.
  With ``Rules.gates = "constant"`` (CP-LRP) a full-shape operand produced by an element-wise
  activation (``silu(gate) * up``, looking through reshapes and casts) is a constant gate when the
  other is not: all relevance to the other.

Fused, split like add (``Rules.add``) over their summands, then as above:

- ``addcmul`` / ``addcdiv``, ``self + value * t1 * t2`` (``/ t2``): ``self`` and the product term
  ``value * t1 * t2`` share ``R`` like add; the product term's share goes to ``t1`` and ``t2`` by
  the mul/div rule.
- ``lerp(a, b, w) = (1 - w) * a + w * b``: ``R`` split over ``(1 - w) * a`` and ``w * b`` like add;
  a tensor weight is a constant (one that depends on data raises ``NotImplementedError``).

Unary (relu, gelu, silu, sigmoid, tanh, exp, log, pow, sqrt, rsqrt, abs, clamp, neg, dropout, ...):
identity rule, ``R_in = R_out``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ValueRecoveryError
from .base import (
    ACTIVATIONS,
    PASS_THROUGH,
    OpEntry,
    ReplayContext,
    RuleContext,
    saved,
    sum_to_shape,
)
from .linear import fits, safe_divide


def identity(ctx: RuleContext):
    """``R_in = R_out``."""
    return (ctx.r,)


def _operand(c: ReplayContext, slot: int, attr: str) -> Tensor:
    v = c.inputs[slot]
    return c.saved(attr) if v is None else v


def _add_replay(sign: float):
    return lambda c: (c.inputs[0] + sign * _alpha(c) * c.inputs[1],)


def _alpha(ctx) -> float:
    a = saved(ctx.fn, "_saved_alpha") if hasattr(ctx.fn, "_saved_alpha") else 1
    return 1 if a is None else a


def _terms(ctx: RuleContext, sign: float):
    """The two summands as they enter the output: ``a`` and ``sign * alpha * b``.

    A constant operand that does not require grad (a Python scalar, a buffer) leaves no trace in
    the graph; it is recovered as ``out - a`` when the output's value is known (the explained
    output itself, or a consumer saved it).
    """
    alpha = sign * _alpha(ctx)
    for slot in (0, 1):
        if ctx.fn.next_functions[slot][0] is None:
            other = ctx.input_value(1 - slot)
            other = other if slot == 1 or alpha == 1 else alpha * other
            out = _output_or_explain(ctx, slot)
            return (other, out - other) if slot == 1 else (out - other, other)
    # one operand at hand (saved by a neighbour) and the sum too (a residual stream: the next
    # norm saved it): the other is the difference, not a replay of the layer that made it
    known = [ctx.known_input(0), ctx.known_input(1)]
    if (known[0] is None) != (known[1] is None) and (out := ctx.known_output()) is not None:
        if known[0] is not None:
            a = known[0]
            b = out - a
            if alpha == 1:
                ctx.remember_input(1, b)
            return a, b
        b = known[1] if alpha == 1 else alpha * known[1]
        a = out - b
        ctx.remember_input(0, a)
        return a, b
    a, b = ctx.input_value(0), ctx.input_value(1)
    return a, b if alpha == 1 else alpha * b  # 1 * b is b: one op fewer


def _output_or_explain(ctx: RuleContext, slot: int, advice: str | None = None) -> Tensor:
    try:
        return ctx.output_value(0)
    except ValueRecoveryError as err:
        if ctx._engine.resolver.recorded:  # a recording was passed and did not keep it
            raise ValueRecoveryError(
                f"{ctx.fn.name()} (node {ctx.idx}) adds a constant (operand {slot}: a Python "
                "scalar or a tensor that does not require grad) that autograd did not record, "
                "no node saved the sum, and the recording passed to explain did not see it "
                "either: the op ran inside a C++ composite that adds internally (e.g. "
                "F.margin_ranking_loss, F.kl_div, F.gaussian_nll_loss), or in another forward "
                "pass than the one recorded. Write that op out in Python (e.g. "
                "(-target * (x1 - x2) + margin).clamp_min(0) for margin_ranking_loss), or let "
                "the constant operand require grad during the forward pass."
            ) from err
        raise ValueRecoveryError(
            f"{ctx.fn.name()} (node {ctx.idx}) adds a constant (operand {slot}: a Python scalar "
            "or a tensor that does not require grad) that autograd did not record, and no node "
            "saved the sum, so the proportional rule cannot see the constant's size. "
            + (
                advice
                or "Run the forward pass under `with dynamiclrp.record() as rec:` and pass "
                "recording=rec to explain (it keeps exactly such results)."
            )
        ) from err


def _split_proportional(r: Tensor, mags: list[Tensor]) -> list[Tensor]:
    """``R_i = |t_i| * R / sum_j |t_j|`` for the magnitudes ``mags`` (fresh tensors, overwritten).

    Where every term is 0 the terms get ``0 * R`` (0 for a finite ``R``); an infinite term (a
    ``-inf`` mask) takes nothing, and a NaN stays NaN.  Written for memory traffic: the shares are
    computed in the magnitudes' buffers and the quotient in the denominator's, and on the CPU the
    infinity mask is only built when an infinity is there (on a GPU that test would synchronise)."""
    den = mags[0] + mags[1]
    for m in mags[2:]:
        den = den + m
    # den >= 0: an infinity in it is +inf (an infinite term, or an overflow where every share is
    # finite * 0 anyway)
    inf = den == math.inf if den.device.type != "cpu" or bool(den.isinf().any()) else None
    g = den.masked_fill_(den == 0, 1)
    g = torch.div(r, g, out=g) if fits(g, r) else r / g
    out = []
    for m in mags:
        share = m.mul_(g) if fits(m, g) else m * g
        out.append(share if inf is None else share.masked_fill_(inf, 0))
    return out


def split_sum(ctx: RuleContext, terms: list[Tensor], mode: str) -> list[Tensor]:
    """Split ``R`` of ``z = sum(terms)`` over the terms: ``R |t_i| / sum_j |t_j|``
    (``"proportional"``) or ``R t_i / stab(z)`` (``"signed"``, epsilon).

    Where the signed sum cancels to rounding level and below ``eps`` (:func:`cancelled`, e.g.
    ``x - amax(x)`` at the maximum), its shares ``+-R t_i / stab(z)`` have no meaningful sign and
    cancel only in floating point further down (book residuals up to ``1e-4`` of the seed at
    ``eps = 1e-12``); there ``R`` is split proportionally instead, which conserves exactly."""
    r = ctx.r
    if mode == "proportional":
        return _split_proportional(r, [t.abs() for t in terms])
    z = terms[0]
    for t in terms[1:]:
        z = z + t
    mags: list[Tensor] = []  # filled only where a cancellation is looked for, reused below

    def magnitude() -> Tensor:
        mags.extend(t.abs() for t in terms)
        return sum(mags[1:], mags[0])

    zero = cancelled(z, magnitude, len(terms), ctx.eps)
    g = safe_divide(r, z, ctx.eps)
    shares = [t * g for t in terms]
    # an infinite term (a -inf mask) takes nothing, never inf * 0 = NaN (the others get R / inf = 0)
    if z.device.type != "cpu" or bool(z.isinf().any()):
        inf = z.isinf()
        shares = [s.masked_fill_(inf, 0.0) for s in shares]
    if zero is None:
        return shares
    exact = _split_proportional(r, mags)
    return [torch.where(zero, e, s) for e, s in zip(exact, shares, strict=True)]


def cancelled(
    z: Tensor, magnitude: Callable[[], Tensor], n_terms: int, eps: float
) -> Tensor | None:
    """Where a signed sum ``z`` of ``n_terms`` terms is 0 up to rounding (``|z| <= 2 n u m`` with
    ``m = magnitude()`` the sum of the terms' magnitudes, ``m > 0``, and ``u`` the dtype's unit
    roundoff) and the stabiliser would not hold its shares in check (``|z| <= eps``); ``None`` on
    the CPU when there is no such element.  ``magnitude`` is only called where some ``|z| <= eps``
    (always on a GPU, where that test would synchronise).

    The second condition keeps low precisions on the signed split they had: in bfloat16 a sum
    within rounding of 0 is ``~1e-2`` of its terms, far above the presets' ``eps``, and switching
    those to the proportional split moved bfloat16 maps away from float64 ones
    (``benchmarks/precision.py``, gamma preset: median cosine 1-2e-4 -> 0.998)."""
    size = z.abs()
    zero = size <= eps
    on_cpu = z.device.type == "cpu"
    if on_cpu and not bool(zero.any()):
        return None
    m = magnitude()
    zero &= (size <= 2 * n_terms * torch.finfo(z.dtype).eps * m) & (m > 0)
    if on_cpu and not bool(zero.any()):
        return None
    return zero


def add_rule(sign: float):
    def rule(ctx: RuleContext):
        fused = ctx.bias_partner()
        if fused is not None:  # the bias of the contraction below: its rule splits R there
            slot = ctx.fused_data_slot()
            outs = [None, None]
            outs[slot] = sum_to_shape(ctx.r, ctx.input_shape(slot))
            return outs
        a, b = _terms(ctx, sign)
        ra, rb = split_sum(ctx, [a, b], ctx.rules.add)
        outs = [None, None]
        for slot, rel in ((0, ra), (1, rb)):
            if ctx.fn.next_functions[slot][0] is None:
                outs[slot] = rel  # an unrecorded constant: absorbed (the books need its sum)
            else:
                outs[slot] = sum_to_shape(rel, ctx.input_shape(slot))
        return outs

    rule.__doc__ = "Add/sub: split R over the summands (``Rules.add``)."
    return rule


def _rsub_rule(ctx: RuleContext):
    """``z = other - alpha * self`` (``torch.rsub`` with two tensors, ``RsubBackward0``): the add
    rule (``Rules.add``) on the summands ``t_0 = -alpha * self`` and ``t_1 = other``; an
    unrecorded operand is recovered as ``z - (the other summand)`` and absorbs its share."""
    alpha = _alpha(ctx)
    x, y = _known_input(ctx, 0), _known_input(ctx, 1)
    terms = _fill_missing(ctx, [None if x is None else -alpha * x, y], [0, 1])
    shares = split_sum(ctx, terms, ctx.rules.add)
    outs = []
    for slot, rel in enumerate(shares):
        unrecorded = ctx.fn.next_functions[slot][0] is None
        outs.append(rel if unrecorded else sum_to_shape(rel, ctx.input_shape(slot)))
    return outs


def _product_shares(ctx: RuleContext, r: Tensor, slots, n_out: int) -> dict[int, Tensor]:
    """``R`` of a product of the operands in ``slots`` (``n_out`` elements): uniform between two
    full-shape data operands, else all to the full-shape data one (module docstring)."""
    present = [s for s in slots if ctx.fn.next_functions[s][0] is not None]
    receivers = [s for s in present if ctx.data[s]] or present
    if len(receivers) == 2:
        full = [s for s in receivers if math.prod(ctx.input_shape(s)) == n_out]
        if len(full) == 1:  # the other is broadcast over dims this one spans: a statistic
            receivers = full
        elif ctx.rules.gates == "constant":  # CP-LRP: an activation's output is a constant gate
            gates = [s for s in receivers if ctx.producer(s, PASS_THROUGH) in ACTIVATIONS]
            if len(gates) == 1:
                receivers = [s for s in receivers if s != gates[0]]
    share = r if len(receivers) == 1 else r * 0.5
    return {s: sum_to_shape(share, ctx.input_shape(s)) for s in receivers}


def product_rule(ctx: RuleContext):
    """Mul/div: uniform between two full-shape data operands, else all to the full-shape data one."""
    shares = _product_shares(ctx, ctx.r, (0, 1), ctx.r.numel())
    return [shares.get(0), shares.get(1)]


def _known_input(ctx: RuleContext, slot: int) -> Tensor | None:
    """Input ``slot``'s value; ``None`` for an unrecorded operand the node did not save."""
    if ctx.fn.next_functions[slot][0] is not None:
        return ctx.input_value(slot)
    try:
        return ctx.input_value(slot)
    except ValueRecoveryError:
        return None


def _fill_missing(ctx: RuleContext, terms: list[Tensor | None], slots: list[int]) -> list[Tensor]:
    """Summands of the output; one that is ``None`` (its operand ``slots[i]`` was not recorded
    nor saved) is recovered as ``out - (the others)``, like the unrecorded operand of add."""
    missing = [i for i, t in enumerate(terms) if t is None]
    if not missing:
        return terms
    if len(missing) > 1:
        raise ValueRecoveryError(
            f"{ctx.fn.name()} (node {ctx.idx}): operands {[slots[i] for i in missing]} are "
            "constants autograd did not record and the node did not save. " + _UNRECORDED_ADVICE
        )
    rest = _output_or_explain(ctx, slots[missing[0]], advice=_UNRECORDED_ADVICE)
    for t in terms:
        if t is not None:
            rest = rest - t
    return [rest if t is None else t for t in terms]


_UNRECORDED_ADVICE = (
    "Make that operand require grad during the forward pass (an nn.Parameter, or "
    ".requires_grad_() on the tensor), or explain this node's output itself."
)


def _to_slot(ctx: RuleContext, slot: int, rel: Tensor) -> Tensor:
    """A summand's share for its operand; an unrecorded one's is returned whole (absorbed)."""
    if ctx.fn.next_functions[slot][0] is None:
        return rel
    return sum_to_shape(rel, ctx.input_shape(slot))


def addc_rule(combine):
    """``z = self + value * combine(t1, t2)`` (``addcmul``: ``t1 * t2``; ``addcdiv``: ``t1 / t2``).

    ``R`` is split over ``self`` and the product term ``p = value * combine(t1, t2)`` like add
    (``Rules.add``: ``R_self = R |self| / (|self| + |p|)``, or ``R self / stab(self + p)``); the
    product term's share ``R_p`` goes to ``t1`` and ``t2`` by the mul/div rule: ``R_p / 2`` each
    when both are full-shape data operands, all to the data (or full-shape) one otherwise.  With
    no recorded factor the product term's share is absorbed.
    """

    def rule(ctx: RuleContext):
        value = ctx.saved("_saved_value")
        t1, t2 = _known_input(ctx, 1), _known_input(ctx, 2)
        p = None if t1 is None or t2 is None else value * combine(t1, t2)
        a, p = _fill_missing(ctx, [_known_input(ctx, 0), p], [0, 1])
        ra, rp = split_sum(ctx, [a, p], ctx.rules.add)
        recorded = [s for s in (1, 2) if ctx.fn.next_functions[s][0] is not None]
        n_out = math.prod(torch.broadcast_shapes(*(ctx.input_shape(s) for s in recorded)))
        shares = _product_shares(ctx, rp, (1, 2), n_out)
        if not shares:
            ctx.absorb(rp)
        return [_to_slot(ctx, 0, ra), shares.get(1), shares.get(2)]

    return rule


def lerp_rule(ctx: RuleContext):
    """``z = lerp(a, b, w) = (1 - w) * a + w * b``: ``R`` split over the two terms ``(1 - w) * a``
    and ``w * b`` like add (``Rules.add``).  A tensor weight (``LerpBackward1``) is held constant
    and receives nothing; a weight that depends on data raises ``NotImplementedError``."""
    if ctx.n_inputs() == 3:
        if ctx.data[2]:
            raise NotImplementedError(
                f"{ctx.fn.name()} (node {ctx.idx}): torch.lerp with a weight that depends on the "
                "data is not supported (the weight is treated as a constant). Write the "
                "interpolation out as a + w * (b - a), or explain it with the weight detached."
            )
        w = ctx.input_value(2)
    else:
        w = ctx.saved("_saved_weight")
    a, b = _known_input(ctx, 0), _known_input(ctx, 1)
    terms = [None if a is None else (1 - w) * a, None if b is None else w * b]
    ra, rb = split_sum(ctx, _fill_missing(ctx, terms, [0, 1]), ctx.rules.add)
    return [_to_slot(ctx, 0, ra), _to_slot(ctx, 1, rb)] + [None] * (ctx.n_inputs() - 2)


def _unary(replay=None, saved_inputs=None, saved_outputs=None) -> OpEntry:
    return OpEntry(
        "elementwise-unary",
        identity,
        replay=replay,
        saved_inputs=saved_inputs or {},
        saved_outputs=saved_outputs or {},
    )


def _self_op(fn):
    """A unary op with ``_saved_self``: the node is an arg node for its input, replay is ``fn``."""
    return _unary(lambda c: (fn(c, c.inputs[0]),), saved_inputs={0: "_saved_self"})


def _result_op(replay):
    """A unary op that saved its result: an arg node for its own output."""
    return _unary(replay, saved_outputs={0: "_saved_result"})


TABLE = {
    "AddBackward0": OpEntry(
        "elementwise-binary",
        add_rule(1.0),
        needs_values=True,
        canonize="add",
        replay=_add_replay(1.0),
    ),
    "SubBackward0": OpEntry(
        "elementwise-binary",
        add_rule(-1.0),
        needs_values=True,
        canonize="add",
        replay=_add_replay(-1.0),
    ),
    "MulBackward0": OpEntry(
        "elementwise-binary",
        product_rule,
        saved_inputs={0: "_saved_self", 1: "_saved_other"},
        replay=lambda c: (_operand(c, 0, "_saved_self") * _operand(c, 1, "_saved_other"),),
    ),
    "DivBackward0": OpEntry(
        "elementwise-binary",
        product_rule,
        saved_inputs={0: "_saved_self", 1: "_saved_other"},
        replay=lambda c: (_operand(c, 0, "_saved_self") / _operand(c, 1, "_saved_other"),),
    ),
    # a Python scalar operand: an element-wise map of one tensor
    "AddBackward1": _unary(),
    "SubBackward1": _unary(),
    "RsubBackward1": _unary(),
    "MulBackward1": _unary(lambda c: (c.inputs[0] * c.saved("_saved_other"),)),
    "DivBackward1": _unary(lambda c: (c.inputs[0] / c.saved("_saved_other"),)),
    "NegBackward0": _unary(lambda c: (-c.inputs[0],)),
    "ReluBackward0": _result_op(lambda c: (torch.relu(c.inputs[0]),)),
    "SigmoidBackward0": _result_op(lambda c: (torch.sigmoid(c.inputs[0]),)),
    "TanhBackward0": _result_op(lambda c: (torch.tanh(c.inputs[0]),)),
    "ExpBackward0": _result_op(lambda c: (torch.exp(c.inputs[0]),)),
    "SqrtBackward0": _result_op(lambda c: (torch.sqrt(c.inputs[0]),)),
    "RsqrtBackward0": _result_op(lambda c: (torch.rsqrt(c.inputs[0]),)),
    "ReciprocalBackward0": _result_op(lambda c: (torch.reciprocal(c.inputs[0]),)),
    "GeluBackward0": _self_op(lambda c, x: F.gelu(x, approximate=c.saved("_saved_approximate"))),
    "SiluBackward0": _self_op(lambda c, x: F.silu(x)),
    "MishBackward0": _self_op(lambda c, x: F.mish(x)),
    "HardswishBackward0": _self_op(lambda c, x: F.hardswish(x)),
    "HardsigmoidBackward0": _self_op(lambda c, x: F.hardsigmoid(x)),
    "ErfBackward0": _self_op(lambda c, x: torch.erf(x)),
    "LogBackward0": _self_op(lambda c, x: torch.log(x)),
    "AbsBackward0": _self_op(lambda c, x: torch.abs(x)),
    "SinBackward0": _self_op(lambda c, x: torch.sin(x)),
    "CosBackward0": _self_op(lambda c, x: torch.cos(x)),
    "PowBackward0": _self_op(lambda c, x: torch.pow(x, c.saved("_saved_exponent"))),
    "LeakyReluBackward0": _self_op(lambda c, x: F.leaky_relu(x, c.saved("_saved_negative_slope"))),
    "EluBackward0": _self_op(
        lambda c, x: (
            c.saved("_saved_scale")
            * torch.where(
                x > 0, x, c.saved("_saved_alpha") * torch.expm1(x * c.saved("_saved_input_scale"))
            )
        )
    ),
    "SoftplusBackward0": _self_op(
        lambda c, x: F.softplus(x, c.saved("_saved_beta"), c.saved("_saved_threshold"))
    ),
    "ClampBackward1": _self_op(
        lambda c, x: torch.clamp(x, c.saved("_saved_min"), c.saved("_saved_max"))
    ),
    # tensor bounds (T5 in float16 clamps with 0-d tensors): constants, like scalar bounds
    "ClampBackward0": _self_op(
        lambda c, x: torch.clamp(x, c.saved("_saved_min"), c.saved("_saved_max"))
    ),
    "ClampMinBackward0": _self_op(lambda c, x: torch.clamp(x, min=c.saved("_saved_min"))),
    "ClampMaxBackward0": _self_op(lambda c, x: torch.clamp(x, max=c.saved("_saved_max"))),
    "HardtanhBackward0": _self_op(
        lambda c, x: F.hardtanh(x, c.saved("_saved_min_val"), c.saved("_saved_max_val"))
    ),
    # training-mode dropout (CUDA kernel): replay with the saved mask; identity rule
    "NativeDropoutBackward0": _unary(
        lambda c: (c.inputs[0] * c.saved("_saved_result1") * c.saved("_saved_scale"),)
    ),
    # fused multiply-add and interpolation of two tensors: add-like splits
    "AddcmulBackward0": OpEntry(
        "elementwise-binary",
        addc_rule(torch.mul),
        needs_values=True,
        saved_inputs={1: "_saved_tensor1", 2: "_saved_tensor2"},
        replay=lambda c: (torch.addcmul(*c.inputs, value=c.saved("_saved_value")),),
    ),
    "AddcdivBackward0": OpEntry(
        "elementwise-binary",
        addc_rule(torch.div),
        needs_values=True,
        saved_inputs={1: "_saved_tensor1", 2: "_saved_tensor2"},
        replay=lambda c: (torch.addcdiv(*c.inputs, value=c.saved("_saved_value")),),
    ),
    "LerpBackward0": OpEntry(
        "elementwise-binary",
        lerp_rule,
        needs_values=True,
        replay=lambda c: (torch.lerp(*c.inputs, c.saved("_saved_weight")),),
    ),
    "LerpBackward1": OpEntry(
        "elementwise-binary",
        lerp_rule,
        needs_values=True,
        saved_inputs={0: "_saved_self", 1: "_saved_end", 2: "_saved_weight"},
        replay=lambda c: (torch.lerp(*c.inputs),),
    ),
    # --- census (issue 14): rsub with a tensor (c - x written torch.rsub(x, c))
    "RsubBackward0": OpEntry(
        "elementwise-binary",
        _rsub_rule,
        needs_values=True,
        replay=lambda c: (c.inputs[1] - _alpha(c) * c.inputs[0],),
    ),
}
