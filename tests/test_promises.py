"""The Promise System: forward values that autograd did not keep, recovered for the rules.

Every test builds a small graph in which a promise-generating op (add, sub, sum, mean, softmax) needs
operand values that no autograd node saved, so they have to be rebuilt from an arg node (a leaf, a
relu's saved result, an mm's saved input) by replaying a chain of non-saving ops (view, transpose,
permute, neg, multiplication by a constant, clone, cat, stack, split, unbind, select, slice).

Every expected number is computed here by hand with plain torch ops on *detached* values: the operand
values by running the same forward functions again, the rules from their textbook formulas
(proportional split of an add, ``R_x = x * W^T (R / stab(z))`` for a linear layer, AttnLRP's softmax
rule), and the routing of relevance through shape ops by following element indices (``route_back``)
rather than by calling any backward.  Nothing here is compared against dynamiclrp itself.
"""

from __future__ import annotations

import sys

import pytest
import torch
from oracle import gen

import dynamiclrp
from dynamiclrp import Rules

DT = torch.float64
EPS = 1e-12
RULES = Rules(eps=EPS)


# --- the textbook ----------------------------------------------------------------------------


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=DT)


def param(g: torch.Generator, *shape: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(randn(g, *shape))


def leaf(g: torch.Generator, *shape: int) -> torch.Tensor:
    return randn(g, *shape).requires_grad_(True)


def stab(z: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    sign = torch.ones_like(z)
    sign[z < 0] = -1.0
    return z + eps * sign


def dense_eps(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, eps: float = EPS):
    """Epsilon rule for ``z = x @ w``: ``R_i = sum_j x_i w_ij R_j / stab(z_j)``."""
    x, w = x.detach(), w.detach()
    z = x @ w
    return x * ((r / stab(z, eps)) @ w.T)


def proportional(r: torch.Tensor, *terms: torch.Tensor) -> list[torch.Tensor]:
    """``R_t = R |t| / sum |t'|`` element-wise (zero where all terms are zero)."""
    mags = [t.detach().abs() for t in terms]
    den = torch.zeros_like(mags[0])
    for m in mags:
        den = den + m
    out = []
    for m in mags:
        share = torch.zeros_like(r)
        nz = den > 0
        share[nz] = r[nz] * m[nz] / den[nz]
        out.append(share)
    return out


def index_map(shape_ops, n: int, shape=None) -> torch.Tensor:
    """Apply the shape-only part of a chain to element indices: where each output element came
    from."""
    idx = torch.arange(n)
    if shape is not None:
        idx = idx.view(shape)
    return shape_ops(idx)


def route_back(r: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Send relevance ``r`` of a routed tensor back to the ``n`` source elements (summing)."""
    out = torch.zeros(n, dtype=r.dtype)
    out.index_add_(0, idx.reshape(-1), r.reshape(-1))
    return out


def close(actual, expected, rtol=1e-9, atol=1e-11):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def explain(out, inputs, rules=RULES, **kw):
    return dynamiclrp.explain(out, inputs, rules=rules, return_report=True, **kw)


# --- chains of non-saving ops (shape part separable, so relevance can be routed by index) ------


def chain_a_shape(t):
    return t.view(2, 6)


def chain_a(t):
    return chain_a_shape(t).clone()


def chain_b_shape(t):
    return t.view(3, 4).t().permute(1, 0).t().reshape(2, 6)


def chain_b(t):
    """view -> t -> neg -> *0.5 -> permute -> t -> reshape: nothing saved on the way."""
    t = t.view(3, 4).t()
    t = -t * 0.5
    return t.permute(1, 0).t().reshape(2, 6)


def chain_c_shape(t):
    return t.view(2, 3, 2).transpose(1, 2).reshape(2, 6)


def chain_c(t):
    return (t.view(2, 3, 2).transpose(1, 2).neg() * 3.0).reshape(2, 6)


# --- one test per promise-generating op --------------------------------------------------------


@pytest.mark.parametrize("op", ["add", "add_alpha", "sub", "sub_alpha"])
def test_add_sub_operands_recovered_through_chains(op):
    g = gen(1)
    x = leaf(g, 1, 4)
    A, B = param(g, 4, 12), param(g, 4, 12)
    za = x @ A  # mm output: nobody saves it, replayed from the leaves
    hb = torch.relu(x @ B)  # relu saves its result: an own-saved arg node
    a, b = chain_a(za), chain_b(hb)
    alpha = {"add": 1.0, "add_alpha": 0.5, "sub": -1.0, "sub_alpha": -2.0}[op]
    if op == "add":
        y = a + b
    elif op == "add_alpha":
        y = torch.add(a, b, alpha=0.5)
    elif op == "sub":
        y = a - b
    else:
        y = torch.sub(a, b, alpha=2.0)
    rel, rep = explain(y, x)

    xd = x.detach()
    a_val = chain_a(xd @ A.detach())
    b_val = chain_b(torch.relu(xd @ B.detach()))
    r = (a_val + alpha * b_val).clone()
    ra, rb = proportional(r, a_val, alpha * b_val)
    r_za = route_back(ra, index_map(chain_a_shape, 12, (1, 12)), 12).view(1, 12)
    r_hb = route_back(rb, index_map(chain_b_shape, 12, (1, 12)), 12).view(1, 12)
    expected = dense_eps(xd, A, r_za) + dense_eps(xd, B, r_hb)
    close(rel, expected)
    assert rep.promises.get("replay", 0) > 0, rep.promises


@pytest.mark.parametrize(
    "reduce",
    ["sum_all", "sum_dim0", "sum_dim1_keepdim", "sum_dims_neg", "mean_all", "mean_dim1"],
)
@pytest.mark.parametrize("mode", ["proportional", "signed"])
def test_sum_mean_input_recovered_through_chain(reduce, mode):
    g = gen(2)
    x = leaf(g, 1, 4)
    A = param(g, 4, 12)
    h = x @ A  # mixed signs, so the proportional and signed modes differ
    fns = {
        "sum_all": lambda t: t.sum(),
        "sum_dim0": lambda t: t.sum(0),
        "sum_dim1_keepdim": lambda t: t.sum(1, keepdim=True),
        "sum_dims_neg": lambda t: t.view(2, 3, 2).sum((-1, 0)),
        "mean_all": lambda t: t.mean(),
        "mean_dim1": lambda t: t.mean(1),
    }
    f = fns[reduce]
    v = chain_c(h)  # (2, 6)
    y = f(v)
    rules = Rules(eps=EPS, reduction=mode)
    rel, rep = explain(y, x, rules=rules)

    xd = x.detach()
    v_val = chain_c(xd @ A.detach())
    # Each element of v belongs to one output group; compute group membership by index.
    n = v_val.numel()
    out_val = f(v_val)
    r_out = out_val.clone()
    # group id of every v element: reduce a one-hot over elements, read which output it lands in
    onehot = torch.eye(n, dtype=DT).view(n, *v_val.shape)
    group = torch.stack([f(onehot[i]).reshape(-1).ne(0).nonzero()[0, 0] for i in range(n)])
    r_flat = r_out.reshape(-1)
    vf = v_val.reshape(-1)
    if mode == "proportional":
        den = torch.zeros_like(r_flat).index_add_(0, group, vf.abs())
        rv = vf.abs() * torch.where(den[group] > 0, r_flat[group] / den[group], 0.0)
    else:
        tot = torch.zeros_like(r_flat).index_add_(0, group, vf)
        rv = vf * r_flat[group] / stab(tot)[group]
    r_h = route_back(rv.view_as(v_val), index_map(chain_c_shape, 12, (1, 12)), 12).view(1, 12)
    expected = dense_eps(xd, A, r_h)
    close(rel, expected)
    assert rep.promises.get("replay", 0) > 0, rep.promises


def test_softmax_logits_recovered_through_chain():
    g = gen(3)
    x = leaf(g, 1, 4)
    A = param(g, 4, 12)
    logits = chain_c(x @ A)  # replayed from the leaves: mm output -> view -> transpose -> neg ...
    s = torch.softmax(logits, dim=-1)
    seed = randn(g, *s.shape)
    rel, rep = explain(s, x, relevance=seed)

    xd = x.detach()
    z = chain_c(xd @ A.detach())
    p = torch.softmax(z, -1)
    r_z = z * (seed - p * seed.sum(-1, keepdim=True))
    r_mm = route_back(r_z, index_map(chain_c_shape, 12, (1, 12)), 12).view(1, 12)
    close(rel, dense_eps(xd, A, r_mm))
    assert rep.promises.get("replay", 0) > 0, rep.promises


@pytest.mark.parametrize("fill", ["masked_fill_inf", "masked_fill_finfo_min", "where_inf"])
def test_softmax_logits_recovered_through_a_causal_mask(fill):
    g = gen(19)
    x = leaf(g, 1, 4)
    A, V = param(g, 4, 9), param(g, 3, 2)
    keep = torch.ones(3, 3, dtype=torch.bool).tril()

    def masked(t):
        if fill == "masked_fill_inf":
            return t.masked_fill(~keep, float("-inf"))
        if fill == "masked_fill_finfo_min":
            return t.masked_fill(~keep, torch.finfo(DT).min)
        return torch.where(keep, t, float("-inf"))

    scores = (x @ A).view(3, 3)  # unsaved: replayed from the leaves through the mask
    if fill == "where_inf":  # masked_fill's -inf is rebuilt from the softmax's zeros, where's not
        with pytest.raises(dynamiclrp.ValueRecoveryError, match=r"dynamiclrp\.record\("):
            explain(torch.softmax(masked(scores), -1) @ V, x)
    with dynamiclrp.record() as rec:  # the fill value is not recorded by autograd
        p = torch.softmax(masked(scores), -1)
    y = p @ V
    rel, _ = explain(y, x, recording=rec)

    xd = x.detach()
    z = (xd @ A.detach()).view(3, 3)
    pv = torch.softmax(z.masked_fill(~keep, float("-inf")), -1)
    r_p = dense_eps(pv, V, y.detach())  # V is a weight: epsilon rule on p
    r_z = torch.where(keep, z * (r_p - pv * r_p.sum(-1, keepdim=True)), 0.0)
    close(rel, dense_eps(xd, A, r_z.reshape(1, 9)))
    if fill != "where_inf":
        rel, _ = explain(torch.softmax(masked(scores), -1) @ V, x)  # without a recording
        close(rel, dense_eps(xd, A, r_z.reshape(1, 9)))


# --- routing ops on a promise chain: cat, stack, split, unbind ---------------------------------


def _two_sources(seed: int):
    g = gen(seed)
    x = leaf(g, 1, 4)
    A, B, C = param(g, 4, 6), param(g, 4, 6), param(g, 4, 6)
    return g, x, A, B, C


def test_cat_promise_passes_through_cat_and_slice():
    g, x, A, B, C = _two_sources(4)
    pa = torch.relu(x @ A).view(2, 3)
    pb = (x @ B).view(3, 2).t().neg()  # (2, 3), replayed from leaves
    c = torch.cat([pa, pb], 0)  # (4, 3)
    d = (x @ C).view(2, 3) * 2.0
    y = c[1:3] + d  # the add needs c[1:3]: replay through slice -> cat -> both chains
    rel, rep = explain(y, x)

    xd = x.detach()
    pa_v = torch.relu(xd @ A.detach()).view(2, 3)
    pb_v = -(xd @ B.detach()).view(3, 2).t()
    c_v = torch.cat([pa_v, pb_v], 0)
    d_v = (xd @ C.detach()).view(2, 3) * 2.0
    r_c13, r_d = proportional(c_v[1:3] + d_v, c_v[1:3], d_v)
    r_c = torch.zeros(4, 3, dtype=DT)
    r_c[1:3] = r_c13
    r_pa = r_c[:2].reshape(1, 6)
    r_pb = r_c[2:].t().reshape(1, 6)  # pb = view(3,2).t(): element (i, j) of pb is (j, i) of (3,2)
    expected = dense_eps(xd, A, r_pa) + dense_eps(xd, B, r_pb) + dense_eps(xd, C, r_d.view(1, 6))
    close(rel, expected)
    assert rep.promises.get("replay", 0) > 0


def test_stack_promise_passes_through_stack_and_select():
    g, x, A, B, _ = _two_sources(5)
    pa = (x @ A).view(2, 3).neg()
    pb = torch.relu(x @ B).view(3, 2).t()
    st = torch.stack([pa, pb], dim=1)  # (2, 2, 3)
    y = st[:, 0] + st[:, 1] * 0.5
    rel, rep = explain(y, x)

    xd = x.detach()
    pa_v = -(xd @ A.detach()).view(2, 3)
    pb_v = torch.relu(xd @ B.detach()).view(3, 2).t()
    ra, rb = proportional(pa_v + 0.5 * pb_v, pa_v, 0.5 * pb_v)
    expected = dense_eps(xd, A, ra.reshape(1, 6)) + dense_eps(xd, B, rb.t().reshape(1, 6))
    close(rel, expected)
    assert rep.promises.get("replay", 0) > 0


@pytest.mark.parametrize("kind", ["split", "split_sizes", "chunk"])
def test_split_promise_passes_through_split(kind):
    g = gen(6)
    x = leaf(g, 1, 4)
    A, C = param(g, 4, 12), param(g, 4, 2)
    p = (x @ A).view(6, 2).t().neg()  # (2, 6), replayed from the leaves
    if kind == "split":
        s0, s1, s2 = torch.split(p, 2, dim=1)
    elif kind == "split_sizes":
        s0, s1, s2 = torch.split(p, [2, 2, 2], dim=1)
    else:
        s0, s1, s2 = torch.chunk(p, 3, dim=1)
    e = (x @ C).view(2, 1)
    y = s0 + s2.t().t() + e  # s1 unused: the split gets zeros for it
    rel, rep = explain(y, x)

    xd = x.detach()
    p_v = -(xd @ A.detach()).view(6, 2).t()
    e_v = (xd @ C.detach()).view(2, 1).expand(2, 2)
    inner = p_v[:, 0:2] + p_v[:, 4:6]
    r_inner, r_e = proportional(inner + e_v, inner, e_v)
    r0, r2 = proportional(r_inner, p_v[:, 0:2], p_v[:, 4:6])
    r_p = torch.zeros(2, 6, dtype=DT)
    r_p[:, 0:2], r_p[:, 4:6] = r0, r2
    r_mm = r_p.t().reshape(1, 12)
    expected = dense_eps(xd, A, r_mm) + dense_eps(xd, C, r_e.sum(1).view(1, 2))
    close(rel, expected)
    assert rep.promises.get("replay", 0) > 0


def test_unbind_promise_passes_through_unbind():
    g = gen(7)
    x = leaf(g, 1, 4)
    A = param(g, 4, 12)
    p = (x @ A).view(3, 4).neg()
    u0, u1, u2 = p.unbind(0)  # u1 unused
    y = u0 + u2 * 2.0
    rel, rep = explain(y, x)

    xd = x.detach()
    p_v = -(xd @ A.detach()).view(3, 4)
    r0, r2 = proportional(p_v[0] + 2 * p_v[2], p_v[0], 2 * p_v[2])
    r_p = torch.zeros(3, 4, dtype=DT)
    r_p[0], r_p[2] = r0, r2
    close(rel, dense_eps(xd, A, r_p.reshape(1, 12)))
    assert rep.promises.get("replay", 0) > 0


# --- promise trees --------------------------------------------------------------------------


def test_nested_promises_add_of_add_and_sum():
    g = gen(8)
    x = leaf(g, 1, 4)
    A, B, C = param(g, 4, 12), param(g, 4, 12), param(g, 4, 12)
    u = x @ A  # unsaved
    v = torch.relu(x @ B)
    w = x @ C  # unsaved
    inner1 = chain_a(u) + chain_b(v)  # (2, 6), needs u and v through chains
    inner2 = w.view(2, 6, 1).neg().expand(2, 6, 1).sum(-1)  # (2, 6), needs w through a chain
    y = inner1.neg().t().t() + inner2.clone() * 0.5  # needs inner1 and inner2: a promise tree
    rel, rep = explain(y, x)

    xd = x.detach()
    u_v, v_v, w_v = xd @ A.detach(), torch.relu(xd @ B.detach()), xd @ C.detach()
    a_v, b_v = chain_a(u_v), chain_b(v_v)
    i1 = a_v + b_v
    w3 = -w_v.view(2, 6, 1)
    i2 = w3.sum(-1)
    t1, t2 = -i1, 0.5 * i2
    r_i1, r_i2 = proportional(t1 + t2, t1, t2)
    ra, rb = proportional(r_i1, a_v, b_v)
    # sum over a size-1 dim: the proportional reduction passes everything to the single element
    r_w3 = proportional(r_i2.unsqueeze(-1), w3)[0]
    r_u = route_back(ra, index_map(chain_a_shape, 12, (1, 12)), 12).view(1, 12)
    r_v = route_back(rb, index_map(chain_b_shape, 12, (1, 12)), 12).view(1, 12)
    r_w = r_w3.reshape(1, 12)
    expected = dense_eps(xd, A, r_u) + dense_eps(xd, B, r_v) + dense_eps(xd, C, r_w)
    close(rel, expected)
    assert rep.promises.get("replay", 0) > 0


def test_nested_sum_over_add_of_unsaved_operands():
    g = gen(9)
    x = leaf(g, 2, 4)
    A, B = param(g, 4, 6), param(g, 4, 6)
    inner = (x @ A).neg() + (x @ B).view(2, 3, 2).transpose(1, 2).reshape(2, 6)
    y = inner.view(2, 2, 3).sum(-1)  # sum needs inner, inner needs both mm outputs
    rel, rep = explain(y, x)

    xd = x.detach()
    a_v = -(xd @ A.detach())
    b_v = (xd @ B.detach()).view(2, 3, 2).transpose(1, 2).reshape(2, 6)
    i_v = (a_v + b_v).view(2, 2, 3)
    den = i_v.abs().sum(-1, keepdim=True)
    r_i = i_v.abs() * torch.where(den > 0, y.detach().unsqueeze(-1) / den, 0.0)
    r_i = r_i.reshape(2, 6)
    ra, rb = proportional(r_i, a_v, b_v)
    idx_b = torch.arange(6).view(3, 2).transpose(0, 1).reshape(6)  # per row
    r_bmm = torch.zeros(2, 6, dtype=DT)
    r_bmm[:, idx_b] = rb
    close(rel, dense_eps(xd, A, ra) + dense_eps(xd, B, r_bmm))
    assert rep.promises.get("replay", 0) > 0


# --- figure 2: the deadlock pattern, and stacked residual blocks ---------------------------------


def test_figure2_deadlock_pattern():
    """A = add(B, D); B = relu(C); C = E @ W; D = chain(E); E = relu(x @ W1).

    Backward edges A->B, A->D, B->C, C->E, D->E (section 4.2.3): the branch of A through D reaches
    E, whose relevance also waits on C, which waits on B.  Value recovery must not wait for that.
    """
    g = gen(10)
    x = leaf(g, 1, 6)
    W1, W = param(g, 6, 6), param(g, 6, 6)
    E = torch.relu(x @ W1)
    C = E @ W
    B = torch.relu(C)
    D = E.view(2, 3).t().neg().t().reshape(1, 6)
    A = B + D
    rel, rep = explain(A, x)

    xd = x.detach()
    e = torch.relu(xd @ W1.detach())
    b = torch.relu(e @ W.detach())
    d = -e
    r_b, r_d = proportional(b + d, b, d)
    r_e = dense_eps(e, W, r_b) + r_d  # relu is identity; D's chain only routes (element-wise here)
    close(rel, dense_eps(xd, W1, r_e))
    assert rep.residual == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("batch", [1, 3])
def test_three_stacked_residual_blocks(batch):
    """h <- h + f(h), f(h) = (relu(h W1) W2) through a view: three blocks, hand-written LRP."""
    g = gen(11)
    d = 5
    x = leaf(g, batch, d)
    blocks = [(param(g, d, 8), param(g, 8, d)) for _ in range(3)]

    def f(h, w1, w2):
        return (torch.relu(h @ w1) @ w2).view(batch, 1, d).squeeze(1)

    h = x
    for w1, w2 in blocks:
        h = h + f(h, w1, w2)
    rel, rep = explain(h, x)

    # forward by hand, keeping every activation
    hs, rs = [x.detach()], []
    for w1, w2 in blocks:
        hk = hs[-1]
        r = torch.relu(hk @ w1.detach())
        rs.append(r)
        hs.append(hk + r @ w2.detach())
    R = hs[-1].clone()
    for k in reversed(range(3)):
        w1, w2 = (t.detach() for t in blocks[k])
        hk, r = hs[k], rs[k]
        fk = r @ w2
        r_skip, r_f = proportional(R, hk, fk)
        r_r = dense_eps(r, w2, r_f)
        r_h_f = dense_eps(hk, w1, r_r)
        R = r_skip + r_h_f
    close(rel, R)
    assert rep.residual == pytest.approx(0.0, abs=1e-9)


def test_a_residual_branch_is_the_sum_minus_the_stream_when_both_are_at_hand():
    """``y = h + f(h)`` with ``h`` saved by the mm it feeds and ``y`` the explained output: the
    add's rule takes ``f(h) = y - h`` instead of replaying ``f``'s matmuls, and the contraction
    that made ``f(h)`` reads that value as its ``z``: nothing is replayed."""
    g = gen(12)
    x = leaf(g, 2, 4)
    w1, w2, w3, w4 = param(g, 4, 6), param(g, 6, 4), param(g, 4, 6), param(g, 6, 4)
    h = torch.relu(x @ w1) @ w2
    y = h + torch.relu(h @ w3) @ w4
    rel, rep = explain(y, x)

    xd, (v1, v2, v3, v4) = x.detach(), (w.detach() for w in (w1, w2, w3, w4))
    a = torch.relu(xd @ v1)
    hd = a @ v2
    r = torch.relu(hd @ v3)
    r_skip, r_f = proportional(hd + r @ v4, hd, r @ v4)
    r_h = r_skip + dense_eps(hd, v3, dense_eps(r, v4, r_f))
    close(rel, dense_eps(xd, v1, dense_eps(a, v2, r_h)))
    assert "replay" not in rep.promises, rep.promises


# --- long chains: no recursion limit --------------------------------------------------------


def test_2000_op_chain_value_recovered_from_far_end():
    g = gen(12)
    x = leaf(g, 1, 4)
    A, B = param(g, 4, 6), param(g, 4, 6)
    limit = sys.getrecursionlimit()
    p = torch.relu(x @ A)
    t = p
    for i in range(2000):
        k = i % 4
        if k == 0:
            t = t.view(2, 3)
        elif k == 1:
            t = t.neg()
        elif k == 2:
            t = t.view(1, 6)
        else:
            t = t * 1.0001
    q = torch.relu(x @ B)
    # scaled, so the sum is not at hand and t must be replayed (not taken as y - q)
    y = (t + q) * 2.0
    rel, rep = explain(y, x)
    assert sys.getrecursionlimit() == limit

    xd = x.detach()
    p_v = torch.relu(xd @ A.detach())
    t_v = p_v * 1.0001**500  # 500 negations cancel
    q_v = torch.relu(xd @ B.detach())
    r_t, r_q = proportional(2.0 * (t_v + q_v), t_v, q_v)
    close(rel, dense_eps(xd, A, r_t) + dense_eps(xd, B, r_q), rtol=1e-8)
    assert rep.promises.get("replay", 0) >= 2000 - 500  # every non-mul step was replayed


def test_2000_deep_chain_of_adds_closed_form():
    """h_k = h_{k-1} + v, h_0 and v >= 0: R(h_0) = R h_0 / h_N and R(v) = N R v / h_N."""
    g = gen(13)
    n = 2000
    x = leaf(g, 1, 4)
    A, B = param(g, 4, 6), param(g, 4, 6)
    h0 = torch.relu(x @ A).neg().neg()  # unsaved: the first add must replay through the negs
    v = torch.relu(x @ B)
    h = h0
    for _ in range(n):
        h = h + v
    # scaled, so no sum is at hand and the whole chain is replayed from h_0 (not peeled off as
    # h_k - v from the explained output down)
    rel, rep = explain(h * 2.0, x)

    xd = x.detach()
    h0_v = torch.relu(xd @ A.detach())
    v_v = torch.relu(xd @ B.detach())
    hn = h0_v + n * v_v
    R = 2.0 * hn  # the seed is the output itself
    nz = hn > 0
    r_h0 = torch.where(nz, R * h0_v / torch.where(nz, hn, 1.0), 0.0)
    r_v = torch.where(nz, n * R * v_v / torch.where(nz, hn, 1.0), 0.0)
    close(rel, dense_eps(xd, A, r_h0) + dense_eps(xd, B, r_v), rtol=1e-8, atol=1e-9)
    assert rep.promises.get("replay", 0) >= n


# --- aggregation: one value, several origins ---------------------------------------------------


def test_value_needed_by_two_origins():
    g = gen(14)
    x = leaf(g, 1, 4)
    A, B, C = param(g, 4, 6), param(g, 4, 6), param(g, 4, 6)
    t = (x @ A).view(2, 3).neg()  # unsaved; operand of two adds
    u = torch.relu(x @ B).view(2, 3)
    w = (x @ C).view(3, 2)
    a1 = t + u
    a2 = t.t() + w
    y = a1 + a2.t()
    rel, rep = explain(y, x)

    xd = x.detach()
    t_v = -(xd @ A.detach()).view(2, 3)
    u_v = torch.relu(xd @ B.detach()).view(2, 3)
    w_v = (xd @ C.detach()).view(3, 2)
    a1_v, a2_v = t_v + u_v, t_v.t() + w_v
    r_a1, r_a2t = proportional(a1_v + a2_v.t(), a1_v, a2_v.t())
    r_t1, r_u = proportional(r_a1, t_v, u_v)
    r_t2, r_w = proportional(r_a2t.t(), t_v.t(), w_v)
    r_t = r_t1 + r_t2.t()
    expected = (
        dense_eps(xd, A, r_t.reshape(1, 6))
        + dense_eps(xd, B, r_u.reshape(1, 6))
        + dense_eps(xd, C, r_w.reshape(1, 6))
    )
    close(rel, expected)


def test_same_operand_twice_in_one_add():
    """``y = t + t`` with ``t`` unsaved: both slots need the same recovered value."""
    g = gen(15)
    x = leaf(g, 1, 4)
    A = param(g, 4, 6)
    t = (x @ A).view(2, 3).t()
    y = t + t
    rel, _ = explain(y, x)
    xd = x.detach()
    # proportional split of R = 2t over (t, t): half each, then both halves reach t
    r_t = (2 * (xd @ A.detach()).view(2, 3).t()).t().reshape(1, 6)
    close(rel, dense_eps(xd, A, r_t))


# --- bugs found ------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["mm", "bmm", "conv"])
def test_replay_through_contraction_with_frozen_weight(op):
    """A frozen weight is not in the graph, but the contraction saved it: replay must use it."""
    g = gen(16)
    if op == "conv":
        x = leaf(g, 1, 2, 4, 4)
        A, B = randn(g, 3, 2, 3, 3), randn(g, 3, 2, 3, 3)  # constants: the model was frozen

        def f(t, w):
            return torch.nn.functional.conv2d(t, w).reshape(1, 12)
    elif op == "bmm":
        x = leaf(g, 1, 1, 4)
        A, B = randn(g, 1, 4, 12), randn(g, 1, 4, 12)

        def f(t, w):
            return torch.bmm(t, w).reshape(1, 12)
    else:
        x = leaf(g, 1, 4)
        A, B = randn(g, 4, 12), randn(g, 4, 12)

        def f(t, w):
            return t @ w

    y = chain_a(f(x, A)) + chain_b(f(x, B))  # both operands replayed through the contraction
    rel, _ = explain(y, x)

    xd = x.detach()
    a_v, b_v = chain_a(f(xd, A)), chain_b(f(xd, B))
    ra, rb = proportional(a_v + b_v, a_v, b_v)
    r_za = route_back(ra, index_map(chain_a_shape, 12, (1, 12)), 12).view(1, 12)
    r_zb = route_back(rb, index_map(chain_b_shape, 12, (1, 12)), 12).view(1, 12)
    # the epsilon rule for a linear map z = f(x): R_x = x * J^T (R / stab(z)), J^T by autograd
    expected = torch.zeros_like(xd)
    for w, r in ((A, r_za), (B, r_zb)):
        xi = xd.clone().requires_grad_(True)
        z = f(xi, w)
        (vjp,) = torch.autograd.grad(z, xi, r / stab(z.detach()))
        expected = expected + xd * vjp
    close(rel, expected)


def test_add_python_scalar_before_relu_is_right_or_refused_loudly():
    """``relu(x @ W + 0.0)``: the scalar leaves no trace in the graph and relu keeps only its
    result, so the add's operand sizes are unknowable.  Either the rule gets it right (adding 0
    passes R unchanged under every add rule) or explain refuses with a ValueRecoveryError that
    names the constant -- never a wrong number or an unrelated exception."""
    g = gen(17)
    x = leaf(g, 1, 4)
    W1, W2 = param(g, 4, 6), param(g, 6, 3)
    h = torch.relu(x @ W1 + 0.0)
    y = h @ W2
    try:
        rel, _ = explain(y, x)
    except dynamiclrp.ValueRecoveryError as err:
        assert "constant" in str(err)
        return
    xd = x.detach()
    hv = torch.relu(xd @ W1.detach())
    close(rel, dense_eps(xd, W1, dense_eps(hv, W2, y.detach())))


def test_constant_tensor_added_at_output():
    """The add's constant operand is recovered as ``out - a``; the output's value is known.
    Added straight to a matmul's output it is that layer's bias (``Rules.canonize_bias``): the
    epsilon rule with ``z = h @ W2 + b``, exactly as ``F.linear(h, W2.T, b)`` is explained; with
    the fusion off, the add's proportional split."""
    g = gen(18)
    x = leaf(g, 1, 4)
    W1, W2 = param(g, 4, 6), param(g, 6, 3)
    b = randn(g, 3)  # a buffer, no grad
    h = torch.relu(x @ W1)
    y = h @ W2 + b
    xd = x.detach()
    hv = torch.relu(xd @ W1.detach())
    a_v = hv @ W2.detach()
    rel, rep = explain(y, x)
    r_h = hv * ((y.detach() / (a_v + b)) @ W2.detach().T)  # seed y, z = a + b
    close(rel, dense_eps(xd, W1, r_h))
    assert rep.residual == pytest.approx(0.0, abs=1e-9)
    rel, rep = explain(y, x, rules=dynamiclrp.Rules(eps=RULES.eps, canonize_bias=False))
    ra, rb = proportional(y.detach(), a_v, b.expand(1, 3))
    close(rel, dense_eps(xd, W1, dense_eps(hv, W2, ra)))
    assert rep.residual == pytest.approx(0.0, abs=1e-9)


def test_constant_operand_share_booked_as_absorbed():
    """The ledger books an add's share for a constant operand as absorbed, not as stabiliser."""
    g = gen(18)
    x = leaf(g, 1, 4)
    W = param(g, 4, 3)
    b = randn(g, 3)  # a buffer, no grad
    y = torch.relu(x @ W) + b
    _, rep = explain(y, x)
    hv = torch.relu(x.detach() @ W.detach())
    _, rb = proportional(y.detach(), hv, b.expand(1, 3))
    assert rep.absorbed == pytest.approx(float(rb.sum()), rel=1e-9)
    assert rep.stabiliser == pytest.approx(0.0, abs=1e-9)


def test_a_concatenated_value_is_undone_from_the_concatenation():
    """Message passing as users write it: ``zeros.index_add(...)`` (a sum into a constant, whose
    value the rule needs) then ``cat`` and a linear layer.  The linear layer saved the
    concatenation, and a concatenation places each input element once, so its backward applied
    to that value gives the sum back: no recording is needed, and the map is the recorded one."""
    torch.manual_seed(0)
    msg, upd = torch.nn.Linear(4, 4).double(), torch.nn.Linear(8, 3).double()
    src, dst = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 2])

    def model(x):
        agg = torch.zeros_like(x).index_add(0, dst, msg(x)[src])
        return upd(torch.cat([x, agg], -1))

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    plain = dynamiclrp.explain(model(x), x, target=0)
    with dynamiclrp.record() as rec:
        out = model(x)
    recorded = dynamiclrp.explain(out, x, target=0, recording=rec)
    torch.testing.assert_close(plain, recorded, rtol=1e-12, atol=1e-12)
