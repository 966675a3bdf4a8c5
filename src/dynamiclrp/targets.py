"""Seed relevance at the output: the explained quantity."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import TargetError
from .validation import show

TARGET_FORMS = "None, an int class index, a list of ints (one per row) or a 1-D integer tensor"


def make_seed(output: Tensor, target=None, relevance: Tensor | None = None) -> Tensor:
    """The relevance placed on ``output`` before propagation.

    - ``relevance`` given: used as is (must have the output's shape, finite values; it is moved to
      the output's dtype and device).
    - ``target=None``: the output itself.
    - 2-D output ``(batch, classes)`` and ``target=k`` (an int, a NumPy integer or a 0-d integer
      tensor): the output's value at class ``k`` in every row, zero elsewhere; a sequence, 1-D
      integer tensor or 1-D NumPy integer array of length ``batch``: one class per row.

    The seed must be finite (an Inf logit at the target class raises :class:`TargetError`).
    """
    out = output.detach()
    if relevance is not None:
        return _relevance_seed(out, target, relevance)
    if target is None:
        seed = out.clone()
    else:
        seed = _target_seed(out, target)
    _check_finite_seed(seed, out, target)
    return seed


def _relevance_seed(out: Tensor, target, relevance) -> Tensor:
    if target is not None:
        raise TargetError(
            "Pass either target= or relevance=, not both: target=k seeds the output's value at "
            "class k; relevance= is the full seed itself (then leave target=None)."
        )
    if not isinstance(relevance, Tensor):
        raise TargetError(
            f"relevance= must be a tensor of the output's shape {tuple(out.shape)}, got "
            f"{show(relevance)}: convert it, e.g. relevance=torch.as_tensor(r)."
        )
    if relevance.shape != out.shape:
        raise TargetError(
            f"relevance= has shape {tuple(relevance.shape)} but the output has shape "
            f"{tuple(out.shape)}; the seed must match the output exactly (no broadcasting): "
            "expand it first, e.g. r.expand_as(output).clone()."
        )
    if relevance.is_complex():
        raise TargetError(f"relevance= has complex dtype {relevance.dtype}: pass a real seed.")
    seed = relevance.detach().to(dtype=out.dtype, device=out.device)
    bad = ~torch.isfinite(seed)
    if bad.any():
        raise TargetError(
            f"relevance= has {int(bad.sum())} NaN or Inf value(s) (first at index "
            f"{tuple(bad.nonzero()[0].tolist())}): the seed must be finite; fix it (e.g. "
            "torch.nan_to_num) before calling explain()."
        )
    return seed


def _target_seed(out: Tensor, target) -> Tensor:
    if out.dim() != 2:
        raise TargetError(
            f"target= selects a class per batch row and needs a 2-D (batch, classes) output; this "
            f"output has shape {tuple(out.shape)}. Slice the output first (e.g. logits[:, -1] for "
            "a language model's next token, logits.flatten(1), or output.unsqueeze(0) for one "
            "unbatched sample), or pass relevance= with a seed of the output's shape."
        )
    batch, classes = out.shape
    rows = _target_rows(target, batch)
    if rows.numel() and (rows.min() < -classes or rows.max() >= classes):
        wrong = rows[(rows < -classes) | (rows >= classes)]
        raise TargetError(
            f"target= {_listing(wrong)} is out of range for an output with {classes} classes "
            f"(shape {tuple(out.shape)}): use 0..{classes - 1}, or -{classes}..-1 from the end. "
            "Is the output the one you meant (e.g. the logits, not a hidden state)?"
        )
    rows = rows.to(out.device) % classes
    seed = torch.zeros_like(out)
    ar = torch.arange(batch, device=out.device)
    seed[ar, rows] = out[ar, rows]
    return seed


def _listing(t: Tensor) -> str:
    values = t.unique().tolist()
    if len(values) == 1:
        return str(values[0])
    return "[" + ", ".join(map(str, values[:8])) + ", ..." * (len(values) > 8) + "]"


def _target_rows(target, batch: int) -> Tensor:
    if isinstance(target, bool) or (isinstance(target, Tensor) and target.dtype == torch.bool):
        raise TargetError(
            f"target= must be an int class index, not a bool (got {target!r}): pass the class "
            "as an int, e.g. target=1."
        )
    if not isinstance(target, Tensor) and hasattr(target, "__array__"):
        target = torch.as_tensor(target)  # a NumPy integer or integer array
    if isinstance(target, Tensor):
        return _tensor_rows(target, batch)
    if hasattr(target, "__index__"):
        return torch.full((batch,), target.__index__(), dtype=torch.long)
    if isinstance(target, float):
        hint = f" (target={int(target)})" if target.is_integer() else ""
        raise TargetError(
            f"target= must be {TARGET_FORMS}, got the float {target!r}: class indices are "
            f"ints{hint}."
        )
    if isinstance(target, str):
        raise TargetError(
            f"target= must be {TARGET_FORMS}, got the string {target!r}: map the label to its "
            "index first, e.g. target=model.config.label2id[label]."
        )
    if isinstance(target, Sequence):
        bad = [t for t in target if isinstance(t, bool) or not hasattr(t, "__index__")]
        if bad:
            raise TargetError(
                f"target= list must hold int class indices, one per batch row; it holds "
                f"{show(bad[0])}: convert the entries to int."
            )
        rows = torch.tensor([t.__index__() for t in target], dtype=torch.long)
    else:
        raise TargetError(f"target= must be {TARGET_FORMS}, got {show(target)}.")
    return _check_length(rows, batch)


def _tensor_rows(target: Tensor, batch: int) -> Tensor:
    if target.is_floating_point() or target.is_complex():
        raise TargetError(
            f"target= must be a 1-D integer tensor (one class per row), got dtype {target.dtype}: "
            "pass target.long() (logits.argmax(1) is already an integer tensor)."
        )
    if target.dim() == 0:
        return torch.full((batch,), int(target), dtype=torch.long)
    if target.dim() != 1:
        raise TargetError(
            f"target= must be a 1-D integer tensor with one class per row ({batch} rows), got "
            f"shape {tuple(target.shape)}: flatten it, e.g. target.view(-1)."
        )
    return _check_length(target.detach().long().cpu(), batch)


def _check_length(rows: Tensor, batch: int) -> Tensor:
    if rows.numel() != batch:
        raise TargetError(
            f"target= has {rows.numel()} entries but the output has {batch} rows: give one class "
            "per batch row, or a single int for all rows."
        )
    return rows


def _check_finite_seed(seed: Tensor, out: Tensor, target) -> None:
    bad = ~torch.isfinite(seed)
    if not bad.any():
        return
    first = tuple(bad.nonzero()[0].tolist())
    what = "the output" if target is None else "the output at the target class"
    raise TargetError(
        f"The seed is not finite: {what} holds {int(bad.sum())} NaN or Inf value(s) (first at index "
        f"{first}, value {out[first].item()}), and an infinite quantity cannot be explained. "
        "Explain a finite quantity: pick another target, or the scores before masking/overflow "
        "(for float16 overflow, run in float32)."
    )
