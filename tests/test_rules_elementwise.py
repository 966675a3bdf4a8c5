"""Element-wise rules (``dynamiclrp.rules.elementwise``) run through the engine.

Each test builds a tiny float64 graph whose output is the op under test, seeds an explicit random
relevance ``R`` and compares what :func:`dynamiclrp.explain` returns with the formula of the module
docstring written out here with plain torch ops:

- add / sub, ``add="proportional"``: ``R_a = R |a| / (|a| + |b|)`` with ``b`` the term as added
  (``alpha * b``, ``-alpha * b``); ``add="signed"``: ``R_a = R a / stab(a + b)``; a constant operand
  absorbs its share; a Python scalar shift is the identity;
- mul / div: two full-shape data operands get ``R / 2`` each; a broadcast statistic or a constant
  gets nothing (``R_x = R``);
- unary ops: identity.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import gen, randn, stab

import dynamiclrp

DT = torch.float64


def param(g: torch.Generator, *shape: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=DT))


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-9, atol: float = 1e-10):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def prop(r: torch.Tensor, *terms: torch.Tensor) -> list[torch.Tensor]:
    """Proportional split of ``r`` over ``terms`` (full shape, no zero denominators here)."""
    mags = [t.detach().abs() for t in terms]
    den = sum(mags)
    return [r * m / den for m in mags]


SIGNED = dynamiclrp.Rules(add="signed", eps=0.05)  # large eps: a wrong denominator shows


# --- add / sub -------------------------------------------------------------------------------


def test_add_broadcast_two_data_operands() -> None:
    g = gen(0)
    a, b, R = randn(g, 3, 4, grad=True), randn(g, 4, grad=True), randn(g, 3, 4)
    (ra, rb), rep = dynamiclrp.explain(a + b, [a, b], relevance=R, return_report=True)
    ea, eb = prop(R, a, b.expand(3, 4))
    close(ra, ea)
    close(rb, eb.sum(0))
    close(ra.sum() + rb.sum(), R.sum())
    assert abs(rep.residual) < 1e-9 and abs(rep.absorbed) < 1e-12


def test_add_broadcast_first_operand_smaller() -> None:
    g = gen(1)
    a, b, R = randn(g, 2, 1, 4, grad=True), randn(g, 3, 1, grad=True), randn(g, 2, 3, 4)
    ra, rb = dynamiclrp.explain(a + b, [a, b], relevance=R)
    ea, eb = prop(R, a.expand(2, 3, 4), b.expand(2, 3, 4))
    close(ra, ea.sum(1, keepdim=True))
    close(rb, eb.sum((0, 2)).reshape(3, 1))


@pytest.mark.parametrize("bias_first", [False, True])
def test_add_bias_parameter_absorbs_its_share(bias_first: bool) -> None:
    g = gen(2)
    x, bias, R = randn(g, 3, 4, grad=True), param(g, 4), randn(g, 3, 4)
    out = bias + x if bias_first else x + bias
    rx, rep = dynamiclrp.explain(out, x, relevance=R, return_report=True)
    ex, eb = prop(R, x, bias.expand(3, 4))
    close(rx, ex)
    assert rep.absorbed == pytest.approx(float(eb.sum()), abs=1e-10)
    assert rep.inputs[0] == pytest.approx(float(ex.sum()), abs=1e-10)
    assert abs(rep.residual) < 1e-9
    assert abs(eb.sum()) > 1e-3  # the bias's share is not trivially zero


def test_sub_two_data_operands() -> None:
    g = gen(3)
    a, b, R = randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True), randn(g, 3, 4)
    ra, rb = dynamiclrp.explain(a - b, [a, b], relevance=R)
    ea, eb = prop(R, a, -b)
    close(ra, ea)
    close(rb, eb)


def test_sub_bias_parameter() -> None:
    g = gen(4)
    x, bias, R = randn(g, 3, 4, grad=True), param(g, 4), randn(g, 3, 4)
    rx, rep = dynamiclrp.explain(x - bias, x, relevance=R, return_report=True)
    ex, eb = prop(R, x, bias.expand(3, 4))
    close(rx, ex)
    assert rep.absorbed == pytest.approx(float(eb.sum()), abs=1e-10)


def test_sub_constant_tensor_inside_graph() -> None:
    """``x - c`` (``c`` a buffer-like tensor, not in the graph), its value readable downstream:
    ``x`` keeps ``|x| / (|x| + |c|)``, not half and not nothing."""
    g = gen(5)
    x, c, w, R = randn(g, 3, 4, grad=True), randn(g, 3, 4), param(g, 4), randn(g, 3, 4)
    out = (x - c) * w  # mul by a Parameter: all of R to x - c, and it saves x - c
    rx = dynamiclrp.explain(out, x, relevance=R)
    close(rx, prop(R, x, c)[0])
    # a constant that is zero where x is not: x must get everything there
    c0 = torch.zeros(3, 4, dtype=DT)
    rx0 = dynamiclrp.explain((x - c0) * w, x, relevance=R)
    close(rx0, R)


def test_sub_constant_tensor_share_is_absorbed_in_report() -> None:
    g = gen(5)
    x, c, w, R = randn(g, 3, 4, grad=True), randn(g, 3, 4), param(g, 4), randn(g, 3, 4)
    _, rep = dynamiclrp.explain((x - c) * w, x, relevance=R, return_report=True)
    assert rep.absorbed == pytest.approx(float(prop(R, x, c)[1].sum()), abs=1e-10)


def test_add_constant_tensor_at_the_output() -> None:
    """``x + c`` as the explained output: the sum's value is the output itself."""
    g = gen(6)
    x, c, R = randn(g, 3, 4, grad=True), randn(g, 3, 4), randn(g, 3, 4)
    rx, rep = dynamiclrp.explain(x + c, x, relevance=R, return_report=True)
    ex, ec = prop(R, x, c)
    close(rx, ex)
    assert rep.absorbed == pytest.approx(float(ec.sum()), abs=1e-10)


def test_add_constant_tensor_unrecoverable_value_fails_loudly() -> None:
    """``relu(x + c)``: relu keeps only its result, so the sum (and ``c``) is lost; the engine must
    say so instead of guessing."""
    g = gen(6)
    x, c, R = randn(g, 3, 4, grad=True), randn(g, 3, 4), randn(g, 3, 4)
    with pytest.raises(dynamiclrp.ValueRecoveryError, match="did not record"):
        dynamiclrp.explain(torch.relu(x + c), x, relevance=R)


SCALAR_SHIFTS = {
    "x+1": lambda x: x + 1.0,
    "1+x": lambda x: 1.0 + x,
    "x-1": lambda x: x - 1.0,
    "sub_alpha": lambda x: torch.sub(x, 1.5, alpha=2),
    "1-x": lambda x: 1.0 - x,
}
SCALAR_TERMS = {  # the constant as it enters the sum
    "x+1": 1.0,
    "1+x": 1.0,
    "x-1": -1.0,
    "sub_alpha": -3.0,
    "1-x": None,  # RsubBackward1: identity (docs/rules.md 2.5, a known deviation)
}


@pytest.mark.parametrize("name", list(SCALAR_SHIFTS))
@pytest.mark.parametrize("where", ["root", "under_gelu"])
def test_python_scalar_shift_absorbs_its_share(name: str, where: str) -> None:
    """torch 2.13 records ``x + c`` as AddBackward0 with an unrecorded constant: the constant is a
    bias and absorbs ``|c| / (|x| + |c|)`` (design decision, docs/rules.md); ``c - x`` is recorded
    as RsubBackward1, a unary op: identity."""
    g = gen(7)
    x, R = randn(g, 3, 4, grad=True), randn(g, 3, 4)
    y = SCALAR_SHIFTS[name](x)
    out = y if where == "root" else F.gelu(y)  # gelu saves its input: the shift's value is there
    rx = dynamiclrp.explain(out, x, relevance=R)
    c = SCALAR_TERMS[name]
    xd = x.detach()
    close(rx, R if c is None else R * xd.abs() / (xd.abs() + abs(c)))


@pytest.mark.parametrize("op", ["add", "sub"])
def test_alpha_scales_the_second_term(op: str) -> None:
    g = gen(8)
    a, b, R = randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True), randn(g, 3, 4)
    out = torch.add(a, b, alpha=2) if op == "add" else torch.sub(a, b, alpha=2)
    ra, rb = dynamiclrp.explain(out, [a, b], relevance=R)
    sign = 1.0 if op == "add" else -1.0
    ea, eb = prop(R, a, sign * 2 * b)
    close(ra, ea)
    close(rb, eb)
    close(ra + rb, R)


def test_alpha_with_bias_parameter() -> None:
    g = gen(9)
    x, bias, R = randn(g, 3, 4, grad=True), param(g, 4), randn(g, 3, 4)
    rx, rep = dynamiclrp.explain(torch.add(x, bias, alpha=3), x, relevance=R, return_report=True)
    ex, eb = prop(R, x, 3 * bias.expand(3, 4))
    close(rx, ex)
    assert rep.absorbed == pytest.approx(float(eb.sum()), abs=1e-10)


@pytest.mark.parametrize("op", ["add", "sub", "add_alpha"])
def test_signed_variant(op: str) -> None:
    g = gen(10)
    a, b, R = randn(g, 3, 4, grad=True), randn(g, 4, grad=True), randn(g, 3, 4)
    if op == "add":
        out, tb = a + b, b.detach()
    elif op == "sub":
        out, tb = a - b, -b.detach()
    else:
        out, tb = torch.add(a, b, alpha=-0.5), -0.5 * b.detach()
    ra, rb = dynamiclrp.explain(out, [a, b], relevance=R, rules=SIGNED)
    gz = R / stab(a.detach() + tb, SIGNED.eps)
    close(ra, a.detach() * gz)
    close(rb, (tb * gz).sum(0))


def test_signed_variant_bias_absorbs() -> None:
    g = gen(11)
    x, bias, R = randn(g, 3, 4, grad=True), param(g, 4), randn(g, 3, 4)
    rx, rep = dynamiclrp.explain(x + bias, x, relevance=R, rules=SIGNED, return_report=True)
    gz = R / stab(x.detach() + bias.detach(), SIGNED.eps)
    close(rx, x.detach() * gz)
    assert rep.absorbed == pytest.approx(float((bias.detach() * gz).sum()), abs=1e-10)
    assert abs(rep.residual) < 1e-9


def test_signed_preset_epsilon_uses_signed_add() -> None:
    g = gen(12)
    a, b, R = randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True), randn(g, 3, 4)
    ra, rb = dynamiclrp.explain(a + b, [a, b], relevance=R, rules="epsilon")
    gz = R / stab(a.detach() + b.detach(), 1e-6)
    close(ra, a.detach() * gz, rtol=1e-7)
    close(rb, b.detach() * gz, rtol=1e-7)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    keep=st.lists(st.booleans(), min_size=3, max_size=3),
    drop=st.integers(0, 2),
    seed=st.integers(0, 2**16),
    swap=st.booleans(),
)
def test_proportional_add_conserves_for_broadcast_shapes(shape, keep, drop, seed, swap) -> None:
    g = gen(seed)
    drop = min(drop, len(shape) - 1)
    b_shape = [s if k else 1 for s, k in zip(shape, keep, strict=False)][drop:]
    a, b = randn(g, *shape, grad=True), randn(g, *b_shape, grad=True)
    first, second = (b, a) if swap else (a, b)
    out = first + second
    R = randn(g, *out.shape)
    r1, r2 = dynamiclrp.explain(out, [first, second], relevance=R)
    assert r1.shape == first.shape and r2.shape == second.shape
    close(r1.sum() + r2.sum(), R.sum(), rtol=1e-9, atol=1e-9)
    e1, e2 = prop(R, first.expand(out.shape), second.expand(out.shape))
    close(r1, e1.sum_to_size(first.shape))
    close(r2, e2.sum_to_size(second.shape))


# --- mul / div -------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["mul", "div"])
def test_product_of_two_full_shape_data_operands_halves(op: str) -> None:
    g = gen(13)
    a, b, R = randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True), randn(g, 3, 4)
    out = a * b if op == "mul" else a / b
    (ra, rb), rep = dynamiclrp.explain(out, [a, b], relevance=R, return_report=True)
    close(ra, R / 2)
    close(rb, R / 2)
    assert abs(rep.residual) < 1e-9


def test_product_data_times_data_via_linear() -> None:
    """Both operands computed from data (two linear maps of x): half of R reaches each branch."""
    g = gen(14)
    x, R = randn(g, 2, 3, grad=True), randn(g, 2, 4)
    w1, w2 = param(g, 4, 3), param(g, 4, 3)
    u, v = F.linear(x, w1), F.linear(x, w2)
    rx = dynamiclrp.explain(u * v, x, relevance=R)
    xd = x.detach()
    eps = 1e-6
    ex = sum(xd * (((R / 2) / stab(xd @ w.detach().T, eps)) @ w.detach()) for w in (w1, w2))
    close(rx, ex, rtol=1e-7)


def test_rmsnorm_from_primitives_gives_all_to_x() -> None:
    g = gen(15)
    x, w, R = randn(g, 3, 5, grad=True), param(g, 5), randn(g, 3, 5)
    stat = torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5)
    out = x * stat * w
    rx, rep = dynamiclrp.explain(out, x, relevance=R, return_report=True)
    close(rx, R)
    assert abs(rep.residual) < 1e-9


@pytest.mark.parametrize("order", ["x_first", "stat_first", "div"])
def test_broadcast_statistic_is_held_constant(order: str) -> None:
    g = gen(16)
    x, R = randn(g, 2, 3, 4, grad=True), randn(g, 2, 3, 4)
    var = x.pow(2).mean(-1, keepdim=True) + 0.1
    if order == "x_first":
        out = x * torch.rsqrt(var)
    elif order == "stat_first":
        out = torch.rsqrt(var) * x
    else:
        out = x / torch.sqrt(var)
    close(dynamiclrp.explain(out, x, relevance=R), R)


CONST_PRODUCTS = {
    "x*c": lambda x, c, p: x * c,
    "c*x": lambda x, c, p: c * x,
    "c_row*x": lambda x, c, p: c[0] * x,
    "x/c": lambda x, c, p: x / c,
    "x*p": lambda x, c, p: x * p,
    "p*x": lambda x, c, p: p * x,
    "x/p": lambda x, c, p: x / p,
    "2*x": lambda x, c, p: 2.0 * x,
    "x*2": lambda x, c, p: x * 2.0,
    "x/2": lambda x, c, p: x / 2.0,
    "neg": lambda x, c, p: -x,
    "x.mul(c).div(p)": lambda x, c, p: x.mul(c).div(p),
}


@pytest.mark.parametrize("name", list(CONST_PRODUCTS))
def test_product_with_constant_is_identity(name: str) -> None:
    g = gen(17)
    x, c, p, R = randn(g, 3, 4, grad=True), randn(g, 3, 4), param(g, 4), randn(g, 3, 4)
    out = CONST_PRODUCTS[name](x, c, p)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, return_report=True)
    close(rx, R)
    assert abs(rep.residual) < 1e-9


# --- unary -----------------------------------------------------------------------------------

POS = {"log", "sqrt", "rsqrt", "pow_half"}
UNARY = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "softplus": lambda t: F.softplus(t, beta=2.0, threshold=1.0),
    "exp": torch.exp,
    "log": torch.log,
    "pow": lambda t: t**3,
    "pow_half": lambda t: t.pow(0.5),
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "abs": torch.abs,
    "clamp": lambda t: t.clamp(-0.3, 0.5),
    "clamp_min": lambda t: t.clamp(min=-0.2),
    "clamp_max": lambda t: t.clamp(max=0.4),
    "leaky_relu": lambda t: F.leaky_relu(t, 0.2),
    "elu": lambda t: F.elu(t, alpha=0.7),
    "selu": F.selu,
    "hardswish": F.hardswish,
    "hardtanh": lambda t: F.hardtanh(t, -0.4, 0.6),
    "mish": F.mish,
    "erf": torch.erf,
    "neg": torch.neg,
    "reciprocal": torch.reciprocal,
}


def _unary_input(name: str, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(3, 4, generator=g, dtype=DT) * 2
    if name in POS:
        x = x.abs() + 0.1
    return x.requires_grad_()


@pytest.mark.parametrize("name", list(UNARY))
def test_unary_is_identity(name: str) -> None:
    g = gen(18)
    x, R = _unary_input(name, g), randn(g, 3, 4)
    out = UNARY[name](x)
    rx, rep = dynamiclrp.explain(out, x, relevance=R, return_report=True)
    close(rx, R)
    assert abs(rep.residual) < 1e-12


@pytest.mark.parametrize("name", list(UNARY))
def test_unary_value_is_recovered_for_a_downstream_add(name: str) -> None:
    """``f(x) + bias``: the add rule needs ``f(x)``, which comes from ``f``'s saved tensors or its
    replay; a wrong replay (wrong exponent, slope, approximation, ...) changes the split."""
    g = gen(19)
    x, bias, R = _unary_input(name, g), param(g, 4), randn(g, 3, 4)
    f = UNARY[name]
    rx = dynamiclrp.explain(f(x) + bias, x, relevance=R)
    with torch.no_grad():
        fx = f(x)
    close(rx, prop(R, fx, bias.expand(3, 4))[0])


# --- where -----------------------------------------------------------------------------------


def test_where_routes_by_condition() -> None:
    g = gen(20)
    a, b, R = randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True), randn(g, 3, 4)
    cond = randn(g, 3, 4) > 0
    assert cond.any() and (~cond).any()
    (ra, rb), rep = dynamiclrp.explain(
        torch.where(cond, a, b), [a, b], relevance=R, return_report=True
    )
    close(ra, torch.where(cond, R, 0.0))
    close(rb, torch.where(cond, 0.0, R))
    assert abs(rep.residual) < 1e-12 and abs(rep.absorbed) < 1e-12


def test_where_broadcast_condition_and_operand() -> None:
    g = gen(21)
    a, b, R = randn(g, 3, 4, grad=True), randn(g, 4, grad=True), randn(g, 3, 4)
    cond = torch.tensor([True, False, True, False])
    ra, rb = dynamiclrp.explain(torch.where(cond, a, b), [a, b], relevance=R)
    close(ra, torch.where(cond, R, 0.0))
    close(rb, torch.where(cond, 0.0, R).sum(0))


def test_where_constant_branch_absorbs() -> None:
    g = gen(22)
    x, c, R = randn(g, 3, 4, grad=True), randn(g, 3, 4), randn(g, 3, 4)
    cond = randn(g, 3, 4) > 0
    rx, rep = dynamiclrp.explain(torch.where(cond, x, c), x, relevance=R, return_report=True)
    close(rx, torch.where(cond, R, 0.0))
    assert rep.absorbed == pytest.approx(float(R[~cond].sum()), abs=1e-10)
    assert abs(rep.residual) < 1e-10


# --- the remaining element-wise unary nodes, GLU, tensor powers -----------------------------------

# name -> (op, input domain, node type): each must be one element-wise node of one input
DOMAINS = {
    "any": lambda x: x,
    "unit": lambda x: torch.tanh(x) * 0.9,  # (-1, 1)
    "pos": lambda x: x.abs() + 0.1,
    "above1": lambda x: x.abs() + 1.1,
    "prob": lambda x: torch.sigmoid(x),
}
UNARY_MORE = {
    "atan": (torch.atan, "any", "AtanBackward0"),
    "asin": (torch.asin, "unit", "AsinBackward0"),
    "acos": (torch.acos, "unit", "AcosBackward0"),
    "sinh": (torch.sinh, "any", "SinhBackward0"),
    "cosh": (torch.cosh, "any", "CoshBackward0"),
    "asinh": (torch.asinh, "any", "AsinhBackward0"),
    "acosh": (torch.acosh, "above1", "AcoshBackward0"),
    "atanh": (torch.atanh, "unit", "AtanhBackward0"),
    "tan": (torch.tan, "unit", "TanBackward0"),
    "log1p": (torch.log1p, "pos", "Log1PBackward0"),
    "log2": (torch.log2, "pos", "Log2Backward0"),
    "log10": (torch.log10, "pos", "Log10Backward0"),
    "expm1": (torch.expm1, "any", "Expm1Backward0"),
    "exp2": (torch.exp2, "any", "Exp2Backward0"),
    "erfc": (torch.erfc, "any", "ErfcBackward0"),
    "erfinv": (torch.erfinv, "unit", "ErfinvBackward0"),
    "digamma": (torch.digamma, "pos", "DigammaBackward0"),
    "lgamma": (torch.lgamma, "pos", "LgammaBackward0"),
    "polygamma": (lambda t: torch.polygamma(2, t), "pos", "PolygammaBackward0"),
    "mvlgamma": (lambda t: torch.mvlgamma(t, 2), "above1", "MvlgammaBackward0"),
    "logit": (torch.logit, "prob", "LogitBackward0"),
    "logit_eps": (lambda t: torch.logit(t, eps=0.3), "prob", "LogitBackward0"),
    "sinc": (torch.sinc, "any", "SincBackward0"),
    "i0": (torch.i0, "any", "I0Backward0"),
    "i0e": (torch.special.i0e, "any", "SpecialI0EBackward0"),
    "i1": (torch.special.i1, "any", "SpecialI1Backward0"),
    "i1e": (torch.special.i1e, "any", "SpecialI1EBackward0"),
    "erfcx": (torch.special.erfcx, "any", "SpecialErfcxBackward0"),
    "log_ndtr": (torch.special.log_ndtr, "any", "SpecialLogNdtrBackward0"),
    "ndtri": (torch.special.ndtri, "prob", "SpecialNdtriBackward0"),
    "sgn": (torch.sgn, "any", "SgnBackward0"),
    "angle": (torch.angle, "any", "AngleBackward0"),
    "deg2rad": (torch.deg2rad, "any", "Deg2RadBackward0"),
    "rad2deg": (torch.rad2deg, "any", "Rad2DegBackward0"),
    "frac": (torch.frac, "any", "FracBackward0"),
    "sign": (torch.sign, "any", "SignBackward0"),
    "round": (torch.round, "any", "RoundBackward0"),
    "round_decimals": (lambda t: torch.round(t, decimals=1), "any", "RoundBackward1"),
    "floor": (torch.floor, "any", "FloorBackward0"),
    "ceil": (torch.ceil, "any", "CeilBackward0"),
    "trunc": (torch.trunc, "any", "TruncBackward0"),
    "fmod": (lambda t: torch.fmod(t, 0.7), "any", "FmodBackward0"),
    "remainder": (lambda t: torch.remainder(t, 0.7), "any", "RemainderBackward0"),
    "copysign": (lambda t: torch.copysign(t, -1.0), "any", "CopysignBackward1"),
    "celu": (lambda t: F.celu(t, 0.5), "any", "CeluBackward0"),
    "relu6": (F.relu6, "any", "HardtanhBackward0"),
    "rrelu_eval": (
        lambda t: F.rrelu(t, 0.1, 0.3, training=False),
        "any",
        "RreluWithNoiseBackward0",
    ),
    "rrelu_train": (
        lambda t: F.rrelu(t, 0.1, 0.3, training=True),
        "any",
        "RreluWithNoiseBackward0",
    ),
    "softshrink": (lambda t: F.softshrink(t, 0.3), "any", "SoftshrinkBackward0"),
    "hardshrink": (lambda t: F.hardshrink(t, 0.3), "any", "HardshrinkBackward0"),
    "threshold": (lambda t: F.threshold(t, 0.1, 2.0), "any", "ThresholdBackward0"),
    "logsigmoid": (F.logsigmoid, "any", "LogSigmoidBackward0"),
    "nan_to_num": (torch.nan_to_num, "any", "NanToNumBackward0"),
    "scalar_pow": (lambda t: torch.pow(2.0, t), "any", "PowBackward2"),
    "float_power_base": (lambda t: torch.float_power(3, t), "any", "PowBackward2"),
    "xlogy_scalar_y": (lambda t: torch.xlogy(t, 2.0), "any", "XlogyBackward2"),
    "xlogy_scalar_x": (lambda t: torch.xlogy(2.0, t), "pos", "XlogyBackward1"),
}


@pytest.mark.parametrize("name", list(UNARY_MORE))
def test_more_unary_nodes_are_identity_and_replay_exactly(name: str) -> None:
    """The node type is the one in the table (one element-wise node of one input), the rule
    passes ``R`` on unchanged, and the entry's replay (when the op saves what it needs) rebuilds
    the forward value exactly."""
    from dynamiclrp.rules import OP_TABLE
    from dynamiclrp.rules.base import ReplayContext

    f, domain, node = UNARY_MORE[name]
    g = gen(40)
    x = DOMAINS[domain](torch.randn(3, 4, generator=g, dtype=DT)).detach().requires_grad_()
    R = randn(g, 3, 4)
    out = f(x)
    assert type(out.grad_fn).__name__ == node
    assert len(out.grad_fn.next_functions) == 1
    rx, rep = dynamiclrp.explain(out, x, relevance=R, return_report=True)
    close(rx, R)
    assert abs(rep.residual) < 1e-12
    entry = OP_TABLE[node]
    if entry.replay is not None:
        (replayed,) = entry.replay(ReplayContext(out.grad_fn, [x.detach()]))
        close(replayed, out.detach(), rtol=1e-12, atol=1e-12)


def test_ops_without_a_saved_argument_have_no_replay() -> None:
    """round(x, decimals), fmod/remainder by a scalar, threshold's fill value, nan_to_num's
    replacements: autograd keeps no trace of the argument, so a promise through them fails
    loudly instead of replaying a default."""
    from dynamiclrp.rules import OP_TABLE

    for node in (
        "RoundBackward1",
        "FmodBackward0",
        "RemainderBackward0",
        "ThresholdBackward0",
        "NanToNumBackward0",
        "CopysignBackward1",
    ):
        assert OP_TABLE[node].replay is None, node


def _every_preset_equal(make_a, make_b, inputs, R) -> None:
    from dynamiclrp.presets import PRESETS

    for name in PRESETS:
        ra = dynamiclrp.explain(make_a(), inputs, relevance=R, rules=name)
        rb = dynamiclrp.explain(make_b(), inputs, relevance=R, rules=name)
        for a, b in zip(ra, rb, strict=True):
            torch.testing.assert_close(
                a, b, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}"
            )


@pytest.mark.parametrize("dim", [-1, 0])
def test_glu_equals_its_written_out_spelling_under_every_preset(dim: int) -> None:
    g = gen(41)
    x, R = randn(g, 4, 6, grad=True), randn(g, *((4, 3) if dim == -1 else (2, 6)))

    def written_out():
        a, b = x.chunk(2, dim)
        return a * torch.sigmoid(b)

    assert F.glu(x, dim).grad_fn.name() == "GluBackward0"
    _every_preset_equal(lambda: F.glu(x, dim), written_out, [x], R)
    _every_preset_equal(lambda: torch.nn.GLU(dim)(x), written_out, [x], R)
    # and the numbers: R / 2 to each half; CP-LRP's constant gate: all to a
    rx = dynamiclrp.explain(F.glu(x, dim), x, relevance=R)
    close(rx, torch.cat([R / 2, R / 2], dim))
    rx = dynamiclrp.explain(F.glu(x, dim), x, relevance=R, rules="cp-lrp")
    close(rx, torch.cat([R, torch.zeros_like(R)], dim))


def test_tensor_power_equals_exp_of_product_under_every_preset() -> None:
    g = gen(42)
    x = (randn(g, 3, 4).abs() + 0.5).requires_grad_()
    y, R = randn(g, 3, 4, grad=True), randn(g, 3, 4)
    assert torch.pow(x, y).grad_fn.name() == "PowBackward1"
    _every_preset_equal(lambda: x**y, lambda: torch.exp(y * torch.log(x)), [x, y], R)
    # an activation's output as exponent is a constant gate under CP-LRP, as written out
    _every_preset_equal(
        lambda: x ** torch.sigmoid(y), lambda: torch.exp(torch.sigmoid(y) * torch.log(x)), [x, y], R
    )
    rx, ry = dynamiclrp.explain(x**y, [x, y], relevance=R)
    close(rx, R / 2)
    close(ry, R / 2)
    # one constant operand: an element-wise map of the other
    close(dynamiclrp.explain(x ** y.detach(), x, relevance=R), R)
    close(dynamiclrp.explain(x.detach() ** y, y, relevance=R), R)


def test_xlogy_of_two_tensors_equals_its_written_out_product() -> None:
    g = gen(43)
    x = randn(g, 3, 4, grad=True)
    y = (randn(g, 3, 4).abs() + 0.5).requires_grad_()
    R = randn(g, 3, 4)
    assert torch.xlogy(x, y).grad_fn.name() == "XlogyBackward0"
    _every_preset_equal(lambda: torch.xlogy(x, y), lambda: x * torch.log(y), [x, y], R)
    _every_preset_equal(
        lambda: torch.xlogy(torch.sigmoid(x), y),
        lambda: torch.sigmoid(x) * torch.log(y),
        [x, y],
        R,
    )


# --- census (issue 14): rsub with a tensor; composites the recording cannot see --------------


@pytest.mark.parametrize("preset", ["dynamiclrp", "epsilon"])
@pytest.mark.parametrize("which", ["both", "x", "y"])
def test_census_rsub_same_map_as_sub(which: str, preset: str) -> None:
    """``torch.rsub(x, y, alpha)`` is ``y - alpha * x``: the map of ``torch.sub(y, x, alpha)``,
    whichever operands are data (an unrecorded one is recovered from the output)."""
    g = gen(50)
    x = randn(g, 3, 4, grad=which in ("both", "x"))
    y = randn(g, 3, 4, grad=which in ("both", "y"))
    xs = [t for t in (x, y) if t.requires_grad]
    out = torch.rsub(x, y, alpha=2.0)
    assert type(out.grad_fn).__name__ == "RsubBackward0"
    R = randn(g, 3, 4)
    r_new, rep = dynamiclrp.explain(out, xs, relevance=R, rules=preset, return_report=True)
    r_ref = dynamiclrp.explain(torch.sub(y, x, alpha=2.0), xs, relevance=R, rules=preset)
    for a, b in zip(r_new, r_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert abs(rep.residual) < 1e-10


def test_census_rsub_signed_by_hand() -> None:
    g = gen(51)
    x, y = randn(g, 5, grad=True), randn(g, 5, grad=True)
    R = randn(g, 5)
    rules = dynamiclrp.Rules(eps=0.01, add="signed")
    rx, ry = dynamiclrp.explain(torch.rsub(x, y, alpha=0.5), [x, y], relevance=R, rules=rules)
    t0, t1 = -0.5 * x.detach(), y.detach()
    z = stab(t0 + t1, 0.01)
    torch.testing.assert_close(rx, R * t0 / z)
    torch.testing.assert_close(ry, R * t1 / z)


def test_census_composite_add_under_record_is_a_specific_refusal() -> None:
    """``F.margin_ranking_loss`` subtracts a constant inside C++: the recording cannot see it, so
    the error must not ask for ``record()`` again but say why it cannot help."""
    g = gen(52)
    x1, x2, t = randn(g, 4, grad=True), randn(g, 4), randn(g, 4).sign()
    with dynamiclrp.record() as rec:
        out = F.margin_ranking_loss(x1, x2, t, margin=0.1, reduction="sum")
    with pytest.raises(dynamiclrp.ValueRecoveryError, match="did not see it either") as err:
        dynamiclrp.explain(out, x1, recording=rec)
    assert "forward pass under `with dynamiclrp.record" not in str(err.value)
    assert "SubBackward0" in str(err.value)


# --- census (issue 14): element-wise binary ops, each the map of its written-out spelling -----

from dynamiclrp.presets import PRESETS  # noqa: E402


def _lrp0():
    import dataclasses

    return dataclasses.replace(dynamiclrp.preset("epsilon"), eps=1e-12)


def _pos(g, *shape, grad=True):
    return (torch.rand(shape, generator=g, dtype=DT) + 0.5).requires_grad_(grad)


def _same_map(op, spelled, xs, R, rtol=1e-9, atol=1e-12):
    """``op(*xs)`` and its written-out spelling give the same relevance under every preset, and
    the books of ``op`` close."""
    for name in PRESETS:
        rules = dynamiclrp.preset(name)
        got, rep = dynamiclrp.explain(
            op(*xs), list(xs), relevance=R, rules=rules, return_report=True
        )
        ref = dynamiclrp.explain(spelled(*xs), list(xs), relevance=R, rules=rules)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(
                a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
            )
        assert abs(rep.residual) < 1e-9 * R.abs().sum(), (name, rep.residual)


def _binary_data(seed, positive=False):
    g = gen(seed)
    mk = _pos if positive else (lambda g, *s: randn(g, *s, grad=True))
    return mk(g, 3, 4), mk(g, 3, 4), randn(g, 3, 4), g


BINARY_SPELLINGS = {
    "logaddexp": (torch.logaddexp, lambda a, b: torch.log(torch.exp(a) + torch.exp(b)), False),
    "logaddexp2": (torch.logaddexp2, lambda a, b: torch.log2(torch.exp2(a) + torch.exp2(b)), False),
    "hypot": (torch.hypot, lambda a, b: torch.sqrt(a**2 + b**2), False),
    "atan2": (torch.atan2, lambda a, b: torch.atan(a / b), False),
    "div_floor": (
        lambda a, b: torch.div(a, b, rounding_mode="floor"),
        lambda a, b: torch.floor(a / b),
        False,
    ),
    "div_trunc": (
        lambda a, b: torch.div(a, b, rounding_mode="trunc"),
        lambda a, b: torch.trunc(a / b),
        False,
    ),
    "ldexp": (torch.ldexp, lambda a, b: a * torch.exp2(b), False),
    "fmod": (torch.fmod, lambda a, b: a - torch.trunc(a / b).detach() * b, False),
    "remainder": (torch.remainder, lambda a, b: a - torch.floor(a / b).detach() * b, False),
    "xlog1py": (torch.special.xlog1py, lambda a, b: a * torch.log1p(b), True),
}


@pytest.mark.parametrize("name", list(BINARY_SPELLINGS))
def test_census_binary_op_is_its_written_out_spelling(name) -> None:
    op, spelled, positive = BINARY_SPELLINGS[name]
    a, b, R, g = _binary_data(60 + len(name), positive)
    if name in ("fmod", "remainder"):  # quotients of a few units: k != 0 for most elements
        a = (3 * a).detach().requires_grad_()
    _same_map(op, spelled, (a, b), R)


@pytest.mark.parametrize("name", ["logaddexp", "hypot", "fmod", "remainder", "atan2", "ldexp"])
def test_census_binary_op_with_a_constant_operand(name) -> None:
    """The second operand a constant without grad (unrecorded; fmod and hypot do not save it):
    the same map as the written-out spelling, the constant's share absorbed."""
    op, spelled, positive = BINARY_SPELLINGS[name]
    a, b, R, g = _binary_data(70 + len(name), positive)
    b = b.detach()
    for pname in ("dynamiclrp", "epsilon"):
        rules = dynamiclrp.preset(pname)
        (got,), rep = dynamiclrp.explain(
            op(a, b), [a], relevance=R, rules=rules, return_report=True
        )
        with dynamiclrp.record() as rec:  # the spelling adds b unrecorded: record its sum
            spelled_out = spelled(a, b)
        (ref,) = dynamiclrp.explain(spelled_out, [a], relevance=R, rules=rules, recording=rec)
        close(got, ref)
        assert abs(rep.residual) < 1e-9, rep.residual


def test_census_hypot_by_hand() -> None:
    g = gen(80)
    a, b, R = randn(g, 5, grad=True), randn(g, 5, grad=True), randn(g, 5)
    ra, rb = dynamiclrp.explain(torch.hypot(a, b), [a, b], relevance=R)
    a2, b2 = a.detach() ** 2, b.detach() ** 2
    close(ra, R * a2 / (a2 + b2))
    close(rb, R * b2 / (a2 + b2))


def test_census_logaddexp_large_operands_stay_finite() -> None:
    """exp(800) overflows float64: the shares come from the shifted exponentials."""
    a = torch.tensor([800.0, 1.0, -900.0], dtype=DT, requires_grad=True)
    b = torch.tensor([799.0, 2.0, -901.0], dtype=DT, requires_grad=True)
    R = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    ra, rb = dynamiclrp.explain(torch.logaddexp(a, b), [a, b], relevance=R)
    p = torch.sigmoid(a.detach() - b.detach())
    close(ra, R * p)
    close(rb, R * (1 - p))


@pytest.mark.parametrize("op", [torch.fmod, torch.remainder, torch.copysign])
def test_census_lrp0_is_gradient_times_input_where_linear(op) -> None:
    """fmod / remainder are ``a - k b`` with ``k`` constant, copysign is ``+-a``: linear where
    they are differentiable, so LRP-0 equals gradient x input (of both operands)."""
    g = gen(81)
    a, b = (3 * randn(g, 4, 5)).requires_grad_(), randn(g, 4, 5, grad=True)
    out = op(a, b)
    ra, rb = dynamiclrp.explain(out, [a, b], rules=_lrp0())
    ga, gb = torch.autograd.grad(out.sum(), [a, b])
    close(ra, ga * a.detach(), rtol=1e-8)
    close(rb, gb * b.detach(), rtol=1e-8, atol=1e-9)


def test_census_nextafter_and_frexp() -> None:
    g = gen(82)
    a, b, R = randn(g, 6, grad=True), randn(g, 6, grad=True), randn(g, 6)
    (ra, rb), rep = dynamiclrp.explain(
        torch.nextafter(a, b), [a, b], relevance=R, return_report=True
    )
    close(ra, R)
    close(rb, torch.zeros(6, dtype=DT))
    assert abs(rep.residual) < 1e-12
    mant, e = torch.frexp(a)
    for name in PRESETS:  # the written-out spelling: x / 2**e with e constant
        rules = dynamiclrp.preset(name)
        (rx,) = dynamiclrp.explain(mant, [a], relevance=R, rules=rules)
        (ref,) = dynamiclrp.explain(a / torch.exp2(e.to(DT)), [a], relevance=R, rules=rules)
        close(rx, ref)
    (rx,) = dynamiclrp.explain(torch.frexp(a)[0], [a], rules=_lrp0())
    close(rx, torch.frexp(a.detach())[0])  # gradient x input: x / 2**e


def test_census_fill_gives_the_input_nothing() -> None:
    g = gen(83)
    x, R = randn(g, 3, 2, grad=True), randn(g, 3, 2)
    h = x * 2.0
    (rx,), rep = dynamiclrp.explain(torch.fill(h, 1.5), [x], relevance=R, return_report=True)
    close(rx, torch.zeros(3, 2, dtype=DT))
    torch.testing.assert_close(torch.as_tensor(rep.absorbed, dtype=DT), R.sum())
    assert abs(rep.residual) < 1e-12


def _prelu_spelled(x, w):
    view = [1] * x.dim()
    view[1] = w.numel()
    return torch.relu(x) + w.reshape(view) * x.clamp(max=0)


def test_census_prelu_is_its_written_out_spelling() -> None:
    g = gen(84)
    x, R = randn(g, 2, 3, 4, grad=True), randn(g, 2, 3, 4)
    w = torch.nn.Parameter(torch.rand(3, generator=g, dtype=DT))
    for name in PRESETS:  # a weight: identity for x
        rules = dynamiclrp.preset(name)
        (rx,) = dynamiclrp.explain(F.prelu(x, w), [x], relevance=R, rules=rules)
        (ref,) = dynamiclrp.explain(_prelu_spelled(x, w), [x], relevance=R, rules=rules)
        close(rx, ref)
    # w data (both requested): the product rule of the written-out spelling
    wd = torch.rand(3, generator=g, dtype=DT).requires_grad_()
    _same_map(F.prelu, _prelu_spelled, (x, wd), R)
    # w requested as a parameter: the rule read from its side, R of the negative part
    (rx, rw) = dynamiclrp.explain(F.prelu(x, w), [x, w], relevance=R)
    close(rx, R)
    close(rw, (R * (x.detach() < 0)).sum((0, 2)))


def test_census_prelu_lrp0_is_gradient_times_input() -> None:
    g = gen(85)
    x = randn(g, 2, 3, 4, grad=True)
    w = torch.nn.Parameter(torch.rand(3, generator=g, dtype=DT))
    out = F.prelu(x, w)
    (rx,) = dynamiclrp.explain(out, [x], rules=_lrp0())
    (gx,) = torch.autograd.grad(out.sum(), [x])
    close(rx, gx * x.detach())


def test_census_entr_and_scalar_xlog1py() -> None:
    g = gen(86)
    x, R = _pos(g, 5), randn(g, 5)
    for name in PRESETS:
        rules = dynamiclrp.preset(name)
        (r1,) = dynamiclrp.explain(torch.special.entr(x), [x], relevance=R, rules=rules)
        (r2,) = dynamiclrp.explain(-x * torch.log(x), [x], relevance=R, rules=rules)
        close(r1, r2)
    for op in (lambda t: torch.special.xlog1py(t, 2.0), lambda t: torch.special.xlog1py(2.0, t)):
        (rx,) = dynamiclrp.explain(op(x), [x], relevance=R)
        close(rx, R)


def test_census_copysign_is_its_routing_spelling() -> None:
    """``where(signbit(b), -|a|, |a|)``: ``b`` only in the condition gets nothing."""
    a, b, R, g = _binary_data(87)
    spelled = torch.where(torch.signbit(b.detach()), -a.abs(), a.abs())
    for name in PRESETS:
        rules = dynamiclrp.preset(name)
        (ra, rb), rep = dynamiclrp.explain(
            torch.copysign(a, b), [a, b], relevance=R, rules=rules, return_report=True
        )
        (ref,) = dynamiclrp.explain(spelled, [a], relevance=R, rules=rules)
        close(ra, ref)
        close(rb, torch.zeros_like(R))
        assert abs(rep.residual) < 1e-9


def test_census_fill_with_a_tensor_value_gives_it_all() -> None:
    """``fill(x, v)`` with a 0-d tensor ``v``: the output is ``v`` expanded, ``R_v = sum R``
    (the map of ``v.expand_as(x)``)."""
    g = gen(88)
    x, v, R = randn(g, 3, 2, grad=True), randn(g, grad=True), randn(g, 3, 2)
    (rx, rv) = dynamiclrp.explain(torch.fill(x * 1.0, v), [x, v], relevance=R)
    close(rx, torch.zeros(3, 2, dtype=DT))
    close(rv, R.sum())
    y = x.detach().clone()
    (rv2,), rep = dynamiclrp.explain(y.fill_(v * 2.0), [v], relevance=R, return_report=True)
    close(rv2, R.sum())
    assert abs(rep.residual) < 1e-12


def _census_forwards():
    g = gen(89)
    a, b = randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True)
    p = _pos(g, 3, 4)
    w = torch.rand(4, generator=g, dtype=DT).requires_grad_()
    return [
        (torch.logaddexp, (a, b)),
        (torch.logaddexp2, (a, b)),
        (torch.hypot, (a, b)),
        (torch.atan2, (a, b)),
        (lambda x, y: torch.div(x, y, rounding_mode="floor"), (a, b)),
        (torch.copysign, (a, b)),
        (torch.ldexp, (a, b)),
        (torch.fmod, (a, b)),
        (torch.remainder, (a, b)),
        (torch.nextafter, (a, b)),
        (F.prelu, (a, w)),
        (torch.special.xlog1py, (a, p)),
        (lambda x: torch.special.xlog1py(x, 2.0), (a,)),
        (lambda x: torch.special.xlog1py(2.0, x), (p,)),
        (torch.special.entr, (p,)),
        (lambda x: torch.frexp(x)[0], (a,)),
        (lambda x, v: torch.fill(x * 1.0, v[0, 0]), (a, b)),
    ]


@pytest.mark.parametrize("k", range(17))
def test_census_replays_rebuild_the_forward(k) -> None:
    """Each new entry's replay, from the node's input values, gives the op's output."""
    from dynamiclrp.rules import OP_TABLE
    from dynamiclrp.rules.base import ReplayContext

    op, xs = _census_forwards()[k]
    out = op(*xs)
    fn = out.grad_fn
    entry = OP_TABLE[fn.name()]
    assert entry.replay is not None, fn.name()
    values = [
        None if f is None else x.detach() for (f, _), x in zip(fn.next_functions, xs, strict=True)
    ]
    if fn.name() == "FillBackward1":
        values = [(xs[0] * 1.0).detach(), xs[1][0, 0].detach()]
    replayed = entry.replay(ReplayContext(fn, values))[0]
    torch.testing.assert_close(replayed, out.detach(), rtol=0, atol=0)
