"""Seed relevance at the output: the explained quantity."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import TargetError


def make_seed(output: Tensor, target=None, relevance: Tensor | None = None) -> Tensor:
    """The relevance placed on ``output`` before propagation.

    - ``relevance`` given: used as is (must have the output's shape).
    - ``target=None``: the output itself.
    - 2-D output ``(batch, classes)`` and ``target=k``: the output's value at class ``k`` in every
      row, zero elsewhere; a sequence or 1-D integer tensor of length ``batch``: one class per row.
    """
    out = output.detach()
    if relevance is not None:
        if target is not None:
            raise TargetError("Pass either target= or relevance=, not both.")
        if not isinstance(relevance, Tensor):
            raise TargetError(f"relevance= must be a tensor, got {type(relevance).__name__}")
        if relevance.shape != out.shape:
            raise TargetError(
                f"relevance= has shape {tuple(relevance.shape)} but the output has shape "
                f"{tuple(out.shape)}; the seed must match the output exactly."
            )
        return relevance.detach().to(dtype=out.dtype, device=out.device)
    if target is None:
        return out.clone()
    if out.dim() != 2:
        raise TargetError(
            f"target= selects a class per batch row and needs a 2-D (batch, classes) output; this "
            f"output has shape {tuple(out.shape)}. Slice the output first (e.g. logits[:, -1] for "
            "a language model's next token, or logits.flatten(1)), or pass relevance= with a seed "
            "of the output's shape."
        )
    batch, classes = out.shape
    rows = _target_rows(target, batch)
    if rows.numel() and (rows.min() < -classes or rows.max() >= classes):
        raise TargetError(
            f"target {rows.tolist() if rows.numel() <= 16 else '...'} is out of range for "
            f"{classes} classes (valid: 0..{classes - 1}, or negative from the end)."
        )
    rows = rows.to(out.device) % classes
    seed = torch.zeros_like(out)
    ar = torch.arange(batch, device=out.device)
    seed[ar, rows] = out[ar, rows]
    return seed


def _target_rows(target, batch: int) -> Tensor:
    if isinstance(target, bool):
        raise TargetError("target= must be an int class index or one index per row, not a bool.")
    if isinstance(target, int):
        return torch.full((batch,), target, dtype=torch.long)
    if isinstance(target, Tensor):
        if target.dim() == 0 and not target.is_floating_point() and target.dtype != torch.bool:
            return torch.full((batch,), int(target), dtype=torch.long)
        if target.dim() != 1 or target.is_floating_point() or target.dtype == torch.bool:
            raise TargetError(
                f"target= tensor must be a 1-D integer tensor of length {batch}, got dtype "
                f"{target.dtype} and shape {tuple(target.shape)}."
            )
        rows = target.detach().long().cpu()
    elif isinstance(target, Sequence) and not isinstance(target, str):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in target):
            raise TargetError("target= sequence must hold int class indices, one per batch row.")
        rows = torch.tensor(list(target), dtype=torch.long)
    else:
        raise TargetError(
            f"target= must be None, an int, a sequence of ints or a 1-D integer tensor, got "
            f"{type(target).__name__}."
        )
    if rows.numel() != batch:
        raise TargetError(
            f"target= has {rows.numel()} entries but the output has {batch} rows: give one class "
            "per batch row, or a single int for all rows."
        )
    return rows
