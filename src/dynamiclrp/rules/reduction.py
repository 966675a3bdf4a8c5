"""Linear reductions: sum, mean, cumsum, average pooling.

Each is a linear map ``z = L(x)`` with non-negative coefficients; ``L^T`` is the node's own backward.
Preset ``reduction="proportional"`` (like add): ``R_x = |x| * L^T(R / L(|x|))``, each element's share
of a group proportional to its magnitude (zero where the whole group is zero).
``reduction="signed"`` (epsilon): ``R_x = x * L^T(R / stab(L(x)))``.
(Max-type reductions route to the winner: see :mod:`.routing`.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import OpEntry, RuleContext, saved
from .linear import stabilize


def _transpose(ctx: RuleContext, g):
    out = ctx.fn(g)
    return out[0] if isinstance(out, tuple) else out


def linear_reduction(forward):
    """Rule for ``z = forward(x)`` linear with non-negative coefficients (module docstring)."""

    def rule(ctx: RuleContext):
        x = ctx.input_value(0)
        r = ctx.r
        if ctx.rules.reduction == "proportional":
            ax = x.abs()
            den = forward(ctx.fn, ax)
            g = torch.where(den > 0, r / torch.where(den > 0, den, 1), 0)
            return (ax * _transpose(ctx, g),)
        g = r / stabilize(forward(ctx.fn, x), ctx.eps)
        return (x * _transpose(ctx, g),)

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


def _entry(forward, saved_self: bool) -> OpEntry:
    return OpEntry(
        "reduction",
        linear_reduction(forward),
        needs_values=not saved_self,
        saved_inputs={0: "_saved_self"} if saved_self else {},
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
}
