"""Softmax, log-softmax and fused scaled-dot-product attention.

Softmax ``s = softmax(x)`` (AttnLRP, Prop. 3.1): ``R_x = x * (R - s * sum(R))`` along the softmax
dimension, with ``x`` the logits recovered through a promise.  Masked logits (``-inf``) get zero,
never NaN (``-inf * 0``), whatever the mask's shape: nothing is assumed about causality.

Log-softmax ``y = x - logsumexp(x)``, the same first-order rule normalised by the output:
``R_x = x * (R / stab(y) - s * sum(R / stab(y)))`` with ``s = exp(y)``.

Scaled-dot-product attention (every fused node: CPU flash, CUDA flash, efficient, cuDNN) is
decomposed into its three steps and the rules above:
``S = scale * q k^T + mask`` (bilinear uniform rule; a float mask takes its share of the add as
``Rules.add`` says, as on PyTorch's math path, and absorbs it),
``P = softmax(S)`` (softmax rule), ``O = P v`` (bilinear uniform rule).  Grouped-query attention
(fewer key/value heads) is expanded for the computation and summed back.  With
``Rules.attention = "cp"`` (CP-LRP) ``P`` is a constant: ``R_v = v * P^T (R / stab(P v))``, and
``q``, ``k`` and the mask get nothing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import OpEntry, RuleContext, ratio, saved
from .linear import Epsilon, LinearMap, fits, safe_divide

#: ``O = P v`` as a contraction of the data ``v`` with the constant ``P`` (``forward(v, P)``)
_P_TIMES_V = LinearMap(
    forward=lambda v, p: p @ v,
    vjp_x=lambda g, v, p: p.transpose(-1, -2) @ g,
    vjp_w=lambda g, v, p: g @ v.transpose(-1, -2),
)


def softmax_relevance(x: Tensor, s: Tensor, r: Tensor, dim: int, masked: bool | None = None):
    """``x * (R - s * sum(R))`` with ``-inf`` logits contributing zero.

    ``masked``: whether ``x`` may hold ``-inf`` (``None``: look; on the CPU the mask is only
    built when there is one, on a GPU that test would synchronise)."""
    out = s * r.sum(dim, keepdim=True)
    out = torch.sub(r, out, out=out) if fits(out, r) else r - out
    out = out.mul_(x) if fits(out, x) else x * out
    neg = _neginf(x, masked)
    return out if neg is None else out.masked_fill_(neg, 0.0)


def _neginf(x: Tensor, masked: bool | None) -> Tensor | None:
    """Where ``x`` is ``-inf``, or ``None`` when it is known to hold none."""
    if masked is False:
        return None
    if masked is None and x.device.type == "cpu" and not bool(torch.isneginf(x).any()):
        return None
    return torch.isneginf(x)


def _softmax(ctx: RuleContext):
    x = ctx.input_value(0)
    s = ctx.fn._saved_result
    return (softmax_relevance(x, s.to(x.dtype), ctx.r, saved(ctx.fn, "_saved_dim")),)


def _log_softmax(ctx: RuleContext):
    x = ctx.input_value(0)
    y = ctx.fn._saved_result
    g = safe_divide(ctx.r, y, ctx.eps)
    dim = saved(ctx.fn, "_saved_dim")
    out = x * (g - y.exp() * g.sum(dim, keepdim=True))
    return (torch.where(torch.isneginf(x), 0.0, out).to(out.dtype),)


def _first(fn, *names):
    for n in names:
        if hasattr(fn, n):
            return getattr(fn, n)
    return None


def sdpa_relevance(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    r: Tensor,
    mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    eps: float,
    cp: bool = False,
    out: Tensor | None = None,
    add: str = "signed",
    data: tuple[bool, bool, bool] = (True, True, True),
    dense=None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Relevance of ``q, k, v`` (and of an additive float mask, ``None`` otherwise) for
    ``O = softmax(scale q k^T + mask) v`` (module docstring).  ``cp`` (CP-LRP): ``P`` is a
    constant, ``R_v = v * P^T (R / stab(P v))`` and ``q``, ``k``, the mask get nothing.
    ``add`` (``Rules.add``) splits ``R_S`` of ``S = x + mask`` (``x = scale q k^T``) as every
    other add: ``"signed"`` like a bias of the product (``R_x = x R_S / stab(S)``),
    ``"proportional"`` by magnitude (``R_x = |x| R_S / (|x| + |mask|)``, then over
    ``stab(x)``), as the math path's separate add does.

    ``data``: whether ``q``, ``k``, ``v`` are data (a path from a data or requested input reaches
    them).  The uniform rule halves a product's relevance only between two data factors, as for
    the written-out ``softmax(q k^T) v``: with ``q`` and ``k`` constant, ``P`` is a constant and
    ``v`` takes all of ``R_O``, by the contraction rule ``dense`` (the preset's rule for a layer
    with a constant weight, ``P``; the epsilon rule when ``None``); with ``v`` constant, ``P``
    takes all of it; of ``q k^T`` with one constant factor, the other takes all of ``R_S``."""
    dq, dk, dv = data
    constant_p = not (dq or dk)
    cp = cp or constant_p
    hq, hk = q.shape[-3] if q.dim() > 2 else 1, k.shape[-3] if k.dim() > 2 else 1
    groups = hq // hk
    if groups > 1:
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s_full = (q @ k.transpose(-1, -2)).mul_(scale)
    by_magnitude = add == "proportional" and mask is not None and mask.dtype != torch.bool
    x = s_full if by_magnitude else None  # the product before the mask (masking makes copies)
    lq, lk = q.shape[-2], k.shape[-2]
    if is_causal:
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()  # top-left, as SDPA
        s_full = s_full.masked_fill(~keep, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            s_full = s_full.masked_fill(~mask, float("-inf"))
        else:
            s_full = s_full + mask
    # -inf only where a mask put it (or a float mask holds it): found once, used three times
    neg = _neginf(s_full, None) if (is_causal or mask is not None) else None
    p = torch.softmax(s_full, dim=-1)
    if neg is not None:
        # A query row whose keys are all masked (a padded position) attends to nothing: torch's
        # SDPA returns 0 there, the plain softmax NaN.
        p = p.masked_fill_(neg.all(-1, keepdim=True), 0.0)
    # O = P v: uniform bilinear rule (O is the node's saved output when given)
    g = safe_divide(r, p @ v if out is None else out, eps)
    if cp:  # CP-LRP: P is a constant, O = P v a linear map of v (epsilon rule)
        if constant_p and dense is not None and not isinstance(dense, Epsilon):
            r_v = dense(_P_TIMES_V, v, p, None, r, eps).x  # P a weight: the preset's layer rule
        else:
            r_v = v * (p.transpose(-1, -2) @ g)
        if groups > 1:
            r_v = r_v.reshape(r_v.shape[:-3] + (hk, groups) + r_v.shape[-2:]).sum(-3)
        return None, None, r_v, None
    r_v = None
    if dv:
        g = g * 0.5  # each factor's half, applied on the small (L, d) side
        r_v = v * (p.transpose(-1, -2) @ g)
    r_p = (g @ v.transpose(-1, -2)).mul_(p)
    # P = softmax(S)
    r_s = softmax_relevance(s_full, p, r_p, -1, masked=neg is not None)
    # S = scale q k^T + mask: uniform bilinear rule on the product, the mask absorbs its share
    r_mask = None
    if by_magnitude:
        ax = x.abs()
        den = ax + mask.abs()
        r_x = r_s * ratio(ax, den)  # 0 where both are 0, and where the mask is -inf
        r_mask = r_s - r_x
        g_s = safe_divide(r_x, x, eps)
    else:
        g_s = safe_divide(r_s, s_full, eps)
    if neg is not None:
        g_s = g_s.masked_fill_(neg, 0.0)
    if mask is not None and mask.dtype != torch.bool and not by_magnitude:
        r_mask = mask * g_s
    if r_mask is not None and neg is not None:
        r_mask = r_mask.masked_fill_(neg, 0.0)
    half = 0.5 * scale if dq and dk else scale
    r_q = (g_s @ k).mul_(q).mul_(half) if dq else None
    r_k = (g_s.transpose(-1, -2) @ q).mul_(k).mul_(half) if dk else None
    if groups > 1:
        shape = k.shape[:-3] + (hk, groups) + k.shape[-2:]
        r_k = None if r_k is None else r_k.reshape(shape).sum(-3)
        r_v = None if r_v is None else r_v.reshape(shape).sum(-3)
    return r_q, r_k, r_v, r_mask


def _sdpa(ctx: RuleContext):
    fn = ctx.fn
    q, k, v = ctx.input_value(0), ctx.input_value(1), ctx.input_value(2)
    mask = _first(fn, "_saved_attn_mask", "_saved_attn_bias")
    is_causal = bool(_first(fn, "_saved_is_causal") or False)
    scale = _first(fn, "_saved_scale")
    dropout = _first(fn, "_saved_dropout_p") or 0.0
    if dropout:
        raise NotImplementedError(
            f"{fn.name()} (node {ctx.idx}) ran with dropout_p={dropout}: attention dropout is "
            "random and cannot be replayed. Explain the model in eval mode (model.eval())."
        )
    cp = ctx.rules.attention == "cp"
    out = ctx.known_output()
    if out is not None and out.shape != ctx.r.shape:
        out = None
    rq, rk, rv, r_mask = sdpa_relevance(
        q,
        k,
        v,
        ctx.r,
        mask,
        is_causal,
        scale,
        ctx.eps,
        cp,
        out=out,
        add=ctx.rules.add,
        data=(ctx.data[0], ctx.data[1], ctx.data[2]),
        dense=None if ctx.data[0] or ctx.data[1] else ctx.layer_rule("dense"),
    )
    outs = [rq, rk, rv] + [None] * (ctx.n_inputs() - 3)
    if r_mask is not None:
        if ctx.n_inputs() > 3 and ctx.fn.next_functions[3][0] is not None:
            outs[3] = r_mask.sum_to_size(ctx.input_shape(3))  # a mask in the graph: its input
        else:
            ctx.absorb(r_mask)
    return outs


def _sdpa_entry() -> OpEntry:
    return OpEntry(
        "attention",
        _sdpa,
        saved_inputs={0: "_saved_query", 1: "_saved_key", 2: "_saved_value"},
        saved_outputs={0: "_saved_output"},
    )


TABLE = {
    "SoftmaxBackward0": OpEntry(
        "softmax",
        _softmax,
        needs_values=True,
        saved_outputs={0: "_saved_result"},
        replay=lambda c: (torch.softmax(c.inputs[0], c.saved("_saved_dim")),),
        probabilities=True,
    ),
    "SafeSoftmaxBackward0": OpEntry(
        "softmax",
        _softmax,
        needs_values=True,
        saved_outputs={0: "_saved_result"},
        probabilities=True,
    ),
    "LogSoftmaxBackward0": OpEntry(
        "softmax",
        _log_softmax,
        needs_values=True,
        saved_outputs={0: "_saved_result"},
        replay=lambda c: (torch.log_softmax(c.inputs[0], c.saved("_saved_dim")),),
    ),
    # the fused kernels of scaled_dot_product_attention
    "ScaledDotProductFlashAttentionForCpuBackward0": _sdpa_entry(),
    "ScaledDotProductFlashAttentionBackward0": _sdpa_entry(),
    "ScaledDotProductEfficientAttentionBackward0": _sdpa_entry(),
    "ScaledDotProductCudnnAttentionBackward0": _sdpa_entry(),
    "ScaledDotProductFusedAttentionOverrideableBackward0": _sdpa_entry(),
}

#: the nodes of SDPA's fused kernels; its C++ math path records separate ops instead
FUSED_SDPA_NODES = tuple(name for name, entry in TABLE.items() if entry.rule is _sdpa)
