"""Public API: targets, seeds, return types, errors, and leaving no state behind."""

import gc
import weakref

import pytest
import torch
from torch import nn

import dynamiclrp
from dynamiclrp import GraphError, TargetError, UncoveredOpError

torch.manual_seed(0)


def mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4)).double()


def lrp0_expected(model, x, seed):
    """Independent oracle: on a ReLU net, LRP-0 (eps -> 0, biases absorbing) of the epsilon rule
    equals the layer-wise formula R_in = x * W^T (R / z); computed here layer by layer."""
    lin1, _, lin2 = model
    with torch.no_grad():
        a1 = x @ lin1.weight.T + lin1.bias
        h = a1.relu()
        z2 = h @ lin2.weight.T + lin2.bias
        r_h = h * ((seed / z2) @ lin2.weight)
        r_x = x * ((r_h / a1) @ lin1.weight)
    return r_x


def test_target_int_seeds_one_class_per_row():
    model = mlp()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    out = model(x)
    rel = dynamiclrp.explain(out, x, target=2, rules=dynamiclrp.Rules(eps=1e-12))
    seed = torch.zeros_like(out)
    seed[:, 2] = out[:, 2].detach()
    torch.testing.assert_close(rel, lrp0_expected(model, x.detach(), seed), rtol=1e-7, atol=1e-10)


def test_target_per_row_and_tensor_and_negative():
    model = mlp()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    rules = dynamiclrp.Rules(eps=1e-12)
    seed = torch.zeros(3, 4, dtype=torch.float64)
    out = model(x)
    for row, k in enumerate([0, 3, 1]):
        seed[row, k] = out[row, k].detach()
    expected = lrp0_expected(model, x.detach(), seed)
    for target in ([0, 3, 1], torch.tensor([0, 3, 1]), torch.tensor([0, -1, 1])):
        rel = dynamiclrp.explain(model(x), x, target=target, rules=rules)
        torch.testing.assert_close(rel, expected, rtol=1e-7, atol=1e-10)


def test_target_none_seeds_the_output_and_relevance_seed():
    model = mlp()
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    rules = dynamiclrp.Rules(eps=1e-12)
    out = model(x)
    rel = dynamiclrp.explain(out, x, rules=rules)
    torch.testing.assert_close(rel, lrp0_expected(model, x.detach(), out.detach()))
    seed = torch.randn(2, 4, dtype=torch.float64)
    rel = dynamiclrp.explain(model(x), x, relevance=seed, rules=rules)
    torch.testing.assert_close(rel, lrp0_expected(model, x.detach(), seed))


def test_batch_equals_each_row_alone():
    model = mlp()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    targets = [1, 0, 3, 2]
    batch = dynamiclrp.explain(model(x), x, target=targets)
    for i, t in enumerate(targets):
        xi = x[i : i + 1].detach().clone().requires_grad_()
        row = dynamiclrp.explain(model(xi), xi, target=t)
        torch.testing.assert_close(batch[i : i + 1], row, rtol=1e-10, atol=1e-12)


def test_returns_tuple_for_sequence_inputs_with_dtype_and_shape():
    model = mlp()
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    out = model(x)
    rels = dynamiclrp.explain(out, [x, model[0].weight], target=0)
    assert isinstance(rels, tuple) and len(rels) == 2
    assert rels[0].shape == x.shape and rels[0].dtype == x.dtype
    assert rels[1].shape == model[0].weight.shape
    assert not rels[0].requires_grad


@pytest.mark.parametrize(
    "target, message",
    [
        (4, "out of range"),
        (-5, "out of range"),
        ([0, 1], "entries but the output has 3 rows"),
        (1.5, "must be None, an int"),
        (True, "not a bool"),
        (torch.tensor([0.0, 1.0, 2.0]), "1-D integer tensor"),
    ],
)
def test_bad_targets_are_rejected(target, message):
    model = mlp()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TargetError, match=message):
        dynamiclrp.explain(model(x), x, target=target)


def test_target_on_3d_output_asks_to_slice_first():
    x = torch.randn(2, 6, 5, requires_grad=True)
    out = nn.Linear(5, 7)(x)
    with pytest.raises(TargetError, match=r"logits\[:, -1\]"):
        dynamiclrp.explain(out, x, target=3)
    # slicing first works and seeds one position only
    rel = dynamiclrp.explain(out[:, -1], x, target=3)
    assert rel[:, :-1].abs().sum() == 0 and rel[:, -1].abs().sum() > 0


def test_bad_relevance_seed_and_both_given():
    model = mlp()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TargetError, match="shape"):
        dynamiclrp.explain(model(x), x, relevance=torch.ones(3, 5))
    with pytest.raises(TargetError, match="either"):
        dynamiclrp.explain(model(x), x, target=1, relevance=torch.ones(3, 4))


def test_graph_errors():
    model = mlp()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    other = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        detached = model(x)
    with pytest.raises(GraphError, match="no grad_fn"):
        dynamiclrp.explain(detached, x)
    with pytest.raises(GraphError, match="not part of the output's graph"):
        dynamiclrp.explain(model(x), other)
    with pytest.raises(GraphError, match="does not require grad"):
        dynamiclrp.explain(model(x), torch.randn(3, 5))
    with pytest.raises(GraphError, match="empty"):
        dynamiclrp.explain(model(x), [])


def test_uncovered_ops_listed_before_propagation():
    x = torch.randn(4, 3, requires_grad=True)
    # (logcumsumexp, the first example here, has a rule now)
    y = x.sum(1) + torch.linalg.slogdet(x[1:, :]).logabsdet + torch.linalg.det(x[:3, :3])
    with pytest.raises(UncoveredOpError) as err:
        dynamiclrp.explain(y.unsqueeze(1), x)
    msg = str(err.value)
    assert "LinalgSlogdetBackward0 x1" in msg and "LinalgDetBackward0 x1" in msg
    assert "Nothing was propagated" in msg


def test_unknown_preset():
    with pytest.raises(ValueError, match="Unknown rules"):
        dynamiclrp.LRP("nope")


def test_call_leaves_model_and_flags_untouched_and_no_hooks_fire():
    model = mlp()
    model.train(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    fired = []
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    out = model(x)
    out.register_hook(lambda g: fired.append(g))
    grad_mode = torch.is_grad_enabled()
    dynamiclrp.explain(out, x, target=0)
    assert fired == []
    assert torch.is_grad_enabled() == grad_mode
    assert all(p.grad is None for p in model.parameters()) and x.grad is None
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # the graph is still usable afterwards: the call did not free or modify it
    (g,) = torch.autograd.grad(out[:, 0].sum(), x)
    assert g.shape == x.shape


def test_no_reference_to_the_graph_is_kept():
    model = mlp()
    lrp = dynamiclrp.LRP()
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    hidden = model[1](model[0](x))
    out = model[2](hidden)
    saved = weakref.ref(hidden)  # the graph keeps `hidden` alive (addmm saved it)
    del hidden
    lrp.explain(out, x, target=0)
    assert saved() is not None
    del out
    gc.collect()
    assert saved() is None, "the explainer kept the graph (or a saved activation) alive"
    assert lrp.last_plan_cached is False


def test_report_books_close_on_a_transformer_like_block():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    ln = nn.LayerNorm(8).double()
    attn = nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    head = nn.Linear(8, 3).double()
    h = ln(x)
    h = x + attn(h, h, h, need_weights=False)[0]
    out = head(h.mean(1))
    rel, report = dynamiclrp.explain(out, x, target=1, return_report=True)
    assert abs(report.residual) < 1e-9 * max(1.0, abs(report.seeded))
    assert report.inputs[0] == pytest.approx(float(rel.sum()))
    assert "seeded" in str(report)


def test_frozen_parameters_recover_biases_from_saved_outputs():
    """requires_grad_(False) hides biases from autograd; where a consumer saved the layer's
    output (GELU saves its input) the bias is recovered and the result is unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.GELU(),
        nn.Linear(5, 2),
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].bias.uniform_(-1, 1)
    model.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    reference = dynamiclrp.explain(model(x), x, target=1)
    model.requires_grad_(False)
    torch.testing.assert_close(dynamiclrp.explain(model(x), x, target=1), reference)


def test_frozen_bias_without_saved_output_fails_loudly():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).requires_grad_(False)
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(dynamiclrp.ValueRecoveryError, match=r"AddmmBackward0 .*bias does not"):
        dynamiclrp.explain(model(x), x, target=1)


def test_requesting_an_intermediate_tensor_does_not_move_the_first_layer():
    """Rules.first applies to the layers nearest to the earliest requested inputs: asking for an
    intermediate tensor as well leaves the input's relevance unchanged."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w1 = nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    w2 = nn.Parameter(torch.randn(2, 5, dtype=torch.float64))
    rules = dynamiclrp.Rules(first=dynamiclrp.ZPlus())
    alone = dynamiclrp.explain(torch.nn.functional.linear(x @ w1.t(), w2), x, 0, rules=rules)
    h = x @ w1.t()
    both = dynamiclrp.explain(torch.nn.functional.linear(h, w2), [x, h], 0, rules=rules)
    torch.testing.assert_close(both[0], alone)


# --- model-level entry point: LRP.attribute / dynamiclrp.attribute ------------------------------


def test_attribute_runs_the_model_and_equals_the_layerwise_oracle():
    model = mlp().eval()
    x = torch.randn(3, 5, dtype=torch.float64)  # does not require grad: a leaf copy is made
    rules = dynamiclrp.Rules(eps=1e-12)
    rel = dynamiclrp.LRP(rules).attribute(model, x, target=2)
    out = model(x)
    seed = torch.zeros_like(out)
    seed[:, 2] = out[:, 2].detach()
    torch.testing.assert_close(rel, lrp0_expected(model, x, seed), rtol=1e-7, atol=1e-10)
    assert rel.shape == x.shape and not x.requires_grad and rel.grad_fn is None


def test_attribute_on_a_frozen_model_records_and_leaves_its_state():
    """Frozen parameters need a recording: attribute makes it; flags, mode, state restored."""
    model = mlp().train(False)
    x = torch.randn(3, 5, dtype=torch.float64)
    reference = dynamiclrp.attribute(model, x, target=1)
    model.requires_grad_(False)
    model[2].bias.requires_grad_(True)  # a mix of flags, restored as they were
    flags = [p.requires_grad for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dynamiclrp.ValueRecoveryError, match="record"):
        xl = x.clone().requires_grad_()
        dynamiclrp.explain(model(xl), xl, target=1)
    rel, report = dynamiclrp.attribute(model, x, target=1, return_report=True)
    torch.testing.assert_close(rel, reference, rtol=1e-12, atol=1e-14)
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert abs(report.residual) < 1e-9


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b = nn.Linear(4, 3).double(), nn.Linear(2, 3).double()

    def forward(self, x, y, scale=1.0):
        return (self.a(x).relu() + self.b(y)) * scale, "extra"  # a tuple: the first is explained


def test_attribute_tuple_inputs_forward_kwargs_and_tuple_output():
    model = TwoInputs()
    x = torch.randn(2, 4, dtype=torch.float64)
    y = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)  # used as it is
    rel = dynamiclrp.attribute(model, (x, y), target=[0, 2], scale=3.0)
    assert isinstance(rel, tuple) and rel[0].shape == x.shape and rel[1].shape == y.shape
    xl = x.clone().requires_grad_()
    out = model(xl, y, scale=3.0)[0]
    want = dynamiclrp.explain(out, (xl, y), target=[0, 2])
    for got, exp in zip(rel, want, strict=True):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)
    assert y.grad is None and y.requires_grad and not x.requires_grad


def test_attribute_dict_inputs_hf_logits_and_a_recorded_mask():
    """A Hugging Face model (``.logits``), its embeddings passed by name, its attention mask as a
    forward kwarg, eager attention (an additive mask: needs the recording attribute makes)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    cfg._attn_implementation = "eager"
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    e = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    rel = dynamiclrp.attribute(model, {"inputs_embeds": e}, target=1, attention_mask=mask)
    assert set(rel) == {"inputs_embeds"} and rel["inputs_embeds"].shape == e.shape
    el = e.clone().requires_grad_()
    with pytest.raises(dynamiclrp.ValueRecoveryError, match="record"):  # the mask add
        dynamiclrp.explain(model(inputs_embeds=el, attention_mask=mask).logits, el, target=1)
    with dynamiclrp.record(model) as rec:
        out = model(inputs_embeds=el, attention_mask=mask).logits
    want = dynamiclrp.explain(out, el, target=1, recording=rec)
    torch.testing.assert_close(rel["inputs_embeds"], want, rtol=0, atol=0)


def test_attribute_refuses_what_it_cannot_explain():
    from dynamiclrp import InputError

    model = mlp()
    with pytest.raises(InputError, match=r"inputs\[0\] has dtype torch.int64.*inputs_embeds"):
        dynamiclrp.attribute(model, torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(InputError, match=r"returned a dict.*\.logits"):
        dynamiclrp.attribute(lambda x: {"y": model(x)}, torch.ones(2, 5, dtype=torch.float64))
    with pytest.raises(GraphError, match="inference_mode"), torch.inference_mode():
        dynamiclrp.attribute(model, torch.ones(2, 5, dtype=torch.float64))
