"""Explain Hugging Face ``transformers`` text models: tokens and words in, relevance out.

``transformers`` is imported lazily (it is not a dependency of the core library).

>>> model, tok = dynamiclrp.hf.load("path/to/model")          # local files only by default
>>> ex = dynamiclrp.hf.explain_text(model, tok, "a fine film")
>>> list(zip(ex.words[0], ex.word_relevance[0].tolist()))

What is explained
-----------------
The relevance of a token is the relevance LRP assigns to the output of the model's **token
embedding** (``model.get_input_embeddings()``; for an encoder-decoder model, the encoder's and the
decoder's), summed over the embedding dimension.  The model runs on ``input_ids`` as usual: a
forward hook replaces the embedding's output by a leaf tensor of the same value, so everything a
model derives from the ids (RoBERTa's padding-aware positions, the pooled token of a decoder-only
classifier) stays exactly as in normal use.

Additive **position and token-type embeddings are not counted** in a token's relevance: the share
of relevance a rule sends into them ends at their weights and is booked in
:attr:`TextExplanation.report` as *unrequested* (weights that require grad) or *absorbed* (frozen
ones), like a bias's share; ``report.residual`` stays ~0.  In a BERT-like model with random
weights that share can be most of the logit; compare ``token_relevance.sum()`` with
``report.seeded``.
A token's relevance thus says what its identity contributed, not its slot.  Rotary and relative
position schemes (Llama, T5) add no embedding, so nothing is set aside there.

Tasks (``task=``, detected from the model class or ``config.architectures`` when ``None``):

- ``"sequence-classification"``: the class logit (``target``: class index or label name;
  default the predicted class).
- ``"causal-lm"``: the next-token logit at the **last real token** of each row (the last position
  whose ``attention_mask`` is 1), under left or right padding, with or without a BOS token.
  Positions are passed as ``attention_mask.cumsum(-1) - 1`` where the model takes
  ``position_ids``, as ``generate()`` does, so a left-padded row is explained like the row alone.
  ``target``: token id or token string; default the argmax.
- ``"question-answering"``: the text is a ``(question, context)`` pair; the start logit at the
  start position and the end logit at the end position are explained separately
  (:attr:`TextExplanation.start`, :attr:`TextExplanation.end`); the top-level relevance is their
  sum, which is the explanation of the span score ``start_logit + end_logit`` (LRP is linear in
  the seed).  ``target=(start, end)`` token positions, default the best span inside the context.
- ``"seq2seq"``: the decoder's logit at output position ``position`` (default 0, the first
  generated token).  With ``target_text`` the decoder is teacher-forced on it and the default
  target is its token at ``position``; without, the decoder input is the greedy decoding up to
  ``position`` and the target is the greedy token.  Relevance over the encoder's input tokens,
  and over the decoder's input tokens in :attr:`TextExplanation.decoder_token_relevance`.

The model is not changed: no mode switch, no parameter flag (the forward pass runs under
:func:`dynamiclrp.record`, which restores what it touches), the hook is removed.  Eval mode is the
caller's job: a model in training mode raises :class:`TrainingModeError` (dropout would make the
explanation random) unless ``allow_train_mode=True``.  The forward pass runs under
``torch.enable_grad()`` (an explanation needs the autograd graph), not under ``inference_mode``.

Padding is only as harmless as the model's use of ``attention_mask``: the real tokens of a padded
row get the relevance they get alone when the model masks the padding out (every architecture in
``tests/test_hf.py``, Mamba included, which zeroes padded states).  ``transformers``' eager
attention in float64 turns a fully masked (left-padding) query row into NaN, which reaches the
real tokens through ``0 * NaN``; the engine then raises on the NaN output; use SDPA attention,
float32, or right padding there.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .engine import LRP
from .errors import DynamicLRPError, TargetError
from .ledger import RelevanceReport
from .presets import Rules
from .recording import record

__all__ = [
    "TASKS",
    "TaskError",
    "TextExplanation",
    "TrainingModeError",
    "detect_task",
    "explain_text",
    "load",
    "merge_word_pieces",
]

TASKS = ("sequence-classification", "causal-lm", "question-answering", "seq2seq")


class TrainingModeError(DynamicLRPError, RuntimeError):
    """The model is in training mode (dropout active) and ``allow_train_mode`` was not given."""


class TaskError(DynamicLRPError, ValueError):
    """The task cannot be detected, or the text/inputs do not fit it."""


@dataclass
class TextExplanation:
    """The explanation of one batch of texts.

    Attributes
    ----------
    task:
        One of :data:`TASKS`.
    tokens:
        Per row, every token string (special tokens and padding included).
    token_ids:
        ``(batch, T)`` input ids.
    token_relevance:
        ``(batch, T)``: relevance at each token's embedding, summed over the embedding dimension.
    relevance:
        ``(batch, T, D)``: the relevance at the token embeddings itself.
    special_tokens_mask:
        ``(batch, T)`` bool: special tokens and padding (never part of a word).
    attention_mask:
        ``(batch, T)``: the model's attention mask (1 = real token).
    words, word_relevance:
        Per row, the words (special tokens and padding left out) and a 1-D tensor of their
        relevance, the sum over their word pieces (:func:`merge_word_pieces`).
    target:
        ``(batch,)``: the explained class / token id (QA: see :attr:`start`, :attr:`end`).
    target_label:
        Per row, the explained class's label or token's string.
    prediction:
        ``(batch,)``: the argmax at the explained position.
    explained_logit:
        ``(batch,)``: the value of the explained logit (the seeded relevance per row).
    position:
        ``(batch,)``: the explained position (causal LM: last real token; seq2seq: decoder
        position; QA: start or end position), ``None`` for sequence classification.
    report:
        The :class:`~dynamiclrp.RelevanceReport` of the explanation (its books).
    start, end:
        QA only: the explanations of the start and of the end logit.
    answer:
        QA only: per row, the text of the explained span.
    decoder_tokens, decoder_token_ids, decoder_token_relevance:
        seq2seq only: the decoder's input tokens and their relevance.
    """

    task: str
    tokens: list[list[str]]
    token_ids: Tensor
    token_relevance: Tensor
    relevance: Tensor
    special_tokens_mask: Tensor
    attention_mask: Tensor
    words: list[list[str]]
    word_relevance: list[Tensor]
    target: Tensor | None = None
    target_label: list[str] = field(default_factory=list)
    prediction: Tensor | None = None
    explained_logit: Tensor | None = None
    position: Tensor | None = None
    report: RelevanceReport | None = None
    start: TextExplanation | None = None
    end: TextExplanation | None = None
    answer: list[str] | None = None
    decoder_tokens: list[list[str]] | None = None
    decoder_token_ids: Tensor | None = None
    decoder_token_relevance: Tensor | None = None

    def html(self, *, words: bool = True, title: str | None = None) -> str:
        """A self-contained HTML page of the relevance, one line per row
        (:func:`dynamiclrp.viz.token_html`): the words, or with ``words=False`` every token of
        the real positions (special tokens kept, padding left out)."""
        from .viz import token_html

        if words:
            return token_html(
                self.words,
                [w.tolist() for w in self.word_relevance],
                title=title,
                word_pieces="none",
            )
        keep = self.attention_mask.bool()
        rows = [
            [t for t, k in zip(r, m, strict=True) if k]
            for r, m in zip(self.tokens, keep.tolist(), strict=True)
        ]
        scores = [self.token_relevance[b][keep[b]].tolist() for b in range(len(rows))]
        return token_html(rows, scores, title=title)


# -- words --------------------------------------------------------------------------------------

_MARKERS = ("Ġ", "▁", "Ċ")


def _join_pieces(pieces: Sequence[str]) -> str:
    """Word-piece strings to a word: ``##`` continuation and ``Ġ``/``▁`` space markers removed."""
    out = []
    for i, p in enumerate(pieces):
        if i > 0 and p.startswith("##"):
            p = p[2:]
        out.append(p.lstrip("".join(_MARKERS)) if i == 0 else p)
    return "".join(out)


def merge_word_pieces(
    tokens: Sequence[str],
    scores: Tensor | Sequence[float],
    word_ids: Sequence[int | None],
    *,
    sequence_ids: Sequence[int | None] | None = None,
    offsets: Sequence[tuple[int, int]] | None = None,
    text: str | Sequence[str] | None = None,
    join: Callable[[Sequence[str]], str] | None = None,
) -> tuple[list[str], Tensor]:
    """Sum token scores into word scores.

    Parameters
    ----------
    tokens:
        The token strings of one row.
    scores:
        One score per token (1-D).
    word_ids:
        Per token its word index, ``None`` for special tokens and padding (a fast tokenizer's
        ``encoding.word_ids(row)``); those tokens belong to no word.
    sequence_ids:
        Per token the sequence it belongs to (``encoding.sequence_ids(row)``), for pairs: word
        indices restart in the second sequence.
    offsets, text:
        Character offsets of each token and the text (a pair of texts for a pair input): a word's
        string is then the text it covers.  Without them, ``join`` builds it from its pieces.
    join:
        ``pieces -> word`` (default: strip ``##`` continuation and ``Ġ``/``▁`` space markers).

    Returns
    -------
    ``(words, word_scores)``: words in order of first appearance, ``word_scores`` a 1-D tensor
    (the scores' dtype) with the sum of each word's token scores.
    """
    scores = torch.as_tensor(scores)
    if scores.dim() != 1 or not (len(tokens) == scores.numel() == len(word_ids)):
        raise ValueError(
            f"merge_word_pieces: tokens ({len(tokens)}), scores {tuple(scores.shape)} and "
            f"word_ids ({len(word_ids)}) must be one per token (scores 1-D)"
        )
    if sequence_ids is not None and len(sequence_ids) != len(word_ids):
        raise ValueError("merge_word_pieces: sequence_ids must have one entry per token")
    if offsets is not None and text is None:
        raise ValueError("merge_word_pieces: offsets= needs text= (the text they index)")
    texts = (text,) if isinstance(text, str) else tuple(text) if text is not None else None
    join = _join_pieces if join is None else join
    groups: dict[tuple[int, int], list[int]] = {}
    for i, w in enumerate(word_ids):
        if w is None:
            continue
        seq = 0 if sequence_ids is None else sequence_ids[i]
        groups.setdefault((seq if seq is not None else 0, w), []).append(i)
    words, sums = [], []
    for (seq, _), idx in groups.items():
        if offsets is not None and texts is not None:
            if seq >= len(texts):
                raise ValueError(
                    f"merge_word_pieces: a token of sequence {seq} but only {len(texts)} text(s)"
                )
            start = min(offsets[i][0] for i in idx)
            end = max(offsets[i][1] for i in idx)
            words.append(texts[seq][start:end])
        else:
            words.append(join([tokens[i] for i in idx]))
        sums.append(scores[idx].sum())
    word_scores = torch.stack(sums) if sums else scores.new_zeros(0)
    return words, word_scores


# -- loading ------------------------------------------------------------------------------------

_AUTO = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "question-answering": "AutoModelForQuestionAnswering",
    "seq2seq": "AutoModelForSeq2SeqLM",
}


def load(
    path_or_name: str,
    task: str | None = None,
    *,
    allow_download: bool = False,
    use_safetensors: bool | None = True,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local directory (or the Hub if ``allow_download=True``).

    Parameters
    ----------
    path_or_name:
        A directory written by ``save_pretrained`` or a model name in the local Hugging Face cache.
    task:
        One of :data:`TASKS`; ``None`` reads ``config.architectures`` to pick it.
    allow_download:
        ``False`` (default): ``from_pretrained(..., local_files_only=True)``, nothing is fetched.
    use_safetensors:
        Passed to ``from_pretrained``: ``True`` (default) loads only ``.safetensors`` weights (no
        pickle); ``None`` lets ``transformers`` fall back to a pickled checkpoint.
    dtype:
        Passed on as the model's ``dtype`` (``torch_dtype`` on ``transformers`` < 4.56).
    kwargs:
        More ``from_pretrained`` arguments for the model.

    Returns
    -------
    The model (``from_pretrained`` returns it in eval mode) and its tokenizer.
    """
    if allow_download:
        return _load(path_or_name, task, {}, use_safetensors, dtype, kwargs)
    with _hub_offline():
        return _load(path_or_name, task, {"local_files_only": True}, use_safetensors, dtype, kwargs)


@contextlib.contextmanager
def _hub_offline():
    """``huggingface_hub``'s offline switch, on for the duration of a local load.

    ``local_files_only=True`` alone still lets ``huggingface_hub`` fetch a registry from the Hub
    to build its request headers (``utils/_detect_agent.py``, 2026); with the switch on it makes
    no connection.  The previous value is restored on exit (another thread downloading at the
    same moment would see the switch on)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # transformers without huggingface_hub: nothing to switch
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _load(path_or_name, task, local, use_safetensors, dtype, kwargs):
    import transformers

    if task is None:
        config = transformers.AutoConfig.from_pretrained(path_or_name, **local)
        task = _task_from_names(list(config.architectures or []), config)
        if task is None:
            raise TaskError(
                f"load: cannot tell the task of {path_or_name!r} from config.architectures="
                f"{config.architectures}; pass task= (one of {TASKS})"
            )
    if task not in _AUTO:
        raise TaskError(f"load: unknown task {task!r}; use one of {TASKS}")
    extra = dict(kwargs)
    if dtype is not None:
        extra["dtype"] = dtype
    auto = getattr(transformers, _AUTO[task])
    model = auto.from_pretrained(path_or_name, use_safetensors=use_safetensors, **local, **extra)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path_or_name, **local)
    return model, tokenizer


# -- task detection -----------------------------------------------------------------------------


def _task_from_names(names: Sequence[str], config: Any) -> str | None:
    for name in names:
        if name.endswith("ForSequenceClassification"):
            return "sequence-classification"
        if name.endswith("ForQuestionAnswering"):
            return "question-answering"
        if name.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if name.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")) and getattr(
            config, "is_encoder_decoder", False
        ):
            return "seq2seq"
    return None


def detect_task(model: nn.Module) -> str:
    """The task of a model from its class name, else from ``config.architectures``."""
    config = getattr(model, "config", None)
    task = _task_from_names([type(model).__name__], config)
    if task is None and config is not None:
        task = _task_from_names(list(getattr(config, "architectures", None) or []), config)
    if task is None:
        raise TaskError(
            f"Cannot tell which task {type(model).__name__} solves (class name and "
            f"config.architectures match none of *ForSequenceClassification, *ForCausalLM / "
            f"*LMHeadModel, *ForQuestionAnswering, encoder-decoder *ForConditionalGeneration); "
            f"pass task= (one of {TASKS})"
        )
    return task


# -- the forward pass ---------------------------------------------------------------------------


class _Capture:
    """Forward hooks that replace an embedding module's output by a leaf that requires grad."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)
        self.leaves: list[list[Tensor]] = [[] for _ in self.modules]
        self.handles: list = []

    def __enter__(self):
        for k, module in enumerate(self.modules):
            self.handles.append(module.register_forward_hook(self._hook(k)))
        return self

    def _hook(self, k: int):
        def hook(module, args, out):
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"The input embedding {type(module).__name__} returned "
                    f"{type(out).__name__}, not a tensor; dynamiclrp.hf cannot capture it"
                )
            leaf = out.detach().requires_grad_()
            self.leaves[k].append(leaf)
            return leaf

        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def one(self, k: int, what: str) -> Tensor:
        if len(self.leaves[k]) != 1:
            raise DynamicLRPError(
                f"The {what} embedding module ran {len(self.leaves[k])} times in one forward pass "
                "(expected once), so its output is not one token per input id; dynamiclrp.hf "
                "cannot tell which call to explain. Explain this model with dynamiclrp.explain "
                "on a tensor you capture yourself."
            )
        return self.leaves[k][0]


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _run(model: nn.Module, modules: Sequence[nn.Module], kwargs: dict) -> tuple[Any, _Capture, Any]:
    with torch.enable_grad(), _Capture(modules) as cap, record(model) as rec:
        out = model(**kwargs)
    return out, cap, rec


# -- inputs -------------------------------------------------------------------------------------


def _is_encoding(text: Any) -> bool:
    return hasattr(text, "keys") and "input_ids" in text


def _encode(tokenizer, text, task: str, max_length: int | None, device) -> tuple[Any, dict, list]:
    """The BatchEncoding, the model's inputs on ``device``, and per row the source text(s)
    (``None`` for a pre-tokenized input)."""
    if _is_encoding(text):
        enc = text
        if enc["input_ids"].dim() != 2:
            raise TaskError("A pre-tokenized input must hold 2-D input_ids (batch, T)")
        sources = [None] * enc["input_ids"].shape[0]
    else:
        if task == "question-answering":
            pairs = [text] if isinstance(text, tuple) else list(text)
            if not pairs or not all(
                isinstance(p, tuple | list) and len(p) == 2 and all(isinstance(s, str) for s in p)
                for p in pairs
            ):
                raise TaskError(
                    "question-answering takes a (question, context) pair of strings or a list of "
                    f"such pairs, got {type(text).__name__}"
                )
            texts = [tuple(p) for p in pairs]
            args = ([q for q, _ in texts], [c for _, c in texts])
            trunc = "only_second" if max_length is not None else False
        else:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or not all(isinstance(s, str) for s in texts):
                raise TaskError(
                    f"text must be a string, a list of strings or a BatchEncoding, got "
                    f"{type(text).__name__}"
                )
            args = (texts,)
            trunc = max_length is not None
        if len(texts) > 1 and tokenizer.pad_token is None:
            raise TaskError(
                "A batch of texts needs padding but the tokenizer has no pad token; set one "
                "(e.g. tokenizer.pad_token = tokenizer.eos_token) or explain one text at a time"
            )
        enc = tokenizer(
            *args,
            return_tensors="pt",
            padding=len(texts) > 1,
            truncation=trunc,
            max_length=max_length,
            return_offsets_mapping=bool(getattr(tokenizer, "is_fast", False)),
        )
        sources = [(t,) if isinstance(t, str) else t for t in texts]
    model_inputs = {
        k: v.to(device) if isinstance(v, Tensor) else v
        for k, v in enc.items()
        if k not in ("offset_mapping", "special_tokens_mask", "overflow_to_sample_mapping")
    }
    if "attention_mask" not in model_inputs:
        model_inputs["attention_mask"] = torch.ones_like(model_inputs["input_ids"])
    return enc, model_inputs, sources


def _words(tokenizer, enc, tokens, scores: Tensor, sources) -> tuple[list, list]:
    if getattr(enc, "encodings", None) is None:
        raise TaskError(
            "Word merging needs a fast tokenizer's encoding (word_ids()); use a fast tokenizer "
            "(PreTrainedTokenizerFast) or pass a BatchEncoding it produced"
        )
    words, word_scores = [], []
    offsets = enc.get("offset_mapping")
    for b in range(scores.shape[0]):
        src = sources[b]
        w, s = merge_word_pieces(
            tokens[b],
            scores[b],
            enc.word_ids(b),
            sequence_ids=enc.sequence_ids(b),
            offsets=offsets[b].tolist() if offsets is not None and src is not None else None,
            text=src,
            join=tokenizer.convert_tokens_to_string
            if hasattr(tokenizer, "convert_tokens_to_string")
            else None,
        )
        words.append([x.strip() for x in w])
        word_scores.append(s)
    return words, word_scores


def _special_mask(enc, tokenizer, ids: Tensor, attention: Tensor) -> Tensor:
    if getattr(enc, "encodings", None) is not None:
        rows = [[w is None for w in enc.word_ids(b)] for b in range(ids.shape[0])]
        special = torch.tensor(rows, dtype=torch.bool, device=ids.device)
    else:
        special = torch.tensor(
            [
                tokenizer.get_special_tokens_mask(r, already_has_special_tokens=True)
                for r in ids.tolist()
            ],
            dtype=torch.bool,
            device=ids.device,
        )
    return special | (attention == 0)


# -- targets ------------------------------------------------------------------------------------


def _per_row(target, batch: int, what: str) -> list:
    if isinstance(target, Tensor):
        target = target.tolist() if target.dim() else int(target)
    if isinstance(target, list | tuple):
        if len(target) != batch:
            raise TargetError(f"{what}: {len(target)} targets for a batch of {batch} rows")
        return list(target)
    return [target] * batch


def _class_ids(model, target, logits: Tensor) -> Tensor:
    batch, classes = logits.shape
    if target is None:
        return logits.detach().argmax(-1)
    label2id = getattr(model.config, "label2id", None) or {}
    out = []
    for t in _per_row(target, batch, "sequence-classification target"):
        if isinstance(t, str):
            if t not in label2id:
                raise TargetError(f"Unknown label {t!r}; the model's labels: {sorted(label2id)}")
            t = int(label2id[t])
        if isinstance(t, bool) or not isinstance(t, int) or not -classes <= t < classes:
            raise TargetError(f"class target {t!r} is not a class index in 0..{classes - 1}")
        out.append(t % classes)
    return torch.tensor(out, device=logits.device)


def _token_ids(tokenizer, target, logits: Tensor, what: str) -> Tensor:
    batch, vocab = logits.shape
    if target is None:
        return logits.detach().argmax(-1)
    out = []
    for t in _per_row(target, batch, what):
        if isinstance(t, str):
            t = _token_id(tokenizer, t)
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise TargetError(f"{what}: token target {t!r} is not a token id in 0..{vocab - 1}")
        out.append(t)
    return torch.tensor(out, device=logits.device)


def _token_id(tokenizer, token: str) -> int:
    vocab = tokenizer.get_vocab()
    if token in vocab:
        return int(vocab[token])
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise TargetError(
            f"target {token!r} is not one token: the tokenizer splits it into {pieces}; pass a "
            "token id or one of those tokens"
        )
    return int(ids[0])


def _labels(model, task: str, tokenizer, ids: Tensor) -> list[str]:
    if task == "sequence-classification":
        id2label = getattr(model.config, "id2label", None) or {}
        return [str(id2label.get(i, i)) for i in ids.tolist()]
    return _tokens(tokenizer, ids.tolist())


def _tokens(tokenizer, ids: list[int]) -> list[str]:
    """Token strings; an id the tokenizer does not know (a model vocabulary padded past the
    tokenizer's) is shown as ``<id N>``."""
    return [
        t if t is not None else f"<id {i}>"
        for t, i in zip(tokenizer.convert_ids_to_tokens(ids), ids, strict=True)
    ]


# -- explain ------------------------------------------------------------------------------------


def explain_text(
    model: nn.Module,
    tokenizer: Any,
    text: Any,
    *,
    task: str | None = None,
    target: Any = None,
    rules: str | Rules = "dynamiclrp",
    max_length: int | None = None,
    target_text: str | Sequence[str] | None = None,
    position: int | None = None,
    max_answer_length: int = 30,
    allow_train_mode: bool = False,
) -> TextExplanation:
    """Explain a Hugging Face text model's prediction for ``text`` (see the module docstring).

    Parameters
    ----------
    model:
        A ``transformers`` model of one of :data:`TASKS` (in eval mode).
    tokenizer:
        Its tokenizer; a fast one (for words).  Its ``padding_side`` is used as is.
    text:
        A string, a list of strings (a batch), a ``BatchEncoding`` from ``tokenizer``, or for
        question answering a ``(question, context)`` pair or a list of pairs.
    task:
        One of :data:`TASKS`; ``None`` detects it from the model.
    target:
        Sequence classification: class index or label (default: predicted class).  Causal LM and
        seq2seq: token id or token string (default: argmax; seq2seq with ``target_text``: its
        token).  QA: ``(start, end)`` token positions (default: best span in the context).  One
        value for all rows or a list with one per row.
    rules:
        A preset name or :class:`~dynamiclrp.Rules`.
    max_length:
        Truncate the input to this many tokens (QA: truncate the context).
    target_text:
        seq2seq: the decoder's teacher-forcing text (one per row).
    position:
        seq2seq: the decoder output position to explain (default 0).
    max_answer_length:
        QA: longest predicted span in tokens.
    allow_train_mode:
        Explain a model in training mode anyway (dropout makes the result random).

    Returns
    -------
    :class:`TextExplanation`.
    """
    import transformers  # noqa: F401  (a clear ImportError if it is missing)

    if model.training and not allow_train_mode:
        raise TrainingModeError(
            f"{type(model).__name__} is in training mode (dropout on), so the explanation would "
            "be random. Call model.eval() first, or pass allow_train_mode=True to explain it as "
            "it is."
        )
    task = detect_task(model) if task is None else task
    if task not in TASKS:
        raise TaskError(f"Unknown task {task!r}; use one of {TASKS}")
    if task != "seq2seq" and (target_text is not None or position is not None):
        raise TaskError("target_text= and position= apply to task='seq2seq' only")
    lrp = LRP(rules, cache_size=2)
    device = _device(model)
    enc, inputs, sources = _encode(tokenizer, text, task, max_length, device)
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    tokens = [_tokens(tokenizer, r) for r in ids.tolist()]
    special = _special_mask(enc, tokenizer, ids, attention)

    def finish(rel: Tensor, **fields) -> TextExplanation:
        scores = rel.detach().sum(-1)
        words, word_scores = _words(tokenizer, enc, tokens, scores, sources)
        return TextExplanation(
            task=task,
            tokens=tokens,
            token_ids=ids,
            token_relevance=scores,
            relevance=rel.detach(),
            special_tokens_mask=special,
            attention_mask=attention,
            words=words,
            word_relevance=word_scores,
            **fields,
        )

    if task == "seq2seq":
        return _explain_seq2seq(
            model, tokenizer, lrp, inputs, target, target_text, position, finish, sources
        )
    if task == "causal-lm":
        kwargs = dict(inputs)
        if _accepts(model, "position_ids"):
            kwargs["position_ids"] = (attention.long().cumsum(-1) - 1).clamp(min=0)
        if _accepts(model, "use_cache"):
            kwargs["use_cache"] = False
    else:
        kwargs = dict(inputs)
    out, cap, rec = _run(model, [model.get_input_embeddings()], kwargs)
    x = cap.one(0, "input")
    batch = ids.shape[0]
    rows = torch.arange(batch, device=device)

    if task == "question-answering":
        return _explain_qa(
            lrp, out, x, rec, target, tokenizer, enc, sources, special, max_answer_length, finish
        )
    if task == "sequence-classification":
        logits = out.logits
        pos = None
    else:
        pos = _last_real(attention)
        logits = out.logits[rows, pos]
    if task == "sequence-classification":
        tgt = _class_ids(model, target, logits)
    else:
        tgt = _token_ids(tokenizer, target, logits, "causal-lm target")
    rel = lrp.explain(logits, x, tgt, recording=rec)
    return finish(
        rel,
        target=tgt,
        target_label=_labels(model, task, tokenizer, tgt),
        prediction=logits.detach().argmax(-1),
        explained_logit=logits.detach()[rows, tgt],
        position=pos,
        report=lrp.report,
    )


def _last_real(attention: Tensor) -> Tensor:
    """Per row, the index of the last position whose attention mask is 1."""
    real = attention != 0
    if not bool(real.any(-1).all()):
        raise TaskError("A row of the batch has no real token (its attention mask is all zero)")
    idx = torch.arange(real.shape[1], device=real.device).expand_as(real)
    return torch.where(real, idx, -1).amax(-1)


def _explain_qa(lrp, out, x, rec, target, tokenizer, enc, sources, special, max_len, finish):
    start_logits, end_logits = out.start_logits, out.end_logits
    batch, length = start_logits.shape
    rows = torch.arange(batch, device=x.device)
    if target is None:
        allowed = ~special
        if getattr(enc, "encodings", None) is not None:
            ctx = torch.tensor(
                [[s == 1 for s in enc.sequence_ids(b)] for b in range(batch)], device=x.device
            )
            if bool(ctx.any()):
                allowed = allowed & ctx
        s = start_logits.detach().masked_fill(~allowed, float("-inf"))
        e = end_logits.detach().masked_fill(~allowed, float("-inf"))
        score = s[:, :, None] + e[:, None, :]
        i = torch.arange(length, device=x.device)
        valid = (i[None, :] >= i[:, None]) & (i[None, :] - i[:, None] < max_len)
        score = score.masked_fill(~valid, float("-inf")).flatten(1)
        if not bool(torch.isfinite(score.amax(-1)).all()):
            raise TaskError("A row has no candidate answer span (no context token)")
        best = score.argmax(-1)
        spans = torch.stack([best // length, best % length], -1)
    else:
        pairs = [target] if _is_pair(target) else list(target)
        if len(pairs) == 1 and batch > 1:
            pairs = pairs * batch
        if len(pairs) != batch or not all(_is_pair(p) for p in pairs):
            raise TargetError(
                "question-answering target= is a (start, end) pair of token positions, or one "
                f"pair per row ({batch} rows)"
            )
        spans = torch.tensor([list(p) for p in pairs], device=x.device)
        if bool((spans < 0).any() | (spans >= length).any() | (spans[:, 1] < spans[:, 0]).any()):
            raise TargetError(
                f"QA span {spans.tolist()} must satisfy 0 <= start <= end < {length} (token "
                "positions)"
            )
    parts = {}
    for name, logits, col in (("start", start_logits, 0), ("end", end_logits, 1)):
        tgt = spans[:, col]
        rel = lrp.explain(logits, x, tgt, recording=rec)
        parts[name] = finish(
            rel,
            target=tgt,
            target_label=[str(t) for t in tgt.tolist()],
            prediction=logits.detach().argmax(-1),
            explained_logit=logits.detach()[rows, tgt],
            position=tgt,
            report=lrp.report,
        )
    answers = _answers(tokenizer, enc, enc["input_ids"], sources, spans)
    total = parts["start"].relevance + parts["end"].relevance
    return finish(
        total,
        target=spans,
        target_label=answers,
        prediction=None,
        explained_logit=parts["start"].explained_logit + parts["end"].explained_logit,
        position=spans,
        report=None,
        start=parts["start"],
        end=parts["end"],
        answer=answers,
    )


def _is_pair(p) -> bool:
    return (
        isinstance(p, tuple | list)
        and len(p) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in p)
    )


def _answers(tokenizer, enc, ids: Tensor, sources, spans: Tensor) -> list[str]:
    """Per row the span's text: the context it covers (offsets), else the decoded tokens."""
    offsets = enc.get("offset_mapping")
    out = []
    for b, (s, e) in enumerate(spans.tolist()):
        src = sources[b]
        seq = enc.sequence_ids(b) if getattr(enc, "encodings", None) is not None else None
        if offsets is not None and src is not None and seq is not None and seq[s] is not None:
            text = src[seq[s]]
            out.append(text[int(offsets[b][s][0]) : int(offsets[b][e][1])])
        else:
            out.append(tokenizer.decode(ids[b, s : e + 1].tolist(), skip_special_tokens=True))
    return out


def _explain_seq2seq(model, tokenizer, lrp, inputs, target, target_text, position, finish, srcs):
    config = model.config
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        raise TaskError(
            f"{type(model).__name__}.config.decoder_start_token_id is None; seq2seq needs it"
        )
    batch = inputs["input_ids"].shape[0]
    device = inputs["input_ids"].device
    p = 0 if position is None else position
    if isinstance(p, bool) or not isinstance(p, int) or p < 0:
        raise TaskError(f"position= must be a non-negative int (a decoder position), got {p!r}")
    begin = torch.full((batch, 1), start, dtype=torch.long, device=device)
    gold = None
    if target_text is not None:
        texts = [target_text] if isinstance(target_text, str) else list(target_text)
        if len(texts) != batch:
            raise TaskError(f"{len(texts)} target_text(s) for a batch of {batch} rows")
        pad = config.pad_token_id if config.pad_token_id is not None else start
        labels = [tokenizer(text_target=t)["input_ids"] for t in texts]
        if any(p >= len(row) for row in labels):
            raise TaskError(
                f"position={p} is past the end of a target_text ({[len(r) for r in labels]} tokens)"
            )
        width = max(len(r) for r in labels)
        lab = torch.tensor([r + [pad] * (width - len(r)) for r in labels], device=device)
        decoder = torch.cat([begin, lab[:, :-1]], 1)[:, : p + 1]
        gold = lab[:, p]
    else:
        decoder = begin
        with torch.no_grad():
            for _ in range(p):
                step = model(**inputs, decoder_input_ids=decoder, use_cache=False)
                decoder = torch.cat([decoder, step.logits[:, -1].argmax(-1, keepdim=True)], 1)
    modules = [
        model.get_encoder().get_input_embeddings(),
        model.get_decoder().get_input_embeddings(),
    ]
    if modules[0] is modules[1]:
        raise TaskError(
            f"{type(model).__name__}'s encoder and decoder share one embedding module; "
            "dynamiclrp.hf cannot tell their calls apart"
        )
    kwargs = dict(inputs, decoder_input_ids=decoder, use_cache=False)
    out, cap, rec = _run(model, modules, kwargs)
    x, y = cap.one(0, "encoder"), cap.one(1, "decoder")
    logits = out.logits[:, p]
    if target is None and gold is not None:
        tgt = gold
    else:
        tgt = _token_ids(tokenizer, target, logits, "seq2seq target")
    rel_x, rel_y = lrp.explain(logits, (x, y), tgt, recording=rec)
    rows = torch.arange(batch, device=device)
    return finish(
        rel_x,
        target=tgt,
        target_label=_labels(model, "seq2seq", tokenizer, tgt),
        prediction=logits.detach().argmax(-1),
        explained_logit=logits.detach()[rows, tgt],
        position=torch.full((batch,), p, device=device),
        report=lrp.report,
        decoder_tokens=[_tokens(tokenizer, r) for r in decoder.tolist()],
        decoder_token_ids=decoder,
        decoder_token_relevance=rel_y.detach().sum(-1),
    )
