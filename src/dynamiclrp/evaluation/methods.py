"""Attribution methods for the evaluation harness: DynamicLRP and its baselines, one interface.

A method is a callable ``method(problem) -> Tensor`` returning a relevance of ``problem.x``'s
shape for the column ``problem.target`` of ``problem.forward(x)`` (see :mod:`.task`).
:func:`make_method` builds one from a name of :func:`available_methods`:

- ``"dynamiclrp:<preset>"`` for every preset of :data:`dynamiclrp.PRESETS` (or a
  :class:`~dynamiclrp.Rules` object): the forward pass runs under :func:`dynamiclrp.record`, one
  reusable :class:`dynamiclrp.LRP` per method explains it (its plan cache serves later batches).
- Captum 0.9 (``pip install captum``): ``saliency`` :math:`|\\partial f_t/\\partial x|`,
  ``inputxgradient`` :math:`x \\odot \\partial f_t/\\partial x`, ``integrated_gradients``
  :math:`x \\odot \\int_0^1 \\partial f_t(\\alpha x)/\\partial x\\, d\\alpha` (zero baseline,
  ``n_steps`` Gauss-Legendre nodes), ``gradientshap``, ``smoothgrad``, ``occlusion``.
- Zennit 0.5.1 (``pip install zennit``): ``zennit:<composite>``, the modified gradient at the
  input for the seed ``onehot(target) * f(x)``.
- ``random``: i.i.d. uniform ``[0, 1)`` values, a function of ``(seed, sample index)`` only.
- LxT 2.1 (``lxt:attnlrp``, ``lxt:cp-lrp``): ``x * grad`` of the LxT-patched Hugging Face
  model, computed in another interpreter by ``lxt_worker.py`` (:class:`LxTMethod`).

Noise scales and Zennit's box bounds are set from the task's data (:func:`data_stats`), never
from the batch, so that an attribution does not depend on how samples are batched.  A method
leaves nothing behind: hooks are removed, parameter flags and values are unchanged,
``problem.x`` is not modified, global random state is restored.

This module holds :class:`DynamicLRPMethod`, :class:`RandomMethod` and the registry; the base
class and shared helpers are in :mod:`._method_base`, the baselines in
:mod:`.baselines_captum`, :mod:`.baselines_zennit` and :mod:`.baselines_lxt` (all re-exported
here).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

import dynamiclrp

from ._method_base import FAMILIES, STATS_SAMPLES, Method, _leaf, data_stats
from .baselines_captum import CaptumMethod
from .baselines_lxt import LXT_FAMILIES, WORKER, LxTMethod
from .baselines_zennit import ZennitMethod
from .task import Problem

# -- DynamicLRP -------------------------------------------------------------------------------


class DynamicLRPMethod(Method):
    """``dynamiclrp.LRP(rules).explain(forward(x), x, target)`` with the forward pass recorded.

    For ``zennit-epsilon-gamma-box`` the box bounds are ``low``/``high`` when given, else the
    task's data range (:func:`data_stats`), as for ``zennit:epsilon_gamma_box``.
    """

    def __init__(self, rules: str | dynamiclrp.Rules, name: str | None = None, **box):
        resolved = dynamiclrp.preset(rules)
        self._box = resolved.name == "zennit-epsilon-gamma-box"
        if box and not (self._box and set(box) <= {"low", "high"}):
            raise TypeError(
                f"dynamiclrp:{resolved.name} takes no options {sorted(box)} (only "
                "zennit-epsilon-gamma-box takes low=, high=)"
            )
        params = {"rules": resolved.name, **box}
        super().__init__(name or f"dynamiclrp:{resolved.name}", "lrp", params)
        self.box = box
        self.lrp = dynamiclrp.LRP(resolved)
        self._lrps: dict[tuple[float, float], dynamiclrp.LRP] = {}
        self._stats: dict = {}

    def _explainer(self, problem: Problem) -> dynamiclrp.LRP:
        if not self._box:
            return self.lrp
        lo, hi, _ = data_stats(problem, self._stats)
        bounds = (self.box.get("low", lo), self.box.get("high", hi))
        if bounds not in self._lrps:
            rules = dynamiclrp.presets.zennit_epsilon_gamma_box(*bounds)
            self._lrps[bounds] = dynamiclrp.LRP(rules)
        return self._lrps[bounds]

    def _attribute(self, problem: Problem) -> Tensor:
        lrp = self._explainer(problem)
        x = _leaf(problem)
        with dynamiclrp.record(problem.model) as rec:
            out = problem.forward(x)
        return lrp.explain(out, x, target=problem.target, recording=rec)


# -- random -----------------------------------------------------------------------------------


class RandomMethod(Method):
    """Uniform ``[0, 1)`` attributions: sample ``i`` of the task gets
    ``numpy.random.default_rng([seed, i]).random(x.shape[1:])`` (PCG64 seeded by the pair), so
    the value does not depend on the batching."""

    def __init__(self, name: str | None = None, seed: int = 0):
        super().__init__(name or "random", "random", {"seed": seed})
        self.seed = seed

    def _attribute(self, problem: Problem) -> Tensor:
        if problem.idx is None:
            raise ValueError(
                "random: problem.idx is needed to seed each sample (Task.problem sets it)"
            )
        x = problem.x
        rows = [
            np.random.default_rng([self.seed, int(i)]).random(tuple(x.shape[1:]))
            for i in problem.idx.tolist()
        ]
        return torch.from_numpy(np.stack(rows)).to(device=x.device, dtype=x.dtype)


# -- registry ---------------------------------------------------------------------------------


def _registry() -> dict[str, Callable[..., Method]]:
    reg: dict[str, Callable[..., Method]] = {}
    for preset in dynamiclrp.PRESETS:
        reg[f"dynamiclrp:{preset}"] = lambda _p=preset, **kw: DynamicLRPMethod(_p, **kw)
    for kind in CaptumMethod.DEFAULTS:
        reg[kind] = lambda _k=kind, **kw: CaptumMethod(_k, **kw)
    for kind in ZennitMethod.COMPOSITES:
        reg[f"zennit:{kind}"] = lambda _k=kind, **kw: ZennitMethod(_k, **kw)
    reg["random"] = RandomMethod
    for variant in ("attnlrp", "cp-lrp"):
        reg[f"lxt:{variant}"] = lambda _v=variant, **kw: LxTMethod(_v, **kw)
    return reg


REGISTRY = _registry()


def available_methods() -> list[str]:
    """Every name :func:`make_method` accepts."""
    return sorted(REGISTRY)


def make_method(spec: str | dynamiclrp.Rules, **kwargs) -> Method:
    """The method named ``spec`` (see :func:`available_methods`) with options ``kwargs``
    (``name=`` sets the table label); a :class:`dynamiclrp.Rules` object gives a DynamicLRP
    method with those rules."""
    if isinstance(spec, dynamiclrp.Rules):
        return DynamicLRPMethod(spec, **kwargs)
    if spec not in REGISTRY:
        raise ValueError(f"Unknown attribution method {spec!r}; known: {available_methods()}")
    return REGISTRY[spec](**kwargs)


__all__ = [
    "FAMILIES",
    "LXT_FAMILIES",
    "STATS_SAMPLES",
    "WORKER",
    "Method",
    "DynamicLRPMethod",
    "CaptumMethod",
    "ZennitMethod",
    "RandomMethod",
    "LxTMethod",
    "available_methods",
    "make_method",
    "data_stats",
]
