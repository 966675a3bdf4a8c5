"""Reductions (``dynamiclrp.rules.reduction``) and max-type routing, through the engine.

Every linear reduction is written here as an explicit matrix ``M`` (one row per output element, one
column per input element), built from index loops, never from the pooling functions themselves.
The rules of the module docstring then read:

- ``reduction="proportional"``: ``R_x = |x| * M^T (R / (M |x|))``, zero for all-zero groups;
- ``reduction="signed"``: ``R_x = x * M^T (R / stab(M x))``;
- max-type reductions: all of ``R`` to the arg-max of each group.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import gen, randn, stab

import dynamiclrp

DT = torch.float64
SIGNED = dynamiclrp.Rules(reduction="signed", eps=0.05)  # a large eps: a wrong z shows
PROP = dynamiclrp.Rules()


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-9, atol: float = 1e-10):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def expected(M: torch.Tensor, x: torch.Tensor, R: torch.Tensor, rules) -> torch.Tensor:
    """The rule for ``z = M x`` (``x`` and ``R`` flattened), reshaped to ``x``'s shape."""
    xv, rv = x.detach().reshape(-1), R.reshape(-1)
    if rules.reduction == "proportional":
        ax = xv.abs()
        den = M @ ax
        gz = torch.where(den > 0, rv / torch.where(den > 0, den, 1.0), 0.0)
        return (ax * (M.T @ gz)).reshape(x.shape)
    gz = rv / stab(M @ xv, rules.eps)
    return (xv * (M.T @ gz)).reshape(x.shape)


def flat_index(shape, idx) -> int:
    out = 0
    for s, i in zip(shape, idx, strict=True):
        out = out * s + i
    return out


def reduce_matrix(shape, dims, mean: bool) -> tuple[torch.Tensor, list[int]]:
    """``M`` of a sum or mean over ``dims`` (keepdim layout irrelevant: rows in output order)."""
    dims = sorted(d % len(shape) for d in dims)
    kept = [d for d in range(len(shape)) if d not in dims]
    out_shape = [shape[d] for d in kept]
    n_out = math.prod(out_shape)
    group = math.prod(shape[d] for d in dims)
    M = torch.zeros(n_out, math.prod(shape), dtype=DT)
    for idx in itertools.product(*(range(s) for s in shape)):
        row = flat_index(out_shape, [idx[d] for d in kept]) if kept else 0
        M[row, flat_index(shape, idx)] = 1.0 / group if mean else 1.0
    return M, out_shape


RULESETS = {"proportional": PROP, "signed": SIGNED}


# --- sum / mean ------------------------------------------------------------------------------

SUMS = {
    "sum": (lambda x: x.sum(), None, False),
    "sum_dim1": (lambda x: x.sum(1), (1,), False),
    "sum_dim-1_keep": (lambda x: x.sum(-1, keepdim=True), (-1,), False),
    "sum_dims02": (lambda x: x.sum((0, 2)), (0, 2), False),
    "sum_dims_keep": (lambda x: x.sum((0, 2), keepdim=True), (0, 2), False),
    "mean": (lambda x: x.mean(), None, True),
    "mean_dim1": (lambda x: x.mean(1), (1,), True),
    "mean_dim-1_keep": (lambda x: x.mean(-1, keepdim=True), (-1,), True),
    "mean_dims12": (lambda x: x.mean((1, 2)), (1, 2), True),
}


@pytest.mark.parametrize("mode", list(RULESETS))
@pytest.mark.parametrize("name", list(SUMS))
def test_sum_and_mean(name: str, mode: str) -> None:
    g = gen(0)
    x = randn(g, 2, 3, 4, grad=True)
    f, dims, mean = SUMS[name]
    out = f(x)
    R = randn(g, *out.shape)
    rules = RULESETS[mode]
    rx, rep = dynamiclrp.explain(out, x, relevance=R, rules=rules, return_report=True)
    M, _ = reduce_matrix(x.shape, range(3) if dims is None else dims, mean)
    close(rx, expected(M, x, R, rules))
    if mode == "proportional":
        close(rx.sum(), R.sum())
    assert abs(rep.residual) < 1e-9


def test_proportional_sum_written_out_by_hand() -> None:
    g = gen(1)
    x, R = randn(g, 3, 5, grad=True), randn(g, 3)
    rx = dynamiclrp.explain(x.sum(1), x, relevance=R)
    xd = x.detach()
    for i in range(3):
        tot = sum(abs(float(xd[i, j])) for j in range(5))
        for j in range(5):
            assert float(rx[i, j]) == pytest.approx(abs(float(xd[i, j])) / tot * float(R[i]))


def test_signed_mean_stabilises_the_mean_not_the_sum() -> None:
    g = gen(2)
    x, R = randn(g, 3, 5, grad=True), randn(g, 3)
    rx = dynamiclrp.explain(x.mean(1), x, relevance=R, rules=SIGNED)
    xd = x.detach()
    close(rx, xd * (R / stab(xd.mean(1), SIGNED.eps) / 5)[:, None])


def test_all_zero_group_passes_nothing_and_stays_finite() -> None:
    g = gen(3)
    x = randn(g, 3, 4)
    x[1] = 0.0
    x.requires_grad_()
    R = randn(g, 3)
    rx = dynamiclrp.explain(x.sum(1), x, relevance=R)
    assert torch.isfinite(rx).all()
    close(rx[1], torch.zeros(4, dtype=DT))
    close(rx[0], x.detach()[0].abs() / x.detach()[0].abs().sum() * R[0])


@pytest.mark.parametrize("mode", list(RULESETS))
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_cumsum(dim: int, mode: str) -> None:
    g = gen(4)
    x = randn(g, 3, 4, grad=True)
    out = torch.cumsum(x, dim)
    R = randn(g, *out.shape)
    rules = RULESETS[mode]
    rx = dynamiclrp.explain(out, x, relevance=R, rules=rules)
    d = dim % 2
    M = torch.zeros(12, 12, dtype=DT)
    for i, j in itertools.product(range(3), range(4)):
        for k in range((i if d == 0 else j) + 1):
            src = (k, j) if d == 0 else (i, k)
            M[flat_index((3, 4), (i, j)), flat_index((3, 4), src)] = 1.0
    close(rx, expected(M, x, R, rules))


# --- average pooling -------------------------------------------------------------------------


def avg_pool_matrix(shape, k, s, p, count_include_pad: bool) -> tuple[torch.Tensor, tuple]:
    n, c, h, w = shape
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    out_shape = (n, c, oh, ow)
    M = torch.zeros(math.prod(out_shape), math.prod(shape), dtype=DT)
    for b, ch, i, j in itertools.product(range(n), range(c), range(oh), range(ow)):
        h0, w0 = i * sh - ph, j * sw - pw
        h1, w1 = min(h0 + kh, h + ph), min(w0 + kw, w + pw)
        padded_size = (h1 - h0) * (w1 - w0)
        h0, w0, h1, w1 = max(h0, 0), max(w0, 0), min(h1, h), min(w1, w)
        div = padded_size if count_include_pad else (h1 - h0) * (w1 - w0)
        for u, v in itertools.product(range(h0, h1), range(w0, w1)):
            M[flat_index(out_shape, (b, ch, i, j)), flat_index(shape, (b, ch, u, v))] = 1.0 / div
    return M, out_shape


POOLS = {
    "k2s2": ((2, 2), (2, 2), (0, 0)),
    "k3s2p1": ((3, 3), (2, 2), (1, 1)),
    "k3s1p1_rect": ((3, 2), (1, 2), (1, 1)),
}


@pytest.mark.parametrize("mode", list(RULESETS))
@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("pool", list(POOLS))
def test_avg_pool2d(pool: str, count_include_pad: bool, mode: str) -> None:
    g = gen(5)
    k, s, p = POOLS[pool]
    x = randn(g, 2, 2, 5, 6, grad=True)
    out = F.avg_pool2d(x, k, s, p, count_include_pad=count_include_pad)
    M, out_shape = avg_pool_matrix(tuple(x.shape), k, s, p, count_include_pad)
    assert tuple(out.shape) == out_shape
    close(out.detach().reshape(-1), M @ x.detach().reshape(-1))  # the matrix is the pool
    R = randn(g, *out.shape)
    rules = RULESETS[mode]
    rx = dynamiclrp.explain(out, x, relevance=R, rules=rules)
    close(rx, expected(M, x, R, rules))


def test_avg_pool2d_count_include_pad_matters_for_signed() -> None:
    """With padding, the two divisors differ and the signed rule's stabiliser sees ``z``."""
    g = gen(6)
    x = randn(g, 1, 1, 4, 4, grad=True) * 1e-2
    x = x.detach().requires_grad_()
    R = randn(g, 1, 1, 2, 2)
    a = dynamiclrp.explain(
        F.avg_pool2d(x, 3, 2, 1, count_include_pad=True), x, relevance=R, rules=SIGNED
    )
    b = dynamiclrp.explain(
        F.avg_pool2d(x, 3, 2, 1, count_include_pad=False), x, relevance=R, rules=SIGNED
    )
    assert not torch.allclose(a, b)


def adaptive_matrix(shape, out_hw) -> torch.Tensor:
    n, c, h, w = shape
    oh, ow = out_hw
    out_shape = (n, c, oh, ow)
    M = torch.zeros(math.prod(out_shape), math.prod(shape), dtype=DT)
    for b, ch, i, j in itertools.product(range(n), range(c), range(oh), range(ow)):
        h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
        for u, v in itertools.product(range(h0, h1), range(w0, w1)):
            M[flat_index(out_shape, (b, ch, i, j)), flat_index(shape, (b, ch, u, v))] = 1.0 / (
                (h1 - h0) * (w1 - w0)
            )
    return M


@pytest.mark.parametrize("mode", list(RULESETS))
@pytest.mark.parametrize("out_hw", [(1, 1), (2, 3), (3, 2)])
def test_adaptive_avg_pool2d(out_hw, mode: str) -> None:
    g = gen(7)
    x = randn(g, 2, 2, 5, 7, grad=True)
    out = F.adaptive_avg_pool2d(x, out_hw)
    M = adaptive_matrix(tuple(x.shape), out_hw)
    close(out.detach().reshape(-1), M @ x.detach().reshape(-1))
    R = randn(g, *out.shape)
    rules = RULESETS[mode]
    rx = dynamiclrp.explain(out, x, relevance=R, rules=rules)
    close(rx, expected(M, x, R, rules))


def test_reduction_after_linear_layer() -> None:
    """The reduction's input is an intermediate: its value comes from a promise."""
    g = gen(8)
    x, R = randn(g, 3, 4, grad=True), randn(g, 3)
    lin = torch.nn.Linear(4, 5, bias=False).double()
    h = lin(x)
    rx = dynamiclrp.explain(h.sum(1), x, relevance=R)
    hd, W = h.detach(), lin.weight.detach()
    rh = hd.abs() / hd.abs().sum(1, keepdim=True) * R[:, None]
    close(rx, x.detach() * ((rh / stab(hd, 1e-6)) @ W), rtol=1e-7)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    dim_mask=st.lists(st.booleans(), min_size=3, max_size=3),
    keepdim=st.booleans(),
    mean=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_proportional_reduction_conserves(shape, dim_mask, keepdim, mean, seed) -> None:
    g = gen(seed)
    dims = [d for d, m in zip(range(len(shape)), dim_mask, strict=False) if m] or [0]
    x = randn(g, *shape, grad=True)
    out = x.mean(dims, keepdim=keepdim) if mean else x.sum(dims, keepdim=keepdim)
    R = randn(g, *out.shape)
    rx = dynamiclrp.explain(out, x, relevance=R)
    close(rx.sum(), R.sum(), atol=1e-9)
    M, _ = reduce_matrix(shape, dims, mean)
    close(rx, expected(M, x, R, PROP))


# --- max-type: winner takes all ---------------------------------------------------------------


def winner(groups_of_out: dict, x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``groups_of_out``: flat output index -> list of flat input indices (padding excluded)."""
    xv, rv = x.detach().reshape(-1), R.reshape(-1)
    out = torch.zeros_like(xv)
    for o, members in groups_of_out.items():
        best = max(members, key=lambda i: float(xv[i]))
        out[best] += rv[o]
    return out.reshape(x.shape)


def reduce_groups(shape, dims) -> dict:
    dims = sorted(d % len(shape) for d in dims)
    kept = [d for d in range(len(shape)) if d not in dims]
    out_shape = [shape[d] for d in kept]
    groups: dict = {}
    for idx in itertools.product(*(range(s) for s in shape)):
        row = flat_index(out_shape, [idx[d] for d in kept]) if kept else 0
        groups.setdefault(row, []).append(flat_index(shape, idx))
    return groups


MAXES = {
    "max": (lambda x: x.max(), (0, 1, 2)),
    "max_dim": (lambda x: x.max(1).values, (1,)),
    "max_dim_keep": (lambda x: x.max(-1, keepdim=True)[0], (-1,)),
    "amax": (lambda x: x.amax((0, 2)), (0, 2)),
    "amax_keep": (lambda x: x.amax(1, keepdim=True), (1,)),
    "min": (lambda x: -((-x).max()), (0, 1, 2)),
    "min_full": (lambda x: x.min(), (0, 1, 2)),
}


@pytest.mark.parametrize("name", list(MAXES))
def test_max_routes_to_the_winner(name: str) -> None:
    g = gen(9)
    x = randn(g, 2, 3, 4, grad=True)
    f, dims = MAXES[name]
    out = f(x)
    R = randn(g, *out.shape)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, return_report=True)
    xx = -x if name.startswith("min") else x
    close(rx, winner(reduce_groups(x.shape, dims), xx, R))
    assert abs(rep.residual) < 1e-12


def pool_groups(shape, k, s, p, d=(1, 1)) -> tuple[dict, tuple]:
    n, c, h, w = shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = k, s, p, d
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out_shape = (n, c, oh, ow)
    groups = {}
    for b, ch, i, j in itertools.product(range(n), range(c), range(oh), range(ow)):
        members = []
        for u, v in itertools.product(range(kh), range(kw)):
            hh, ww = i * sh - ph + u * dh, j * sw - pw + v * dw
            if 0 <= hh < h and 0 <= ww < w:
                members.append(flat_index(shape, (b, ch, hh, ww)))
        groups[flat_index(out_shape, (b, ch, i, j))] = members
    return groups, out_shape


@pytest.mark.parametrize(
    "k,s,p,d",
    [
        ((2, 2), (2, 2), (0, 0), (1, 1)),
        ((3, 3), (2, 2), (1, 1), (1, 1)),
        ((2, 3), (1, 2), (1, 1), (2, 1)),
    ],
)
def test_max_pool2d_routes_to_the_winner(k, s, p, d) -> None:
    g = gen(10)
    x = randn(g, 2, 2, 5, 6, grad=True)
    out = F.max_pool2d(x, k, s, p, dilation=d)
    groups, out_shape = pool_groups(tuple(x.shape), k, s, p, d)
    assert tuple(out.shape) == out_shape
    R = randn(g, *out.shape)
    rx = dynamiclrp.explain(out, x, relevance=R)
    close(rx, winner(groups, x, R))


@pytest.mark.parametrize("out_hw", [(1, 1), (2, 3)])
def test_adaptive_max_pool2d_routes_to_the_winner(out_hw) -> None:
    g = gen(11)
    x = randn(g, 2, 2, 5, 7, grad=True)
    out = F.adaptive_max_pool2d(x, out_hw)
    n, c, h, w = x.shape
    oh, ow = out_hw
    groups = {}
    for b, ch, i, j in itertools.product(range(n), range(c), range(oh), range(ow)):
        h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
        groups[flat_index((n, c, oh, ow), (b, ch, i, j))] = [
            flat_index(tuple(x.shape), (b, ch, u, v))
            for u, v in itertools.product(range(h0, h1), range(w0, w1))
        ]
    R = randn(g, *out.shape)
    close(dynamiclrp.explain(out, x, relevance=R), winner(groups, x, R))


def test_max_pool_value_is_recovered_for_a_downstream_add() -> None:
    """``max_pool2d(x) + bias``: the add needs the pooled value, rebuilt by the pool's replay."""
    g = gen(12)
    x = randn(g, 1, 2, 4, 4, grad=True)
    bias = torch.nn.Parameter(randn(g, 2, 2))
    pooled = F.max_pool2d(x, 2)
    R = randn(g, 1, 2, 2, 2)
    rx = dynamiclrp.explain(pooled + bias, x, relevance=R)
    pd = pooled.detach()
    rp = R * pd.abs() / (pd.abs() + bias.detach().abs())
    groups, _ = pool_groups(tuple(x.shape), (2, 2), (2, 2), (0, 0))
    close(rx, winner(groups, x, rp))


# --- cumprod ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_cumprod_splits_each_prefix_uniformly(dim):
    """``z_k = x_0 * ... * x_k``: output ``k``'s relevance goes ``R_k / (k + 1)`` to each of its
    factors, so ``R_x[j] = sum_{k >= j} R_k / (k + 1)`` (written out with loops)."""
    g = gen(60)
    x, R = randn(g, 3, 4, grad=True), randn(g, 3, 4)
    out = torch.cumprod(x, dim)
    assert out.grad_fn.name() == "CumprodBackward0"
    rx, rep = dynamiclrp.explain(out, x, relevance=R, return_report=True)
    d = dim % 2
    expected = torch.zeros(3, 4, dtype=DT)
    for i, j in itertools.product(range(3), range(4)):
        k_self = (i, j)[d]
        for k in range(k_self, x.shape[d]):
            src = (k, j) if d == 0 else (i, k)
            expected[i, j] += R[src] / (k + 1)
    close(rx, expected)
    assert abs(rep.residual) < 1e-12
    assert float(rx.sum()) == pytest.approx(float(R.sum()), rel=1e-12)


def test_cumprod_equals_prefix_products_under_every_preset():
    """The equivalent spelling: each prefix's ``prod`` (the uniform rule of ``ProdBackward1``)."""
    from dynamiclrp.presets import PRESETS

    g = gen(61)
    x, R = randn(g, 3, 4, grad=True), randn(g, 3, 4)

    def prefixes():
        return torch.stack([x[:, : k + 1].prod(1) for k in range(4)], 1)

    for name in PRESETS:
        a = dynamiclrp.explain(torch.cumprod(x, 1), x, relevance=R, rules=name)
        b = dynamiclrp.explain(prefixes(), x, relevance=R, rules=name)
        close(a, b)


def test_cumprod_value_is_replayed_for_a_downstream_add():
    """``cumprod(x) + bias`` with another consumer of the sum: the add needs cumprod's value,
    which the node saved (its result) or replays; the split must use the true value."""
    g = gen(62)
    x, R = randn(g, 3, 4, grad=True), randn(g, 3, 4)
    b = torch.nn.Parameter(randn(g, 4))
    rx = dynamiclrp.explain(torch.cumprod(x, 1) + b, x, relevance=R)
    z = torch.cumprod(x.detach(), 1)
    r_z = R * z.abs() / (z.abs() + b.detach().abs())
    expected = dynamiclrp.explain(torch.cumprod(x, 1), x, relevance=r_z)
    close(rx, expected)


# --- census (issue 14): trace, nansum, torch.norm nodes, 0-d groups --------------------------


@pytest.mark.parametrize("preset", ["dynamiclrp", "epsilon", "zplus"])
@pytest.mark.parametrize(
    "name",
    ["trace", "nansum_all", "nansum_dim", "norm_p3_dim", "norm_all", "norm_fro_dims", "norm_inf"],
)
def test_census_reduction_same_map_as_covered_spelling(name: str, preset: str) -> None:
    """Each new node gives the map of the already-covered spelling of the same function."""
    f, g_ = {
        "trace": (torch.trace, lambda x: x.diagonal().sum()),
        "nansum_all": (torch.nansum, torch.sum),
        "nansum_dim": (
            lambda x: torch.nansum(x, 1, keepdim=True),
            lambda x: x.sum(1, keepdim=True),
        ),
        "norm_p3_dim": (
            lambda x: torch.ops.aten.norm.ScalarOpt_dim(x, 3, [1]),
            lambda x: torch.linalg.vector_norm(x, 3, dim=1),
        ),
        "norm_all": (lambda x: torch.ops.aten.norm.Scalar(x, 2), torch.linalg.vector_norm),
        "norm_fro_dims": (
            lambda x: torch.ops.aten.norm.ScalarOpt_dim_dtype(x, 2, [0, 1], False, dtype=DT),
            lambda x: torch.linalg.vector_norm(x, 2, dim=(0, 1)),
        ),
        "norm_inf": (
            lambda x: torch.ops.aten.norm.ScalarOpt_dim(x, float("inf"), [0], True),
            lambda x: torch.linalg.vector_norm(x, float("inf"), dim=0, keepdim=True),
        ),
    }[name]
    g = gen(40)
    x = randn(g, 3, 4, grad=True)
    R = randn(g, *f(x).shape)
    r_new, rep = dynamiclrp.explain(f(x), x, relevance=R, rules=preset, return_report=True)
    r_old = dynamiclrp.explain(g_(x), x, relevance=R, rules=preset)
    close(r_new, r_old)
    assert abs(rep.residual) < 1e-10


def test_census_trace_and_norm_node_types() -> None:
    """The spellings above reach the new nodes (else the test compares a map with itself;
    ``torch.norm`` itself now dispatches to ``linalg.vector_norm`` in Python: the OpInfo census
    reaches ``aten::norm`` through its ``norm`` samples)."""
    x = randn(gen(41), 3, 4, grad=True)
    names = {
        type(torch.trace(x).grad_fn).__name__,
        type(torch.nansum(x).grad_fn).__name__,
        type(torch.ops.aten.norm.ScalarOpt_dim(x, 3, [1]).grad_fn).__name__,
        type(torch.ops.aten.norm.Scalar(x, 3).grad_fn).__name__,
        type(
            torch.ops.aten.norm.ScalarOpt_dim_dtype(x, 2, [0, 1], False, dtype=DT).grad_fn
        ).__name__,
    }
    assert names == {
        "TraceBackward0",
        "NansumBackward0",
        "NormBackward1",
        "NormBackward0",
        "NormBackward3",
    }


def test_census_trace_lrp0_by_hand() -> None:
    """``z = sum_i x_ii``: LRP-0 gives each diagonal element ``R x_ii / z``, the rest nothing."""
    x = randn(gen(42), 4, 4, grad=True)
    rules = dataclasses.replace(dynamiclrp.preset("epsilon"), eps=1e-12)
    rx = dynamiclrp.explain(torch.trace(x), x, relevance=torch.tensor(2.0, dtype=DT), rules=rules)
    xd = x.detach()
    close(rx, torch.diag(2.0 * xd.diagonal() / xd.diagonal().sum()))


@pytest.mark.parametrize(
    "f",
    [
        lambda x: torch.prod(x, 0),
        lambda x: torch.linalg.vector_norm(x, 2, dim=0),
        lambda x: torch.linalg.vector_norm(x, 3, dim=-1, keepdim=True),
        lambda x: torch.var(x, dim=0, correction=0) + x,
    ],
)
def test_census_zero_dim_groups(f) -> None:
    """A reduction along dim 0 of a 0-d tensor is a group of one: it takes all of ``R``
    (masked.norm / masked.prod on 0-d inputs divided by zero before)."""
    x = torch.tensor(-1.5, dtype=DT, requires_grad=True)
    out = f(x)
    rx, rep = dynamiclrp.explain(out, x, relevance=torch.tensor(0.75, dtype=DT), return_report=True)
    assert torch.isfinite(rx)
    assert abs(rep.residual) < 1e-12


@pytest.mark.parametrize("preset", ["dynamiclrp", "epsilon"])
@pytest.mark.parametrize("p", [2.0, 3.0, 1.0, float("inf")])
@pytest.mark.parametrize("which", ["both", "x", "y_broadcast"])
def test_census_dist_same_map_as_norm_of_difference(which: str, p: float, preset: str) -> None:
    """``torch.dist(x, y, p)`` (``DistBackward0``) gives the map of ``vector_norm(x - y, p)``."""
    g = gen(43)
    x = randn(g, 3, 4, grad=which in ("both", "x"))
    y = randn(g, 3, 4, grad=which == "both") if which != "y_broadcast" else randn(g, 4, grad=True)
    xs = [t for t in (x, y) if t.requires_grad]
    out = torch.dist(x, y, p)
    assert type(out.grad_fn).__name__ == "DistBackward0"
    R = torch.tensor(0.7, dtype=DT)
    r_new, rep = dynamiclrp.explain(out, xs, relevance=R, rules=preset, return_report=True)
    ref = torch.linalg.vector_norm(x - y, p)
    r_ref = dynamiclrp.explain(ref, xs, relevance=R, rules=preset)
    for a, b in zip(r_new, r_ref, strict=True):
        close(a, b)
    assert abs(rep.residual) < 1e-10


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_census_nll_loss_epsilon_by_hand(reduction: str, weighted: bool) -> None:
    """``nll_loss`` is linear in ``x`` (coefficients ``-w_t`` or ``-w_t / sum w``): the epsilon
    rule ``R_x = x * L^T(R / stab(z))`` written out per sample; LRP-0 == gradient x input."""
    g = gen(44)
    x = randn(g, 5, 4, grad=True)
    t = torch.tensor([1, 0, 3, 3, 2])
    w = torch.rand(4, generator=g, dtype=DT) + 0.5 if weighted else None
    out = F.nll_loss(x, t, weight=w, reduction=reduction, ignore_index=0)
    lrp0 = dataclasses.replace(dynamiclrp.preset("epsilon"), eps=1e-12)
    (gx,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
    close(dynamiclrp.explain(out, x, rules=lrp0), gx * x.detach())
    R = randn(g, *out.shape)
    rules = dataclasses.replace(lrp0, eps=0.01)
    rx = dynamiclrp.explain(out, x, relevance=R, rules=rules)
    wt = torch.ones(5, dtype=DT) if w is None else w[t]
    wt = torch.where(t == 0, 0.0, wt)  # ignore_index=0
    coef = -wt / wt.sum() if reduction == "mean" else -wt
    xt = x.detach()[torch.arange(5), t]
    expected = torch.zeros(5, 4, dtype=DT)
    if reduction == "none":
        expected[torch.arange(5), t] = xt * coef * R / stab(coef * xt, 0.01)
    else:
        z = (coef * xt).sum()
        expected[torch.arange(5), t] = xt * coef * R / stab(z, 0.01)
    close(rx, expected)


@pytest.mark.parametrize("preset", ["dynamiclrp", "epsilon"])
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
@pytest.mark.parametrize("which", ["both", "x1", "x2"])
def test_census_cdist_same_map_as_norm_of_pair_differences(which: str, p: float, preset: str):
    g = gen(45)
    x1 = randn(g, 2, 3, 4, grad=which in ("both", "x1"))
    x2 = randn(g, 1, 5, 4, grad=which in ("both", "x2"))  # broadcast over the batch
    xs = [t for t in (x1, x2) if t.requires_grad]
    out = torch.cdist(x1, x2, p, compute_mode="donot_use_mm_for_euclid_dist")
    assert type(out.grad_fn).__name__ == "CdistBackward0"
    R = randn(g, *out.shape)
    r_new, rep = dynamiclrp.explain(out, xs, relevance=R, rules=preset, return_report=True)
    ref = torch.linalg.vector_norm(x1[..., :, None, :] - x2[..., None, :, :], p, dim=-1)
    r_ref = dynamiclrp.explain(ref, xs, relevance=R, rules=preset)
    for a, b in zip(r_new, r_ref, strict=True):
        close(a, b)
    assert abs(rep.residual) < 1e-10


@pytest.mark.parametrize("preset", ["dynamiclrp", "epsilon"])
@pytest.mark.parametrize("p", [2.0, 1.0, float("inf")])
def test_census_pdist_same_map_as_norm_of_pair_differences(p: float, preset: str) -> None:
    g = gen(46)
    x = randn(g, 4, 3, grad=True)
    out = F.pdist(x, p)
    assert type(out.grad_fn).__name__ == "PdistBackward0"
    R = randn(g, *out.shape)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, rules=preset, return_report=True)
    i, j = torch.triu_indices(4, 4, 1)
    ref = torch.linalg.vector_norm(x[i] - x[j], p, dim=-1)
    close(rx, dynamiclrp.explain(ref, x, relevance=R, rules=preset))
    assert abs(rep.residual) < 1e-10


# --- issue 14: logsumexp, logcumsumexp, renorm, grid_sample ---------------------------------------

from dynamiclrp.errors import UncoveredOpError  # noqa: E402
from dynamiclrp.presets import PRESETS  # noqa: E402

LRP0 = dataclasses.replace(dynamiclrp.preset("epsilon"), eps=1e-12)


def _same_map_every_preset(make_a, make_b, x, R, rtol=1e-9) -> None:
    """``make_a(x)`` and ``make_b(x)`` give the same map under every preset, books closing."""
    for name in PRESETS:
        ra, rep = dynamiclrp.explain(make_a(x), x, relevance=R, rules=name, return_report=True)
        rb = dynamiclrp.explain(make_b(x), x, relevance=R, rules=name)
        torch.testing.assert_close(ra, rb, rtol=rtol, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
        assert abs(rep.residual) < 1e-9, (name, rep.residual)


@pytest.mark.parametrize("dim,keepdim", [(1, False), ((0, 2), True), (-1, True)])
def test_logsumexp_same_map_as_log_sum_exp_written_out(dim, keepdim) -> None:
    g = gen(61)
    x = randn(g, 3, 4, 5, grad=True)
    out = torch.logsumexp(x, dim, keepdim=keepdim)
    assert type(out.grad_fn).__name__ == "LogsumexpBackward0"
    R = randn(g, *out.shape)
    _same_map_every_preset(
        lambda t: torch.logsumexp(t, dim, keepdim=keepdim),
        lambda t: torch.log(torch.exp(t).sum(dim, keepdim=keepdim)),
        x,
        R,
    )


def test_logsumexp_splits_by_softmax_proportional() -> None:
    """``R_x = R * softmax(x)`` (the proportional split of the sum of exponentials), from an
    explicit loop over the groups."""
    g = gen(62)
    x = randn(g, 3, 4, grad=True)
    R = randn(g, 3)
    rx = dynamiclrp.explain(torch.logsumexp(x, 1), x, relevance=R, rules=PROP)
    xs = x.detach()
    want = torch.empty_like(xs)
    for i in range(3):
        e = [math.exp(float(v)) for v in xs[i]]
        for j in range(4):
            want[i, j] = float(R[i]) * e[j] / sum(e)
    close(rx, want)


def test_logsumexp_large_values_stay_finite() -> None:
    """exp(1000) overflows the written-out spelling, not the rule (softmax of the group)."""
    x = torch.tensor([[1000.0, 1000.0, 990.0]], dtype=DT, requires_grad=True)
    rx = dynamiclrp.explain(torch.logsumexp(x, 1), x, rules="epsilon")
    assert torch.isfinite(rx).all()
    close(rx.sum(), torch.logsumexp(x.detach(), 1).sum())


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_logcumsumexp_same_map_as_log_cumsum_exp_written_out(dim) -> None:
    g = gen(63)
    x = randn(g, 4, 5, grad=True)
    out = torch.logcumsumexp(x, dim)
    assert type(out.grad_fn).__name__ == "LogcumsumexpBackward0"
    R = randn(g, *out.shape)
    _same_map_every_preset(
        lambda t: torch.logcumsumexp(t, dim),
        lambda t: torch.log(torch.cumsum(torch.exp(t), dim)),
        x,
        R,
    )


def test_logcumsumexp_prefix_split_by_hand() -> None:
    """``R_x[j] = sum_{k >= j} R_k exp(x_j) / sum_{i <= k} exp(x_i)`` (proportional)."""
    x = torch.tensor([0.3, -1.2, 2.0, 0.1], dtype=DT, requires_grad=True)
    R = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DT)
    rx = dynamiclrp.explain(torch.logcumsumexp(x, 0), x, relevance=R, rules=PROP)
    e = [math.exp(float(v)) for v in x.detach()]
    want = [sum(float(R[k]) * e[j] / sum(e[: k + 1]) for k in range(j, 4)) for j in range(4)]
    close(rx, torch.tensor(want, dtype=DT))


@pytest.mark.parametrize("p,dim", [(2.0, 0), (1.0, 1), (3.0, -1)])
def test_renorm_gives_x_all_of_r(p, dim) -> None:
    """``x`` times a statistic of ``x``: each element keeps its output's relevance."""
    g = gen(64)
    x = randn(g, 3, 4, grad=True)
    out = torch.renorm(x, p, dim, 0.7)
    assert type(out.grad_fn).__name__ == "RenormBackward0"
    R = randn(g, 3, 4)
    for name in PRESETS:
        rx, rep = dynamiclrp.explain(out, x, relevance=R, rules=name, return_report=True)
        close(rx, R)
        assert abs(rep.residual) < 1e-12


def _grid(g, *shape):
    return torch.rand(*shape, generator=g, dtype=DT) * 2.4 - 1.2  # some points outside


def _jacobian_matrix(f, x):
    """``M`` of the linear map ``f`` (one row per output element), column by column."""
    cols = []
    for k in range(x.numel()):
        e = torch.zeros(x.numel(), dtype=DT)
        e[k] = 1
        cols.append(f(e.view_as(x)).reshape(-1))
    return torch.stack(cols, 1)


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("rules", [PROP, SIGNED], ids=["proportional", "signed"])
def test_grid_sample_is_the_linear_rule_of_its_matrix(mode, padding, rules) -> None:
    g = gen(65)
    x = randn(g, 1, 2, 4, 5, grad=True)
    grid = _grid(g, 1, 3, 3, 2)

    def f(t):
        return F.grid_sample(t, grid, mode, padding, align_corners=False)

    out = f(x)
    assert type(out.grad_fn).__name__ == "GridSampler2DBackward0"
    R = randn(g, *out.shape)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, rules=rules, return_report=True)
    M = _jacobian_matrix(f, x.detach())
    if mode == "bicubic":  # coefficients of either sign: always the signed form
        rules = dataclasses.replace(rules, reduction="signed")
    close(rx, expected(M, x, R, rules))
    assert abs(rep.residual) < 1e-9


def test_grid_sample_3d_lrp0_is_gradient_x_input() -> None:
    g = gen(66)
    x = randn(g, 1, 2, 3, 4, 3, grad=True)
    grid = _grid(g, 1, 2, 2, 3, 3)
    out = F.grid_sample(x, grid, "bilinear", "zeros", align_corners=True)
    assert type(out.grad_fn).__name__ == "GridSampler3DBackward0"
    rx = dynamiclrp.explain(out, x, relevance=out.detach(), rules=LRP0)
    (gr,) = torch.autograd.grad(out.sum(), x)
    close(rx, gr * x.detach(), rtol=1e-8, atol=1e-10)


def test_grid_sample_with_a_data_grid_is_refused() -> None:
    g = gen(67)
    x = randn(g, 1, 1, 4, 4, grad=True)
    grid = _grid(g, 1, 2, 2, 2).requires_grad_()
    out = F.grid_sample(x, grid, align_corners=False)
    with pytest.raises(UncoveredOpError, match="grid that depends on a requested input"):
        dynamiclrp.explain(out, [x, grid])
    # the grid held constant: explained
    rx = dynamiclrp.explain(F.grid_sample(x, grid.detach(), align_corners=False), x)
    assert torch.isfinite(rx).all()


def test_renorm_same_map_as_written_out_statistic() -> None:
    """``x * where(n > maxnorm, maxnorm / (n + 1e-7), 1)`` with ``n`` the norm of each row: the
    plan finds the scale a statistic of ``x``, as renorm's rule says."""
    g = gen(68)
    x = randn(g, 3, 4, grad=True)
    R = randn(g, 3, 4)

    def spelled(t):
        n = torch.linalg.vector_norm(t, 2, dim=1, keepdim=True)
        return t * torch.where(n > 0.7, 0.7 / (n + 1e-7), torch.ones_like(n))

    torch.testing.assert_close(torch.renorm(x, 2.0, 0, 0.7), spelled(x))
    _same_map_every_preset(lambda t: torch.renorm(t, 2.0, 0, 0.7), spelled, x, R)
