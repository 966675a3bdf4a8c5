"""Extractive question answering: do the most relevant tokens fall in the answer span?

Paper, table A.3.  ``relevance`` is ``(N, T)`` token relevance, ``spans`` ``(N, 2)`` inclusive
``(start, end)`` token indices.  Pass the model's predicted spans for TPS (token-to-predicted-span)
and the gold spans for TGS (token-to-gold-span).  ``exclude`` (``(N, T)`` bool) marks tokens
whose relevance is set to ``-inf`` before ranking: the question tokens (as in the paper), special
tokens and padding.

Ranking: descending relevance, ties broken by token index (lower first, a stable sort).

Hit set ``S``: the span's tokens ``{start, ..., end}``, or with ``strict=True`` only its
boundary indices ``{start, end}`` (a single token when ``start == end``).  See
``docs/evaluation.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["span_iou", "top_k_in_span"]


def _ranked(
    relevance: Tensor, spans: Tensor, exclude: Tensor | None, strict: bool, who: str
) -> tuple[Tensor, Tensor]:
    """Token order (most relevant first, excluded tokens last) and the ``(N, T)`` hit set."""
    if relevance.dim() != 2:
        raise ValueError(f"{who}: relevance must be (N, T), got {tuple(relevance.shape)}")
    n, t = relevance.shape
    spans = torch.as_tensor(spans, device=relevance.device)
    if spans.shape != (n, 2) or spans.is_floating_point():
        raise ValueError(
            f"{who}: spans must be integer (N, 2) = {(n, 2)}, got {tuple(spans.shape)}"
        )
    start, end = spans[:, 0].long(), spans[:, 1].long()
    bad = (start < 0) | (end >= t) | (start > end)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()[:10]
        raise ValueError(
            f"{who}: spans of rows {rows} are not inclusive (start, end) with 0 <= start <= end "
            f"< T={t}; drop samples with invalid spans"
        )
    pos = torch.arange(t, device=relevance.device)[None]
    if strict:
        hit = (pos == start[:, None]) | (pos == end[:, None])
    else:
        hit = (pos >= start[:, None]) & (pos <= end[:, None])
    r = relevance.detach().double()
    if exclude is not None:
        if exclude.shape != (n, t) or exclude.dtype != torch.bool:
            raise ValueError(
                f"{who}: exclude must be a bool (N, T) = {(n, t)} tensor, got "
                f"{tuple(exclude.shape)} {exclude.dtype}"
            )
        exclude = exclude.to(r.device)
        clash = (exclude & hit).any(1)
        if bool(clash.any()):
            rows = clash.nonzero().flatten().tolist()[:10]
            raise ValueError(f"{who}: spans of rows {rows} contain excluded tokens")
        r = r.masked_fill(exclude, -torch.inf)
    if not bool(torch.isfinite(r[~exclude] if exclude is not None else r).all()):
        raise ValueError(f"{who}: relevance of non-excluded tokens is NaN or infinite")
    order = torch.sort(r, dim=1, descending=True, stable=True).indices
    return order, hit


def _available(exclude: Tensor | None, n: int, t: int) -> Tensor:
    return torch.full((n,), t) if exclude is None else (~exclude).sum(1).cpu()


def top_k_in_span(
    relevance: Tensor,
    spans: Tensor,
    *,
    k: int = 1,
    exclude: Tensor | None = None,
    strict: bool = False,
) -> Tensor:
    """Whether all ``k`` most relevant tokens are hits, ``(N,)`` bool.

    ``top-k(i) = [ {k most relevant non-excluded tokens of i} subset of S_i ]``: top-1 asks
    whether the single most relevant token is in the span, top-2 whether *both* of the two
    most relevant are.  The mean over samples is the accuracy.  With ``strict=True`` the hit set
    is ``{start, end}``; a one-token span then has one hit, so strict top-2 is False there.
    """
    who = "top_k_in_span"
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{who}: k must be a positive int, got {k!r}")
    order, hit = _ranked(relevance, spans, exclude, strict, who)
    n, t = relevance.shape
    short = _available(exclude, n, t) < k
    if bool(short.any()):
        rows = short.nonzero().flatten().tolist()[:10]
        raise ValueError(f"{who}: rows {rows} have fewer than k={k} tokens that are not excluded")
    return hit.gather(1, order[:, :k]).all(1)


def span_iou(
    relevance: Tensor,
    spans: Tensor,
    *,
    exclude: Tensor | None = None,
    strict: bool = False,
) -> Tensor:
    """Intersection over union of the ``L`` most relevant tokens and the hit set, ``(N,)``.

    ``L = |S|`` (the span length ``end - start + 1``; strict: 2, or 1 for a one-token span) and
    ``A`` the ``L`` most relevant non-excluded tokens: ``IoU = |A cap S| / |A cup S|
    = h / (2 L - h)`` with ``h = |A cap S|``.
    """
    who = "span_iou"
    order, hit = _ranked(relevance, spans, exclude, strict, who)
    n, t = relevance.shape
    size = hit.sum(1)
    short = _available(exclude, n, t) < size.cpu()
    if bool(short.any()):
        rows = short.nonzero().flatten().tolist()[:10]
        raise ValueError(f"{who}: rows {rows} have fewer non-excluded tokens than span tokens")
    in_top = torch.arange(t, device=order.device)[None] < size[:, None]
    h = (hit.gather(1, order) & in_top).sum(1).double()
    return h / (2 * size - h)
