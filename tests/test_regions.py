"""Element-wise regions (``dynamiclrp.regions``, docs/rules.md 2.16), tests that try to break them.

A join (an element-wise node whose data operands are all element-wise functions of one tensor)
gives all of its relevance to that tensor; anything else keeps its per-op rule.  Expected values
are written out here from the rules of docs/rules.md with plain torch, never taken from the
library.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynamiclrp
from dynamiclrp.engine import make_plan
from dynamiclrp.graph import build_graph

DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape: int, grad: bool = False) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=DT).requires_grad_(grad)


def exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


def joins_of(out: torch.Tensor, inputs: list[torch.Tensor]):
    graph = build_graph(out.grad_fn)
    requested = tuple(
        (graph.index[torch.autograd.graph.get_gradient_edge(t).node], 0) for t in inputs
    )
    plan = make_plan(graph, requested, [False] * len(inputs))
    return graph, plan.joins


def test_silu_written_out_gives_exactly_r_to_x() -> None:
    g = gen(0)
    x, R = randn(g, 3, 5, grad=True), randn(g, 3, 5)
    _, joins = joins_of(x * torch.sigmoid(x), [x])
    assert list(joins.values()) == [(1, 0)]  # the leaf x, consumed by the product first
    for rules in ("dynamiclrp", "epsilon", "cp-lrp"):
        # the second spelling's constant 1 would absorb a share under the add rule
        for out in (x * torch.sigmoid(x), x / (1 + torch.exp(-x))):
            rel, rep = dynamiclrp.explain(out, x, relevance=R, rules=rules, return_report=True)
            exact(rel, R)
            assert abs(rep.residual) < 1e-12


def test_join_target_is_the_nearest_dominator() -> None:
    """``h = x + c`` (a single path: the constant keeps its share), then ``h * sigmoid(h)``:
    the join gives everything to ``h``, and the add below splits it as an add does."""
    g = gen(1)
    x, c, R = randn(g, 4, 3, grad=True), randn(g, 4, 3), randn(g, 4, 3)
    h = x + c
    out = h * torch.sigmoid(h)
    graph, joins = joins_of(out, [x])
    assert list(joins) == [0]
    (target,) = joins.values()
    assert graph.names[target[0]] == "AddBackward0"
    rel = dynamiclrp.explain(out, x, relevance=R)  # proportional add: R |x| / (|x| + |c|)
    exact(rel, R * x.detach().abs() / (x.detach().abs() + c.abs()))


def test_gelu_tanh_formula_nests_one_join_inside_another() -> None:
    g = gen(2)
    x, R = randn(g, 6, grad=True), randn(g, 6)
    c = math.sqrt(2 / math.pi)
    out = 0.5 * x * (1 + torch.tanh(c * (x + 0.044715 * x**3)))
    graph, joins = joins_of(out, [x])
    assert sorted(graph.names[v] for v in joins) == ["AddBackward0", "MulBackward0"]
    assert set(joins.values()) == {(graph.index[x.grad_fn or _leaf(x)], 0)}
    for rules in dynamiclrp.PRESETS:
        exact(dynamiclrp.explain(out, x, relevance=R, rules=rules), R)


def _leaf(t: torch.Tensor):
    return torch.autograd.graph.get_gradient_edge(t).node


def test_product_of_two_data_tensors_is_not_a_join() -> None:
    """``silu(a) * b``: uniform rule, ``R / 2`` each (silu passes its half unchanged)."""
    g = gen(3)
    a, b, R = randn(g, 4, 5, grad=True), randn(g, 4, 5, grad=True), randn(g, 4, 5)
    out = F.silu(a) * b
    _, joins = joins_of(out, [a, b])
    assert joins == {}
    ra, rb = dynamiclrp.explain(out, [a, b], relevance=R)
    exact(ra, R / 2)
    exact(rb, R / 2)
    # written out, the inner a * sigmoid(a) is a join and the outer product still is not
    ra, rb = dynamiclrp.explain(a * torch.sigmoid(a) * b, [a, b], relevance=R)
    exact(ra, R / 2)
    exact(rb, R / 2)


def test_a_broadcast_operand_breaks_the_region() -> None:
    """``where(cond, x, x + 1)`` with ``x`` (1, 4) broadcast to ``cond`` (3, 4): each element of
    ``x`` feeds three outputs, so this is not an element-wise function of ``x`` and ``where``
    routes (2.8): ``R`` where ``cond``, else through the add, where the constant 1 keeps
    ``1 / (|x| + 1)`` of it (proportional add)."""
    g = gen(4)
    x, R = randn(g, 1, 4, grad=True), randn(g, 3, 4)
    cond = randn(g, 3, 4) > 0
    one = torch.nn.Parameter(torch.ones(1, 4, dtype=DT))  # recorded, so its value is at hand
    out = torch.where(cond, x, x + one)
    _, joins = joins_of(out, [x])
    assert joins == {}
    rel = dynamiclrp.explain(out, x, relevance=R)
    xa = x.detach().abs()
    expected = (R * cond).sum(0, keepdim=True) + (R * ~cond).sum(0, keepdim=True) * xa / (xa + 1)
    exact(rel, expected)
    # the same without broadcasting is one activation of x: the constant takes nothing
    x3 = x.detach().expand(3, 4).clone().requires_grad_()
    exact(dynamiclrp.explain(torch.where(cond, x3, x3 + one), x3, relevance=R), R)


def test_intermediate_with_another_consumer_keeps_the_books() -> None:
    """``s = sigmoid(x)`` feeds the join ``x * s`` and a sum: the join sends its share to ``x``
    directly, ``s`` passes on what the sum sent it; the books close."""
    g = gen(5)
    x, R = randn(g, 3, 4, grad=True), randn(g, 3)
    s = torch.sigmoid(x)
    a, b = (x * s).sum(-1), s.sum(-1)
    out = a + b
    for rules in ("dynamiclrp", "epsilon", "attnlrp"):
        rel, rep = dynamiclrp.explain(out, x, relevance=R, rules=rules, return_report=True)
        assert abs(rep.residual) < 1e-10
        if rules == "dynamiclrp":  # proportional add and sums: exact by hand
            A, B, xs, sd = a.detach(), b.detach(), (x * s).detach(), s.detach()
            ra, rb = R * A.abs() / (A.abs() + B.abs()), R * B.abs() / (A.abs() + B.abs())
            expected = xs.abs() * (ra / xs.abs().sum(-1))[:, None]
            expected = expected + sd * (rb / sd.sum(-1))[:, None]
            exact(rel, expected)
            exact(rel.sum(), R.sum())


def test_requested_intermediate_is_not_skipped() -> None:
    """Requesting ``s = sigmoid(x)`` makes it its own source: ``x * s`` is a product of two
    tensors again (uniform), ``s`` shows its half, which it passes on to ``x``."""
    g = gen(6)
    x, R = randn(g, 4, 3, grad=True), randn(g, 4, 3)
    s = torch.sigmoid(x)
    rx, rs = dynamiclrp.explain(x * s, [x, s], relevance=R)
    _, joins = joins_of(x * s, [x, s])
    assert joins == {}
    exact(rs, R / 2)
    exact(rx, R)  # the direct half and, through sigmoid, the half s received


def test_join_through_a_cast_and_a_nested_join() -> None:
    g = gen(7)
    x, R = randn(g, 5, grad=True), randn(g, 5)
    u = x * torch.sigmoid(x.float()).double()  # a join through ToCopyBackward0
    out = u * torch.tanh(u)  # a join onto u, whose producer is a join onto x
    exact(dynamiclrp.explain(out, x, relevance=R), R)
    exact(dynamiclrp.explain(out, x, relevance=R, rules="zplus"), R)


def test_plain_relu_layer_is_unchanged() -> None:
    """``relu(x @ W + b)``: no join; epsilon rule ``R_x = x * ((R / stab(z)) @ W^T)``."""
    g = gen(8)
    x, W, b, R = randn(g, 4, 6, grad=True), randn(g, 6, 5), randn(g, 5), randn(g, 4, 5)
    W, b = torch.nn.Parameter(W), torch.nn.Parameter(b)
    out = torch.relu(x @ W + b)
    _, joins = joins_of(out, [x])
    assert joins == {}
    z = (x @ W + b).detach()
    stab = z + 1e-6 * torch.where(z >= 0, 1.0, -1.0)
    expected = x.detach() * ((R / stab) @ W.detach().T)  # relu: identity
    exact(dynamiclrp.explain(out, x, relevance=R, rules="epsilon"), expected)


def test_single_path_chain_keeps_its_bias_treatment() -> None:
    """``1 / (1 + exp(-x))`` has one data path, so no join: the constant 1 keeps its share of the
    add (proportional: ``R |e| / (|e| + 1)`` to ``e = exp(-x)``), unlike ``torch.sigmoid``."""
    g = gen(10)
    x, R = randn(g, 3, 4, grad=True), randn(g, 3, 4)
    with dynamiclrp.record() as rec:  # the add of an unrecorded 1: its sum is needed
        out = 1 / (1 + torch.exp(-x))
    _, joins = joins_of(out, [x])
    assert joins == {}
    e = torch.exp(-x.detach())
    exact(dynamiclrp.explain(out, x, relevance=R, recording=rec), R * e / (e + 1))
    exact(dynamiclrp.explain(torch.sigmoid(x), x, relevance=R), R)


def test_softmax_written_out_is_a_different_function() -> None:
    """``exp(h) / sum(exp(h))`` is not one node to the rules: the sum is a broadcast statistic
    (2.4) and ``exp`` the identity, so ``R_h = R``; ``softmax`` has its own rule (2.10),
    ``R_h = h * (R - s * sum(R))``.  Both are what docs/rules.md says; they differ."""
    g = gen(9)
    h, R = randn(g, 3, 5, grad=True), randn(g, 3, 5)
    e = torch.exp(h)
    exact(dynamiclrp.explain(e / e.sum(-1, keepdim=True), h, relevance=R), R)
    s = torch.softmax(h, -1)
    expected = h.detach() * (R - s.detach() * R.sum(-1, keepdim=True))
    exact(dynamiclrp.explain(s, h, relevance=R), expected)


# --- random element-wise functions of one tensor ---------------------------------------------

UNARY = [
    torch.sigmoid,
    torch.tanh,
    torch.sin,
    torch.relu,
    lambda t: t * 0.7,
    lambda t: t + 0.3,
    lambda t: 1.5 - t,
    lambda t: t.clone(),
    lambda t: t.float().double(),
    lambda t: torch.exp(torch.tanh(t)),
    lambda t: F.softplus(t),
    lambda t: torch.where(t > 0.1, t, 0.2 * t),
]
BINARY = [
    torch.add,
    torch.sub,
    torch.mul,
    lambda a, b: a / (1 + b * b),
    lambda a, b: torch.where(a > b, a, b),
    lambda a, b: torch.addcmul(a, a, b, value=0.5),
    lambda a, b: torch.lerp(a, b, 0.25),
]


def _expression(draw, x: torch.Tensor, depth: int) -> torch.Tensor:
    """A random element-wise function of ``x``; every leaf is ``x`` itself, so two subtrees
    share no node but ``x``."""
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        return x
    if draw(st.booleans()):
        return draw(st.sampled_from(UNARY))(_expression(draw, x, depth - 1))
    op = draw(st.sampled_from(BINARY))
    return op(_expression(draw, x, depth - 1), _expression(draw, x, depth - 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), preset=st.sampled_from(sorted(dynamiclrp.PRESETS)))
def test_random_region_is_one_activation(data, preset: str) -> None:
    """A join of two random element-wise subtrees of ``x`` is one activation: ``R_x = R``."""
    g = gen(data.draw(st.integers(0, 1000)))
    x, R = randn(g, 3, 4, grad=True), randn(g, 3, 4)
    a = _expression(data.draw, x, 3)
    b = _expression(data.draw, x, 3)
    out = data.draw(st.sampled_from(BINARY))(a, b)
    rel, rep = dynamiclrp.explain(out, x, relevance=R, rules=preset, return_report=True)
    exact(rel, R)
    assert abs(rep.residual) < 1e-12
