"""Softmax, log-softmax and fused scaled-dot-product attention (``dynamiclrp.rules.attention``).

Expected values are written out here:

- softmax ``s = softmax(x)``: ``R_x = x * (R - s * sum(R))`` along the softmax dimension, zero at
  ``-inf`` logits;
- log-softmax ``y``: ``R_x = x * (R / stab(y) - exp(y) * sum(R / stab(y)))``;
- attention ``O = softmax(scale q k^T + mask) v``: with ``S`` the masked scores and ``P`` the
  probabilities, the uniform bilinear rule on ``O = P v`` (each product term ``P_ij v_jc`` gets
  ``P_ij v_jc R_ic / stab(O_ic)``, half to each factor), the softmax rule on ``P``, and the uniform
  bilinear rule on the products ``scale q_ic k_jc`` with denominator ``stab(S_ij)`` (the additive
  mask absorbs its share).  Terms are formed explicitly with ``einsum`` over named indices.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from oracle import close, gen, randn, stab

import dynamiclrp

DT = torch.float64
EPS = 0.01
RULES = dynamiclrp.Rules(eps=EPS)


def softmax_expected(x: torch.Tensor, R: torch.Tensor, dim: int) -> torch.Tensor:
    xd = x.detach()
    s = torch.exp(xd - xd.max(dim, keepdim=True).values)
    s = s / s.sum(dim, keepdim=True)
    out = xd * (R - s * R.sum(dim, keepdim=True))
    return torch.where(torch.isneginf(xd), torch.zeros_like(out), out)


# --- softmax ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_softmax_rule(dim: int) -> None:
    g = gen(0)
    x, R = randn(g, 3, 5, 2, grad=True), randn(g, 3, 5, 2)
    rx = dynamiclrp.explain(torch.softmax(x, dim), x, relevance=R)
    close(rx, softmax_expected(x, R, dim))


def test_softmax_by_hand_loops() -> None:
    g = gen(1)
    x, R = randn(g, 2, 4, grad=True), randn(g, 2, 4)
    rx = dynamiclrp.explain(x.softmax(-1), x, relevance=R)
    for i in range(2):
        row = [float(v) for v in x.detach()[i]]
        z = sum(math.exp(v) for v in row)
        s = [math.exp(v) / z for v in row]
        tot = float(R[i].sum())
        for j in range(4):
            assert float(rx[i, j]) == pytest.approx(row[j] * (float(R[i, j]) - s[j] * tot))


def test_softmax_bidirectional_keeps_upper_triangle() -> None:
    """No mask: every logit, above the diagonal too, gets its relevance (no causal assumption)."""
    g = gen(2)
    x, R = randn(g, 2, 5, 5, grad=True), randn(g, 2, 5, 5)
    rx = dynamiclrp.explain(x.softmax(-1), x, relevance=R)
    ex = softmax_expected(x, R, -1)
    close(rx, ex)
    upper = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert (rx[:, upper].abs() > 1e-6).all()


def test_softmax_neg_inf_logit_gets_zero_not_nan() -> None:
    g = gen(3)
    x = randn(g, 4, 4)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    x[mask] = float("-inf")
    x.requires_grad_()
    R = randn(g, 4, 4)
    rx = dynamiclrp.explain(x.softmax(-1), x, relevance=R)
    assert torch.isfinite(rx).all()
    close(rx[mask], torch.zeros(int(mask.sum()), dtype=DT))
    close(rx, softmax_expected(x, R, -1))


def test_softmax_after_linear_layer_value_from_promise() -> None:
    g = gen(4)
    x, R = randn(g, 3, 4, grad=True), randn(g, 3, 5)
    lin = torch.nn.Linear(4, 5).double()
    h = lin(x)
    rx, rep = dynamiclrp.explain(h.softmax(-1), x, relevance=R, rules=RULES, return_report=True)
    hd, W, b = h.detach(), lin.weight.detach(), lin.bias.detach()
    rh = softmax_expected(h, R, -1)
    close(rx, x.detach() * ((rh / stab(hd, EPS)) @ W))
    assert rep.absorbed == pytest.approx(float((b * rh / stab(hd, EPS)).sum()), abs=1e-9)


TRIL = torch.ones(4, 4, dtype=torch.bool).tril()


@pytest.mark.parametrize("how", ["masked_fill", "where_scalar", "additive_param"])
def test_causal_masked_scores_then_softmax(how: str) -> None:
    """The usual ways to mask scores before a softmax: masked positions get nothing, no NaN.
    A fill value is not recorded by autograd: the forward runs under dynamiclrp.record()."""
    g = gen(5)
    s, R = randn(g, 2, 4, 4, grad=True), randn(g, 2, 4, 4)
    with dynamiclrp.record() as rec:
        if how == "masked_fill":
            logits = s.masked_fill(~TRIL, float("-inf"))
        elif how == "where_scalar":
            logits = torch.where(TRIL, s, float("-inf"))
        else:
            zeros = torch.zeros(4, 4, dtype=DT)
            mask = torch.nn.Parameter(zeros.masked_fill(~TRIL, float("-inf")))
            logits = s + mask
        probs = logits.softmax(-1)
    rs = dynamiclrp.explain(probs, s, relevance=R, recording=rec)
    masked = s.detach().masked_fill(~TRIL, float("-inf"))
    close(rs, softmax_expected(masked, R, -1))


# --- log-softmax -----------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [-1, 0])
def test_log_softmax_rule(dim: int) -> None:
    g = gen(6)
    x, R = randn(g, 3, 4, grad=True), randn(g, 3, 4)
    rx = dynamiclrp.explain(torch.log_softmax(x, dim), x, relevance=R, rules=RULES)
    xd = x.detach()
    y = xd - torch.log(torch.exp(xd).sum(dim, keepdim=True))
    gy = R / stab(y, EPS)
    close(rx, xd * (gy - torch.exp(y) * gy.sum(dim, keepdim=True)))


# --- scaled-dot-product attention --------------------------------------------------------------


def attention_expected(
    q, k, v, R, *, mask=None, is_causal=False, scale=None, eps=EPS, proportional_mask=False
):
    """Hand-written forward and rules; returns ``(O, R_q, R_k, R_v)`` (mask handling: module doc).

    ``proportional_mask``: the scores were ``scale q k^T + mask`` as an explicit add (the math
    path), so ``R_S`` is first split proportionally between the product and the mask and the
    product's share is divided by ``stab(scale q k^T)``.
    """
    q, k, v = q.detach(), k.detach(), v.detach()
    hq, hk = q.shape[-3], k.shape[-3]
    kv_head = torch.tensor([h // (hq // hk) for h in range(hq)])
    ke, ve = k[..., kv_head, :, :], v[..., kv_head, :, :]  # each query head's key/value head
    lq, lk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    sc = 1.0 / math.sqrt(d) if scale is None else scale
    S = sc * torch.einsum("...ic,...jc->...ij", q, ke)
    if is_causal:  # top-left aligned, as documented for torch's SDPA
        keep = torch.tensor([[j <= i for j in range(lk)] for i in range(lq)])
        S = S.masked_fill(~keep, float("-inf"))
    if mask is not None:
        S = S.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else S + mask
    P = torch.exp(S - S.max(-1, keepdim=True).values)
    P = P / P.sum(-1, keepdim=True)
    out = torch.einsum("...ij,...jc->...ic", P, ve)
    # out = P v: terms P_ij v_jc, half each
    T = torch.einsum("...ij,...jc->...ijc", P, ve) * (R / stab(out, eps)).unsqueeze(-2)
    r_p, r_ve = 0.5 * T.sum(-1), 0.5 * T.sum(-3)
    # P = softmax(S)
    r_s = softmax_expected(S, r_p, -1)
    # S = sc q k^T (+ mask): terms sc q_ic k_jc over stab(S_ij)
    G = torch.where(torch.isneginf(S), 0.0, r_s / stab(S, eps))
    if proportional_mask:
        qk = sc * torch.einsum("...ic,...jc->...ij", q, ke)
        share = r_s * qk.abs() / (qk.abs() + mask.abs())
        G = share / stab(qk, eps)
    T2 = sc * torch.einsum("...ic,...jc->...ijc", q, ke) * G.unsqueeze(-1)
    r_q, r_ke = 0.5 * T2.sum(-2), 0.5 * T2.sum(-3)
    r_k, r_v = torch.zeros_like(k), torch.zeros_like(v)
    for h in range(hq):
        r_k[..., kv_head[h], :, :] += r_ke[..., h, :, :]
        r_v[..., kv_head[h], :, :] += r_ve[..., h, :, :]
    return out, r_q, r_k, r_v


def qkv(g, b=2, hq=2, hk=2, lq=3, lk=5, d=4):
    return (
        randn(g, b, hq, lq, d, grad=True),
        randn(g, b, hk, lk, d, grad=True),
        randn(g, b, hk, lk, d, grad=True),
    )


SDPA_CASES = {
    "plain": {},
    "scale": {"scale": 0.3},
    "bool_mask": {"mask": "bool"},
    "float_mask": {"mask": "float"},
    "causal_square": {"is_causal": True, "lq": 4, "lk": 4},
    "causal_rect": {"is_causal": True, "lq": 3, "lk": 5},
    "gqa": {"hq": 4, "hk": 2},
    "gqa_causal_scale": {"hq": 4, "hk": 1, "is_causal": True, "lq": 4, "lk": 4, "scale": 0.3},
}


@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_sdpa_matches_hand_written_rules(case: str) -> None:
    g = gen(7)
    opts = dict(SDPA_CASES[case])
    shape = {key: opts.pop(key) for key in ("hq", "hk", "lq", "lk") if key in opts}
    q, k, v = qkv(g, **shape)
    lq, lk = q.shape[-2], k.shape[-2]
    kwargs = {}
    mask = None
    if opts.get("mask") == "bool":
        mask = torch.rand(lq, lk, generator=g) > 0.4
        mask[:, 0] = True  # every query sees at least one key
        kwargs["attn_mask"] = mask
    elif opts.get("mask") == "float":
        mask = randn(g, lq, lk)
        kwargs["attn_mask"] = mask
    if opts.get("is_causal"):
        kwargs["is_causal"] = True
    if "scale" in opts:
        kwargs["scale"] = opts["scale"]
    if q.shape[-3] != k.shape[-3]:
        kwargs["enable_gqa"] = True
    out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    R = randn(g, *out.shape)
    rq, rk, rv = dynamiclrp.explain(out, [q, k, v], relevance=R, rules=RULES)
    # the default preset splits an add by magnitude, the mask's add in the fused node too
    hand, eq, ek, ev = attention_expected(
        q,
        k,
        v,
        R,
        mask=mask,
        is_causal=bool(opts.get("is_causal")),
        scale=opts.get("scale"),
        proportional_mask=opts.get("mask") == "float" and RULES.add == "proportional",
    )
    close(hand, out.detach())  # the hand-written forward is the op
    close(rq, eq)
    close(rk, ek)
    close(rv, ev)


def test_sdpa_float_mask_parameter_takes_the_math_path() -> None:
    """A float mask that requires grad sends SDPA down torch's math path (mul, bmm, add, softmax,
    bmm): the add splits the scores' relevance proportionally and the mask absorbs its share."""
    g = gen(8)
    q, k, v = qkv(g)
    mask = torch.nn.Parameter(randn(g, 3, 5))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    R = randn(g, *out.shape)
    (rq, rk, rv), rep = dynamiclrp.explain(
        out, [q, k, v], relevance=R, rules=RULES, return_report=True
    )
    _, eq, ek, ev = attention_expected(q, k, v, R, mask=mask.detach(), proportional_mask=True)
    close(rq, eq)
    close(rk, ek)
    close(rv, ev)
    assert abs(rep.absorbed) > 1e-3


def _primitive_attention(q, k, v, scale, mask=None):
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask
    return s.softmax(-1) @ v


@pytest.mark.parametrize("kind", ["plain", "scale", "gqa", "float_mask_param"])
def test_primitives_equal_fused_sdpa(kind: str) -> None:
    """matmul -> softmax -> matmul (bmm uniform, softmax rule, bmm uniform) explains like SDPA."""
    g = gen(9)
    hq, hk = (4, 2) if kind == "gqa" else (2, 2)
    q, k, v = qkv(g, hq=hq, hk=hk)
    scale = 0.3 if kind == "scale" else 0.5
    rules = dynamiclrp.Rules(eps=1e-10, add="signed")
    mask = torch.nn.Parameter(randn(g, 3, 5)) if kind == "float_mask_param" else None
    kwargs = {"scale": scale, "enable_gqa": kind == "gqa"}
    if mask is not None:
        kwargs["attn_mask"] = mask
    fused = F.scaled_dot_product_attention(q, k, v, **kwargs)
    R = randn(g, *fused.shape)
    r_fused = dynamiclrp.explain(fused, [q, k, v], relevance=R, rules=rules)
    ke, ve = k, v
    if hq != hk:
        ke, ve = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    prim = _primitive_attention(q, ke, ve, scale, mask)
    close(prim.detach(), fused.detach())
    r_prim = dynamiclrp.explain(prim, [q, k, v], relevance=R, rules=rules)
    for a, b in zip(r_prim, r_fused, strict=True):
        close(a, b, rtol=1e-6, atol=1e-8)


def test_sdpa_relevance_sums() -> None:
    """Books: everything seeded arrives at q, k, v or is booked as the rules' change."""
    g = gen(10)
    q, k, v = qkv(g)
    out = F.scaled_dot_product_attention(q, k, v)
    R = randn(g, *out.shape)
    rel, rep = dynamiclrp.explain(out, [q, k, v], relevance=R, rules=RULES, return_report=True)
    assert abs(rep.residual) < 1e-9
    assert rep.inputs == pytest.approx([float(r.sum()) for r in rel])


def test_sdpa_fully_masked_query_rows_get_nothing() -> None:
    """A padded query position whose keys are all masked attends to nothing (torch's SDPA
    returns 0 there): its relevance is 0 and the other rows are explained as if it were absent,
    instead of a NaN from the softmax of an all ``-inf`` row."""
    g = gen(11)
    q, k, v = qkv(g, lq=4, lk=5)
    mask = torch.rand(4, 5, generator=g) > 0.4
    mask[:, 0] = True
    mask[1] = False  # query row 1 sees no key
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out[..., 1, :].abs().max() == 0
    R = randn(g, *out.shape)
    rq, rk, rv = dynamiclrp.explain(out, [q, k, v], relevance=R, rules=RULES)
    rows = [0, 2, 3]
    _, eq, ek, ev = attention_expected(
        q[..., rows, :].detach(), k.detach(), v.detach(), R[..., rows, :], mask=mask[rows]
    )
    assert rq[..., 1, :].abs().max() == 0
    close(rq[..., rows, :], eq)
    close(rk, ek)
    close(rv, ev)
