"""The ``"captum"`` preset (epsilon 1e-9, signed sums) against Captum's ``captum.attr.LRP``.

Oracle tests (need ``captum``): float64, random weights and biases, batch 2, one target per row.
Captum's relevance is ``LRP(model).attribute(x, target=t)``; ours is
``explain(model(x), x, target=t, rules="captum")``. The full relevance tensors must agree to
``max |ours - captum| / max |captum| <= 1e-6``.

Captum 0.9 gives ``EpsilonRule(1e-9)`` (``z + 1e-9 * sign(z)``, ``sign(0) = +1``, the bias inside
``z``, its share absorbed) to ``Conv2d``, ``Linear``, ``BatchNorm2d``, ``AvgPool2d``,
``AdaptiveAvgPool2d``, ``MaxPool1/2/3d`` and its ``Addition_Module``; ``ReLU``, ``Tanh`` and
``Dropout`` pass relevance through. It has no rule for ``nn.Flatten``, so the models flatten with
``view`` in ``forward``. The one difference is max pooling: Captum's epsilon rule there gives the
winner ``R y / stab(y)``, ``dynamiclrp`` routes ``R`` to it as the gradient does (a relative
``1e-9 / |y|`` per pooling layer; ``Rules`` has no option for it).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynamiclrp

captum_attr = pytest.importorskip("captum.attr")
from captum.attr._utils.custom_modules import Addition_Module  # noqa: E402
from captum.attr._utils.lrp_rules import EpsilonRule  # noqa: E402

D = torch.float64
TOL = 1e-6
TARGET = [1, 3]
# Captum's defaults: EpsilonRule(1e-9) on every layer with weights, pooling, batch norm and add.
CAPTUM = "captum"


class MaxPoolCNN(nn.Module):
    """Conv, ReLU, max-pool twice, flatten with ``view``, two linear layers."""

    def __init__(self):
        super().__init__()
        self.c1, self.r1, self.p1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.c2, self.r2, self.p2 = nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.l1, self.r3, self.l2 = nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 5)

    def forward(self, x):
        h = self.p2(self.r2(self.c2(self.p1(self.r1(self.c1(x))))))
        return self.l2(self.r3(self.l1(h.view(h.shape[0], -1))))


class ResidualCNN(nn.Module):
    """Every other layer Captum has a default rule for: batch norm, average pooling, adaptive
    average pooling, tanh, a residual add (Captum's ``Addition_Module``), dropout."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.r1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.p1, self.c2, self.t = nn.AvgPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh()
        self.add, self.ap = Addition_Module(), nn.AdaptiveAvgPool2d(2)
        self.l1, self.r3, self.d, self.l2 = (
            nn.Linear(32, 12),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(12, 5),
        )

    def forward(self, x):
        h = self.p1(self.r1(self.bn(self.c1(x))))
        h = self.ap(self.add(h, self.t(self.c2(h))))
        return self.l2(self.d(self.r3(self.l1(h.view(h.shape[0], -1)))))


def _model(cls) -> nn.Module:
    torch.manual_seed(0)
    model = cls().to(D).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # nonzero biases, batch-norm affine not (1, 0)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape))
    return model


def _compare(model: nn.Module) -> float:
    x = torch.randn(2, 3, 8, 8, dtype=D, generator=torch.Generator().manual_seed(1))
    ref = captum_attr.LRP(model).attribute(x.clone().requires_grad_(), target=TARGET)
    xi = x.clone().requires_grad_()
    ours = dynamiclrp.explain(model(xi), xi, target=TARGET, rules=CAPTUM)
    assert ours.shape == ref.shape and ref.abs().max() > 0
    return ((ours - ref.detach()).abs().max() / ref.abs().max()).item()


def test_captum_maxpool_cnn():
    # measured 7.1e-9 (Captum 0.9.0): max pooling's epsilon in Captum (module docstring)
    assert _compare(_model(MaxPoolCNN)) <= TOL


def test_captum_maxpool_difference_is_the_pooling_epsilon():
    """With a vanishing stabiliser on Captum's max-pool layers only, the two agree to rounding:
    the max-pool epsilon is the whole difference."""
    model = _model(MaxPoolCNN)
    model.p1.rule = EpsilonRule(epsilon=1e-300)
    model.p2.rule = EpsilonRule(epsilon=1e-300)
    assert _compare(model) <= 1e-12


def test_captum_residual_cnn():
    # measured 4.6e-16 (Captum 0.9.0)
    assert _compare(_model(ResidualCNN)) <= 1e-12
