"""Contractions at engine level (``dynamiclrp.rules.contraction``): linear layers, convolutions,
batched products, einsum, requested weights and per-layer rule overrides.

Every layer is written here as a dense matrix ``M`` acting on one flattened sample (for
convolutions ``M`` is built by pushing unit basis vectors through ``torch.nn.functional``), so the
expected values are the textbook formulas:

- epsilon rule: ``z = M x + b``, ``R_x = x * M^T (R / stab(z))``, the bias absorbs ``b R / stab(z)``;
- weight relevance (requested Parameter): ``R_w = w * J_w^T (R / stab(z))``, i.e. the sum of the
  term relevances ``x_i w_ij R_j / stab(z_j)`` per weight entry;
- two data operands (``bmm``): each product term ``a_ik b_kj R_ij / stab(z_ij)`` gives half to each
  factor;
- z-plus (override): ``R_x = sum_j c+_ij R_j / stab(z+_j)``, ``z+_j = sum_i c+_ij + b+_j``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from oracle import close, gen, randn, stab

import dynamiclrp

DT = torch.float64
EPS = 0.01
RULES = dynamiclrp.Rules(eps=EPS)


def init_(module: torch.nn.Module, g: torch.Generator) -> torch.nn.Module:
    module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.5)
    return module


def dense(f, in_shape) -> torch.Tensor:
    """The matrix of the linear map ``f`` (one sample of shape ``in_shape``, no bias)."""
    n = int(torch.tensor(in_shape).prod())
    with torch.no_grad():
        cols = f(torch.eye(n, dtype=DT).reshape(n, *in_shape)).reshape(n, -1)
    return cols.T  # (n_out, n_in)


def epsilon_dense(M, x, b, R, eps):
    """Epsilon rule per sample: ``x`` (B, n_in), ``b`` (n_out,) or None, ``R`` (B, n_out)."""
    x = x.detach()
    z = x @ M.T + (0 if b is None else b)
    gz = R / stab(z, eps)
    rx = x * (gz @ M)
    rb = None if b is None else (b * gz)
    return rx, rb, z


# --- dense layers ----------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_shape", [(3, 4), (2, 3, 4), (2, 2, 3, 4)])
def test_nn_linear(in_shape, bias: bool) -> None:
    g = gen(0)
    lin = init_(torch.nn.Linear(4, 5, bias=bias), g)
    x = randn(g, *in_shape, grad=True)
    out = lin(x)
    R = randn(g, *out.shape)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, rules=RULES, return_report=True)
    W = lin.weight.detach()
    b = lin.bias.detach() if bias else None
    ex, eb, z = epsilon_dense(W, x.reshape(-1, 4), b, R.reshape(-1, 5), EPS)
    close(z, out.detach().reshape(-1, 5))
    close(rx, ex.reshape(x.shape))
    assert rep.absorbed == pytest.approx(0.0 if eb is None else float(eb.sum()), abs=1e-9)
    assert abs(rep.residual) < 1e-9


def test_linear_by_hand_loops() -> None:
    g = gen(1)
    lin = init_(torch.nn.Linear(3, 2), g)
    x, R = randn(g, 1, 3, grad=True), randn(g, 1, 2)
    rx = dynamiclrp.explain(lin(x), x, relevance=R, rules=RULES)
    W, b, xd = lin.weight.detach(), lin.bias.detach(), x.detach()
    for i in range(3):
        tot = 0.0
        for j in range(2):
            z = sum(float(xd[0, k] * W[j, k]) for k in range(3)) + float(b[j])
            tot += float(xd[0, i] * W[j, i]) * float(R[0, j]) / (z + EPS * (1 if z >= 0 else -1))
        assert float(rx[0, i]) == pytest.approx(tot, rel=1e-10)


def test_addmm_alpha_beta() -> None:
    g = gen(2)
    x, W, b, R = (
        randn(g, 3, 4, grad=True),
        torch.nn.Parameter(randn(g, 4, 5)),
        torch.nn.Parameter(randn(g, 5)),
        randn(g, 3, 5),
    )
    out = torch.addmm(b, x, W, beta=2.0, alpha=0.5)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, rules=RULES, return_report=True)
    M = 0.5 * W.detach().T
    ex, eb, _ = epsilon_dense(M, x, 2.0 * b.detach(), R, EPS)
    close(rx, ex)
    assert rep.absorbed == pytest.approx(float(eb.sum()), abs=1e-9)


def test_matmul_with_constant_weight_first() -> None:
    """``W @ x`` with the weight as the first operand: the data operand is the second one."""
    g = gen(3)
    W, x, R = torch.nn.Parameter(randn(g, 5, 4)), randn(g, 4, 3, grad=True), randn(g, 5, 3)
    rx = dynamiclrp.explain(W @ x, x, relevance=R, rules=RULES)
    ex, _, _ = epsilon_dense(W.detach(), x.T, None, R.T, EPS)
    close(rx, ex.T)


# --- two data operands -----------------------------------------------------------------------


def test_bmm_of_two_data_operands_uniform() -> None:
    g = gen(4)
    a, b, R = randn(g, 2, 3, 4, grad=True), randn(g, 2, 4, 5, grad=True), randn(g, 2, 3, 5)
    (ra, rb), rep = dynamiclrp.explain(
        torch.bmm(a, b), [a, b], relevance=R, rules=RULES, return_report=True
    )
    ad, bd = a.detach(), b.detach()
    z = torch.einsum("nik,nkj->nij", ad, bd)
    T = torch.einsum("nik,nkj->nikj", ad, bd) * (R / stab(z, EPS)).unsqueeze(2)
    close(ra, 0.5 * T.sum(3))
    close(rb, 0.5 * T.sum(1))
    close(ra.sum(), rb.sum())
    assert abs(rep.residual) < 1e-9


def test_mm_of_two_data_operands_uniform() -> None:
    g = gen(5)
    a, b, R = randn(g, 3, 4, grad=True), randn(g, 4, 2, grad=True), randn(g, 3, 2)
    ra, rb = dynamiclrp.explain(a @ b, [a, b], relevance=R, rules=RULES)
    z = a.detach() @ b.detach()
    T = torch.einsum("ik,kj->ikj", a.detach(), b.detach()) * (R / stab(z, EPS)).unsqueeze(1)
    close(ra, 0.5 * T.sum(2))
    close(rb, 0.5 * T.sum(0))


# --- convolutions ----------------------------------------------------------------------------

CONVS = {
    "conv1d_s2_p1": lambda: torch.nn.Conv1d(2, 3, 3, stride=2, padding=1),
    "conv1d_dil2_groups2": lambda: torch.nn.Conv1d(4, 2, 2, dilation=2, groups=2),
    "conv2d_s2_p1": lambda: torch.nn.Conv2d(2, 3, 3, stride=2, padding=1),
    "conv2d_dil2_p2": lambda: torch.nn.Conv2d(2, 2, 3, padding=2, dilation=2),
    "conv2d_groups2_rect": lambda: torch.nn.Conv2d(4, 4, (2, 3), stride=(1, 2), groups=2),
    "conv2d_depthwise_nobias": lambda: torch.nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False),
    "conv3d_s2_p1": lambda: torch.nn.Conv3d(2, 2, 3, stride=2, padding=1),
    "convT2d_s2": lambda: torch.nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),
    "convT2d_groups": lambda: torch.nn.ConvTranspose2d(4, 2, 2, stride=1, groups=2, dilation=2),
}
IN_SHAPES = {"conv1d": (7,), "conv2d": (5, 6), "conv3d": (4, 4, 4), "convT2d": (3, 4)}


@pytest.mark.parametrize("name", list(CONVS))
def test_convolutions(name: str) -> None:
    g = gen(6)
    conv = init_(CONVS[name](), g)
    spatial = IN_SHAPES[name.split("_")[0]]
    cin = conv.in_channels
    x = randn(g, 2, cin, *spatial, grad=True)
    out = conv(x)
    R = randn(g, *out.shape)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, rules=RULES, return_report=True)
    conv_nb = type(conv)(**_conv_kwargs(conv)).double()
    with torch.no_grad():
        conv_nb.weight.copy_(conv.weight)
    M = dense(conv_nb, (cin, *spatial))
    b = None
    if conv.bias is not None:
        b = conv.bias.detach().repeat_interleave(out[0, 0].numel())
    ex, eb, z = epsilon_dense(M, x.reshape(2, -1), b, R.reshape(2, -1), EPS)
    close(z, out.detach().reshape(2, -1))
    close(rx, ex.reshape(x.shape))
    assert rep.absorbed == pytest.approx(0.0 if eb is None else float(eb.sum()), abs=1e-9)


def _conv_kwargs(conv) -> dict:
    kw = dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=False,
    )
    if isinstance(conv, torch.nn.ConvTranspose2d):
        kw["output_padding"] = conv.output_padding
    return kw


# --- einsum ----------------------------------------------------------------------------------


@pytest.mark.parametrize("eq", ["bi,oi->bo", "bti,io->bto", "oi,bi->bo"])
def test_einsum_with_a_weight(eq: str) -> None:
    g = gen(7)
    if eq == "bti,io->bto":
        x, W = randn(g, 2, 3, 4, grad=True), torch.nn.Parameter(randn(g, 4, 5))
        out = torch.einsum(eq, x, W)
        M = W.detach().T
    elif eq == "bi,oi->bo":
        x, W = randn(g, 3, 4, grad=True), torch.nn.Parameter(randn(g, 5, 4))
        out = torch.einsum(eq, x, W)
        M = W.detach()
    else:
        x, W = randn(g, 3, 4, grad=True), torch.nn.Parameter(randn(g, 5, 4))
        out = torch.einsum(eq, W, x)
        M = W.detach()
    R = randn(g, *out.shape)
    rx = dynamiclrp.explain(out, x, relevance=R, rules=RULES)
    ex, _, _ = epsilon_dense(M, x.reshape(-1, 4), None, R.reshape(-1, 5), EPS)
    close(rx, ex.reshape(x.shape))


# --- requested weights -----------------------------------------------------------------------


def test_requested_linear_weight() -> None:
    g = gen(8)
    lin = init_(torch.nn.Linear(4, 3), g)
    x = randn(g, 5, 4, grad=True)
    out = lin(x)
    R = randn(g, 5, 3)
    rx_alone = dynamiclrp.explain(out, x, relevance=R, rules=RULES)
    (rx, rw), rep = dynamiclrp.explain(
        out, [x, lin.weight], relevance=R, rules=RULES, return_report=True
    )
    close(rx, rx_alone)
    xd, W, b = x.detach(), lin.weight.detach(), lin.bias.detach()
    gz = R / stab(xd @ W.T + b, EPS)
    T = xd[:, None, :] * W[None, :, :] * gz[:, :, None]  # (batch, out, in) term relevances
    close(rw, T.sum(0))
    close(rx, T.sum(1))
    assert rep.parameters[1] == pytest.approx(float(rw.sum()))
    assert rep.inputs[0] == pytest.approx(float(rx.sum()))


def test_requested_linear_weight_keeps_the_books() -> None:
    g = gen(8)
    lin = init_(torch.nn.Linear(4, 3), g)
    x = randn(g, 5, 4, grad=True)
    out = lin(x)
    R = randn(g, 5, 3)
    _, rep_alone = dynamiclrp.explain(out, x, relevance=R, rules=RULES, return_report=True)
    _, rep = dynamiclrp.explain(out, [x, lin.weight], relevance=R, rules=RULES, return_report=True)
    assert rep.absorbed == pytest.approx(rep_alone.absorbed)
    assert abs(rep.residual) < 1e-9


def test_requested_conv_weight() -> None:
    g = gen(9)
    conv = init_(torch.nn.Conv2d(2, 3, 3, stride=2, padding=1), g)
    x = randn(g, 2, 2, 5, 5, grad=True)
    out = conv(x)
    R = randn(g, *out.shape)
    rx_alone = dynamiclrp.explain(out, x, relevance=R, rules=RULES)
    rx, rw = dynamiclrp.explain(out, [x, conv.weight], relevance=R, rules=RULES)
    close(rx, rx_alone)
    # J_w^T g by autograd on a fresh conv (not dynamiclrp): d/dw <conv(x, w), g>
    gz = R / stab(out.detach(), EPS)
    w = conv.weight.detach().clone().requires_grad_()
    (jw,) = torch.autograd.grad(F.conv2d(x.detach(), w, None, 2, 1), w, gz)
    close(rw, conv.weight.detach() * jw)


def test_requested_weight_two_layers_upstream_flow_unchanged() -> None:
    """Requesting the first layer's weight changes nothing about x's relevance."""
    g = gen(10)
    net = init_(
        torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)), g
    )
    x = randn(g, 2, 4, grad=True)
    out = net(x)
    R = randn(g, 2, 3)
    rx_alone = dynamiclrp.explain(out, x, relevance=R, rules=RULES)
    rx, rw0, rw2 = dynamiclrp.explain(
        out, [x, net[0].weight, net[2].weight], relevance=R, rules=RULES
    )
    close(rx, rx_alone)
    # by hand: layer 2 epsilon, relu identity, layer 1 epsilon; weights from the same terms
    h = net[0](x).detach()
    a = torch.relu(h)
    W2, b2, W0, b0 = (p.detach() for p in (net[2].weight, net[2].bias, net[0].weight, net[0].bias))
    g2 = R / stab(a @ W2.T + b2, EPS)
    ra = a * (g2 @ W2)
    g0 = ra / stab(h, EPS)
    close(rx, x.detach() * (g0 @ W0))
    close(rw2, W2 * (g2.T @ a))
    close(rw0, W0 * (g0.T @ x.detach()))


# --- per-layer override ----------------------------------------------------------------------


def zplus_dense(W, x, b, R, eps):
    x = x.detach()
    c = x[:, None, :] * W[None, :, :]  # (batch, out, in)
    cp = c.clamp(min=0)
    zp = cp.sum(2) + (0 if b is None else b.clamp(min=0))
    return (cp * (R / stab(zp, eps))[:, :, None]).sum(1)


@pytest.mark.parametrize("which", [0, 2])
def test_override_changes_one_layer_only(which: int) -> None:
    g = gen(11)
    net = init_(
        torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)), g
    )
    x = randn(g, 3, 4, grad=True)
    out = net(x)
    R = randn(g, 3, 3)
    eps = 1e-6
    rules = dynamiclrp.preset("epsilon").override(dynamiclrp.ZPlus(), params=[net[which].weight])
    rx = dynamiclrp.explain(out, x, relevance=R, rules=rules)
    h = net[0](x).detach()
    a = torch.relu(h)
    W2, b2, W0, b0 = (p.detach() for p in (net[2].weight, net[2].bias, net[0].weight, net[0].bias))

    def layer(W, inp, b, r, use_zplus: bool):
        return zplus_dense(W, inp, b, r, eps) if use_zplus else epsilon_dense(W, inp, b, r, eps)[0]

    ra = layer(W2, a, b2, R, which == 2)
    ex = layer(W0, x, b0, ra, which == 0)
    close(rx, ex, rtol=1e-7)
    plain = dynamiclrp.explain(out, x, relevance=R, rules="epsilon")
    assert not torch.allclose(rx, plain)


def test_override_on_conv_layer() -> None:
    g = gen(12)
    conv = init_(torch.nn.Conv1d(2, 3, 3, padding=1), g)
    x = randn(g, 2, 2, 5, grad=True)
    out = conv(x)
    R = randn(g, *out.shape)
    rules = dynamiclrp.Rules(eps=EPS).override(dynamiclrp.ZPlus(), params=[conv.weight])
    rx = dynamiclrp.explain(out, x, relevance=R, rules=rules)
    conv_nb = torch.nn.Conv1d(2, 3, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv_nb.weight.copy_(conv.weight)
    M = dense(conv_nb, (2, 5))
    b = conv.bias.detach().repeat_interleave(5)
    ex = zplus_dense(M, x.reshape(2, -1), b, R.reshape(2, -1), EPS)
    close(rx, ex.reshape(x.shape))


def test_override_rule_also_gives_the_requested_weight() -> None:
    """With z-plus on a layer, the layer's requested weight gets the z-plus term relevances."""
    g = gen(13)
    lin = init_(torch.nn.Linear(4, 3), g)
    x = randn(g, 5, 4, grad=True)
    out = lin(x)
    R = randn(g, 5, 3)
    rules = dynamiclrp.Rules(eps=EPS).override(dynamiclrp.ZPlus(), params=[lin.weight])
    rx, rw = dynamiclrp.explain(out, [x, lin.weight], relevance=R, rules=rules)
    xd, W, b = x.detach(), lin.weight.detach(), lin.bias.detach()
    cp = (xd[:, None, :] * W[None, :, :]).clamp(min=0)  # (batch, out, in)
    T = cp * (R / stab(cp.sum(2) + b.clamp(min=0), EPS))[:, :, None]
    close(rx, T.sum(1))
    close(rw, T.sum(0))


@pytest.mark.parametrize("rules", ["dynamiclrp", "epsilon", "zplus", "gamma", "alpha2beta1"])
def test_linear_is_explained_the_same_whatever_the_memory_layout(rules: str) -> None:
    """nn.Linear on a non-contiguous 3-D input is recorded as mm + _unsafe_view + add(bias), on a
    contiguous one as addmm: the plan fuses the bias add into the contraction, so both explain
    alike (and batch == rows holds for models that transpose before a linear layer)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3).double()
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    a = x.transpose(0, 1).requires_grad_()
    b = x.transpose(0, 1).contiguous().requires_grad_()
    out_a, out_b = lin(a), lin(b)
    assert type(out_a.grad_fn).__name__ == "AddBackward0"  # the layout really differs
    assert type(out_b.grad_fn).__name__ == "ViewBackward0"
    ra, rep = dynamiclrp.explain(out_a.sum(1), a, target=0, rules=rules, return_report=True)
    rb = dynamiclrp.explain(out_b.sum(1), b, target=0, rules=rules)
    torch.testing.assert_close(ra, rb, rtol=1e-12, atol=1e-14)
    assert abs(rep.residual) < 1e-12


# --- census (issue 14): addmv, addr, addbmm, vdot, matmul of a vector, linalg.cross -------------

LRP0 = dataclasses.replace(dynamiclrp.preset("epsilon"), eps=1e-12)


def grad_times_input(out: torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradient x input of ``sum(out)`` (plain autograd): LRP-0 seeded with the output itself
    equals it for a map linear (or affine, the bias absorbing its part) in ``xs``."""
    gs = torch.autograd.grad(out.sum(), xs, retain_graph=True)
    return [g * x for g, x in zip(gs, xs, strict=True)]


def _census_operands(seed: int):
    g = gen(seed)
    return g, {
        "x": randn(g, 4, grad=True),
        "u": randn(g, 3, grad=True),
        "A": randn(g, 2, 3, 4, grad=True),
    }


# name -> (new spelling, already-covered spelling), both f(data, params), params Parameters
ADDED_PRODUCTS = {
    "addmv": (
        lambda d, p: torch.addmv(p["b3"], p["M"], d["x"], beta=0.5, alpha=2.0),
        lambda d, p: torch.addmm(p["b3"][None], d["x"][None], p["M"].t(), beta=0.5, alpha=2.0)[0],
    ),
    "addr": (
        lambda d, p: torch.addr(p["B34"], d["u"], p["v"], beta=1.5, alpha=-0.5),
        lambda d, p: torch.addmm(p["B34"], d["u"][:, None], p["v"][None], beta=1.5, alpha=-0.5),
    ),
    "addbmm": (
        lambda d, p: torch.addbmm(p["B35"], d["A"], p["W"], beta=0.5, alpha=2.0),
        lambda d, p: torch.addmm(
            p["B35"],
            d["A"].permute(1, 0, 2).reshape(3, 8),
            p["W"].reshape(8, 5),
            beta=0.5,
            alpha=2.0,
        ),
    ),
    "vdot": (
        lambda d, p: torch.vdot(d["x"], p["v4"]),
        lambda d, p: torch.dot(d["x"], p["v4"]),
    ),
    "matmul_vector_matrix": (  # matmul squeezes its vector operand: SqueezeBackward4
        lambda d, p: torch.matmul(d["x"], p["M"].t()),
        lambda d, p: (d["x"][None] @ p["M"].t())[0],
    ),
}


def _census_params(g):
    def param(*shape):
        return torch.nn.Parameter(randn(g, *shape))

    return {
        "M": param(3, 4),
        "b3": param(3),
        "v": param(4),
        "v4": param(4),
        "B34": param(3, 4),
        "W": param(2, 4, 5),
        "B35": param(3, 5),
    }


@pytest.mark.parametrize("name", list(ADDED_PRODUCTS))
def test_census_contraction_lrp0_is_gradient_times_input(name: str) -> None:
    g, d = _census_operands(20)
    p = _census_params(g)
    new, _ = ADDED_PRODUCTS[name]
    out = new(d, p)
    xs = [t for t in d.values() if t.grad_fn is None and _uses(new, d, p, t)]
    rel, rep = dynamiclrp.explain(out, xs, rules=LRP0, return_report=True)
    rel = rel if isinstance(rel, tuple) else (rel,)
    for r, e in zip(rel, grad_times_input(out, xs), strict=True):
        close(r, e, rtol=1e-8, atol=1e-10)
    assert abs(rep.residual) < 1e-10


def _uses(f, d, p, t) -> bool:
    """Does ``f`` depend on ``t`` (the gradient of its sum is not None)?"""
    out = f(d, p)
    return torch.autograd.grad(out.sum(), t, allow_unused=True)[0] is not None


@pytest.mark.parametrize("preset", list(dynamiclrp.PRESETS))
@pytest.mark.parametrize("name", list(ADDED_PRODUCTS))
def test_census_contraction_same_map_as_covered_spelling(name: str, preset: str) -> None:
    g, d = _census_operands(21)
    p = _census_params(g)
    new, old = ADDED_PRODUCTS[name]
    xs = [t for t in d.values() if _uses(new, d, p, t)]
    seed = randn(gen(22), *new(d, p).shape)
    r_new = dynamiclrp.explain(new(d, p), xs, relevance=seed, rules=preset)
    r_old = dynamiclrp.explain(old(d, p), xs, relevance=seed, rules=preset)
    for a, b in zip(r_new, r_old, strict=True):
        close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dim", [1, -1])
def test_census_cross_product(dim: int) -> None:
    """``linalg.cross(x, w)``, linear in ``x`` for a parameter ``w``: LRP-0 == gradient x input,
    and the epsilon rule ``R_x = x * (w x g)``, ``g = R / stab(z)``, computed by hand."""
    g = gen(23)
    x = randn(g, 2, 3, grad=True)
    w = torch.nn.Parameter(randn(g, 2, 3))
    out = torch.linalg.cross(x, w, dim=dim)
    close(dynamiclrp.explain(out, x, rules=LRP0), grad_times_input(out, [x])[0])
    R = randn(g, 2, 3)
    rx = dynamiclrp.explain(out, x, relevance=R, rules=dataclasses.replace(LRP0, eps=EPS))
    z = out.detach()
    gz = R / stab(z, EPS)
    wd = w.detach()
    # w x g, written out: (w_1 g_2 - w_2 g_1, w_2 g_0 - w_0 g_2, w_0 g_1 - w_1 g_0)
    wxg = torch.stack(
        [
            wd[:, 1] * gz[:, 2] - wd[:, 2] * gz[:, 1],
            wd[:, 2] * gz[:, 0] - wd[:, 0] * gz[:, 2],
            wd[:, 0] * gz[:, 1] - wd[:, 1] * gz[:, 0],
        ],
        1,
    )
    close(rx, x.detach() * wxg)


@pytest.mark.parametrize("op", ["addmm", "addmv", "baddbmm"])
def test_census_added_input_of_a_constant_product(op: str) -> None:
    """Only the added input requires grad: the factors were not recorded, so the product is a
    constant ``P = z - beta * input`` added to it, split by the add rule: signed,
    ``R_b = R * beta b / stab(z)``; proportional, ``R * |beta b| / (|beta b| + |P|)``."""
    g = gen(24)
    beta = 0.5
    if op == "addmm":
        b, m1, m2 = randn(g, 3, 4, grad=True), randn(g, 3, 2), randn(g, 2, 4)
        out = torch.addmm(b, m1, m2, beta=beta)
        prod = m1 @ m2
    elif op == "addmv":
        b, m1, m2 = randn(g, 3, grad=True), randn(g, 3, 2), randn(g, 2)
        out = torch.addmv(b, m1, m2, beta=beta)
        prod = m1 @ m2
    else:
        b, m1, m2 = randn(g, 2, 3, 4, grad=True), randn(g, 2, 3, 2), randn(g, 2, 2, 4)
        out = torch.baddbmm(b, m1, m2, beta=beta)
        prod = m1 @ m2
    R = randn(g, *out.shape)
    bb = beta * b.detach()
    signed = dataclasses.replace(dynamiclrp.preset("epsilon"), eps=EPS)
    rb, rep = dynamiclrp.explain(out, b, relevance=R, rules=signed, return_report=True)
    close(rb, R * bb / stab(bb + prod, EPS))
    assert abs(rep.residual) < 1e-10
    rb = dynamiclrp.explain(out, b, relevance=R, rules="dynamiclrp")
    close(rb, R * bb.abs() / (bb.abs() + prod.abs()))


@pytest.mark.parametrize("op", ["addmv", "addr", "addbmm"])
def test_census_frozen_bias_of_added_product_is_recorded(op: str) -> None:
    """A bias that does not require grad: autograd keeps neither it nor the output, and the sum
    below needs the output's value; ``record()`` keeps it, and the map equals the one with the
    bias requiring grad (as a Parameter, recorded by autograd), up to where the shares go."""
    g = gen(25)
    x = randn(g, 2, 3, 4, grad=True)
    w = torch.nn.Parameter(
        randn(g, 2, 4, 5) if op == "addbmm" else randn(g, 3 if op == "addmv" else 5)
    )
    bias = {"addmv": randn(g, 3), "addr": randn(g, 4, 5), "addbmm": randn(g, 3, 5)}[op]

    def f(b):
        if op == "addmv":
            return torch.addmv(b, x[0, :, :3].t(), w[:3] if w.dim() == 1 else w, beta=0.5)
        if op == "addr":
            return torch.addr(b, x[0, 0], w, alpha=2.0)
        return torch.addbmm(b, x, w)

    with pytest.raises(dynamiclrp.ValueRecoveryError, match="record"):
        dynamiclrp.explain((f(bias) * 2.0).sum(), x)
    with dynamiclrp.record() as rec:
        out = (f(bias) * 2.0).sum()
    rx = dynamiclrp.explain(out, x, recording=rec)
    b_param = torch.nn.Parameter(bias.clone())
    close(rx, dynamiclrp.explain((f(b_param) * 2.0).sum(), x))


# --- issue 14: F.bilinear (TrilinearBackward0) ----------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_bilinear_same_map_as_written_out_einsum_under_every_preset(bias: bool) -> None:
    """Two data operands and a weight: ``F.bilinear(x1, x2, W, b)`` explained as
    ``einsum("bi,oij,bj->bo", x1, W, x2) + b`` (x1 with W by the dense rule, then the uniform
    rule with x2), under every preset."""
    from dynamiclrp.presets import PRESETS

    g = gen(80)
    x1, x2 = randn(g, 3, 4, grad=True), randn(g, 3, 5, grad=True)
    w = torch.nn.Parameter(randn(g, 2, 4, 5))
    b = torch.nn.Parameter(randn(g, 2)) if bias else None
    R = randn(g, 3, 2)
    out = F.bilinear(x1, x2, w, b)
    node = out.grad_fn
    while type(node).__name__ != "TrilinearBackward0":
        node = node.next_functions[0][0]
    for name in PRESETS:
        ra, rep = dynamiclrp.explain(
            F.bilinear(x1, x2, w, b), [x1, x2], relevance=R, rules=name, return_report=True
        )
        spelled = torch.einsum("bi,oij,bj->bo", x1, w, x2)
        rb = dynamiclrp.explain(spelled + b if bias else spelled, [x1, x2], relevance=R, rules=name)
        for p, q in zip(ra, rb, strict=True):
            torch.testing.assert_close(
                p, q, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
            )
        assert abs(rep.residual) < 1e-9


def test_bilinear_uniform_split_by_hand() -> None:
    """Epsilon with a tiny eps, no bias: each term ``x1_i W_oij x2_j`` of ``y_o`` gives
    ``R_o * term / y_o`` half to ``x2_j`` and half to ``t_oj`` (then to ``x1_i`` by the
    epsilon rule of ``t = x1 W``), from explicit loops."""
    g = gen(81)
    x1, x2, w = randn(g, 1, 2, grad=True), randn(g, 1, 3, grad=True), randn(g, 2, 2, 3)
    R = randn(g, 1, 2)
    rules = dataclasses.replace(dynamiclrp.preset("epsilon"), eps=1e-12)
    r1, r2 = dynamiclrp.explain(F.bilinear(x1, x2, w), [x1, x2], relevance=R, rules=rules)
    a, c = x1.detach()[0], x2.detach()[0]
    want1, want2 = torch.zeros(2, dtype=DT), torch.zeros(3, dtype=DT)
    for o in range(2):
        y = sum(float(a[i] * w[o, i, j] * c[j]) for i in range(2) for j in range(3))
        for j in range(3):
            t = sum(float(a[i] * w[o, i, j]) for i in range(2))
            rt = 0.5 * float(R[0, o]) * t * float(c[j]) / y
            want2[j] += rt
            for i in range(2):
                want1[i] += float(a[i] * w[o, i, j]) / t * rt
    close(r1[0], want1, rtol=1e-7)
    close(r2[0], want2, rtol=1e-7)


@pytest.mark.parametrize("which", [0, 1])
def test_bilinear_lrp0_is_gradient_x_input_in_one_operand(which: int) -> None:
    g = gen(82)
    x1, x2 = randn(g, 3, 4, grad=which == 0), randn(g, 3, 5, grad=which == 1)
    w = randn(g, 2, 4, 5)
    out = F.bilinear(x1, x2, w)
    x = (x1, x2)[which]
    rx = dynamiclrp.explain(out, x, relevance=out.detach(), rules=LRP0)
    (gr,) = torch.autograd.grad(out.sum(), x)
    close(rx, gr * x.detach(), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("x2_data", [True, False])
def test_bilinear_requested_weight_same_as_written_out_einsum(x2_data: bool) -> None:
    """A requested weight ``W`` gets the dense rule read from its side, as in the einsum spelling
    (no bias: with one data operand the spelling fuses a bias into its last contraction)."""
    from dynamiclrp.presets import PRESETS

    g = gen(83)
    x1, x2 = randn(g, 3, 4, grad=True), randn(g, 3, 5, grad=x2_data)
    w = torch.nn.Parameter(randn(g, 2, 4, 5))
    R = randn(g, 3, 2)
    ins = [x1, x2, w] if x2_data else [x1, w]
    for name in PRESETS:
        ra = dynamiclrp.explain(F.bilinear(x1, x2, w), ins, relevance=R, rules=name)
        rb = dynamiclrp.explain(
            torch.einsum("bi,oij,bj->bo", x1, w, x2), ins, relevance=R, rules=name
        )
        assert float(ra[-1].abs().sum()) > 0
        for p, q in zip(ra, rb, strict=True):
            torch.testing.assert_close(
                p, q, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
            )
