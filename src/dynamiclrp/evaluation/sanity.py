"""Cascading model-parameter randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps").

The layers of a copy of the model are re-initialised one after another, from the output towards
the input; after each one the attribution is recomputed and compared with the attribution of the
trained model by Spearman rank correlation, per sample.  An attribution that depends on what the
model learned decorrelates; one that does not (an edge detector) stays near 1.
See ``docs/evaluation.md``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["RandomisationResult", "parameter_randomisation", "spearman"]


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..F along the last dimension, ties given the mean of the ranks they span."""
    f = x.shape[-1]
    sorted_x, order = torch.sort(x, dim=-1, stable=True)
    new_group = torch.ones_like(sorted_x, dtype=torch.bool)
    new_group[..., 1:] = sorted_x[..., 1:] != sorted_x[..., :-1]
    group = new_group.long().cumsum(-1) - 1  # group id of each sorted position
    pos = torch.arange(1, f + 1, dtype=torch.float64, device=x.device).expand_as(sorted_x)
    total = torch.zeros_like(pos).scatter_add_(-1, group, pos)
    count = torch.zeros_like(pos).scatter_add_(-1, group, torch.ones_like(pos))
    avg_sorted = (total / count.clamp(min=1)).gather(-1, group)
    return torch.empty_like(avg_sorted).scatter_(-1, order, avg_sorted)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each row of ``a`` and ``b`` (``(N, ...)``, flattened).

    ``rho = pearson(rank(a), rank(b))`` with average ranks for ties (``scipy.stats.spearmanr``).
    NaN for a row where ``a`` or ``b`` is constant (the correlation is undefined).
    """
    if a.shape != b.shape or a.dim() < 1:
        raise ValueError(
            f"spearman: a and b must have one shape (N, ...), got {a.shape}, {b.shape}"
        )
    n = a.shape[0]
    ra = _average_ranks(a.detach().reshape(n, -1).double())
    rb = _average_ranks(b.detach().reshape(n, -1).double())
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    den = (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()
    num = (ra * rb).sum(-1)
    return torch.where(den > 0, num / den, torch.full_like(num, math.nan))


@dataclass
class RandomisationResult:
    """Per-step correlations of a cascading randomisation.

    Attributes
    ----------
    layers:
        Names of the modules randomised, in order; step ``j`` has randomised ``layers[: j+1]``.
    spearman, spearman_abs:
        ``(L, N)`` float64: Spearman correlation of each sample's attribution after step ``j``
        with its original attribution, of the signed values and of their absolute values.
        NaN where an attribution is constant.
    """

    layers: list[str]
    spearman: Tensor
    spearman_abs: Tensor

    def rows(self) -> list[tuple[str, float, float]]:
        """``(layer, mean spearman, mean abs-spearman)`` per step, means over the samples whose
        correlation is defined (``torch.nanmean``; NaN if none is)."""
        m, ma = self.spearman.nanmean(1), self.spearman_abs.nanmean(1)
        return [(name, float(m[j]), float(ma[j])) for j, name in enumerate(self.layers)]


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _randomise(module: nn.Module) -> None:
    """Re-initialise every parameter-owning module inside ``module`` (itself included)."""
    with torch.no_grad():
        for sub in module.modules():
            if not _owns_parameters(sub):
                continue
            if callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()
                continue
            for p in sub.parameters(recurse=False):
                std = float(p.std()) if p.numel() > 1 else 0.0
                p.normal_(0.0, std if std > 0 and math.isfinite(std) else 1.0)


def parameter_randomisation(
    model: nn.Module,
    attribute: Callable[[nn.Module, Tensor, Tensor], Tensor],
    x: Tensor,
    target: Tensor,
    *,
    layers: Sequence[str] | None = None,
    seed: int = 0,
) -> RandomisationResult:
    """Cascading parameter randomisation of a deep copy of ``model``.

    Parameters
    ----------
    model:
        Left untouched: every step works on ``copy.deepcopy(model)``.
    attribute:
        ``(model_copy, x, target) -> relevance`` of shape ``(N, ...)``; called once on the
        unchanged copy and once after each randomisation step (with autograd enabled).
    x, target:
        Passed to ``attribute`` unchanged.
    layers:
        Names (as in ``model.named_modules()``) to randomise cumulatively, in this order; a
        named module is randomised with everything inside it.  ``None``: every module that owns
        parameters directly, in reverse ``named_modules()`` order (output side first for models
        built in forward order).
    seed:
        Everything (the attributions and the re-initialisation) runs inside
        ``torch.random.fork_rng`` with the global generators seeded with ``seed``: the result is
        reproducible and the caller's random state is unchanged.

    Re-initialisation: a module's ``reset_parameters()`` when it has one (its default
    initialisation), else each of its parameters is drawn from ``N(0, s^2)`` with ``s`` the
    standard deviation of its current values (1 if it has one element or no spread).
    """
    work = copy.deepcopy(model)
    modules = dict(work.named_modules())
    if layers is None:
        names = [name for name, mod in modules.items() if _owns_parameters(mod)][::-1]
        if not names:
            raise ValueError("parameter_randomisation: the model has no parameters to randomise")
    else:
        names = list(layers)
        unknown = [name for name in names if name not in modules]
        if unknown:
            raise ValueError(
                f"parameter_randomisation: layers {unknown} are not module names of the model; "
                f"choose from {list(modules)[:20]}"
            )
        empty = [name for name in names if not any(True for _ in modules[name].parameters())]
        if empty:
            raise ValueError(f"parameter_randomisation: layers {empty} have no parameters")
    devices = sorted({p.device.index or 0 for p in work.parameters() if p.device.type == "cuda"})
    rho, rho_abs = [], []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        original = attribute(work, x, target).detach()
        for name in names:
            _randomise(modules[name])
            current = attribute(work, x, target).detach()
            if current.shape != original.shape:
                raise ValueError(
                    f"parameter_randomisation: attribute returned shape {tuple(current.shape)} "
                    f"after randomising {name!r}, but {tuple(original.shape)} before"
                )
            rho.append(spearman(original, current).cpu())
            rho_abs.append(spearman(original.abs(), current.abs()).cpu())
    return RandomisationResult(names, torch.stack(rho), torch.stack(rho_abs))
