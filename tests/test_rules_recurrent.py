"""Recurrent layers: the unrolled LRP rule (Arras et al. 2017) against an independent reference.

The reference below is written from the formulas, not from the rule's code: every affine map is
expanded into its contribution tensor ``C[b, j, k] = x[b, k] W[j, k]`` and the epsilon rule applied
element by element (the rule uses vector-Jacobian products), and the states are unrolled
separately.  It runs in float64.  The fused node (``MkldnnRnnLayerBackward0``, oneDNN's CPU LSTM,
float32 only) is then checked end to end through ``dynamiclrp.explain`` against the same
reference, layer by layer and direction by direction.
"""

import pytest
import torch
from torch import nn

import dynamiclrp
from dynamiclrp.rules import OP_TABLE
from dynamiclrp.rules.base import ReplayContext
from dynamiclrp.rules.recurrent import GRU, LSTM, RNN_RELU, RNN_TANH, layer_relevance

EPS = 1e-6
D = torch.float64


# --- the reference -------------------------------------------------------------------------------


def _stab(z, eps):
    return torch.where(z >= 0, z + eps, z - eps)


def _split(a, b, r, add, eps):
    if add == "signed":
        return r * a / _stab(a + b, eps), r * b / _stab(a + b, eps)
    den = a.abs() + b.abs()
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return (
        torch.where(den > 0, r * a.abs() / safe, 0.0),
        torch.where(den > 0, r * b.abs() / safe, 0.0),
    )


def _epsilon(terms, bias, r, eps):
    """Epsilon rule on ``z_j = sum over terms of sum_k C[b, j, k] + bias_j``: each term's input
    relevance ``sum_j C[b, j, k] r_j / stab(z_j)``, the bias share and the per-weight shares."""
    z = sum(c.sum(-1) for c in terms) + bias
    q = r / _stab(z, eps)
    rel = [torch.einsum("bjk,bj->bk", c, q) for c in terms]
    per_weight = [torch.einsum("bjk,bj->jk", c, q) for c in terms]
    return rel, bias * q, per_weight


def _contrib(v, w, scale=None):
    c = v[:, None, :] * w[None, :, :]
    return c if scale is None else c * scale[:, :, None]


def reference(mode, x, w_ih, w_hh, b_ih, b_hh, h0, c0, r_out, r_hy, r_cy, reverse, add, eps):
    """Unrolled LRP of one layer and direction: ``(R_x, R_h0, R_c0, R_b_ih, R_b_hh, R_W_ih,
    R_W_hh, output)`` (module docstring of ``dynamiclrp.rules.recurrent`` for the formulas)."""
    T, _, _ = x.shape
    H = w_hh.shape[1]
    n = {LSTM: 4, GRU: 3}.get(mode, 1)
    b_ih = torch.zeros(n * H, dtype=x.dtype) if b_ih is None else b_ih
    b_hh = torch.zeros(n * H, dtype=x.dtype) if b_hh is None else b_hh
    k = 2 if mode in (LSTM, GRU) else 0  # the chunk that carries relevance
    rows = slice(k * H, (k + 1) * H)
    order = list(range(T - 1, -1, -1)) if reverse else list(range(T))
    h = h0.clone()
    c = c0.clone() if c0 is not None else None
    cache, ys = {}, [None] * T
    for t in order:
        a = x[t] @ w_ih.T + b_ih
        b = h @ w_hh.T + b_hh
        if mode == LSTM:
            i = torch.sigmoid(a[:, 0:H] + b[:, 0:H])
            f = torch.sigmoid(a[:, H : 2 * H] + b[:, H : 2 * H])
            g = torch.tanh(a[:, 2 * H : 3 * H] + b[:, 2 * H : 3 * H])
            o = torch.sigmoid(a[:, 3 * H :] + b[:, 3 * H :])
            cache[t] = dict(h=h, c=c, f=f, i=i, g=g)
            c = f * c + i * g
            h = o * torch.tanh(c)
        elif mode == GRU:
            r = torch.sigmoid(a[:, 0:H] + b[:, 0:H])
            u = torch.sigmoid(a[:, H : 2 * H] + b[:, H : 2 * H])
            nn_ = torch.tanh(a[:, 2 * H :] + r * b[:, 2 * H :])
            cache[t] = dict(h=h, r=r, u=u, n=nn_)
            h = (1 - u) * nn_ + u * h
        else:
            cache[t] = dict(h=h)
            h = torch.tanh(a + b) if mode == RNN_TANH else torch.relu(a + b)
        ys[t] = h
    r_x = torch.zeros_like(x)
    r_h = r_hy.clone()
    r_c = r_cy.clone() if r_cy is not None else None
    rb_i, rb_h = torch.zeros_like(b_ih), torch.zeros_like(b_hh)
    rw_i, rw_h = torch.zeros_like(w_ih), torch.zeros_like(w_hh)
    wi, wh = w_ih[rows], w_hh[rows]
    for t in reversed(order):
        s = cache[t]
        r_h = r_h + r_out[t]
        if mode == LSTM:
            r_cell = r_c + r_h  # h = o * tanh(c): all to tanh(c), identity to c
            r_c, r_g = _split(s["f"] * s["c"], s["i"] * s["g"], r_cell, add, eps)
            (rx, rh), rb, (pw_i, pw_h) = _epsilon(
                [_contrib(x[t], wi), _contrib(s["h"], wh)], b_ih[rows] + b_hh[rows], r_g, eps
            )
            q = r_g / _stab(x[t] @ wi.T + s["h"] @ wh.T + b_ih[rows] + b_hh[rows], eps)
            rb_i[rows] += (b_ih[rows] * q).sum(0)
            rb_h[rows] += (b_hh[rows] * q).sum(0)
            r_h = rh
        elif mode == GRU:
            r_n, r_direct = _split((1 - s["u"]) * s["n"], s["u"] * s["h"], r_h, add, eps)
            gate = s["r"]
            bias = b_ih[rows] + gate * b_hh[rows]
            (rx, rh), _, (pw_i, pw_h) = _epsilon(
                [_contrib(x[t], wi), _contrib(s["h"], wh, gate)], bias, r_n, eps
            )
            z = x[t] @ wi.T + b_ih[rows] + gate * (s["h"] @ wh.T + b_hh[rows])
            q = r_n / _stab(z, eps)
            rb_i[rows] += (b_ih[rows] * q).sum(0)
            rb_h[rows] += (gate * b_hh[rows] * q).sum(0)
            r_h = r_direct + rh
        else:
            (rx, rh), _, (pw_i, pw_h) = _epsilon(
                [_contrib(x[t], wi), _contrib(s["h"], wh)], b_ih + b_hh, r_h, eps
            )
            q = r_h / _stab(x[t] @ wi.T + s["h"] @ wh.T + b_ih + b_hh, eps)
            rb_i += (b_ih * q).sum(0)
            rb_h += (b_hh * q).sum(0)
            r_h = rh
        r_x[t] = rx
        rw_i[rows] += pw_i
        rw_h[rows] += pw_h
    return r_x, r_h, r_c, rb_i, rb_h, rw_i, rw_h, torch.stack(ys)


# --- the rule's function against the reference (float64) -----------------------------------------


def _layer(mode, bias=True, seed=0, T=5, B=3, F=4, H=6):
    g = torch.Generator().manual_seed(seed)
    n = {LSTM: 4, GRU: 3}.get(mode, 1)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=D)

    return dict(
        x=rnd(T, B, F),
        w_ih=rnd(n * H, F) * 0.5,
        w_hh=rnd(n * H, H) * 0.5,
        b_ih=rnd(n * H) * 0.3 if bias else None,
        b_hh=rnd(n * H) * 0.3 if bias else None,
        h0=rnd(B, H) * 0.5,
        c0=rnd(B, H) * 0.5 if mode == LSTM else None,
        r_out=rnd(T, B, H),
        r_hy=rnd(B, H),
        r_cy=rnd(B, H) if mode == LSTM else None,
    )


MODES = [LSTM, GRU, RNN_TANH, RNN_RELU]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("add", ["proportional", "signed"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_relevance_matches_reference(mode, add, reverse, bias):
    p = _layer(mode, bias=bias, seed=mode + 10 * reverse)
    res = layer_relevance(mode, **p, reverse=reverse, eps=EPS, add=add, weights=True)
    ref = reference(mode, *p.values(), reverse, add, EPS)
    close = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.x, ref[0], **close)
    torch.testing.assert_close(res.h0, ref[1], **close)
    if mode == LSTM:
        torch.testing.assert_close(res.c0, ref[2], **close)
    else:
        assert res.c0 is None
    if bias:
        torch.testing.assert_close(res.b_ih, ref[3], **close)
        torch.testing.assert_close(res.b_hh, ref[4], **close)
    else:
        assert res.b_ih is None and res.b_hh is None
    torch.testing.assert_close(res.w_ih, ref[5], **close)
    torch.testing.assert_close(res.w_hh, ref[6], **close)


@pytest.mark.parametrize("mode", MODES)
def test_layer_relevance_recomputes_the_forward(mode):
    """The unrolled states equal PyTorch's own layer (the rule checks fused nodes against them)."""
    p = _layer(mode)
    cls = {LSTM: nn.LSTM, GRU: nn.GRU, RNN_TANH: nn.RNN, RNN_RELU: nn.RNN}[mode]
    kw = {"nonlinearity": "relu" if mode == RNN_RELU else "tanh"} if cls is nn.RNN else {}
    m = cls(4, 6, **kw).to(D)
    with torch.no_grad():
        for name, v in (("weight_ih_l0", "w_ih"), ("weight_hh_l0", "w_hh")):
            getattr(m, name).copy_(p[v])
        m.bias_ih_l0.copy_(p["b_ih"])
        m.bias_hh_l0.copy_(p["b_hh"])
        state = (p["h0"][None], p["c0"][None]) if mode == LSTM else p["h0"][None]
        y, _ = m(p["x"], state)
    res = layer_relevance(mode, **p)
    torch.testing.assert_close(res.output, y, rtol=1e-12, atol=1e-12)
    ref = reference(mode, *p.values(), False, "proportional", EPS)
    torch.testing.assert_close(ref[7], y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_layer_relevance_conserves(mode):
    """With proportional splits and a tiny eps, what arrives is what leaves: input, initial
    state and biases."""
    p = _layer(mode)
    res = layer_relevance(mode, **p, eps=1e-12)
    seeded = p["r_out"].sum() + p["r_hy"].sum() + (p["r_cy"].sum() if mode == LSTM else 0)
    out = res.x.sum() + res.h0.sum() + res.b_ih.sum() + res.b_hh.sum()
    out = out + (res.c0.sum() if mode == LSTM else 0)
    torch.testing.assert_close(out, seeded, rtol=1e-9, atol=1e-9)


def test_zero_initial_state_gets_nothing():
    p = _layer(LSTM)
    p["h0"], p["c0"] = torch.zeros_like(p["h0"]), torch.zeros_like(p["c0"])
    res = layer_relevance(LSTM, **p)
    assert res.h0.abs().max() == 0 and res.c0.abs().max() == 0


def test_gates_get_nothing():
    """Only the candidate chunk's bias and weight rows receive relevance (gates are constants)."""
    p = _layer(LSTM)
    res = layer_relevance(LSTM, **p, weights=True)
    H = 6
    for t in (res.b_ih, res.b_hh, res.w_ih, res.w_hh):
        assert t[: 2 * H].abs().max() == 0 and t[3 * H :].abs().max() == 0
        assert t[2 * H : 3 * H].abs().max() > 0


# --- the fused node (oneDNN LSTM, float32, CPU) --------------------------------------------------


def _nodes(out, name):
    seen, stack, found = set(), [out.grad_fn], []
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if f.name() == name:
            found.append(f)
        stack.extend(n[0] for n in f.next_functions)
    return found


def _fused_lstm(seed=0, layers=2, bidirectional=True, batch_first=True):
    torch.manual_seed(seed)
    m = nn.LSTM(3, 5, num_layers=layers, batch_first=batch_first, bidirectional=bidirectional)
    return m.eval()


def _require_fused(out):
    if not _nodes(out, "MkldnnRnnLayerBackward0"):
        pytest.skip("this PyTorch build does not run nn.LSTM through oneDNN on this CPU")


def _reference_lstm(m, x, r_seq, add, h0=None, c0=None):
    """The reference applied layer by layer to an ``nn.LSTM`` (float64 copies of its weights):
    relevance of ``x`` (batch first) and of the initial states."""
    dirs = 2 if m.bidirectional else 1
    H = m.hidden_size
    B = x.shape[0]
    h0 = torch.zeros(m.num_layers * dirs, B, H, dtype=D) if h0 is None else h0.detach().to(D)
    c0 = torch.zeros(m.num_layers * dirs, B, H, dtype=D) if c0 is None else c0.detach().to(D)
    inputs, layer_in = [], x.detach().to(D).transpose(0, 1)
    for layer in range(m.num_layers):  # the forward, to get each layer's input
        inputs.append(layer_in)
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w = [getattr(m, f"{n}{sfx}").detach().to(D) for n in ("weight_ih", "weight_hh")]
            b = [getattr(m, f"{n}{sfx}").detach().to(D) for n in ("bias_ih", "bias_hh")]
            k = layer * dirs + d
            zero = torch.zeros(B, H, dtype=D)
            r0 = torch.zeros(layer_in.shape[0], B, H, dtype=D)
            y = reference(
                LSTM, layer_in, *w, *b, h0[k], c0[k], r0, zero, zero, bool(d), "signed", EPS
            )[7]
            outs.append(y)
        layer_in = torch.cat(outs, -1)
    r = r_seq.detach().to(D).transpose(0, 1)
    r_h0, r_c0 = torch.zeros_like(h0), torch.zeros_like(c0)
    zero = torch.zeros(B, H, dtype=D)
    for layer in reversed(range(m.num_layers)):
        r_in = 0
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w = [getattr(m, f"{n}{sfx}").detach().to(D) for n in ("weight_ih", "weight_hh")]
            b = [getattr(m, f"{n}{sfx}").detach().to(D) for n in ("bias_ih", "bias_hh")]
            k = layer * dirs + d
            ref = reference(
                LSTM,
                inputs[layer],
                *w,
                *b,
                h0[k],
                c0[k],
                r[..., d * H : (d + 1) * H],
                zero,
                zero,
                bool(d),
                add,
                EPS,
            )
            r_in = r_in + ref[0]
            r_h0[k], r_c0[k] = ref[1], ref[2]
        r = r_in
    return r.transpose(0, 1), r_h0, r_c0


def _assert_near(actual, expected, rel=1e-4):
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual.to(D), expected, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("preset", ["dynamiclrp", "epsilon"])
def test_fused_lstm_matches_reference(preset):
    m = _fused_lstm()
    x = torch.randn(2, 6, 3, requires_grad=True)
    out, _ = m(x)
    _require_fused(out)
    r_seq = torch.randn(out.shape)
    rel, report = dynamiclrp.explain(out, x, relevance=r_seq, rules=preset, return_report=True)
    add = dynamiclrp.preset(preset).add
    ref, _, _ = _reference_lstm(m, x, r_seq, add)
    _assert_near(rel, ref)
    assert abs(report.residual) <= 1e-5 * abs(report.seeded) + 1e-6
    assert "recurrent" in report.by_family


@pytest.mark.parametrize("batch_first", [True, False])
def test_fused_lstm_classifier_and_initial_state(batch_first):
    """A classifier on the last output, with a learned initial state that requires grad."""
    m = _fused_lstm(seed=1, layers=1, bidirectional=False, batch_first=batch_first)
    head = nn.Linear(5, 4).eval()
    x = torch.randn(3, 7, 3)
    h0 = (0.5 * torch.randn(1, 3, 5)).requires_grad_()
    c0 = (0.5 * torch.randn(1, 3, 5)).requires_grad_()
    xin = (x if batch_first else x.transpose(0, 1)).detach().requires_grad_()
    seq, _ = m(xin, (h0, c0))
    last = seq[:, -1] if batch_first else seq[-1]
    logits = head(last)
    _require_fused(logits)
    # relevance arriving at the LSTM's output, from the head's epsilon rule
    r_last = dynamiclrp.explain(logits, last, target=1)
    r_seq = torch.zeros(3, 7, 5)
    r_seq[:, -1] = r_last.detach()
    rx, rh0, rc0 = dynamiclrp.explain(logits, [xin, h0, c0], target=1)
    ref_x, ref_h0, ref_c0 = _reference_lstm(m, x, r_seq, "proportional", h0, c0)
    _assert_near(rx if batch_first else rx.transpose(0, 1), ref_x)
    _assert_near(rh0, ref_h0)
    _assert_near(rc0, ref_c0)


def test_fused_lstm_final_states_get_relevance():
    """Relevance seeded at ``h_n`` and ``c_n`` (not at the output sequence)."""
    m = _fused_lstm(seed=2, layers=1, bidirectional=False)
    x = torch.randn(2, 4, 3, requires_grad=True)
    _, (hn, cn) = m(x)
    out = hn[0] + cn[0]
    _require_fused(out)
    rel = dynamiclrp.explain(out, x, relevance=torch.ones_like(out), rules="epsilon")
    w = [getattr(m, f"{n}_l0").detach().to(D) for n in ("weight_ih", "weight_hh")]
    b = [getattr(m, f"{n}_l0").detach().to(D) for n in ("bias_ih", "bias_hh")]
    xs = x.detach().to(D).transpose(0, 1)
    zero = torch.zeros(2, 5, dtype=D)
    # the add hn + cn splits signed (epsilon preset); then each state's share enters the layer
    h, c = _final_state(xs, w, b)
    r_h, r_c = _split(h, c, torch.ones(2, 5, dtype=D), "signed", EPS)
    ref = reference(
        LSTM, xs, *w, *b, zero, zero, torch.zeros(4, 2, 5, dtype=D), r_h, r_c, False, "signed", EPS
    )
    _assert_near(rel, ref[0].transpose(0, 1))


def _final_state(xs, w, b):
    h = c = torch.zeros(xs.shape[1], w[1].shape[1], dtype=D)
    for t in range(xs.shape[0]):
        i, f, g, o = (xs[t] @ w[0].T + b[0] + h @ w[1].T + b[1]).chunk(4, -1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * c.tanh()
    return h, c


def test_fused_lstm_weight_relevance():
    m = _fused_lstm(seed=3, layers=1, bidirectional=False)
    x = torch.randn(2, 5, 3, requires_grad=True)
    out, _ = m(x)
    _require_fused(out)
    r_seq = torch.randn(out.shape)
    rx, rw_ih, rw_hh = dynamiclrp.explain(out, [x, m.weight_ih_l0, m.weight_hh_l0], relevance=r_seq)
    w = [getattr(m, f"{n}_l0").detach().to(D) for n in ("weight_ih", "weight_hh")]
    b = [getattr(m, f"{n}_l0").detach().to(D) for n in ("bias_ih", "bias_hh")]
    zero = torch.zeros(2, 5, dtype=D)
    xs = x.detach().to(D).transpose(0, 1)
    ref = reference(
        LSTM,
        xs,
        *w,
        *b,
        zero,
        zero,
        r_seq.to(D).transpose(0, 1),
        zero,
        zero,
        False,
        "proportional",
        EPS,
    )
    _assert_near(rx, ref[0].transpose(0, 1))
    _assert_near(rw_ih, ref[5])
    _assert_near(rw_hh, ref[6])


def test_fused_lstm_batch_equals_rows():
    m = _fused_lstm(seed=4)
    head = nn.Linear(10, 3).eval()
    x = torch.randn(2, 5, 3)

    def explain(xx, target):
        xx = xx.clone().requires_grad_()
        logits = head(m(xx)[0][:, -1])
        _require_fused(logits)
        return dynamiclrp.explain(logits, xx, target=target)

    both = explain(x, [0, 2])
    for i, t in enumerate((0, 2)):
        _assert_near(both[i : i + 1], explain(x[i : i + 1], t).to(D), rel=1e-4)


def test_fused_lstm_without_bias():
    torch.manual_seed(5)
    m = nn.LSTM(3, 5, bias=False, batch_first=True).eval()
    x = torch.randn(2, 4, 3, requires_grad=True)
    out, _ = m(x)
    _require_fused(out)
    r_seq = torch.randn(out.shape)
    rel, report = dynamiclrp.explain(out, x, relevance=r_seq, return_report=True)
    w = [getattr(m, f"{n}_l0").detach().to(D) for n in ("weight_ih", "weight_hh")]
    zero = torch.zeros(2, 5, dtype=D)
    xs = x.detach().to(D).transpose(0, 1)
    ref = reference(
        LSTM,
        xs,
        *w,
        None,
        None,
        zero,
        zero,
        r_seq.to(D).transpose(0, 1),
        zero,
        zero,
        False,
        "proportional",
        EPS,
    )
    _assert_near(rel, ref[0].transpose(0, 1))
    # no bias, zero initial state: everything reaches the input (up to eps)
    assert abs(report.absorbed) < 1e-6
    assert rel.sum().item() == pytest.approx(r_seq.sum().item(), rel=1e-3, abs=1e-3)


def test_fused_lstm_replay_reproduces_the_saved_outputs():
    m = _fused_lstm(seed=6)
    x = torch.randn(2, 5, 3, requires_grad=True)
    out, _ = m(x)
    _require_fused(out)
    entry = OP_TABLE["MkldnnRnnLayerBackward0"]
    for fn in _nodes(out, "MkldnnRnnLayerBackward0"):
        inputs = [getattr(fn, entry.saved_inputs[k]) for k in range(7)]
        y, hy, cy = entry.replay(ReplayContext(fn, inputs))
        torch.testing.assert_close(y, fn._saved_result0)
        torch.testing.assert_close(hy, fn._saved_result1)
        torch.testing.assert_close(cy, fn._saved_result2)


def test_fused_lstm_through_a_promise():
    """``x + lstm(x)`` makes the add rule ask for the LSTM's output: read from the saved
    result (the node is an arg node for its outputs)."""
    m = _fused_lstm(seed=7, layers=1, bidirectional=False)
    lin = nn.Linear(3, 5)
    x = torch.randn(2, 4, 3, requires_grad=True)
    seq, _ = m(x)
    out = (lin(x) + seq).sum(1)
    _require_fused(out)
    rel, report = dynamiclrp.explain(out, x, target=0, return_report=True)
    assert torch.isfinite(rel).all()
    assert abs(report.residual) <= 1e-5 * abs(report.seeded) + 1e-6


def test_fused_lstm_misread_layout_fails_loudly(monkeypatch):
    """The rule checks its unrolled outputs against the node's saved output."""
    from dynamiclrp.rules import recurrent

    m = _fused_lstm(seed=8, layers=1, bidirectional=False)
    x = torch.randn(4, 4, 3, requires_grad=True)  # T == B, so a transposed reading fits
    out, _ = m(x)
    _require_fused(out)
    monkeypatch.setattr(recurrent, "_mkldnn_sequence_first", lambda ctx, x, batch: False)
    with pytest.raises(RuntimeError, match="does not reproduce"):
        dynamiclrp.explain(out, x, relevance=torch.ones_like(out))
