"""Linear summing ops (``dynamiclrp.rules.summing``) and ``index_add`` of a constant source.

Every op is written here as explicit matrices ``M_i`` (one row per output element, one column per
element of operand ``i``), built with index loops from the op's definition, never from the op
itself.  The rules then read (``t_i`` an operand, ``R`` the output relevance):

- split like add / a linear reduction, ``"proportional"``:
  ``R_i = |t_i| * M_i^T (R / sum_j M_j |t_j|)`` (0 for an all-zero output element);
- ``"signed"``: ``R_i = t_i * M_i^T (R / stab(sum_j M_j t_j))``;
- routing: ``R_i = M_i^T R``.

Independent checks besides: LRP-0 (signed, ``eps=1e-12``) equals gradient x input (all these ops
are linear in each operand), an equivalent spelling that other rules cover gives the same map
under every preset, and the books close.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from oracle import close, gen, stab

import dynamiclrp
from dynamiclrp.errors import UncoveredOpError, ValueRecoveryError
from dynamiclrp.presets import PRESETS

DT = torch.float64
PROP = dynamiclrp.Rules()
SIGNED = dynamiclrp.Rules(
    add="signed", reduction="signed", eps=0.05
)  # a large eps: a wrong z shows
LRP0 = dataclasses.replace(dynamiclrp.preset("epsilon"), eps=1e-12)
MODES = {"proportional": PROP, "signed": SIGNED}


def flat(shape, idx) -> int:
    out = 0
    for s, i in zip(shape, idx, strict=True):
        out = out * s + i
    return out


def cells(shape):
    return itertools.product(*(range(s) for s in shape))


def expected_split(Ms, ts, r, rules):
    """The add-like / linear-reduction split of ``R`` over the operands' elements (module doc)."""
    rv = r.reshape(-1)
    tv = [t.detach().reshape(-1) for t in ts]
    if rules.add == "proportional":
        den = sum(M @ t.abs() for M, t in zip(Ms, tv, strict=True))
        g = torch.where(den > 0, rv / torch.where(den > 0, den, 1.0), 0.0)
        return [(t.abs() * (M.T @ g)).reshape(x.shape) for M, t, x in zip(Ms, tv, ts, strict=True)]
    z = sum(M @ t for M, t in zip(Ms, tv, strict=True))
    g = rv / stab(z, rules.eps)
    return [(t * (M.T @ g)).reshape(x.shape) for M, t, x in zip(Ms, tv, ts, strict=True)]


def grad_x_input(out, ins):
    grads = torch.autograd.grad(out, ins, torch.ones_like(out), retain_graph=True)
    return [t.detach() * g for t, g in zip(ins, grads, strict=True)]


def assert_lrp0_is_gradient_x_input(out, ins):
    rel = dynamiclrp.explain(out, ins, relevance=out.detach().clone(), rules=LRP0)
    rel = rel if isinstance(rel, tuple) else (rel,)
    for a, e in zip(rel, grad_x_input(out, ins), strict=True):
        close(a, e, rtol=1e-9, atol=1e-9)


def same_under_every_preset(make_a, make_b, inputs_a, inputs_b, relevance):
    for name in PRESETS:
        ra = dynamiclrp.explain(make_a(), inputs_a, relevance=relevance, rules=name)
        rb = dynamiclrp.explain(make_b(), inputs_b, relevance=relevance, rules=name)
        for a, b in zip(ra, rb, strict=True):
            torch.testing.assert_close(
                a, b, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}"
            )


# --- scatter_add ----------------------------------------------------------------------------------

INDEX = torch.tensor([[0, 1, 2], [1, 2, 0], [0, 0, 0], [3, 3, 1]])  # row 2 of self gets nothing new


def scatter_matrix(out_shape, src_shape, index, dim=0) -> torch.Tensor:
    M = torch.zeros(math.prod(out_shape), math.prod(src_shape), dtype=DT)
    for i in cells(index.shape):
        o = list(i)
        o[dim] = int(index[i])
        M[flat(out_shape, o), flat(src_shape, i)] += 1.0
    return M


@pytest.mark.parametrize("mode", MODES)
def test_scatter_add_splits_like_add(mode):
    g = gen(1)
    x = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    s = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    r = torch.randn(4, 3, generator=g, dtype=DT)
    out = x.scatter_add(0, INDEX, s)
    assert out.grad_fn.name() == "ScatterAddBackward0"
    (rx, rs), rep = dynamiclrp.explain(
        out, [x, s], relevance=r, rules=MODES[mode], return_report=True
    )
    ex, es = expected_split(
        [torch.eye(12, dtype=DT), scatter_matrix((4, 3), (4, 3), INDEX)], [x, s], r, MODES[mode]
    )
    close(rx, ex)
    close(rs, es)
    assert abs(rep.residual) < 1e-12
    if mode == "proportional":
        assert float(rx.sum() + rs.sum()) == pytest.approx(float(r.sum()), rel=1e-12)


def test_scatter_add_lrp0_is_gradient_x_input():
    g = gen(2)
    x = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    s = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    assert_lrp0_is_gradient_x_input(x.scatter_add(0, INDEX, s), [x, s])


def test_scatter_add_equals_index_add_under_every_preset():
    """``scatter_add`` along dim 0 with an index constant along each row is ``index_add``."""
    g = gen(3)
    x = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    s = torch.randn(5, 3, generator=g, dtype=DT).requires_grad_()
    idx = torch.tensor([0, 2, 0, 3, 2])
    r = torch.randn(4, 3, generator=g, dtype=DT)
    same_under_every_preset(
        lambda: x.scatter_add(0, idx[:, None].expand(5, 3), s),
        lambda: x.index_add(0, idx, s),
        [x, s],
        [x, s],
        r,
    )


def test_scatter_add_constant_self_is_rebuilt_and_absorbs():
    g = gen(4)
    acc = torch.randn(4, 3, generator=g, dtype=DT)  # no grad: not recorded
    s = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    r = torch.randn(4, 3, generator=g, dtype=DT)
    out = acc.scatter_add(0, INDEX, s)
    rs, rep = dynamiclrp.explain(out, s, relevance=r, return_report=True)
    ea, es = expected_split(
        [torch.eye(12, dtype=DT), scatter_matrix((4, 3), (4, 3), INDEX)], [acc, s], r, PROP
    )
    close(rs, es)
    assert rep.absorbed == pytest.approx(float(ea.sum()), rel=1e-9)
    assert abs(rep.residual) < 1e-12


def test_scatter_add_constant_self_unknown_sum_asks_for_record():
    """Nothing saved the sum of a scatter_add into a constant: refused, then fixed by record()."""
    g = gen(5)
    s = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    b = torch.nn.Parameter(torch.randn(3, generator=g, dtype=DT))
    acc = torch.randn(4, 3, generator=g, dtype=DT)
    r = torch.randn(4, 3, generator=g, dtype=DT)
    with pytest.raises(ValueRecoveryError, match=r"ScatterAddBackward0.*record"):
        dynamiclrp.explain(acc.scatter_add(0, INDEX, s) * 2.0 + b, s, relevance=r)
    with dynamiclrp.record() as rec:
        out = acc.scatter_add(0, INDEX, s) * 2.0 + b
    rs, rep = dynamiclrp.explain(out, s, relevance=r, recording=rec, return_report=True)
    # the same split with a self that requires grad (its share then goes to unrequested data)
    acc_g = acc.clone().requires_grad_()
    expected = dynamiclrp.explain(acc_g.scatter_add(0, INDEX, s) * 2.0 + b, s, relevance=r)
    close(rs, expected)
    assert abs(rep.residual) < 1e-12


def test_scatter_add_along_the_last_dim():
    g = gen(20)
    x = torch.randn(3, 4, generator=g, dtype=DT).requires_grad_()
    s = torch.randn(3, 4, generator=g, dtype=DT).requires_grad_()
    r = torch.randn(3, 4, generator=g, dtype=DT)
    idx = INDEX.T.contiguous()  # (3, 4), values in 0..3
    (rx, rs), rep = dynamiclrp.explain(
        x.scatter_add(-1, idx, s), [x, s], relevance=r, return_report=True
    )
    ex, es = expected_split(
        [torch.eye(12, dtype=DT), scatter_matrix((3, 4), (3, 4), idx, dim=1)], [x, s], r, PROP
    )
    close(rx, ex)
    close(rs, es)
    assert abs(rep.residual) < 1e-12


@pytest.mark.parametrize("spelling", ["scatter_add", "index_put_accumulate"])
def test_adding_a_constant_operand_equals_adding_it_under_every_preset(spelling):
    """A source / values tensor without grad: autograd saves nothing of it, so it is seen summed
    per output element, ``C = out - self``, exactly as the spelling ``x + C``."""
    g = gen(21)
    x = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    c = torch.randn(4, 3, generator=g, dtype=DT)
    r = torch.randn(4, 3, generator=g, dtype=DT)
    rows = torch.tensor([0, 2, 0])
    if spelling == "scatter_add":
        f = lambda: x.scatter_add(0, INDEX, c)  # noqa: E731
        C = torch.zeros(4, 3, dtype=DT).scatter_add(0, INDEX, c)
    else:
        f = lambda: x.index_put((rows,), c[:3], accumulate=True)  # noqa: E731
        C = torch.zeros(4, 3, dtype=DT).index_put((rows,), c[:3], accumulate=True)
    same_under_every_preset(f, lambda: x + C, [x], [x], r)
    rx, rep = dynamiclrp.explain(f(), x, relevance=r, return_report=True)
    close(rx, r * x.detach().abs() / (x.detach().abs() + C.abs()))
    assert abs(rep.residual) < 1e-12


# --- scatter (overwrite) -------------------------------------------------------------------------

UNIQUE = torch.tensor([[0, 1, 2], [1, 2, 0]])


def test_scatter_routes_overwritten_elements_to_src():
    g = gen(6)
    x = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    s = torch.randn(3, 3, generator=g, dtype=DT).requires_grad_()  # row 2 of src is unread
    r = torch.randn(4, 3, generator=g, dtype=DT)
    out = x.scatter(0, UNIQUE, s)
    assert out.grad_fn.name() == "ScatterBackward0"
    (rx, rs), rep = dynamiclrp.explain(out, [x, s], relevance=r, return_report=True)
    ex, es = r.clone(), torch.zeros(3, 3, dtype=DT)
    for i, j in cells(UNIQUE.shape):
        ex[UNIQUE[i, j], j] = 0.0
        es[i, j] = r[UNIQUE[i, j], j]
    close(rx, ex)
    close(rs, es)
    assert abs(rep.residual) < 1e-12 and abs(rep.absorbed) < 1e-14


def test_scatter_of_a_value_absorbs_the_written_elements():
    g = gen(7)
    x = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    r = torch.randn(4, 3, generator=g, dtype=DT)
    out = x.scatter(0, UNIQUE, 2.0)
    assert out.grad_fn.name() == "ScatterBackward1"
    rx, rep = dynamiclrp.explain(out, x, relevance=r, return_report=True)
    written = torch.zeros(4, 3, dtype=torch.bool)
    for i, j in cells(UNIQUE.shape):
        written[UNIQUE[i, j], j] = True
    close(rx, torch.where(written, 0.0, r))
    assert rep.absorbed == pytest.approx(float(r[written].sum()), rel=1e-12)


def test_scatter_with_duplicate_positions_is_refused():
    x = torch.randn(4, 3, dtype=DT).requires_grad_()
    s = torch.randn(4, 3, dtype=DT).requires_grad_()
    with pytest.raises(UncoveredOpError, match=r"ScatterBackward0.*more than once"):
        dynamiclrp.explain(x.scatter(0, INDEX, s), [x, s], relevance=torch.ones(4, 3, dtype=DT))


# --- scatter_reduce -------------------------------------------------------------------------------


def scatter_reduce_matrices(index, include_self, mean):
    Ms = scatter_matrix((4, 3), (4, 3), index)
    written = Ms.sum(1)
    own = torch.ones(12, dtype=DT) if include_self else (written == 0).to(DT)
    Mx = torch.diag(own)
    if mean:
        n = own + written
        Mx, Ms = Mx / n[:, None], Ms / n[:, None]
    return Mx, Ms


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("include_self", [True, False])
def test_scatter_reduce_sum_and_mean(mode, reduce, include_self):
    g = gen(8)
    x = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    s = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    r = torch.randn(4, 3, generator=g, dtype=DT)
    out = x.scatter_reduce(0, INDEX, s, reduce, include_self=include_self)
    (rx, rs), rep = dynamiclrp.explain(
        out, [x, s], relevance=r, rules=MODES[mode], return_report=True
    )
    ex, es = expected_split(
        list(scatter_reduce_matrices(INDEX, include_self, reduce == "mean")), [x, s], r, MODES[mode]
    )
    close(rx, ex)
    close(rs, es)
    assert abs(rep.residual) < 1e-12
    assert_lrp0_is_gradient_x_input(
        x.scatter_reduce(0, INDEX, s, reduce, include_self=include_self), [x, s]
    )


def test_scatter_reduce_sum_equals_scatter_add_under_every_preset():
    g = gen(9)
    x = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    s = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    r = torch.randn(4, 3, generator=g, dtype=DT)
    same_under_every_preset(
        lambda: x.scatter_reduce(0, INDEX, s, "sum"),
        lambda: x.scatter_add(0, INDEX, s),
        [x, s],
        [x, s],
        r,
    )


@pytest.mark.parametrize("reduce", ["amax", "amin"])
@pytest.mark.parametrize("include_self", [True, False])
def test_scatter_reduce_max_goes_to_the_winners_ties_split(reduce, include_self):
    x = torch.tensor([[1.0, 5.0, 0.0], [2.0, 0.0, 3.0], [0.0, 0.0, 0.0], [4.0, 1.0, 2.0]], dtype=DT)
    s = torch.tensor([[1.0, 2.0, 3.0], [3.0, 3.0, 3.0], [1.0, 7.0, 2.0], [4.0, 4.0, 0.5]], dtype=DT)
    if reduce == "amin":
        x, s = -x, -s
    x.requires_grad_()
    s.requires_grad_()
    r = torch.arange(1.0, 13.0, dtype=DT).reshape(4, 3)
    out = x.scatter_reduce(0, INDEX, s, reduce, include_self=include_self)
    xg, sg, x, s = x, s, x.detach(), s.detach()
    (rx, rs), rep = dynamiclrp.explain(out, [xg, sg], relevance=r, return_report=True)
    ex, es = torch.zeros(4, 3, dtype=DT), torch.zeros(4, 3, dtype=DT)
    for o in cells((4, 3)):
        cands = [("x", o, float(x[o]))] if include_self else []
        cands += [("s", i, float(s[i])) for i in cells((4, 3)) if (int(INDEX[i]), i[1]) == o]
        if not include_self and len(cands) == 0:
            cands = [("x", o, float(x[o]))]
        best = (max if reduce == "amax" else min)(v for _, _, v in cands)
        wins = [(k, i) for k, i, v in cands if v == best]
        for k, i in wins:
            (ex if k == "x" else es)[i] += float(r[o]) / len(wins)
    close(rx, ex)
    close(rs, es)
    assert abs(rep.residual) < 1e-12


@pytest.mark.parametrize("include_self", [True, False])
def test_scatter_reduce_prod_is_uniform_over_factors(include_self):
    g = gen(10)
    x = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    s = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    r = torch.randn(4, 3, generator=g, dtype=DT)
    out = x.scatter_reduce(0, INDEX, s, "prod", include_self=include_self)
    (rx, rs), rep = dynamiclrp.explain(out, [x, s], relevance=r, return_report=True)
    ex, es = torch.zeros(4, 3, dtype=DT), torch.zeros(4, 3, dtype=DT)
    for o in cells((4, 3)):
        factors = [("s", i) for i in cells((4, 3)) if (int(INDEX[i]), i[1]) == o]
        if include_self or not factors:
            factors.append(("x", o))
        for k, i in factors:
            (ex if k == "x" else es)[i] += float(r[o]) / len(factors)
    close(rx, ex)
    close(rs, es)
    assert abs(rep.residual) < 1e-12


# --- index_put / y[idx] = v -----------------------------------------------------------------------


def test_setitem_routes_like_an_overwrite():
    g = gen(11)
    x = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    v = torch.randn(2, 3, generator=g, dtype=DT).requires_grad_()
    r = torch.randn(4, 3, generator=g, dtype=DT)
    y = x * 1.0
    y[torch.tensor([2, 0])] = v
    assert y.grad_fn.name() == "IndexPutBackward0"
    (rx, rv), rep = dynamiclrp.explain(y, [x, v], relevance=r, return_report=True)
    ex = r.clone()
    ex[[0, 2]] = 0.0
    close(rx, ex)
    close(rv, torch.stack([r[2], r[0]]))
    assert abs(rep.residual) < 1e-12 and abs(rep.absorbed) < 1e-15


def test_setitem_with_a_mask_and_a_broadcast_value():
    g = gen(12)
    x = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    v = torch.randn((), generator=g, dtype=DT).requires_grad_()
    r = torch.randn(4, 3, generator=g, dtype=DT)
    mask = x.detach() > 0
    y = x * 1.0
    y[mask] = v
    (rx, rv), rep = dynamiclrp.explain(y, [x, v], relevance=r, return_report=True)
    close(rx, torch.where(mask, 0.0, r))
    close(rv, r[mask].sum())
    assert abs(rep.residual) < 1e-12


def test_setitem_of_a_constant_absorbs_it():
    g = gen(13)
    x = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    r = torch.randn(4, 3, generator=g, dtype=DT)
    y = x * 1.0
    y[:, torch.tensor([1])] = torch.zeros(4, 1, dtype=DT)
    rx, rep = dynamiclrp.explain(y, x, relevance=r, return_report=True)
    ex = r.clone()
    ex[:, 1] = 0.0
    close(rx, ex)
    assert rep.absorbed == pytest.approx(float(r[:, 1].sum()), rel=1e-12)
    assert abs(rep.residual) < 1e-12


def test_index_put_with_duplicate_positions_is_refused():
    x = torch.randn(4, 3, dtype=DT).requires_grad_()
    v = torch.randn(3, 3, dtype=DT).requires_grad_()
    y = x.index_put((torch.tensor([0, 2, 0]),), v)
    with pytest.raises(UncoveredOpError, match=r"IndexPutBackward0.*more than once"):
        dynamiclrp.explain(y, [x, v], relevance=torch.ones(4, 3, dtype=DT))


@pytest.mark.parametrize("mode", MODES)
def test_index_put_accumulate_splits_like_add(mode):
    g = gen(14)
    x = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    v = torch.randn(3, 3, generator=g, dtype=DT).requires_grad_()
    r = torch.randn(4, 3, generator=g, dtype=DT)
    rows = [0, 2, 0]  # duplicates accumulate
    out = x.index_put((torch.tensor(rows),), v, accumulate=True)
    (rx, rv), rep = dynamiclrp.explain(
        out, [x, v], relevance=r, rules=MODES[mode], return_report=True
    )
    Mv = torch.zeros(12, 9, dtype=DT)
    for k, j in cells((3, 3)):
        Mv[flat((4, 3), (rows[k], j)), flat((3, 3), (k, j))] = 1.0
    ex, ev = expected_split([torch.eye(12, dtype=DT), Mv], [x, v], r, MODES[mode])
    close(rx, ex)
    close(rv, ev)
    assert abs(rep.residual) < 1e-12
    same_under_every_preset(
        lambda: x.index_put((torch.tensor(rows),), v, accumulate=True),
        lambda: x.index_add(0, torch.tensor(rows), v),
        [x, v],
        [x, v],
        r,
    )
    assert_lrp0_is_gradient_x_input(x.index_put((torch.tensor(rows),), v, accumulate=True), [x, v])


# --- embedding_bag --------------------------------------------------------------------------------

BAG_INPUT = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9])


@pytest.mark.parametrize("mode, reduce", [("sum", "sum"), ("mean", "mean"), ("max", "amax")])
def test_embedding_bag_equals_gather_then_reduce_under_every_preset(mode, reduce):
    g = gen(15)
    w = torch.randn(10, 3, generator=g, dtype=DT).requires_grad_()
    r = torch.randn(2, 3, generator=g, dtype=DT)
    offsets = torch.tensor([0, 4])
    same_under_every_preset(
        lambda: F.embedding_bag(BAG_INPUT, w, offsets, mode=mode),
        lambda: getattr(w[BAG_INPUT].reshape(2, 4, 3), reduce)(1),
        [w],
        [w],
        r,
    )


@pytest.mark.parametrize("mode", MODES)
def test_embedding_bag_with_constant_per_sample_weights(mode):
    g = gen(16)
    w = torch.randn(10, 3, generator=g, dtype=DT).requires_grad_()
    psw = torch.rand(8, generator=g, dtype=DT) + 0.1  # positive: proportional stays a split
    r = torch.randn(2, 3, generator=g, dtype=DT)
    out = F.embedding_bag(BAG_INPUT, w, torch.tensor([0, 4]), mode="sum", per_sample_weights=psw)
    rw, rep = dynamiclrp.explain(out, w, relevance=r, rules=MODES[mode], return_report=True)
    M = torch.zeros(6, 30, dtype=DT)
    for i, row in enumerate(BAG_INPUT.tolist()):
        for d in range(3):
            M[flat((2, 3), (i // 4, d)), flat((10, 3), (row, d))] += float(psw[i])
    (ew,) = expected_split([M], [w], r, MODES[mode])
    close(rw, ew)
    assert abs(rep.residual) < 1e-12
    assert_lrp0_is_gradient_x_input(
        F.embedding_bag(BAG_INPUT, w, torch.tensor([0, 4]), mode="sum", per_sample_weights=-psw),
        [w],
    )


@pytest.mark.parametrize("which", ["both", "w", "psw"])
def test_embedding_bag_with_data_per_sample_weights_is_its_written_out_spelling(which):
    """Data per-sample weights: the map of ``index_add`` of ``W[indices] * psw[:, None]`` per bag
    (terms split like add, each product uniformly), under every preset."""
    g = gen(17)
    w = torch.randn(10, 3, generator=g, dtype=DT).requires_grad_()
    # positive: a constant negative weight takes the signed form (test above), not the spelling's
    psw = (torch.rand(8, generator=g, dtype=DT) + 0.1).requires_grad_()
    r = torch.randn(2, 3, generator=g, dtype=DT)
    offsets = torch.tensor([0, 4])
    bag = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    ws = w if which != "psw" else w.detach()
    ps = psw if which != "w" else psw.detach()
    ins = [t for t in (ws, ps) if t.requires_grad]
    same_under_every_preset(
        lambda: F.embedding_bag(BAG_INPUT, ws, offsets, mode="sum", per_sample_weights=ps),
        lambda: torch.zeros(2, 3, dtype=DT).index_add(0, bag, ws[BAG_INPUT] * ps[:, None]),
        ins,
        ins,
        r,
    )
    if which != "both":  # linear in the one explained operand
        out = F.embedding_bag(BAG_INPUT, ws, offsets, mode="sum", per_sample_weights=ps)
        assert_lrp0_is_gradient_x_input(out, ins)


def test_embedding_bag_max_splits_ties_between_rows_and_absorbs_empty_bags():
    w = torch.tensor([[1.0, 2.0], [1.0, 0.0], [0.0, 3.0]], dtype=DT).requires_grad_()
    idx = torch.tensor([0, 1, 2])
    offsets = torch.tensor([0, 2, 3])  # bags [0, 1], [2], [] (empty)
    r = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=DT)
    out = F.embedding_bag(idx, w, offsets, mode="max")
    rw, rep = dynamiclrp.explain(out, w, relevance=r, return_report=True)
    close(rw, torch.tensor([[0.5, 2.0], [0.5, 0.0], [3.0, 4.0]], dtype=DT))
    assert rep.absorbed == pytest.approx(11.0)
    assert abs(rep.residual) < 1e-12


# --- fold / unfold --------------------------------------------------------------------------------


def fold_matrix(channels, size, k, pad, stride):
    """``M`` of ``F.fold``: column ``(c, ki, kj)`` at block ``(bh, bw)`` adds onto pixel
    ``(bh * stride - pad + ki, bw * stride - pad + kj)`` of channel ``c``."""
    blocks = (size + 2 * pad - k) // stride + 1
    M = torch.zeros(channels * size * size, channels * k * k * blocks * blocks, dtype=DT)
    for c, ki, kj, bh, bw in cells((channels, k, k, blocks, blocks)):
        y, x = bh * stride - pad + ki, bw * stride - pad + kj
        if 0 <= y < size and 0 <= x < size:
            col = flat(
                (channels * k * k, blocks * blocks), (c * k * k + ki * k + kj, bh * blocks + bw)
            )
            M[flat((channels, size, size), (c, y, x)), col] = 1.0
    return M


@pytest.mark.parametrize("mode", MODES)
def test_fold_is_a_linear_sum(mode):
    g = gen(17)
    cols = torch.randn(1, 2 * 9, 9, generator=g, dtype=DT).requires_grad_()  # 3x3 blocks
    r = torch.randn(1, 2, 5, 5, generator=g, dtype=DT)
    out = F.fold(cols, (5, 5), 3, padding=1, stride=2)
    assert out.grad_fn.name() == "Col2ImBackward0"
    rc, rep = dynamiclrp.explain(out, cols, relevance=r, rules=MODES[mode], return_report=True)
    (ec,) = expected_split([fold_matrix(2, 5, 3, 1, 2)], [cols], r, MODES[mode])
    close(rc, ec)
    assert abs(rep.residual) < 1e-12
    assert_lrp0_is_gradient_x_input(F.fold(cols, (5, 5), 3, padding=1, stride=2), [cols])


def test_unfold_routes_each_copy_back():
    g = gen(18)
    img = torch.randn(1, 2, 5, 5, generator=g, dtype=DT).requires_grad_()
    out = F.unfold(img, 3, padding=1, stride=2)
    r = torch.randn(out.shape, generator=g, dtype=DT)
    assert out.grad_fn.name() == "Im2ColBackward0"
    ri, rep = dynamiclrp.explain(out, img, relevance=r, return_report=True)
    M = fold_matrix(2, 5, 3, 1, 2)  # unfold copies: its matrix is fold's transpose
    close(ri, (M @ r.reshape(-1)).reshape(img.shape))
    assert rep.absorbed == pytest.approx(float(r.sum() - ri.sum()), abs=1e-12)  # padding
    assert abs(rep.residual) < 1e-12
    assert_lrp0_is_gradient_x_input(F.unfold(img, 3, padding=1, stride=2), [img])


# --- index_add of a constant source ---------------------------------------------------------------


def test_index_add_of_a_constant_source_equals_adding_it_under_every_preset():
    """Autograd saves neither the source nor the index when the source needs no grad; the rule
    splits like ``x + C`` with ``C = zeros.index_add(0, index, source)``, a constant add."""
    g = gen(19)
    x = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    src = torch.randn(2, 3, generator=g, dtype=DT)
    idx = torch.tensor([0, 2])
    r = torch.randn(4, 3, generator=g, dtype=DT)
    const = torch.zeros(4, 3, dtype=DT).index_add(0, idx, src)
    same_under_every_preset(
        lambda: x.index_add(0, idx, src),
        lambda: x + const,
        [x],
        [x],
        r,
    )
    rx, rep = dynamiclrp.explain(x.index_add(0, idx, src), x, relevance=r, return_report=True)
    ex = r * x.detach().abs() / (x.detach().abs() + const.abs())
    close(rx, ex)
    assert rep.absorbed == pytest.approx(float((r - ex).sum()), rel=1e-9)
    assert abs(rep.residual) < 1e-12
    assert_lrp0_is_gradient_x_input(x.index_add(0, idx, src), [x])


# --- issue 14: index_reduce, _segment_reduce, _unsafe_masked_index_put_accumulate ---------------

IR_INDEX = torch.tensor([0, 2, 0, 3, 2])  # row 1 of self gets nothing


@pytest.mark.parametrize("reduce", ["mean", "amax", "amin", "prod"])
@pytest.mark.parametrize("include_self", [True, False])
def test_index_reduce_equals_scatter_reduce_under_every_preset(reduce, include_self):
    g = gen(70)
    x = torch.randn(4, 3, generator=g, dtype=DT)
    src = torch.randn(5, 3, generator=g, dtype=DT)
    src[2] = src[0]  # a tie in rows 0 (amax / amin split it)
    x, src = x.requires_grad_(), src.requires_grad_()
    r = torch.randn(4, 3, generator=g, dtype=DT)
    out = x.index_reduce(0, IR_INDEX, src, reduce, include_self=include_self)
    assert type(out.grad_fn).__name__ == "IndexReduceBackward0"
    idx = IR_INDEX[:, None].expand(5, 3)
    same_under_every_preset(
        lambda: x.index_reduce(0, IR_INDEX, src, reduce, include_self=include_self),
        lambda: x.scatter_reduce(0, idx, src, reduce, include_self=include_self),
        [x, src],
        [x, src],
        r,
    )


def test_index_reduce_mean_along_dim_1_by_hand():
    """mean along dim 1: ``R`` of output column ``c`` split over ``self[:, c]`` (included) and the
    source columns written there in proportion to their magnitudes."""
    g = gen(71)
    x = torch.randn(2, 3, generator=g, dtype=DT).requires_grad_()
    src = torch.randn(2, 2, generator=g, dtype=DT).requires_grad_()
    index = torch.tensor([2, 2])
    r = torch.randn(2, 3, generator=g, dtype=DT)
    rx, rs = dynamiclrp.explain(x.index_reduce(1, index, src, "mean"), [x, src], relevance=r)
    xd, sd = x.detach(), src.detach()
    for i in range(2):
        den = abs(float(xd[i, 2])) + abs(float(sd[i, 0])) + abs(float(sd[i, 1]))
        close(
            rs[i],
            torch.tensor([abs(float(sd[i, k])) / den * float(r[i, 2]) for k in range(2)], dtype=DT),
        )
        close(rx[i, 2], torch.tensor(abs(float(xd[i, 2])) / den * float(r[i, 2]), dtype=DT))
        close(rx[i, :2], r[i, :2])


SEG_LENGTHS = torch.tensor([2, 0, 3, 1])
SEG_BOUNDS = [(0, 2), (2, 2), (2, 5), (5, 6)]


def _segments_written_out(x, reduce):
    """One reduction per non-empty segment along dim 0, stacked (the empty one: left out)."""
    ops = {"sum": torch.sum, "mean": torch.mean, "max": torch.amax, "min": torch.amin}
    op = ops.get(reduce, torch.prod)
    return torch.stack([op(x[a:b], 0) for a, b in SEG_BOUNDS if b > a])


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min", "prod"])
@pytest.mark.parametrize("spec", ["lengths", "offsets"])
def test_segment_reduce_equals_its_reductions_under_every_preset(reduce, spec):
    g = gen(72)
    x = torch.randn(6, 3, generator=g, dtype=DT)
    x[3] = x[2]  # a tie inside segment 2
    x.requires_grad_()
    r = torch.randn(3, 3, generator=g, dtype=DT)
    kw = (
        {"lengths": SEG_LENGTHS}
        if spec == "lengths"
        else {"offsets": torch.cat([torch.zeros(1, dtype=torch.long), SEG_LENGTHS.cumsum(0)])}
    )
    keep = torch.tensor([0, 2, 3])  # the non-empty segments

    def spelled():  # (the empty segment, -inf / nan / 0 without initial, takes no R here)
        return torch._segment_reduce(x, reduce, axis=0, unsafe=False, **kw)[keep]

    assert type(spelled().grad_fn.next_functions[0][0]).__name__ == "SegmentReduceBackward0"
    same_under_every_preset(spelled, lambda: _segments_written_out(x, reduce), [x], [x], r)


def test_segment_reduce_initial_is_a_constant_term_and_absorbs():
    """sum with ``initial=c``: ``c + sum x`` per segment, ``c``'s share absorbed; the empty
    segment's output is ``c`` alone, all of its ``R`` absorbed; the books close."""
    x = torch.tensor([[1.0, -2.0], [3.0, 0.5], [2.0, 2.0]], dtype=DT, requires_grad=True)
    lengths = torch.tensor([1, 0, 2])
    r = torch.tensor([[1.0, 2.0], [5.0, 5.0], [-1.0, 3.0]], dtype=DT)
    out = torch._segment_reduce(x, "sum", lengths=lengths, axis=0, unsafe=False, initial=4.0)
    rx, rep = dynamiclrp.explain(out, x, relevance=r, rules=PROP, return_report=True)
    want = torch.tensor(
        [
            [1 / 5 * 1.0, 2 / 6 * 2.0],
            [3 / 9 * -1.0, 0.5 / 6.5 * 3.0],
            [2 / 9 * -1.0, 2 / 6.5 * 3.0],
        ],
        dtype=DT,
    )
    close(rx, want)
    close(torch.tensor(rep.absorbed, dtype=DT), r.sum() - want.sum())
    assert abs(rep.residual) < 1e-12


def test_segment_reduce_max_with_initial_winning_absorbs():
    x = torch.tensor([[1.0], [7.0], [2.0]], dtype=DT, requires_grad=True)
    out = torch._segment_reduce(x, "max", lengths=torch.tensor([2, 1]), axis=0, initial=5.0)
    r = torch.tensor([[3.0], [4.0]], dtype=DT)
    rx, rep = dynamiclrp.explain(out, x, relevance=r, return_report=True)
    close(rx, torch.tensor([[0.0], [3.0], [0.0]], dtype=DT))  # 7 wins; 5 beats 2
    close(torch.tensor(rep.absorbed, dtype=DT), torch.tensor(4.0, dtype=DT))


def test_segment_reduce_2d_lengths_along_axis_1():
    g = gen(73)
    x = torch.randn(2, 5, generator=g, dtype=DT).requires_grad_()
    lengths = torch.tensor([[2, 3], [4, 1]])
    out = torch._segment_reduce(x, "sum", lengths=lengths, axis=1, unsafe=False)
    r = torch.randn(2, 2, generator=g, dtype=DT)
    rx = dynamiclrp.explain(out, x, relevance=r, rules="epsilon")
    xd = x.detach()
    want = torch.empty_like(xd)
    for b, ls in enumerate(lengths.tolist()):
        a = 0
        for s, n in enumerate(ls):
            z = float(xd[b, a : a + n].sum())
            want[b, a : a + n] = (
                xd[b, a : a + n] * float(r[b, s]) / (z + 1e-6 * math.copysign(1, z))
            )
            a += n
    close(rx, want)
    assert_lrp0_is_gradient_x_input(out, [x])


@pytest.mark.parametrize("which", ["both", "self", "values"])
def test_masked_index_put_accumulate_equals_index_put_of_masked_values(which):
    g = gen(74)
    x = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_(which != "values")
    v = torch.randn(5, 3, generator=g, dtype=DT).requires_grad_(which != "self")
    idx = torch.tensor([0, 2, 0, 3, 9])  # 9: clamped to 3 (masked off here)
    mask = torch.tensor([True, True, False, True, False])[:, None]
    r = torch.randn(4, 3, generator=g, dtype=DT)
    ins = [t for t in (x, v) if t.requires_grad]
    out = torch.ops.aten._unsafe_masked_index_put_accumulate(x, mask, [idx], v)
    assert type(out.grad_fn).__name__ == "UnsafeMaskedIndexPutAccumulateBackward0"
    with dynamiclrp.record() as rec_a:
        a = torch.ops.aten._unsafe_masked_index_put_accumulate(x, mask, [idx], v)
    with dynamiclrp.record() as rec_b:
        b = x.index_put([idx.clamp(max=3)], v.masked_fill(~mask, 0), accumulate=True)
    for name in PRESETS:
        ra = dynamiclrp.explain(a, ins, relevance=r, rules=name, recording=rec_a)
        rb = dynamiclrp.explain(b, ins, relevance=r, rules=name, recording=rec_b)
        for p, q in zip(
            ra if isinstance(ra, tuple) else (ra,),
            rb if isinstance(rb, tuple) else (rb,),
            strict=True,
        ):
            torch.testing.assert_close(
                p, q, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
            )
    if which != "both":
        assert_lrp0_is_gradient_x_input(out, ins)
