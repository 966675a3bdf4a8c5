"""Linear summing ops: each output element is a sum of selected input elements (coefficient +1, or
``1/n`` for a mean), or one selected element (routing).

``L`` is the op as a linear map of its operands' elements and ``L^T`` its transpose, which is the
node's own backward applied to a vector.  A *term* is one operand element as it enters the sum.

- One operand (``fold``, ``embedding_bag`` sum/mean): the linear-reduction rule, preset
  ``Rules.reduction`` (section 2.6): ``"proportional"``: ``R_x = |x| * L^T(R / L(|x|))``;
  ``"signed"``: ``R_x = x * L^T(R / stab(L(x)))``.  ``embedding_bag`` with a per-sample weight of
  either sign always uses the signed form (a negative coefficient, as for bicubic interpolation).
- Several operands meeting in one output element (``scatter_add``, ``scatter_reduce`` sum/mean,
  ``index_put(accumulate=True)``): ``R`` split over the terms like add (``Rules.add``, as
  ``index_add``): ``"proportional"``: ``R_t = |t| * L_t^T(R / sum_u L_u(|u|))``; ``"signed"``:
  ``R_t = t * L_t^T(R / stab(z))``.  A constant operand (a tensor without grad) takes its share,
  which is absorbed; one autograd did not save is rebuilt as ``out - (the recorded terms)``.
- Overwrites and copies (``scatter``, ``index_put``, ``unfold``): routing, ``R_in = L^T R`` (every
  output element is one input element, or padding); duplicate write positions are refused (which
  write wins is unspecified).
- Winner takes all (``scatter_reduce`` amax/amin, ``embedding_bag`` max): ``R`` to the elements
  equal to the output, ties split evenly.
- Product (``scatter_reduce`` prod): the uniform rule of a product, ``R / n`` to each of the ``n``
  factors of an output element.
- ``index_reduce`` is the ``scatter_reduce`` it equals; ``_segment_reduce`` takes per segment the
  rule of the matching reduction; ``_unsafe_masked_index_put_accumulate`` is ``index_put``
  accumulating the masked values; ``embedding_bag`` with data ``per_sample_weights`` takes the map
  of its written-out spelling (``docs/rules.md`` 2.20).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UncoveredOpError, ValueRecoveryError
from .base import (
    OpEntry,
    ReplayContext,
    RuleContext,
    has_unrecorded_input,
    ratio,
    saved,
    self_unrecorded,
    sum_to_shape,
)
from .elementwise import cancelled
from .linear import safe_divide
from .reduction import linear_reduction, signed_linear_map
from .routing import route_like_gradient

Forward = Callable[..., Tensor]


def _record_advice(ctx: RuleContext, what: str) -> str:
    return (
        f"{ctx.fn.name()} (node {ctx.idx}) {what}, a tensor that does not require grad; autograd "
        "recorded neither it nor the result, and no node saved the result, so its value cannot "
        "be rebuilt. Run the forward pass under `with dynamiclrp.record() as rec:` and pass "
        "recording=rec to explain, or make that tensor require grad."
    )


def _rebuilt_self(ctx: RuleContext, forward: Forward, others: Sequence[Tensor]) -> Tensor:
    """An unrecorded ``self`` of ``out = self (+) L(others)``: ``out - L(0, others)``."""
    try:
        out = ctx.output_value(0)
    except ValueRecoveryError as err:
        raise ValueRecoveryError(_record_advice(ctx, "adds into a constant `self`")) from err
    return out - forward(torch.zeros_like(out), *others)


def _transpose(ctx: RuleContext, forward: Forward, terms: Sequence[Tensor], g: Tensor):
    """``L_i^T g`` per operand: the node's own backward for recorded operands; for a constant
    operand (which the node's backward skips) the transpose of ``forward`` by autograd."""
    outs = ctx.fn(g)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    missing = [i for i, t in enumerate(terms) if outs[i] is None]
    if missing:
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(i in missing) for i, t in enumerate(terms)]
            z = forward(*leaves)
            grads = torch.autograd.grad(z, [leaves[i] for i in missing], g)
        for i, gi in zip(missing, grads, strict=True):
            outs[i] = gi
    return [sum_to_shape(o, t.shape) for o, t in zip(outs, terms, strict=True)]


def split_terms(ctx: RuleContext, forward: Forward, terms: Sequence[Tensor], mode: str):
    """``R`` of ``z = forward(*terms)`` (linear, non-negative coefficients) over every term.

    ``"proportional"``: ``g = R / L(|t_1|, ..., |t_k|)`` (0 where that is 0),
    ``R_i = |t_i| * L_i^T g``; ``"signed"``: ``g = R / stab(L(t_1, ..., t_k))``,
    ``R_i = t_i * L_i^T g``, with the proportional split where the signed sum cancels to rounding
    below ``eps`` (as for add, :func:`.elementwise.split_sum`)."""
    r = ctx.r
    mags = [t.abs() for t in terms]
    if mode == "proportional":
        gs = _transpose(ctx, forward, terms, ratio(r, forward(*mags)))
        return [m * g for m, g in zip(mags, gs, strict=True)]
    z = forward(*terms)
    n = max(1, sum(t.numel() for t in terms) // max(1, z.numel()))
    zero = cancelled(z, lambda: forward(*mags), n, ctx.eps)
    if zero is None:
        gs = _transpose(ctx, forward, terms, safe_divide(r, z, ctx.eps))
        return [t * g for t, g in zip(terms, gs, strict=True)]
    nil = torch.zeros((), dtype=r.dtype, device=r.device)
    gs = _transpose(ctx, forward, terms, safe_divide(torch.where(zero, nil, r), z, ctx.eps))
    ge = _transpose(ctx, forward, terms, ratio(torch.where(zero, r, nil), forward(*mags)))
    return [t * g + m * e for t, g, m, e in zip(terms, gs, mags, ge, strict=True)]


def _no_duplicates(ctx: RuleContext, counts: Tensor, how: str) -> None:
    if bool((counts > 1).any()):
        raise UncoveredOpError(
            f"{ctx.fn.name()} (node {ctx.idx}) writes {int((counts > 1).sum())} output "
            f"element(s) more than once ({how} with duplicate indices): which write wins is "
            "unspecified, so no element can be named as the one the output copies. Deduplicate "
            "the indices, or use scatter_reduce(..., reduce='amax') / index_put_(..., "
            "accumulate=True) if a maximum or a sum is meant."
        )


# --- scatter_add, scatter -------------------------------------------------------------------------


def _scatter_add_forward(fn):
    dim, index = saved(fn, "_saved_dim"), fn._saved_index
    return lambda a, b: a.scatter_add(dim, index, b)


def _value_or_none(ctx: RuleContext, slot: int) -> Tensor | None:
    return None if ctx.fn.next_functions[slot][0] is None else ctx.input_value(slot)


def constant_added(ctx: RuleContext):
    """``out = self + C`` where ``C`` (the scattered / accumulated / index-added operand) does not
    require grad and autograd saved nothing of it (not even the index): ``C`` is seen summed per output element, ``C = out - self``,
    and ``R`` is split over ``self`` and ``C`` like add (``Rules.add``), exactly as for the
    spelling ``self + C``; ``C``'s share is absorbed."""
    from .elementwise import split_sum

    a = ctx.input_value(0)
    try:
        out = ctx.output_value(0)
    except ValueRecoveryError as err:
        raise ValueRecoveryError(_record_advice(ctx, "adds a constant operand")) from err
    ra, rc = split_sum(ctx, [a, out - a], ctx.rules.add)
    ctx.absorb(rc)
    return [ra, None]


def scatter_add_rule(ctx: RuleContext):
    """``out = self.scatter_add(dim, index, src)``: every output element is ``self`` plus the
    ``src`` elements scattered onto it; ``R`` is split over those terms like add (``Rules.add``,
    :func:`split_terms`).  A constant ``self`` is rebuilt as ``out - scatter_add(0, src)`` and its
    share absorbed; a constant ``src`` as :func:`constant_added`."""
    if ctx.fn.next_functions[1][0] is None:
        return constant_added(ctx)
    forward = _scatter_add_forward(ctx.fn)
    src = ctx.input_value(1)
    a = _value_or_none(ctx, 0)
    if a is None:
        a = _rebuilt_self(ctx, forward, [src])
    return split_terms(ctx, forward, [a, src], ctx.rules.add)  # a constant's: absorbed


def scatter_rule(ctx: RuleContext):
    """``out = self.scatter(dim, index, src or value)``: an overwrite, so routing
    (``R_self = R`` where not written, ``R_src = R`` gathered where written); a constant ``self``
    or ``value`` absorbs its part.  Duplicate write positions are refused."""
    dim, index = saved(ctx.fn, "_saved_dim"), ctx.fn._saved_index
    r = ctx.r
    ones = torch.ones(index.shape, dtype=r.dtype, device=r.device)
    counts = torch.zeros_like(r).scatter_add(dim, index, ones)
    _no_duplicates(ctx, counts, "scatter")
    outs = list(route_like_gradient(ctx))
    if ctx.fn.next_functions[0][0] is None:  # constant self: keeps R where nothing was written
        outs[0] = r.masked_fill(counts > 0, 0)
    if len(outs) > 1 and outs[1] is not None:  # src elements beyond index's extent: unread
        shape = ctx.input_shape(1)
        if outs[1].shape != shape:
            full = outs[1].new_zeros(shape)
            full[tuple(slice(0, k) for k in index.shape)] = outs[1]
            outs[1] = full
    return outs


def _scatter_replay(c: ReplayContext):
    x = c.inputs[0]
    if x is None:
        raise ValueRecoveryError("scatter into a tensor that does not require grad")
    if len(c.inputs) == 1:
        raise ValueRecoveryError("scatter of a scalar value: autograd did not save the value")
    return (x.scatter(saved(c.fn, "_saved_dim"), c.fn._saved_index, c.inputs[1]),)


def _scatter_add_replay(c: ReplayContext):
    x, src = c.inputs
    if x is None:
        raise ValueRecoveryError("scatter_add into a tensor that does not require grad")
    return (x.scatter_add(saved(c.fn, "_saved_dim"), c.fn._saved_index, src),)


# --- scatter_reduce -------------------------------------------------------------------------------


def _scatter_reduce_forward(fn):
    dim, index, reduce = saved(fn, "_saved_dim"), fn._saved_index, fn._saved_reduce
    include = fn._saved_include_self
    return lambda a, b: a.scatter_reduce(dim, index, b, reduce, include_self=include)


def scatter_reduce_rule(ctx: RuleContext):
    """``out = self.scatter_reduce(dim, index, src, reduce, include_self)``:

    - ``"sum"``, ``"mean"``: linear with non-negative coefficients, ``R`` split over the terms
      (``self`` where included, the ``src`` elements scattered there) like add (``Rules.add``);
    - ``"amax"``, ``"amin"``: winner takes all, ``R`` to the elements equal to the output, ties
      split evenly (the node's backward routes exactly so);
    - ``"prod"``: the uniform rule of a product, ``R / n`` to each of the ``n`` factors.

    ``self`` and ``src`` are saved by the node; a constant one takes its share (absorbed)."""
    reduce = ctx.fn._saved_reduce
    if reduce in ("amax", "amin"):
        return _winner_shares(ctx)
    if reduce == "prod":
        return _product_shares(ctx)
    forward = _scatter_reduce_forward(ctx.fn)
    terms = [ctx.fn._saved_self, ctx.fn._saved_src]
    return split_terms(ctx, forward, terms, ctx.rules.add)


def _winner_masks(ctx: RuleContext) -> tuple[Tensor, Tensor, Tensor]:
    """``(self is a winner, src is a winner, number of winners per output element)``."""
    fn = ctx.fn
    dim, index, include = saved(fn, "_saved_dim"), fn._saved_index, fn._saved_include_self
    x, src, out = fn._saved_self, fn._saved_src, fn._saved_result
    used = src[tuple(slice(0, k) for k in index.shape)]  # scatter reads src where index is
    written = torch.zeros_like(out).scatter_add(dim, index, torch.ones_like(used))
    self_in = torch.ones_like(out, dtype=torch.bool) if include else written == 0
    dtype = ctx.r.dtype
    self_win = ((x == out) & self_in).to(dtype)
    src_win = torch.zeros(src.shape, dtype=dtype, device=src.device)
    src_win[tuple(slice(0, k) for k in index.shape)] = (used == out.gather(dim, index)).to(dtype)
    n = self_win.scatter_add(dim, index, src_win)
    return self_win, src_win, n


def _winner_shares(ctx: RuleContext):
    """amax / amin: ``R`` to the winners (elements equal to the output), ties split evenly."""
    dim, index = saved(ctx.fn, "_saved_dim"), ctx.fn._saved_index
    self_win, src_win, n = _winner_masks(ctx)
    g = ratio(ctx.r, n)
    g_src = torch.zeros_like(src_win)
    g_src[tuple(slice(0, k) for k in index.shape)] = g.gather(dim, index)
    return [self_win * g, src_win * g_src]


def _product_shares(ctx: RuleContext):
    """prod: ``R / n`` to each of the ``n`` data factors of an output element (``self`` where it
    is included, each ``src`` element scattered there); a constant operand is a weight of the
    product and takes nothing (as for ``x * c``: the product is linear in the data then), except
    where it is the only factor (it absorbs that ``R``).  No forward value is needed."""
    fn = ctx.fn
    dim, index, include = saved(fn, "_saved_dim"), fn._saved_index, fn._saved_include_self
    r = ctx.r
    ones = torch.ones(index.shape, dtype=r.dtype, device=r.device)
    written = torch.zeros_like(r).scatter_add(dim, index, ones)
    self_in = torch.ones_like(r) if include else (written == 0).to(r.dtype)
    n_self = self_in if ctx.data[0] else torch.zeros_like(self_in)
    n_src = written if ctx.data[1] else torch.zeros_like(written)
    alone = (n_self + n_src) == 0  # only constant factors: self takes (absorbs) it
    self_in = torch.where(alone, self_in, n_self)
    g = ratio(r, self_in + n_src)
    src_shape = ctx.input_shape(1) if fn.next_functions[1][0] is not None else index.shape
    g_src = torch.zeros(src_shape, dtype=r.dtype, device=r.device)
    g_src[tuple(slice(0, k) for k in index.shape)] = g.gather(dim, index)
    return [self_in * g, g_src if ctx.data[1] else None]


# --- index_put ------------------------------------------------------------------------------------


def _index_put_forward(fn):
    indices = list(fn._saved_indices)
    accumulate = bool(fn._saved_accumulate)
    return lambda a, b: torch.ops.aten.index_put.default(a, indices, b, accumulate)


def index_put_rule(ctx: RuleContext):
    """``out = self.index_put(indices, values, accumulate)`` (``y[idx] = v``, ``y[mask] = v``):

    - ``accumulate=True``: ``out = self + (values summed into the indexed positions)``, ``R``
      split over those terms like add (``Rules.add``, :func:`split_terms`); a constant ``self``
      is rebuilt as ``out - index_put(0, indices, values, True)`` and absorbs its share, constant
      values are seen as ``out - self`` (:func:`constant_added`);
    - ``accumulate=False``: an overwrite, routing (``R_self = R`` where not written,
      ``R_values = R`` at the written positions, summed over a broadcast value); a constant
      operand absorbs its part.  Duplicate write positions are refused."""
    fn = ctx.fn
    indices = list(fn._saved_indices)
    r = ctx.r
    if not bool(fn._saved_accumulate):
        counts = torch.ops.aten.index_put.default(
            torch.zeros_like(r), indices, torch.ones((), dtype=r.dtype, device=r.device), True
        )
        _no_duplicates(ctx, counts, "index_put / y[idx] = v")
        outs = list(route_like_gradient(ctx))
        if fn.next_functions[0][0] is None:
            outs[0] = r.masked_fill(counts > 0, 0)
        if len(outs) > 1 and fn.next_functions[1][0] is None:  # constant values: absorbed
            outs[1] = r.masked_fill(counts == 0, 0)
        return outs
    if len(fn.next_functions) < 2 or fn.next_functions[1][0] is None:
        return constant_added(ctx)[: len(fn.next_functions)]
    forward = _index_put_forward(fn)
    values = ctx.input_value(1)
    a = _value_or_none(ctx, 0)
    if a is None:
        a = _rebuilt_self(ctx, forward, [values])
    return split_terms(ctx, forward, [a, values], ctx.rules.add)


def _index_put_replay(c: ReplayContext):
    x = c.inputs[0]
    if x is None or len(c.inputs) < 2 or c.inputs[1] is None:
        raise ValueRecoveryError("index_put with an operand that does not require grad")
    return (_index_put_forward(c.fn)(x, c.inputs[1]),)


# --- embedding_bag --------------------------------------------------------------------------------

_SUM, _MEAN, _MAX = 0, 1, 2


def _bag_call(fn, weight: Tensor, psw: Tensor | None):
    """The aten call ``F.embedding_bag`` made, from the node's saved arguments."""
    offsets = fn._saved_offsets
    n_bags = fn._input_metadata[0].shape[0]
    include_last = offsets.numel() == n_bags + 1 and fn._saved_indices.dim() == 1
    return torch.ops.aten._embedding_bag.default(
        weight,
        fn._saved_indices,
        offsets,
        bool(fn._saved_scale_grad_by_freq),
        int(fn._saved_mode),
        False,
        psw,
        include_last,
        saved(fn, "_saved_padding_idx"),
    )


def _bag_forward(fn):
    psw = fn._saved_per_sample_weights
    return lambda _fn, w: _bag_call(fn, w, psw)[0]


def embedding_bag_rule(ctx: RuleContext):
    """``out = embedding_bag(indices, W, offsets, mode)``, a function of the table ``W``:

    - ``mode="sum"`` / ``"mean"``: linear in ``W`` (coefficients 1, ``1 / bag size``, or the
      constant ``per_sample_weights``): the linear-reduction rule (``Rules.reduction``); with a
      negative per-sample weight always the signed form ``R_W = W * L^T(R / stab(L W))``;
    - ``mode="max"``: winner takes all per bag and feature, ``R`` to the rows whose element equals
      the output, ties between distinct rows split evenly; an empty bag's ``R`` is absorbed.

    ``per_sample_weights`` that depend on the data: the map of the written-out spelling
    (:func:`_bag_weighted`)."""
    fn = ctx.fn
    if ctx.n_inputs() > 1 and fn.next_functions[1][0] is not None and ctx.data[1]:
        return _bag_weighted(ctx)
    mode = int(fn._saved_mode)
    if mode == _MAX:
        return _bag_max(ctx) + [None] * (ctx.n_inputs() - 1)
    forward = _bag_forward(fn)
    psw = fn._saved_per_sample_weights
    if ctx.rules.reduction == "proportional" and (psw is None or not bool((psw < 0).any())):
        rule = linear_reduction(forward)
    else:
        rule = signed_linear_map(forward)
    # (the node's backward returns the table's gradient first: L^T of the table)
    return list(rule(ctx)) + [None] * (ctx.n_inputs() - 1)


def _bag_weighted(ctx: RuleContext) -> list[Tensor | None]:
    """``mode="sum"`` with data ``per_sample_weights`` ``p``: the map of the written-out spelling
    ``zeros(B, D).index_add(0, bag, W[indices] * p[:, None])``.  The terms ``t_i = W[idx_i] *
    p_i`` of bag ``b`` share ``R_b`` like add (``Rules.add``): ``R_t = |t| R / sum_b |t|``
    (``"proportional"``) or ``R_t = t R / stab(z_b)`` (``"signed"``, the proportional split where
    ``z_b`` cancels to rounding); each ``R_t`` then goes to the factors of its product: half to
    the row of ``W`` and half to ``p_i`` (summed over the features) when both are data, all to the
    data one when the other is constant (the uniform rule of a product, as for ``mul``).  An empty
    bag's ``R`` (its output is the constant 0) is absorbed; padding rows contribute no term."""
    fn = ctx.fn
    w = ctx.input_value(0)
    psw = fn._saved_per_sample_weights
    indices = fn._saved_indices.reshape(-1)
    bag = fn._saved_result1.reshape(-1)
    if bag.numel() != indices.numel() or int(fn._saved_mode) != _SUM:
        raise UncoveredOpError(f"{fn.name()} (node {ctx.idx}): unexpected offset2bag layout")
    r = ctx.r
    t = w[indices] * psw.reshape(-1, 1)
    pad = saved(fn, "_saved_padding_idx")
    if pad >= 0:
        t = t.masked_fill((indices == pad)[:, None], 0)
    m = t.abs()
    mag = torch.zeros_like(r).index_add(0, bag, m)
    if ctx.rules.add == "proportional":
        rt = m * ratio(r, mag)[bag]
    else:
        z = torch.zeros_like(r).index_add(0, bag, t)
        n = max(1, indices.numel() // max(1, r.shape[0]))
        zero = cancelled(z, lambda: mag, n, ctx.eps)
        if zero is None:
            rt = t * safe_divide(r, z, ctx.eps)[bag]
        else:
            nil = torch.zeros((), dtype=r.dtype, device=r.device)
            signed = safe_divide(torch.where(zero, nil, r), z, ctx.eps)[bag]
            rt = t * signed + m * ratio(torch.where(zero, r, nil), mag)[bag]
    ctx.absorb(r.masked_fill(mag > 0, 0))  # empty bags (or bags of zeros): a constant 0
    takers = [s for s in (0, 1) if fn.next_functions[s][0] is not None and ctx.data[s]]
    share = rt if len(takers) == 1 else rt * 0.5
    rw = torch.zeros(w.shape, dtype=r.dtype, device=r.device).index_add(0, indices, share)
    rp = share.sum(1).reshape(psw.shape)
    return [rw if 0 in takers else None, rp if 1 in takers else None]


def _bag_max(ctx: RuleContext) -> list[Tensor]:
    fn = ctx.fn
    w = ctx.input_value(0)
    out = _bag_call(fn, w, None)[0]
    indices = fn._saved_indices.reshape(-1)
    bag = fn._saved_result1.reshape(-1)  # offset2bag: the bag of each index
    if bag.numel() != indices.numel():
        raise UncoveredOpError(f"{fn.name()} (node {ctx.idx}): unexpected offset2bag layout")
    rows = w[indices]
    win = rows == out[bag]
    pad = saved(fn, "_saved_padding_idx")
    if pad >= 0:
        win &= (indices != pad)[:, None]
    r = ctx.r
    win = win.to(r.dtype)
    n = torch.zeros_like(r).index_add(0, bag, win)
    g = ratio(r, n)
    rw = torch.zeros(w.shape, dtype=r.dtype, device=r.device).index_add(0, indices, win * g[bag])
    ctx.absorb(r.masked_fill(n > 0, 0))  # empty bags: the output is 0, a constant
    return [rw]


def _bag_replay(c: ReplayContext):
    psw = c.inputs[1] if len(c.inputs) > 1 and c.inputs[1] is not None else None
    if psw is None:
        psw = c.fn._saved_per_sample_weights
    return (_bag_call(c.fn, c.inputs[0], psw)[0],)


# --- fold / unfold --------------------------------------------------------------------------------


def _fold_forward(fn, x):
    out_size = tuple(fn._input_metadata[0].shape)[-2:]
    return F.fold(
        x,
        out_size,
        fn._saved_kernel_size,
        dilation=fn._saved_dilation,
        padding=fn._saved_padding,
        stride=fn._saved_stride,
    )


def _unfold_replay(c: ReplayContext):
    fn = c.fn
    return (
        F.unfold(
            c.inputs[0],
            fn._saved_kernel_size,
            dilation=fn._saved_dilation,
            padding=fn._saved_padding,
            stride=fn._saved_stride,
        ),
    )


# --- issue 14: index_reduce, segment_reduce, masked index_put accumulate ------------------------


class _AsScatter:
    """``index_reduce`` seen as the ``scatter_reduce`` it equals: ``self.index_reduce(dim, index,
    source, reduce, include_self)`` is ``self.scatter_reduce(dim, index', source, reduce,
    include_self)`` with ``index'`` the 1-d ``index`` broadcast along ``dim`` to ``source``'s
    shape.  Calls go to the node's own backward (same operands, same shapes)."""

    def __init__(self, fn):
        self._fn = fn
        dim = saved(fn, "_saved_dim")
        src = fn._saved_source
        d = dim % max(1, src.dim())
        view = [-1 if k == d else 1 for k in range(src.dim())]
        self._saved_dim = dim
        self._saved_index = fn._saved_index.reshape(view).expand(src.shape)
        self._saved_reduce = fn._saved_reduce
        self._saved_include_self = fn._saved_include_self
        self._saved_self = fn._saved_self
        self._saved_src = src
        self._saved_result = fn._saved_result

    def name(self) -> str:
        return self._fn.name()

    def __call__(self, *grads):
        return self._fn(*grads)

    def __getattr__(self, name):
        return getattr(self._fn, name)


class _WithFn:
    """A rule context whose ``fn`` is replaced (every other attribute is the context's)."""

    def __init__(self, ctx: RuleContext, fn):
        self._ctx = ctx
        self.fn = fn

    def __getattr__(self, name):
        return getattr(self._ctx, name)


def index_reduce_rule(ctx: RuleContext):
    """``out = self.index_reduce(dim, index, source, reduce, include_self)``: the rule of the
    ``scatter_reduce`` it equals (:class:`_AsScatter`, :func:`scatter_reduce_rule`): ``"mean"``
    split over the terms like add, ``"amax"`` / ``"amin"`` winner takes all (ties split evenly),
    ``"prod"`` the uniform rule of a product."""
    return scatter_reduce_rule(_WithFn(ctx, _AsScatter(ctx.fn)))


def _index_reduce_replay(c: ReplayContext):
    fn = c.fn
    return (
        c.inputs[0].index_reduce(
            saved(fn, "_saved_dim"),
            fn._saved_index,
            c.inputs[1],
            fn._saved_reduce,
            include_self=fn._saved_include_self,
        ),
    )


class _Segments:
    """The segments of ``_segment_reduce`` along ``axis``: ``idx`` (the segment of every element,
    in ``data``'s shape), ``valid`` (the element lies in a segment) and ``lengths`` in the
    output's shape (broadcast over the trailing dimensions)."""

    def __init__(self, fn, x: Tensor):
        axis = saved(fn, "_saved_axis") % x.dim()
        lengths = fn._saved_lengths
        if lengths is None:
            lengths = fn._saved_offsets.diff(dim=-1)
        n, s = x.shape[axis], lengths.shape[-1]
        ends = lengths.cumsum(-1).contiguous()
        pos = torch.arange(n, device=x.device).expand(*lengths.shape[:-1], n).contiguous()
        seg = torch.searchsorted(ends, pos, right=True)
        tail = (1,) * (x.dim() - axis - 1)
        self.axis = axis
        self.valid = (seg < s).reshape(seg.shape + tail).expand(x.shape)
        self.idx = seg.clamp(max=max(0, s - 1)).reshape(seg.shape + tail).expand(x.shape)
        self.lengths = lengths.reshape(lengths.shape + tail)

    def total(self, v: Tensor, out_shape) -> Tensor:
        """Sum of ``v`` over each segment."""
        v = v.masked_fill(~self.valid, 0)
        return torch.zeros(out_shape, dtype=v.dtype, device=v.device).scatter_add(
            self.axis, self.idx, v
        )

    def back(self, g: Tensor) -> Tensor:
        """``g`` (per segment) read back at every element of its segment (0 outside)."""
        return g.gather(self.axis, self.idx).masked_fill(~self.valid, 0)


def segment_reduce_rule(ctx: RuleContext):
    """``out = _segment_reduce(data, reduce, lengths | offsets, axis, initial)``: per segment, the
    rule of the matching reduction.  ``initial`` (a constant) enters as a term of the sum
    (``sum``: ``initial + sum x``; ``mean``: ``(initial + sum x) / n``), as a candidate of the
    max / min and as a factor of the product:

    - ``"sum"``, ``"mean"``: linear, ``R`` split over the terms (``Rules.reduction``):
      ``R_x = |x| R / (sum |x| + |initial|)`` or ``R_x = c x R / stab(z)`` (``c = 1`` or
      ``1 / n``; the proportional split where ``z`` cancels to rounding);
    - ``"max"``, ``"min"``: winner takes all, ``R`` to the elements equal to the output, ties
      split evenly (``initial`` counts as one candidate);
    - ``"prod"``: the uniform rule, ``R / n`` to each of the ``n`` elements (``initial`` is a
      constant factor and takes nothing).

    What the constant ``initial`` or an empty segment keeps is absorbed."""
    fn = ctx.fn
    x, out, r = fn._saved_data, fn._saved_result, ctx.r
    seg = _Segments(fn, x)
    reduce, init = fn._saved_reduce, fn._saved_initial
    n = seg.lengths.to(r.dtype)
    if reduce in ("sum", "mean"):
        c = 1 / n.masked_fill(n == 0, 1) if reduce == "mean" else torch.ones_like(n)
        a = abs(init) if init is not None else 0.0
        mag = (seg.total(x.abs(), out.shape) + a) * c
        if ctx.rules.reduction == "proportional":
            rx = x.abs() * seg.back(c * ratio(r, mag))
        else:
            k = max(1, x.numel() // max(1, out.numel()))
            zero = cancelled(out, lambda: mag, k, ctx.eps)
            if zero is None:
                rx = x * seg.back(c * safe_divide(r, out, ctx.eps))
            else:
                nil = torch.zeros((), dtype=r.dtype, device=r.device)
                signed = c * safe_divide(torch.where(zero, nil, r), out, ctx.eps)
                rx = x * seg.back(signed) + x.abs() * seg.back(
                    c * ratio(torch.where(zero, r, nil), mag)
                )
    elif reduce in ("max", "min"):
        win = (x == seg.back(out)) & seg.valid
        count = seg.total(win.to(r.dtype), out.shape)
        if init is not None:
            count = count + (out == init).to(r.dtype)
        rx = win.to(r.dtype) * seg.back(ratio(r, count))
    elif reduce == "prod":
        rx = seg.valid.to(r.dtype) * seg.back(ratio(r, n))
    else:
        raise UncoveredOpError(
            f"{fn.name()} (node {ctx.idx}): _segment_reduce with reduce={reduce!r} has no rule "
            "(sum, mean, max, min and prod do)."
        )
    ctx.absorb(r - seg.total(rx, out.shape))
    return (rx,)


def _segment_replay(c: ReplayContext):
    fn = c.fn
    return (
        torch._segment_reduce(
            c.inputs[0],
            fn._saved_reduce,
            lengths=fn._saved_lengths,
            offsets=fn._saved_offsets,
            axis=saved(fn, "_saved_axis"),
            unsafe=False,
            initial=fn._saved_initial,
        ),
    )


def _masked_put_forward(fn):
    """``index_put(self, clamped indices, values.masked_fill(~mask, 0), accumulate=True)``, as
    PyTorch's decomposition of ``_unsafe_masked_index_put_accumulate`` writes it."""
    mask = fn._saved_mask
    indices = list(fn._saved_indices)

    def forward(a, b):
        idx = [
            None if i is None else i.clamp(min=-a.shape[k], max=a.shape[k] - 1)
            for k, i in enumerate(indices)
        ]
        return torch.ops.aten.index_put.default(a, idx, b.masked_fill(~mask, 0), True)

    return forward


def masked_put_accumulate_rule(ctx: RuleContext):
    """``out = _unsafe_masked_index_put_accumulate(self, mask, indices, values)``: ``self`` plus
    the values where ``mask`` holds, accumulated at the (clamped) indices; linear with
    coefficients ``0`` or ``1``, so ``R`` is split over the terms like ``index_put(...,
    accumulate=True)`` (:func:`index_put_rule`, ``Rules.add``): a constant ``self`` is rebuilt
    as ``out - L(0, values)`` and absorbs its share, constant values are seen as ``out - self``."""
    fn = ctx.fn
    if fn.next_functions[1][0] is None:
        return constant_added(ctx)
    forward = _masked_put_forward(fn)
    values = ctx.input_value(1)
    a = _value_or_none(ctx, 0)
    if a is None:
        a = _rebuilt_self(ctx, forward, [values])
    return split_terms(ctx, forward, [a, values], ctx.rules.add)


def _masked_put_replay(c: ReplayContext):
    if c.inputs[0] is None or c.inputs[1] is None:
        raise ValueRecoveryError("masked index_put with an operand that does not require grad")
    return (_masked_put_forward(c.fn)(c.inputs[0], c.inputs[1]),)


TABLE = {
    "ScatterAddBackward0": OpEntry(
        "reduction",
        scatter_add_rule,
        needs_values=True,
        replay=_scatter_add_replay,
        unrecorded=self_unrecorded,
    ),
    "ScatterBackward0": OpEntry(
        "routing", scatter_rule, replay=_scatter_replay, unrecorded=self_unrecorded
    ),
    "ScatterBackward1": OpEntry(
        "routing", scatter_rule, replay=_scatter_replay, unrecorded=self_unrecorded
    ),
    "ScatterReduceBackward0": OpEntry(
        "reduction",
        scatter_reduce_rule,
        saved_inputs={0: "_saved_self", 1: "_saved_src"},
        saved_outputs={0: "_saved_result"},
        replay=lambda c: (_scatter_reduce_forward(c.fn)(c.inputs[0], c.inputs[1]),),
    ),
    "IndexPutBackward0": OpEntry(
        "reduction",
        index_put_rule,
        needs_values=True,
        replay=_index_put_replay,
        unrecorded=self_unrecorded,
    ),
    "EmbeddingBagBackward0": OpEntry(
        "reduction",
        embedding_bag_rule,
        saved_inputs={0: "_saved_weight"},
        replay=_bag_replay,
        source=True,
    ),
    "Col2ImBackward0": OpEntry(
        "reduction",
        linear_reduction(_fold_forward),
        needs_values=True,
        replay=lambda c: (_fold_forward(c.fn, c.inputs[0]),),
    ),
    "Im2ColBackward0": OpEntry("routing", route_like_gradient, replay=_unfold_replay),
    # --- issue 14, docs/rules.md 2.20
    # index_reduce: the scatter_reduce it equals (index broadcast along dim)
    "IndexReduceBackward0": OpEntry(
        "reduction",
        index_reduce_rule,
        saved_inputs={0: "_saved_self", 1: "_saved_source"},
        saved_outputs={0: "_saved_result"},
        replay=_index_reduce_replay,
    ),
    # per-segment sum / mean / max / min / prod
    "SegmentReduceBackward0": OpEntry(
        "reduction",
        segment_reduce_rule,
        saved_inputs={0: "_saved_data"},
        saved_outputs={0: "_saved_result"},
        replay=_segment_replay,
    ),
    # index_put(accumulate=True) of the values where mask holds
    "UnsafeMaskedIndexPutAccumulateBackward0": OpEntry(
        "reduction",
        masked_put_accumulate_rule,
        needs_values=True,
        replay=_masked_put_replay,
        unrecorded=has_unrecorded_input,
    ),
}
