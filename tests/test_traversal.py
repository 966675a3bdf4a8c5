"""Traversal properties of the engine: each node once, sums over all paths, intermediate inputs,
batch independence, repeated and cached runs.

Expected values are independent of dynamiclrp: gradient x input from ``torch.autograd.grad`` (LRP-0
on a bias-free ReLU network equals it), conservation of the seed, and hand-written layer-by-layer
LRP (``R_x = x * W^T (R / stab(z))`` per linear layer, the proportional add split) on detached
activations.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracle import gen

import dynamiclrp
from dynamiclrp import Rules, ZPlus

DT = torch.float64
EPS = 1e-12
LRP0 = Rules(eps=EPS, add="signed", reduction="signed")


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=DT)


def param(g: torch.Generator, *shape: int) -> nn.Parameter:
    return nn.Parameter(randn(g, *shape))


def stab(z: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    sign = torch.ones_like(z)
    sign[z < 0] = -1.0
    return z + eps * sign


def dense_eps(x, w, r, eps: float = EPS):
    """Epsilon rule for ``z = x @ w``."""
    x, w = x.detach(), w.detach()
    return x * ((r / stab(x @ w, eps)) @ w.T)


def proportional(r, a, b):
    a, b = a.detach().abs(), b.detach().abs()
    den = a + b
    g = torch.where(den > 0, r / torch.where(den > 0, den, 1.0), 0.0)
    return a * g, b * g


def close(actual, expected, rtol=1e-9, atol=1e-11):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def target_seed(out: torch.Tensor, target) -> torch.Tensor:
    """Gradient of the selected logits (one per row) w.r.t. the output: the LRP-0 seed / output."""
    t = torch.as_tensor(target).expand(out.shape[0])
    return out.detach()[torch.arange(out.shape[0]), t]


def grad_x_input(model, x, target):
    xi = x.detach().clone().requires_grad_(True)
    out = model(xi)
    t = torch.as_tensor(target).expand(out.shape[0])
    sel = out[torch.arange(out.shape[0]), t].sum()
    (gx,) = torch.autograd.grad(sel, xi)
    return gx * xi.detach()


# --- models --------------------------------------------------------------------------------


class ResMLP(nn.Module):
    """Bias-free ReLU MLP with a skip connection (the signed add keeps LRP-0 = grad x input)."""

    def __init__(self, g, d_in=6, d=8, d_out=4):
        super().__init__()
        self.w1 = param(g, d_in, d)
        self.w2 = param(g, d, d)
        self.w3 = param(g, d, d_out)

    def forward(self, x):
        h = torch.relu(x @ self.w1)
        h = h + torch.relu(h @ self.w2)
        return h @ self.w3


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(6, 5, bias=False),
    ).double()


def mlp(seed: int, bias=False) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 10, bias=bias),
        nn.ReLU(),
        nn.Linear(10, 8, bias=bias),
        nn.ReLU(),
        nn.Linear(8, 4, bias=bias),
    ).double()


# --- LRP-0 == gradient x input; conservation --------------------------------------------------


@pytest.mark.parametrize("which", ["mlp", "resmlp", "cnn"])
def test_lrp0_equals_gradient_times_input(which):
    g = gen(1)
    if which == "mlp":
        model, x = mlp(1), randn(g, 3, 6)
    elif which == "resmlp":
        model, x = ResMLP(g), randn(g, 3, 6)
    else:
        model, x = cnn(1), randn(g, 3, 2, 8, 8)
    target = [0, 2, 1]
    x.requires_grad_(True)
    rel = dynamiclrp.explain(model(x), x, target=target, rules=LRP0)
    close(rel, grad_x_input(model, x, target), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("which", ["mlp", "cnn"])
@pytest.mark.parametrize("rule", ["epsilon", "zplus"])
def test_conservation_on_bias_free_relu_nets(which, rule):
    g = gen(2)
    if which == "mlp":
        model, x = mlp(2), randn(g, 4, 6)
    else:
        model, x = cnn(2), randn(g, 4, 2, 8, 8)
    if rule == "zplus":
        x = x.abs() + 0.1  # z-plus conserves on positive inputs
        rules = Rules(eps=1e-9, dense=ZPlus(), conv=ZPlus())
    else:
        rules = Rules(eps=1e-9)
    x.requires_grad_(True)
    out = model(x)
    # the arg-max class has a positive logit, hence a positive contribution (z+ > 0) at every
    # neuron that carries relevance: z-plus conserves there
    target = out.detach().argmax(1)
    if rule == "zplus":
        assert (out.detach().max(1).values > 0).all()
    rel, rep = dynamiclrp.explain(out, x, target=target, rules=rules, return_report=True)
    seed = target_seed(out, target)
    per_row = rel.flatten(1).sum(1)
    torch.testing.assert_close(per_row, seed, rtol=1e-6, atol=1e-9)
    assert rep.seeded == pytest.approx(float(seed.sum()), rel=1e-12)


def test_zplus_matches_hand_formula_on_mlp():
    g = gen(3)
    model = mlp(3)
    x = (randn(g, 2, 6).abs() + 0.1).requires_grad_(True)
    out = model(x)
    rel = dynamiclrp.explain(out, x, target=1, rules=Rules(eps=1e-9, dense=ZPlus(), conv=ZPlus()))

    def zplus(a, w, r):  # z = a @ w.T (nn.Linear layout), a >= 0
        wp = w.detach().clamp(min=0)
        zp = a @ wp.T
        return a * ((r / stab(zp, 1e-9)) @ wp)

    a0 = x.detach()
    a1 = torch.relu(a0 @ model[0].weight.detach().T)
    a2 = torch.relu(a1 @ model[2].weight.detach().T)
    r = torch.zeros(2, 4, dtype=DT)
    r[:, 1] = out.detach()[:, 1]
    r = zplus(a2, model[4].weight, r)
    r = zplus(a1, model[2].weight, r)
    r = zplus(a0, model[0].weight, r)
    close(rel, r, rtol=1e-9)


# --- each node once: sums over all paths --------------------------------------------------


def test_leaf_reached_by_three_paths_gets_the_sum():
    """x reaches the output by paths of length 1, 3 and 5; its relevance is the sum of all three
    (pitfall: the first pass stopped when every leaf had *some* relevance)."""
    g = gen(4)
    x = randn(g, 1, 5).requires_grad_(True)
    W1, W2, W3, W4, W5 = (param(g, 5, 5) for _ in range(5))
    p1 = x @ W1
    p2 = torch.relu(x @ W2) @ W3
    p3 = torch.relu(torch.relu(x @ W4) @ W5).neg().neg()
    y = (p1 + p2) + p3
    rel = dynamiclrp.explain(y, x, rules=Rules(eps=EPS))

    xd = x.detach()
    v1 = xd @ W1.detach()
    h2 = torch.relu(xd @ W2.detach())
    v2 = h2 @ W3.detach()
    h4 = torch.relu(xd @ W4.detach())
    v3 = torch.relu(h4 @ W5.detach())
    r12, r3 = proportional(v1 + v2 + v3, v1 + v2, v3)
    r1, r2 = proportional(r12, v1, v2)
    e1 = dense_eps(xd, W1, r1)
    e2 = dense_eps(xd, W2, dense_eps(h2, W3, r2))
    e3 = dense_eps(xd, W4, dense_eps(h4, W5, r3))
    close(rel, e1 + e2 + e3)
    # every path contributes: no single path, and no pair of paths, gives the answer
    for partial in (e1, e2, e3, e1 + e2, e1 + e3, e2 + e3):
        assert not torch.allclose(rel, partial, rtol=1e-3, atol=1e-6)


def test_tensor_used_several_times_in_one_op():
    """``x * x`` sends two halves to x (uniform rule), ``x + x`` two proportional halves: x gets
    both shares."""
    g = gen(5)
    x = randn(g, 1, 4).requires_grad_(True)
    W = param(g, 4, 3)
    h = torch.relu(x @ W)
    y = h + h
    rel = dynamiclrp.explain(y, x, rules=Rules(eps=EPS))
    close(rel, dense_eps(x, W, 2 * torch.relu(x.detach() @ W.detach())))


@pytest.mark.parametrize("layout", ["matmul", "linear"])
def test_tied_weight_relevance_is_sum_of_both_uses(layout):
    g = gen(6)
    x = randn(g, 2, 5).requires_grad_(True)
    W = param(g, 5, 5)
    if layout == "matmul":

        def f(a, w):
            return a @ w
    else:

        def f(a, w):
            return F.linear(a, w)

    h = torch.relu(f(x, W))
    y = f(h, W)
    rx, rw = dynamiclrp.explain(y, (x, W), rules=Rules(eps=EPS))

    # by hand, both uses: for z = a @ M, R_a = a * (g @ M.T), R_M = M * (a.T @ g), g = R / stab(z)
    M = W.detach() if layout == "matmul" else W.detach().T
    xd = x.detach()
    z1 = xd @ M
    hv = torch.relu(z1)
    z2 = hv @ M
    g2 = y.detach() / stab(z2)
    r_h = hv * (g2 @ M.T)
    rw2 = M * (hv.T @ g2)
    g1 = r_h / stab(z1)
    rw1 = M * (xd.T @ g1)
    r_x = xd * (g1 @ M.T)
    rw_total = rw1 + rw2
    if layout == "linear":
        rw_total, rw1, rw2 = rw_total.T, rw1.T, rw2.T
    close(rx, r_x)
    close(rw, rw_total)
    assert not torch.allclose(rw, rw1) and not torch.allclose(rw, rw2)


# --- intermediate tensors as inputs -----------------------------------------------------------


def _two_path_net(seed):
    g = gen(seed)
    x = randn(g, 2, 5).requires_grad_(True)
    W1, W2, W3, W4 = param(g, 5, 6), param(g, 6, 6), param(g, 6, 3), param(g, 6, 3)
    z1 = x @ W1
    h1 = torch.relu(z1)
    h2 = torch.relu(h1 @ W2)
    y = h2 @ W3 + h1 @ W4  # h1 used twice
    # by hand
    xd = x.detach()
    hv1 = torch.relu(xd @ W1.detach())
    hv2 = torch.relu(hv1 @ W2.detach())
    a, b = hv2 @ W3.detach(), hv1 @ W4.detach()
    ra, rb = proportional(a + b, a, b)
    r_h1 = dense_eps(hv1, W2, dense_eps(hv2, W3, ra)) + dense_eps(hv1, W4, rb)
    r_x = dense_eps(xd, W1, r_h1)
    return x, z1, h1, y, r_h1, r_x


def test_intermediate_tensor_relevance_matches_hand():
    x, z1, h1, y, r_h1, r_x = _two_path_net(7)
    rules = Rules(eps=EPS)
    close(dynamiclrp.explain(y, h1, rules=rules), r_h1)
    close(dynamiclrp.explain(y, z1, rules=rules), r_h1)  # relu passes R unchanged
    close(dynamiclrp.explain(y, x, rules=rules), r_x)


def test_requesting_an_intermediate_does_not_change_the_leaf():
    x, z1, h1, y, r_h1, r_x = _two_path_net(8)
    rules = Rules(eps=EPS)
    alone = dynamiclrp.explain(y, x, rules=rules)
    rx, rh, rz = dynamiclrp.explain(y, (x, h1, z1), rules=rules)
    rh2, rx2 = dynamiclrp.explain(y, (h1, x), rules=rules)
    close(rx, r_x)
    close(rh, r_h1)
    close(rz, r_h1)
    close(rx2, r_x)
    close(rh2, r_h1)
    assert torch.equal(rx, alone)


# --- batch == per-row -------------------------------------------------------------------------


class BatchNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.l1 = nn.Linear(6, 8)
        self.l2 = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.l3 = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.l1(x))
        h = h + self.l2(h).view(-1, 2, 4).transpose(1, 2).reshape(-1, 8)
        h = self.norm(h)
        s = torch.softmax(h, -1) * h
        return self.l3(s + h.mean(-1, keepdim=True))


@pytest.mark.parametrize("which", ["net", "cnn"])
@pytest.mark.parametrize("rules", ["dynamiclrp", "epsilon"])
def test_batch_equals_each_row_alone(which, rules):
    g = gen(10)
    if which == "net":
        model, x = BatchNet().double(), randn(g, 4, 6)
    else:
        model, x = cnn(10), randn(g, 4, 2, 8, 8)
    model.eval()
    target = [0, 2, 1, 3]
    xb = x.clone().requires_grad_(True)
    batch = dynamiclrp.explain(model(xb), xb, target=target, rules=rules)
    for i, t in enumerate(target):
        xi = x[i : i + 1].clone().requires_grad_(True)
        row = dynamiclrp.explain(model(xi), xi, target=t, rules=rules)
        close(batch[i : i + 1], row, rtol=1e-10, atol=1e-12)


# --- repeated runs, several explainers, the plan cache ------------------------------------------


def hand_mlp_eps(model, x, target, eps):
    """Epsilon-LRP through a bias-free ``mlp()`` by hand."""
    ws = [model[i].weight.detach().T for i in (0, 2, 4)]
    acts = [x.detach()]
    for w in ws[:-1]:
        acts.append(torch.relu(acts[-1] @ w))
    out = acts[-1] @ ws[-1]
    r = torch.zeros_like(out)
    rows = torch.arange(out.shape[0])
    t = torch.as_tensor(target).expand(out.shape[0])
    r[rows, t] = out[rows, t]
    for a, w in zip(reversed(acts), reversed(ws), strict=True):
        r = dense_eps(a, w, r, eps)
    return r


def test_repeated_calls_identical():
    g = gen(11)
    model = mlp(11)
    x = randn(g, 3, 6).requires_grad_(True)
    out = model(x)
    first = dynamiclrp.explain(out, x, target=2, rules=LRP0)
    second = dynamiclrp.explain(out, x, target=2, rules=LRP0)
    lrp = dynamiclrp.LRP(LRP0)
    third = lrp.explain(out, x, target=2)
    fourth = lrp.explain(out, x, target=2)
    for r in (second, third, fourth):
        assert torch.equal(first, r)
    close(first, grad_x_input(model, x, 2), rtol=1e-7, atol=1e-10)


def test_two_explainers_do_not_interfere():
    g = gen(12)
    model = mlp(12)
    lrp_a = dynamiclrp.LRP(Rules(eps=EPS))
    lrp_b = dynamiclrp.LRP(Rules(eps=0.5))
    xs = [randn(g, 2, 6).requires_grad_(True) for _ in range(3)]
    for x in xs:
        out = model(x)
        ra = lrp_a.explain(out, x, target=1)
        rb = lrp_b.explain(out, x, target=1)
        ra2 = lrp_a.explain(out, x, target=1)
        close(ra, hand_mlp_eps(model, x, 1, EPS))
        close(rb, hand_mlp_eps(model, x, 1, 0.5))
        assert torch.equal(ra, ra2)
        assert not torch.allclose(ra, rb)


class CacheNet(nn.Module):
    """Residual MLP with promises: y = (h + relu(h W2) W3) W4, h = relu(x W1)."""

    def __init__(self, seed):
        super().__init__()
        g = gen(seed)
        self.w1, self.w2, self.w3, self.w4 = (
            param(g, 5, 6),
            param(g, 6, 6),
            param(g, 6, 6),
            param(g, 6, 3),
        )

    def forward(self, x):
        h = torch.relu(x @ self.w1)
        return (h + (torch.relu(h @ self.w2) @ self.w3).view(-1, 6)) @ self.w4

    def hand(self, x, target):
        w1, w2, w3, w4 = (w.detach() for w in (self.w1, self.w2, self.w3, self.w4))
        xd = x.detach()
        h = torch.relu(xd @ w1)
        r = torch.relu(h @ w2)
        f = r @ w3
        h2 = h + f
        out = h2 @ w4
        seed = torch.zeros_like(out)
        rows = torch.arange(out.shape[0])
        seed[rows, target] = out[rows, target]
        r_h2 = dense_eps(h2, w4, seed)
        r_skip, r_f = proportional(r_h2, h, f)
        r_h = r_skip + dense_eps(h, w2, dense_eps(r, w3, r_f))
        return dense_eps(xd, w1, r_h)


class OtherNet(nn.Module):
    def __init__(self, seed):
        super().__init__()
        g = gen(seed)
        self.w1, self.w2 = param(g, 5, 7), param(g, 7, 3)

    def forward(self, x):
        return torch.relu(x @ self.w1).neg().neg() @ self.w2

    def hand(self, x, target):
        xd = x.detach()
        h = torch.relu(xd @ self.w1.detach())
        out = h @ self.w2.detach()
        seed = torch.zeros_like(out)
        rows = torch.arange(out.shape[0])
        seed[rows, target] = out[rows, target]
        return dense_eps(xd, self.w1, dense_eps(h, self.w2, seed))


def test_cached_plan_reused_for_same_architecture_and_rebuilt_for_another():
    g = gen(13)
    rules = Rules(eps=EPS)
    lrp = dynamiclrp.LRP(rules)
    net_a, net_a2, net_b = CacheNet(1), CacheNet(2), OtherNet(3)
    target = [0, 2]

    def run(net):
        x = randn(g, 2, 5).requires_grad_(True)
        rel = lrp.explain(net(x), x, target=target)
        return x, rel

    x, rel = run(net_a)
    assert lrp.last_plan_cached is False
    close(rel, net_a.hand(x, target))

    x, rel = run(net_a)  # new input, same model: the plan (and its promise sources) is reused
    assert lrp.last_plan_cached is True
    close(rel, net_a.hand(x, target))
    fresh = dynamiclrp.explain(net_a(x), x, target=target, rules=rules)
    torch.testing.assert_close(rel, fresh, rtol=1e-6, atol=1e-12)

    x, rel = run(net_a2)  # other weights, same architecture: still the same plan
    assert lrp.last_plan_cached is True
    close(rel, net_a2.hand(x, target))

    x, rel = run(net_b)  # another architecture: a new plan, and the right answer
    assert lrp.last_plan_cached is False
    close(rel, net_b.hand(x, target))

    x, rel = run(net_a)  # back to the first: cached again, still right
    assert lrp.last_plan_cached is True
    close(rel, net_a.hand(x, target))


def test_cache_distinguishes_requested_inputs_and_batch_size():
    g = gen(14)
    rules = Rules(eps=EPS)
    lrp = dynamiclrp.LRP(rules)
    net = CacheNet(4)
    x = randn(g, 2, 5).requires_grad_(True)
    lrp.explain(net(x), x, target=[1, 1])
    rx, rw = lrp.explain(net(x), (x, net.w4), target=[1, 1])
    assert lrp.last_plan_cached is False  # other requested inputs: another plan
    close(rx, net.hand(x, [1, 1]))
    x3 = randn(g, 3, 5).requires_grad_(True)
    rel = lrp.explain(net(x3), x3, target=[0, 1, 2])
    close(rel, net.hand(x3, [0, 1, 2]))
