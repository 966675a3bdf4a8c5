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
  broadcast over dimensions the other spans that is a *statistic* of the other (a parameter-free
  function of its data, such as ``rsqrt(mean(h ** 2))``, decided by the plan from the graph's
  structure) counts as constant, so all relevance goes to the full-shape operand (AttnLRP's
  identity rule for normalisers written out of primitives); a broadcast gate computed by a layer
  of its own (a router, FiLM) shares uniformly.  Times a weight (an operand no data reaches):
  ``R_x = R``.  With ``Rules.gates = "constant"`` (CP-LRP) a full-shape operand produced by an
  element-wise activation (``silu(gate) * up``, looking through reshapes and casts) is a constant
  gate when the other is not: all relevance to the other.

Fused, split like add (``Rules.add``) over their summands, then as above:

- ``addcmul`` / ``addcdiv``, ``self + value * t1 * t2`` (``/ t2``): ``self`` and the product term
  ``value * t1 * t2`` share ``R`` like add; the product term's share goes to ``t1`` and ``t2`` by
  the mul/div rule.
- ``lerp(a, b, w) = (1 - w) * a + w * b``: ``R`` split over ``(1 - w) * a`` and ``w * b`` like add;
  a tensor weight is a constant (one that depends on data raises ``NotImplementedError``).

Element-wise binary ops that are compositions of the above (``logaddexp``, ``hypot``, ``atan2``,
``fmod``, ``ldexp``, ``prelu``, ``xlog1py``, ...) get the map of their written-out spelling; where
the spellings disagree (``copysign``) or none exists (``nextafter``, ``fill``) the rule's docstring
says what was chosen and why (``docs/rules.md`` 2.19).

Unary (relu, gelu, silu, sigmoid, tanh, exp, expm1, log, log1p, pow, sqrt, rsqrt, abs, clamp, neg, dropout, ...):
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
    OpEntry,
    ReplayContext,
    RuleContext,
    always_unrecorded,
    has_unrecorded_input,
    product_term_unrecorded,
    saved,
    self_unrecorded,
    sum_to_shape,
    with_facts,
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


def _scalar_factor(divide: bool):
    """``(fn, slot) -> c`` for a product (quotient) of input ``slot`` and a one-element constant
    autograd did not record (``2.0 * x``, ``x / 4``); ``None`` for any other operand."""

    def coefficient(fn, slot: int):
        if slot == 1 and divide:
            return None  # c / x is not linear in x
        other, attr = (1, "_saved_other") if slot == 0 else (0, "_saved_self")
        if fn.next_functions[other][0] is not None:
            return None
        c = getattr(fn, attr)
        if c is None or c.numel() != 1:
            return None
        return 1.0 / float(c) if divide else float(c)

    return coefficient


def _coefficient(sign: float):
    """``(fn, slot) -> c`` of ``a + sign * alpha * b``: 1 for ``a``, ``sign * alpha`` for ``b``."""
    return lambda fn, slot: 1.0 if slot == 0 else sign * _alpha_of(fn)


def _alpha_of(fn) -> float:
    a = saved(fn, "_saved_alpha") if hasattr(fn, "_saved_alpha") else 1
    return 1 if a is None else a


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
        if ctx.recorded:  # a recording was passed and did not keep it
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


def split_sum(
    ctx: RuleContext, terms: list[Tensor], mode: str, r: Tensor | None = None
) -> list[Tensor]:
    """Split ``R`` of ``z = sum(terms)`` over the terms: ``R |t_i| / sum_j |t_j|``
    (``"proportional"``) or ``R t_i / stab(z)`` (``"signed"``, epsilon).

    Where the signed sum cancels to rounding level and below ``eps`` (:func:`cancelled`, e.g.
    ``x - amax(x)`` at the maximum), its shares ``+-R t_i / stab(z)`` have no meaningful sign and
    cancel only in floating point further down (book residuals up to ``1e-4`` of the seed at
    ``eps = 1e-12``); there ``R`` is split proportionally instead, which conserves exactly.
    ``r``: the relevance to split (default ``ctx.r``, the node's output relevance)."""
    r = ctx.r if r is None else r
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
    if ctx.bias_partner() is not None:  # c - x @ W: the contraction's bias (engine fusion)
        slot = ctx.fused_data_slot()
        outs = [None, None]
        outs[slot] = sum_to_shape(ctx.r, ctx.input_shape(slot))
        return outs
    alpha = _alpha(ctx)
    x, y = _known_input(ctx, 0), _known_input(ctx, 1)
    terms = _fill_missing(ctx, [None if x is None else -alpha * x, y], [0, 1])
    shares = split_sum(ctx, terms, ctx.rules.add)
    outs = []
    for slot, rel in enumerate(shares):
        unrecorded = ctx.fn.next_functions[slot][0] is None
        outs.append(rel if unrecorded else sum_to_shape(rel, ctx.input_shape(slot)))
    return outs


def _product_shares(
    ctx: RuleContext, r: Tensor, slots, n_out: int, gate_slots=None, to_slot=None
) -> dict[int, Tensor]:
    """``R`` of a product of the factors in ``slots`` (``n_out`` elements).

    - A factor no data reaches (a weight, a buffer, a constant lookup) takes nothing: the data
      factor takes all of ``R`` (``x * c`` passes ``R`` on).  A requested weight factor gets the
      rule read from its side, ``R_w = R`` summed to its shape, outside the books.
    - Of two data factors, one broadcast over dimensions the other spans that is a statistic of the
      other (a parameter-free function of its data, found by the plan: ``rsqrt(mean(h ** 2))``)
      takes nothing: AttnLRP's identity rule for normalisers written out of primitives.
    - Otherwise the two data factors share ``R`` uniformly (AttnLRP), a gate computed by a layer of
      its own (``expert_out * gate``, FiLM's ``h * gamma(cond)``) included; with
      ``Rules.gates = "constant"`` (CP-LRP) a full-shape factor produced by an element-wise
      activation is a constant gate when the other is not.

    ``gate_slots``: the operands that can be a constant gate (default: all), for an op whose
    written-out spelling puts another op between an operand and the product (``x ** y`` is
    ``exp(y * log(x))``: only ``y`` enters the product as it was produced).  ``to_slot``:
    ``(slot, share) -> relevance of that input`` (default: undo broadcasting with
    :func:`sum_to_shape`), for an operand broadcast otherwise (prelu's per-channel weight)."""
    if to_slot is None:

        def to_slot(s, t):
            return sum_to_shape(t, ctx.input_shape(s))

    present = [s for s in slots if ctx.fn.next_functions[s][0] is not None]
    receivers = [s for s in present if ctx.data[s]] or present
    if len(receivers) == 2:
        full = [s for s in receivers if math.prod(ctx.input_shape(s)) == n_out]
        stats = [s for s in ctx.statistic_slots() if s not in full]
        if len(full) == 1 and stats:  # the broadcast factor is a statistic of the other
            receivers = full
        elif ctx.rules.gates == "constant":  # CP-LRP: an activation's output is a constant gate
            gates = [
                s
                for s in receivers
                if (gate_slots is None or s in gate_slots) and ctx.is_activation(s)
            ]
            if len(gates) == 1 and math.prod(ctx.input_shape(gates[0])) == n_out:
                receivers = [s for s in receivers if s != gates[0]]
    share = r if len(receivers) == 1 else r * 0.5
    out = {s: to_slot(s, share) for s in receivers}
    for s in present:
        if (
            s not in out and ctx.wanted[s] and not ctx.data[s]
        ):  # a requested weight, read from its side
            ctx.parameter[s] = to_slot(s, r)
    return out


def product_rule(ctx: RuleContext):
    """Mul/div: uniform between two full-shape data operands, else all to the full-shape data one."""
    shares = _product_shares(ctx, ctx.r, (0, 1), ctx.r.numel())
    return [shares.get(0), shares.get(1)]


def log_product_rule(gate_slot: int):
    """A product of one operand with the log of the other, both tensors: ``x ** y`` (``PowBackward1``)
    is ``exp(y * log(x))`` and ``xlogy(x, y)`` (``XlogyBackward0``) is ``x * log(y)``; ``exp`` and
    ``log`` pass relevance on unchanged (identity rule), so ``R`` is split as for the product
    written out (:func:`product_rule`): ``R / 2`` to each full-shape data operand, all to the
    full-shape one where the other is broadcast, and with ``Rules.gates = "constant"`` all to the
    other operand when operand ``gate_slot`` (the one that enters the product as produced) is an
    activation's output.  With one recorded operand it is an element-wise map of it: ``R``."""

    def rule(ctx: RuleContext):
        shares = _product_shares(ctx, ctx.r, (0, 1), ctx.r.numel(), gate_slots=(gate_slot,))
        return [shares.get(0), shares.get(1)]

    rule.__doc__ = log_product_rule.__doc__
    return rule


def glu_rule(ctx: RuleContext):
    """``glu(x, dim) = a * sigmoid(b)`` with ``a, b = x.chunk(2, dim)``: the product rule of the
    written-out spelling (``sigmoid`` passes relevance on unchanged): ``R_a = R_b = R / 2``; with
    ``Rules.gates = "constant"`` (CP-LRP) the gate ``sigmoid(b)`` is a constant and
    ``R_a = R``, ``R_b = 0``.  ``R_x`` is ``[R_a, R_b]`` along ``dim``."""
    r = ctx.r
    dim = ctx.saved("_saved_dim")
    if ctx.rules.gates == "constant":
        return (torch.cat([r, torch.zeros_like(r)], dim),)
    half = r * 0.5
    return (torch.cat([half, half], dim),)


def _known_input(ctx: RuleContext, slot: int) -> Tensor | None:
    """Input ``slot``'s value; ``None`` for an unrecorded operand the node did not save."""
    if ctx.fn.next_functions[slot][0] is not None:
        return ctx.input_value(slot)
    try:
        return ctx.input_value(slot)
    except ValueRecoveryError:
        return None


def _fill_missing(
    ctx: RuleContext, terms: list[Tensor | None], slots: list[int], total: Tensor | None = None
) -> list[Tensor]:
    """Summands of the output; one that is ``None`` (its operand ``slots[i]`` was not recorded
    nor saved) is recovered as ``out - (the others)``, like the unrecorded operand of add.
    ``total``: the sum of the summands when it is not the output (``hypot``: ``z**2``)."""
    missing = [i for i, t in enumerate(terms) if t is None]
    if not missing:
        return terms
    if len(missing) > 1:
        raise ValueRecoveryError(
            f"{ctx.fn.name()} (node {ctx.idx}): operands {[slots[i] for i in missing]} are "
            "constants autograd did not record and the node did not save. " + _UNRECORDED_ADVICE
        )
    rest = (
        _output_or_explain(ctx, slots[missing[0]], advice=_UNRECORDED_ADVICE)
        if total is None
        else total
    )
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


def _lerp_end_unrecorded(fn) -> bool:
    """``lerp(a, b, w)`` with a tensor weight: ``a`` or ``b`` without grad, which the node does not
    save (the weight it saves)."""
    return fn.next_functions[0][0] is None or fn.next_functions[1][0] is None


def _self_term(fn, slot: int):
    """``addcmul`` / ``addcdiv`` as a sum: ``self`` enters with coefficient 1, the product term's
    factors with none (they are not summands)."""
    return 1.0 if slot == 0 else None


def addc_rule(combine):
    """``z = self + value * combine(t1, t2)`` (``addcmul``: ``t1 * t2``; ``addcdiv``: ``t1 / t2``).

    A product term of constants added to a bias-free contraction's output is that layer's bias
    (fused as for ``x @ W + c``, :func:`dynamiclrp.engine._bias_add_pairs`).  Otherwise ``R`` is
    split over ``self`` and the product term ``p = value * combine(t1, t2)`` like add
    (``Rules.add``: ``R_self = R |self| / (|self| + |p|)``, or ``R self / stab(self + p)``); the
    product term's share ``R_p`` goes to ``t1`` and ``t2`` by the mul/div rule: ``R_p / 2`` each
    when both are full-shape data operands, all to the data (or full-shape) one otherwise.  With
    no recorded factor the product term's share is absorbed.
    """

    def rule(ctx: RuleContext):
        if ctx.bias_partner() is not None:  # a constant product term: the contraction's bias
            return [sum_to_shape(ctx.r, ctx.input_shape(0)), None, None]
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


def _unary(replay=None, saved_inputs=None, saved_outputs=None, coefficient=None) -> OpEntry:
    return OpEntry(
        "elementwise-unary",
        identity,
        replay=replay,
        saved_inputs=saved_inputs or {},
        saved_outputs=saved_outputs or {},
        coefficient=coefficient,
        elementwise=True,
    )


def _self_op(fn):
    """A unary op with ``_saved_self``: the node is an arg node for its input, replay is ``fn``."""
    return _unary(lambda c: (fn(c, c.inputs[0]),), saved_inputs={0: "_saved_self"})


def _result_op(replay):
    """A unary op that saved its result: an arg node for its own output."""
    return _unary(replay, saved_outputs={0: "_saved_result"})


# --- element-wise binary ops from the census (issue 14): each the map of its written-out spelling


def logaddexp_rule(exp: Callable[[Tensor], Tensor]):
    """``z = log(exp(a) + exp(b))`` (``logaddexp``; ``logaddexp2``: ``log2(2**a + 2**b)``).

    Written out, ``log`` and ``exp`` pass relevance on unchanged and the add splits ``R`` over the
    summands (``Rules.add``): ``R_a = R e^a / (e^a + e^b)`` (``R e^a / stab(e^a + e^b)`` signed),
    sign-independent since both summands are positive.  Where ``e^a + e^b`` over- or underflows
    the shares are computed from ``e^(a - m)``, ``e^(b - m)`` with ``m = max(a, b)`` (the same
    proportions).  An unrecorded operand (a constant) absorbs its share like the constant of add.
    """

    def rule(ctx: RuleContext):
        a, b = ctx.input_value(0), ctx.input_value(1)
        ea, eb = exp(a), exp(b)
        ra, rb = split_sum(ctx, [ea, eb], ctx.rules.add)
        s = ea + eb
        bad = ~torch.isfinite(s) | (s == 0)
        if s.device.type != "cpu" or bool(bad.any()):
            m = torch.maximum(a, b)
            m = torch.where(torch.isfinite(m), m, 0.0)  # both -inf: no shift (shares 0)
            exact = _split_proportional(ctx.r, [exp(a - m), exp(b - m)])
            ra, rb = (torch.where(bad, e, t) for e, t in zip(exact, (ra, rb), strict=True))
        return [_to_slot(ctx, 0, ra), _to_slot(ctx, 1, rb)]

    rule.__doc__ = logaddexp_rule.__doc__
    return rule


def hypot_rule(ctx: RuleContext):
    """``z = hypot(a, b) = sqrt(a**2 + b**2)``: written out, ``sqrt`` and ``**2`` pass relevance
    on unchanged and the add splits ``R`` over ``a**2`` and ``b**2`` (``Rules.add``):
    ``R_a = R a^2 / (a^2 + b^2)``; an unrecorded operand absorbs its share (the node does not
    save it: its square is recovered as ``z**2 - a**2``, ``z`` saved by the node)."""
    a, b = _known_input(ctx, 0), _known_input(ctx, 1)
    terms = [None if a is None else a * a, None if b is None else b * b]
    if None in terms:
        z = ctx.output_value(0)
        terms = _fill_missing(ctx, terms, [0, 1], total=z * z)
    ra, rb = split_sum(ctx, terms, ctx.rules.add)
    return [_to_slot(ctx, 0, ra), _to_slot(ctx, 1, rb)]


def fmod_rule(divide: Callable[[Tensor, Tensor], Tensor]):
    """``z = fmod(a, b) = a - k b`` with ``k = trunc(a / b)`` (``remainder``: ``floor(a / b)``).

    ``k`` is piecewise constant (its gradient is 0 almost everywhere), so ``z`` is the sum of
    ``a`` and ``-k b`` with a constant coefficient: ``R`` is split over the two summands like add
    (``Rules.add``): ``R_a = R |a| / (|a| + |k b|)``, ``R_b = R |k b| / (|a| + |k b|)``; where
    ``k = 0`` (``|a| < |b|``) ``a`` takes all.  The second summand is computed as ``z - a`` so the
    two summands add up to ``z`` exactly.  Written out literally with ``floor(a / b)``, ``k``
    would be a data factor of a product and take a share back to ``a`` and ``b``; the constant
    ``k`` is the choice that keeps the map linear in ``a`` and ``b`` where it is (LRP-0 equals
    gradient x input there).  A divisor that is a constant autograd did not record (and the node
    did not save) is recovered from the output: the second summand is ``z - a``."""

    def rule(ctx: RuleContext):
        a, b = _known_input(ctx, 0), _known_input(ctx, 1)
        t = None if a is None or b is None else divide(a, b) - a
        ra, rb = split_sum(ctx, _fill_missing(ctx, [a, t], [0, 1]), ctx.rules.add)
        return [_to_slot(ctx, 0, ra), _to_slot(ctx, 1, rb)]

    rule.__doc__ = fmod_rule.__doc__
    return rule


def quotient_rule(ctx: RuleContext):
    """An element-wise map of a quotient or product of the two operands: ``atan2(a, b)`` written
    out ``atan(a / b)`` (the quadrant's ``+-pi`` is part of the element-wise map),
    ``div(a, b, rounding_mode)`` = ``floor(a / b)`` or ``trunc(a / b)``, ``ldexp(a, b)`` = ``a * 2**b``: the unary maps pass relevance on
    unchanged, so ``R`` is split as for the product written out (:func:`product_rule`): ``R / 2``
    to each full-shape data operand, all to the data (or full-shape) one otherwise, a requested
    weight read from its side."""
    shares = _product_shares(ctx, ctx.r, (0, 1), ctx.r.numel())
    return [shares.get(0), shares.get(1)]


def ldexp_rule(ctx: RuleContext):
    """``ldexp(a, b) = a * 2**b``: the product rule of the written-out spelling
    (:func:`quotient_rule`); with ``Rules.gates = "constant"`` only ``a`` enters the product as
    it was produced (``2**b`` is a new tensor), so only ``a`` can be a constant gate."""
    shares = _product_shares(ctx, ctx.r, (0, 1), ctx.r.numel(), gate_slots=(0,))
    return [shares.get(0), shares.get(1)]


def copysign_rule(ctx: RuleContext):
    """``copysign(a, b)``: ``|a|`` with the sign of ``b``.  Its written-out spellings disagree:
    ``abs(a) * sign(b)`` is a product of two data operands (``R / 2`` each), while
    ``where(signbit(b), -abs(a), abs(a))`` routes (``b`` only in the condition: ``R_a = R``).  The
    op is linear in ``a`` where ``b`` is fixed and piecewise constant in ``b`` (its gradient with
    respect to ``b`` is 0), so we take the routing spelling, the one for which LRP-0 equals
    gradient x input: ``R_a = R``, ``R_b = 0``."""
    out = [_to_slot(ctx, 0, ctx.r), None]
    if ctx.fn.next_functions[1][0] is not None:
        out[1] = torch.zeros(ctx.input_shape(1), dtype=ctx.r.dtype, device=ctx.r.device)
    return out


def nextafter_rule(ctx: RuleContext):
    """``nextafter(a, b)``: ``a`` moved one unit in the last place towards ``b``.  No written-out
    spelling of table ops exists; the output is ``a`` up to rounding, and ``b`` only picks the
    direction of the step (piecewise constant): ``R_a = R``, ``R_b = 0``."""
    out = [_to_slot(ctx, 0, ctx.r), None]
    if ctx.fn.next_functions[1][0] is not None:
        out[1] = torch.zeros(ctx.input_shape(1), dtype=ctx.r.dtype, device=ctx.r.device)
    return out


def fill_rule(ctx: RuleContext):
    """``fill(x, value)``: every output element is the fill value, ``x`` only gives the shape:
    ``R_x = 0``.  A scalar value (``FillBackward0`` / ``FillBackward2``) absorbs ``R``; a tensor
    value (``FillBackward1`` / ``FillBackward3``, the output is ``value`` expanded) takes ``R``
    summed to its shape (absorbed where it was not recorded)."""
    if ctx.n_inputs() == 1:
        ctx.absorb(ctx.r)
        return [None]
    return [None, _to_slot(ctx, 1, ctx.r)]


def _prelu_weight_view(w_shape, x_shape) -> list[int]:
    """The shape in which prelu's weight broadcasts against ``x``: channels on dimension 1 (on
    dimension 0 for a 1-D ``x``), or a single slope."""
    n = math.prod(w_shape)
    if n == 1 or len(x_shape) == 0:
        return []
    view = [1] * len(x_shape)
    view[1 if len(x_shape) >= 2 else 0] = n
    return view


def prelu_rule(ctx: RuleContext):
    """``prelu(x, w) = relu(x) + w * min(0, x)`` (``w`` per channel, dimension 1).

    Written out: the add splits ``R`` over ``relu(x)`` and ``w * min(0, x)`` (``Rules.add``; one
    of them is 0 at each element, so the nonzero one takes all of ``R`` up to the stabiliser);
    ``relu`` and ``min(0, .)`` pass relevance on unchanged; the product's share goes by the
    product rule (:func:`product_rule`): ``R / 2`` each when ``w`` depends on data (summed over
    the elements that share a slope).  For a weight ``w`` the written-out spelling is an
    element-wise region of the one data tensor ``x`` (``x`` branches into ``relu`` and ``min`` and
    joins again, :mod:`dynamiclrp.regions`), whose rule is the identity: ``R_x = R`` under every
    preset, and a requested ``w`` gets the product term's share read from its side."""
    x, w = ctx.input_value(0), ctx.input_value(1)
    w_shape = w.shape
    view = _prelu_weight_view(w_shape, x.shape)
    wb = w.reshape(view)
    r_relu, r_prod = split_sum(ctx, [torch.relu(x), wb * x.clamp(max=0)], ctx.rules.add)

    def to_slot(s, t):
        if s == 0:
            return sum_to_shape(t, ctx.input_shape(0))
        return sum_to_shape(t, view).reshape(w_shape)

    shares = _product_shares(ctx, r_prod, (0, 1), x.numel(), gate_slots=(1,), to_slot=to_slot)
    if 1 not in shares:  # x the one data source: an element-wise region of x, identity
        return [ctx.r, None]
    r_x = r_relu if 0 not in shares else r_relu + shares[0]
    return [r_x, shares.get(1)]


TABLE = {
    "AddBackward0": OpEntry(
        "elementwise-binary",
        add_rule(1.0),
        needs_values=True,
        coefficient=_coefficient(1.0),
        sums=True,
        replay=_add_replay(1.0),
        elementwise=True,
        unrecorded=has_unrecorded_input,
    ),
    "SubBackward0": OpEntry(
        "elementwise-binary",
        add_rule(-1.0),
        needs_values=True,
        coefficient=_coefficient(-1.0),
        sums=True,
        replay=_add_replay(-1.0),
        elementwise=True,
        unrecorded=has_unrecorded_input,
    ),
    "MulBackward0": OpEntry(
        "elementwise-binary",
        product_rule,
        saved_inputs={0: "_saved_self", 1: "_saved_other"},
        replay=lambda c: (_operand(c, 0, "_saved_self") * _operand(c, 1, "_saved_other"),),
        factors=(0, 1),
        coefficient=_scalar_factor(divide=False),
        elementwise=True,
    ),
    "DivBackward0": OpEntry(
        "elementwise-binary",
        product_rule,
        saved_inputs={0: "_saved_self", 1: "_saved_other"},
        replay=lambda c: (_operand(c, 0, "_saved_self") / _operand(c, 1, "_saved_other"),),
        factors=(0, 1),
        coefficient=_scalar_factor(divide=True),
        elementwise=True,
    ),
    # a Python scalar operand: an element-wise map of one tensor
    # x + c, x - c, c - x with a Python scalar the node does not save: identity (docs/rules.md
    # 2.5: torch records the first two only inside C++ composites, var + eps of F.rms_norm, where
    # neither the scalar nor the sum is kept; c - x keeps the rule the loss rules are built on)
    "AddBackward1": with_facts(_unary(), unrecorded=always_unrecorded),
    "SubBackward1": with_facts(_unary(), unrecorded=always_unrecorded),
    "RsubBackward1": with_facts(_unary(), unrecorded=always_unrecorded),
    "MulBackward1": _unary(
        lambda c: (c.inputs[0] * c.saved("_saved_other"),),
        coefficient=lambda fn, slot: float(fn._saved_other),
    ),
    "DivBackward1": _unary(
        lambda c: (c.inputs[0] / c.saved("_saved_other"),),
        coefficient=lambda fn, slot: 1.0 / float(fn._saved_other),
    ),
    "NegBackward0": _unary(lambda c: (-c.inputs[0],), coefficient=lambda fn, slot: -1.0),
    "ReluBackward0": with_facts(_result_op(lambda c: (torch.relu(c.inputs[0]),)), gate=True),
    "SigmoidBackward0": with_facts(_result_op(lambda c: (torch.sigmoid(c.inputs[0]),)), gate=True),
    "TanhBackward0": with_facts(_result_op(lambda c: (torch.tanh(c.inputs[0]),)), gate=True),
    "ExpBackward0": _result_op(lambda c: (torch.exp(c.inputs[0]),)),
    "SqrtBackward0": _result_op(lambda c: (torch.sqrt(c.inputs[0]),)),
    "RsqrtBackward0": _result_op(lambda c: (torch.rsqrt(c.inputs[0]),)),
    "ReciprocalBackward0": _result_op(lambda c: (torch.reciprocal(c.inputs[0]),)),
    "GeluBackward0": with_facts(
        _self_op(lambda c, x: F.gelu(x, approximate=c.saved("_saved_approximate"))), gate=True
    ),
    "SiluBackward0": with_facts(_self_op(lambda c, x: F.silu(x)), gate=True),
    "MishBackward0": with_facts(_self_op(lambda c, x: F.mish(x)), gate=True),
    "HardswishBackward0": with_facts(_self_op(lambda c, x: F.hardswish(x)), gate=True),
    "HardsigmoidBackward0": with_facts(_self_op(lambda c, x: F.hardsigmoid(x)), gate=True),
    "ErfBackward0": _self_op(lambda c, x: torch.erf(x)),
    "LogBackward0": _self_op(lambda c, x: torch.log(x)),
    "AbsBackward0": _self_op(lambda c, x: torch.abs(x)),
    "SinBackward0": _self_op(lambda c, x: torch.sin(x)),
    "CosBackward0": _self_op(lambda c, x: torch.cos(x)),
    "PowBackward0": _self_op(lambda c, x: torch.pow(x, c.saved("_saved_exponent"))),
    "LeakyReluBackward0": with_facts(
        _self_op(lambda c, x: F.leaky_relu(x, c.saved("_saved_negative_slope"))), gate=True
    ),
    "EluBackward0": with_facts(
        _self_op(
            lambda c, x: (
                c.saved("_saved_scale")
                * torch.where(
                    x > 0,
                    x,
                    c.saved("_saved_alpha") * torch.expm1(x * c.saved("_saved_input_scale")),
                )
            )
        ),
        gate=True,
    ),
    "SoftplusBackward0": with_facts(
        _self_op(lambda c, x: F.softplus(x, c.saved("_saved_beta"), c.saved("_saved_threshold"))),
        gate=True,
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
        factors=(1, 2),
        replay=lambda c: (torch.addcmul(*c.inputs, value=c.saved("_saved_value")),),
        elementwise=True,
        unrecorded=product_term_unrecorded,
        sums=True,
        coefficient=_self_term,
    ),
    "AddcdivBackward0": OpEntry(
        "elementwise-binary",
        addc_rule(torch.div),
        needs_values=True,
        saved_inputs={1: "_saved_tensor1", 2: "_saved_tensor2"},
        factors=(1, 2),
        replay=lambda c: (torch.addcdiv(*c.inputs, value=c.saved("_saved_value")),),
        elementwise=True,
        unrecorded=product_term_unrecorded,
        sums=True,
        coefficient=_self_term,
    ),
    "LerpBackward0": OpEntry(
        "elementwise-binary",
        lerp_rule,
        needs_values=True,
        replay=lambda c: (torch.lerp(*c.inputs, c.saved("_saved_weight")),),
        elementwise=True,
        unrecorded=has_unrecorded_input,
    ),
    "LerpBackward1": OpEntry(
        "elementwise-binary",
        lerp_rule,
        needs_values=True,
        saved_inputs={0: "_saved_self", 1: "_saved_end", 2: "_saved_weight"},
        replay=lambda c: (torch.lerp(*c.inputs),),
        elementwise=True,
        unrecorded=_lerp_end_unrecorded,
    ),
    # --- added: the remaining element-wise unary nodes (identity rule) -------------------------
    "AtanBackward0": _self_op(lambda c, x: torch.atan(x)),
    "AsinBackward0": _self_op(lambda c, x: torch.asin(x)),
    "AcosBackward0": _self_op(lambda c, x: torch.acos(x)),
    "SinhBackward0": _self_op(lambda c, x: torch.sinh(x)),
    "CoshBackward0": _self_op(lambda c, x: torch.cosh(x)),
    "AsinhBackward0": _self_op(lambda c, x: torch.asinh(x)),
    "AcoshBackward0": _self_op(lambda c, x: torch.acosh(x)),
    "AtanhBackward0": _self_op(lambda c, x: torch.atanh(x)),
    "TanBackward0": _result_op(lambda c: (torch.tan(c.inputs[0]),)),
    "Log1PBackward0": _self_op(lambda c, x: torch.log1p(x)),
    "Log2Backward0": _self_op(lambda c, x: torch.log2(x)),
    "Log10Backward0": _self_op(lambda c, x: torch.log10(x)),
    "Expm1Backward0": _result_op(lambda c: (torch.expm1(c.inputs[0]),)),
    "Exp2Backward0": _result_op(lambda c: (torch.exp2(c.inputs[0]),)),
    "ErfcBackward0": _self_op(lambda c, x: torch.erfc(x)),
    "ErfinvBackward0": _self_op(lambda c, x: torch.erfinv(x)),
    "DigammaBackward0": _self_op(lambda c, x: torch.digamma(x)),
    "LgammaBackward0": _self_op(lambda c, x: torch.lgamma(x)),
    "PolygammaBackward0": _self_op(lambda c, x: torch.polygamma(c.saved("_saved_n"), x)),
    "MvlgammaBackward0": _self_op(lambda c, x: torch.mvlgamma(x, c.saved("_saved_p"))),
    "LogitBackward0": _self_op(lambda c, x: torch.logit(x, c.saved("_saved_eps"))),
    "SincBackward0": _self_op(lambda c, x: torch.sinc(x)),
    "I0Backward0": _self_op(lambda c, x: torch.i0(x)),
    "SpecialI0EBackward0": _self_op(lambda c, x: torch.special.i0e(x)),
    "SpecialI1Backward0": _self_op(lambda c, x: torch.special.i1(x)),
    "SpecialI1EBackward0": _self_op(lambda c, x: torch.special.i1e(x)),
    "SpecialErfcxBackward0": _self_op(lambda c, x: torch.special.erfcx(x)),
    "SpecialLogNdtrBackward0": _self_op(lambda c, x: torch.special.log_ndtr(x)),
    "SpecialNdtriBackward0": _result_op(lambda c: (torch.special.ndtri(c.inputs[0]),)),
    "SgnBackward0": _self_op(lambda c, x: torch.sgn(x)),
    "AngleBackward0": _self_op(lambda c, x: torch.angle(x)),
    "Deg2RadBackward0": _unary(lambda c: (torch.deg2rad(c.inputs[0]),)),
    "Rad2DegBackward0": _unary(lambda c: (torch.rad2deg(c.inputs[0]),)),
    "FracBackward0": _unary(lambda c: (torch.frac(c.inputs[0]),)),
    # piecewise-constant maps (gradient 0 almost everywhere): the identity rule as for every
    # element-wise map, the output's relevance goes to the input whose value it encodes
    # (gradient x input would give 0); round(x, decimals) saves no decimals: no replay
    "SignBackward0": _unary(lambda c: (torch.sign(c.inputs[0]),)),
    "RoundBackward0": _unary(lambda c: (torch.round(c.inputs[0]),)),
    "RoundBackward1": _unary(),
    "FloorBackward0": _unary(lambda c: (torch.floor(c.inputs[0]),)),
    "CeilBackward0": _unary(lambda c: (torch.ceil(c.inputs[0]),)),
    "TruncBackward0": _unary(lambda c: (torch.trunc(c.inputs[0]),)),
    # x mod a Python scalar, x with the sign of a scalar: the scalar is not saved, no replay
    "FmodBackward0": _unary(),
    "RemainderBackward0": _unary(),
    "CopysignBackward1": _unary(
        saved_inputs={0: "_saved_self"}, saved_outputs={0: "_saved_result"}
    ),
    # activations (relu6 and hardtanh record HardtanhBackward0, selu EluBackward0)
    "CeluBackward0": _self_op(lambda c, x: F.celu(x, c.saved("_saved_alpha"))),
    "RreluWithNoiseBackward0": _self_op(
        lambda c, x: (
            x * c.saved("_saved_noise")  # training: the noise holds each element's slope
            if c.saved("_saved_training")
            else F.leaky_relu(x, (c.saved("_saved_lower") + c.saved("_saved_upper")) / 2)
        )
    ),
    "SoftshrinkBackward0": _self_op(lambda c, x: F.softshrink(x, c.saved("_saved_lambd"))),
    "HardshrinkBackward0": _self_op(lambda c, x: F.hardshrink(x, c.saved("_saved_lambd"))),
    # threshold(x, t, value): the fill value is not saved, no replay
    "ThresholdBackward0": _unary(saved_inputs={0: "_saved_self"}),
    "LogSigmoidBackward0": _self_op(lambda c, x: F.logsigmoid(x)),
    # nan_to_num's replacement values are not saved: no replay
    "NanToNumBackward0": _unary(saved_inputs={0: "_saved_self"}),
    # a Python scalar base (2.0 ** x, float_power(2, x)): element-wise in the exponent
    "PowBackward2": _result_op(lambda c: (torch.pow(c.saved("_saved_self"), c.inputs[0]),)),
    # xlogy with one Python scalar: x * log(c) (linear in x) or c * log(y)
    "XlogyBackward2": _self_op(lambda c, x: torch.xlogy(x, c.saved("_saved_other"))),
    "XlogyBackward1": _unary(
        lambda c: (torch.xlogy(c.saved("_saved_self"), c.inputs[0]),),
    ),
    # --- added: binary and gated ops written out of products ------------------------------------
    "PowBackward1": OpEntry(
        "elementwise-binary",
        log_product_rule(1),
        saved_inputs={0: "_saved_self", 1: "_saved_exponent"},
        saved_outputs={0: "_saved_result"},
        replay=lambda c: (
            torch.pow(_operand(c, 0, "_saved_self"), _operand(c, 1, "_saved_exponent")),
        ),
    ),
    "XlogyBackward0": OpEntry(
        "elementwise-binary",
        log_product_rule(0),
        saved_inputs={0: "_saved_self", 1: "_saved_other"},
        replay=lambda c: (
            torch.xlogy(_operand(c, 0, "_saved_self"), _operand(c, 1, "_saved_other")),
        ),
    ),
    "GluBackward0": OpEntry(
        "elementwise-unary",
        glu_rule,
        saved_inputs={0: "_saved_self"},
        replay=lambda c: (F.glu(c.inputs[0], c.saved("_saved_dim")),),
    ),
    # --- census (issue 14): rsub with a tensor (c - x written torch.rsub(x, c))
    "RsubBackward0": OpEntry(
        "elementwise-binary",
        _rsub_rule,
        needs_values=True,
        replay=lambda c: (c.inputs[1] - _alpha(c) * c.inputs[0],),
        unrecorded=has_unrecorded_input,
        sums=True,
        coefficient=lambda fn, slot: -_alpha_of(fn) if slot == 0 else 1.0,
    ),
    # --- census (issue 14): element-wise binary ops, each the map of its written-out spelling
    "LogaddexpBackward0": OpEntry(
        "elementwise-binary",
        logaddexp_rule(torch.exp),
        saved_inputs={0: "_saved_self", 1: "_saved_other"},
        replay=lambda c: (
            torch.logaddexp(_operand(c, 0, "_saved_self"), _operand(c, 1, "_saved_other")),
        ),
        elementwise=True,
    ),
    "Logaddexp2Backward0": OpEntry(
        "elementwise-binary",
        logaddexp_rule(torch.exp2),
        saved_inputs={0: "_saved_self", 1: "_saved_other"},
        replay=lambda c: (
            torch.logaddexp2(_operand(c, 0, "_saved_self"), _operand(c, 1, "_saved_other")),
        ),
        elementwise=True,
    ),
    "HypotBackward0": OpEntry(
        "elementwise-binary",
        hypot_rule,
        saved_inputs={0: "_saved_self", 1: "_saved_other"},
        saved_outputs={0: "_saved_result"},
        replay=lambda c: (
            torch.hypot(_operand(c, 0, "_saved_self"), _operand(c, 1, "_saved_other")),
        ),
        elementwise=True,
        unrecorded=has_unrecorded_input,
    ),
    "Atan2Backward0": OpEntry(
        "elementwise-binary",
        quotient_rule,
        saved_inputs={0: "_saved_self", 1: "_saved_other"},
        replay=lambda c: (
            torch.atan2(_operand(c, 0, "_saved_self"), _operand(c, 1, "_saved_other")),
        ),
        factors=(0, 1),
        elementwise=True,
    ),
    "DivBackward2": OpEntry(
        "elementwise-binary",
        quotient_rule,
        saved_inputs={0: "_saved_self", 1: "_saved_other"},
        replay=lambda c: (
            torch.div(
                _operand(c, 0, "_saved_self"),
                _operand(c, 1, "_saved_other"),
                rounding_mode=c.saved("_saved_rounding_mode"),
            ),
        ),
        factors=(0, 1),
        elementwise=True,
    ),
    # copysign saves no sign operand: a constant one is unrecorded (its result is saved)
    "CopysignBackward0": OpEntry(
        "elementwise-binary",
        copysign_rule,
        saved_inputs={0: "_saved_self"},
        saved_outputs={0: "_saved_result"},
        replay=lambda c: (torch.copysign(c.inputs[0], c.inputs[1]),),
        elementwise=True,
        unrecorded=has_unrecorded_input,
    ),
    # ldexp saves its exponent and result, not the mantissa operand
    "LdexpBackward0": OpEntry(
        "elementwise-binary",
        ldexp_rule,
        saved_inputs={1: "_saved_other"},
        saved_outputs={0: "_saved_result"},
        replay=lambda c: (torch.ldexp(c.inputs[0], _operand(c, 1, "_saved_other")),),
        factors=(0, 1),
        elementwise=True,
        unrecorded=self_unrecorded,
    ),
    "FmodBackward1": OpEntry(
        "elementwise-binary",
        fmod_rule(torch.fmod),
        saved_inputs={0: "_saved_self", 1: "_saved_other"},
        replay=lambda c: (
            torch.fmod(_operand(c, 0, "_saved_self"), _operand(c, 1, "_saved_other")),
        ),
        elementwise=True,
        unrecorded=has_unrecorded_input,
    ),
    "RemainderBackward1": OpEntry(
        "elementwise-binary",
        fmod_rule(torch.remainder),
        saved_inputs={0: "_saved_self", 1: "_saved_other"},
        replay=lambda c: (
            torch.remainder(_operand(c, 0, "_saved_self"), _operand(c, 1, "_saved_other")),
        ),
        elementwise=True,
        unrecorded=has_unrecorded_input,
    ),
    "NextafterBackward0": OpEntry(
        "elementwise-binary",
        nextafter_rule,
        saved_inputs={0: "_saved_self", 1: "_saved_other"},
        replay=lambda c: (
            torch.nextafter(_operand(c, 0, "_saved_self"), _operand(c, 1, "_saved_other")),
        ),
        elementwise=True,
        unrecorded=self_unrecorded,
    ),
    # frexp: the mantissa x / 2**e is an element-wise map of x (the exponent is an integer)
    "FrexpBackward0": _unary(
        lambda c: tuple(torch.frexp(c.inputs[0])), saved_outputs={1: "_saved_exponent"}
    ),
    # fill: the output is the fill value, whatever x holds (not an element-wise map of x, so no
    # region looks through it); a scalar value is not saved (no replay)
    "FillBackward0": OpEntry("elementwise-unary", fill_rule, unrecorded=always_unrecorded),
    "FillBackward2": OpEntry("elementwise-unary", fill_rule, unrecorded=always_unrecorded),
    "FillBackward1": OpEntry(
        "elementwise-binary",
        fill_rule,
        replay=lambda c: (torch.fill(c.inputs[0], c.inputs[1]),),
        unrecorded=has_unrecorded_input,
    ),
    "FillBackward3": OpEntry(
        "elementwise-binary",
        fill_rule,
        replay=lambda c: (torch.fill(c.inputs[0], c.inputs[1]),),
        unrecorded=has_unrecorded_input,
    ),
    "PreluKernelBackward0": OpEntry(
        "elementwise-binary",
        prelu_rule,
        saved_inputs={0: "_saved_self", 1: "_saved_weight"},
        replay=lambda c: (
            torch._prelu_kernel(_operand(c, 0, "_saved_self"), _operand(c, 1, "_saved_weight")),
        ),
        elementwise=True,
    ),
    # xlog1py(x, y) = x * log1p(y): the product rule of the written-out spelling, like xlogy
    "SpecialXlog1PyBackward0": OpEntry(
        "elementwise-binary",
        log_product_rule(0),
        saved_inputs={0: "_saved_self", 1: "_saved_other"},
        replay=lambda c: (
            torch.special.xlog1py(_operand(c, 0, "_saved_self"), _operand(c, 1, "_saved_other")),
        ),
        elementwise=True,
    ),
    # one Python scalar: c * log1p(y) (SpecialXlog1PyBackward1) or x * log1p(c) (...Backward2)
    "SpecialXlog1PyBackward1": _unary(
        lambda c: (torch.special.xlog1py(c.saved("_saved_self"), c.inputs[0]),),
    ),
    "SpecialXlog1PyBackward2": _self_op(
        lambda c, x: torch.special.xlog1py(x, c.saved("_saved_other"))
    ),
    # entr(x) = -x * log(x): the product of x and log(x) gives x R / 2 twice: R
    "SpecialEntrBackward0": _self_op(lambda c, x: torch.special.entr(x)),
}
