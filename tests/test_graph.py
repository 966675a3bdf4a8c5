"""The graph module: iterative build, deterministic numbering, signatures, consumers, order.

Expectations come from the autograd graph itself (``grad_fn.next_functions`` read directly here)
and from the structure of the forward code written in each test.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn
from oracle import gen

import dynamiclrp
from dynamiclrp.graph import build_graph, gradient_edge

DT = torch.float64


def randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=DT)


def chain(x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` ops: alternating neg / view, no op saves anything."""
    t = x
    for i in range(n):
        t = t.neg() if i % 2 == 0 else t.view(2, 3) if t.shape == (6,) else t.view(6)
    return t


# --- a 5,000-op chain ------------------------------------------------------------------------


def test_iterative_build_on_a_5000_op_chain():
    limit = sys.getrecursionlimit()
    x = randn(gen(1), 6).requires_grad_(True)
    n = 5000
    y = chain(x, n)
    graph = build_graph(y.grad_fn)
    assert sys.getrecursionlimit() == limit

    assert len(graph) == n + 1  # n ops and the leaf's AccumulateGrad
    assert graph.fns[0] is y.grad_fn
    assert graph.names[-1] == "AccumulateGrad"
    assert graph.fns[-1].variable is x
    # walk the chain by hand and compare
    fn, i = y.grad_fn, 0
    while fn is not None:
        assert graph.fns[i] is fn
        assert graph.names[i] == type(fn).__name__
        nxt = fn.next_functions
        if nxt:
            assert graph.children[i] == [(i + 1, 0)]
            assert graph.consumers[(i + 1, 0)] == [(i, 0)]
            fn = nxt[0][0]
        else:
            assert graph.children[i] == []
            fn = None
        i += 1
    assert i == n + 1
    assert graph.topological_order() == list(range(n + 1))
    assert sys.getrecursionlimit() == limit


def test_explain_through_a_5000_op_chain():
    """neg passes relevance unchanged (identity rule) and view routes it: R_x = seed = y."""
    limit = sys.getrecursionlimit()
    x = randn(gen(2), 6).requires_grad_(True)
    y = chain(x, 5000)
    rel = dynamiclrp.explain(y, x)
    assert sys.getrecursionlimit() == limit
    torch.testing.assert_close(rel, y.detach().reshape(6), rtol=0, atol=0)
    torch.testing.assert_close(rel, x.detach(), rtol=0, atol=0)  # 2500 negations cancel


# --- numbering and signatures ----------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, act):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(5, 6)
        self.l2 = nn.Linear(6, 5)
        self.act = act

    def forward(self, x):
        h = self.act(self.l1(x))
        return x + self.l2(h).neg(), h


def test_two_forward_passes_number_alike_and_share_a_signature():
    model = Block(nn.ReLU()).double()
    g = gen(3)
    x1 = randn(g, 2, 5).requires_grad_(True)
    x2 = randn(g, 2, 5).requires_grad_(True)
    y1, h1 = model(x1)
    y2, h2 = model(x2)
    g1, g2 = build_graph(y1.grad_fn), build_graph(y2.grad_fn)
    assert g1.names == g2.names
    assert g1.children == g2.children
    assert g1.consumers == g2.consumers
    assert g1.signature == g2.signature
    assert g1.signature == build_graph(y1.grad_fn).signature  # and again for the same graph
    # the numbering is the same position for corresponding nodes of the two passes
    assert g1.index[h1.grad_fn] == g2.index[h2.grad_fn]
    assert g1.fns[g1.index[h1.grad_fn]] is h1.grad_fn
    for i, name in enumerate(g1.names):
        if name != "AccumulateGrad":  # the op nodes of two passes are distinct objects
            assert g1.fns[i] is not g2.fns[i]
    # the parameters' AccumulateGrad nodes are shared by both passes, and found at equal indices
    for p in model.parameters():
        e1, e2 = gradient_edge(p), gradient_edge(p)
        assert g1.index[e1.node] == g2.index[e2.node]
    for i, fn in enumerate(g1.fns):
        assert g1.index[fn] == i


def _wired_a(x):
    n1, n2 = x.neg(), x.neg()
    return n1 + n2


def _wired_b(x):
    n2 = x.neg()
    return n2.neg() + n2


def _split_ab(x):
    a, b = x.split(3)
    return a + b


def _split_ba(x):
    a, b = x.split(3)
    return b + a


@pytest.mark.parametrize(
    "f1, f2",
    [
        (lambda x: torch.relu(x).sum(), lambda x: torch.nn.functional.gelu(x).sum()),
        (_wired_a, _wired_b),  # same op names in the same order, different edges
        (_split_ab, _split_ba),  # same nodes, different output_nr on the edges
        (lambda x: (x * 2).sum(), lambda x: (x * 2).sum(0)),
    ],
)
def test_different_structures_have_different_signatures(f1, f2):
    x = randn(gen(4), 6).requires_grad_(True)
    ga, gb = build_graph(f1(x).grad_fn), build_graph(f2(x).grad_fn)
    if ga.names == gb.names:  # the wiring case: make sure the test is about edges
        assert ga.children != gb.children
    assert ga.signature != gb.signature


def test_different_models_have_different_signatures():
    x = randn(gen(5), 2, 5).requires_grad_(True)
    ya, _ = Block(nn.ReLU()).double()(x)
    yb, _ = Block(nn.GELU()).double()(x)
    assert build_graph(ya.grad_fn).signature != build_graph(yb.grad_fn).signature


# --- consumers and children ------------------------------------------------------------------


def test_consumers_recorded_for_every_use():
    g = gen(6)
    x = randn(g, 2, 3).requires_grad_(True)
    c = randn(g, 2, 3)  # a constant: its slot has no edge
    h = torch.relu(x)
    m = h * h
    s = h.sum(1, keepdim=True)
    a, b = (x + c).split(1)
    y = (m + s) + (a + b)
    graph = build_graph(y.grad_fn)
    ix = graph.index
    relu_edge = (ix[h.grad_fn], 0)
    assert sorted(graph.consumers[relu_edge]) == sorted(
        [(ix[m.grad_fn], 0), (ix[m.grad_fn], 1), (ix[s.grad_fn], 0)]
    )
    split = ix[a.grad_fn]
    assert a.grad_fn is b.grad_fn
    add_ab = y.grad_fn.next_functions[1][0]
    assert graph.consumers[(split, 0)] == [(ix[add_ab], 0)]
    assert graph.consumers[(split, 1)] == [(ix[add_ab], 1)]
    add_xc = a.grad_fn.next_functions[0][0]
    assert graph.children[ix[add_xc]] == [(ix[gradient_edge(x).node], 0), None]
    leaf = (ix[gradient_edge(x).node], 0)
    assert sorted(graph.consumers[leaf]) == sorted([(ix[h.grad_fn], 0), (ix[add_xc], 0)])
    # every recorded edge appears once per (node, slot) and matches next_functions
    for v, fn in enumerate(graph.fns):
        for slot, (child, nr) in enumerate(fn.next_functions):
            if child is None:
                assert graph.children[v][slot] is None
            else:
                assert graph.children[v][slot] == (ix[child], nr)
                assert (v, slot) in graph.consumers[(ix[child], nr)]


def test_topological_order_parents_first_on_a_dag():
    g = gen(7)
    x = randn(g, 4).requires_grad_(True)
    w = randn(g, 4).requires_grad_(True)
    a = x * w
    b = a.exp() + a.neg()
    c = b * a + x.sum()
    y = (c + b.view(2, 2).t().reshape(4)).sum()
    graph = build_graph(y.grad_fn)
    order = graph.topological_order()
    assert sorted(order) == list(range(len(graph)))
    pos = {v: i for i, v in enumerate(order)}
    for v, kids in enumerate(graph.children):
        for e in kids:
            if e is not None:
                assert pos[v] < pos[e[0]]


def test_build_writes_nothing_onto_autograd_nodes():
    x = randn(gen(8), 2, 5).requires_grad_(True)
    y, _ = Block(nn.ReLU()).double()(x)
    fns, stack = [], [y.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in fns:
            continue
        fns.append(fn)
        stack.extend(f for f, _ in fn.next_functions)
    before = [sorted(dir(fn)) for fn in fns]
    build_graph(y.grad_fn)
    dynamiclrp.explain(y, x)
    assert [sorted(dir(fn)) for fn in fns] == before
