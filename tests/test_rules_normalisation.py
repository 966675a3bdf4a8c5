"""Native normalisation ops (``dynamiclrp.rules.normalisation``), through the engine.

With the statistic held constant, each normalisation of one group (a LayerNorm row, a GroupNorm
group, a BatchNorm channel) is an affine map ``y = J x + c`` of that group's elements, built here as
an explicit matrix:

- centring with batch/row statistics: ``J = diag(w * rstd) (I - 11^T / m)``;
- BatchNorm in eval mode: ``J = diag(w / sqrt(running_var + eps))`` (no centring), and the constant
  ``c = b - w * running_mean / sqrt(running_var + eps)``.

The epsilon rule: ``R_x = x * J^T (R / stab(y))`` with ``y`` the full output, and the bias absorbs
``b * R / stab(y)``.  The statistics are computed here by hand (biased variance).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from oracle import close, gen, randn, stab

import dynamiclrp

DT = torch.float64
RULES = dynamiclrp.Rules(eps=0.05)  # a large eps: stab applied to the wrong z shows


def group_rule(
    xv: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    rv: torch.Tensor,
    eps: float,
    *,
    centre: bool,
    ln_eps: float,
    running: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One group: ``xv`` (m,), per-element weight ``scale`` and bias ``bias`` (m,), relevance ``rv``.

    Returns ``(R_x, R_bias per element, y)``.
    """
    m = xv.numel()
    if running is None:
        mu = sum(float(v) for v in xv) / m
        var = sum((float(v) - mu) ** 2 for v in xv) / m
    else:
        mu, var = running
    rstd = 1.0 / (var + ln_eps) ** 0.5
    eye = torch.eye(m, dtype=DT)
    C = eye - torch.full((m, m), 1.0 / m, dtype=DT) if centre else eye
    J = torch.diag(scale * rstd) @ C
    shift = bias - (0.0 if centre else scale * rstd * mu)
    y = J @ xv + shift
    gz = rv / stab(y, eps)
    return xv * (J.T @ gz), bias * gz, y


# --- LayerNorm -------------------------------------------------------------------------------


def layer_norm_expected(x, shape, w, b, R, eps, ln_eps):
    nd = len(shape)
    rows = x.detach().reshape(-1, *shape).reshape(-1, int(torch.tensor(shape).prod()))
    rr = R.reshape(rows.shape)
    wv = torch.ones(rows.shape[1], dtype=DT) if w is None else w.detach().reshape(-1)
    bv = torch.zeros(rows.shape[1], dtype=DT) if b is None else b.detach().reshape(-1)
    rx, rb, ys = [], [], []
    for i in range(rows.shape[0]):
        a, c, y = group_rule(rows[i], wv, bv, rr[i], eps, centre=True, ln_eps=ln_eps)
        rx.append(a)
        rb.append(c)
        ys.append(y)
    assert nd >= 1
    return torch.stack(rx).reshape(x.shape), torch.stack(rb), torch.stack(ys).reshape(x.shape)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(5,), (3, 4)])
def test_layer_norm_module(shape, affine: bool) -> None:
    g = gen(0)
    ln = torch.nn.LayerNorm(shape, eps=1e-3, elementwise_affine=affine).double()
    if affine:
        with torch.no_grad():
            ln.weight.copy_(randn(g, *shape))
            ln.bias.copy_(randn(g, *shape))
    x = randn(g, 2, *shape, grad=True)
    out = ln(x)
    R = randn(g, *out.shape)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, rules=RULES, return_report=True)
    w, b = (ln.weight, ln.bias) if affine else (None, None)
    ex, eb, y = layer_norm_expected(x, shape, w, b, R, RULES.eps, 1e-3)
    close(y, out.detach())  # the hand-written map is the layer
    close(rx, ex)
    assert rep.absorbed == pytest.approx(float(eb.sum()), abs=1e-9)
    assert abs(rep.residual) < 1e-9


def test_functional_layer_norm_weight_only_3d() -> None:
    g = gen(1)
    x, w, R = randn(g, 2, 3, 6, grad=True), torch.nn.Parameter(randn(g, 6)), randn(g, 2, 3, 6)
    out = F.layer_norm(x, (6,), w, None, 1e-5)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, rules=RULES, return_report=True)
    ex, _, _ = layer_norm_expected(x, (6,), w, None, R, RULES.eps, 1e-5)
    close(rx, ex)
    assert abs(rep.absorbed) < 1e-12


def test_layer_norm_input_from_a_linear_layer() -> None:
    """The norm's input is an intermediate (its saved input); the linear then gets the norm's R."""
    g = gen(2)
    x, R = randn(g, 3, 4, grad=True), randn(g, 3, 5)
    lin = torch.nn.Linear(4, 5, bias=False).double()
    ln = torch.nn.LayerNorm(5).double()
    with torch.no_grad():
        ln.weight.copy_(randn(g, 5))
        ln.bias.copy_(randn(g, 5))
    h = lin(x)
    rx = dynamiclrp.explain(ln(h), x, relevance=R, rules=RULES)
    rh, _, _ = layer_norm_expected(h, (5,), ln.weight, ln.bias, R, RULES.eps, ln.eps)
    W, hd = lin.weight.detach(), h.detach()
    close(rx, x.detach() * ((rh / stab(hd, RULES.eps)) @ W))


def test_layer_norm_value_recovered_for_a_downstream_add() -> None:
    g = gen(3)
    x, R = randn(g, 3, 5, grad=True), randn(g, 3, 5)
    ln = torch.nn.LayerNorm(5).double()
    bias = torch.nn.Parameter(randn(g, 5))
    y = ln(x)
    rx = dynamiclrp.explain(y + bias, x, relevance=R, rules=RULES)
    yd = y.detach()
    ry = R * yd.abs() / (yd.abs() + bias.detach().abs())
    ex, _, _ = layer_norm_expected(x, (5,), ln.weight, ln.bias, ry, RULES.eps, ln.eps)
    close(rx, ex)


# --- GroupNorm -------------------------------------------------------------------------------


def group_norm_expected(x, groups, w, b, R, eps, gn_eps):
    n, c = x.shape[:2]
    xd = x.detach()
    rx = torch.zeros_like(xd)
    rb_total = torch.zeros((), dtype=DT)
    per = c // groups
    spatial = xd[0, 0].numel()
    for i in range(n):
        for gi in range(groups):
            chans = slice(gi * per, (gi + 1) * per)
            xv = xd[i, chans].reshape(-1)
            wv = (torch.ones(per, dtype=DT) if w is None else w.detach()[chans]).repeat_interleave(
                spatial
            )
            bv = (torch.zeros(per, dtype=DT) if b is None else b.detach()[chans]).repeat_interleave(
                spatial
            )
            a, rb, _ = group_rule(
                xv, wv, bv, R[i, chans].reshape(-1), eps, centre=True, ln_eps=gn_eps
            )
            rx[i, chans] = a.reshape(xd[i, chans].shape)
            rb_total = rb_total + rb.sum()
    return rx, rb_total


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm(groups: int, affine: bool) -> None:
    g = gen(4)
    gn = torch.nn.GroupNorm(groups, 4, eps=1e-3, affine=affine).double()
    if affine:
        with torch.no_grad():
            gn.weight.copy_(randn(g, 4))
            gn.bias.copy_(randn(g, 4))
    x = randn(g, 2, 4, 3, 2, grad=True)
    out = gn(x)
    R = randn(g, *out.shape)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, rules=RULES, return_report=True)
    w, b = (gn.weight, gn.bias) if affine else (None, None)
    ex, eb = group_norm_expected(x, groups, w, b, R, RULES.eps, 1e-3)
    close(rx, ex)
    assert rep.absorbed == pytest.approx(float(eb), abs=1e-9)
    assert abs(rep.residual) < 1e-9


def test_functional_group_norm_1d() -> None:
    g = gen(5)
    x, R = randn(g, 3, 6, 4, grad=True), randn(g, 3, 6, 4)
    w, b = torch.nn.Parameter(randn(g, 6)), torch.nn.Parameter(randn(g, 6))
    rx = dynamiclrp.explain(F.group_norm(x, 3, w, b, 1e-5), x, relevance=R, rules=RULES)
    ex, _ = group_norm_expected(x, 3, w, b, R, RULES.eps, 1e-5)
    close(rx, ex)


def test_group_norm_value_recovered_for_a_downstream_add() -> None:
    g = gen(13)
    gn = torch.nn.GroupNorm(2, 4, eps=1e-3).double()
    with torch.no_grad():
        gn.weight.copy_(randn(g, 4))
        gn.bias.copy_(randn(g, 4))
    x, bias = randn(g, 2, 4, 3, grad=True), torch.nn.Parameter(randn(g, 4, 3))
    y = gn(x)
    R = randn(g, *y.shape)
    rx = dynamiclrp.explain(y + bias, x, relevance=R, rules=RULES)
    yd = y.detach()
    ry = R * yd.abs() / (yd.abs() + bias.detach().abs())
    ex, _ = group_norm_expected(x, 2, gn.weight, gn.bias, ry, RULES.eps, 1e-3)
    close(rx, ex)


# --- BatchNorm -------------------------------------------------------------------------------


def make_bn(g: torch.Generator, c: int = 3) -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(c, eps=1e-3).double()
    with torch.no_grad():
        bn.weight.copy_(randn(g, c))
        bn.bias.copy_(randn(g, c))
        bn.running_mean.copy_(randn(g, c))
        bn.running_var.copy_(randn(g, c).abs() + 0.5)
    return bn


def batch_norm_expected(x, bn, R, eps, train: bool, rm=None, rv=None):
    xd = x.detach()
    rx = torch.zeros_like(xd)
    rb_total = torch.zeros((), dtype=DT)
    ys = torch.zeros_like(xd)
    for ch in range(xd.shape[1]):
        xv = xd[:, ch].reshape(-1)
        m = xv.numel()
        wv = bn.weight.detach()[ch].expand(m)
        bv = bn.bias.detach()[ch].expand(m)
        running = None if train else (float(rm[ch]), float(rv[ch]))
        a, rb, y = group_rule(
            xv, wv, bv, R[:, ch].reshape(-1), eps, centre=train, ln_eps=bn.eps, running=running
        )
        rx[:, ch] = a.reshape(xd[:, ch].shape)
        ys[:, ch] = y.reshape(xd[:, ch].shape)
        rb_total = rb_total + rb.sum()
    return rx, rb_total, ys


def test_batch_norm_eval_uses_running_stats_and_affine() -> None:
    g = gen(6)
    bn = make_bn(g).eval()
    x = randn(g, 2, 3, 2, 3, grad=True)
    out = bn(x)
    R = randn(g, *out.shape)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, rules=RULES, return_report=True)
    ex, eb, y = batch_norm_expected(x, bn, R, RULES.eps, False, bn.running_mean, bn.running_var)
    close(y, out.detach())
    close(rx, ex)
    assert rep.absorbed == pytest.approx(float(eb), abs=1e-9)


def test_batch_norm_eval_by_hand_formula() -> None:
    """Eval BatchNorm is per-element affine: ``R_x = x * w / sqrt(rv + eps) * R / stab(y)``."""
    g = gen(7)
    bn = make_bn(g).eval()
    x = randn(g, 2, 3, 4, 4, grad=True)
    out = bn(x)
    R = randn(g, *out.shape)
    rx = dynamiclrp.explain(out, x, relevance=R, rules=RULES)
    v = lambda t: t.detach().view(1, -1, 1, 1)  # noqa: E731
    scale = v(bn.weight) / torch.sqrt(v(bn.running_var) + bn.eps)
    y = (x.detach() - v(bn.running_mean)) * scale + v(bn.bias)
    close(rx, x.detach() * scale * R / stab(y, RULES.eps))


def test_batch_norm_train_mode_uses_batch_statistics() -> None:
    g = gen(8)
    bn = make_bn(g).train()
    x = randn(g, 3, 3, 2, 2, grad=True)
    out = bn(x)
    R = randn(g, *out.shape)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, rules=RULES, return_report=True)
    ex, eb, y = batch_norm_expected(x, bn, R, RULES.eps, True)
    close(y, out.detach())
    close(rx, ex)
    assert rep.absorbed == pytest.approx(float(eb), abs=1e-9)


def test_batch_norm_eval_after_conv() -> None:
    """conv -> BN(eval): BN reads its saved input; the conv gets BN's relevance (epsilon rule)."""
    g = gen(9)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
    bn = make_bn(g).eval()
    x = randn(g, 1, 2, 4, 4, grad=True)
    h = conv(x)
    out = bn(h)
    R = randn(g, *out.shape)
    rx = dynamiclrp.explain(out, x, relevance=R, rules=RULES)
    rh, _, _ = batch_norm_expected(h, bn, R, RULES.eps, False, bn.running_mean, bn.running_var)
    # the conv's epsilon rule via its input Jacobian, by autograd on the conv alone
    xf = x.detach().clone().requires_grad_()
    hd = conv(xf)
    (jt,) = torch.autograd.grad(hd, xf, rh / stab(hd.detach(), RULES.eps))
    close(rx, x.detach() * jt)


def test_batch_norm_eval_value_recovered_for_a_downstream_add() -> None:
    """``bn(x) + bias``: the add needs BN's output, rebuilt by BN's eval replay."""
    g = gen(10)
    bn = make_bn(g).eval()
    x = randn(g, 2, 3, 2, 2, grad=True)
    bias = torch.nn.Parameter(randn(g, 3, 2, 2))
    y = bn(x)
    R = randn(g, *y.shape)
    rx = dynamiclrp.explain(y + bias, x, relevance=R, rules=RULES)
    yd = y.detach()
    ry = R * yd.abs() / (yd.abs() + bias.detach().abs())
    ex, _, _ = batch_norm_expected(x, bn, ry, RULES.eps, False, bn.running_mean, bn.running_var)
    close(rx, ex)


def test_batch_norm_train_value_recovered_for_a_downstream_add() -> None:
    g = gen(11)
    bn = make_bn(g).train()
    x = randn(g, 3, 3, 2, 2, grad=True)
    bias = torch.nn.Parameter(randn(g, 3, 2, 2))
    y = bn(x)
    R = randn(g, *y.shape)
    rx = dynamiclrp.explain(y + bias, x, relevance=R, rules=RULES)
    yd = y.detach()
    ry = R * yd.abs() / (yd.abs() + bias.detach().abs())
    ex, _, _ = batch_norm_expected(x, bn, ry, RULES.eps, True)
    close(rx, ex)


def test_batch_norm1d_eval_no_affine() -> None:
    g = gen(12)
    bn = torch.nn.BatchNorm1d(4, affine=False, eps=1e-3).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(randn(g, 4))
        bn.running_var.copy_(randn(g, 4).abs() + 0.5)
    x = randn(g, 5, 4, grad=True)
    out = bn(x)
    R = randn(g, 5, 4)
    rx = dynamiclrp.explain(out, x, relevance=R, rules=RULES)
    scale = 1 / torch.sqrt(bn.running_var + bn.eps)
    y = (x.detach() - bn.running_mean) * scale
    close(rx, x.detach() * scale * R / stab(y, RULES.eps))


def test_weight_norm_passes_relevance_to_the_direction() -> None:
    """w = g * v / ||v||: the scale is a statistic, R_v = R_w; requested as a parameter path."""
    v = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    g = torch.nn.Parameter(torch.rand(4, 1, dtype=torch.float64) + 0.5)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    w = torch._weight_norm(v, g, 0)
    z = x @ w.t()
    R = torch.randn(2, 4, dtype=torch.float64)
    rx, rv = dynamiclrp.explain(z, [x, v], relevance=R, rules=dynamiclrp.Rules(eps=1e-12))
    wd = w.detach()
    g_z = R / (x.detach() @ wd.t())
    torch.testing.assert_close(rx, x.detach() * (g_z @ wd))
    torch.testing.assert_close(rv, wd * (g_z.t() @ x.detach()))  # R_w, passed on unchanged
    assert dynamiclrp.coverage(z).uncovered == []


# --- census (issue 14): the other batch-norm nodes, layer norm with a data weight ------------

aten = torch.ops.aten


def _bn_case(seed: int):
    g = gen(seed)
    x = randn(g, 3, 4, 2, 2, grad=True)
    w, b = torch.nn.Parameter(randn(g, 4)), torch.nn.Parameter(randn(g, 4))
    rm, rv = randn(g, 4), randn(g, 4).abs() + 0.5
    return g, x, w, b, rm, rv


BN_SPELLINGS = {  # name -> (new node's spelling, NativeBatchNormBackward0's), training flag
    "legit_train": (
        lambda x, w, b, rm, rv: aten._native_batch_norm_legit(x, w, b, rm, rv, True, 0.1, 1e-5),
        True,
    ),
    "legit_eval": (
        lambda x, w, b, rm, rv: aten._native_batch_norm_legit(x, w, b, rm, rv, False, 0.1, 1e-5),
        False,
    ),
    "legit_no_training": (
        lambda x, w, b, rm, rv: aten._native_batch_norm_legit_no_training(
            x, w, b, rm, rv, 0.1, 1e-5
        ),
        False,
    ),
    "with_update": (
        lambda x, w, b, rm, rv: aten._batch_norm_with_update(x, w, b, rm, rv, 0.1, 1e-5),
        True,
    ),
    "no_update": (
        lambda x, w, b, rm, rv: aten._batch_norm_no_update(x, w, b, rm, rv, 0.1, 1e-5),
        False,
    ),
}


@pytest.mark.parametrize("preset", ["dynamiclrp", "epsilon", "zennit-epsilon-plus"])
@pytest.mark.parametrize("name", list(BN_SPELLINGS))
def test_census_batch_norm_nodes_same_map_as_native(name: str, preset: str) -> None:
    g, x, w, b, rm, rv = _bn_case(30)
    f, training = BN_SPELLINGS[name]
    out = f(x, w, b, rm.clone(), rv.clone())[0]
    ref = aten.native_batch_norm(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5)[0]
    assert type(out.grad_fn).__name__ != "NativeBatchNormBackward0"
    close(out, ref)  # the same function
    R = randn(g, *out.shape)
    r_new, rep = dynamiclrp.explain(out, x, relevance=R, rules=preset, return_report=True)
    r_ref = dynamiclrp.explain(ref, x, relevance=R, rules=preset)
    close(r_new, r_ref, rtol=1e-9, atol=1e-12)
    assert abs(rep.residual) < 1e-10


@pytest.mark.parametrize("bias", [True, False])
def test_census_layer_norm_weight_is_data_input_constant(bias: bool) -> None:
    """``x`` constant, weight data: ``y = xhat * w + b`` is linear in ``w``; LRP-0 seeded with
    ``y`` is gradient x input ``xhat * w`` summed over the rows (it gave ``w`` nothing before),
    and the epsilon rule is ``R_w = sum_rows xhat * w * R / stab(y)``."""
    g = gen(31)
    x = randn(g, 3, 5)
    w = randn(g, 5, grad=True)
    b = randn(g, 5) if bias else None
    out = F.layer_norm(x, (5,), w, b)
    xhat = F.layer_norm(x, (5,))
    lrp0 = dataclasses.replace(dynamiclrp.preset("epsilon"), eps=1e-12)
    close(dynamiclrp.explain(out, w, rules=lrp0), (xhat * w.detach()).sum(0))
    R = randn(g, 3, 5)
    rw, rep = dynamiclrp.explain(out, w, relevance=R, rules=RULES, return_report=True)
    close(rw, (xhat * w.detach() * R / stab(out.detach(), RULES.eps)).sum(0))
    assert abs(rep.residual) < 1e-10
