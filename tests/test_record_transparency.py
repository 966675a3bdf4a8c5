"""record() is transparent: code that runs without it runs with it, and computes the same.

The recording reads metadata of the tensors ops return (``grad_fn``, ``requires_grad``,
``_version``): for no tensor may that raise where the unrecorded code does not (a view made under
no_grad whose base was written since, inference tensors, tensor subclasses, nested tensors), and it
must change nothing: same values bit for bit, same graph, same gradients, same random stream.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynamiclrp
from dynamiclrp import zoo
from dynamiclrp.graph import build_graph

D = torch.float64
transformers = pytest.importorskip("transformers")


def test_embedding_with_padding_idx_builds_under_record():
    """nn.Embedding zeroes its padding row through a view made under no_grad: reading that view's
    grad_fn raises (the error was torch's "A view was created in no_grad mode ...")."""
    with dynamiclrp.record() as rec:
        emb = nn.Embedding(10, 4, padding_idx=0)
        out = emb(torch.tensor([[0, 3, 5]]))
    assert torch.equal(emb.weight[0], torch.zeros(4))
    assert torch.equal(out[0, 0], torch.zeros(4))
    assert len(rec) == 0


def _tiny_bart():
    cfg = transformers.BartConfig(
        vocab_size=40,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
    )
    return transformers.BartForConditionalGeneration(cfg).eval()


def test_bart_builds_and_runs_under_record():
    torch.manual_seed(0)
    plain = _tiny_bart()
    ids = torch.tensor([[0, 5, 7, 9, 2]])
    torch.manual_seed(0)
    with dynamiclrp.record():
        recorded = _tiny_bart()
        out = recorded(input_ids=ids, decoder_input_ids=ids).logits
    for (n, p), (_, q) in zip(plain.named_parameters(), recorded.named_parameters(), strict=True):
        assert torch.equal(p, q), n  # the same initialisation: no random number drawn
    assert torch.equal(out, plain(input_ids=ids, decoder_input_ids=ids).logits)


def test_no_grad_views_written_in_place_and_read_later():
    """Views made under no_grad: written in place when nothing requires grad, their base written
    in grad mode (the view's grad_fn now raises) and the view's metadata read afterwards."""
    y = torch.randn(4, dtype=D, requires_grad=True)
    with dynamiclrp.record() as rec:
        x = torch.randn(4, dtype=D)
        with torch.no_grad():
            v = x[:2]
            w = y[1:3]
            w.mul_(1.0)  # an in-place op inside no_grad on a view of a leaf
        v.add_(1.0)  # allowed: nothing requires grad
        h = y * 2
        with torch.no_grad():
            hv = h[:2]
        h.mul_(3.0)  # hv's grad_fn now raises, in any code
        shape, dims = hv.shape, hv.dim()  # ... but its shape does not, with or without record()
        out = (h + x).sum()
    assert shape == (2,) and dims == 1
    assert torch.equal(out, (y.detach() * 6 + x).sum())
    assert len(rec) == 1  # h + x: x does not require grad


def test_inference_mode_and_inference_tensors_under_record():
    lin = nn.Linear(3, 2).double()
    x = torch.randn(2, 3, dtype=D, requires_grad=True)
    with dynamiclrp.record() as rec:
        with torch.inference_mode():
            c = lin(torch.randn(2, 3, dtype=D)) + 1.0  # inference tensors, no node
            c.add_(2.0)
        assert c.is_inference()
        out = lin(x) * c.clone()  # an inference tensor used as a constant in grad mode
    assert out.grad_fn is not None and len(rec) == 0
    torch.testing.assert_close(out, lin(x) * c.clone())


def test_parameter_reassignment_and_model_surgery_under_record():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.randn(2, 3, dtype=D, requires_grad=True)
    with dynamiclrp.record() as rec:
        model[0].weight = nn.Parameter(torch.ones(4, 3, dtype=D))
        model[2].bias = nn.Parameter(model[2].bias.detach() * 0)
        model[0].bias.data.fill_(0.5)
        model[0].bias.requires_grad_(False)  # a frozen bias: its add is recorded
        out = model(x)
    ref = model(x)
    assert torch.equal(out, ref)
    assert isinstance(model[0].weight, nn.Parameter)
    rel = dynamiclrp.explain(out, x, target=0, recording=rec)
    with pytest.raises(dynamiclrp.ValueRecoveryError, match="record"):
        dynamiclrp.explain(ref, x, target=0)
    assert rel.shape == x.shape and torch.isfinite(rel).all()


class Logged(torch.Tensor):
    """A tensor subclass that counts the torch functions it sees."""

    calls = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclass_sees_no_extra_call_under_record():
    def run():
        x = torch.randn(3, 4, dtype=D).as_subclass(Logged).requires_grad_()
        w = torch.randn(4, 2, dtype=D)
        h = (x @ w + 1.0).relu()
        h[:, 0] = 2.0
        return h.sum(), x

    torch.manual_seed(0)
    Logged.calls = 0
    plain, _ = run()
    plain_calls = Logged.calls
    torch.manual_seed(0)
    Logged.calls = 0
    with dynamiclrp.record() as rec:
        recorded, _ = run()
    assert Logged.calls == plain_calls
    assert torch.equal(plain.as_subclass(torch.Tensor), recorded.as_subclass(torch.Tensor))
    assert len(rec) >= 1  # the add of a constant and the slice write are kept


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_non_tensor_and_nested_outputs_under_record():
    x = torch.randn(4, 3, dtype=D, requires_grad=True)
    with dynamiclrp.record() as rec:
        size, items = x.size(), x.detach().tolist()
        parts = torch.split(x + 1.0, 2)  # a tuple of views of an unrecorded add
        rows = list((x * 2.0).unbind(0))
        values, vectors = torch.linalg.eigh(x.T @ x)  # a named tuple
        counts = torch.unique(torch.tensor([1, 1, 2]), return_counts=True)
        nested = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(1, 3)])
        nested_out = nested + 1.0
        sparse = x.detach().to_sparse().requires_grad_()
        sparse_out = sparse * 2.0 + torch.ones(4, 3, dtype=D).to_sparse()  # no reshape exists
        scalar = (x.sum() + 1.0).item()
    assert size == (4, 3) and len(items) == 4 and len(parts) == 2 and len(rows) == 4
    assert values.shape == (3,) and vectors.shape == (3, 3) and counts[1].tolist() == [2, 1]
    assert nested_out.is_nested and sparse_out.is_sparse and isinstance(scalar, float)
    assert len(rec) == 2  # x + 1.0 and x.sum() + 1.0 (a multiply by a scalar is not kept)


# -- the property: with and without record(), bit-identical -------------------------------------

SMALL = ["lstm", "gru", "transformer_encoder", "multihead_attention", "unet", "gpt2_eager", "bert"]


def _graph_names(t):
    return build_graph(t.grad_fn).names


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("train", [False, True])
def test_outputs_with_and_without_record_are_bit_identical(name, train):
    """Same output bits, same graph, same gradient, same random stream (train mode draws dropout
    masks: a recording that consumed random numbers would change them)."""
    model = zoo.build(name)
    model.train(train)
    kwargs = zoo.example(name, model, batch=2)
    entry = zoo.ZOO[name]
    x = kwargs[entry.explained].detach().double().requires_grad_()
    kwargs[entry.explained] = x

    def run(recorded: bool):
        torch.manual_seed(1)
        if recorded:
            with dynamiclrp.record():
                out = entry.select(model(**kwargs))
        else:
            out = entry.select(model(**kwargs))
        (grad,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
        return out, grad, torch.rand(())

    out, grad, after = run(False)
    out_r, grad_r, after_r = run(True)
    assert torch.equal(out, out_r) and torch.equal(grad, grad_r) and torch.equal(after, after_r)
    assert _graph_names(out) == _graph_names(out_r)
    assert out_r.requires_grad and not any(
        p.grad is not None for p in model.parameters()
    )  # nothing accumulated


def test_sdpa_call_under_record_is_unchanged():
    q = torch.randn(2, 5, 8, dtype=D, requires_grad=True)
    mask = torch.rand(5, 5) > 0.3
    mask |= torch.eye(5, dtype=torch.bool)
    torch.manual_seed(0)
    plain = F.scaled_dot_product_attention(q, q, q, attn_mask=mask, dropout_p=0.2)
    torch.manual_seed(0)
    with dynamiclrp.record():
        recorded = F.scaled_dot_product_attention(q, q, q, attn_mask=mask, dropout_p=0.2)
    assert torch.equal(plain, recorded)
