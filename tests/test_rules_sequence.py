"""Sequence-model rules (``dynamiclrp.rules.sequence``) run through the engine.

Each test builds a tiny graph whose output is the op under test, seeds an explicit random relevance
``R`` and compares what :func:`dynamiclrp.explain` returns with the formula of the module docstring
written out here independently (per group / per summand loops, float64):

- ``grouped_mm``: per group ``e``, ``z = x_e @ W_e``; one data operand: epsilon
  ``R_x = x * ((R / stab(z)) @ W^T)`` (or the preset's dense rule, z-plus here); two data operands:
  the uniform rule, half of ``x * (g @ W^T)`` and of ``W * (x^T @ g)`` each.  The CPU kernel only
  runs in float32 (and needs 16-byte aligned strides), so the graph is float32; the expected values
  are computed in float64 from the same numbers.
- ``index_add``: every output element is ``self`` plus the source elements scattered onto it;
  ``R`` is split over those summands like add (proportional ``|term| / sum |terms|``, or signed
  ``term / stab(sum)``).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from oracle import gen, stab

import dynamiclrp
from dynamiclrp.errors import ValueRecoveryError

DT = torch.float64
F32 = torch.float32


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-9, atol: float = 1e-10):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol)


# --- grouped_mm ----------------------------------------------------------------------------------

OFFS = torch.tensor([3, 3, 7, 10], dtype=torch.int32)  # group 1 is empty, rows 10.. in no group
M, K, N, G = 12, 8, 4, 4


def grouped_mm(a, b, offs=None):
    return torch.nn.functional.grouped_mm(a, b, offs=offs)


def _groups(offs):
    ends = offs.tolist()
    return [(g, 0 if g == 0 else ends[g - 1], e) for g, e in enumerate(ends)]


def _x_w(seed: int):
    g = gen(seed)
    x = torch.randn(M, K, generator=g).to(F32).requires_grad_()
    w = torch.nn.Parameter(torch.randn(G, K, N, generator=g).to(F32))
    r = torch.randn(M, N, generator=g).to(F32)
    return x, w, r


def test_grouped_mm_epsilon_per_group():
    x, w, r = _x_w(0)
    out = grouped_mm(x, w, OFFS)
    assert out.grad_fn.name() == "GroupedMmBackward0"
    rel, report = dynamiclrp.explain(out, x, relevance=r, return_report=True)
    x64, w64, r64 = x.detach().to(DT), w.detach().to(DT), r.to(DT)
    expected = torch.zeros(M, K, dtype=DT)
    for g, s, e in _groups(OFFS):
        z = x64[s:e] @ w64[g]
        expected[s:e] = x64[s:e] * ((r64[s:e] / stab(z, 1e-6)) @ w64[g].T)
    close(rel, expected, rtol=1e-4, atol=1e-5)
    assert torch.all(rel[10:] == 0)  # rows in no group receive nothing
    assert abs(report.residual) < 1e-4


def test_grouped_mm_preset_dense_rule_applies():
    """The preset's ``dense`` rule (z-plus) is used, as for ``mm``."""
    x, w, r = _x_w(1)
    rel = dynamiclrp.explain(grouped_mm(x, w, OFFS), x, relevance=r, rules="zplus")
    x64, w64, r64 = x.detach().to(DT), w.detach().to(DT), r.to(DT)
    expected = torch.zeros(M, K, dtype=DT)
    xp, xn = x64.clamp(min=0), x64.clamp(max=0)
    for g, s, e in _groups(OFFS):
        wp, wn = w64[g].clamp(min=0), w64[g].clamp(max=0)
        zp = xp[s:e] @ wp + xn[s:e] @ wn
        q = r64[s:e] / stab(zp, 1e-6)
        expected[s:e] = xp[s:e] * (q @ wp.T) + xn[s:e] * (q @ wn.T)
    close(rel, expected, rtol=1e-4, atol=1e-5)


def test_grouped_mm_two_data_operands_uniform():
    x, w, r = _x_w(2)
    w = w.detach().clone().requires_grad_()  # a data leaf, not a parameter
    (rx, rw), report = dynamiclrp.explain(
        grouped_mm(x, w, OFFS), [x, w], relevance=r, return_report=True
    )
    x64, w64, r64 = x.detach().to(DT), w.detach().to(DT), r.to(DT)
    ex, ew = torch.zeros(M, K, dtype=DT), torch.zeros(G, K, N, dtype=DT)
    for g, s, e in _groups(OFFS):
        q = r64[s:e] / stab(x64[s:e] @ w64[g], 1e-6)
        ex[s:e] = x64[s:e] * (q @ w64[g].T) / 2
        ew[g] = w64[g] * (x64[s:e].T @ q) / 2
    close(rx, ex, rtol=1e-4, atol=1e-5)
    close(rw, ew, rtol=1e-4, atol=1e-5)


def test_grouped_mm_replay_feeds_the_add_rule():
    """``grouped_mm(x, W) + b``: the add rule needs the product's value, which nothing saved, so
    the engine replays the node (a replay that got the groups wrong shows up as a wrong split)."""
    x, w, r = _x_w(3)
    b = torch.nn.Parameter(torch.randn(N, generator=gen(4)).to(F32))
    rel = dynamiclrp.explain(grouped_mm(x, w, OFFS)[:10] + b, x, relevance=r[:10])
    x64, w64, r64, b64 = x.detach().to(DT), w.detach().to(DT), r.to(DT), b.detach().to(DT)
    expected = torch.zeros(M, K, dtype=DT)
    for g, s, e in _groups(OFFS):
        z = x64[s:e] @ w64[g]
        rz = r64[s:e] * z.abs() / (z.abs() + b64.abs())
        expected[s:e] = x64[s:e] * ((rz / stab(z, 1e-6)) @ w64[g].T)
    close(rel, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["3d_2d", "2d_2d", "3d_3d"])
def test_grouped_mm_other_layouts(mode):
    g = gen(5)
    offs = torch.tensor([4, 4, 12], dtype=torch.int32)
    if mode == "3d_2d":  # offs partitions the columns of b
        a = torch.randn(3, 5, K, generator=g).to(F32).requires_grad_()
        b = torch.nn.Parameter(torch.randn(K, 12, generator=g).to(F32))
    elif mode == "2d_2d":  # offs partitions the shared dimension (K = 12 here)
        a = torch.randn(5, 12, generator=g).to(F32).requires_grad_()
        b = torch.nn.Parameter(torch.randn(12, N, generator=g).to(F32))
    else:
        offs = None
        a = torch.randn(3, 5, K, generator=g).to(F32).requires_grad_()
        b = torch.nn.Parameter(torch.randn(3, K, N, generator=g).to(F32))
    out = grouped_mm(a, b, offs)
    r = torch.randn(out.shape, generator=g).to(F32)
    rel = dynamiclrp.explain(out, a, relevance=r)
    a64, b64, r64 = a.detach().to(DT), b.detach().to(DT), r.to(DT)
    expected = torch.zeros_like(a64)
    if mode == "3d_2d":
        for grp, s, e in _groups(offs):
            q = r64[:, s:e] / stab(a64[grp] @ b64[:, s:e], 1e-6)
            expected[grp] = a64[grp] * (q @ b64[:, s:e].T)
    elif mode == "2d_2d":
        for grp, s, e in _groups(offs):
            q = r64[grp] / stab(a64[:, s:e] @ b64[s:e], 1e-6)
            expected[:, s:e] = a64[:, s:e] * (q @ b64[s:e].T)
    else:
        expected = a64 * ((r64 / stab(a64 @ b64, 1e-6)) @ b64.transpose(1, 2))
    close(rel, expected, rtol=1e-4, atol=1e-5)


def test_mixtral_grouped_mm_equals_batched_mm():
    """The default ``experts_implementation="grouped_mm"`` (float32) explains a Mixtral exactly as
    ``"batched_mm"`` does (same forward function, different graph)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = transformers.MixtralForCausalLM(cfg).eval()
    x = torch.randn(1, 5, 32, generator=gen(6)).requires_grad_()
    rels = {}
    for impl in ("grouped_mm", "batched_mm"):
        model.config._experts_implementation = impl
        with dynamiclrp.record(model) as rec:
            out = model(inputs_embeds=x).logits[:, -1]
        names = {o.name for o in dynamiclrp.coverage(out).ops}
        assert ("GroupedMmBackward0" in names) == (impl == "grouped_mm")
        rels[impl] = dynamiclrp.explain(out, x, target=3, recording=rec)
    close(rels["grouped_mm"], rels["batched_mm"], rtol=1e-5, atol=1e-7)


# --- index_add -----------------------------------------------------------------------------------

INDEX = torch.tensor([0, 2, 0, 3, 2])  # row 1 receives nothing, rows 0 and 2 two sources each


def _summands(self_, src, dim, index, alpha):
    """``output position -> [(kind, position, term)]``: the summands of each output element,
    ``kind`` being ``"self"`` or ``"src"``."""
    terms = {}
    for o in itertools.product(*map(range, self_.shape)):
        terms[o] = [("self", o, float(self_[o]))]
    for i in itertools.product(*map(range, src.shape)):
        o = list(i)
        o[dim] = int(index[i[dim]])
        terms[tuple(o)].append(("src", i, alpha * float(src[i])))
    return terms


def _expected_index_add(self_, src, r, dim, index, alpha, mode, eps=1e-6):
    rs, rt = torch.zeros_like(self_), torch.zeros_like(src)
    for o, ts in _summands(self_, src, dim, index, alpha).items():
        if mode == "proportional":
            den = sum(abs(t) for _, _, t in ts)
            shares = [abs(t) / den * float(r[o]) if den > 0 else 0.0 for _, _, t in ts]
        else:
            z = sum(t for _, _, t in ts)
            shares = [t / (z + (eps if z >= 0 else -eps)) * float(r[o]) for _, _, t in ts]
        for (kind, i, _), share in zip(ts, shares, strict=True):
            (rs if kind == "self" else rt)[i] += share
    return rs, rt


@pytest.mark.parametrize("mode", ["proportional", "signed"])
@pytest.mark.parametrize("dim, alpha", [(0, 1.0), (1, 2.0)])
def test_index_add_splits_like_add(mode, dim, alpha):
    g = gen(7)
    self_shape = [4, 3] if dim == 0 else [3, 4]
    src_shape = [5, 3] if dim == 0 else [3, 5]
    a = torch.randn(self_shape, generator=g, dtype=DT).requires_grad_()
    s = torch.randn(src_shape, generator=g, dtype=DT).requires_grad_()
    r = torch.randn(self_shape, generator=g, dtype=DT)
    out = a.index_add(dim, INDEX, s, alpha=alpha)
    assert out.grad_fn.name() == "IndexAddBackward0"
    rules = dynamiclrp.Rules(add=mode)
    (ra, rs), report = dynamiclrp.explain(out, [a, s], relevance=r, rules=rules, return_report=True)
    ea, es = _expected_index_add(a.detach(), s.detach(), r, dim, INDEX, alpha, mode)
    close(ra, ea)
    close(rs, es)
    assert abs(report.residual) < 1e-12
    if mode == "signed":  # the stabiliser keeps the difference
        assert report.stabiliser == pytest.approx(float((r - ea).sum() - es.sum()), abs=1e-12)


def test_index_add_unrecorded_accumulator_absorbs_its_share():
    """A constant accumulator (no grad, the experts loop's ``torch.zeros``) is rebuilt from the
    known output and takes its share, which is booked as absorbed."""
    g = gen(8)
    acc = torch.randn(4, 3, generator=g, dtype=DT)  # does not require grad: not recorded
    s = torch.randn(5, 3, generator=g, dtype=DT).requires_grad_()
    r = torch.randn(4, 3, generator=g, dtype=DT)
    out = acc.clone().index_add_(0, INDEX, s)
    assert out.grad_fn.next_functions[0][0] is None
    rs, report = dynamiclrp.explain(out, s, relevance=r, return_report=True)
    ea, es = _expected_index_add(acc, s.detach(), r, 0, INDEX, 1.0, "proportional")
    close(rs, es)
    assert report.absorbed == pytest.approx(float(ea.sum()), rel=1e-9)
    assert abs(report.residual) < 1e-12


def test_index_add_unknown_accumulator_fails_loudly():
    """Two scatter-adds into a zero accumulator, then ``+ b``: the add rule needs the second sum's
    value, replayed from the first, whose accumulator is a constant that nothing recorded or
    saved.  The engine raises rather than guess it (zeros here, but it could be anything)."""
    g = gen(9)
    s1 = torch.randn(5, 3, generator=g, dtype=DT).requires_grad_()
    s2 = torch.randn(2, 3, generator=g, dtype=DT).requires_grad_()
    b = torch.nn.Parameter(torch.randn(3, generator=g, dtype=DT))

    def forward():
        acc = torch.zeros(4, 3, dtype=DT)
        acc.index_add_(0, INDEX, s1)
        acc.index_add_(0, torch.tensor([1, 3]), s2)
        return acc + b

    with pytest.raises(ValueRecoveryError, match=r"IndexAddBackward0.*dynamiclrp\.record"):
        dynamiclrp.explain(forward(), [s1, s2], relevance=torch.ones(4, 3, dtype=DT))
    with dynamiclrp.record() as rec:  # keeps the scatter-add results autograd leaves untraced
        out = forward()
    ones = torch.ones(4, 3, dtype=DT)
    (r1, r2), rep = dynamiclrp.explain(
        out, [s1, s2], relevance=ones, recording=rec, return_report=True
    )
    # the zero accumulator takes nothing; the bias absorbs |b| / (|acc| + |b|); the rest arrives
    acc = out.detach() - b.detach()
    expected_in = (acc.abs() / (acc.abs() + b.detach().abs())).sum()
    assert float(r1.sum() + r2.sum()) == pytest.approx(float(expected_in), rel=1e-9)
    assert abs(rep.residual) < 1e-12


def test_index_add_replay_with_recorded_self():
    """``x.index_add(...) + b`` with ``x`` data: the add rule's operand is replayed exactly."""
    g = gen(10)
    x = torch.randn(4, 3, generator=g, dtype=DT).requires_grad_()
    s = torch.randn(5, 3, generator=g, dtype=DT).requires_grad_()
    b = torch.nn.Parameter(torch.randn(3, generator=g, dtype=DT))
    r = torch.randn(4, 3, generator=g, dtype=DT)
    y = x.index_add(0, INDEX, s)
    rx, rs = dynamiclrp.explain(y + b, [x, s], relevance=r)
    yv = y.detach()
    ry = r * yv.abs() / (yv.abs() + b.detach().abs())
    ex, es = _expected_index_add(x.detach(), s.detach(), ry, 0, INDEX, 1.0, "proportional")
    close(rx, ex)
    close(rs, es)
