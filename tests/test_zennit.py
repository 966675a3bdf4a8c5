"""The ``zennit-*`` presets against Zennit itself, and the two mechanisms they rest on.

Oracle tests (need ``zennit``; the torchvision models need ``torchvision``): float64, random
weights, biases, batch-norm statistics and affine parameters (negative scales included), small
inputs. Zennit's attribution is the modified gradient ``x.grad`` for ``grad_outputs = seed``;
ours is ``explain(out, x, relevance=seed, rules=...)``. The full relevance tensors must agree to
``max |ours - zennit| / max |zennit| <= 1e-6``.

Zennit 0.5.1's batch-norm merge leaves the batch norm computing ``x / sqrt(1 + eps)`` instead of
the identity (``docs/presets.md``); the oracle makes those batch norms exact identities, as later
Zennit releases do, so that both sides explain the same function.

The other tests (no Zennit needed) check the first-layer rule and batch-norm canonization against
explicitly merged models.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

import dynamiclrp
from dynamiclrp import AlphaBeta, Epsilon, Flat, Gamma, Rules, ZBox, ZPlus
from dynamiclrp.presets import zennit_epsilon_gamma_box

D = torch.float64
TOL = 1e-6
LOW = torch.tensor([-2.1, -2.0, -1.8], dtype=D).view(1, 3, 1, 1)
HIGH = torch.tensor([2.2, 2.4, 2.6], dtype=D).view(1, 3, 1, 1)
NAMES = [
    "zennit-epsilon-plus",
    "zennit-epsilon-plus-flat",
    "zennit-epsilon-gamma-box",
    "zennit-epsilon-alpha2-beta1",
    "zennit-epsilon-alpha2-beta1-flat",
]


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random biases and batch-norm parameters/statistics (torchvision initialises them to
    0 / 1), then float64 and eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.to(D).eval()


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    return _randomize(model, 1)


def small_cnn_bn() -> nn.Module:
    """Batch norms of every placement: on the input (nothing to merge into: Zennit's Pass), after
    a convolution with and without bias, after a linear layer (BatchNorm1d)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm2d(3),
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    return _randomize(model, 2)


def _torchvision(name: str, seed: int) -> nn.Module:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(seed)
    return _randomize(getattr(tv.models, name)(weights=None, num_classes=10), seed)


# model name -> (builder, input size, batch, canonizers Zennit documents for it)
MODELS = {
    "cnn": (small_cnn, 16, 2, None),
    "cnn_bn": (small_cnn_bn, 16, 2, "sequential"),
    "vgg16": (lambda: _torchvision("vgg16", 3), 32, 1, None),
    "vgg16_bn": (lambda: _torchvision("vgg16_bn", 4), 32, 1, "sequential"),
    "resnet18": (lambda: _torchvision("resnet18", 5), 32, 2, "resnet"),
    "resnet50": (lambda: _torchvision("resnet50", 6), 32, 1, "resnet"),
}


@pytest.fixture(scope="module")
def zennit():
    return pytest.importorskip("zennit")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small float64 models: one intra-op thread is as fast and never oversubscribes a busy
    machine (which made this file several times slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def built():
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            build, size, batch, canon = MODELS[name]
            model = build()
            g = torch.Generator().manual_seed(7)
            x = torch.randn(batch, 3, size, size, dtype=D, generator=g).clamp(LOW, HIGH)
            out = model(x).detach()
            rows, cls = torch.arange(batch), torch.tensor([1, 7][:batch])
            seed = torch.zeros_like(out)
            seed[rows, cls] = out[rows, cls]  # one-hot times the output
            cache[name] = (model, x, seed, canon)
        return cache[name]

    return get


def _canonizers(kind: str | None) -> list:
    if kind is None:
        return []
    if kind == "sequential":
        from zennit.canonizers import SequentialMergeBatchNorm

        return [SequentialMergeBatchNorm()]
    from zennit.torchvision import ResNetCanonizer

    return [ResNetCanonizer()]


def _composite(name: str, canonizers: list):
    from zennit import composites as zc

    if name == "zennit-epsilon-gamma-box":
        return zc.EpsilonGammaBox(low=LOW, high=HIGH, canonizers=canonizers)
    cls = {
        "zennit-epsilon-plus": zc.EpsilonPlus,
        "zennit-epsilon-plus-flat": zc.EpsilonPlusFlat,
        "zennit-epsilon-alpha2-beta1": zc.EpsilonAlpha2Beta1,
        "zennit-epsilon-alpha2-beta1-flat": zc.EpsilonAlpha2Beta1Flat,
    }[name]
    return cls(canonizers=canonizers)


def zennit_relevance(model, x, seed, name: str, canon: str | None, exact_merge: bool = True):
    """Zennit's attribution: the modified gradient for ``grad_outputs = seed``."""
    composite = _composite(name, _canonizers(canon))
    xz = x.clone().requires_grad_()
    with composite.context(model) as modified:
        patched = []
        if exact_merge:  # Zennit 0.5.1 leaves eps in the merged batch norm: make it the identity
            for handle in composite.handles:
                bn = getattr(handle, "batch_norm", None)
                if bn is not None:
                    patched.append((bn, bn.eps))
                    bn.running_var.data = torch.full_like(bn.running_var, 0.5)
                    bn.eps = 0.5  # var + eps = 1 exactly (what Zennit does since torch 2.10)
        try:
            (grad,) = torch.autograd.grad(modified(xz), xz, seed)
        finally:
            for bn, eps in patched:
                bn.eps = eps
    return grad


def our_relevance(model, x, seed, name: str):
    rules = zennit_epsilon_gamma_box(LOW, HIGH) if name == "zennit-epsilon-gamma-box" else name
    xd = x.clone().requires_grad_()
    return dynamiclrp.explain(model(xd), xd, relevance=seed, rules=rules)


def relative_difference(ours, ref) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_preset_equals_zennit(zennit, built, model_name, name):
    model, x, seed, canon = built(model_name)
    ref = zennit_relevance(model, x, seed, name, canon)
    ours = our_relevance(model, x, seed, name)
    assert ours.shape == ref.shape
    assert relative_difference(ours, ref) <= TOL


# --- no Zennit needed --------------------------------------------------------------------------


def test_presets_declare_zennits_choices():
    r = dynamiclrp.preset("zennit-epsilon-gamma-box")
    assert isinstance(r.dense, Epsilon) and isinstance(r.conv, Gamma) and r.conv.gamma == 0.25
    assert isinstance(r.first, ZBox) and not r.first.bias and r.first_kinds == ("conv",)
    assert (r.first.low, r.first.high) == (0.0, 1.0)
    assert isinstance(dynamiclrp.preset("zennit-epsilon-plus-flat").first, Flat)
    assert isinstance(dynamiclrp.preset("zennit-epsilon-alpha2-beta1").conv, AlphaBeta)
    for name in NAMES:
        r = dynamiclrp.preset(name)
        assert (r.eps, r.add, r.reduction, r.batchnorm) == (1e-6, "signed", "signed", "pass")
        assert r.canonize_batchnorm and r.name == name
    default = dynamiclrp.preset("dynamiclrp")
    assert default.first is None and not default.canonize_batchnorm
    assert default.batchnorm == "epsilon"
    with pytest.raises(ValueError, match="batchnorm"):
        Rules(batchnorm="gradient")
    with pytest.raises(ValueError, match="first_kinds"):
        Rules(first_kinds=("bmm",))


class _TwoBranches(nn.Module):
    """Two convolutions read the input; a linear layer follows them; another linear layer reads
    the input through a reshape only."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 3, 1)
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.side = nn.Linear(2 * 4 * 4, 5)

    def forward(self, x):
        h = torch.relu(self.a(x)) + torch.relu(self.b(x))
        h = self.c(torch.relu(h))
        return self.fc(h.flatten(1)) + self.side(x.flatten(1))


def test_first_rule_applies_to_every_contraction_nearest_to_the_input():
    torch.manual_seed(0)
    model = _randomize(_TwoBranches(), 0)
    x = torch.randn(2, 2, 4, 4, dtype=D, requires_grad=True)
    first = {model.a.weight, model.b.weight, model.side.weight}
    marker = Flat()
    explicit = Rules(add="signed", reduction="signed", conv=ZPlus())
    for p in first:
        explicit = explicit.override(marker, params=[p])
    via_first = Rules(add="signed", reduction="signed", conv=ZPlus(), first=marker)
    rel = dynamiclrp.explain(model(x), x, target=2, rules=via_first)
    ref = dynamiclrp.explain(model(x), x, target=2, rules=explicit)
    torch.testing.assert_close(rel, ref, rtol=0, atol=0)
    # first_kinds=("conv",): the linear layer reading the input is not a first layer
    conv_only = replace(via_first, first_kinds=("conv",))
    rel = dynamiclrp.explain(model(x), x, target=2, rules=conv_only)
    ref = Rules(add="signed", reduction="signed", conv=ZPlus())
    ref = ref.override(marker, params=[model.a.weight, model.b.weight])
    torch.testing.assert_close(
        rel, dynamiclrp.explain(model(x), x, target=2, rules=ref), rtol=0, atol=0
    )


def test_first_layer_is_found_past_a_dense_layer_when_only_convolutions_count():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 2 * 4 * 4), nn.Unflatten(1, (2, 4, 4)), nn.Conv2d(2, 3, 3), nn.Flatten()
    )
    model = _randomize(model, 0)
    x = torch.randn(2, 4, dtype=D, requires_grad=True)
    box = ZBox(-1.0, 1.0, bias=False)
    rules = Rules(conv=Gamma(0.25), first=box, first_kinds=("conv",))
    rel = dynamiclrp.explain(model(x), x, target=0, rules=rules)
    ref = Rules(conv=Gamma(0.25)).override(box, params=[model[2].weight])
    torch.testing.assert_close(
        rel, dynamiclrp.explain(model(x), x, target=0, rules=ref), rtol=0, atol=0
    )


def _merged(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """``layer`` with ``bn`` folded in, written out by hand."""
    layer = copy.deepcopy(layer)
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    with torch.no_grad():
        if isinstance(layer, nn.ConvTranspose2d):
            g, (c_in, per) = layer.groups, layer.weight.shape[:2]
            sw = s.view(g, 1, per).expand(g, c_in // g, per).reshape(c_in, per)
            layer.weight.mul_(sw[:, :, None, None])
        else:
            layer.weight.mul_(s.view(-1, *([1] * (layer.weight.dim() - 1))))
        b = layer.bias if layer.bias is not None else torch.zeros_like(s)
        layer.bias = nn.Parameter((b - bn.running_mean) * s + bn.bias)
    return layer


@pytest.mark.parametrize(
    "layer, bn, shape",
    [
        (nn.Conv2d(3, 6, 3, padding=1, groups=3), nn.BatchNorm2d(6), (2, 3, 5, 5)),
        (nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), (2, 3, 5, 5)),
        (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6), (2, 4, 3, 3)),
        (nn.Linear(5, 6), nn.BatchNorm1d(6), (3, 5)),
        (nn.Linear(5, 6, bias=False), nn.BatchNorm1d(6), (3, 5)),
    ],
)
@pytest.mark.parametrize("rule", [Epsilon(), Gamma(0.25), ZPlus(), AlphaBeta(2.0, 1.0)])
def test_canonized_batchnorm_equals_the_merged_layer(layer, bn, shape, rule):
    torch.manual_seed(0)
    model = _randomize(nn.Sequential(layer, bn, nn.ReLU()), 3)
    merged = nn.Sequential(_merged(model[0], model[1]), nn.ReLU())
    x = torch.randn(*shape, dtype=D)
    seed = torch.randn_like(model(x))
    torch.testing.assert_close(merged(x), model(x))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    base = Rules(dense=rule, conv=rule, add="signed", reduction="signed")
    canon = replace(base, canonize_batchnorm=True)
    rel, report = dynamiclrp.explain(model(xa), xa, relevance=seed, rules=canon, return_report=True)
    ref = dynamiclrp.explain(merged(xb), xb, relevance=seed, rules=base)
    torch.testing.assert_close(rel, ref, rtol=1e-10, atol=1e-12)
    assert abs(report.residual) < 1e-9  # the merged bias's share is booked as absorbed
    if isinstance(rule, (Gamma, ZPlus)):  # the merged sign matters: not the same as unmerged
        assert not torch.allclose(
            rel, dynamiclrp.explain(model(xa), xa, relevance=seed, rules=base)
        )


def test_canonization_needs_eval_mode_and_a_layer_feeding_only_the_batchnorm():
    torch.manual_seed(0)
    canon = Rules(add="signed", reduction="signed", canonize_batchnorm=True)
    plain = Rules(add="signed", reduction="signed")
    x = torch.randn(4, 3, 5, 5, dtype=D)
    # training mode: batch statistics, nothing is merged
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 0).train()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = dynamiclrp.explain(model(xa), xa, target=None, rules=canon)
    b = dynamiclrp.explain(model(xb), xb, target=None, rules=plain)
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    # the convolution's output also feeds a second branch: no merge
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.conv(x)
            return self.bn(h) + h

    model = _randomize(Fork(), 0)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = dynamiclrp.explain(model(xa), xa, target=None, rules=canon)
    b = dynamiclrp.explain(model(xb), xb, target=None, rules=plain)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_default_preset_leaves_batchnorm_unmerged():
    model = small_cnn_bn()
    x = torch.randn(2, 3, 16, 16, dtype=D)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = dynamiclrp.explain(model(xa), xa, target=3)
    b = dynamiclrp.explain(model(xb), xb, target=3, rules=Rules(canonize_batchnorm=False))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = dynamiclrp.explain(model(xb), xb, target=3, rules=Rules(canonize_batchnorm=True))
    assert not torch.equal(a, c)


def test_zbox_without_bias_keeps_it_out_of_the_denominator():
    lin = nn.Linear(2, 1).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0]]))
        lin.bias.fill_(0.5)
    x = torch.tensor([[0.5, 0.25]], dtype=D, requires_grad=True)
    one = torch.ones(1, 1, dtype=D)
    # without the bias: z_B = x.w - low * w+ - high * w- = (0.5 - 0.5) - 0 - (-2) = 2
    rel = dynamiclrp.explain(lin(x), x, relevance=one, rules=Rules(dense=ZBox(0.0, 1.0, False)))
    torch.testing.assert_close(rel, torch.tensor([[0.25, 0.75]], dtype=D), rtol=1e-5, atol=0)
    rel = dynamiclrp.explain(lin(x), x, relevance=one, rules=Rules(dense=ZBox(0.0, 1.0)))
    torch.testing.assert_close(rel, torch.tensor([[0.2, 0.6]], dtype=D), rtol=1e-5, atol=0)
    assert repr(ZBox(0.0, 1.0, bias=False)) == "ZBox(low=0.0, high=1.0, bias=False)"
