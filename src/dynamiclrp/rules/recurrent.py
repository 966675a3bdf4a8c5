"""Recurrent layers (LSTM, GRU, RNN) as fused autograd nodes.

A fused recurrent node runs a whole layer (one direction, every time step) in one kernel and saves
only its input, weights, initial state and outputs; the gates are not saved.  The rule unrolls
the recurrence again from the saved tensors (the gates are recomputed exactly as the forward
computed them) and propagates relevance backwards in time, step by step, with the LSTM rule of
Arras et al. 2017 ("Explaining recurrent neural network predictions in sentiment analysis"):

- gates are constants: a product ``gate * signal`` gives all its relevance to the signal
  (signal-take-all), the gate and its pre-activation get nothing;
- element-wise nonlinearities (``tanh``, the RNN's ``tanh``/``relu``) use the identity rule;
- the affine maps ``z = x W_ih^T + b_ih + h W_hh^T + b_hh`` use the epsilon rule
  ``R_x = x * ((R / stab(z)) W_ih)``, ``R_h = h * ((R / stab(z)) W_hh)``, the two biases absorb
  ``b * R / stab(z)``;
- a sum of two terms (the LSTM cell update, the GRU state update) splits like add
  (``Rules.add``): ``"proportional"`` (default preset) ``R_a = R |a| / (|a| + |b|)``, ``"signed"``
  (the other presets; Arras et al.'s epsilon rule) ``R_a = R a / stab(a + b)``.

Per time step ``t`` (in processing order; a reverse direction processes ``t = T-1 .. 0``), with
``h, c`` the state before the step and ``R_h'``, ``R_c'`` the relevance of the state after it (the
output ``y_t = h'`` and the next step's share added up), gate chunks in PyTorch's order:

LSTM, ``(i, f, g, o)``: ``z = x W_ih^T + b_ih + h W_hh^T + b_hh``, ``i, f, o = sigmoid``,
``g = tanh(z_g)``, ``c' = f * c + i * g``, ``h' = o * tanh(c')``::

    R_c'        += R_h'                                   (o * tanh(c'): all to c', tanh identity)
    R_fc, R_ig   = split(f * c, i * g; R_c')              (Rules.add)
    R_c          = R_fc                                   (f * c: all to c)
    G            = R_ig / stab(z_g)                       (i * g: all to g, tanh identity, epsilon)
    R_x_t        = x_t * (G W_ig),   R_h = h * (G W_hg),  R_b_ig = b_ig * G,  R_b_hg = b_hg * G

GRU, ``(r, z, n)``: ``r, u = sigmoid(...)`` (``u`` is PyTorch's update gate ``z``),
``n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn))``, ``h' = (1 - u) * n + u * h``; with ``r``
constant, ``n``'s pre-activation is affine in ``(x, h)``::

    R_n, R_uh    = split((1 - u) * n, u * h; R_h')        (Rules.add)
    G            = R_n / stab(z_n)
    R_x_t        = x_t * (G W_in),   R_h = R_uh + h * ((r * G) W_hn)
    R_b_in       = b_in * G,         R_b_hn = r * b_hn * G

RNN (``tanh`` or ``relu``): ``h' = act(z)``, ``G = R_h' / stab(z)``, ``R_x_t = x_t * (G W_ih)``,
``R_h = h * (G W_hh)``, biases ``b * G``.

After the first step, ``R_h`` and ``R_c`` are the relevance of the initial state ``hx, cx`` (0 when
the state is 0, PyTorch's default).  The rule conserves up to ``eps`` (and up to the all-zero
groups of the proportional split); biases and a constant initial state absorb their shares.  The
weights are constants; a weight's own relevance (epsilon, ``W_g * sum_t G_t^T x_t``, likewise for
``W_hh``), when requested, is outside the books like a contraction's.

On CPU, PyTorch (checked on 2.14.1) fuses only ``nn.LSTM``, and only in float32 / bfloat16
(oneDNN, ``MkldnnRnnLayerBackward0``: one node per layer and direction); float64, ``proj_size``
and packed sequences run as separate ops, each with its own rule.  ``nn.GRU`` and ``nn.RNN`` are
never fused on CPU; :func:`layer_relevance` implements them too (tested against a reference) for
a fused node of another backend, e.g. cuDNN's ``CudnnRnnBackward0`` (all layers and directions in
one node, weights as a flat list), which is not in the table yet: it was not tested on a GPU.
The saved input is sequence-first ``(T, B, I)`` even when the module is ``batch_first``
(``mkldnn_rnn`` transposes before calling the layer, yet saves ``batch_first=True``); the rule
checks its recomputed outputs against the node's saved output, so a layout, gate order or
direction it misreads fails loudly instead of explaining the wrong recurrence.

Note: the same ``nn.LSTM`` run in float64 (or with ``proj_size``) is recorded op by op and
explained by the generic rules, where a gated product is split half and half (uniform rule), not
signal-take-all; the two explanations differ.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .base import OpEntry, ReplayContext, RuleContext
from .linear import safe_divide

RNN_RELU, RNN_TANH, LSTM, GRU = 0, 1, 2, 3  # cuDNN / oneDNN mode numbers, as autograd saves them
_GATES = {RNN_RELU: 1, RNN_TANH: 1, LSTM: 4, GRU: 3}


class LayerRelevance(NamedTuple):
    """Relevance of one recurrent layer's inputs (:func:`layer_relevance`).

    ``x``: the input sequence, ``(T, B, I)``.  ``h0``, ``c0``: the initial state (``c0`` is
    ``None`` but for LSTM).  ``b_ih``, ``b_hh``: the biases' absorbed shares (``None`` without
    biases).  ``w_ih``, ``w_hh``: the weights' relevance, only when asked for (else ``None``).
    ``output``: the recomputed output sequence ``(T, B, H)`` (to check against the saved one).
    """

    x: Tensor
    h0: Tensor
    c0: Tensor | None
    b_ih: Tensor | None
    b_hh: Tensor | None
    w_ih: Tensor | None
    w_hh: Tensor | None
    output: Tensor


def split_sum(a: Tensor, b: Tensor, r: Tensor, add: str, eps: float) -> tuple[Tensor, Tensor]:
    """Relevance ``r`` of ``a + b`` split over the two terms like the add rule (``Rules.add``)."""
    if add == "signed":
        g = safe_divide(r, a + b, eps)
        return a * g, b * g
    if add != "proportional":
        raise ValueError(f"Rules.add must be 'proportional' or 'signed', got {add!r}")
    den = a.abs() + b.abs()
    ok = den > 0
    g = torch.where(ok, r / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(r))
    return a.abs() * g, b.abs() * g


def _chunk(w: Tensor | None, k: int, n: int) -> Tensor | None:
    """Rows ``k`` of ``n`` equal chunks of a stacked gate weight or bias (``None`` passes)."""
    return None if w is None else w.chunk(n, 0)[k]


def layer_relevance(
    mode: int,
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    h0: Tensor,
    c0: Tensor | None,
    r_out: Tensor,
    r_hy: Tensor | None = None,
    r_cy: Tensor | None = None,
    *,
    reverse: bool = False,
    eps: float = 1e-6,
    add: str = "proportional",
    weights: bool = False,
) -> LayerRelevance:
    """LRP through one recurrent layer, one direction (module docstring for the formulas).

    ``x`` is ``(T, B, I)``, ``h0``/``c0`` and ``r_hy``/``r_cy`` are ``(B, H)``, ``r_out`` is the
    relevance of the output sequence ``(T, B, H)``.  Weights and biases are PyTorch's
    (``weight_ih_l0`` ...), gates stacked in PyTorch's order.  ``weights=True`` also returns the
    weights' relevance.  Everything is computed in ``x``'s dtype.
    """
    if mode not in _GATES:
        raise NotImplementedError(f"recurrent mode {mode} is not LSTM, GRU, RNN_TANH or RNN_RELU")
    n = _GATES[mode]
    T = x.shape[0]
    order = range(T - 1, -1, -1) if reverse else range(T)
    zero = torch.zeros_like(h0)
    # forward: recompute every step's state and what its rule needs
    h, c = h0, (c0 if c0 is not None else zero)
    steps: list[tuple] = []
    outputs: list[Tensor | None] = [None] * T
    for t in order:
        zi = x[t] @ w_ih.T + (b_ih if b_ih is not None else 0)
        zh = h @ w_hh.T + (b_hh if b_hh is not None else 0)
        if mode == LSTM:
            gi, gf, gg, go = (zi + zh).chunk(4, -1)
            i, f, o, g = gi.sigmoid(), gf.sigmoid(), go.sigmoid(), gg.tanh()
            c_new = f * c + i * g
            h_new = o * c_new.tanh()
            steps.append((t, h, f * c, i * g, gg))
            c = c_new
        elif mode == GRU:
            ir, iu, in_ = zi.chunk(3, -1)
            hr, hu, hn = zh.chunk(3, -1)
            r, u = (ir + hr).sigmoid(), (iu + hu).sigmoid()
            zn = in_ + r * hn
            nn_ = zn.tanh()
            h_new = (1 - u) * nn_ + u * h
            steps.append((t, h, (1 - u) * nn_, u * h, zn, r))
        else:
            z = zi + zh
            h_new = z.tanh() if mode == RNN_TANH else z.relu()
            steps.append((t, h, z))
        outputs[t] = h = h_new
    # backward in time: relevance of the state after each step flows to x_t and the state before
    r_x = torch.zeros_like(x)
    r_h = r_hy if r_hy is not None else zero
    r_c = r_cy if r_cy is not None else zero
    gk = {LSTM: 2, GRU: 2}.get(mode, 0)  # the chunk that carries relevance: g, n, the only one
    wi, wh = _chunk(w_ih, gk, n), _chunk(w_hh, gk, n)
    bi, bh = _chunk(b_ih, gk, n), _chunk(b_hh, gk, n)
    rb_i = rb_h = None if b_ih is None else torch.zeros_like(bi)
    gw_i = torch.zeros_like(wi) if weights else None
    gw_h = torch.zeros_like(wh) if weights else None
    for step in reversed(steps):
        t, h = step[0], step[1]
        r_h = r_h + r_out[t]
        scale_h = None  # the constant the hidden path is multiplied by (GRU's reset gate)
        if mode == LSTM:
            _, _, fc, ig, z = step
            r_fc, r_ig = split_sum(fc, ig, r_c + r_h, add, eps)
            r_c, g, r_h = r_fc, safe_divide(r_ig, z, eps), zero
        elif mode == GRU:
            _, _, un, uh, z, scale_h = step
            r_n, r_h = split_sum(un, uh, r_h, add, eps)
            g = safe_divide(r_n, z, eps)
        else:
            z = step[2]
            g, r_h = safe_divide(r_h, z, eps), zero
        gh = g if scale_h is None else scale_h * g
        r_x[t] = x[t] * (g @ wi)
        r_h = r_h + h * (gh @ wh)
        if rb_i is not None:
            rb_i = rb_i + (bi * g).sum(0)
            rb_h = rb_h + (bh * gh).sum(0)
        if weights:
            gw_i = gw_i + g.T @ x[t]
            gw_h = gw_h + gh.T @ h

    def full(part: Tensor | None, like: Tensor | None) -> Tensor | None:
        """A share of chunk ``gk`` placed in the stacked shape (the gates' chunks get 0)."""
        if part is None or like is None:
            return None
        out = torch.zeros_like(like)
        _chunk(out, gk, n).copy_(part)
        return out

    return LayerRelevance(
        r_x,
        r_h,
        r_c if mode == LSTM else None,
        full(rb_i, b_ih),
        full(rb_h, b_hh),
        full(wi * gw_i, w_ih) if weights else None,
        full(wh * gw_h, w_hh) if weights else None,
        torch.stack(outputs),  # type: ignore[arg-type]
    )


# --- oneDNN (CPU) fused LSTM layer ---------------------------------------------------------------


def _mkldnn_sequence_first(ctx: RuleContext, x: Tensor, batch: int) -> bool:
    """Whether the saved input is ``(T, B, I)``: always in eager PyTorch (module docstring); the
    ``batch_first`` flag is honoured only where the shape says so unambiguously."""
    if not ctx.saved("_saved_batch_first"):
        return True
    return not (x.shape[0] == batch and x.shape[1] != batch)


def _mkldnn_rnn_layer(ctx: RuleContext):
    fn = ctx.fn
    if list(ctx.saved("_saved_batch_sizes")):
        raise NotImplementedError(
            f"{fn.name()} (node {ctx.idx}) ran on a packed sequence, which this rule does not "
            "unroll. Explain padded sequences instead."
        )
    x, w_ih, w_hh = ctx.input_value(0), ctx.input_value(1), ctx.input_value(2)
    hx, cx = ctx.input_value(5), ctx.input_value(6)
    has_bias = bool(ctx.saved("_saved_has_biases"))
    b_ih = ctx.input_value(3) if has_bias else None
    b_hh = ctx.input_value(4) if has_bias else None
    dtype = torch.promote_types(x.dtype, torch.float32)
    vals = [None if v is None else v.to(dtype) for v in (x, w_ih, w_hh, b_ih, b_hh, hx, cx)]
    xs, w_ih_, w_hh_, b_ih_, b_hh_, hx_, cx_ = vals
    seq_first = _mkldnn_sequence_first(ctx, x, hx.shape[-2])
    r_out = ctx.relevance[0].to(dtype)
    if not seq_first:
        xs, r_out = xs.transpose(0, 1), r_out.transpose(0, 1)
    res = layer_relevance(
        int(ctx.saved("_saved_mode")),
        xs,
        w_ih_,
        w_hh_,
        b_ih_,
        b_hh_,
        hx_,
        cx_,
        r_out,
        ctx.relevance[1].to(dtype),
        ctx.relevance[2].to(dtype),
        reverse=bool(ctx.saved("_saved_reverse")),
        eps=ctx.eps,
        add=ctx.rules.add,
        weights=ctx.wanted[1] or ctx.wanted[2],
    )
    saved_out = fn._saved_result0
    y = res.output if seq_first else res.output.transpose(0, 1)
    # the dtype the layer computed in (``saved_out`` reads as float32 under ``dtype=``)
    tol = 1e-4 + 16 * torch.finfo(fn._input_metadata[0].dtype).eps
    if not torch.allclose(y.to(saved_out.dtype), saved_out, rtol=tol, atol=tol):
        err = float((y - saved_out.to(dtype)).abs().max())
        raise RuntimeError(
            f"{fn.name()} (node {ctx.idx}): unrolling the layer from its saved tensors does not "
            f"reproduce its saved output (max difference {err:.3g}): this PyTorch version lays out "
            "the fused layer's input, gates or direction differently from what the rule assumes."
        )
    r_x = res.x if seq_first else res.x.transpose(0, 1)
    outs: list[Tensor | None] = [r_x.to(x.dtype), None, None, None, None, None, None]
    outs[3] = None if res.b_ih is None else res.b_ih.to(x.dtype)
    outs[4] = None if res.b_hh is None else res.b_hh.to(x.dtype)
    outs[5] = res.h0.to(hx.dtype)
    outs[6] = res.c0.to(cx.dtype)
    for slot, rw in ((1, res.w_ih), (2, res.w_hh)):
        if ctx.wanted[slot] and rw is not None:
            ctx.parameter[slot] = rw.to(w_ih.dtype)
    return outs


def _mkldnn_rnn_layer_replay(c: ReplayContext):
    """The node's forward: ``aten.mkldnn_rnn_layer`` with the node's saved arguments."""
    fn = c.fn
    x, w0, w1, w2, w3, hx, cx = c.inputs
    if w2 is None:  # no biases: the op still takes two tensors there
        w2, w3 = fn._saved_weight2, fn._saved_weight3
    y, hy, cy, _ = torch.ops.aten.mkldnn_rnn_layer(
        x,
        w0,
        w1,
        w2,
        w3,
        hx,
        cx,
        bool(fn._saved_reverse),
        list(fn._saved_batch_sizes),
        int(fn._saved_mode),
        int(fn._saved_hidden_size),
        int(fn._saved_num_layers),
        bool(fn._saved_has_biases),
        bool(fn._saved_bidirectional),
        bool(fn._saved_batch_first),
        False,
    )
    return (y, hy, cy)


TABLE = {
    "MkldnnRnnLayerBackward0": OpEntry(
        "recurrent",
        _mkldnn_rnn_layer,
        saved_inputs={
            0: "_saved_input",
            1: "_saved_weight0",
            2: "_saved_weight1",
            3: "_saved_weight2",
            4: "_saved_weight3",
            5: "_saved_hx_",
            6: "_saved_cx_",
        },
        saved_outputs={0: "_saved_result0", 1: "_saved_result1", 2: "_saved_result2"},
        replay=_mkldnn_rnn_layer_replay,
    ),
}
