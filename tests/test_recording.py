"""dynamiclrp.record(): the forward values autograd keeps no trace of."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynamiclrp
from dynamiclrp import ValueRecoveryError

D = torch.float64


def test_frozen_relu_mlp_needs_and_uses_a_recording():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    x = torch.randn(4, 3, dtype=D, requires_grad=True)
    reference = dynamiclrp.explain(model(x), x, target=1)
    model.requires_grad_(False)
    with pytest.raises(ValueRecoveryError, match=r"dynamiclrp\.record\("):
        dynamiclrp.explain(model(x), x, target=1)
    with dynamiclrp.record() as rec:
        out = model(x)
    torch.testing.assert_close(out, model(x))  # recording changes nothing in the forward pass
    assert len(rec) == 2  # the two addmm outputs, nothing else
    torch.testing.assert_close(dynamiclrp.explain(out, x, target=1, recording=rec), reference)


def _names(t):
    from dynamiclrp.graph import build_graph

    return build_graph(t.grad_fn).names


def _attention(x, wq, wk, wv, mask_style):
    q, k, v = x @ wq, x @ wk, x @ wv
    s = q @ k.transpose(-1, -2) / 2.0
    keep = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    if mask_style == "masked_fill":
        s = s.masked_fill(~keep, float("-inf"))
    elif mask_style == "additive":
        s = s + torch.zeros(keep.shape, dtype=D).masked_fill(~keep, torch.finfo(D).min)
    elif mask_style == "where":
        s = torch.where(keep, s, float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("mask_style", ["masked_fill", "additive", "where"])
def test_eager_causal_attention_with_a_recording_equals_fused_sdpa(mask_style):
    """Two independent routes: the primitive rules on the recorded eager graph, and the fused
    SDPA node's rule (which handles the causal mask itself)."""
    torch.manual_seed(0)
    x = torch.randn(1, 5, 4, dtype=D, requires_grad=True)
    wq, wk, wv = (nn.Parameter(torch.randn(4, 4, dtype=D)) for _ in range(3))
    r = torch.randn(1, 5, 4, dtype=D)
    with dynamiclrp.record() as rec:
        eager = _attention(x, wq, wk, wv, mask_style)
    rules = dynamiclrp.Rules(eps=1e-12)
    if mask_style == "masked_fill":  # the -inf fill is rebuilt from the softmax's zeros
        unrecorded = _attention(x, wq, wk, wv, mask_style)
        rel = dynamiclrp.explain(unrecorded, x, relevance=r, rules=rules)
        torch.testing.assert_close(
            rel, dynamiclrp.explain(eager, x, relevance=r, recording=rec, rules=rules)
        )
    else:
        with pytest.raises(ValueRecoveryError, match="record"):
            dynamiclrp.explain(_attention(x, wq, wk, wv, mask_style), x, relevance=r)
    rel = dynamiclrp.explain(eager, x, relevance=r, recording=rec, rules=rules)
    # the fused CPU kernel (4-D inputs: on 3-D ones SDPA runs PyTorch's C++ math path, which adds
    # the causal mask as an unrecorded constant that record() cannot see), explained via its node
    x32, w32 = x.detach().float().requires_grad_(), [w.detach().float() for w in (wq, wk, wv)]
    q, k, v = ((x32 @ w).unsqueeze(1) for w in w32)  # 4-D: the CPU flash kernel's layout
    kernel = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5).squeeze(1)
    assert any("ScaledDotProductFlashAttention" in n for n in _names(kernel))
    torch.testing.assert_close(kernel.double(), eager, rtol=1e-5, atol=1e-5)
    rel32 = dynamiclrp.explain(kernel, x32, relevance=r.float())
    torch.testing.assert_close(rel32.double(), rel, rtol=1e-3, atol=1e-4)


def test_a_recorded_value_is_a_copy_that_in_place_ops_do_not_change():
    x = torch.randn(3, dtype=D, requires_grad=True)
    with dynamiclrp.record() as rec:
        h = x.exp() + 1.0  # the sum must be recorded: nothing saves it
        out = h * 2.0
    expected_h = h.detach().clone()
    with torch.no_grad():
        h.add_(5.0)
    rel = dynamiclrp.explain(out, x, relevance=torch.ones(3, dtype=D), recording=rec)
    e = x.detach().exp()
    torch.testing.assert_close(rel, e / (e + 1.0))
    assert torch.equal(expected_h, e + 1.0)


def test_recording_of_another_graph_is_ignored():
    x = torch.randn(3, dtype=D, requires_grad=True)
    with dynamiclrp.record() as rec:
        (x.exp() + 1.0).sum()
    y = x.exp() * 3.0
    rel = dynamiclrp.explain(y, x, relevance=torch.ones(3, dtype=D), recording=rec)
    torch.testing.assert_close(rel, torch.ones(3, dtype=D))


def _frozen_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),  # overwrites the batch-norm output the recording keeps
        nn.Conv2d(4, 3, 3),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 2),
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].bias.uniform_(-1, 1)
    return model.eval()


def test_frozen_cnn_with_in_place_relu():
    model = _frozen_cnn()
    x = torch.randn(2, 2, 6, 6, dtype=D, requires_grad=True)
    reference = dynamiclrp.explain(model(x), x, target=0)
    model.requires_grad_(False)
    with dynamiclrp.record() as rec:
        out = model(x)
    torch.testing.assert_close(dynamiclrp.explain(out, x, target=0, recording=rec), reference)


def test_record_model_unfreezes_during_the_forward_only():
    """F.multi_head_attention_forward is a composite the recording cannot look into: its frozen
    projections are recorded by autograd when record(model) unfreezes them for the forward."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    x = torch.randn(1, 5, 8, dtype=D, requires_grad=True)
    r = torch.randn(1, 5, 8, dtype=D)
    reference = dynamiclrp.explain(attn(x, x, x, need_weights=False)[0], x, relevance=r)
    attn.requires_grad_(False)
    with dynamiclrp.record() as rec:
        out = attn(x, x, x, need_weights=False)[0]
    with pytest.raises(ValueRecoveryError, match=r"record\(model\)"):
        dynamiclrp.explain(out, x, relevance=r, recording=rec)
    with dynamiclrp.record(attn) as rec:
        assert all(p.requires_grad for p in attn.parameters())
        out = attn(x, x, x, need_weights=False)[0]
    assert not any(p.requires_grad for p in attn.parameters())
    torch.testing.assert_close(dynamiclrp.explain(out, x, relevance=r, recording=rec), reference)


def _sdpa_call(layout: str):
    """Inputs and keyword arguments of one SDPA call, the mask drawn from the layout's name."""
    torch.manual_seed(3)
    heads_kv = 2 if layout == "gqa" else 4
    shape = (1, 5, 8) if layout == "3d_causal" else (2, 4, 5, 8)
    q = torch.randn(shape, dtype=D, requires_grad=True)
    wk = torch.randn(8, 8, dtype=D)
    kv_shape = (2, heads_kv, 5, 8) if layout != "3d_causal" else shape
    k = (q[..., :heads_kv, :, :] if layout == "gqa" else q) @ wk
    k = k.reshape(kv_shape)
    kwargs = {}
    if layout in ("3d_causal", "gqa"):
        kwargs = dict(is_causal=True, enable_gqa=layout == "gqa")
    elif layout == "bool_mask":
        mask = torch.rand(5, 5) > 0.4
        kwargs = dict(attn_mask=mask | torch.eye(5, dtype=torch.bool))
    else:
        kwargs = dict(attn_mask=torch.randn(5, 5, dtype=D))
    return q, k, kwargs


@pytest.mark.parametrize("add", ["proportional", "signed"])
@pytest.mark.parametrize("layout", ["3d_causal", "gqa", "bool_mask", "float_mask"])
def test_sdpa_math_path_with_a_recording_equals_the_fused_kernel(layout, add):
    """SDPA's C++ math path (forced here; CUDA takes it for float32 grouped-query attention,
    multi-query attention or 3-D inputs) adds its mask inside C++, where autograd keeps no trace of
    it; record() rebuilds ``scores + mask`` from the call's arguments. Oracle: the fused kernel's
    own node, explained by its own rule. A float mask's add follows ``Rules.add`` in both (the
    epsilon is too small to differ between the fused rule's one stabilised denominator and the
    math path's two). 3-D inputs, which the fused kernels refuse, are compared with the same
    call on 4-D ones."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, kwargs = _sdpa_call(layout)
    rules = dynamiclrp.Rules(add=add, eps=1e-12)

    def explain(backends, to_4d=False):
        with dynamiclrp.record() as rec, sdpa_kernel(backends):
            q4, k4 = (q[None], k[None]) if to_4d else (q, k)
            out = F.scaled_dot_product_attention(q4, k4, k4 * 0.5 + 1.0, **kwargs)
        r = torch.linspace(-1, 2, out.numel(), dtype=D).reshape(out.shape)
        return out, dynamiclrp.explain(out, q, relevance=r, recording=rec, rules=rules)

    math_out, math_rel = explain([SDPBackend.MATH])
    fused_out, fused_rel = explain([SDPBackend.FLASH_ATTENTION], to_4d=q.dim() == 3)
    assert "ScaledDotProduct" not in type(math_out.grad_fn).__name__  # really the math path
    assert "ScaledDotProduct" in type(fused_out.grad_fn).__name__
    torch.testing.assert_close(math_rel, fused_rel, rtol=1e-9, atol=1e-9)


def test_sdpa_math_path_without_a_recording_asks_for_one():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, kwargs = _sdpa_call("3d_causal")
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, k, **kwargs)
    with pytest.raises(ValueRecoveryError, match=r"dynamiclrp\.record\(model\) as rec"):
        dynamiclrp.explain(out, q, relevance=torch.ones_like(out))


def test_an_op_the_recording_did_not_see_is_named_with_the_likely_causes():
    """A recording of one forward pass cannot answer for another: the error says what can hide an
    op from the recording (a C++ composite, or another forward pass)."""
    x = torch.randn(3, 4, dtype=D, requires_grad=True)
    w = torch.randn(4, 4, dtype=D)
    with dynamiclrp.record() as rec:
        (x @ w + 1.0).sum()
    out = (x @ w + torch.ones(4, dtype=D)).relu() @ w  # not under the recording
    with pytest.raises(ValueRecoveryError, match="C\\+\\+ composite.*other than the one recorded"):
        dynamiclrp.explain(out, x, relevance=torch.ones_like(out), recording=rec)
