"""Generate the LxT oracle data of ``tests/test_lxt.py`` (not a test: pytest collects ``test_*.py``).

LxT 2.1 needs transformers 4.52.4 and patches the transformers modules globally and for good, so
it runs in its own environment, one process per method::

    python3 -m venv /tmp/lxtenv
    /tmp/lxtenv/bin/pip install torch==2.13.0 transformers==4.52.4 lxt==2.1
    /tmp/lxtenv/bin/python tests/lxt_oracle.py

Each tiny random model (float64, fixed seeds) is saved with its config, state dict, input
embeddings, target, logits and LxT's relevance at the input embeddings (``inputs_embeds *
grad`` after LxT's ``monkey_patch``) under AttnLRP and CP-LRP, to ``tests/data/lxt/<name>.pt``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "data", "lxt")
SEQ = 5
VOCAB = 32
SMALL = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=VOCAB,
)


def _models():
    """name -> (config class, model class, lxt module name, config kwargs, has CP-LRP map)."""
    rope = dict(max_position_embeddings=64, tie_word_embeddings=False)
    return {
        "llama": (
            "LlamaConfig",
            "LlamaForCausalLM",
            "llama",
            dict(SMALL, num_key_value_heads=2, **rope),
        ),
        "qwen2": (
            "Qwen2Config",
            "Qwen2ForCausalLM",
            "qwen2",
            dict(SMALL, num_key_value_heads=2, use_sliding_window=False, **rope),
        ),
        "qwen3": (
            "Qwen3Config",
            "Qwen3ForCausalLM",
            "qwen3",
            dict(SMALL, num_key_value_heads=2, head_dim=4, use_sliding_window=False, **rope),
        ),
        "gemma3": (
            "Gemma3TextConfig",
            "Gemma3ForCausalLM",
            "gemma3",
            dict(
                SMALL,
                num_key_value_heads=2,
                head_dim=4,
                sliding_window=64,
                final_logit_softcapping=None,
                attn_logit_softcapping=None,
                **rope,
            ),
        ),
        "gpt2": (
            "GPT2Config",
            "GPT2LMHeadModel",
            "gpt2",
            dict(
                vocab_size=VOCAB,
                n_layer=2,
                n_embd=16,
                n_head=4,
                n_positions=64,
                # F.gelu(approximate="tanh"): one op, as LxT's identity rule sees the activation;
                # the default "gelu_new" is written out of primitives (docs/presets.md)
                activation_function="gelu_pytorch_tanh",
                bos_token_id=0,
                eos_token_id=0,
            ),
        ),
        "bert": (
            "BertConfig",
            "BertForSequenceClassification",
            "bert",
            dict(SMALL, max_position_embeddings=64, num_labels=3),
        ),
    }


def _build(name: str, attn: str):
    import transformers

    cfg_cls, model_cls, _, kwargs = _models()[name]
    config = getattr(transformers, cfg_cls)(**kwargs)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).double().eval()
    with torch.no_grad():  # random norms and biases, so that no parameter is trivially 0 or 1
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return config, model


def _inputs(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (1, SEQ), generator=g)
    return model.get_input_embeddings()(ids).detach()


def _logits(model, x):
    out = model(inputs_embeds=x).logits
    return out[:, -1] if out.dim() == 3 else out


def _stub_torchvision() -> None:
    """The LxT worker's stub: ``lxt.efficient.models`` imports torchvision's ViT module, and the
    torchvision wheel that pip pairs with torch 2.13 fails to load (the worker imports nothing from
    the project, so it loads as a plain module)."""
    sys.path.insert(0, os.path.join(HERE, "..", "src", "dynamiclrp", "evaluation"))
    from lxt_worker import _stub_torchvision as stub

    stub()


def run(method: str, only: str) -> None:
    """Explain model ``only`` with LxT ``method``: one process for each pair, because LxT's
    patches are permanent and some (CP-LRP's attention wrappers) act on dictionaries that all
    transformers models share."""
    import importlib

    import transformers  # noqa: F401  (before the stub: it must see no torchvision)

    _stub_torchvision()
    from lxt.efficient import monkey_patch

    os.makedirs(OUT, exist_ok=True)
    for name, (cfg_cls, model_cls, lxt_name, _) in _models().items():
        if name != only:
            continue
        lxt_mod = importlib.import_module(f"lxt.efficient.models.{lxt_name}")
        patch_map = lxt_mod.attnLRP if method == "attnlrp" else getattr(lxt_mod, "cp_LRP", None)
        if patch_map is None:
            print(f"{name}: LxT has no {method} map, skipped")
            continue
        hf_mod = importlib.import_module(f"transformers.models.{lxt_name}.modeling_{lxt_name}")
        monkey_patch(hf_mod, patch_map=patch_map)
        config, model = _build(name, "eager")
        x = _inputs(model).requires_grad_()
        logits = _logits(model, x)
        target = int(logits[0].argmax())
        logits[0, target].backward()
        rel = (x * x.grad).detach()
        path = os.path.join(OUT, f"{name}.pt")
        data = torch.load(path, weights_only=True) if os.path.exists(path) else {}
        data.update(
            config_class=cfg_cls,
            model_class=model_cls,
            config=config.to_dict(),
            state_dict={k: v.clone() for k, v in model.state_dict().items()},
            inputs=x.detach(),
            target=target,
            logits=logits.detach(),
        )
        data[f"relevance_{method}"] = rel
        torch.save(data, path)
        print(f"{name} {method}: target {target}, sum R {rel.sum().item():.6g}")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        run(sys.argv[1], sys.argv[2])
    else:
        names = sys.argv[1:] or list(_models())
        for name in names:
            for method in ("attnlrp", "cp-lrp"):
                cmd = [sys.executable, os.path.abspath(__file__), method, name]
                subprocess.run(cmd, check=True)
