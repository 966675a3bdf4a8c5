"""The extractive QA setup of :mod:`.real`: a Hugging Face QA model on SQuAD v2, with SQuAD's
answer normalisation, exact match and F1.

See :mod:`.real` for the setups and the spec syntax; import through it (``from tasks import
real``).
"""

from __future__ import annotations

import collections
import json
import re
import string
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dynamiclrp.evaluation.task import Task

if f"{__package__}.real" not in sys.modules:  # real defines the helpers, then imports this
    raise ImportError(
        f"import {__package__}.real (it loads {__name__}) before {__name__}: {__name__} takes "
        f"its helpers from {__package__}.real, which imports {__name__} after defining them"
    )

from .real_common import (
    _hf_model,
    _hf_tokenizer,
    _n_params,
    _pad,
    _pad_id,
    _replacement_id,
    _require,
    _special_mask,
)

# ---------------------------------------------------------------------------------------------
# extractive QA


def normalize_answer(s: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the),
    single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_scores(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """SQuAD's exact match and F1 of ``prediction`` against the best of ``answers``.

    ``EM = [norm(p) == norm(a)]``; with ``P``, ``A`` the whitespace tokens of the normalised
    strings and ``c`` their multiset overlap, ``F1 = 2 c / (|P| + |A|)`` (0 if ``c = 0``).
    """
    em = f1 = 0.0
    p_tokens = normalize_answer(prediction).split()
    for a in answers:
        a_tokens = normalize_answer(a).split()
        em = max(em, float(normalize_answer(prediction) == normalize_answer(a)))
        common = sum((collections.Counter(p_tokens) & collections.Counter(a_tokens)).values())
        if common:
            f1 = max(f1, 2.0 * common / (len(p_tokens) + len(a_tokens)))
    return em, f1


def _squad(path: Path) -> list[dict[str, Any]]:
    """The answerable questions of a SQuAD (v2) json file, in file order."""
    layout = "SQuAD v2's dev-v2.0.json ({'data': [{'paragraphs': [{'context', 'qas'}]}]})"
    if path.is_dir() or path.suffix != ".json":
        raise ValueError(f"data: {path} is not a .json file; expected {layout}")
    doc = json.loads(path.read_text(encoding="utf-8"))
    if "data" not in doc:
        raise KeyError(f"data: {path} has no 'data' key; expected {layout}")
    out = []
    for article in doc["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                if qa.get("is_impossible", False) or not qa["answers"]:
                    continue
                out.append(
                    {
                        "id": qa["id"],
                        "question": qa["question"],
                        "context": para["context"],
                        "answers": qa["answers"],
                    }
                )
    if not out:
        raise ValueError(f"data: {path} has no answerable question")
    return out


def _char_to_tokens(
    offsets: Sequence[tuple[int, int]], in_context: Sequence[bool], start: int, end: int
) -> tuple[int, int] | None:
    """Inclusive token span of the characters ``[start, end)`` of the context: the first
    context token ending after ``start`` and the last one starting before ``end``."""
    toks = [i for i, (a, b) in enumerate(offsets) if in_context[i] and b > start and a < end]
    return (toks[0], toks[-1]) if toks else None


def _qa_logits(model: nn.Module, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(start_logits, end_logits)`` on input embeddings ``x``; for an encoder-decoder (T5) the
    decoder reads ``x`` shifted right with ``decoder_start_token_id``'s embedding first, what
    ``T5ForQuestionAnswering`` does with ``input_ids``."""
    kw: dict[str, Any] = {}
    if model.config.is_encoder_decoder:
        start = model.get_input_embeddings().weight[model.config.decoder_start_token_id]
        kw["decoder_inputs_embeds"] = torch.cat(
            [start.expand(x.shape[0], 1, -1).to(x.dtype), x[:, :-1]], 1
        )
    out = model(inputs_embeds=x, attention_mask=mask, **kw)
    return out.start_logits, out.end_logits


def predict_span(start: Tensor, end: Tensor, context: Tensor) -> tuple[int, int] | None:
    """``s = argmax start`` over all positions; ``None`` (no answer / invalid) unless ``s`` is a
    context token; else ``(s, argmax_{e >= s, e in context} end)``."""
    s = int(start.argmax())
    if not bool(context[s]):
        return None
    allowed = context.clone()
    allowed[:s] = False
    e = int(end.masked_fill(~allowed, float("-inf")).argmax())
    return s, e


def _encode_squad(tok: Any, q: dict[str, Any]) -> dict[str, Any]:
    """``tok(question.lstrip(), context)`` with the offsets, the context / question token masks
    and the gold token span of the first answer (``None`` if no context token covers it)."""
    enc = tok(q["question"].lstrip(), q["context"], return_offsets_mapping=True)
    seq = enc.sequence_ids()
    in_context = [sid == 1 for sid in seq]
    a = q["answers"][0]
    chars = (a["answer_start"], a["answer_start"] + len(a["text"]))
    return {
        **q,
        "ids": enc["input_ids"],
        "offsets": enc["offset_mapping"],
        "in_context": in_context,
        "question_mask": [sid == 0 for sid in seq],
        "gold": _char_to_tokens(enc["offset_mapping"], in_context, *chars),
    }


def _predict_squad(
    model: nn.Module, batch: list[dict[str, Any]], pad_id: int
) -> list[dict[str, Any]]:
    """Each encoded question with its predicted span ``"pred"`` (:func:`predict_span`, ``None``
    when invalid), the span's text and its SQuAD ``"em"``, ``"f1"`` (0 when invalid)."""
    ids, mask = _pad([b["ids"] for b in batch], pad_id, "right")
    with torch.no_grad():
        s_log, e_log = _qa_logits(model, model.get_input_embeddings()(ids), mask)
    out = []
    for i, b in enumerate(batch):
        context = torch.zeros(ids.shape[1], dtype=torch.bool)
        context[: len(b["ids"])] = torch.tensor(b["in_context"])
        span = predict_span(s_log[i], e_log[i], context)
        text = (
            ""
            if span is None
            else b["context"][b["offsets"][span[0]][0] : b["offsets"][span[1]][1]]
        )
        em, f1 = squad_scores(text, [a["text"] for a in b["answers"]])
        out.append({**b, "pred": span, "text": text, "em": em, "f1": f1})
    return out


def build_squad_qa(
    model: str,
    data: str,
    tokenizer: str | None = None,
    n_eval: int | None = None,
    max_len: int = 512,
    replacement: str = "auto",
    attn: str = "eager",
    dtype: str = "float32",
    batch_size: int = 8,
) -> Task:
    """``squad-qa``: ``AutoModelForQuestionAnswering`` from ``model`` (RoBERTa, BERT, T5 ...) on
    the answerable questions of SQuAD v2 ``data`` (``dev-v2.0.json``), in file order.

    Input = ``tokenizer(question.lstrip(), context)`` with its special tokens, never truncated:
    a pair longer than ``max_len`` tokens is skipped and counted (``info["skipped_too_long"]``,
    as the paper did).  Gold span = the inclusive token span of the first answer's characters
    (offset mapping); predicted span = :func:`predict_span` (the start must be a context token,
    else the model answers "no answer" and the sample is skipped and counted in
    ``info["skipped_invalid_span"]``).  Questions are processed until ``n_eval`` samples are
    kept.  ``info``: SQuAD's exact match and F1 (:func:`squad_scores`, text of the predicted
    span against every gold answer, in percent) over all processed questions that fit (a
    skipped invalid prediction scores 0) and over the kept ones.  The task is right padded;
    ``question`` marks the question's tokens; ``rankable`` = context tokens that are not
    special tokens; output ``"span"`` (``start_logits[s] + end_logits[e]``, target 0,
    ``score="logit"``).
    """
    questions = _squad(_require(data, "data", "SQuAD v2's dev-v2.0.json"))
    net = _hf_model("AutoModelForQuestionAnswering", model, attn, dtype)
    tok = _hf_tokenizer(tokenizer or model, fast=True)
    pad_id = _pad_id(tok, net)
    emb = net.get_input_embeddings()
    counts = {"processed": 0, "too_long": 0, "unmappable": 0, "invalid": 0}
    kept: list[dict[str, Any]] = []
    scores: list[tuple[float, float]] = []  # (EM, F1) of every processed question that fits
    pending: list[dict[str, Any]] = []
    for q in questions:
        if n_eval is not None and len(kept) >= n_eval:
            break
        counts["processed"] += 1
        enc = _encode_squad(tok, q)
        if len(enc["ids"]) > max_len:
            counts["too_long"] += 1
        elif enc["gold"] is None:
            counts["unmappable"] += 1
        else:
            pending.append(enc)
        full = n_eval is not None and len(kept) + len(pending) >= n_eval
        if pending and (len(pending) == batch_size or full or q is questions[-1]):
            for enc in _predict_squad(net, pending, pad_id):
                scores.append((enc["em"], enc["f1"]))
                if enc["pred"] is None:
                    counts["invalid"] += 1
                else:
                    kept.append(enc)
            pending = []
    if not kept or (n_eval is not None and len(kept) < n_eval):
        raise ValueError(
            f"squad-qa: {len(kept)} questions of {data} kept, n_eval={n_eval}: {counts}"
        )
    ids, mask = _pad([k["ids"] for k in kept], pad_id, "right")
    question = torch.zeros_like(ids, dtype=torch.bool)
    for i, k in enumerate(kept):
        question[i, : len(k["ids"])] = torch.tensor(k["question_mask"])
    spans = torch.tensor([k["gold"] for k in kept], dtype=torch.long)
    pred = torch.tensor([k["pred"] for k in kept], dtype=torch.long)

    def forward(x: Tensor, idx: Tensor) -> Tensor:
        s_l, e_l = _qa_logits(net, x, mask[idx].to(x.device))
        p = pred[idx].to(x.device)
        return s_l.gather(1, p[:, :1]) + e_l.gather(1, p[:, 1:])

    em_all, f1_all = (100.0 * sum(v) / len(scores) for v in zip(*scores, strict=True))
    info = {
        "exact_match": em_all,
        "f1": f1_all,
        "exact_match_kept": 100.0 * sum(k["em"] for k in kept) / len(kept),
        "f1_kept": 100.0 * sum(k["f1"] for k in kept) / len(kept),
        "metric": "SQuAD EM/F1 (normalised answer text, best gold answer), percent",
        "answerable_in_file": len(questions),
        "processed": counts["processed"],
        "kept": len(kept),
        "skipped_too_long": counts["too_long"],
        "skipped_invalid_span": counts["invalid"],
        "skipped_gold_unmappable": counts["unmappable"],
        "max_len": max_len,
        "params": _n_params(net),
    }
    zeros = torch.zeros(len(kept), dtype=torch.long)
    hf = {"model": net, "output": "span", "attention_mask": mask, "spans": pred}
    if net.config.is_encoder_decoder:
        hf["decoder_inputs"] = "shift_right(inputs_embeds)"
    return Task(
        name="squad-qa",
        kind="tokens",
        model=net,
        inputs=ids,
        targets=zeros,
        labels=zeros,
        to_x=lambda i: emb(i),
        forward=forward,
        score="logit",
        rankable=mask.bool() & ~_special_mask(tok, ids) & ~question,
        replacement_id=_replacement_id(tok, replacement),
        spans=spans,
        predicted_spans=pred,
        question=question,
        hf=hf,
        info=info,
    )
