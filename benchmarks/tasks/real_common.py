"""Loading helpers and task constructors shared by the builders of the paper's real setups
(:mod:`.real_images`, :mod:`.real_text`, :mod:`.real_qa`); the registry is :mod:`.real`."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dynamiclrp.evaluation.task import Task

# ---------------------------------------------------------------------------------------------
# loading helpers


def _require(path: str | Path, what: str, layout: str) -> Path:
    """``path`` as a :class:`Path`, or a ``FileNotFoundError`` naming it and the layout."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what}: {p} does not exist; expected {layout}")
    return p


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={name!r} is not a torch dtype; use float32, bfloat16 or float16")
    return dtype


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_n_eval(name: str, n_eval: int | None, available: int) -> int:
    if n_eval is None:
        return available
    if not 1 <= n_eval <= available:
        raise ValueError(f"{name}: n_eval={n_eval} must be in [1, {available}] (samples found)")
    return n_eval


def torchvision_model(arch: str, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(arch, weights=None, **kwargs)``: the architecture only.

    The image builders create their model through this function (tests replace it by a tiny
    model of the same interface).
    """
    try:
        import torchvision
    except ImportError as err:
        raise ImportError(
            f"the {arch} setup needs torchvision (pip install torchvision); it is not installed"
        ) from err
    return torchvision.models.get_model(arch, weights=None, **kwargs)


def _hf_model(auto: str, path: str | Path, attn: str, dtype: str) -> nn.Module:
    import transformers

    p = _require(path, "model", "a Hugging Face model directory (config.json + weights)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"model: {p} has no config.json; expected a directory written by save_pretrained "
            "(config.json and model.safetensors or pytorch_model.bin)"
        )
    cls = getattr(transformers, auto)
    version = tuple(int(v) for v in re.findall(r"\d+", transformers.__version__)[:2])
    key = "dtype" if version >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    kwargs = {key: _dtype(dtype)}
    model = cls.from_pretrained(str(p), local_files_only=True, attn_implementation=attn, **kwargs)
    return model.eval()


def _hf_tokenizer(path: str | Path, fast: bool = False) -> Any:
    from transformers import AutoTokenizer

    p = _require(path, "tokenizer", "a directory with tokenizer.json / tokenizer_config.json")
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if fast and not tok.is_fast:
        raise TypeError(
            f"tokenizer in {p} is a slow {type(tok).__name__}; extractive QA needs a fast "
            "tokenizer (tokenizer.json) for character offsets"
        )
    return tok


def _special_mask(tok: Any, ids: Tensor) -> Tensor:
    """``(N, T)`` bool: the ids that are one of the tokenizer's special tokens."""
    special = torch.tensor(sorted(set(tok.all_special_ids)), dtype=ids.dtype)
    return torch.isin(ids, special)


def _pad(rows: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[Tensor, Tensor]:
    """Pad token-id rows to the longest on ``side``: ``(ids, attention_mask)``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(list(r), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def _pad_id(tok: Any, model: nn.Module) -> int:
    for pid in (tok.pad_token_id, getattr(model.config, "pad_token_id", None)):
        if pid is not None:
            return int(pid)
    raise ValueError(
        "neither the tokenizer nor the model config defines a pad token id; sequences of "
        "different lengths must be padded (the pad positions are masked and never ranked): set "
        "tokenizer.pad_token (e.g. to the eos token) and save it, or set config.pad_token_id"
    )


def _replacement_id(tok: Any, replacement: str) -> int:
    """The id that replaces perturbed tokens: ``"unk"``, ``"pad"``, ``"mask"``, ``"eos"``, an
    integer, or ``"auto"`` = the tokenizer's unk token, else its pad token (else an error)."""
    if replacement == "auto":
        order = ["unk", "pad"]
    elif replacement in ("unk", "pad", "mask", "eos"):
        order = [replacement]
    elif replacement.lstrip("-").isdigit():
        return int(replacement)
    else:
        raise ValueError(f"replacement={replacement!r}; use auto, unk, pad, mask, eos or an id")
    for kind in order:
        tid = getattr(tok, f"{kind}_token_id")
        if tid is not None:
            return int(tid)
    raise ValueError(
        f"the tokenizer has no {' or '.join(order)} token for replacement={replacement!r} (the "
        "Llama-3 tokenizer has neither unk nor pad): pass replacement=eos or an explicit token id"
    )


def _batched(fn: Callable[[slice], Tensor], n: int, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([fn(slice(b, b + batch_size)) for b in range(0, n, batch_size)])


# ---------------------------------------------------------------------------------------------
# task constructors shared by the builders


def _image_task(
    name: str,
    model: nn.Module,
    call: Callable[[Tensor], Tensor],
    x: Tensor,
    labels: Tensor,
    patch: int,
    batch_size: int,
    info: dict[str, Any],
) -> Task:
    pred = _batched(lambda s: call(x[s]).argmax(-1), len(x), batch_size)
    info = {"accuracy": float((pred == labels).float().mean()), "params": _n_params(model), **info}
    return Task(
        name=name,
        kind="image",
        model=model,
        inputs=x,
        targets=pred,
        labels=labels,
        to_x=lambda t: t,
        forward=lambda x_, idx: call(x_),
        patch=patch,
        info=info,
    )


def _token_task(
    name: str,
    model: nn.Module,
    tok: Any,
    ids: Tensor,
    mask: Tensor,
    special: Tensor,
    targets: Tensor,
    labels: Tensor,
    output: str,
    replacement: str,
    info: dict[str, Any],
) -> Task:
    kw = {}
    if output == "last" and "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = 1  # the last position only: (T, vocab) logits are large

    def forward(x: Tensor, idx: Tensor) -> Tensor:
        out = model(inputs_embeds=x, attention_mask=mask[idx].to(x.device), **kw)
        return out.logits if output == "logits" else out.logits[:, -1]

    return Task(
        name=name,
        kind="tokens",
        model=model,
        inputs=ids,
        targets=targets,
        labels=labels,
        to_x=lambda i: model.get_input_embeddings()(i),
        forward=forward,
        rankable=mask.bool() & ~special,
        replacement_id=_replacement_id(tok, replacement),
        hf={"model": model, "output": output, "attention_mask": mask},
        info={"params": _n_params(model), **info},
    )
