"""Zoo entries built with Hugging Face ``transformers`` (configs only, random weights)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .zoo import ZooEntry, register


def _ids(model: nn.Module, batch: int, g: torch.Generator, length: int = 6) -> Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(3, vocab, (batch, length), generator=g)


def _embeds(model: nn.Module, batch: int, g: torch.Generator, length: int = 6) -> dict:
    """Token embeddings as the explained input (input_ids are not differentiable)."""
    return {"inputs_embeds": model.get_input_embeddings()(_ids(model, batch, g, length)).detach()}


def _last_logits(out) -> Tensor:
    return out.logits[:, -1]


def _logits(out) -> Tensor:
    return out.logits


def _hf(config_cls: str, model_cls: str, **config):
    def make():
        import transformers

        cfg = getattr(transformers, config_cls)(**config)
        return getattr(transformers, model_cls)(cfg)

    return make


TINY = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4)

register(
    ZooEntry(
        "gpt2",
        "transformers",
        _hf(
            "GPT2Config",
            "GPT2LMHeadModel",
            vocab_size=64,
            n_layer=2,
            n_embd=32,
            n_head=4,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=0,
        ),
        _embeds,
        "inputs_embeds",
        _last_logits,
        "next-token logits at the last position",
    )
)
register(
    ZooEntry(
        "llama",
        "transformers",
        _hf("LlamaConfig", "LlamaForCausalLM", vocab_size=64, num_key_value_heads=2, **TINY),
        _embeds,
        "inputs_embeds",
        _last_logits,
        "next-token logits at the last position (grouped-query attention)",
    )
)
register(
    ZooEntry(
        "bert",
        "transformers",
        _hf("BertConfig", "BertForSequenceClassification", vocab_size=64, **TINY),
        _embeds,
        "inputs_embeds",
        _logits,
        "sequence-classification logits",
    )
)
