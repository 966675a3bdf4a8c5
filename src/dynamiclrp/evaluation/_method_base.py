"""The base class and shared helpers of the attribution methods in :mod:`.methods`.

:class:`Method` checks what every method returns; :func:`data_stats` gives the data range and
standard deviation that set noise scales and box bounds from the task's data, never from the
batch; the private helpers make a fresh leaf, the one-hot seed of the explained logit, seeded
random state that is restored afterwards, and the expanding forward pass that Captum needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .task import Problem

FAMILIES = ("lrp", "gradient", "perturbation", "random")
STATS_SAMPLES = 256  # data_stats uses the first STATS_SAMPLES samples of a task


class Method:
    """An attribution method: ``method(problem) -> Tensor`` of ``problem.x``'s shape.

    Attributes
    ----------
    name:
        The row label for result tables (the spec it was made from unless ``name=`` was given).
    family:
        One of :data:`FAMILIES`.
    params:
        The hyperparameters that actually run (for reports).
    """

    def __init__(self, name: str, family: str, params: dict[str, Any] | None = None):
        if family not in FAMILIES:
            raise ValueError(f"Method {name!r}: family {family!r} is not one of {FAMILIES}")
        self.name = name
        self.family = family
        self.params = dict(params or {})

    def __call__(self, problem: Problem) -> Tensor:
        if not isinstance(problem.x, Tensor) or not problem.x.is_floating_point():
            raise TypeError(f"{self.name}: problem.x must be a float tensor, got {problem.x!r:.80}")
        rel = self._attribute(problem)
        if rel.shape != problem.x.shape:
            raise RuntimeError(
                f"{self.name} returned shape {tuple(rel.shape)} for x of shape "
                f"{tuple(problem.x.shape)}"
            )
        return rel.detach().to(dtype=problem.x.dtype)

    def _attribute(self, problem: Problem) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, family={self.family!r}, {self.params})"


# -- helpers ----------------------------------------------------------------------------------


def _leaf(problem: Problem) -> Tensor:
    """A fresh leaf copy of ``problem.x`` that requires grad (``problem.x`` stays untouched)."""
    return problem.x.detach().clone().requires_grad_(True)


def _onehot_seed(out: Tensor, target: Tensor) -> Tensor:
    """``seed[b, c] = out[b, c]`` if ``c == target[b]`` else 0 (the explained logit)."""
    if out.dim() != 2 or out.shape[0] != target.shape[0]:
        raise ValueError(
            f"forward(x) must be (batch, classes) with batch = len(target) = {target.shape[0]}, "
            f"got shape {tuple(out.shape)}"
        )
    seed = torch.zeros_like(out)
    rows = torch.arange(out.shape[0], device=out.device)
    tgt = target.to(out.device)
    seed[rows, tgt] = out.detach()[rows, tgt]
    return seed


def _need_model(problem: Problem, who: str) -> nn.Module:
    if problem.model is None:
        raise ValueError(f"{who} needs problem.model (the nn.Module that owns the parameters)")
    return problem.model


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch's and numpy's global generators for the block and restore their state afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    state = np.random.get_state()  # Captum's GradientShap draws from numpy's generator
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            np.random.seed(seed)
            yield
    finally:
        np.random.set_state(state)


def data_stats(problem: Problem, cache: dict | None = None) -> tuple[float, float, float]:
    """``(min, max, std)`` of the attributed tensor over the task's data.

    Computed from ``task.to_x(task.inputs[:STATS_SAMPLES])`` (chunks of 16 samples), so the
    value is the same for every batch of a task; a :class:`Problem` without ``task`` uses its
    own ``x``.  ``std`` is the population standard deviation of all entries.
    """
    task = problem.task
    if task is None:
        x = problem.x.detach().double()
        return x.min().item(), x.max().item(), x.std(unbiased=False).item()
    key = id(task)
    if cache is not None and key in cache and cache[key][0] is task:
        return cache[key][1]
    lo, hi, s1, s2, n = float("inf"), float("-inf"), 0.0, 0.0, 0
    inputs = task.inputs[:STATS_SAMPLES]
    with torch.no_grad():
        for i in range(0, inputs.shape[0], 16):
            x = task.to_x(inputs[i : i + 16]).double()
            lo, hi = min(lo, x.min().item()), max(hi, x.max().item())
            s1, s2, n = s1 + x.sum().item(), s2 + (x * x).sum().item(), n + x.numel()
    mean = s1 / n
    stats = (lo, hi, max(s2 / n - mean * mean, 0.0) ** 0.5)
    if cache is not None:
        cache[key] = (task, stats)
    return stats


def _expanding_forward(problem: Problem) -> Callable[[Tensor, Tensor], Tensor]:
    """``f(x_rows, rows)``: the scores of a batch whose row ``r`` is a copy of sample
    ``rows[r]`` of the problem (Captum repeats or interleaves the batch and expands
    ``additional_forward_args=(arange(B),)`` alike).  With a task, one call
    ``task.forward(x_rows, idx[rows])``; without, ``problem.forward`` on each block of rows that
    holds every sample once in order."""
    batch = problem.x.shape[0]
    task, idx = problem.task, problem.idx

    def forward(x_rows: Tensor, rows: Tensor) -> Tensor:
        rows = rows.to("cpu")
        if rows.shape[0] == batch and torch.equal(rows, torch.arange(batch)):
            return problem.forward(x_rows)
        if task is not None and idx is not None:
            return task.forward(x_rows, idx[rows])
        counts = torch.bincount(rows, minlength=batch)
        if rows.shape[0] % batch or (counts != rows.shape[0] // batch).any():
            raise RuntimeError(
                f"cannot split an expanded batch of {rows.shape[0]} rows into copies of the "
                f"{batch} samples; give the Problem a task and idx"
            )
        order = torch.argsort(rows * rows.shape[0] + torch.arange(rows.shape[0]))
        copies = order.view(batch, -1).T  # copies[k, b]: the k-th row holding sample b
        out = torch.cat([problem.forward(x_rows[c.to(x_rows.device)]) for c in copies])
        inv = torch.empty_like(order)
        inv[copies.reshape(-1)] = torch.arange(rows.shape[0])
        return out[inv.to(out.device)]

    return forward
