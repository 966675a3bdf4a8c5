"""Rule presets: which formula each rule family uses, and per-layer overrides.

A :class:`Rules` object is a few fields over the rule families of :mod:`dynamiclrp.rules`; the
named presets below are each a few lines.  Per-layer overrides select a contraction rule for
particular parameters, given as tensors or as parameter names of a model::

    rules = dynamiclrp.preset("dynamiclrp").override(ZBox(-3.0, 3.0), params=[model.conv1.weight])
    rules = dynamiclrp.preset("epsilon").override(Gamma(0.25), names=["features.0.weight"], model=m)

The ``"zennit-*"`` presets reproduce Zennit's composites of the same names, ``"attnlrp"`` and
``"cp-lrp"`` LxT 2.1's efficient AttnLRP and CP-LRP (``docs/presets.md``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .errors import SettingError
from .rules.linear import AlphaBeta, Epsilon, Flat, Gamma, ZBox, ZPlus
from .validation import check_rule, real_number, rules_argument_error, show

PROPORTIONAL, SIGNED = "proportional", "signed"
EPSILON, PASS = "epsilon", "pass"
ATTNLRP, CP = "attnlrp", "cp"
UNIFORM, CONSTANT = "uniform", "constant"
KINDS = ("dense", "conv")


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
    first, first_kinds:
        Contraction rule for the *first* layers (``None``: no special rule): the contractions of a
        kind in ``first_kinds`` whose data operand comes from a requested input with no other such
        contraction in between (Zennit's first layer, found from the graph).  Overrides win.
    batchnorm:
        ``"epsilon"``: the epsilon rule on batch norm's affine map; ``"pass"``: relevance passes
        through an eval-mode batch norm unchanged (Zennit's ``Pass``).  A batch norm with batch
        statistics (training mode, and ``instance_norm``, which runs as one) is a normaliser like
        group norm and keeps the epsilon rule on its centred map either way.
    canonize_batchnorm:
        Merge an eval-mode batch norm into the convolution or linear layer that feeds only it:
        the pair is one affine contraction ``w * s``, ``(b - mean) * s + beta``,
        ``s = gamma / sqrt(var + eps)``, explained by that layer's rule; the batch norm passes
        relevance through.
    attention:
        ``"attnlrp"``: relevance flows through the attention scores (softmax rule, uniform rule on
        ``q k^T`` and ``P v``); ``"cp"`` (CP-LRP): the attention probabilities ``P`` (a softmax
        output, or inside fused attention) are constants, ``P v`` is a linear map of ``v`` explained
        by the epsilon rule, all of its relevance to ``v`` and none to ``q``, ``k`` or the mask.
    gates:
        ``"uniform"``: a product of two full-shape data tensors gives half to each;
        ``"constant"`` (CP-LRP): where exactly one of them is the output of an element-wise
        activation (``silu(gate) * up``), that gate is a constant and the other takes all.
    """

    name: str = "dynamiclrp"
    eps: float = 1e-6
    dense: object = field(default_factory=Epsilon)
    conv: object = field(default_factory=Epsilon)
    add: str = PROPORTIONAL
    reduction: str = PROPORTIONAL
    overrides: tuple[LayerOverride, ...] = ()
    first: object | None = None
    first_kinds: tuple[str, ...] = KINDS
    batchnorm: str = EPSILON
    canonize_batchnorm: bool = False
    canonize_bias: bool = True
    attention: str = ATTNLRP
    gates: str = UNIFORM

    def __post_init__(self):
        for what, allowed in (
            ("add", (PROPORTIONAL, SIGNED)),
            ("reduction", (PROPORTIONAL, SIGNED)),
            ("batchnorm", (EPSILON, PASS)),
            ("attention", (ATTNLRP, CP)),
            ("gates", (UNIFORM, CONSTANT)),
        ):
            if getattr(self, what) not in allowed:
                raise SettingError(
                    f"Rules.{what} must be one of {allowed}, got {getattr(self, what)!r} "
                    "(docs/presets.md describes each choice)."
                )
        kinds = self.first_kinds
        if isinstance(kinds, str) or not isinstance(kinds, (tuple, list)):
            raise SettingError(
                f"Rules.first_kinds must be a tuple of kinds among {KINDS}, got {show(kinds)}: "
                f"write first_kinds=({kinds!r},) for one kind."
            )
        if not set(kinds) <= set(KINDS):
            raise SettingError(
                f"Rules.first_kinds must be among {KINDS}, got {kinds!r}: the first-layer rule "
                "applies to dense layers ('dense',), convolutions ('conv',) or both."
            )
        object.__setattr__(self, "first_kinds", tuple(kinds))  # hashable: part of plan keys
        eps = real_number(self.eps, "Rules.eps", error=SettingError)
        if not eps > 0:
            raise SettingError(
                f"Rules.eps must be positive (the stabiliser of z + eps * sign(z)), got "
                f"{self.eps}: use e.g. 1e-6 (the default) or 1e-12 for almost none."
            )
        check_rule(self.dense, "Rules.dense")
        check_rule(self.conv, "Rules.conv")
        if self.first is not None:
            check_rule(self.first, "Rules.first")

    def rule_for(self, kind: str, tensors: Iterable[Tensor], first: bool = False):
        """The contraction rule for ``kind`` (``"dense"`` or ``"conv"``) with operands ``tensors``;
        ``first``: the layer is a first contraction (see ``first``)."""
        if self.overrides:
            keys = {_storage_key(t) for t in tensors if t is not None}
            for o in self.overrides:
                if keys & o.keys:
                    return o.rule
        if first and self.first is not None:
            return self.first
        return self.dense if kind == "dense" else self.conv

    def override(
        self,
        rule,
        params: Tensor | Iterable[Tensor] = (),
        names: str | Iterable[str] = (),
        model: torch.nn.Module | None = None,
    ) -> Rules:
        """A copy of these rules that uses ``rule`` for the layers owning ``params`` / ``names``."""
        check_rule(rule, "override(rule)")
        tensors = [params] if isinstance(params, Tensor) else list(params)
        names = [names] if isinstance(names, str) else list(names)
        for t in tensors:
            if not isinstance(t, Tensor):
                raise SettingError(
                    f"override(params=...) must hold parameter tensors, got {show(t)}: pass e.g. "
                    "params=[model.conv1.weight], or names=['conv1.weight'] with model=model."
                )
        if names:
            if model is None:
                raise SettingError(
                    "override(names=...) needs model= to look the names up: "
                    "override(rule, names=[...], model=model)."
                )
            if not isinstance(model, torch.nn.Module):
                raise SettingError(
                    f"override(model=...) must be a torch.nn.Module, got {show(model)}."
                )
            table = dict(model.named_parameters())
            unknown = [n for n in names if n not in table]
            if unknown:
                raise SettingError(
                    f"No parameters named {unknown} in the model; known names start with "
                    f"{list(table)[:5]} (see model.named_parameters())."
                )
            tensors += [table[n] for n in names]
        if not tensors:
            raise SettingError(
                "override() needs params= or names= to say which layers use the rule, e.g. "
                "override(Gamma(0.25), params=[model.conv1.weight])."
            )
        keys = frozenset(_storage_key(t) for t in tensors)
        return replace(self, overrides=self.overrides + (LayerOverride(rule, keys),))


def _zennit(name: str, conv, **first) -> Rules:
    """Zennit's composites: epsilon for linear layers, ``conv`` for convolutions, its ``Norm``
    rule (signed) for sums and average pooling, ``Pass`` for activations and batch norm, batch
    norm merged into the layer before it (its canonizers), stabiliser ``1e-6`` everywhere."""
    return Rules(
        name=name,
        dense=Epsilon(),
        conv=conv,
        add=SIGNED,
        reduction=SIGNED,
        batchnorm=PASS,
        canonize_batchnorm=True,
        **first,
    )


def zennit_epsilon_gamma_box(low: float | Tensor = 0.0, high: float | Tensor = 1.0) -> Rules:
    """Zennit's ``EpsilonGammaBox(low, high)``: z-box on the first convolution (without its bias,
    as Zennit computes it), gamma 0.25 on the others, epsilon on linear layers.  ``low``/``high``
    bound the input (scalars or tensors broadcastable to it, e.g. ``(1, 3, 1, 1)`` per channel);
    the preset name uses ``[0, 1]``, the range of un-normalised images."""
    box = ZBox(low, high, bias=False)
    return _zennit("zennit-epsilon-gamma-box", Gamma(0.25), first=box, first_kinds=("conv",))


def _lxt(name: str, **cp) -> Rules:
    """LxT 2.1's efficient AttnLRP / CP-LRP (``lxt.efficient``: Gradient x Input with modified
    gradients, ``docs/presets.md``): the epsilon rule without a stabiliser on linear layers (the
    bias keeps its share), the signed rule on sums, the identity rule on activations and on the
    normalisers' statistics, the uniform rule on products of two data tensors.  ``Rules.eps``
    must be positive: ``1e-12`` stands in for LxT's none."""
    return Rules(name=name, eps=1e-12, add=SIGNED, reduction=SIGNED, **cp)


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
    "attnlrp": lambda: _lxt("attnlrp"),
    "cp-lrp": lambda: _lxt("cp-lrp", attention=CP, gates=CONSTANT),
    # Captum's LRP defaults: EpsilonRule(1e-9) on layers and sums (tests/test_captum.py)
    "captum": lambda: Rules(name="captum", eps=1e-9, add=SIGNED, reduction=SIGNED),
    "zennit-epsilon-plus": lambda: _zennit("zennit-epsilon-plus", ZPlus()),
    "zennit-epsilon-plus-flat": lambda: _zennit("zennit-epsilon-plus-flat", ZPlus(), first=Flat()),
    "zennit-epsilon-gamma-box": zennit_epsilon_gamma_box,
    "zennit-epsilon-alpha2-beta1": lambda: _zennit(
        "zennit-epsilon-alpha2-beta1", AlphaBeta(2.0, 1.0)
    ),
    "zennit-epsilon-alpha2-beta1-flat": lambda: _zennit(
        "zennit-epsilon-alpha2-beta1-flat", AlphaBeta(2.0, 1.0), first=Flat()
    ),
}


def preset(rules: str | Rules) -> Rules:
    """Resolve a preset name (``"dynamiclrp"``, ``"epsilon"``, ``"gamma"``, ``"zplus"``,
    ``"alpha2beta1"``, ``"attnlrp"``, ``"cp-lrp"``, the ``"zennit-*"`` ones) or pass a :class:`Rules` through."""
    if isinstance(rules, Rules):
        return rules
    if isinstance(rules, str) and rules in PRESETS:
        return PRESETS[rules]()
    raise rules_argument_error(rules, PRESETS)
