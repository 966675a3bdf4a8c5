"""Zennit 0.5.1 baselines of :mod:`.methods` (``pip install zennit``), imported lazily.

``zennit:<composite>``: the modified gradient at the input for the seed
``onehot(target) * f(x)``, see :class:`ZennitMethod`.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor, nn

from ._method_base import Method, _leaf, _need_model, _onehot_seed, data_stats
from .task import Problem


def _zennit(module: str = ""):
    try:
        return importlib.import_module("zennit" + module)
    except ImportError as err:
        raise ImportError(
            "The Zennit baselines need the 'zennit' package (pip install zennit==0.5.1)"
        ) from err


class ZennitMethod(Method):
    """Zennit's composite: ``grad`` of ``forward(x)`` at ``x`` for ``grad_outputs =
    onehot(target) * forward(x)`` with the composite registered on ``problem.model``.

    Canonizers (``canonizers=`` overrides): ``ResNetCanonizer`` for torchvision ResNets,
    ``SequentialMergeBatchNorm`` for any other model with a batch norm (as Zennit's docs do for
    VGG-BN), none otherwise.  ``exact_merge`` (True) makes each merged batch norm an exact
    identity, the fix Zennit's repository adopted after 0.5.1 (issue #234, PR #240; 0.5.1
    leaves ``x / sqrt(1 + eps)``, ``docs/presets.md``).  ``epsilon_gamma_box``: ``low`` /
    ``high`` (default: the task's data range, :func:`data_stats`).
    """

    COMPOSITES = {
        "epsilon_plus": "EpsilonPlus",
        "epsilon_plus_flat": "EpsilonPlusFlat",
        "epsilon_gamma_box": "EpsilonGammaBox",
        "epsilon_alpha2_beta1": "EpsilonAlpha2Beta1",
        "epsilon_alpha2_beta1_flat": "EpsilonAlpha2Beta1Flat",
    }

    def __init__(
        self, kind: str, name: str | None = None, canonizers=None, exact_merge=True, **box
    ):
        if box and not (kind == "epsilon_gamma_box" and set(box) <= {"low", "high"}):
            raise TypeError(f"zennit:{kind}: unknown options {sorted(box)}")
        params = {"composite": self.COMPOSITES[kind], "exact_merge": exact_merge, **box}
        super().__init__(name or f"zennit:{kind}", "lrp", params)
        self.kind = kind
        self.canonizers = canonizers
        self.exact_merge = exact_merge
        self.box = box
        self.composites = _zennit(".composites")
        self._stats: dict = {}

    def _canonizers(self, model: nn.Module) -> list:
        if self.canonizers is not None:
            return list(self.canonizers)
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return []
        if type(model).__name__ == "ResNet" and type(model).__module__.startswith("torchvision"):
            return [_zennit(".torchvision").ResNetCanonizer()]
        return [_zennit(".canonizers").SequentialMergeBatchNorm()]

    def _attribute(self, problem: Problem) -> Tensor:
        model = _need_model(problem, self.name)
        canon = self._canonizers(model)
        self.params["canonizers"] = [type(c).__name__ for c in canon]
        cls = getattr(self.composites, self.COMPOSITES[self.kind])
        x = _leaf(problem)
        if self.kind == "epsilon_gamma_box":
            lo, hi, _ = data_stats(problem, self._stats)
            lo, hi = self.box.get("low", lo), self.box.get("high", hi)
            composite = cls(
                low=torch.full_like(x, lo), high=torch.full_like(x, hi), canonizers=canon
            )
        else:
            composite = cls(canonizers=canon)
        with composite.context(model):
            patched = []
            try:
                if self.exact_merge:
                    for handle in composite.handles:
                        bn = getattr(handle, "batch_norm", None)
                        if bn is not None:  # restored by the canonizer / below
                            patched.append((bn, bn.eps))
                            bn.running_var.data = torch.full_like(bn.running_var, 0.5)
                            bn.eps = 0.5
                out = problem.forward(x)
                (grad,) = torch.autograd.grad(out, x, _onehot_seed(out, problem.target))
            finally:
                for bn, eps in patched:
                    bn.eps = eps
        return grad
