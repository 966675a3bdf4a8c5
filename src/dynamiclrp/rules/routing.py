"""Shape, index and copy ops: relevance is routed exactly as the gradient is.

For an op that only moves, copies, selects or duplicates elements, every output element is one
input element (times 1), so ``R_in = J^T R_out``: the node's own backward, called on the relevance,
routes it (summing where one element fed several outputs; zero for elements replaced by constants,
which absorb that relevance).  Max-type reductions and max-pooling route to the winner the same way
("winner takes all").  Each entry also says how to replay the op forward for promise chains.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import (
    OpEntry,
    ReplayContext,
    RuleContext,
    always_unrecorded,
    has_unrecorded_input,
    with_facts,
)


def route_like_gradient(ctx: RuleContext):
    """``R_in = J^T R_out`` computed by the node's own backward."""
    out = ctx.fn(*ctx.relevance)
    return out if isinstance(out, tuple) else (out,)


def _copy_slices(ctx: RuleContext):
    """An in-place op on a view (``h[:, :3] = v``, ``h[:, :3].relu_()``) routed like its gradient.

    Exact when the wrapped op copies, fills or gates elements (its gradient on the base is 0 or 1
    everywhere).  Autograd does not say which op it wraps, so the gradient of ones is probed: other
    values are a multiply by a constant (relevance unchanged) or refused loudly
    (:func:`_scaling_write`), and a gradient of 1 everywhere is told apart from an add of a
    constant by the values (:func:`_unit_gradient_write`)."""
    probe = ctx.fn(*(torch.ones_like(r) for r in ctx.relevance))
    probe = probe if isinstance(probe, tuple) else (probe,)
    base = probe[0]
    # an add into the slice (y[:, 0] += v) passes the gradient to both summands: routing like it
    # would duplicate relevance (more gradient mass than output elements)
    mass = sum(float(p.abs().sum()) for p in probe if p is not None)
    if mass > ctx.r.numel() * (1 + 1e-6) and any(p is not None for p in probe[1:]):
        from ..errors import UncoveredOpError

        raise UncoveredOpError(
            f"{ctx.fn.name()} (node {ctx.idx}) wraps an in-place op on a view that adds into the "
            "elements it writes (e.g. y[:, 0] += v, addcmul_); autograd does not expose which op "
            "it is, and routing relevance like its gradient would give both summands all of it. "
            "Write that op out of place, e.g. y = torch.cat([y[:, :1] + v, y[:, 1:]], 1)."
        )
    if base is not None and bool(((base != 0) & (base != 1)).any()):
        return _scaling_write(ctx, base) + (None,) * (len(probe) - 1)
    if base is not None and all(p is None for p in probe[1:]) and bool((base == 1).all()):
        return _unit_gradient_write(ctx) + (None,) * (len(probe) - 1)
    return route_like_gradient(ctx)


def _scaling_write(ctx: RuleContext, slope: Tensor):
    """A wrapped op whose gradient is neither 0 nor 1 somewhere: a multiply by a constant
    (``h[:, :3].mul_(0.5)``, ``/= t``) passes relevance on unchanged, as ``x * c`` does; any other
    op (``tanh_()``) is refused.  Told apart by the values: a constant factor has
    ``after = slope * before`` everywhere (``slope`` the gradient of ones).  The written value
    needs :func:`dynamiclrp.record` unless a consumer saved it."""
    from ..errors import UncoveredOpError

    after = ctx.output_value(0)
    before = ctx.input_value(0)
    tol = 16 * torch.finfo(after.dtype).eps
    scale = float(after.abs().max()) if after.numel() else 0.0
    if not torch.allclose(after, slope.to(after.dtype) * before, rtol=tol, atol=tol * scale):
        raise UncoveredOpError(
            f"{ctx.fn.name()} (node {ctx.idx}) wraps an in-place op on a view that scales the "
            "elements it writes (e.g. h[:, :3].mul_(0.5), tanh_()); autograd does not expose "
            "which op it is, and it is not a multiply by a constant (the written values are not "
            "the gradient times the old ones), so no LRP rule can be chosen. Write that op out "
            "of place, e.g. h = torch.cat([torch.tanh(h[:, :3]), h[:, 3:]], 1)."
        )
    return (ctx.r,)


def _unit_gradient_write(ctx: RuleContext):
    """A wrapped op whose gradient is 1 everywhere: an identity-like op (``relu_`` or ``clamp_``
    changing nothing) or the add of a constant (``h[:, :3].add_(0.5)``), told apart by the values.

    With ``before`` the base's value and ``delta = after - before``, ``R`` is split over the
    summands ``before + delta`` by the add rule (``Rules.add``) and the constant's share absorbed,
    as for an out-of-place ``x + c``; where ``delta = 0`` that gives ``before`` all of ``R``.  The
    written value needs :func:`dynamiclrp.record` unless a consumer saved it."""
    from .elementwise import split_sum

    after = ctx.output_value(0)
    before = ctx.input_value(0)
    delta = after - before
    # a value rebuilt by a replay may differ from the written one by rounding: not an add
    tol = 8 * torch.finfo(delta.dtype).eps * torch.maximum(after.abs(), before.abs())
    delta = delta.masked_fill_(delta.abs() <= tol, 0.0)
    if not bool(delta.any()):
        return route_like_gradient(ctx)
    r_before, r_constant = split_sum(ctx, [before, delta], ctx.rules.add)
    ctx.absorb(r_constant)
    return (r_before,)


def _reshape(c: ReplayContext):
    return (c.inputs[0].reshape(c.out_shape()),)


def _transpose(c: ReplayContext):
    return (c.inputs[0].transpose(c.saved("_saved_dim0"), c.saved("_saved_dim1")),)


def _expand(c: ReplayContext):
    return (c.inputs[0].expand(c.out_shape()),)


def _slice(c: ReplayContext):
    x = c.inputs[0]
    idx = [slice(None)] * x.dim()
    idx[c.saved("_saved_dim")] = slice(
        c.saved("_saved_start"), c.saved("_saved_end"), c.saved("_saved_step")
    )
    return (x[tuple(idx)],)


def _index(c: ReplayContext):
    """``x[indices]``; autograd saves ``None`` for a full slice (``x[:, idx]``)."""
    idx = tuple(slice(None) if i is None else i for i in c.saved("_saved_indices"))
    return (c.inputs[0][idx],)


def _nearest(dims: int, exact: str) -> OpEntry:
    """Nearest-neighbour upsampling copies elements: routing. Replayed with the recorded aten op
    (output size and scales), which ``F.interpolate`` from sizes alone does not reproduce."""
    name = f"_upsample_nearest_exact{dims}d" if exact else f"upsample_nearest{dims}d"

    def replay(c: ReplayContext):
        op = getattr(torch.ops.aten, name).default
        names = (
            ("_saved_scales",)
            if dims == 1
            else tuple(f"_saved_scales_{a}" for a in "dhw"[3 - dims :])
        )
        scales = [c.saved(n) for n in names]
        return (op(c.inputs[0], list(c.saved("_saved_output_size")), *scales),)

    return _routing(replay)


def _split(c: ReplayContext):
    x, dim = c.inputs[0], c.saved("_saved_dim")
    sizes = getattr(c.fn, "_saved_split_sizes", None)
    if sizes is None:
        return torch.split(x, c.saved("_saved_split_size"), dim)
    return torch.split(x, list(sizes), dim)


def _routing(
    replay=None,
    saved_inputs=None,
    saved_outputs=None,
    canonize=None,
    rearranges=False,
    elementwise=False,
    source=False,
) -> OpEntry:
    return OpEntry(
        "routing",
        route_like_gradient,
        source=source,
        replay=replay,
        saved_inputs=saved_inputs or {},
        saved_outputs=saved_outputs or {},
        canonize=canonize,
        rearranges=rearranges,
        elementwise=elementwise,
    )


def _max_pool(pool) -> OpEntry:
    """Max pooling: routes to the winner; replays from its saved input (not its indices)."""

    def replay(c: ReplayContext):
        return (
            pool(
                c.inputs[0],
                c.saved("_saved_kernel_size"),
                c.saved("_saved_stride"),
                c.saved("_saved_padding"),
                c.saved("_saved_dilation"),
                c.saved("_saved_ceil_mode"),
            ),
        )

    return _routing(replay, saved_inputs={0: "_saved_self"})


def _pool_replay(fn):
    return lambda c: (fn(c),)


def _at_indices(c: ReplayContext):
    """The values a selection by value (``topk``, ``sort``, ``kthvalue``, ``median``/``mode``
    along a dimension, ``cummax``) returned: the input gathered at the saved indices (exact,
    and needs none of ``largest``/``sorted``/``descending``, which autograd does not save)."""
    x, dim, idx = c.inputs[0], c.saved("_saved_dim"), c.saved("_saved_indices")
    if x.dim() == 0:
        return (x.clone(),)
    keep = not hasattr(c.fn, "_saved_keepdim") or c.saved("_saved_keepdim")
    if idx.dim() < x.dim():  # keepdim=False: the reduced dimension was dropped
        return (x.gather(dim, idx.unsqueeze(dim)).squeeze(dim),)
    out = x.gather(dim, idx)
    return (out if keep else out.squeeze(dim),)


def _pad(mode: str):
    """Reflection / replication padding: every output element is one input element."""
    return lambda c: (torch.nn.functional.pad(c.inputs[0], list(c.saved("_saved_padding")), mode),)


def _pooled_at(dims: int):
    """Fractional max pooling: the input at the saved arg-max indices (``_saved_result1``, flat
    over the last ``dims`` dimensions), so the random pooling regions need not be redrawn."""

    def replay(c: ReplayContext):
        x, idx = c.inputs[0], c.saved("_saved_result1")
        flat = x.flatten(-dims).gather(-1, idx.flatten(-dims))
        return (flat.view(idx.shape),)

    return replay


def _distinct_writes(what: str, indices, accumulate_attr: str | None = None, by_value=None):
    """Rule of an op that writes input elements to indexed output elements (``max_unpool``,
    ``index_copy``, ``put``, ``as_strided_scatter``): routed like its gradient when no two writes
    hit one output element.  ``indices(ctx)`` gives the written positions, one row per
    independent plane.  With a duplicate the last write wins, but the gradient reaches every
    writer, so routing relevance like it would duplicate relevance: ``by_value(ctx)`` (where
    given) routes by the values instead (:func:`_route_by_value`), else the op is refused.  An
    accumulating ``put`` is a sum (:func:`_put_accumulate`)."""

    def rule(ctx: RuleContext):
        from ..errors import UncoveredOpError

        if accumulate_attr is not None and ctx.saved(accumulate_attr):
            return _put_accumulate(ctx)
        idx = indices(ctx)
        srt = idx.sort(-1).values
        if bool((srt[..., 1:] == srt[..., :-1]).any()):
            if by_value is not None:
                return by_value(ctx)
            raise UncoveredOpError(
                f"{ctx.fn.name()} (node {ctx.idx}) writes several {what} into one output "
                "element (duplicate indices): the last write wins, but autograd routes the "
                "gradient to every writer, so routing relevance like it would duplicate it. "
                "Make the indices distinct (or write the op as a scatter with reduce=)."
            )
        return route_like_gradient(ctx)

    return rule


def _route_by_value(ctx: RuleContext, pos: Tensor, src: Tensor, out: Tensor):
    """Relevance of a write of ``src`` (flat) to the flat output positions ``pos`` where several
    writes may hit one position and which one wins is unspecified: the written element equals
    the winning source value, so ``R`` of a position goes to the source element(s) writing there
    whose value equals the output, split evenly between equal ones (a position written once
    goes to its one writer).  A position written several times where no writer's value equals
    the output is refused.  Returns ``(R of the written sources, written count per position)``,
    flat."""
    from ..errors import UncoveredOpError

    r = ctx.r.reshape(-1)
    ones = torch.ones(pos.shape, dtype=r.dtype, device=r.device)
    count = torch.zeros_like(r).index_add_(0, pos, ones)
    win = ((src == out[pos]) | (count[pos] == 1)).to(r.dtype)
    n = torch.zeros_like(r).index_add_(0, pos, win)
    lost = (count > 0) & (n == 0)
    if bool(lost.any()):
        raise UncoveredOpError(
            f"{ctx.fn.name()} (node {ctx.idx}) writes several elements into one output element "
            f"and at {int(lost.sum())} such position(s) no written value equals the output, so "
            "the winning write cannot be read from the values. Make the indices distinct."
        )
    return win * (r / n.masked_fill(n == 0, 1))[pos], count


def _put_accumulate(ctx: RuleContext):
    """``out = self.put(index, source, accumulate=True)``: ``self`` plus the source elements
    summed into the flat positions ``index``, linear with coefficients 1: ``R`` split over the
    terms like ``index_put(..., accumulate=True)`` (``Rules.add``, :func:`.summing.split_terms`);
    a constant ``self`` is rebuilt as ``out - put(0, index, source, True)`` and absorbs its
    share; a constant source (not saved) is seen as ``out - self`` and absorbs its share."""
    from .summing import _rebuilt_self, _value_or_none, constant_added, split_terms

    if ctx.fn.next_functions[1][0] is None:  # a constant source, not saved: out - self
        return constant_added(ctx)
    index = ctx.saved("_saved_index")

    def forward(a, b):
        return a.put(index, b, True)

    src = ctx.input_value(1)
    a = _value_or_none(ctx, 0)
    if a is None:
        a = _rebuilt_self(ctx, forward, [src])
    return split_terms(ctx, forward, [a, src], ctx.rules.add)


def _put_by_value(ctx: RuleContext):
    """``put`` with duplicate indices (:func:`_route_by_value`); ``self`` keeps ``R`` where
    nothing was written."""
    out = ctx.output_value(0).reshape(-1)
    pos = ctx.saved("_saved_index").reshape(-1) % max(1, out.numel())
    src = ctx.input_value(1).reshape(-1)
    rs, count = _route_by_value(ctx, pos, src, out)
    r_self = ctx.r.masked_fill(count.reshape(ctx.r.shape) > 0, 0)
    return r_self, rs.reshape(ctx.input_shape(1))


def _unpool_by_value(dims: int):
    """``max_unpool`` with duplicate indices in a plane (:func:`_route_by_value`, per plane)."""

    def rule(ctx: RuleContext):
        x = ctx.input_value(0)
        out = ctx.output_value(0)
        idx = ctx.saved("_saved_indices").flatten(-dims)
        planes, size = idx[..., 0].numel(), out.shape[-dims:].numel()
        base = torch.arange(planes, device=idx.device).reshape(idx.shape[:-1] + (1,)) * size
        rs, _ = _route_by_value(ctx, (idx + base).reshape(-1), x.reshape(-1), out.reshape(-1))
        return (rs.reshape(x.shape),)

    return rule


def _strided_positions(ctx: RuleContext) -> Tensor:
    """The flat output positions ``as_strided_scatter`` writes, in ``src``'s element order: those
    of the strided view of a contiguous output.  The output has ``self``'s layout, and autograd
    does not save it: a ``self`` that requires grad must be contiguous (PyTorch checks), and
    PyTorch's own backward assumes a contiguous one too.  Where the output and ``src`` values are
    at hand they are checked against each other, and a mismatch (a non-contiguous constant
    ``self``) is refused."""
    from ..errors import UncoveredOpError

    r = ctx.r
    flat = torch.arange(r.numel(), device=r.device).reshape(r.shape)
    view = flat.as_strided(
        ctx.saved("_saved_size"), ctx.saved("_saved_stride"), ctx.saved("_saved_storage_offset")
    )
    pos = view.reshape(-1)
    out, src = ctx.known_output(0), ctx.known_input(1)
    if (
        out is not None
        and src is not None
        and not bool((out.reshape(-1)[pos] == src.reshape(-1)).all())
    ):
        raise UncoveredOpError(
            f"{ctx.fn.name()} (node {ctx.idx}): the output of as_strided_scatter does not hold "
            "src where a contiguous layout puts it: `self` was not contiguous, and autograd "
            "does not record its layout. Pass self.contiguous()."
        )
    return pos


def strided_scatter_rule(ctx: RuleContext):
    """``out = as_strided_scatter(self, src, size, stride, storage_offset)``: a copy of ``self``
    with ``src`` written into a strided view of it, so routing: ``R_self = R`` where nothing was
    written, ``R_src = R`` at the position each element was written to (the positions from
    :func:`_strided_positions`; PyTorch refuses a view whose elements overlap, so no two writes
    meet).  Not the node's backward: its gradient for ``self`` is the mask of the written
    positions instead of its complement (PyTorch 2.x, ``gradcheck`` fails), which would route
    relevance to the overwritten elements."""
    from ..errors import UncoveredOpError

    pos = _strided_positions(ctx)
    r = ctx.r.reshape(-1)
    ones = torch.ones(pos.shape, dtype=r.dtype, device=r.device)
    count = torch.zeros_like(r).index_add_(0, pos, ones)
    if bool((count > 1).any()):
        raise UncoveredOpError(
            f"{ctx.fn.name()} (node {ctx.idx}) writes several source elements into one output "
            "element (an overlapping strided view): which write wins is unspecified."
        )
    r_self = r.masked_fill(count > 0, 0).reshape(ctx.r.shape)
    src_recorded = ctx.fn.next_functions[1][0] is not None
    return r_self, r[pos].reshape(ctx.input_shape(1)) if src_recorded else None


def _strided_scatter_replay(c: ReplayContext):
    return (
        torch.as_strided_scatter(
            c.inputs[0],
            c.inputs[1],
            c.saved("_saved_size"),
            c.saved("_saved_stride"),
            c.saved("_saved_storage_offset"),
        ),
    )


def _unpool_replay(dims: int):
    """``max_unpool``: zeros of the output's shape with the input written at the saved flat
    indices of each plane (exact for distinct indices; stride and padding are not saved)."""

    def replay(c: ReplayContext):
        x, idx = c.inputs[0], c.saved("_saved_indices")
        shape = c.out_shape()
        out = x.new_zeros(*shape[:-dims], shape[-dims:].numel())
        out.scatter_(-1, idx.flatten(-dims), x.flatten(-dims))
        return (out.view(shape),)

    return replay


def _unpool(dims: int) -> OpEntry:
    return OpEntry(
        "routing",
        _distinct_writes(
            "input elements",
            lambda ctx: ctx.saved("_saved_indices").flatten(-dims),
            by_value=_unpool_by_value(dims),
        ),
        needs_values=True,  # with duplicate indices: the input and the output
        replay=_unpool_replay(dims),
    )


def _index_copy_replay(c: ReplayContext):
    src = c.inputs[1] if c.inputs[1] is not None else c.saved("_saved_source")
    return (c.inputs[0].index_copy(c.saved("_saved_dim"), c.saved("_saved_index"), src),)


def _put_replay(c: ReplayContext):
    src = c.inputs[1] if c.inputs[1] is not None else c.saved("_saved_source")
    return (c.inputs[0].put(c.saved("_saved_index"), src, c.saved("_saved_accumulate")),)


def _copy(c: ReplayContext):
    """``self.copy_(src)``: the output is ``src`` broadcast to ``self``'s shape and dtype."""
    return (c.inputs[1].to(c.out_dtype()).expand(c.out_shape()).clone(),)


def _winner(pick):
    """``maximum``/``minimum``/``fmax``/``fmin`` of two tensors: the gradient routes to the
    winning operand (half to each on a tie), so does relevance; replay from the saved operands."""
    return _routing(
        lambda c: (pick(c.inputs[0], c.inputs[1]),),
        saved_inputs={0: "_saved_self", 1: "_saved_other"},
    )


TABLE = {
    # pure reshapes: replay = reshape to the recorded output shape
    # reshapes the plan may look through (bias-add fusion)
    "ViewBackward0": _routing(_reshape, canonize="reshape", rearranges=True),
    "ReshapeAliasBackward0": _routing(_reshape, canonize="reshape", rearranges=True),
    "UnsafeViewBackward0": _routing(_reshape, canonize="reshape", rearranges=True),
    "AliasBackward0": _routing(_reshape, rearranges=True),
    "SqueezeBackward0": _routing(_reshape, rearranges=True),
    "SqueezeBackward1": _routing(_reshape, rearranges=True),
    "SqueezeBackward2": _routing(_reshape, rearranges=True),
    "UnsqueezeBackward0": _routing(_reshape, rearranges=True),
    "ExpandBackward0": with_facts(_routing(_expand), same_values=True),
    "TransposeBackward0": _routing(_transpose, rearranges=True),
    "TransposeBackward1": _routing(_transpose, rearranges=True),
    "TBackward0": _routing(lambda c: (c.inputs[0].t(),), rearranges=True),
    "PermuteBackward0": _routing(
        lambda c: (c.inputs[0].permute(c.saved("_saved_dims")),), rearranges=True
    ),
    "RepeatBackward0": _routing(lambda c: (c.inputs[0].repeat(c.saved("_saved_repeats")),)),
    "SelectBackward0": _routing(
        lambda c: (c.inputs[0].select(c.saved("_saved_dim"), c.saved("_saved_index")),)
    ),
    "SliceBackward0": _routing(_slice),
    # lookups by an index tensor: data when the table they read is a requested input (as embedding)
    "IndexBackward0": _routing(_index, source=True),
    "IndexSelectBackward0": _routing(
        lambda c: (
            torch.index_select(c.inputs[0], c.saved("_saved_dim"), c.saved("_saved_index")),
        ),
        source=True,
    ),
    "GatherBackward0": _routing(
        lambda c: (torch.gather(c.inputs[0], c.saved("_saved_dim"), c.saved("_saved_index")),),
        saved_inputs={0: "_saved_self"},
    ),
    "CatBackward0": with_facts(
        _routing(lambda c: (torch.cat(c.inputs, c.saved("_saved_dim")),)),
        unrecorded=has_unrecorded_input,
        concatenates=True,
    ),
    "StackBackward0": with_facts(
        _routing(lambda c: (torch.stack(c.inputs, c.saved("_saved_dim")),)),
        unrecorded=has_unrecorded_input,
        concatenates=True,
    ),
    "SplitBackward0": _routing(_split),
    "SplitWithSizesBackward0": _routing(_split),
    "UnsafeSplitBackward0": _routing(_split),
    "UnbindBackward0": _routing(lambda c: torch.unbind(c.inputs[0], c.saved("_saved_dim"))),
    # element-wise: each output element is the same-position input element (regions.py)
    "CloneBackward0": _routing(lambda c: (c.inputs[0],), rearranges=True, elementwise=True),
    "ToCopyBackward0": with_facts(
        _routing(lambda c: (c.inputs[0].to(c.out_dtype()),), elementwise=True), same_values=True
    ),
    "ConstantPadNdBackward0": _routing(
        lambda c: (torch.nn.functional.pad(c.inputs[0], c.saved("_saved_pad")),)
    ),
    "PixelShuffleBackward0": _routing(
        lambda c: (torch.pixel_shuffle(c.inputs[0], c.saved("_saved_upscale_factor")),),
        rearranges=True,
    ),
    "PixelUnshuffleBackward0": _routing(
        lambda c: (torch.pixel_unshuffle(c.inputs[0], c.saved("_saved_downscale_factor")),),
        rearranges=True,
    ),
    "FlipBackward0": _routing(
        lambda c: (c.inputs[0].flip(c.saved("_saved_dims")),), rearranges=True
    ),
    "RollBackward0": _routing(
        lambda c: (c.inputs[0].roll(c.saved("_saved_shifts"), c.saved("_saved_dims")),)
    ),
    # the fill value is not saved: replayed as -inf, only where PromiseResolver has checked that
    # every consumer is a softmax whose output is 0 on the mask (promises._check_masked_softmax)
    "MaskedFillBackward0": with_facts(
        with_facts(
            _routing(
                lambda c: (c.inputs[0].masked_fill(c.saved("_saved_mask"), float("-inf")),),
                elementwise=True,
            ),
            unrecorded=always_unrecorded,
        ),
        fill_unsaved=True,
    ),
    "WhereBackward0": with_facts(
        _routing(
            lambda c: (torch.where(c.saved("_saved_condition"), c.inputs[0], c.inputs[1]),),
            elementwise=True,
        ),
        unrecorded=has_unrecorded_input,
    ),
    "TrilBackward0": _routing(lambda c: (c.inputs[0].tril(c.saved("_saved_diagonal")),)),
    "TriuBackward0": _routing(lambda c: (c.inputs[0].triu(c.saved("_saved_diagonal")),)),
    "DiagonalBackward0": _routing(
        lambda c: (
            c.inputs[0].diagonal(
                c.saved("_saved_offset"), c.saved("_saved_dim1"), c.saved("_saved_dim2")
            ),
        )
    ),
    "CopySlices": OpEntry("routing", _copy_slices, rearranges=False, unrecorded=always_unrecorded),
    # register_full_backward_hook: an identity on each input; calling the node would fire the hook
    "BackwardHookFunctionBackward": OpEntry(
        "routing", lambda c: tuple(c.relevance), replay=lambda c: tuple(c.inputs)
    ),
    "AsStridedBackward0": with_facts(_routing(), unrecorded=always_unrecorded),
    "AsStridedBackward1": _routing(),
    "UnfoldBackward0": _routing(
        lambda c: (
            c.inputs[0].unfold(
                c.saved("_saved_dimension"), c.saved("_saved_size"), c.saved("_saved_step")
            ),
        )
    ),
    # winner takes all: the gradient of a max routes to the arg-max
    "MaxPool2DWithIndicesBackward0": _max_pool(torch.nn.functional.max_pool2d),
    "MaxPool3DWithIndicesBackward0": _max_pool(torch.nn.functional.max_pool3d),
    "AdaptiveMaxPool2DBackward0": _routing(
        _pool_replay(
            lambda c: torch.nn.functional.adaptive_max_pool2d(c.inputs[0], c.out_shape()[-2:])
        ),
        saved_inputs={0: "_saved_self"},
    ),
    "MaxBackward0": _routing(
        lambda c: torch.max(c.inputs[0], c.saved("_saved_dim"), c.saved("_saved_keepdim"))[:1]
    ),
    "MaxBackward1": _routing(saved_inputs={0: "_saved_self"}, saved_outputs={0: "_saved_result"}),
    "MinBackward1": _routing(saved_inputs={0: "_saved_self"}, saved_outputs={0: "_saved_result"}),
    "AmaxBackward0": _routing(saved_inputs={0: "_saved_self"}, saved_outputs={0: "_saved_result"}),
    "AminBackward0": _routing(saved_inputs={0: "_saved_self"}, saved_outputs={0: "_saved_result"}),
    "TopkBackward0": _routing(_at_indices),
    "SortBackward0": _routing(_at_indices),
    # the representation of token ids: data when its table is a requested input
    "EmbeddingBackward0": OpEntry(
        "routing",
        route_like_gradient,
        replay=lambda c: (torch.nn.functional.embedding(c.saved("_saved_indices"), c.inputs[0]),),
        source=True,
    ),
    "UpsampleNearest1DBackward0": _nearest(1, ""),
    "UpsampleNearest2DBackward0": _nearest(2, ""),
    "UpsampleNearest3DBackward0": _nearest(3, ""),
    "UpsampleNearestExact1DBackward0": _nearest(1, "Exact"),
    "UpsampleNearestExact2DBackward0": _nearest(2, "Exact"),
    "UpsampleNearestExact3DBackward0": _nearest(3, "Exact"),
    # --- census (issue 14): node types routed like their gradient, found by benchmarks/census.py
    # the *_copy twins of views (torch.view_copy, permute_copy, ...: a view then a clone)
    "ViewBackward0_copy": _routing(_reshape, rearranges=True),
    "AliasBackward0_copy": _routing(_reshape, rearranges=True),
    "SqueezeBackward0_copy": _routing(_reshape, rearranges=True),
    "SqueezeBackward1_copy": _routing(_reshape, rearranges=True),
    "SqueezeBackward2_copy": _routing(_reshape, rearranges=True),
    "UnsqueezeBackward0_copy": _routing(_reshape, rearranges=True),
    "ExpandBackward0_copy": with_facts(_routing(_expand), same_values=True),
    "TransposeBackward0_copy": _routing(_transpose, rearranges=True),
    "TBackward0_copy": _routing(lambda c: (c.inputs[0].t(),), rearranges=True),
    "PermuteBackward0_copy": _routing(
        lambda c: (c.inputs[0].permute(c.saved("_saved_dims")),), rearranges=True
    ),
    "DiagonalBackward0_copy": _routing(
        lambda c: (
            c.inputs[0].diagonal(
                c.saved("_saved_offset"), c.saved("_saved_dim1"), c.saved("_saved_dim2")
            ),
        )
    ),
    "UnbindBackward0_copy": _routing(lambda c: torch.unbind(c.inputs[0], c.saved("_saved_dim"))),
    "SplitWithSizesBackward0_copy": _routing(_split),
    "UnfoldBackward0_copy": _routing(
        lambda c: (
            c.inputs[0].unfold(
                c.saved("_saved_dimension"), c.saved("_saved_size"), c.saved("_saved_step")
            ),
        )
    ),
    "NarrowCopyBackward0": _routing(
        lambda c: (
            c.inputs[0].narrow(
                c.saved("_saved_dim"), c.saved("_saved_start"), c.saved("_saved_length")
            ),
        )
    ),
    # squeeze(dim) / squeeze(dims) inside composites (matmul of a vector): a reshape
    "SqueezeBackward3": _routing(_reshape, rearranges=True),
    "SqueezeBackward4": _routing(_reshape, rearranges=True),
    # self.copy_(src): the output is src (broadcast and cast); self is overwritten and gets 0
    "CopyBackwards": _routing(_copy),
    # x.zero_() / x.fill_(v): every element replaced by a constant, which absorbs all relevance
    "ZeroBackward0": _routing(lambda c: (torch.zeros_like(c.inputs[0]),)),
    "Rot90Backward0": _routing(
        lambda c: (torch.rot90(c.inputs[0], c.saved("_saved_k"), c.saved("_saved_dims")),),
        rearranges=True,
    ),
    "DiagEmbedBackward0": _routing(
        lambda c: (
            torch.diag_embed(
                c.inputs[0],
                c.saved("_saved_offset"),
                c.saved("_saved_dim1"),
                c.saved("_saved_dim2"),
            ),
        )
    ),
    "BlockDiagBackward0": with_facts(
        _routing(lambda c: (torch.block_diag(*c.inputs),)), unrecorded=has_unrecorded_input
    ),
    "MaskedSelectBackward0": _routing(
        lambda c: (torch.masked_select(c.inputs[0], c.saved("_saved_mask")),),
        saved_inputs={0: "_saved_self"},
    ),
    "TakeBackward0": _routing(
        lambda c: (torch.take(c.inputs[0], c.saved("_saved_index")),),
        saved_inputs={0: "_saved_self"},
    ),
    "SelectScatterBackward0": with_facts(
        _routing(
            lambda c: (
                torch.select_scatter(
                    c.inputs[0], c.inputs[1], c.saved("_saved_dim"), c.saved("_saved_index")
                ),
            )
        ),
        unrecorded=has_unrecorded_input,
    ),
    "SliceScatterBackward0": with_facts(
        _routing(
            lambda c: (
                torch.slice_scatter(
                    c.inputs[0],
                    c.inputs[1],
                    c.saved("_saved_dim"),
                    c.saved("_saved_start"),
                    c.saved("_saved_end"),
                    c.saved("_saved_step"),
                ),
            )
        ),
        unrecorded=has_unrecorded_input,
    ),
    "DiagonalScatterBackward0": with_facts(
        _routing(
            lambda c: (
                torch.diagonal_scatter(
                    c.inputs[0],
                    c.inputs[1],
                    c.saved("_saved_offset"),
                    c.saved("_saved_dim1"),
                    c.saved("_saved_dim2"),
                ),
            )
        ),
        unrecorded=has_unrecorded_input,
    ),
    "MaskedScatterBackward0": with_facts(
        _routing(lambda c: (c.inputs[0].masked_scatter(c.saved("_saved_mask"), c.inputs[1]),)),
        unrecorded=has_unrecorded_input,
    ),
    # padding: reflection and replication copy input elements into the border
    "ReflectionPad1DBackward0": _routing(_pad("reflect"), saved_inputs={0: "_saved_self"}),
    "ReflectionPad2DBackward0": _routing(_pad("reflect"), saved_inputs={0: "_saved_self"}),
    "ReflectionPad3DBackward0": _routing(_pad("reflect"), saved_inputs={0: "_saved_self"}),
    "ReplicationPad1DBackward0": _routing(_pad("replicate"), saved_inputs={0: "_saved_self"}),
    "ReplicationPad2DBackward0": _routing(_pad("replicate"), saved_inputs={0: "_saved_self"}),
    "ReplicationPad3DBackward0": _routing(_pad("replicate"), saved_inputs={0: "_saved_self"}),
    # channel / pixel rearrangements
    "ChannelShuffleBackward0": _routing(
        lambda c: (torch.nn.functional.channel_shuffle(c.inputs[0], c.saved("_saved_groups")),),
        rearranges=True,
    ),
    # selections by value: winner takes all, like max (ties split as the gradient splits them)
    "MinBackward0": _routing(
        lambda c: torch.min(c.inputs[0], c.saved("_saved_dim"), c.saved("_saved_keepdim"))[:1]
    ),
    "SortBackward1": _routing(_at_indices),
    "KthvalueBackward0": _routing(_at_indices),
    "MedianBackward1": _routing(_at_indices),
    "NanmedianBackward1": _routing(_at_indices),
    "ModeBackward0": _routing(_at_indices),
    "MedianBackward0": _routing(
        saved_inputs={0: "_saved_self"}, saved_outputs={0: "_saved_result"}
    ),
    "NanmedianBackward0": _routing(
        saved_inputs={0: "_saved_self"}, saved_outputs={0: "_saved_result"}
    ),
    "CummaxBackward0": _routing(_at_indices, saved_inputs={0: "_saved_self"}),
    "CumminBackward0": _routing(_at_indices, saved_inputs={0: "_saved_self"}),
    "AminmaxBackward0": _routing(
        saved_inputs={0: "_saved_self"}, saved_outputs={0: "_saved_min", 1: "_saved_max"}
    ),
    "MaximumBackward0": _winner(torch.maximum),
    "MinimumBackward0": _winner(torch.minimum),
    "FmaxBackward0": _winner(torch.fmax),
    "FminBackward0": _winner(torch.fmin),
    # clamp with a tensor bound: max(x, min) / min(x, max), the gradient routes to the winner
    "ClampMinBackward1": _routing(
        lambda c: (torch.clamp_min(c.inputs[0], c.inputs[1]),),
        saved_inputs={0: "_saved_self", 1: "_saved_min"},
    ),
    "ClampMaxBackward1": _routing(
        lambda c: (torch.clamp_max(c.inputs[0], c.inputs[1]),),
        saved_inputs={0: "_saved_self", 1: "_saved_max"},
    ),
    # fills with a value tensor: each output element is x's or the value's
    "MaskedFillBackward1": with_facts(
        _routing(lambda c: (c.inputs[0].masked_fill(c.saved("_saved_mask"), c.inputs[1]),)),
        unrecorded=has_unrecorded_input,
    ),
    "IndexFillBackward0": with_facts(
        _routing(), unrecorded=always_unrecorded
    ),  # the fill value is not saved: no replay
    "IndexFillBackward1": with_facts(
        _routing(
            lambda c: (
                c.inputs[0].index_fill(c.saved("_saved_dim"), c.saved("_saved_index"), c.inputs[1]),
            )
        ),
        unrecorded=has_unrecorded_input,
    ),
    "AsStridedBackward0_copy": with_facts(
        _routing(), unrecorded=always_unrecorded
    ),  # no replay, as AsStridedBackward0
    # more max pooling: winner takes all, replayed from the saved input (and indices)
    "AdaptiveMaxPool3DBackward0": _routing(
        _pool_replay(
            lambda c: torch.nn.functional.adaptive_max_pool3d(c.inputs[0], c.out_shape()[-3:])
        ),
        saved_inputs={0: "_saved_self"},
    ),
    "FractionalMaxPool2DBackward0": _routing(_pooled_at(2), saved_inputs={0: "_saved_self"}),
    "FractionalMaxPool3DBackward0": _routing(_pooled_at(3), saved_inputs={0: "_saved_self"}),
    # where(mask, x[indices], fill): each output element is an element of x or the fill value
    # (not saved: no replay, record() keeps the result)
    "UnsafeMaskedIndexBackward0": with_facts(_routing(), unrecorded=always_unrecorded),
    # writes to indexed positions: routing when no two writes meet (else a specific refusal)
    "MaxUnpool2DBackward0": _unpool(2),
    "MaxUnpool3DBackward0": _unpool(3),
    "IndexCopyBackward0": OpEntry(
        "routing",
        _distinct_writes("source slices", lambda ctx: ctx.saved("_saved_index").flatten()),
        saved_inputs={1: "_saved_source"},
        replay=_index_copy_replay,
    ),
    "PutBackward0": OpEntry(
        "routing",
        _distinct_writes(
            "source elements",
            lambda ctx: ctx.saved("_saved_index").flatten() % ctx.r.numel(),
            "_saved_accumulate",
            by_value=_put_by_value,
        ),
        needs_values=True,  # with duplicate indices: the output
        saved_inputs={1: "_saved_source"},
        replay=_put_replay,
        unrecorded=has_unrecorded_input,  # accumulate=True with a constant operand
    ),
    # a copy of self with src written into a strided view of it: routing, by value on overlaps
    "AsStridedScatterBackward0": OpEntry(
        "routing",
        strided_scatter_rule,
        replay=_strided_scatter_replay,
    ),
}
