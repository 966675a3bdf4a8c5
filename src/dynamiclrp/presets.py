"""Rule presets: which formula each rule family uses, and per-layer overrides.

A :class:`Rules` object is a few fields over the rule families of :mod:`dynamiclrp.rules`; the
named presets below are each a few lines.  Per-layer overrides select a contraction rule for
particular parameters, given as tensors or as parameter names of a model::

    rules = dynamiclrp.preset("dynamiclrp").override(ZBox(-3.0, 3.0), params=[model.conv1.weight])
    rules = dynamiclrp.preset("epsilon").override(Gamma(0.25), names=["features.0.weight"], model=m)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .rules.linear import AlphaBeta, Epsilon, Gamma, ZPlus

PROPORTIONAL, SIGNED = "proportional", "signed"


def _storage_key(t: Tensor) -> tuple[int, torch.device]:
    return (t.untyped_storage().data_ptr(), t.device)


@dataclass(frozen=True)
class LayerOverride:
    """Use ``rule`` for every contraction whose constant operand lives in one of ``keys``' storages."""

    rule: object
    keys: frozenset


@dataclass(frozen=True)
class Rules:
    """The rule choices of one explanation.

    Attributes
    ----------
    name:
        Preset name, for reports.
    eps:
        Stabiliser of every ``stab(z) = z + eps * sign(z)``.
    dense, conv:
        Contraction rule (``Epsilon()``, ``Gamma(0.25)``, ...) for matrix products and
        convolutions with a constant operand.
    add:
        ``"proportional"``: ``R_a = R |a| / (|a| + |b|)``; ``"signed"``: ``R_a = R a / stab(a + b)``.
    reduction:
        The same choice for sum, mean, cumsum and average pooling.
    overrides:
        Per-layer contraction rules, first match wins.
    """

    name: str = "dynamiclrp"
    eps: float = 1e-6
    dense: object = field(default_factory=Epsilon)
    conv: object = field(default_factory=Epsilon)
    add: str = PROPORTIONAL
    reduction: str = PROPORTIONAL
    overrides: tuple[LayerOverride, ...] = ()

    def __post_init__(self):
        for what in ("add", "reduction"):
            if getattr(self, what) not in (PROPORTIONAL, SIGNED):
                raise ValueError(
                    f"Rules.{what} must be {PROPORTIONAL!r} or {SIGNED!r}, got {getattr(self, what)!r}"
                )
        if not self.eps > 0:
            raise ValueError(f"Rules.eps must be positive, got {self.eps}")

    def rule_for(self, kind: str, tensors: Iterable[Tensor]):
        """The contraction rule for ``kind`` (``"dense"`` or ``"conv"``) with operands ``tensors``."""
        if self.overrides:
            keys = {_storage_key(t) for t in tensors if t is not None}
            for o in self.overrides:
                if keys & o.keys:
                    return o.rule
        return self.dense if kind == "dense" else self.conv

    def override(
        self,
        rule,
        params: Iterable[Tensor] = (),
        names: Iterable[str] = (),
        model: torch.nn.Module | None = None,
    ) -> Rules:
        """A copy of these rules that uses ``rule`` for the layers owning ``params`` / ``names``."""
        tensors = list(params)
        names = list(names)
        if names:
            if model is None:
                raise ValueError("override(names=...) needs model= to look the names up")
            table = dict(model.named_parameters())
            unknown = [n for n in names if n not in table]
            if unknown:
                raise ValueError(
                    f"No parameters named {unknown} in the model; known names start with "
                    f"{list(table)[:5]}"
                )
            tensors += [table[n] for n in names]
        if not tensors:
            raise ValueError("override() needs params= or names=")
        keys = frozenset(_storage_key(t) for t in tensors)
        return replace(self, overrides=self.overrides + (LayerOverride(rule, keys),))


PRESETS = {
    "dynamiclrp": lambda: Rules(),
    "epsilon": lambda: Rules(name="epsilon", add=SIGNED, reduction=SIGNED),
    "gamma": lambda: Rules(
        name="gamma", add=SIGNED, reduction=SIGNED, dense=Gamma(0.25), conv=Gamma(0.25)
    ),
    "zplus": lambda: Rules(name="zplus", add=SIGNED, reduction=SIGNED, dense=ZPlus(), conv=ZPlus()),
    "alpha2beta1": lambda: Rules(
        name="alpha2beta1",
        add=SIGNED,
        reduction=SIGNED,
        dense=AlphaBeta(2.0, 1.0),
        conv=AlphaBeta(2.0, 1.0),
    ),
}


def preset(rules: str | Rules) -> Rules:
    """Resolve a preset name (``"dynamiclrp"``, ``"epsilon"``, ``"gamma"``, ``"zplus"``,
    ``"alpha2beta1"``) or pass a :class:`Rules` through."""
    if isinstance(rules, Rules):
        return rules
    if isinstance(rules, str) and rules in PRESETS:
        return PRESETS[rules]()
    raise ValueError(f"Unknown rules {rules!r}: use one of {sorted(PRESETS)} or a Rules object")
