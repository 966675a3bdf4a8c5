"""Oracle: the ``"attnlrp"`` and ``"cp-lrp"`` presets against LxT 2.1's efficient implementation.

LxT needs transformers 4.52.4 and patches it for good, so its relevances were computed once in a
separate environment by ``tests/lxt_oracle.py`` and saved under ``tests/data/lxt/`` with each
tiny random model's config, state dict, input embeddings, target and logits (float64). Here
each model is rebuilt with the installed transformers, on the fused (``sdpa``) and the eager
attention path, and explained with the matching preset; the full relevance tensors at the input
embeddings must agree to ``max |dynamiclrp - LxT| / max |LxT| <= 1e-5`` (measured: 2e-10 to
2e-7, the rest being the float32 casts inside the models' RMSNorm and softmax).
"""

from __future__ import annotations

import os

import pytest
import torch

import dynamiclrp

transformers = pytest.importorskip("transformers")

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "lxt")
NAMES = ("llama", "qwen2", "qwen3", "gemma3", "gpt2", "bert")
METHODS = ("attnlrp", "cp-lrp")
TOL = 1e-5


def _load(name: str, attn: str):
    data = torch.load(os.path.join(DATA, f"{name}.pt"), weights_only=True)
    cfg_cls = getattr(transformers, data["config_class"], None)
    model_cls = getattr(transformers, data["model_class"], None)
    if cfg_cls is None or model_cls is None:
        pytest.skip(
            f"transformers {transformers.__version__} has no "
            f"{data['config_class']} / {data['model_class']}"
        )
    try:
        config = cfg_cls.from_dict(data["config"])
        config._attn_implementation = attn
        model = model_cls(config).double().eval()
        result = model.load_state_dict(data["state_dict"], strict=False)
    except Exception as err:  # an incompatible config or layout: say exactly why
        pytest.skip(
            f"transformers {transformers.__version__} cannot rebuild {name}: "
            f"{type(err).__name__}: {err}"
        )
    if result.missing_keys or result.unexpected_keys:
        pytest.skip(
            f"transformers {transformers.__version__} lays {name} out differently: missing "
            f"{result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    return data, model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", NAMES)
def test_matches_lxt(name, method, attn):
    data, model = _load(name, attn)
    if f"relevance_{method}" not in data:
        pytest.skip(f"LxT 2.1 has no {method} patch map for {name}")
    x = data["inputs"].clone().requires_grad_()
    with dynamiclrp.record(model) as rec:  # eager attention adds its mask as a constant
        out = model(inputs_embeds=x).logits
    out = out[:, -1] if out.dim() == 3 else out
    torch.testing.assert_close(out, data["logits"], rtol=1e-6, atol=1e-6)
    rel = dynamiclrp.explain(out, x, target=data["target"], rules=method, recording=rec)
    ref = data[f"relevance_{method}"]
    diff = ((rel - ref).abs().max() / ref.abs().max()).item()
    assert diff <= TOL, f"{name} {method} ({attn}): max relative difference {diff:.2e}"


def test_cp_differs_from_attnlrp():
    """The two methods are not the same explanation (the oracle data tells them apart)."""
    data = torch.load(os.path.join(DATA, "llama.pt"), weights_only=True)
    a, c = data["relevance_attnlrp"], data["relevance_cp-lrp"]
    assert ((a - c).abs().max() / a.abs().max()).item() > 1e-3


def test_rules_fields_are_checked():
    with pytest.raises(ValueError, match="attention"):
        dynamiclrp.Rules(attention="softmax")
    with pytest.raises(ValueError, match="gates"):
        dynamiclrp.Rules(gates="half")
    r = dynamiclrp.preset("cp-lrp")
    assert (r.attention, r.gates, r.add) == ("cp", "constant", "signed")
    d = dynamiclrp.preset("dynamiclrp")
    assert (d.attention, d.gates) == ("attnlrp", "uniform")


def test_cp_gate_and_attention_rules():
    """CP-LRP on primitives: a gate from an activation and a softmax output are constants."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w1, w2 = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    gate, up = torch.nn.functional.silu(x @ w1), x @ w2
    out = (gate * up).sum(-1)
    rel = dynamiclrp.explain(out, x, rules="cp-lrp")
    # all relevance through the up branch: the epsilon rule on x @ w2 with R_up = gate * up
    r_up = gate.detach() * up.detach()
    expect = x.detach() * ((r_up / up.detach()) @ w2.T)
    torch.testing.assert_close(rel, expect)

    q = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(q @ q.transpose(-1, -2), -1)
    o = p @ v
    rq, rv = dynamiclrp.explain(o.sum(), [q, v], rules="cp-lrp")
    assert rq.abs().max() == 0
    torch.testing.assert_close(rv.sum(), o.sum().detach())
