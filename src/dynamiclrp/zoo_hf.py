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


def _hf(config_cls: str, model_cls: str, attn: str | None = None, **config):
    """``model_cls(config_cls(**config))``; ``attn`` picks the attention implementation."""

    def make():
        import transformers

        cfg = getattr(transformers, config_cls)(**config)
        if attn is not None:
            cfg._attn_implementation = attn
        return getattr(transformers, model_cls)(cfg)

    return make


TINY = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4)

_GPT2 = dict(
    vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0
)
_LLAMA = dict(vocab_size=64, num_key_value_heads=2, **TINY)
for _attn in ("sdpa", "eager"):  # eager: the causal mask is an unrecorded add (record() keeps it)
    _suffix = "" if _attn == "sdpa" else "_eager"
    register(
        ZooEntry(
            "gpt2" + _suffix,
            "transformers",
            _hf("GPT2Config", "GPT2LMHeadModel", attn=_attn, **_GPT2),
            _embeds,
            "inputs_embeds",
            _last_logits,
            f"next-token logits at the last position ({_attn} attention)",
        )
    )
    register(
        ZooEntry(
            "llama" + _suffix,
            "transformers",
            _hf("LlamaConfig", "LlamaForCausalLM", attn=_attn, **_LLAMA),
            _embeds,
            "inputs_embeds",
            _last_logits,
            f"next-token logits at the last position (grouped-query, {_attn} attention)",
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


# --- helpers for the entries below ---------------------------------------------------------------


def _g(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(shape, generator=g)


def _field(name: str, index=None):
    """``out.<name>`` (optionally indexed), a 2-D ``(batch, k)`` tensor."""

    def select(out) -> Tensor:
        t = getattr(out, name)
        return t if index is None else t[index]

    return select


class _EmbedsAsInput(nn.Module):
    """A model whose forward insists on ``input_ids`` (CLIP text: the ids pick the pooled EOS
    position), fed ``inputs_embeds`` instead: the token embedding's output is replaced by them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, inputs_embeds: Tensor, input_ids: Tensor, **kwargs):
        emb = self.get_input_embeddings()
        handle = emb.register_forward_hook(lambda module, args, out: inputs_embeds)
        try:
            return self.model(input_ids=input_ids, **kwargs)
        finally:
            handle.remove()


def _wrapped(make):
    return lambda: _EmbedsAsInput(make())


def _embeds_and_ids(eos: int):
    """Token embeddings plus the ids (ending in ``eos``) that decide where the model pools."""

    def inputs(model: nn.Module, batch: int, g: torch.Generator) -> dict:
        ids = _ids(model, batch, g)
        ids[:, -1] = eos
        return {"inputs_embeds": model.get_input_embeddings()(ids).detach(), "input_ids": ids}

    return inputs


def _decoder(make_encoder_inputs, length: int = 4, vocab: int = 64, start: int = 0):
    """Encoder inputs plus ``decoder_input_ids`` (``start`` then random tokens)."""

    def inputs(model: nn.Module, batch: int, g: torch.Generator) -> dict:
        kwargs = make_encoder_inputs(model, batch, g)
        dec = torch.randint(3, vocab, (batch, length), generator=g)
        dec[:, 0] = start
        kwargs["decoder_input_ids"] = dec
        return kwargs

    return inputs


def _pixels(channels: int = 3, size: int = 16):
    return lambda model, batch, g: {"pixel_values": _g(g, batch, channels, size, size)}


def _causal_lm(name: str, config_cls: str, model_cls: str, note: str = "", **config) -> None:
    register(
        ZooEntry(
            name,
            "transformers",
            _hf(config_cls, model_cls, **config),
            _embeds,
            "inputs_embeds",
            _last_logits,
            "next-token logits at the last position" + (f" ({note})" if note else ""),
        )
    )


# --- the paper's models --------------------------------------------------------------------------

_SIGLIP_PATCH, _SIGLIP_GRID = 4, 4


def _siglip2_inputs(model: nn.Module, batch: int, g: torch.Generator) -> dict:
    n = _SIGLIP_GRID * _SIGLIP_GRID
    return {
        "pixel_values": _g(g, batch, n, 3 * _SIGLIP_PATCH * _SIGLIP_PATCH),
        "pixel_attention_mask": torch.ones(batch, n, dtype=torch.long),
        "spatial_shapes": torch.tensor([[_SIGLIP_GRID, _SIGLIP_GRID]] * batch),
    }


register(
    ZooEntry(
        "siglip2",
        "transformers",
        _hf(
            "Siglip2Config",
            "Siglip2ForImageClassification",
            vision_config=dict(
                num_channels=3,
                patch_size=_SIGLIP_PATCH,
                num_patches=_SIGLIP_GRID * _SIGLIP_GRID,
                **TINY,
            ),
            text_config=dict(vocab_size=64, bos_token_id=0, eos_token_id=2, **TINY),
            num_labels=5,
        ),
        _siglip2_inputs,
        "pixel_values",
        _logits,
        "image-classification logits over the mean-pooled patch tokens (NaFlex patches)",
    )
)

_AUDIO = 1600  # 0.1 s at 16 kHz


def _audio(model: nn.Module, batch: int, g: torch.Generator) -> dict:
    return {"input_values": _g(g, batch, _AUDIO)}


register(
    ZooEntry(
        "wav2vec2",
        "transformers",
        _hf(
            "Wav2Vec2Config",
            "Wav2Vec2ForCTC",
            vocab_size=32,
            conv_dim=(32, 32, 32),
            conv_stride=(5, 4, 4),
            conv_kernel=(10, 4, 4),
            num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=4,
            **TINY,
        ),
        _audio,
        "input_values",
        _field("logits", (slice(None), 10)),
        "CTC logits of the frame at 10 of 19 (raw audio, 0.1 s)",
    )
)

_MEL, _FRAMES = 8, 16


def _mel(model: nn.Module, batch: int, g: torch.Generator) -> dict:
    return {"input_features": _g(g, batch, _MEL, _FRAMES)}


register(
    ZooEntry(
        "whisper",
        "transformers",
        _hf(
            "WhisperConfig",
            "WhisperForConditionalGeneration",
            vocab_size=64,
            num_mel_bins=_MEL,
            encoder_layers=2,
            decoder_layers=2,
            d_model=32,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_source_positions=_FRAMES // 2,
            max_target_positions=16,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=0,
        ),
        _decoder(_mel),
        "input_features",
        _last_logits,
        "decoder next-token logits w.r.t. the encoder's log-mel features",
    )
)
register(
    ZooEntry(
        "roberta_qa",
        "transformers",
        _hf(
            "RobertaConfig",
            "RobertaForQuestionAnswering",
            vocab_size=64,
            pad_token_id=1,
            max_position_embeddings=32,
            **TINY,
        ),
        _embeds,
        "inputs_embeds",
        _field("start_logits"),
        "extractive-QA start logits (one per token)",
    )
)
_causal_lm(
    "gemma3",
    "Gemma3TextConfig",
    "Gemma3ForCausalLM",
    "sliding-window and global layers, QK-norm",
    vocab_size=64,
    num_key_value_heads=2,
    head_dim=8,
    sliding_window=4,
    **TINY,
)
_causal_lm(
    "qwen3",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "QK-norm",
    vocab_size=64,
    num_key_value_heads=2,
    head_dim=8,
    **TINY,
)
register(
    ZooEntry(
        "flan_t5",
        "transformers",
        _hf(
            "T5Config",
            "T5ForConditionalGeneration",
            vocab_size=64,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            decoder_start_token_id=0,
            pad_token_id=0,
        ),
        _decoder(_embeds),
        "inputs_embeds",
        _last_logits,
        "decoder next-token logits w.r.t. the encoder's input embeddings (gated-GELU, T5 v1.1)",
    )
)

_P2S_PATCH, _P2S_ROWS, _P2S_COLS = 4, 2, 3


def _flattened_patches(model: nn.Module, batch: int, g: torch.Generator) -> dict:
    n = _P2S_ROWS * _P2S_COLS
    patches = _g(g, batch, n, 2 + 3 * _P2S_PATCH * _P2S_PATCH)
    rows = torch.arange(n) // _P2S_COLS + 1  # 1-based; 0 marks a padding patch
    cols = torch.arange(n) % _P2S_COLS + 1
    patches[:, :, 0], patches[:, :, 1] = rows.to(patches.dtype), cols.to(patches.dtype)
    return {"flattened_patches": patches, "attention_mask": torch.ones(batch, n)}


register(
    ZooEntry(
        "pix2struct",
        "transformers",
        _hf(
            "Pix2StructConfig",
            "Pix2StructForConditionalGeneration",
            vision_config=dict(
                hidden_size=32,
                patch_embed_hidden_size=3 * _P2S_PATCH * _P2S_PATCH,
                d_ff=64,
                d_kv=8,
                num_hidden_layers=2,
                num_attention_heads=4,
                seq_len=8,
                relative_attention_num_buckets=8,
            ),
            text_config=dict(
                vocab_size=64,
                hidden_size=32,
                d_ff=64,
                d_kv=8,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                decoder_start_token_id=0,
                pad_token_id=0,
            ),
            decoder_start_token_id=0,
            pad_token_id=0,
        ),
        _decoder(_flattened_patches),
        "flattened_patches",
        _last_logits,
        "DePlot/Pix2Struct decoder next-token logits w.r.t. the flattened patches",
    )
)
_causal_lm(
    "mamba",
    "MambaConfig",
    "MambaForCausalLM",
    "selective state-space scan, sequential reference path",
    vocab_size=64,
    hidden_size=32,
    state_size=8,
    num_hidden_layers=2,
    expand=2,
    conv_kernel=4,
    time_step_rank=4,
)

# --- beyond the paper ----------------------------------------------------------------------------

_causal_lm(
    "mistral",
    "MistralConfig",
    "MistralForCausalLM",
    "sliding-window attention",
    vocab_size=64,
    num_key_value_heads=2,
    sliding_window=4,
    **TINY,
)
_causal_lm(
    "mixtral",
    "MixtralConfig",
    "MixtralForCausalLM",
    "sparse mixture of experts, top-2 of 4",
    vocab_size=64,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    # the default, "grouped_mm", has no float64 kernel on CPU ("Expected mat_a to be Float32,
    # BFloat16 or Float16 matrix, got Double"); its GroupedMmBackward0 has a rule (float32).
    # "eager" (index_add_ into torch.zeros) needs dynamiclrp.record to keep IndexAddBackward0.
    experts_implementation="batched_mm",
    **TINY,
)
_causal_lm(
    "phi3",
    "Phi3Config",
    "Phi3ForCausalLM",
    "fused QKV and gate-up projections",
    vocab_size=64,
    num_key_value_heads=2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    **TINY,
)
_causal_lm(
    "gpt_neox",
    "GPTNeoXConfig",
    "GPTNeoXForCausalLM",
    "parallel residual, partial rotary",
    vocab_size=64,
    **TINY,
)
_causal_lm(
    "falcon",
    "FalconConfig",
    "FalconForCausalLM",
    "new decoder architecture (Falcon-40B/180B): grouped-query attention, parallel residual",
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    new_decoder_architecture=True,
    num_kv_heads=2,
)
# Falcon-7B's multi-query attention (the config default, multi_query=True) passes a single
# key/value head broadcast over the query heads to SDPA, which then takes its C++ math path and
# adds the float mask inside C++: dynamiclrp.record() rebuilds that sum from the call's arguments.
_causal_lm(
    "falcon_mqa",
    "FalconConfig",
    "FalconForCausalLM",
    "multi-query attention (SDPA's C++ math path)",
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
)
_causal_lm(
    "opt",
    "OPTConfig",
    "OPTForCausalLM",
    "learned offset positions",
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    ffn_dim=64,
    num_attention_heads=4,
    word_embed_proj_dim=32,
    max_position_embeddings=32,
)
# BLOOM runs its tanh-GELU as a Python autograd.Function (BloomGelu -> GeLUFunction.apply, in
# eval mode too), a node type without a table entry: the element-wise probe (rules/probe.py)
# finds its Jacobian diagonal and gives it the activation rule; ALiBi's bias is an unrecorded add
# that record() keeps.
_causal_lm(
    "bloom",
    "BloomConfig",
    "BloomForCausalLM",
    "ALiBi position bias, GELU as a custom autograd.Function (probed)",
    vocab_size=64,
    hidden_size=32,
    n_layer=2,
    n_head=4,
)
register(
    ZooEntry(
        "deberta_v2",
        "transformers",
        _hf(
            "DebertaV2Config",
            "DebertaV2ForSequenceClassification",
            vocab_size=64,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            position_buckets=8,
            max_relative_positions=16,
            max_position_embeddings=32,
            position_biased_input=False,
            **TINY,
        ),
        _embeds,
        "inputs_embeds",
        _logits,
        "sequence-classification logits (disentangled relative attention)",
    )
)
register(
    ZooEntry(
        "distilbert",
        "transformers",
        _hf(
            "DistilBertConfig",
            "DistilBertForSequenceClassification",
            vocab_size=64,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=64,
            max_position_embeddings=32,
        ),
        _embeds,
        "inputs_embeds",
        _logits,
        "sequence-classification logits",
    )
)
register(
    ZooEntry(
        "electra",
        "transformers",
        _hf(
            "ElectraConfig",
            "ElectraForSequenceClassification",
            vocab_size=64,
            embedding_size=16,
            max_position_embeddings=32,
            **TINY,
        ),
        _embeds,
        "inputs_embeds",
        _logits,
        "sequence-classification logits (embedding projection 16 -> 32)",
    )
)
register(
    ZooEntry(
        "clip_text",
        "transformers",
        _wrapped(
            _hf(
                "CLIPTextConfig",
                "CLIPTextModelWithProjection",
                vocab_size=64,
                projection_dim=16,
                max_position_embeddings=16,
                bos_token_id=0,
                eos_token_id=63,
                pad_token_id=1,
                **TINY,
            )
        ),
        _embeds_and_ids(63),
        "inputs_embeds",
        _field("text_embeds"),
        "projected text embedding, pooled at the EOS token",
    )
)
register(
    ZooEntry(
        "clip_vision",
        "transformers",
        _hf(
            "CLIPVisionConfig",
            "CLIPVisionModelWithProjection",
            image_size=16,
            patch_size=4,
            projection_dim=16,
            **TINY,
        ),
        _pixels(),
        "pixel_values",
        _field("image_embeds"),
        "projected image embedding, pooled at the class token",
    )
)
register(
    ZooEntry(
        "dinov2",
        "transformers",
        _hf(
            "Dinov2Config",
            "Dinov2ForImageClassification",
            image_size=16,
            patch_size=4,
            num_labels=5,
            **TINY,
        ),
        _pixels(),
        "pixel_values",
        _logits,
        "image-classification logits (class token and mean patch token, layer scale)",
    )
)
# Swin pools with nn.AdaptiveAvgPool1d(1) over a transposed (non-contiguous) tensor, which on
# CPU records an in-place as_strided_ (AsStridedBackward1, routed like the gradient).
register(
    ZooEntry(
        "swin_hf",
        "transformers",
        _hf(
            "SwinConfig",
            "SwinForImageClassification",
            image_size=16,
            patch_size=2,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 4],
            window_size=4,
            num_labels=5,
        ),
        _pixels(),
        "pixel_values",
        _logits,
        "image-classification logits (shifted windows, patch merging)",
    )
)
register(
    ZooEntry(
        "vit_hf",
        "transformers",
        _hf(
            "ViTConfig",
            "ViTForImageClassification",
            image_size=16,
            patch_size=4,
            num_labels=5,
            **TINY,
        ),
        _pixels(),
        "pixel_values",
        _logits,
        "image-classification logits at the class token",
    )
)
