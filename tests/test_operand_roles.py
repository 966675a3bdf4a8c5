"""What an operand is decided from the graph's structure, not from node names or element counts.

Issue 14's reproductions, each against an independent oracle: on a function that is linear (or
piecewise linear) in the explained input, LRP-0 equals gradient x input; two spellings of one
function give one map; a product of two data factors shares its relevance uniformly (AttnLRP).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynamiclrp
from dynamiclrp.presets import PRESETS

LRP0 = dataclasses.replace(dynamiclrp.preset("epsilon"), eps=1e-12)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


def grad_x_input(fn, x: torch.Tensor) -> torch.Tensor:
    """Gradient x input of ``fn(x).sum()``, from a separate forward pass."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return (g * x).detach()


def lrp0(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    return dynamiclrp.explain(fn(x), x, rules=LRP0)


def assert_close(a, b, tol=1e-8):
    assert a.shape == b.shape
    scale = b.abs().max().clamp_min(1e-12)
    assert float((a - b).abs().max() / scale) < tol, (a, b)


# --- 1. a constant and a contraction: the coefficient goes with the product ------------------------

W = torch.randn(4, 3, dtype=torch.float64)
C = torch.randn(3, dtype=torch.float64)
SPELLINGS_OF_AFFINE = {
    "c - x @ W": lambda x: C - x @ W,
    "x @ W - c": lambda x: x @ W - C,
    "c + x @ W": lambda x: C + x @ W,
    "add(c, x @ W, alpha=2)": lambda x: torch.add(C, x @ W, alpha=2.0),
    "sub(c, x @ W, alpha=0.5)": lambda x: torch.sub(C, x @ W, alpha=0.5),
    "c + 2 * (x @ W)": lambda x: C + 2.0 * (x @ W),
    "(x @ W) / 4 - c": lambda x: (x @ W) / 4 - C,
    "c - (-(x @ W))": lambda x: C - (-(x @ W)),
    "addmm(c, x, W, alpha=-1.5)": lambda x: torch.addmm(C, x, W, alpha=-1.5),
    "einsum + c": lambda x: torch.einsum("bi,io->bo", x, W) - C,
    "3-D non-contiguous": lambda x: x.view(2, 3, 4).transpose(0, 1) @ W - C,
    "W^T x^T: data on the right": lambda x: (W.T @ x.T).T - C,
}


@pytest.mark.parametrize("name", sorted(SPELLINGS_OF_AFFINE))
def test_constant_and_contraction_lrp0_is_gradient_x_input(name):
    """``out = y_obs - x @ W`` gave exactly minus gradient x input (the bias fusion computed
    ``bias = z - f`` as if the product entered with +1)."""
    fn = SPELLINGS_OF_AFFINE[name]
    x = torch.randn(6, 4)
    assert_close(lrp0(fn, x), grad_x_input(fn, x))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_negated_product_is_the_layer_with_the_negated_weight(preset):
    """``c - x @ W``, ``c + x @ (-W)`` and ``addmm(c, x, W, alpha=-1)`` are one affine layer:
    one map under every preset (gamma and z-plus included, which look at the weight's signs)."""
    pre = nn.Linear(4, 4)
    x = torch.randn(6, 4)
    maps = []
    for fn in (
        lambda t: C - pre(t) @ W,
        lambda t: C + pre(t) @ (-W),
        lambda t: torch.addmm(C, pre(t), W, alpha=-1.0),
        lambda t: torch.add(C, pre(t) @ W, alpha=-1.0),
    ):
        t = x.clone().requires_grad_(True)
        maps.append(dynamiclrp.explain(fn(t), t, rules=preset))
    for m in maps[1:]:
        assert_close(m, maps[0], 1e-9)


def test_a_requested_bias_of_a_fused_layer_gets_its_share_and_changes_nothing_else():
    """Asking for the bias of ``x @ W + b`` (recorded as ``mm`` then ``add`` for a
    non-contiguous input) must not change the data's map, and the bias gets the share that the
    same layer written as ``addmm`` gives it."""
    b = nn.Parameter(torch.randn(3))
    x = torch.randn(2, 3, 4)

    def layer(t):
        return t.transpose(0, 1) @ W + b

    t = x.clone().requires_grad_(True)
    alone = dynamiclrp.explain(layer(t), t)
    t = x.clone().requires_grad_(True)
    both = dynamiclrp.explain(layer(t), [t, b])
    assert_close(both[0], alone, 1e-12)
    t = x.clone().requires_grad_(True)
    flat = t.transpose(0, 1).reshape(-1, 4)
    via_addmm = dynamiclrp.explain(torch.addmm(b, flat, W), [t, b])
    assert_close(both[1], via_addmm[1], 1e-10)
    assert float(both[1].abs().sum()) > 0


@pytest.mark.parametrize("preset", ["epsilon", "dynamiclrp", "gamma"])
def test_a_requested_product_of_a_fused_layer_gets_the_layer_less_the_bias(preset):
    """``h = x @ W`` requested in ``h + c``: the data below still gets the fused layer's rule (the
    same map as without the request), and ``h`` gets the layer's relevance less the constant's
    share; under LRP-0 that is gradient x ``h``."""
    x0 = torch.randn(5, 4)
    c = torch.randn(3)
    maps = []
    for ask_h in (False, True):
        x = x0.clone().requires_grad_(True)
        h = x @ W
        out = F.gelu(h + c) @ torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
        maps.append(dynamiclrp.explain(out, [x, h] if ask_h else x, rules=preset))
    assert_close(maps[1][0], maps[0], 1e-12)
    x = x0.clone().requires_grad_(True)
    h = x @ W
    out = h + c
    r_h = dynamiclrp.explain(out, [x, h], rules=LRP0)[1]
    assert_close(r_h, h.detach(), 1e-8)  # seeded with out itself: gradient x h is h


# --- 2. weights, statistics and data factors of a product ------------------------------------------


def test_an_embedding_that_is_not_requested_is_a_weight():
    """``(emb(ids) * w[..., None]).sum(1)`` is linear in ``w``: ``w`` gets gradient x input (it
    got exactly 0: the embedding output counted as data and the full-shape factor took all)."""
    emb = nn.Embedding(10, 5)
    ids = torch.randint(0, 10, (2, 3))
    w = torch.randn(2, 3)
    for fn in (
        lambda t: (emb(ids) * t[..., None]).sum(1),
        lambda t: (emb.weight[ids] * t[..., None]).sum(1),
        lambda t: (emb(ids) * t[..., None].expand(2, 3, 5)).sum(1),
    ):
        assert_close(lrp0(fn, w), grad_x_input(fn, w))


def test_an_embedding_whose_table_is_requested_is_data():
    """The table asked for in ``inputs``: its lookup is the representation of the tokens (data),
    and a product of it with another data factor shares uniformly."""
    emb = nn.Embedding(10, 5)
    ids = torch.randint(0, 10, (2, 3))
    w = torch.randn(2, 3, requires_grad=True)
    out = (emb(ids) * w[..., None]).sum(1)
    r_w, r_table = dynamiclrp.explain(out, [w, emb.weight], rules=LRP0)
    half = out.detach().sum() / 2
    assert torch.allclose(r_w.sum(), half)
    assert torch.allclose(r_table.sum(), half)


@pytest.mark.parametrize("kind", ["film", "moe"])
def test_a_gate_computed_by_a_layer_of_its_own_shares_uniformly(kind):
    """A broadcast factor is a statistic (takes nothing) only when it is a parameter-free
    function of the other factor's data or computed from the other factor itself; a FiLM scale
    or a router gate is neither: the two factors share ``R`` half and half (AttnLRP)."""
    h = torch.randn(2, 4, 5, requires_grad=True)
    cond = torch.randn(2, 3, requires_grad=True)
    lin = nn.Linear(3, 4)
    if kind == "film":
        gate = lin(cond)[:, :, None]
        inputs = [h, cond]
    else:  # experts and router both read x; the product is expert(x) * router(x)
        x = torch.randn(2, 4, 5, requires_grad=True)
        h = nn.Linear(5, 5)(x)
        gate = torch.softmax(nn.Linear(5, 1)(x), dim=1)  # (2, 4, 1): a router per token
        inputs = [x]
    prod = h * gate
    r_gate = dynamiclrp.explain(prod, inputs + [gate], rules=LRP0)[-1]
    total = prod.detach().sum()
    assert torch.allclose(r_gate.sum(), total / 2, rtol=1e-9)


@pytest.mark.parametrize(
    "spelling", ["rms", "layer-norm", "layer-norm-twice", "sum-normalise", "squeeze-excitation"]
)
def test_a_statistic_of_the_other_factor_takes_nothing(spelling):
    """Norms written out: the broadcast ``rsqrt(var)`` is a parameter-free function of the other
    factor's data, so the full-shape factor takes all of ``R`` (AttnLRP's identity rule)."""
    x = torch.randn(3, 6, requires_grad=True)
    h = nn.Linear(6, 6)(x)
    if spelling == "rms":
        full, stat = h, torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    elif spelling == "layer-norm":
        full = h - h.mean(-1, keepdim=True)
        stat = 1 / torch.sqrt(h.var(-1, keepdim=True, unbiased=False) + 1e-5)
    elif spelling == "layer-norm-twice":  # the centred values computed twice, as users write it
        mu = h.mean(-1, keepdim=True)
        full = h - mu
        stat = torch.rsqrt(((h - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
    elif spelling == "sum-normalise":
        full, stat = h, 1 / h.abs().sum(-1, keepdim=True)
    else:  # a gate computed from h itself, through layers: h rescaled by a function of h
        full, stat = h, torch.sigmoid(nn.Linear(6, 1)(torch.relu(h)))
    out = full * stat
    r_full, r_stat = dynamiclrp.explain(out, [full, stat], rules=LRP0)
    assert float(r_stat.abs().max()) == 0.0
    assert torch.allclose(r_full.sum(), out.detach().sum())


def test_a_requested_weight_factor_gets_the_rule_read_from_its_side():
    """``x * w`` with ``w`` a requested parameter: the data takes all of ``R``, and ``w`` gets
    ``R`` summed over the dimensions it is broadcast along (gradient x input: linear in ``w``)."""
    w = nn.Parameter(torch.randn(5))
    x = torch.randn(3, 5, requires_grad=True)
    out = nn.functional.relu(x) * w
    r_x, r_w = dynamiclrp.explain(out, [x, w], rules=LRP0)
    (g,) = torch.autograd.grad(out.sum(), w)
    assert_close(r_w, (g * w).detach())
    assert torch.allclose(r_x.sum(), out.detach().sum())


# --- 3. a constant member of cat / stack ----------------------------------------------------------


@pytest.mark.parametrize("join", ["cat", "stack"])
def test_a_constant_member_before_a_softmax_needs_and_takes_a_recording(join):
    """An attention sink ``cat([s, zeros])`` before a softmax crashed while replaying the cat
    (its constant member is not recorded): without ``record()`` the error asks for it, with it the
    map equals the one where the constant requires grad (and is not requested)."""
    s = torch.randn(2, 4, requires_grad=True)

    def model(t, sink):
        joined = torch.cat([t, sink], 1) if join == "cat" else torch.stack([t, sink], 1)
        return torch.softmax(joined.flatten(1), 1)

    with pytest.raises(dynamiclrp.errors.ValueRecoveryError, match="record"):
        dynamiclrp.explain(model(s, torch.zeros_like(s[:, :1] if join == "cat" else s)), s)
    with dynamiclrp.record() as rec:
        out = model(s, torch.zeros_like(s[:, :1] if join == "cat" else s))
    recorded = dynamiclrp.explain(out, s, recording=rec)
    sink = torch.zeros_like(s[:, :1] if join == "cat" else s).requires_grad_(True)
    reference = dynamiclrp.explain(model(s, sink), s)
    assert_close(recorded, reference, 1e-12)


# --- 5. an operand alone, the others held constant --------------------------------------------------


@pytest.mark.parametrize("explained", ["q", "k", "v"])
@pytest.mark.parametrize("preset", ["epsilon", "attnlrp", "dynamiclrp"])
def test_fused_attention_with_constant_operands_equals_the_written_out_one(explained, preset):
    """``F.scaled_dot_product_attention(q, k, v)`` with two of ``q, k, v`` constant: the fused
    rule gave ``v`` half of its relevance where ``softmax(q k^T / sqrt(d)) @ v`` written out gives
    it all (a product halves only between two data factors)."""
    torch.set_default_dtype(torch.float32)
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    q, k, v = (
        t.requires_grad_(name == explained) for t, name in zip((q, k, v), "qkv", strict=True)
    )
    t = {"q": q, "k": k, "v": v}[explained]
    fused = F.scaled_dot_product_attention(q, k, v)
    assert "ScaledDotProduct" in type(fused.grad_fn).__name__
    written = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
    a = dynamiclrp.explain(fused, t, rules=preset)
    b = dynamiclrp.explain(written, t, rules=preset)
    assert_close(a, b, 2e-4)


@pytest.mark.parametrize("norm", ["layer", "group", "batch-eval", "batch-pass"])
def test_a_requested_norm_weight_gets_gradient_x_input(norm):
    """The weight of a norm asked for in ``inputs`` came back as 0.  With the statistics held
    constant and the bias zero, ``y = xhat * w`` is linear in ``w``: LRP-0 = gradient x input."""
    rules = LRP0
    if norm == "layer":
        mod = nn.LayerNorm(5)
        x = torch.randn(3, 5, requires_grad=True)
    elif norm == "group":
        mod = nn.GroupNorm(2, 4)
        x = torch.randn(3, 4, 5, requires_grad=True)
    else:
        mod = nn.BatchNorm1d(4)
        mod.running_mean.normal_()
        mod.running_var.uniform_(0.5, 2.0)
        x = torch.randn(3, 4, 5, requires_grad=True)
        if norm == "batch-pass":
            rules = dataclasses.replace(LRP0, batchnorm="pass")
    mod.eval()
    with torch.no_grad():
        mod.weight.normal_()
        mod.bias.zero_()
    out = mod(x)
    r_w = dynamiclrp.explain(out, [x, mod.weight], rules=rules)[1]
    (g,) = torch.autograd.grad(out.sum(), mod.weight)
    assert_close(r_w, (g * mod.weight).detach(), 1e-9)


# --- 6. fused products and their expansions ---------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize(
    "which", ["baddbmm-all-data", "addmm-data-c", "addmm-two-data", "addmm-alpha-beta"]
)
def test_fused_products_equal_their_expansion(preset, which):
    """``baddbmm(c, a, b)`` vs ``c + bmm(a, b)`` differed by 0.7 relative (the added term was left
    out of the bilinear rule): now every slot, under every preset, gets what the expansion
    gives."""
    torch.manual_seed(1)
    shapes = {
        "baddbmm-all-data": ((2, 3, 5), (2, 3, 4), (2, 4, 5)),
        "addmm-data-c": ((3, 5), (3, 4), (4, 5)),
        "addmm-two-data": ((3, 5), (3, 4), (4, 5)),
        "addmm-alpha-beta": ((3, 5), (3, 4), (4, 5)),
    }[which]
    base = [torch.randn(s) for s in shapes]
    grads = {
        "baddbmm-all-data": (True, True, True),
        "addmm-data-c": (True, True, False),
        "addmm-two-data": (False, True, True),
        "addmm-alpha-beta": (True, True, True),
    }[which]
    alpha, beta = (0.5, 2.0) if which == "addmm-alpha-beta" else (1.0, 1.0)

    def fused(c, a, b):
        if which.startswith("baddbmm"):
            return torch.baddbmm(c, a, b, alpha=alpha, beta=beta)
        return torch.addmm(c, a, b, alpha=alpha, beta=beta)

    def expanded(c, a, b):
        prod = torch.bmm(a, b) if which.startswith("baddbmm") else a @ b
        return beta * c + alpha * prod

    results = []
    for fn in (fused, expanded):
        ts = [t.clone().requires_grad_(g) for t, g in zip(base, grads, strict=True)]
        wanted = [t for t in ts if t.requires_grad]
        results.append(dynamiclrp.explain(fn(*ts), wanted, rules=preset))
    for a, b in zip(*results, strict=True):
        assert_close(a, b, 1e-9)


def test_an_infinite_mask_fused_as_a_bias_takes_nothing():
    """2-D SDPA on PyTorch's math path adds its causal mask to ``q @ K^T`` (``K`` constant): the
    ``-inf`` entries are the fused layer's bias and take nothing (``-inf * 0`` was NaN); the map
    equals the one of the same attention written with ``masked_fill``."""
    torch.set_default_dtype(torch.float32)
    q, k, v = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8), torch.randn(4, 8)
    with dynamiclrp.record() as rec:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    fused = dynamiclrp.explain(out, q, recording=rec)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    scores = ((q @ k.T) / 8**0.5).masked_fill(~causal, float("-inf"))
    written = dynamiclrp.explain(torch.softmax(scores, -1) @ v, q)
    assert_close(fused, written, 1e-5)


def test_a_cached_plan_reads_the_coefficient_of_each_call():
    """The plan is cached by structure, and ``alpha`` is not structure: the fused layer's
    coefficient is read from the node on every call (a cached plan must not serve the previous
    call's ``alpha``)."""
    lrp = dynamiclrp.LRP(LRP0)
    x0 = torch.randn(6, 4)
    for alpha in (1.0, 2.0, -0.5):

        def fn(t, alpha=alpha):
            return torch.add(C, t @ W, alpha=alpha)

        x = x0.clone().requires_grad_(True)
        rel = lrp.explain(fn(x), x)
        assert_close(rel, grad_x_input(fn, x0))
    assert lrp.last_plan_cached
