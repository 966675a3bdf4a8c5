"""Every precision: relevance in the input's dtype, float32 accumulation, float16 overflow."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dynamiclrp
from dynamiclrp.errors import NonFiniteRelevanceError
from dynamiclrp.precision import CastNode, PrecisionError

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


class Block(nn.Module):
    """Conv, batch norm, ReLU, layer norm, attention (SDPA), GELU, softmax head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.ln = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 24)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(2).transpose(1, 2)  # (B, 16, 8)
        q, k, v = self.qkv(self.ln(h)).chunk(3, -1)
        h = h + nn.functional.scaled_dot_product_attention(q, k, v)
        h = h + self.mlp(h)
        return self.head(h.mean(1))


def _model(dtype):
    torch.manual_seed(0)
    m = Block().eval()
    with torch.no_grad():  # non-trivial running statistics
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m.to(dtype)


def _explain(dtype, compute=None):
    m = _model(dtype)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)).to(dtype)
    x.requires_grad_(True)
    out = m(x)
    return dynamiclrp.explain(out, x, target=[1, 3], dtype=compute), out, m


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_relevance_comes_back_finite_in_the_input_dtype(dtype):
    rel, _, _ = _explain(dtype)
    assert rel.dtype == dtype and rel.shape == (2, 3, 4, 4)
    assert torch.isfinite(rel).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_maps_agree_with_float64(dtype):
    """The same weights in low precision give a map close to the float64 one (measured)."""
    ref, _, _ = _explain(torch.float64)
    for compute in (None, torch.float32):
        rel, _, _ = _explain(dtype, compute)
        cos = torch.nn.functional.cosine_similarity(rel.double().flatten(), ref.flatten(), dim=0)
        assert cos > 0.99, (dtype, compute, float(cos))


def test_float32_accumulation_equals_the_textbook_formula_on_bfloat16_values():
    """One linear layer in bf16: R_x = x * W^T (R / stab(z)) computed in float64 from the bf16
    forward values; float32 accumulation matches it to float32 rounding, bf16 does not."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 16, bias=False).to(torch.bfloat16)
    x = torch.randn(3, 64).to(torch.bfloat16).requires_grad_(True)
    z = lin(x)
    seed = z.detach().clone()
    x64, w64, z64 = x.detach().double(), lin.weight.detach().double(), z.detach().double()
    stab = torch.where(z64 >= 0, z64 + 1e-6, z64 - 1e-6)
    expected = x64 * ((seed.double() / stab) @ w64)
    lrp = dynamiclrp.LRP("epsilon", dtype=torch.float32)
    rel32 = lrp.explain(z, x, relevance=seed)
    assert rel32.dtype == torch.bfloat16  # returned in the input's dtype
    torch.testing.assert_close(rel32.double(), expected.to(torch.bfloat16).double())
    rel16 = dynamiclrp.explain(z, x, relevance=seed, rules="epsilon")
    err32 = (rel32.double() - expected).abs().max()
    err16 = (rel16.double() - expected).abs().max()
    assert err32 <= err16


def test_float16_overflow_is_reported_and_float32_accumulation_fixes_it():
    """Two cancelling paths of 300 * 300 = 90000 > 65504 (float16's maximum)."""
    m = nn.Sequential(nn.Linear(1, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[300.0], [300.0]]))
        m[2].weight.copy_(torch.tensor([[300.0, -299.0]]))
    m = m.half()
    x = torch.ones(1, 1, dtype=torch.float16, requires_grad=True)
    with pytest.raises(NonFiniteRelevanceError, match=r"float16.*overflow.*dtype=torch\.float32"):
        dynamiclrp.explain(m(x), x, target=0, rules="epsilon")
    rel = dynamiclrp.explain(m(x), x, target=0, rules="epsilon", dtype=torch.float32)
    # by hand: R_h = h * v * R / z = (90000, -89700) * 300 / 300, R_x = sum_j R_h_j = 300
    assert rel.dtype == torch.float16 and float(rel) == pytest.approx(300.0, rel=1e-3)


@pytest.mark.parametrize("bad", [torch.int64, torch.bool, "float32", torch.complex64])
def test_a_dtype_that_cannot_hold_relevance_is_refused(bad):
    with pytest.raises(PrecisionError, match="torch.float32"):
        dynamiclrp.LRP(dtype=bad)
    m = nn.Linear(2, 2)
    x = torch.ones(1, 2, requires_grad=True)
    with pytest.raises(PrecisionError, match="cannot hold relevance"):
        dynamiclrp.explain(m(x), x, target=0, dtype=bad)


def test_float32_accumulation_leaves_the_graph_and_model_untouched():
    m = _model(torch.bfloat16)
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(1, 3, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    out = m(x)
    dynamiclrp.explain(out, x, target=0, dtype=torch.float32)
    fn = out.grad_fn  # the head's addmm
    assert fn.name() == "AddmmBackward0"
    assert all(t.dtype == torch.bfloat16 for t in (fn._saved_mat1, fn._saved_mat2))
    for k, v in m.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k])
    # the graph still backpropagates (nothing was freed or replaced)
    (g,) = torch.autograd.grad(out[0, 0], x)
    assert g.dtype == torch.bfloat16


def test_cast_node_converts_saved_floats_once_and_passes_the_rest_through():
    lin = nn.Linear(3, 2).to(torch.bfloat16)
    x = torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True)
    fn = lin(x).grad_fn
    node = CastNode(fn, torch.float32)
    a = node._saved_mat1
    assert a.dtype == torch.float32 and node._saved_mat1 is a  # cached
    assert torch.equal(a, fn._saved_mat1.float())
    assert node.next_functions == fn.next_functions and node.name() == fn.name()


# --- regressions found by benchmarks/precision.py over the zoo --------------------------------


def _pool_net(x):
    torch.manual_seed(3)
    conv = nn.Conv2d(1, 4, 3).to(x.dtype)
    return torch.cat(
        [
            nn.functional.max_pool2d(conv(x), 2).flatten(1),
            nn.functional.adaptive_avg_pool2d(conv(x), 2).flatten(1),
            conv(x)[:, torch.tensor([0, 2])].flatten(1),  # IndexBackward0
        ],
        1,
    )


def _mixed_net(x):
    """T5-style RMSNorm in a bf16 model: bf16 * float32 statistic, cast back, float32 logits."""
    torch.manual_seed(4)
    lin1, lin2 = nn.Linear(4, 4).to(x.dtype), nn.Linear(4, 3).to(x.dtype)
    h = lin1(x)
    var = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
    h = (h * torch.rsqrt(var + 1e-6)).to(x.dtype)
    return lin2(h).float()


def _clamp_net(x):
    """T5 in float16 clamps with 0-d tensor bounds (ClampBackward0)."""
    torch.manual_seed(5)
    h = nn.Linear(4, 3).to(x.dtype)(x)
    c = torch.tensor(60000.0, dtype=x.dtype)
    return torch.clamp(h, min=-c, max=c)


def _lstm_net(x):
    """On the CPU a bf16 / fp32 nn.LSTM is one fused node (MkldnnRnnLayerBackward0)."""
    torch.manual_seed(6)
    return nn.LSTM(4, 8, batch_first=True).to(x.dtype)(x)[0][:, -1]


@pytest.mark.parametrize(
    ("net", "shape", "dtype", "compute", "ref_dtype"),
    [
        (_pool_net, (1, 1, 6, 6), torch.bfloat16, torch.float32, torch.float64),
        (_mixed_net, (2, 4), torch.bfloat16, None, torch.float64),
        (_mixed_net, (2, 4), torch.bfloat16, torch.float32, torch.float64),
        (_clamp_net, (2, 4), torch.float16, None, torch.float64),
        (_lstm_net, (1, 6, 4), torch.bfloat16, torch.float32, torch.float32),
    ],
    ids=["routing-f32acc", "mixed", "mixed-f32acc", "clamp-tensor-bounds", "fused-lstm-f32acc"],
)
def test_low_precision_graph_explains_close_to_the_reference(net, shape, dtype, compute, ref_dtype):
    """Each of these crashed once (dtype checks of a node's own backward, a float32 relevance
    sent into a bf16 matmul, a missing rule, a float32 tolerance on bf16 values); the reference
    is the same network built in a wider dtype (same seeds; the fused LSTM's reference is float32,
    where it is fused too)."""
    x64 = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xr = x64.to(ref_dtype).requires_grad_(True)
    ref = dynamiclrp.explain(net(xr), xr, target=0)
    x = x64.to(dtype).requires_grad_(True)
    rel = dynamiclrp.explain(net(x), x, target=0, dtype=compute)
    assert rel.dtype == dtype and torch.isfinite(rel).all()
    cos = torch.nn.functional.cosine_similarity(rel.double().flatten(), ref.double().flatten(), 0)
    assert cos > 0.98, float(cos)
