"""Reductions: sum, mean, cumsum, average pooling, interpolation; norms, variance, products.

Linear ones (sum, mean, cumsum, average pooling, linear/bilinear/trilinear interpolation) are a map
``z = L(x)`` with non-negative coefficients; ``L^T`` is the node's own backward.
Preset ``reduction="proportional"`` (like add): ``R_x = |x| * L^T(R / L(|x|))``, each element's share
of a group proportional to its magnitude (zero where the whole group is zero).
``reduction="signed"`` (epsilon): ``R_x = x * L^T(R / stab(L(x)))``.
Bicubic interpolation has negative coefficients and always uses the signed form.

Non-linear reductions over a group ``G`` split each output's relevance over the group by a
non-negative weight per element (``R_x = R * w / sum_G w``, 0 where ``sum_G w = 0``):
``w = |x|^p`` for a p-norm, ``w = (x - mean_G x)^2`` for variance and standard deviation, and
``w = 1`` for a product (the uniform rule).
(Max-type reductions route to the winner: see :mod:`.routing`.)

``logsumexp`` / ``logcumsumexp`` take the map of ``log(sum(exp x))`` written out (``R`` split by
the softmax of each group or prefix); ``renorm`` gives ``x`` all (it scales ``x`` by a statistic of
``x``); ``grid_sample`` is a linear map of its input for a fixed grid (``docs/rules.md`` 2.20).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UncoveredOpError
from .base import OpEntry, RuleContext, ratio, saved, sum_to_shape
from .elementwise import cancelled
from .linear import safe_divide


def _transpose(ctx: RuleContext, g):
    out = ctx.fn(g)
    return out[0] if isinstance(out, tuple) else out


def linear_reduction(forward):
    """Rule for ``z = forward(x)`` linear with non-negative coefficients (module docstring)."""

    def rule(ctx: RuleContext):
        x = ctx.input_value(0)
        if ctx.rules.reduction == "proportional":
            return (_proportional_linear(ctx, forward, x, ctx.r),)
        return _signed_linear(ctx, forward, x, exact_where_cancelled=True)

    return rule


def _proportional_linear(ctx: RuleContext, forward, x: Tensor, r: Tensor) -> Tensor:
    ax = x.abs()
    return ax * _transpose(ctx, ratio(r, forward(ctx.fn, ax)))


def _signed_linear(ctx: RuleContext, forward, x: Tensor, exact_where_cancelled: bool = False):
    """``x * L^T(R / stab(L(x)))``.  With ``exact_where_cancelled`` (non-negative coefficients),
    a group whose sum is 0 up to rounding and below eps (e.g. the sum of centred values) is split
    proportionally instead: its signed shares would cancel only in floating point further down
    (as for ``add="signed"``, :func:`.elementwise.split_sum`)."""
    z = forward(ctx.fn, x)
    zero = None
    if exact_where_cancelled:
        n = max(1, x.numel() // max(1, z.numel()))
        zero = cancelled(z, lambda: forward(ctx.fn, x.abs()), n, ctx.eps)
    if zero is None:
        return (x * _transpose(ctx, safe_divide(ctx.r, z, ctx.eps)),)
    nil = torch.zeros((), dtype=ctx.r.dtype, device=ctx.r.device)
    signed = x * _transpose(ctx, safe_divide(torch.where(zero, nil, ctx.r), z, ctx.eps))
    return (signed + _proportional_linear(ctx, forward, x, torch.where(zero, ctx.r, nil)),)


def signed_linear_map(forward):
    """Rule for ``z = forward(x)`` linear with coefficients of either sign: always the epsilon
    form ``R_x = x * L^T(R / stab(L(x)))``, whatever ``Rules.reduction`` says.

    The proportional form ``|x| * L^T(R / L(|x|))`` assumes non-negative coefficients: with a
    negative coefficient ``L(|x|)`` is no longer the sum of the magnitudes of the contributions
    (it can be 0 or negative while they are not) and an element's share can take the opposite
    sign of its contribution, so it is not a magnitude split at all.
    """

    def rule(ctx: RuleContext):
        return _signed_linear(ctx, forward, ctx.input_value(0))

    return rule


def _sum_dims(fn, x):
    dims = saved(fn, "_saved_dim") if hasattr(fn, "_saved_dim") else None
    if dims is None:  # full reduction
        return x.sum()
    return x.sum(list(dims), keepdim=saved(fn, "_saved_keepdim")) if len(dims) else x.sum()


def _mean_dims(fn, x):
    dims = saved(fn, "_saved_dim") if hasattr(fn, "_saved_dim") else None
    if dims is None:
        return x.mean()
    return x.mean(list(dims), keepdim=saved(fn, "_saved_keepdim")) if len(dims) else x.mean()


def _avg_pool(dim):
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dim]

    def forward(fn, x):
        kwargs = dict(
            kernel_size=saved(fn, "_saved_kernel_size"),
            stride=saved(fn, "_saved_stride"),
            padding=saved(fn, "_saved_padding"),
            ceil_mode=saved(fn, "_saved_ceil_mode"),
            count_include_pad=saved(fn, "_saved_count_include_pad"),
        )
        if dim > 1:
            kwargs["divisor_override"] = saved(fn, "_saved_divisor_override")
        return pool(x, **kwargs)

    return forward


def _adaptive_avg(dim):
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[dim]
    return lambda fn, x: pool(x, tuple(fn._input_metadata[0].shape)[-dim:])


def _upsample(op, scales: tuple[str, ...]):
    """``z = op(x, output_size, align_corners, *scales)``: the aten op autograd recorded, called
    with the node's saved arguments (what ``F.interpolate`` calls, so the replay is exact also
    when ``scale_factor`` was given and the saved scales, not the sizes, set the coordinates)."""

    def forward(fn, x):
        return op(
            x,
            list(saved(fn, "_saved_output_size")),
            saved(fn, "_saved_align_corners"),
            *(saved(fn, f"_saved_{s}") for s in scales),
        )

    return forward


_HW = ("scales_h", "scales_w")


def _upsample_entry(op, scales: tuple[str, ...], signed: bool = False) -> OpEntry:
    """Interpolation by the aten op ``op``: non-negative coefficients (``Rules.reduction``), or of
    either sign (bicubic: always the signed form, :func:`signed_linear_map`)."""
    forward = _upsample(op, scales)
    return _entry(forward, saved_self=False, rule=signed_linear_map(forward) if signed else None)


def _entry(forward, saved_self: bool, rule=None) -> OpEntry:
    return OpEntry(
        "reduction",
        rule or linear_reduction(forward),
        needs_values=not saved_self,
        saved_inputs={0: "_saved_self"} if saved_self else {},
        replay=lambda c: (forward(c.fn, c.inputs[0]),),
    )


# --- non-linear reductions: a non-negative weight per element of each group ----------------------


def _group_dims(fn, ndim: int) -> list[int]:
    """The reduced dimensions, non-negative; ``None`` or empty means all.  A 0-d input has no
    dimension to reduce (``dim=0`` or ``-1`` names the scalar itself): ``[]``, a group of one."""
    if ndim == 0:
        return []
    dims = saved(fn, "_saved_dim") if hasattr(fn, "_saved_dim") else None
    if dims is None:
        return list(range(ndim))
    if isinstance(dims, int):
        dims = (dims,)
    return sorted(d % ndim for d in dims) if len(dims) else list(range(ndim))


def _per_group(t: Tensor, dims: list[int]) -> Tensor:
    """``t`` summed over each group, keeping the reduced dimensions as size 1."""
    return t.sum(dims, keepdim=True) if dims else t


def _split_by_weight(w: Tensor, r: Tensor, dims: list[int]) -> Tensor:
    """``R_x = w * R / sum_G w`` (0 where ``sum_G w = 0``); ``r`` in the output's shape, with or
    without the reduced dimensions (same element order either way)."""
    den = _per_group(w, dims)
    r = r.reshape(den.shape)
    return w * ratio(r, den)


def _norm_weights(x: Tensor, p: float, dims: list[int]) -> Tensor:
    """``|x|^p`` up to a positive factor per group (scaled by the group's largest, or for
    ``p < 0`` smallest, magnitude so that large ``|p|`` neither overflows nor underflows)."""
    ax = x.abs()
    if p == 0:  # the count of non-zeros: one share each
        return (x != 0).to(x.dtype)
    if math.isinf(p):  # max (min) |x|: winner takes all, ties split evenly
        best = ax.amax(dims, keepdim=True) if p > 0 else ax.amin(dims, keepdim=True)
        return (ax == best).to(x.dtype)
    if p > 0:
        m = ax.amax(dims, keepdim=True)
        return ratio(ax, m) ** p
    m = ax.amin(dims, keepdim=True)  # p < 0: the smallest magnitudes dominate, a zero takes all
    return torch.where(m > 0, (ax / torch.where(m > 0, m, 1)) ** p, (ax == 0).to(x.dtype))


def norm_rule(ctx: RuleContext):
    """``z = ||x||_p`` over a group: ``R_x = R * |x|^p / sum_G |x|^p``, each element's share of
    the ``p``-th power sum.  ``p = inf`` (``-inf``): all to the element(s) of largest (smallest)
    magnitude, ties split evenly; ``p = 0``: evenly over the non-zero elements.  ``p`` is
    ``_saved_ord`` (``linalg.vector_norm``) or ``_saved_p`` (``torch.norm``, ``None`` for 2)."""
    x = ctx.input_value(0)
    dims = _group_dims(ctx.fn, x.dim())
    p = _norm_order(ctx.fn)
    return (_split_by_weight(_norm_weights(x, p, dims), ctx.r, dims),)


def dist_rule(ctx: RuleContext):
    """``z = dist(x, y, p) = ||x - y||_p``: the p-norm rule (:func:`norm_rule`) on the difference
    ``d = x - y``, ``R_d = R * |d|^p / sum |d|^p``, then each ``R_d`` split over the summands
    ``x`` and ``-y`` by the add rule (``Rules.add``): the map of ``vector_norm(x - y, p)``.  An
    operand that does not require grad (saved by the node all the same) absorbs its share."""
    from types import SimpleNamespace

    from .elementwise import split_sum

    x, y = torch.broadcast_tensors(ctx.input_value(0), ctx.input_value(1))
    d = x - y
    dims = list(range(d.dim()))
    r_d = _split_by_weight(_norm_weights(d, _norm_order(ctx.fn), dims), ctx.r, dims)
    # split_sum reads only the relevance and eps of its context
    shares = split_sum(SimpleNamespace(r=r_d, eps=ctx.eps), [x, -y], ctx.rules.add)
    outs = []
    for slot, rel in enumerate(shares):
        unrecorded = ctx.fn.next_functions[slot][0] is None
        outs.append(rel if unrecorded else sum_to_shape(rel, ctx.input_shape(slot)))
    return outs


def _difference_norm_shares(ctx: RuleContext, a: Tensor, b: Tensor, r: Tensor, p: float):
    """Shares of ``a`` and ``b`` (broadcast to one shape ``(..., M)``) in ``R`` of
    ``||a - b||_p`` over the last dimension: the p-norm rule on ``d = a - b``, then the add rule
    over ``a`` and ``-b`` (``Rules.add``), in the broadcast shape."""
    from types import SimpleNamespace

    from .elementwise import split_sum

    d = a - b
    dims = [d.dim() - 1]
    r_d = _split_by_weight(_norm_weights(d, p, dims), r, dims)
    # split_sum reads only the relevance and eps of its context
    return split_sum(SimpleNamespace(r=r_d, eps=ctx.eps), [a, -b], ctx.rules.add)


def cdist_rule(ctx: RuleContext):
    """``z_pr = ||x1_p - x2_r||_p`` (``cdist``): each pair as :func:`dist_rule`, the map of
    ``vector_norm(x1[..., :, None, :] - x2[..., None, :, :], p, dim=-1)``."""
    x1, x2 = ctx.input_value(0), ctx.input_value(1)
    a, b = torch.broadcast_tensors(x1.unsqueeze(-2), x2.unsqueeze(-3))
    ra, rb = _difference_norm_shares(ctx, a, b, ctx.r, _norm_order(ctx.fn))
    outs = []
    for slot, rel in ((0, ra.sum(-2)), (1, rb.sum(-3))):
        unrecorded = ctx.fn.next_functions[slot][0] is None  # absorbs its share
        outs.append(rel if unrecorded else sum_to_shape(rel, ctx.input_shape(slot)))
    return outs


def pdist_rule(ctx: RuleContext):
    """``z_k = ||x_i - x_j||_p`` over the pairs ``i < j`` (``pdist``, row-major): each pair as
    :func:`dist_rule`, the shares added back to the rows ``i`` and ``j``."""
    x = ctx.input_value(0)
    i, j = torch.triu_indices(x.shape[0], x.shape[0], 1, device=x.device)
    ra, rb = _difference_norm_shares(ctx, x[i], x[j], ctx.r, _norm_order(ctx.fn))
    return (torch.zeros_like(x).index_add_(0, i, ra).index_add_(0, j, rb),)


def _norm_order(fn) -> float:
    p = saved(fn, "_saved_ord") if hasattr(fn, "_saved_ord") else saved(fn, "_saved_p")
    return 2.0 if p is None else float(p)


def _centred_squares(x: Tensor, dims: list[int]) -> Tensor:
    return (x - x.mean(dims, keepdim=True) if dims else torch.zeros_like(x)) ** 2


def _mean_share(ctx: RuleContext, x: Tensor, r: Tensor, dims: list[int]) -> Tensor:
    """The mean's rule (as ``MeanBackward1``, per ``Rules.reduction``) for ``var_mean``'s mean."""
    if ctx.rules.reduction == "proportional":
        return _split_by_weight(x.abs(), r, dims)
    n = math.prod(x.shape[d] for d in dims)
    mean = _per_group(x, dims) / n
    return x * safe_divide(r.reshape(mean.shape), mean, ctx.eps) / n


def variance_rule(ctx: RuleContext):
    """``z = var(x)`` or ``std(x)`` over a group: ``R_x = R * (x - m)^2 / sum_G (x - m)^2`` with
    ``m = mean_G(x)`` (the correction does not matter).  For ``var_mean`` / ``std_mean`` the
    mean's relevance is added, split by the mean's own rule (``Rules.reduction``)."""
    x = ctx.input_value(0)
    dims = _group_dims(ctx.fn, x.dim())
    rx = _split_by_weight(_centred_squares(x, dims), ctx.relevance[0], dims)
    if len(ctx.relevance) > 1:
        rx = rx + _mean_share(ctx, x, ctx.relevance[1], dims)
    return (rx,)


def product_reduction_rule(ctx: RuleContext):
    """``z = prod_G x``: uniform rule, ``R_x = R / n`` for each of the ``n`` factors of its
    product (as for a product of data operands).  No forward value is needed."""
    shape = ctx.input_shape(0)
    dims = _group_dims(ctx.fn, len(shape))
    n = math.prod(shape[d] for d in dims)
    kept = [1 if d in dims else s for d, s in enumerate(shape)]
    return ((ctx.r.reshape(kept) / n).expand(shape).clone(),)


def cumprod_rule(ctx: RuleContext):
    """``z_k = prod_{j <= k} x_j`` along ``dim``: the uniform rule of a product over each prefix,
    the relevance of output ``k`` split equally over its ``k + 1`` factors (0-based), so
    ``R_x[j] = sum_{k >= j} R[k] / (k + 1)`` (as for ``prod``).  No forward value is needed."""
    r = ctx.r
    dim = ctx.saved("_saved_dim") % max(1, r.dim())
    if r.dim() == 0:
        return (r,)
    n = r.shape[dim]
    count = torch.arange(1, n + 1, dtype=r.dtype, device=r.device)
    count = count.reshape([n if d == dim else 1 for d in range(r.dim())])
    share = r / count
    return (share.flip(dim).cumsum(dim).flip(dim),)


def _moments(fn, x, op):
    dims = saved(fn, "_saved_dim")
    return op(
        x,
        None if dims is None else list(dims),
        correction=saved(fn, "_saved_correction"),
        keepdim=saved(fn, "_saved_keepdim"),
    )


def _moment_entry(op, result: str | None = None) -> OpEntry:
    def replay(c):
        out = _moments(c.fn, c.inputs[0], op)
        return out if isinstance(out, tuple) else (out,)

    return OpEntry(
        "reduction",
        variance_rule,
        saved_inputs={0: "_saved_self"},
        saved_outputs={0: result} if result else {},
        replay=replay,
    )


def _prod_replay(c):
    if not hasattr(c.fn, "_saved_dim"):
        return (torch.prod(c.inputs[0]),)
    return (torch.prod(c.inputs[0], c.saved("_saved_dim"), keepdim=c.saved("_saved_keepdim")),)


def _prod_entry() -> OpEntry:
    return OpEntry(
        "reduction",
        product_reduction_rule,
        saved_inputs={0: "_saved_self"},
        saved_outputs={0: "_saved_result"},
        replay=_prod_replay,
    )


def _nansum(fn, x):
    dims = saved(fn, "_saved_dim")
    if dims is None or not len(dims):
        return torch.nansum(x)
    return torch.nansum(x, list(dims), keepdim=saved(fn, "_saved_keepdim"))


def _nll(op):
    """``z = nll_loss(x, target, weight, reduction, ignore_index)``: ``-w_t x_t`` per sample
    (summed, or divided by the total weight for ``mean``), linear in ``x`` with coefficients
    ``<= 0``: the epsilon form :func:`signed_linear_map`."""

    def forward(fn, x):
        return op(
            x,
            saved(fn, "_saved_target"),
            saved(fn, "_saved_weight"),
            saved(fn, "_saved_reduction"),
            saved(fn, "_saved_ignore_index"),
        )

    return forward


def _norm_replay(c):
    x, p = c.inputs[0], _norm_order(c.fn)
    if not hasattr(c.fn, "_saved_dim"):
        return (torch.linalg.vector_norm(x, p),)
    return (torch.linalg.vector_norm(x, p, c.saved("_saved_dim"), c.saved("_saved_keepdim")),)


def _norm_entry() -> OpEntry:
    """``torch.norm(x, p[, dim, keepdim][, dtype])``: a vector p-norm (:func:`norm_rule`)."""
    return OpEntry(
        "reduction",
        norm_rule,
        saved_inputs={0: "_saved_self"},
        saved_outputs={0: "_saved_result"},
        replay=_norm_replay,
    )


# --- issue 14: log-sum-exp, renorm, sampling by a grid ----------------------------------------


def _lse_scale(ctx: RuleContext, z: Tensor) -> Tensor:
    """The factor ``S / stab(S)`` of the written-out ``log(sum(exp x))`` on the sum
    ``S = exp(z)`` of its exponentials: ``1`` under ``reduction="proportional"``, ``S / (S + eps)``
    under ``"signed"`` (``S > 0``), written ``sigmoid(z - log eps)`` so that neither ``exp(z)``
    nor ``exp(-z)`` is formed."""
    if ctx.rules.reduction == "proportional":
        return torch.ones_like(z)
    return torch.sigmoid(z - math.log(ctx.eps))


def logsumexp_rule(ctx: RuleContext):
    """``z = log(sum_G exp x)`` over a group: the map of its written-out spelling (``exp`` and
    ``log`` pass relevance on, the sum splits it by its terms ``e = exp x``): ``R_x = R * e /
    sum_G e = R * softmax_G(x)``, times ``S / stab(S)`` (``S = sum_G e``) under
    ``reduction="signed"``.  ``softmax_G(x) * g`` is the node's own backward of ``g``.
    ``logcumsumexp`` is the same over every prefix, ``R_x[j] = sum_{k >= j} R_k *
    exp(x_j - z_k)`` (times the factor of prefix ``k``), again the node's backward."""
    z = ctx.fn._saved_result
    return (_transpose(ctx, ctx.r * _lse_scale(ctx, z)),)


def _logsumexp_replay(c):
    dims = c.saved("_saved_dim")
    return (torch.logsumexp(c.inputs[0], list(dims), keepdim=c.saved("_saved_keepdim")),)


def renorm_rule(ctx: RuleContext):
    """``z = x * s`` per sub-tensor along ``dim``, ``s = maxnorm / ||x_sub||_p`` where the norm
    exceeds ``maxnorm`` (else ``s = 1``): ``s`` is a statistic of ``x`` (as a norm's
    ``rsqrt(var)``), so ``x`` takes all, ``R_x = R`` element by element."""
    return (ctx.r.reshape(ctx.input_shape(0)).clone(),)


def _renorm_replay(c):
    return (
        torch.renorm(
            c.inputs[0], c.saved("_saved_p"), c.saved("_saved_dim"), c.saved("_saved_maxnorm")
        ),
    )


def _grid_forward(op):
    def forward(fn, x):
        return op(
            x,
            fn._saved_grid,
            saved(fn, "_saved_interpolation_mode"),
            saved(fn, "_saved_padding_mode"),
            saved(fn, "_saved_align_corners"),
        )

    return forward


_BICUBIC = 2


def grid_sampler_rule(op):
    """``z = grid_sample(x, grid)``: for a fixed ``grid`` a linear map of ``x`` (each output
    element a weighted sum of input elements, the weights set by the grid): the linear-reduction
    rule through the node's backward, ``Rules.reduction`` for bilinear and nearest (coefficients
    ``>= 0``), the signed form for bicubic (coefficients of either sign).

    A grid that depends on a requested input is refused: it enters only through the interpolation
    weights and the positions read, a non-linear function of both operands that no rule of the
    table splits (neither a product of two data operands nor a selection by value)."""
    forward = _grid_forward(op)
    linear = linear_reduction(forward)
    signed = signed_linear_map(forward)

    def rule(ctx: RuleContext):
        fn = ctx.fn
        if fn.next_functions[1][0] is not None and ctx.data[1] and ctx.wanted[1]:
            raise UncoveredOpError(
                f"{fn.name()} (node {ctx.idx}): F.grid_sample with a grid that depends on a "
                "requested input. The output is linear in the sampled input only for a fixed "
                "grid; the grid enters through the interpolation weights and the positions read, "
                "and no rule splits relevance between it and the input. Pass grid.detach() to "
                "explain the sampled input with the grid held constant."
            )
        if fn.next_functions[0][0] is None:  # a constant input: its share is absorbed
            ctx.absorb(ctx.r)
            return (None, None)
        mode = saved(fn, "_saved_interpolation_mode")
        (rx,) = (signed if mode == _BICUBIC else linear)(ctx)
        return (rx, None)

    return rule


def _grid_entry(op) -> OpEntry:
    forward = _grid_forward(op)
    return OpEntry(
        "reduction",
        grid_sampler_rule(op),
        saved_inputs={0: "_saved_input", 1: "_saved_grid"},
        replay=lambda c: (forward(c.fn, c.inputs[0]),),
    )


TABLE = {
    "SumBackward0": _entry(lambda fn, x: x.sum(), saved_self=False),
    "SumBackward1": _entry(_sum_dims, saved_self=False),
    "MeanBackward0": _entry(lambda fn, x: x.mean(), saved_self=False),
    "MeanBackward1": _entry(_mean_dims, saved_self=False),
    "CumsumBackward0": _entry(
        lambda fn, x: torch.cumsum(x, saved(fn, "_saved_dim")), saved_self=False
    ),
    "AvgPool2DBackward0": _entry(_avg_pool(2), saved_self=True),
    "AvgPool3DBackward0": _entry(_avg_pool(3), saved_self=True),
    "AdaptiveAvgPool2DBackward0": _entry(_adaptive_avg(2), saved_self=True),
    "AdaptiveAvgPool3DBackward0": _entry(_adaptive_avg(3), saved_self=True),
    "LinalgVectorNormBackward0": OpEntry(
        "reduction",
        norm_rule,
        saved_inputs={0: "_saved_self"},
        saved_outputs={0: "_saved_result"},
        replay=lambda c: (
            torch.linalg.vector_norm(
                c.inputs[0],
                c.saved("_saved_ord"),
                c.saved("_saved_dim"),
                c.saved("_saved_keepdim"),
            ),
        ),
    ),
    "VarBackward0": _moment_entry(torch.var),
    "StdBackward0": _moment_entry(torch.std, "_saved_result"),
    "VarMeanBackward0": _moment_entry(torch.var_mean),
    "StdMeanBackward0": _moment_entry(torch.std_mean, "_saved_result0"),
    "ProdBackward0": _prod_entry(),
    "ProdBackward1": _prod_entry(),
    "CumprodBackward0": OpEntry(
        "reduction",
        cumprod_rule,
        saved_inputs={0: "_saved_self"},
        saved_outputs={0: "_saved_result"},
        replay=lambda c: (torch.cumprod(c.inputs[0], c.saved("_saved_dim")),),
    ),
    # --- census (issue 14): reductions found by benchmarks/census.py
    # trace = sum of the diagonal: linear, coefficients 1 (the backward scatters onto it)
    "TraceBackward0": _entry(lambda fn, x: torch.trace(x), saved_self=False),
    # nansum = sum of the non-NaN elements (an input to explain is finite: a plain sum there)
    "NansumBackward0": _entry(_nansum, saved_self=True),
    # torch.norm (aten::norm): the p-norm rule of linalg.vector_norm, p read from _saved_p
    "NormBackward0": _norm_entry(),
    "NormBackward1": _norm_entry(),
    "NormBackward2": _norm_entry(),
    "NormBackward3": _norm_entry(),
    "DistBackward0": OpEntry(
        "reduction",
        dist_rule,
        saved_inputs={0: "_saved_self", 1: "_saved_other"},
        saved_outputs={0: "_saved_result"},
        replay=lambda c: (torch.dist(c.inputs[0], c.inputs[1], _norm_order(c.fn)),),
    ),
    "CdistBackward0": OpEntry(
        "reduction",
        cdist_rule,
        saved_inputs={0: "_saved_x1", 1: "_saved_x2"},
        saved_outputs={0: "_saved_result"},
        replay=lambda c: (torch.cdist(c.inputs[0], c.inputs[1], _norm_order(c.fn)),),
    ),
    "PdistBackward0": OpEntry(
        "reduction",
        pdist_rule,
        saved_inputs={0: "_saved_self"},
        saved_outputs={0: "_saved_result"},
        replay=lambda c: (torch.nn.functional.pdist(c.inputs[0], _norm_order(c.fn)),),
    ),
    "NllLossBackward0": _entry(
        _nll(torch.ops.aten.nll_loss.default),
        saved_self=True,
        rule=signed_linear_map(_nll(torch.ops.aten.nll_loss.default)),
    ),
    "NllLoss2DBackward0": _entry(
        _nll(torch.ops.aten.nll_loss2d.default),
        saved_self=True,
        rule=signed_linear_map(_nll(torch.ops.aten.nll_loss2d.default)),
    ),
    # interpolation: linear maps with the coefficients of the aten op autograd recorded
    "UpsampleLinear1DBackward0": _upsample_entry(
        torch.ops.aten.upsample_linear1d.default, ("scales",)
    ),
    "UpsampleBilinear2DBackward0": _upsample_entry(torch.ops.aten.upsample_bilinear2d.default, _HW),
    "UpsampleTrilinear3DBackward0": _upsample_entry(
        torch.ops.aten.upsample_trilinear3d.default, ("scales_d", *_HW)
    ),
    "UpsampleBilinear2DAaBackward0": _upsample_entry(
        torch.ops.aten._upsample_bilinear2d_aa.default, _HW
    ),
    "UpsampleBicubic2DBackward0": _upsample_entry(
        torch.ops.aten.upsample_bicubic2d.default, _HW, signed=True
    ),
    "UpsampleBicubic2DAaBackward0": _upsample_entry(
        torch.ops.aten._upsample_bicubic2d_aa.default, _HW, signed=True
    ),
    # --- issue 14, docs/rules.md 2.20
    # log(sum(exp x)): R split by softmax over the reduced dims (the written-out map)
    "LogsumexpBackward0": OpEntry(
        "reduction",
        logsumexp_rule,
        saved_inputs={0: "_saved_self"},
        saved_outputs={0: "_saved_result"},
        replay=_logsumexp_replay,
    ),
    "LogcumsumexpBackward0": OpEntry(
        "reduction",
        logsumexp_rule,
        saved_inputs={0: "_saved_self"},
        saved_outputs={0: "_saved_result"},
        replay=lambda c: (torch.logcumsumexp(c.inputs[0], c.saved("_saved_dim")),),
    ),
    # x times a statistic of x per sub-tensor: x takes all
    "RenormBackward0": OpEntry(
        "reduction",
        renorm_rule,
        saved_inputs={0: "_saved_self"},
        replay=_renorm_replay,
    ),
    # linear in the input for a fixed grid
    "GridSampler2DBackward0": _grid_entry(torch.ops.aten.grid_sampler_2d.default),
    "GridSampler3DBackward0": _grid_entry(torch.ops.aten.grid_sampler_3d.default),
}
