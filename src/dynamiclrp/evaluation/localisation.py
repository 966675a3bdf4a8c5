"""Localisation of relevance in a ground-truth mask (Arras et al. 2022, CLEVR-XAI).

Every function takes ``relevance`` and a bool ``mask`` of the same shape ``(N, H, W)`` or
``(N, T)`` (any ``(N, ...)``; all dimensions after the first are flattened) and returns one value
per sample, ``(N,)`` float64.  An optional bool ``rankable`` of the same shape removes features
(padding, special tokens) from the metric altogether.  See ``docs/evaluation.md``.

Definitions, with ``GT`` the mask and ``R^+ = max(R, 0)``::

    mass accuracy  = sum_{p in GT} R^+_p / sum_p R^+_p          (NaN if no relevance is positive)
    rank accuracy  = |top_K(R) cap GT| / K,    K = |GT|          (ties: expected value)
    pointing game  = [argmax_p R_p in GT]                          (ties: expected value)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy"]


def _prepare(
    relevance: Tensor, mask: Tensor, rankable: Tensor | None, who: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Flatten to ``(N, F)`` float64 relevance, bool mask and bool rankable, and validate."""
    if relevance.dim() < 2:
        raise ValueError(
            f"{who}: relevance must be (N, ...) with N samples, got {tuple(relevance.shape)}"
        )
    if mask.shape != relevance.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"{who}: mask must be a bool tensor of relevance's shape {tuple(relevance.shape)}, "
            f"got {tuple(mask.shape)} {mask.dtype}"
        )
    n = relevance.shape[0]
    r = relevance.detach().reshape(n, -1).double()
    m = mask.reshape(n, -1)
    if rankable is None:
        ok = torch.ones_like(m)
    else:
        if rankable.shape != relevance.shape or rankable.dtype != torch.bool:
            raise ValueError(
                f"{who}: rankable must be a bool tensor of relevance's shape "
                f"{tuple(relevance.shape)}, got {tuple(rankable.shape)} {rankable.dtype}"
            )
        ok = rankable.reshape(n, -1).to(m.device)
        outside = (m & ~ok).any(1)
        if bool(outside.any()):
            rows = outside.nonzero().flatten().tolist()[:10]
            raise ValueError(f"{who}: the mask marks features that are not rankable in rows {rows}")
    bad = ok & ~torch.isfinite(r)
    if bool(bad.any()):
        rows = bad.any(1).nonzero().flatten().tolist()[:10]
        raise ValueError(f"{who}: relevance is NaN or infinite in rows {rows}")
    empty = ~m.any(1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()[:10]
        raise ValueError(
            f"{who}: the ground-truth mask is empty in rows {rows}; the metric is undefined "
            "there, drop those samples"
        )
    return r, m, ok


def relevance_mass_accuracy(
    relevance: Tensor, mask: Tensor, *, rankable: Tensor | None = None
) -> Tensor:
    """Share of the positive relevance that lies inside the mask.

    ``mass = sum_{p in GT} max(R_p, 0) / sum_p max(R_p, 0)`` per sample, in ``[0, 1]``.

    A sample whose relevance has no positive value (all zero or negative) gets **NaN**: the
    share is 0/0, undefined, and neither 0 nor 1 would be honest.  Aggregate with
    ``torch.nanmean`` and report how many samples were NaN.
    """
    r, m, ok = _prepare(relevance, mask, rankable, "relevance_mass_accuracy")
    pos = torch.where(ok, r.clamp(min=0), torch.zeros_like(r))
    total = pos.sum(1)
    inside = (pos * m).sum(1)
    return torch.where(total > 0, inside / total, torch.full_like(total, float("nan")))


def relevance_rank_accuracy(
    relevance: Tensor, mask: Tensor, *, rankable: Tensor | None = None
) -> Tensor:
    """Fraction of the ``K = |GT|`` most relevant features that lie inside the mask.

    Ties at the ``K``-th value are resolved by their expectation under a uniformly random
    order: with ``v`` the ``K``-th largest value, ``A = {p : R_p > v}`` and ``E = {p : R_p =
    v}``, ``rank = (|A cap GT| + (K - |A|) |E cap GT| / |E|) / K``.  (All-equal relevance thus
    scores the chance level ``|GT| / F``.)  Features with ``rankable == False`` are not ranked.
    """
    r, m, ok = _prepare(relevance, mask, rankable, "relevance_rank_accuracy")
    r = torch.where(ok, r, torch.full_like(r, -torch.inf))
    k = m.sum(1)
    v = torch.sort(r, dim=1, descending=True).values.gather(1, (k - 1)[:, None])
    above, tied = r > v, (r == v) & ok
    n_above = above.sum(1)
    hits = (above & m).sum(1) + (k - n_above) * (tied & m).sum(1) / tied.sum(1)
    return hits.double() / k


def pointing_game(relevance: Tensor, mask: Tensor, *, rankable: Tensor | None = None) -> Tensor:
    """Whether the most relevant feature lies inside the mask: 1.0 or 0.0 per sample.

    If several features share the maximum, the value is the fraction of them inside the mask
    (the expected hit under uniformly random tie-breaking), so ties neither reward nor
    penalise a method.  Features with ``rankable == False`` are not considered.
    """
    r, m, ok = _prepare(relevance, mask, rankable, "pointing_game")
    r = torch.where(ok, r, torch.full_like(r, -torch.inf))
    top = (r == r.amax(1, keepdim=True)) & ok
    return (top & m).sum(1).double() / top.sum(1)
