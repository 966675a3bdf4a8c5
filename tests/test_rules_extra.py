"""Interpolation, norms, variance, products, addcmul/addcdiv and lerp against hand-written formulas.

Expected values are written out here (loops, explicit interpolation weights, plain torch); the
library is only called through :func:`dynamiclrp.explain`, except for the replay test at the end,
which compares each new entry's replay with the real forward output.

- interpolation ``z = M x`` (``M`` built from the interpolation weights):
  ``reduction="proportional"``: ``R_x = |x| * M^T (R / M |x|)``; ``"signed"``:
  ``R_x = x * M^T (R / stab(M x))``; bicubic is always signed;
- norms: ``R_x = R * |x|^p / sum_G |x|^p``; var/std: ``R_x = R * (x - m)^2 / sum_G (x - m)^2``;
  prod: ``R_x = R / n``;
- addcmul/addcdiv: add split over ``self`` and ``value * t1 * t2``, then the mul rule;
- lerp: add split over ``(1 - w) * a`` and ``w * b``.
"""

from __future__ import annotations

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
PROP = dynamiclrp.Rules()
SIGNED = dynamiclrp.Rules(
    add="signed", reduction="signed", eps=0.05
)  # a large eps: a wrong z shows
RULESETS = {"proportional": PROP, "signed": SIGNED}


def _unknown_sum(value: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``(value + bias) * 1.0``: the scalar product passes ``R`` on unchanged but keeps the sum's
    value out of reach, so the add must get ``value`` by replaying the op that made it (the op's
    replay rule is what these tests check) rather than as ``sum - bias``."""
    return (value + bias) * 1.0


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-9, atol: float = 1e-10):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def split_sum(R, terms, rules):
    """The add rule over ``terms`` (in the output's shape)."""
    if rules.add == "proportional":
        den = sum(t.abs() for t in terms)
        return [R * t.abs() / den for t in terms]
    z = sum(terms)
    return [R * t / stab(z, rules.eps) for t in terms]


def linear_map_rule(M, x, R, rules, signed_only=False):
    xv, rv = x.detach().reshape(-1), R.reshape(-1)
    if rules.reduction == "proportional" and not signed_only:
        ax = xv.abs()
        return (ax * (M.T @ (rv / (M @ ax)))).reshape(x.shape)
    return (xv * (M.T @ (rv / stab(M @ xv, rules.eps)))).reshape(x.shape)


# --- interpolation ---------------------------------------------------------------------------


def _scale(n_in: int, n_out: int, align_corners: bool, scale_factor):
    if align_corners:
        return (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    return 1.0 / scale_factor if scale_factor else n_in / n_out


def linear_weights(n_in: int, n_out: int, align_corners: bool, scale_factor=None) -> torch.Tensor:
    """1-D linear interpolation as a matrix (PyTorch's source-index convention)."""
    s = _scale(n_in, n_out, align_corners, scale_factor)
    M = torch.zeros(n_out, n_in, dtype=DT)
    for i in range(n_out):
        src = s * i if align_corners else max(s * (i + 0.5) - 0.5, 0.0)
        i0 = int(math.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        M[i, i0] += 1 - lam
        M[i, i1] += lam
    return M


def cubic_weights(n_in: int, n_out: int, align_corners: bool, scale_factor=None) -> torch.Tensor:
    """1-D cubic convolution (A = -0.75), borders clamped, as a matrix."""
    A = -0.75

    def near(t):  # |t| <= 1
        return ((A + 2) * t - (A + 3)) * t * t + 1

    def far(t):  # 1 < |t| < 2
        return ((A * t - 5 * A) * t + 8 * A) * t - 4 * A

    s = _scale(n_in, n_out, align_corners, scale_factor)
    M = torch.zeros(n_out, n_in, dtype=DT)
    for i in range(n_out):
        src = s * i if align_corners else s * (i + 0.5) - 0.5
        i0 = int(math.floor(src))
        t = src - i0
        for k, c in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t)), strict=True):
            M[i, min(max(i0 + k, 0), n_in - 1)] += c
    return M


def batch_matrix(lead: int, *mats: torch.Tensor) -> torch.Tensor:
    """``M`` for ``(lead, *spatial)`` flattened: one separable map per leading (n, c) slice."""
    M = torch.eye(lead, dtype=DT)
    for m in mats:
        M = torch.kron(M, m)
    return M


def basis_matrix(f, shape) -> torch.Tensor:
    """The matrix of a linear map by applying it to each basis tensor (plain torch)."""
    n = math.prod(shape)
    cols = [f(torch.eye(n, dtype=DT)[k].reshape(shape)).reshape(-1) for k in range(n)]
    return torch.stack(cols, 1)


UPSAMPLES = {
    # name: (input shape, interpolate kwargs, 1-D weight builder, per-dim (size or scale))
    "linear1d_size": ((2, 2, 5), dict(size=8, mode="linear"), linear_weights),
    "linear1d_scale_ac": (
        (2, 2, 5),
        dict(scale_factor=1.7, mode="linear", align_corners=True),
        linear_weights,
    ),
    "bilinear_size": ((1, 2, 4, 5), dict(size=(7, 3), mode="bilinear"), linear_weights),
    "bilinear_scale": (
        (1, 2, 4, 5),
        dict(scale_factor=(1.7, 2.3), mode="bilinear"),
        linear_weights,
    ),
    "bilinear_ac": (
        (1, 2, 4, 5),
        dict(size=(6, 8), mode="bilinear", align_corners=True),
        linear_weights,
    ),
    "trilinear": ((1, 1, 3, 4, 3), dict(size=(5, 3, 4), mode="trilinear"), linear_weights),
    "bicubic_size": ((1, 2, 4, 5), dict(size=(7, 8), mode="bicubic"), cubic_weights),
    "bicubic_scale_ac": (
        (1, 2, 4, 5),
        dict(scale_factor=1.6, mode="bicubic", align_corners=True),
        cubic_weights,
    ),
}


def upsample_matrix(shape, kwargs, weights, out_shape) -> torch.Tensor:
    spatial = len(shape) - 2
    sf = kwargs.get("scale_factor")
    sf = (sf,) * spatial if isinstance(sf, float) else sf or (None,) * spatial
    ac = kwargs.get("align_corners", False)
    mats = [weights(shape[2 + d], out_shape[2 + d], ac, sf[d]) for d in range(spatial)]
    return batch_matrix(shape[0] * shape[1], *mats)


@pytest.mark.parametrize("mode", list(RULESETS))
@pytest.mark.parametrize("name", list(UPSAMPLES))
def test_interpolation(name: str, mode: str) -> None:
    g = gen(20)
    shape, kwargs, weights = UPSAMPLES[name]
    x = randn(g, *shape, grad=True)
    out = F.interpolate(x, **kwargs)
    M = upsample_matrix(shape, kwargs, weights, tuple(out.shape))
    close(out.detach().reshape(-1), M @ x.detach().reshape(-1))  # the matrix is the op
    R = randn(g, *out.shape)
    rules = RULESETS[mode]
    bicubic = kwargs["mode"] == "bicubic"
    rx, rep = dynamiclrp.explain(out, x, relevance=R, rules=rules, return_report=True)
    close(rx, linear_map_rule(M, x, R, rules, signed_only=bicubic))
    if mode == "proportional" and not bicubic:
        close(rx.sum(), R.sum())
    assert abs(rep.residual) < 1e-9


def test_bicubic_ignores_proportional_because_of_negative_weights() -> None:
    """Bicubic weights take both signs: the engine uses the signed rule in every preset."""
    M = cubic_weights(4, 7, False)
    assert (M < 0).any()
    g = gen(21)
    x = randn(g, 1, 1, 4, 4, grad=True)
    out = F.interpolate(x, size=(7, 7), mode="bicubic")
    R = randn(g, *out.shape)
    a = dynamiclrp.explain(out, x, relevance=R, rules=dynamiclrp.Rules(reduction="proportional"))
    b = dynamiclrp.explain(out, x, relevance=R, rules=dynamiclrp.Rules(reduction="signed"))
    close(a, b)
    close(a, linear_map_rule(batch_matrix(1, M, M), x, R, PROP, signed_only=True))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_antialiased_interpolation(mode: str) -> None:
    g = gen(22)
    x = randn(g, 1, 1, 6, 7, grad=True)
    kwargs = dict(size=(3, 4), mode=mode, antialias=True)
    out = F.interpolate(x, **kwargs)
    M = basis_matrix(lambda t: F.interpolate(t, **kwargs), tuple(x.shape))
    R = randn(g, *out.shape)
    for rules in RULESETS.values():
        rx = dynamiclrp.explain(out, x, relevance=R, rules=rules)
        close(rx, linear_map_rule(M, x, R, rules, signed_only=mode == "bicubic"))


def test_interpolation_replay_uses_saved_scales() -> None:
    """``interpolate(x, scale_factor) + bias``: the add needs the interpolated value, which only
    a replay with the saved scales (not the sizes) gives."""
    g = gen(23)
    x = randn(g, 1, 2, 4, 5, grad=True)
    up = F.interpolate(x, scale_factor=(1.7, 2.3), mode="bilinear")
    by_size = F.interpolate(x.detach(), size=tuple(up.shape[2:]), mode="bilinear")
    assert not torch.allclose(up.detach(), by_size)  # the scales do matter here
    bias = torch.nn.Parameter(randn(g, *up.shape[1:]))
    R = randn(g, *up.shape)
    rx, rep = dynamiclrp.explain(_unknown_sum(up, bias), x, relevance=R, return_report=True)
    assert rep.promises.get("replay", 0) >= 1
    u = up.detach()
    ru = R * u.abs() / (u.abs() + bias.detach().abs())
    M = upsample_matrix(tuple(x.shape), dict(scale_factor=(1.7, 2.3)), linear_weights, u.shape)
    close(rx, linear_map_rule(M, x, ru, PROP))


# --- norms -----------------------------------------------------------------------------------


def norm_expected(x, p, dims, R, keepdim):
    """Loop over groups: each element's share of the p-th power sum."""
    xd = x.detach()
    dims = sorted(d % xd.dim() for d in (range(xd.dim()) if dims is None else dims))
    kept = [d for d in range(xd.dim()) if d not in dims]
    out = torch.zeros_like(xd)
    Rk = R.reshape([1 if d in dims else xd.shape[d] for d in range(xd.dim())])
    for key in itertools.product(*(range(xd.shape[d]) for d in kept)):
        members = [
            idx
            for idx in itertools.product(*(range(s) for s in xd.shape))
            if all(idx[d] == k for d, k in zip(kept, key, strict=True))
        ]
        mags = [abs(float(xd[idx])) for idx in members]
        if p == math.inf:
            w = [1.0 if m == max(mags) else 0.0 for m in mags]
        elif p == -math.inf:
            w = [1.0 if m == min(mags) else 0.0 for m in mags]
        elif p == 0:
            w = [1.0 if m != 0 else 0.0 for m in mags]
        else:
            w = [m**p for m in mags]
        r = float(Rk[tuple(0 if d in dims else idx_d for d, idx_d in enumerate(members[0]))])
        for idx, wi in zip(members, w, strict=True):
            out[idx] = r * wi / sum(w)
    return out


NORMS = {
    "l2_full": (2, None, False),
    "l1_dim1": (1, (1,), False),
    "l3_dim-1_keep": (3, (-1,), True),
    "l0.5_dims02": (0.5, (0, 2), False),
    "l-1.5_dim0": (-1.5, (0,), True),
    "linf_dim-1": (math.inf, (-1,), False),
    "l-inf_dims12": (-math.inf, (1, 2), False),
    "l0_dim1": (0, (1,), False),
}


@pytest.mark.parametrize("name", list(NORMS))
def test_vector_norm(name: str) -> None:
    p, dims, keepdim = NORMS[name]
    g = gen(30)
    # integers with ties (inf-norms split between equal magnitudes) and zeros (the 0-norm)
    x = torch.randint(-3, 4, (2, 3, 4), generator=g).to(DT)
    if p < 0:
        x[x == 0] = 2.0  # a zero would take everything: tested separately
    x[0, 0, :] = torch.tensor([3.0, -3.0, 1.0, 2.0])  # a tie for the max magnitude
    x.requires_grad_()
    out = torch.linalg.vector_norm(x, p, dims, keepdim)
    assert out.grad_fn.name() == "LinalgVectorNormBackward0"
    R = randn(g, *out.shape)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, return_report=True)
    close(rx, norm_expected(x, p, dims, R, keepdim))
    close(rx.sum(), R.sum())
    assert abs(rep.residual) < 1e-9


def test_norm_variants_and_large_p() -> None:
    """``Tensor.norm`` records the same node; a large ``p`` neither overflows nor gives NaN."""
    g = gen(31)
    x = (randn(g, 3, 5) * 50).requires_grad_()
    R = randn(g, 3)
    rx = dynamiclrp.explain(x.norm(dim=1), x, relevance=R)
    xd = x.detach()
    close(rx, R[:, None] * xd**2 / (xd**2).sum(1, keepdim=True))
    rx = dynamiclrp.explain(torch.linalg.vector_norm(x, 400, dim=1), x, relevance=R)
    assert torch.isfinite(rx).all()
    logw = 400 * xd.abs().log()  # shares as softmax of log-weights: no overflow in the test
    close(rx, R[:, None] * torch.softmax(logw, 1), atol=1e-9)


def test_negative_p_norm_gives_everything_to_a_zero() -> None:
    x = torch.tensor([[1.0, 0.0, -2.0], [1.0, 2.0, -2.0]], dtype=DT, requires_grad=True)
    R = torch.tensor([2.0, 3.0], dtype=DT)
    rx = dynamiclrp.explain(torch.linalg.vector_norm(x, -1, dim=1), x, relevance=R)
    close(rx[0], torch.tensor([0.0, 2.0, 0.0], dtype=DT))
    close(rx[1], 3.0 * torch.tensor([1.0, 0.5, 0.5], dtype=DT) / 2.0)


def test_norm_of_all_zero_group_passes_nothing() -> None:
    x = torch.zeros(2, 3, dtype=DT)
    x[1] = torch.tensor([1.0, -2.0, 2.0])
    x.requires_grad_()
    R = torch.tensor([1.5, 2.0], dtype=DT)
    rx = dynamiclrp.explain(torch.linalg.vector_norm(x, dim=1), x, relevance=R)
    close(rx[0], torch.zeros(3, dtype=DT))
    close(rx[1], 2.0 * torch.tensor([1.0, 4.0, 4.0], dtype=DT) / 9.0)


# --- variance and standard deviation ---------------------------------------------------------


def centred_share(xd, dims, R):
    """``R * (x - m)^2 / sum (x - m)^2`` over each group, written with explicit loops over rows
    of the group-flattened tensor."""
    nd = xd.dim()
    dims = sorted(d % nd for d in (range(nd) if dims is None else dims))
    kept = [d for d in range(nd) if d not in dims]
    perm = kept + dims
    xp = xd.permute(perm).reshape(math.prod(xd.shape[d] for d in kept), -1)
    Rf = R.reshape(-1)
    out = torch.zeros_like(xp)
    for i in range(xp.shape[0]):
        row = xp[i]
        m = sum(float(v) for v in row) / len(row)
        sq = [(float(v) - m) ** 2 for v in row]
        for j in range(len(row)):
            out[i, j] = float(Rf[i]) * sq[j] / sum(sq)
    inv = [perm.index(d) for d in range(nd)]
    return out.reshape([xd.shape[d] for d in perm]).permute(inv)


MOMENTS = {
    "var_dim1": (lambda x: x.var(1), (1,), "VarBackward0"),
    "var_full": (lambda x: x.var(), None, "VarBackward0"),
    "var_dims02_keep_c0": (lambda x: x.var((0, 2), keepdim=True, correction=0), (0, 2), "Var"),
    "std_dim-1_keep": (lambda x: x.std(-1, keepdim=True), (-1,), "StdBackward0"),
    "std_full": (lambda x: x.std(), None, "StdBackward0"),
    "std_dims12": (lambda x: torch.std(x, (1, 2)), (1, 2), "StdBackward0"),
}


@pytest.mark.parametrize("name", list(MOMENTS))
def test_variance_and_std(name: str) -> None:
    f, dims, node = MOMENTS[name]
    g = gen(40)
    x = randn(g, 2, 3, 4, grad=True)
    out = f(x)
    assert out.grad_fn.name().startswith(node)
    R = randn(g, *out.shape)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, return_report=True)
    close(rx, centred_share(x.detach(), dims, R))
    close(rx.sum(), R.sum())
    assert abs(rep.residual) < 1e-9


@pytest.mark.parametrize("mode", list(RULESETS))
@pytest.mark.parametrize("op", [torch.var_mean, torch.std_mean])
def test_var_mean_and_std_mean(op, mode: str) -> None:
    """Both outputs: the spread's relevance by the centred squares, the mean's by the mean rule."""
    g = gen(41)
    x = randn(g, 3, 5, grad=True)
    s, m = op(x, 1)
    assert s.grad_fn.name() == ("VarMeanBackward0" if op is torch.var_mean else "StdMeanBackward0")
    Rs, Rm = randn(g, 3), randn(g, 3)
    rules = RULESETS[mode]
    # a seed over both outputs: explain their stack
    rx = dynamiclrp.explain(torch.stack([s, m]), x, relevance=torch.stack([Rs, Rm]), rules=rules)
    xd = x.detach()
    expected = centred_share(xd, (1,), Rs)
    if mode == "proportional":
        expected = expected + Rm[:, None] * xd.abs() / xd.abs().sum(1, keepdim=True)
    else:
        mean = xd.sum(1) / 5
        expected = expected + xd * (Rm / stab(mean, rules.eps))[:, None] / 5
    close(rx, expected)
    only_mean = dynamiclrp.explain(m, x, relevance=Rm, rules=rules)
    close(only_mean, expected - centred_share(xd, (1,), Rs))


def test_constant_group_passes_nothing() -> None:
    x = randn(gen(42), 2, 4)
    x[0] = 1.5
    x.requires_grad_()
    R = torch.tensor([1.0, 2.0], dtype=DT)
    rx = dynamiclrp.explain(x.var(1), x, relevance=R)
    assert torch.isfinite(rx).all()
    close(rx[0], torch.zeros(4, dtype=DT))
    close(rx[1].sum(), R[1])


@pytest.mark.parametrize("op", ["var", "std", "var_mean"])
def test_variance_value_for_a_downstream_add(op: str) -> None:
    """``var(x, 1) + bias``: VarBackward0 saves no result, so the add's operand is replayed."""
    g = gen(43)
    x = randn(g, 3, 5, grad=True)
    v = {
        "var": lambda: x.var(1),
        "std": lambda: x.std(1),
        "var_mean": lambda: torch.var_mean(x, 1)[0],
    }[op]()
    bias = torch.nn.Parameter(randn(g, 3))
    R = randn(g, 3)
    rx, rep = dynamiclrp.explain(_unknown_sum(v, bias), x, relevance=R, return_report=True)
    if op != "std":  # std's node saved its result
        assert rep.promises.get("replay", 0) >= 1
    vd = v.detach()
    rv = R * vd.abs() / (vd.abs() + bias.detach().abs())
    close(rx, centred_share(x.detach(), (1,), rv))


# --- prod ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "f,n",
    [
        (lambda x: x.prod(), 24),
        (lambda x: x.prod(1), 3),
        (lambda x: x.prod(-1, keepdim=True), 4),
        (lambda x: torch.prod(x, 0), 2),
    ],
)
def test_prod_is_uniform(f, n: int) -> None:
    g = gen(50)
    x = randn(g, 2, 3, 4, grad=True)
    out = f(x)
    assert out.grad_fn.name() in ("ProdBackward0", "ProdBackward1")
    R = randn(g, *out.shape)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, return_report=True)
    expected = torch.zeros(2, 3, 4, dtype=DT)
    for i, j, k in itertools.product(range(2), range(3), range(4)):
        if n == 24:
            r = R
        elif n == 3:
            r = R[i, k]
        elif n == 4:
            r = R[i, j, 0]
        else:
            r = R[j, k]
        expected[i, j, k] = r / n
    close(rx, expected)
    close(rx.sum(), R.sum())
    assert abs(rep.residual) < 1e-9


def test_prod_value_for_a_downstream_add() -> None:
    g = gen(51)
    x = randn(g, 3, 4, grad=True)
    p = x.prod(1)
    bias = torch.nn.Parameter(randn(g, 3) * 0.1)
    R = randn(g, 3)
    rx = dynamiclrp.explain(p + bias, x, relevance=R)
    pd = p.detach()
    rp = R * pd.abs() / (pd.abs() + bias.detach().abs())
    close(rx, (rp / 4)[:, None].expand(3, 4))


# --- addcmul / addcdiv -----------------------------------------------------------------------

ADDC = {"addcmul": (torch.addcmul, torch.mul), "addcdiv": (torch.addcdiv, torch.div)}


@pytest.mark.parametrize("mode", list(RULESETS))
@pytest.mark.parametrize("op", list(ADDC))
def test_addc_three_data_operands(op: str, mode: str) -> None:
    g = gen(60)
    a, t1, t2 = randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True)
    f, combine = ADDC[op]
    out = f(a, t1, t2, value=0.7)
    R = randn(g, 3, 4)
    rules = RULESETS[mode]
    ra, r1, r2 = dynamiclrp.explain(out, [a, t1, t2], relevance=R, rules=rules)
    ea, ep = split_sum(R, [a.detach(), 0.7 * combine(t1.detach(), t2.detach())], rules)
    close(ra, ea)
    close(r1, ep / 2)
    close(r2, ep / 2)
    if mode == "proportional":
        close(ra.sum() + r1.sum() + r2.sum(), R.sum())


def test_addcmul_with_a_parameter_factor_gives_the_product_share_to_the_data() -> None:
    g = gen(61)
    a, t1 = randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True)
    w = torch.nn.Parameter(randn(g, 4))
    out = torch.addcmul(a, t1, w)
    R = randn(g, 3, 4)
    (ra, r1), rep = dynamiclrp.explain(out, [a, t1], relevance=R, return_report=True)
    ea, ep = split_sum(R, [a.detach(), t1.detach() * w.detach()], PROP)
    close(ra, ea)
    close(r1, ep)
    assert abs(rep.absorbed) < 1e-12


def test_addcmul_with_a_broadcast_statistic_gives_the_share_to_the_full_factor() -> None:
    """``mean + x / std(x)``-style: the per-row factor is a parameter-free function of the full
    factor's data (a statistic), so all of the product term's share goes to ``x``."""
    g = gen(62)
    a, t1 = randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True)
    s = (t1.pow(2).mean(-1, keepdim=True) + 1.0).sqrt()
    out = torch.addcdiv(a, t1, s, value=-1.5)
    R = randn(g, 3, 4)
    ra, r1, rs = dynamiclrp.explain(out, [a, t1, s], relevance=R, rules=SIGNED)
    ea, ep = split_sum(R, [a.detach(), -1.5 * t1.detach() / s.detach()], SIGNED)
    close(ra, ea)
    close(rs, torch.zeros(3, 1, dtype=DT))
    # t1's own share passes on unchanged below; the statistic sends it nothing
    close(r1, ep)


def test_addcmul_with_an_independent_broadcast_factor_shares_uniformly() -> None:
    """A broadcast factor that is data of its own (not computed from the other factor: a gate, a
    FiLM scale) is no statistic: the product term's share is split half and half."""
    g = gen(64)
    a, t1, s = randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True), randn(g, 3, 1, grad=True)
    out = torch.addcdiv(a, t1, s, value=-1.5)
    R = randn(g, 3, 4)
    ra, r1, rs = dynamiclrp.explain(out, [a, t1, s], relevance=R, rules=SIGNED)
    ea, ep = split_sum(R, [a.detach(), -1.5 * t1.detach() / s.detach()], SIGNED)
    close(ra, ea)
    close(r1, ep / 2)
    close(rs, (ep / 2).sum(1, keepdim=True))


def test_addcmul_broadcast_self_and_both_broadcast_factors() -> None:
    g = gen(63)
    a = randn(g, 3, 4, grad=True)
    t1, t2 = randn(g, 3, 1, grad=True), randn(g, 1, 4, grad=True)
    out = torch.addcmul(a, t1, t2)
    R = randn(g, 3, 4)
    ra, r1, r2 = dynamiclrp.explain(out, [a, t1, t2], relevance=R)
    ea, ep = split_sum(R, [a.detach(), t1.detach() * t2.detach()], PROP)
    close(ra, ea)
    close(r1, (ep / 2).sum(1, keepdim=True))
    close(r2, (ep / 2).sum(0, keepdim=True))


def test_addcmul_full_is_judged_against_the_product_not_the_output() -> None:
    """``self`` (3, 4) + ``t1`` (4,) * ``s`` (1,): ``t1`` spans the whole product term and ``s``
    is a statistic of it (``1 / norm(t1)``), so the product share goes to ``t1`` alone (the full
    shape is that of the product term, not of the output)."""
    g = gen(67)
    a, t1 = randn(g, 3, 4, grad=True), randn(g, 4, grad=True)
    s = 1 / t1.norm().reshape(1)
    out = torch.addcmul(a, t1, s)
    R = randn(g, 3, 4)
    ra, r1, rs = dynamiclrp.explain(out, [a, t1, s], relevance=R)
    ea, ep = split_sum(R, [a.detach(), t1.detach() * s.detach()], PROP)
    close(ra, ea)
    close(rs, torch.zeros(1, dtype=DT))
    close(r1, ep.sum(0))


def test_addcmul_of_two_constants_absorbs_the_product_share() -> None:
    g = gen(68)
    a, c1, c2 = randn(g, 3, 4, grad=True), randn(g, 3, 4), randn(g, 3, 4)
    out = torch.addcmul(a, c1, c2)  # neither factor recorded nor saved: p = out - a
    R = randn(g, 3, 4)
    ra, rep = dynamiclrp.explain(out, a, relevance=R, return_report=True)
    ea, ep = split_sum(R, [a.detach(), c1 * c2], PROP)
    close(ra, ea)
    assert rep.absorbed == pytest.approx(float(ep.sum()), abs=1e-9)
    assert rep.stabiliser == pytest.approx(0.0, abs=1e-9)


def test_addcmul_unrecorded_self_is_recovered_from_the_output_and_absorbed() -> None:
    g = gen(64)
    c = randn(g, 3, 4)  # does not require grad: not recorded, not saved
    t1, t2 = randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True)
    out = torch.addcmul(c, t1, t2, value=2.0)
    R = randn(g, 3, 4)
    (r1, r2), rep = dynamiclrp.explain(out, [t1, t2], relevance=R, return_report=True)
    ec, ep = split_sum(R, [c, 2.0 * t1.detach() * t2.detach()], PROP)
    close(r1, ep / 2)
    close(r2, ep / 2)
    assert rep.absorbed == pytest.approx(float(ec.sum()), abs=1e-9)
    assert abs(rep.residual) < 1e-9


def test_addcmul_unrecorded_factor_uses_its_saved_value() -> None:
    g = gen(65)
    a, t1 = randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True)
    k = randn(g, 3, 4)  # saved by the node (t1's gradient needs it)
    out = torch.addcmul(a, t1, k)
    R = randn(g, 3, 4)
    ra, r1 = dynamiclrp.explain(out, [a, t1], relevance=R, rules=SIGNED)
    ea, ep = split_sum(R, [a.detach(), t1.detach() * k], SIGNED)
    close(ra, ea)
    close(r1, ep)


@pytest.mark.parametrize("op", list(ADDC))
def test_addc_value_for_a_downstream_add(op: str) -> None:
    g = gen(66)
    a, t1, t2 = randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True)
    f, combine = ADDC[op]
    y = f(a, t1, t2, value=0.3)
    bias = torch.nn.Parameter(randn(g, 4))
    R = randn(g, 3, 4)
    (ra, r1, r2), rep = dynamiclrp.explain(
        _unknown_sum(y, bias), [a, t1, t2], relevance=R, return_report=True
    )
    assert rep.promises.get("replay", 0) >= 1
    yd = y.detach()
    ry = R * yd.abs() / (yd.abs() + bias.detach().abs())
    ea, ep = split_sum(ry, [a.detach(), 0.3 * combine(t1.detach(), t2.detach())], PROP)
    close(ra, ea)
    close(r1, ep / 2)
    close(r2, ep / 2)


# --- lerp ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(RULESETS))
def test_lerp_scalar_weight(mode: str) -> None:
    g = gen(70)
    a, b = randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True)
    out = torch.lerp(a, b, 0.3)
    assert out.grad_fn.name() == "LerpBackward0"
    R = randn(g, 3, 4)
    rules = RULESETS[mode]
    ra, rb = dynamiclrp.explain(out, [a, b], relevance=R, rules=rules)
    ea, eb = split_sum(R, [0.7 * a.detach(), 0.3 * b.detach()], rules)
    close(ra, ea)
    close(rb, eb)
    if mode == "proportional":
        close(ra.sum() + rb.sum(), R.sum())


@pytest.mark.parametrize("mode", list(RULESETS))
@pytest.mark.parametrize("weight", ["constant", "parameter"])
def test_lerp_tensor_weight(weight: str, mode: str) -> None:
    g = gen(71)
    a, b = randn(g, 3, 4, grad=True), randn(g, 1, 4, grad=True)
    w = torch.rand(3, 4, generator=g, dtype=DT)
    w = torch.nn.Parameter(w) if weight == "parameter" else w
    out = torch.lerp(a, b, w)
    assert out.grad_fn.name() == "LerpBackward1"
    R = randn(g, 3, 4)
    rules = RULESETS[mode]
    (ra, rb), rep = dynamiclrp.explain(out, [a, b], relevance=R, rules=rules, return_report=True)
    wd = w.detach()
    ea, eb = split_sum(R, [(1 - wd) * a.detach(), wd * b.detach()], rules)
    close(ra, ea)
    close(rb, eb.sum(0, keepdim=True))
    assert abs(rep.absorbed) < 1e-12  # the weight takes nothing
    assert abs(rep.residual) < 1e-9


def test_lerp_with_a_data_weight_raises() -> None:
    g = gen(72)
    a, b = randn(g, 3, grad=True), randn(g, 3, grad=True)
    w = torch.rand(3, generator=g, dtype=DT).requires_grad_()
    with pytest.raises(NotImplementedError, match="LerpBackward1"):
        dynamiclrp.explain(torch.lerp(a, b, w), [a, b], relevance=torch.ones(3, dtype=DT))


def test_lerp_unrecorded_end_is_recovered_from_the_output() -> None:
    g = gen(73)
    a, c = randn(g, 3, 4, grad=True), randn(g, 3, 4)
    out = torch.lerp(a, c, 0.25)
    R = randn(g, 3, 4)
    ra, rep = dynamiclrp.explain(out, a, relevance=R, return_report=True)
    ea, ec = split_sum(R, [0.75 * a.detach(), 0.25 * c], PROP)
    close(ra, ea)
    assert rep.absorbed == pytest.approx(float(ec.sum()), abs=1e-9)


@pytest.mark.parametrize("op", ["addcmul", "lerp"])
def test_unrecorded_operand_without_known_output_fails_loudly(op: str) -> None:
    """``relu(addcmul(const, t1, t2))``: nothing saved the sum, so the constant's term is unknown."""
    g = gen(75)
    c, t = randn(g, 3, 4), randn(g, 3, 4, grad=True)
    y = torch.addcmul(c, t, t.detach()) if op == "addcmul" else torch.lerp(t, c, 0.3)
    with pytest.raises(dynamiclrp.ValueRecoveryError, match="require grad"):
        dynamiclrp.explain(torch.relu(y), t)


@pytest.mark.parametrize("weight", ["scalar", "tensor"])
def test_lerp_value_for_a_downstream_add(weight: str) -> None:
    g = gen(74)
    a, b = randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True)
    w = 0.6 if weight == "scalar" else torch.rand(3, 4, generator=g, dtype=DT)
    y = torch.lerp(a, b, w)
    bias = torch.nn.Parameter(randn(g, 3, 4))
    R = randn(g, 3, 4)
    (ra, rb), rep = dynamiclrp.explain(
        _unknown_sum(y, bias), [a, b], relevance=R, return_report=True
    )
    assert rep.promises.get("replay", 0) >= 1
    yd = y.detach()
    ry = R * yd.abs() / (yd.abs() + bias.detach().abs())
    ea, eb = split_sum(ry, [(1 - w) * a.detach(), w * b.detach()], PROP)
    close(ra, ea)
    close(rb, eb)


# --- conservation (proportional) over random shapes ------------------------------------------


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(2, 4), min_size=1, max_size=3),
    dim=st.integers(0, 2),
    keepdim=st.booleans(),
    kind=st.sampled_from(["norm1", "norm2", "var", "std", "prod"]),
    seed=st.integers(0, 2**16),
)
def test_nonlinear_reductions_conserve(shape, dim, keepdim, kind, seed) -> None:
    g = gen(seed)
    dim = dim % len(shape)
    x = randn(g, *shape, grad=True)
    out = {
        "norm1": lambda: torch.linalg.vector_norm(x, 1, dim, keepdim),
        "norm2": lambda: torch.linalg.vector_norm(x, 2, dim, keepdim),
        "var": lambda: x.var(dim, keepdim=keepdim),
        "std": lambda: x.std(dim, keepdim=keepdim),
        "prod": lambda: x.prod(dim, keepdim=keepdim),
    }[kind]()
    R = randn(g, *out.shape)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, return_report=True)
    close(rx.sum(), R.sum(), atol=1e-9)
    assert abs(rep.residual) < 1e-9


# --- replays reproduce the forward -----------------------------------------------------------


def _replay_cases(g):
    x4, x3, x5 = randn(g, 1, 2, 4, 5), randn(g, 2, 2, 5), randn(g, 1, 1, 3, 4, 3)
    a, b, c = randn(g, 3, 4), randn(g, 3, 4), randn(g, 1, 4)
    w = torch.rand(3, 4, generator=g, dtype=DT)
    return [
        (lambda t: F.interpolate(t[0], scale_factor=1.7, mode="linear"), [x3]),
        (lambda t: F.interpolate(t[0], scale_factor=(1.7, 2.3), mode="bilinear"), [x4]),
        (lambda t: F.interpolate(t[0], size=(6, 7), mode="bilinear", align_corners=True), [x4]),
        (lambda t: F.interpolate(t[0], scale_factor=1.5, mode="trilinear"), [x5]),
        (lambda t: F.interpolate(t[0], scale_factor=(1.7, 1.3), mode="bicubic"), [x4]),
        (lambda t: F.interpolate(t[0], size=(2, 3), mode="bilinear", antialias=True), [x4]),
        (lambda t: F.interpolate(t[0], size=(2, 3), mode="bicubic", antialias=True), [x4]),
        (lambda t: torch.linalg.vector_norm(t[0], 3, (0, -1), True), [x4]),
        (lambda t: torch.linalg.vector_norm(t[0], math.inf), [a]),
        (lambda t: t[0].var(-1, correction=0), [a]),
        (lambda t: t[0].std(), [a]),
        (lambda t: torch.var_mean(t[0], (0, 1), keepdim=True)[0], [a]),
        (lambda t: torch.std_mean(t[0], 0)[0], [a]),
        (lambda t: t[0].prod(), [a]),
        (lambda t: t[0].prod(-1, keepdim=True), [a]),
        (lambda t: torch.addcmul(t[0], t[1], t[2], value=0.3), [a, b, c]),
        (lambda t: torch.addcdiv(t[0], t[1], t[2], value=-2), [a, b, c]),
        (lambda t: torch.lerp(t[0], t[1], 0.3), [a, b]),
        (lambda t: torch.lerp(t[0], t[1], t[2]), [a, b, w]),
    ]


def test_every_new_entry_replays_its_forward() -> None:
    """Each entry's replay, given the node and its input values, gives the forward's outputs."""
    from dynamiclrp.rules import OP_TABLE
    from dynamiclrp.rules.base import ReplayContext

    seen = set()
    for f, args in _replay_cases(gen(80)):
        leaves = [t.clone().requires_grad_() for t in args]
        out = f(leaves)
        fn = out.grad_fn
        seen.add(fn.name())
        replayed = OP_TABLE[fn.name()].replay(ReplayContext(fn, [t.detach() for t in leaves]))
        close(replayed[0], out.detach(), rtol=1e-12, atol=1e-12)
    assert seen == {
        "UpsampleLinear1DBackward0",
        "UpsampleBilinear2DBackward0",
        "UpsampleTrilinear3DBackward0",
        "UpsampleBicubic2DBackward0",
        "UpsampleBilinear2DAaBackward0",
        "UpsampleBicubic2DAaBackward0",
        "LinalgVectorNormBackward0",
        "VarBackward0",
        "StdBackward0",
        "VarMeanBackward0",
        "StdMeanBackward0",
        "ProdBackward0",
        "ProdBackward1",
        "AddcmulBackward0",
        "AddcdivBackward0",
        "LerpBackward0",
        "LerpBackward1",
    }
