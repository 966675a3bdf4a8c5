"""Hugging Face transformer models built from configs with random weights (no downloads).

Oracles: the fused attention path (SDPA node, decomposed by the attention rule) must give the
same relevance as the eager path (bmm, softmax, bmm: the primitive rules), an independent route
through the rules; the books close; a batch equals its rows; a cached plan equals a fresh one.
"""

import pytest
import torch

import dynamiclrp

transformers = pytest.importorskip("transformers")

VOCAB = 50


def _configs():
    T = transformers
    small = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    return {
        "bert": (lambda: T.BertConfig(vocab_size=VOCAB, **small), T.BertForSequenceClassification),
        "roberta": (
            lambda: T.RobertaConfig(vocab_size=VOCAB, pad_token_id=1, **small),
            T.RobertaForSequenceClassification,
        ),
        "vit": (
            lambda: T.ViTConfig(image_size=16, patch_size=4, num_labels=3, **small),
            T.ViTForImageClassification,
        ),
        "t5-encoder": (
            lambda: T.T5Config(
                vocab_size=VOCAB, num_layers=2, d_model=32, d_ff=64, num_heads=4, d_kv=8
            ),
            T.T5EncoderModel,
        ),
        "gpt2": (
            lambda: T.GPT2Config(
                vocab_size=VOCAB,
                n_layer=2,
                n_embd=32,
                n_head=4,
                n_positions=32,
                bos_token_id=0,
                eos_token_id=0,
            ),
            T.GPT2LMHeadModel,
        ),
        "llama-gqa": (
            lambda: T.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, **small),
            T.LlamaForCausalLM,
        ),
    }


def build(name, attn="sdpa"):
    make_config, cls = _configs()[name]
    config = make_config()
    config._attn_implementation = attn
    torch.manual_seed(0)
    return cls(config).double().eval()


def run(model, name, inputs):
    """Forward from an input tensor we can explain; returns (output to explain, input)."""
    if name == "vit":
        return model(pixel_values=inputs).logits, inputs
    out = model(inputs_embeds=inputs)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return (out[:, -1] if out.dim() == 3 else out), inputs


def make_input(model, name, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return torch.randn(batch, 3, 16, 16, dtype=torch.float64, generator=g).requires_grad_()
    ids = torch.randint(2, VOCAB, (batch, 6), generator=g)
    return model.get_input_embeddings()(ids).detach().requires_grad_()


@pytest.mark.parametrize("name", ["bert", "roberta", "vit", "t5-encoder", "gpt2", "llama-gqa"])
def test_runs_and_books_close(name):
    model = build(name)
    x = make_input(model, name)
    out, x = run(model, name, x)
    rel, report = dynamiclrp.explain(out, x, target=int(out[0].argmax()), return_report=True)
    assert rel.shape == x.shape and torch.isfinite(rel).all()
    assert abs(report.residual) < 1e-9 * max(1.0, abs(report.seeded))
    assert report.inputs[0] == pytest.approx(float(rel.sum()), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ["bert", "vit", "t5-encoder"])
def test_fused_attention_equals_eager_attention(name):
    rels = []
    for attn in ("sdpa", "eager"):
        model = build(name, attn)
        x = make_input(model, name)
        out, x = run(model, name, x)
        # a tiny eps: the two paths apply the stabiliser before/after the 1/sqrt(d) scaling
        rels.append(dynamiclrp.explain(out, x, target=1, rules=dynamiclrp.Rules(eps=1e-12)))
    torch.testing.assert_close(rels[0], rels[1], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "bert"])
def test_batch_equals_rows_and_cached_equals_fresh(name):
    model = build(name)
    x = make_input(model, name, batch=3, seed=1)
    lrp = dynamiclrp.LRP()
    out, x = run(model, name, x)
    targets = [int(t) for t in out.argmax(1)]
    batch = lrp.explain(out, x, target=targets)
    again = lrp.explain(run(model, name, x)[0], x, target=targets)
    assert lrp.last_plan_cached
    torch.testing.assert_close(again, batch, rtol=1e-6, atol=1e-12)
    for i, t in enumerate(targets):
        xi = x[i : i + 1].detach().clone().requires_grad_()
        out_i, xi = run(model, name, xi)
        torch.testing.assert_close(
            batch[i : i + 1], dynamiclrp.explain(out_i, xi, target=t), rtol=1e-9, atol=1e-12
        )


@pytest.mark.parametrize("preset", ["attnlrp", "dynamiclrp"])
def test_gpt2_gelu_new_and_gelu_pytorch_tanh_give_one_map(preset):
    """GPT-2's default ``gelu_new`` writes the tanh GELU out of primitives
    (``0.5 * x * (1 + tanh(...))``), ``gelu_pytorch_tanh`` calls ``nn.GELU``: the same function
    and weights must give one map (issue 14: 0.11 apart under attnlrp before element-wise
    regions made the written-out GELU one activation)."""
    maps = []
    state = None
    for act in ("gelu_new", "gelu_pytorch_tanh"):
        cfg = transformers.GPT2Config(
            vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_positions=32, activation_function=act
        )
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg).double().eval()
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
        e = model.get_input_embeddings()(ids).detach().requires_grad_()
        out = model(inputs_embeds=e).logits[:, -1]
        maps.append(dynamiclrp.explain(out, e, target=int(out.argmax()), rules=preset))
    torch.testing.assert_close(maps[0], maps[1], rtol=1e-9, atol=1e-12)
