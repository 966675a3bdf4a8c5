"""The text setups of :mod:`.real`: sequence classification on IMDB and next-token prediction on
Wikipedia text (extractive QA on SQuAD is in :mod:`.real_qa`).

See :mod:`.real` for the setups and the spec syntax; import through it (``from tasks import
real``).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import torch
from torch import nn

from dynamiclrp.evaluation.task import Task

if f"{__package__}.real" not in sys.modules:  # real defines the helpers, then imports this
    raise ImportError(
        f"import {__package__}.real (it loads {__name__}) before {__name__}: {__name__} takes "
        f"its helpers from {__package__}.real, which imports {__name__} after defining them"
    )

from .real_common import (
    _batched,
    _check_n_eval,
    _hf_model,
    _hf_tokenizer,
    _pad,
    _pad_id,
    _require,
    _special_mask,
    _token_task,
)

# ---------------------------------------------------------------------------------------------
# text classification and next-token prediction


def _imdb(path: Path) -> list[tuple[str, int]]:
    """``(text, label)`` pairs (label 1 = positive) of IMDB's test split, sorted by file name."""
    layout = "aclImdb/ (with test/pos, test/neg of .txt files), or a .jsonl/.csv with text,label"
    if path.is_dir():
        root = path / "test" if (path / "test" / "pos").is_dir() else path
        if not ((root / "pos").is_dir() and (root / "neg").is_dir()):
            raise FileNotFoundError(f"data: {path} has no test/pos and test/neg; expected {layout}")
        return [
            (f.read_text(encoding="utf-8"), label)
            for label, sub in ((1, "pos"), (0, "neg"))
            for f in sorted((root / sub).glob("*.txt"))
        ]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    else:
        raise ValueError(f"data: {path} is neither a directory, .jsonl nor .csv; expected {layout}")
    for i, row in enumerate(rows):
        if "text" not in row or "label" not in row:
            raise KeyError(f"data: row {i} of {path} lacks 'text' or 'label' ({sorted(row)})")
    return [(str(r["text"]), int(r["label"])) for r in rows]


def _imdb_label_order(model: nn.Module) -> tuple[list[int], str]:
    """Column of the model for IMDB label 0 (negative) and 1 (positive), and how it was found."""
    names = {int(k): str(v).lower() for k, v in model.config.id2label.items()}
    neg = [k for k, v in names.items() if v.startswith("neg")]
    pos = [k for k, v in names.items() if v.startswith("pos")]
    if len(neg) == 1 and len(pos) == 1:
        return [neg[0], pos[0]], f"from id2label {model.config.id2label}"
    return [0, 1], f"assumed column 1 = positive (id2label {model.config.id2label} has no names)"


def build_llama_imdb(
    model: str,
    data: str,
    tokenizer: str | None = None,
    n_eval: int | None = 1000,
    max_len: int = 512,
    padding_side: str = "left",
    replacement: str = "auto",
    seed: int = 0,
    attn: str = "eager",
    dtype: str = "float32",
    batch_size: int = 8,
) -> Task:
    """``llama-imdb``: ``AutoModelForSequenceClassification`` from the directory ``model``
    (tokenizer from ``tokenizer``, default the same directory) on IMDB's test reviews.

    The reviews are taken in the order of a ``seed``-ed permutation (pos and neg mixed),
    tokenized with the tokenizer's special tokens (Llama: ``<|begin_of_text|>``) and truncated
    to ``max_len`` tokens, then padded to the longest evaluated review on ``padding_side``
    (``"left"`` by default: a decoder classifier given ``inputs_embeds`` reads the last
    position; with rotary positions and the attention mask, left padding changes nothing; use
    ``"right"`` for a ``[CLS]`` encoder).  ``rankable`` = real tokens that are not special
    tokens.  ``replacement_id`` (see :func:`_replacement_id`) is the unk token, else the pad
    token, for ``replacement="auto"``.  ``targets`` = predicted class; ``labels`` = the gold
    label mapped to the model's column via ``id2label`` (``info["label_order"]``).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}; use 'left' or 'right'")
    reviews = _imdb(_require(data, "data", "aclImdb/ or a .jsonl / .csv file"))
    n = _check_n_eval("llama-imdb", n_eval, len(reviews))
    net = _hf_model("AutoModelForSequenceClassification", model, attn, dtype)
    tok = _hf_tokenizer(tokenizer or model)
    order = torch.randperm(len(reviews), generator=torch.Generator().manual_seed(seed))[:n]
    texts = [reviews[i][0] for i in order.tolist()]
    enc = tok(texts, truncation=True, max_length=max_len)
    ids, mask = _pad(enc["input_ids"], _pad_id(tok, net), padding_side)
    columns, how = _imdb_label_order(net)
    labels = torch.tensor([columns[reviews[i][1]] for i in order.tolist()], dtype=torch.long)
    emb = net.get_input_embeddings()
    pred = _batched(
        lambda s: net(inputs_embeds=emb(ids[s]), attention_mask=mask[s]).logits.argmax(-1),
        n,
        batch_size,
    )
    lengths = mask.sum(1)
    info = {
        "accuracy": float((pred == labels).float().mean()),
        "reviews_found": len(reviews),
        "truncated": int(sum(len(tok(t)["input_ids"]) > max_len for t in texts)),
        "mean_tokens": float(lengths.float().mean()),
        "max_len": max_len,
        "label_order": how,
    }
    special = _special_mask(tok, ids)
    return _token_task(
        "llama-imdb", net, tok, ids, mask, special, pred, labels, "logits", replacement, info
    )


def build_llama_wikipedia(
    model: str,
    data: str,
    tokenizer: str | None = None,
    n_eval: int | None = 1000,
    ctx: int = 512,
    bos: bool = True,
    max_per_file: int | None = None,
    replacement: str = "auto",
    attn: str = "eager",
    dtype: str = "float32",
    batch_size: int = 4,
) -> Task:
    """``llama-wikipedia``: ``AutoModelForCausalLM`` from ``model`` predicting the next token of
    windows of local text (``data``: a ``.txt`` file or a directory searched recursively for
    ``*.txt``, in sorted order).

    Each file is tokenized without special tokens; its consecutive non-overlapping windows of
    ``w = ctx - 1`` tokens (``ctx`` if ``bos`` is false or the tokenizer has no bos token) that
    are followed by one more token become samples ``[bos] + window``, at most ``max_per_file``
    per file, until ``n_eval`` samples exist.  The explained class is the gold next token
    (``targets = labels``); ``info["accuracy"]`` is how often it is the arg-max.  Files shorter
    than ``w + 1`` tokens are skipped and counted (``info["files_too_short"]``).  The bos token
    is never ranked; there is no padding.
    """
    root = _require(data, "data", "a .txt file or a directory of .txt files")
    files = [root] if root.is_file() else sorted(root.rglob("*.txt"))
    if not files:
        raise FileNotFoundError(f"data: no .txt files under {root}; expected plain-text articles")
    net = _hf_model("AutoModelForCausalLM", model, attn, dtype)
    tok = _hf_tokenizer(tokenizer or model)
    prefix = [int(tok.bos_token_id)] if bos and tok.bos_token_id is not None else []
    width = ctx - len(prefix)
    rows: list[list[int]] = []
    gold: list[int] = []
    short = used = 0
    for f in files:
        if n_eval is not None and len(rows) >= n_eval:
            break
        text_ids = tok(f.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if len(text_ids) < width + 1:
            short += 1
            continue
        used += 1
        starts = range(0, len(text_ids) - width, width)
        for k, s in enumerate(starts):
            if (max_per_file is not None and k >= max_per_file) or len(rows) == n_eval:
                break
            rows.append(prefix + text_ids[s : s + width])
            gold.append(text_ids[s + width])
    if not rows:
        raise ValueError(f"data: no file under {root} has the {width + 1} tokens a window needs")
    n = _check_n_eval("llama-wikipedia", n_eval, len(rows))
    ids = torch.tensor(rows[:n], dtype=torch.long)
    labels = torch.tensor(gold[:n], dtype=torch.long)
    mask = torch.ones_like(ids)
    task = _token_task(
        "llama-wikipedia",
        net,
        tok,
        ids,
        mask,
        _special_mask(tok, ids),
        labels,
        labels,
        "last",
        replacement,
        {"files_found": len(files), "files_used": used, "files_too_short": short, "ctx": ctx},
    )
    pred = _batched(
        lambda s: task.forward(task.to_x(ids[s]), torch.arange(n)[s]).argmax(-1), n, batch_size
    )
    task.info["accuracy"] = float((pred == labels).float().mean())
    return task
