"""Synthetic token data with known ground truth for the faithfulness benchmark.

Three generators, each deterministic for a given seed (one private ``random.Random(seed)``, no
global state), each with a fixed word-level :class:`Vocabulary`:

- :func:`sentiment_data`: sentences of filler, distractor and sentiment words with negations.
  A sentiment word has polarity ``+1`` (positive lexicon) or ``-1`` (negative lexicon); a
  negation immediately before it flips it: ``polarity(phrase) = -polarity(word)`` if negated.
  Every sentence holds one or two sentiment phrases that all have the same polarity, and the
  label is that polarity (``1`` positive, ``0`` negative).  Evidence: the sentiment words and
  their negations.
- :func:`recall_data`: key-value recall, ``[BOS] k_1 v_1 ... k_P v_P [SEP] k_q`` (optionally
  with earlier answered queries after ``[SEP]``); the next token is ``v_q``, the value paired
  with the last queried key (keys are distinct within a sequence).  Evidence: the context
  positions of ``k_q`` and ``v_q``.
- :func:`qa_data`: extractive QA, ``[CLS] where is the <colour> <object> ? [SEP] <facts> [SEP]``
  with facts ``the <colour> <object> <relation> the <place> .``; the answer is the place of the
  asked (colour, object) pair.  ``spans`` are the answer's inclusive token indices; evidence:
  the answer span and the colour and object words of the answering fact.

:func:`predict_spans` and :func:`span_f1` score extractive QA predictions.

Batches are :class:`TokenData`: ``(N, T)`` tensors padded with ``[PAD]`` on the right (or the
left, ``padding="left"``); ``mask`` is ``True`` on real tokens, ``rankable`` on real tokens that
are neither special tokens nor (QA) question tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]")
"""The special tokens; they take ids 0 to 5 of every vocabulary, in this order."""


class Vocabulary:
    """A word-level vocabulary: the special tokens (ids 0-5) followed by ``words`` in order.

    Parameters
    ----------
    words:
        The ordinary words; they must be distinct and not special tokens.
    """

    def __init__(self, words: Sequence[str]) -> None:
        words = list(words)
        clash = [w for w in words if w in SPECIAL_TOKENS]
        if clash:
            raise ValueError(f"Vocabulary: words {clash} are special tokens; rename them")
        dup = sorted({w for w in words if words.count(w) > 1})
        if dup:
            raise ValueError(f"Vocabulary: words {dup} occur more than once; list each once")
        self.tokens: tuple[str, ...] = SPECIAL_TOKENS + tuple(words)
        self._ids = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id, self.bos_id = range(6)
        self.special_ids: frozenset[int] = frozenset(range(len(SPECIAL_TOKENS)))

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, word: str) -> bool:
        return word in self._ids

    def id(self, word: str) -> int:
        """The id of ``word``; raises ``KeyError`` for a word not in the vocabulary."""
        if word not in self._ids:
            raise KeyError(f"{word!r} is not in the vocabulary ({len(self)} tokens)")
        return self._ids[word]

    def encode(self, words: Sequence[str], strict: bool = False) -> list[int]:
        """Ids of ``words``; an unknown word becomes ``[UNK]`` (or raises if ``strict``)."""
        if strict:
            return [self.id(w) for w in words]
        return [self._ids.get(w, self.unk_id) for w in words]

    def decode(self, ids: Sequence[int] | Tensor, skip_pad: bool = False) -> list[str]:
        """Tokens of ``ids`` (``[PAD]`` dropped if ``skip_pad``); raises for an id out of range."""
        out = []
        for i in [int(v) for v in ids]:
            if not 0 <= i < len(self.tokens):
                raise IndexError(f"token id {i} is outside the vocabulary (0..{len(self) - 1})")
            if skip_pad and i == self.pad_id:
                continue
            out.append(self.tokens[i])
        return out


@dataclass
class TokenData:
    """A padded batch of generated sequences.

    Attributes
    ----------
    ids:
        ``(N, T)`` long token ids, padded with ``vocab.pad_id``.
    mask:
        ``(N, T)`` bool, ``True`` on real (non-padding) tokens: the attention mask.
    labels:
        ``(N,)`` long: the class (sentiment), the next token id (recall) or 0 (QA).
    evidence:
        ``(N, T)`` bool: the tokens that decide the label (see each generator).
    rankable:
        ``(N, T)`` bool: real tokens that are not special tokens and not question tokens.
    vocab:
        The vocabulary of ``ids``.
    padding:
        ``"right"`` or ``"left"``.
    spans:
        QA only: ``(N, 2)`` long inclusive gold answer spans (indices into ``ids``' rows).
    question:
        QA only: ``(N, T)`` bool, the question's words.
    context:
        QA only: ``(N, T)`` bool, the context's tokens (the facts, without the final ``[SEP]``).
    """

    ids: Tensor
    mask: Tensor
    labels: Tensor
    evidence: Tensor
    rankable: Tensor
    vocab: Vocabulary
    padding: str = "right"
    spans: Tensor | None = None
    question: Tensor | None = None
    context: Tensor | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def words(self, i: int) -> list[str]:
        """The tokens of row ``i`` without padding."""
        return self.vocab.decode(self.ids[i], skip_pad=True)


def _pad(
    rows: list[list[int]], fill: int | bool, padding: str, width: int | None = None
) -> list[list[int]]:
    if padding not in ("right", "left"):
        raise ValueError(f"padding must be 'right' or 'left', got {padding!r}")
    width = max(len(r) for r in rows) if width is None else width
    if padding == "right":
        return [r + [fill] * (width - len(r)) for r in rows]
    return [[fill] * (width - len(r)) + r for r in rows]


def _assemble(
    vocab: Vocabulary,
    tokens: list[list[str]],
    evidence: list[list[bool]],
    labels: list[int],
    padding: str,
    question: list[list[bool]] | None = None,
    context: list[list[bool]] | None = None,
    spans: list[tuple[int, int]] | None = None,
) -> TokenData:
    ids = [vocab.encode(t, strict=True) for t in tokens]
    width = max(len(r) for r in ids)
    ids_t = torch.tensor(_pad(ids, vocab.pad_id, padding, width), dtype=torch.long)
    mask = torch.tensor(_pad([[True] * len(r) for r in ids], False, padding, width))
    ev = torch.tensor(_pad(evidence, False, padding, width))
    special = torch.zeros_like(mask)
    for s in vocab.special_ids:
        special |= ids_t == s
    rankable = mask & ~special
    q_t = c_t = spans_t = None
    if question is not None:
        q_t = torch.tensor(_pad(question, False, padding, width))
        rankable &= ~q_t
    if context is not None:
        c_t = torch.tensor(_pad(context, False, padding, width))
    if spans is not None:
        shift = torch.tensor([width - len(r) if padding == "left" else 0 for r in ids])
        spans_t = torch.tensor(spans, dtype=torch.long) + shift[:, None]
    return TokenData(
        ids=ids_t,
        mask=mask,
        labels=torch.tensor(labels, dtype=torch.long),
        evidence=ev,
        rankable=rankable,
        vocab=vocab,
        padding=padding,
        spans=spans_t,
        question=q_t,
        context=c_t,
    )


# --- sentiment ---------------------------------------------------------------------------------

POSITIVE = ("good", "great", "excellent", "wonderful", "superb", "lovely", "brilliant", "fun")
NEGATIVE = ("bad", "awful", "terrible", "poor", "boring", "dreadful", "horrible", "dull")
NEGATIONS = ("not", "never")
FILLER = (
    "the", "a", "film", "movie", "was", "is", "and", "it", "this", "quite", "really", "very",
    "so", "story", "overall", "i", "thought", "but", "also", "with", "of", "to",
)  # fmt: skip
DISTRACTORS = (
    "actor", "music", "director", "camera", "city", "summer", "ending", "dialogue", "cast",
    "budget", "sequel", "scene", "colour", "length", "studio", "novel",
)  # fmt: skip
SENTIMENT_VOCAB = Vocabulary(POSITIVE + NEGATIVE + NEGATIONS + FILLER + DISTRACTORS)


def sentiment_label(words: Sequence[str]) -> int:
    """The label of a sentence by the negation rule: ``1`` if its phrases are positive, else 0.

    A phrase is a sentiment word, negated (polarity flipped) if the word before it is in
    :data:`NEGATIONS`.  Raises if there is no phrase or the phrases disagree.
    """
    pols = []
    for i, w in enumerate(words):
        if w in POSITIVE or w in NEGATIVE:
            p = 1 if w in POSITIVE else -1
            pols.append(-p if i > 0 and words[i - 1] in NEGATIONS else p)
    if not pols or len(set(pols)) != 1:
        raise ValueError(f"sentence {' '.join(words)!r} has phrase polarities {pols}")
    return int(pols[0] > 0)


def sentiment_data(
    n: int,
    seed: int,
    *,
    min_words: int = 6,
    max_words: int = 14,
    p_negation: float = 0.4,
    prefix: Sequence[str] = ("[CLS]",),
    suffix: Sequence[str] = ("[SEP]",),
    padding: str = "right",
) -> TokenData:
    """``n`` sentiment sentences: filler and distractor words around 1 or 2 sentiment phrases.

    Each sample draws its label ``y`` uniformly, a length ``L`` uniformly in
    ``[min_words, max_words]`` (words, without ``prefix``/``suffix``), and one or two phrases; a
    phrase is negated with probability ``p_negation`` (``"not good"`` has polarity -1), and its
    sentiment word is drawn from the lexicon that makes the phrase's polarity ``y``.  The
    remaining words are filler (2/3) or distractors (1/3), and the phrases are placed at random
    non-overlapping positions.  The label follows :func:`sentiment_label`.
    """
    if not 3 <= min_words <= max_words:
        raise ValueError(f"need 3 <= min_words <= max_words, got {min_words}, {max_words}")
    rng = random.Random(seed)
    tokens, evidence, labels = [], [], []
    for _ in range(n):
        y = rng.randrange(2)
        length = rng.randint(min_words, max_words)
        n_phrases = rng.choice((1, 2)) if length >= 6 else 1
        phrases = []
        for _ in range(n_phrases):
            neg = rng.random() < p_negation
            positive_word = (y == 1) != neg
            word = rng.choice(POSITIVE if positive_word else NEGATIVE)
            phrases.append([rng.choice(NEGATIONS), word] if neg else [word])
        n_other = length - sum(len(p) for p in phrases)
        other = [
            rng.choice(FILLER) if rng.random() < 2 / 3 else rng.choice(DISTRACTORS)
            for _ in range(n_other)
        ]
        # insertion slots: distinct gaps of the filler sequence, so phrases never touch
        slots = sorted(rng.sample(range(n_other + 1), n_phrases))
        words: list[str] = []
        ev: list[bool] = []
        k = 0
        for gap in range(n_other + 1):
            if k < n_phrases and slots[k] == gap:
                words += phrases[k]
                ev += [True] * len(phrases[k])
                k += 1
            if gap < n_other:
                words.append(other[gap])
                ev.append(False)
        tokens.append(list(prefix) + words + list(suffix))
        evidence.append([False] * len(prefix) + ev + [False] * len(suffix))
        labels.append(y)
    return _assemble(SENTIMENT_VOCAB, tokens, evidence, labels, padding)


# --- key-value recall --------------------------------------------------------------------------

N_KEYS = 16
N_VALUES = 16
KEYS = tuple(f"k{i}" for i in range(N_KEYS))
VALUES = tuple(f"v{i}" for i in range(N_VALUES))
RECALL_VOCAB = Vocabulary(KEYS + VALUES)


def recall_data(
    n: int, seed: int, *, n_pairs: int = 6, n_queries: int = 1, value_first: bool = False
) -> TokenData:
    """``n`` recall sequences ``[BOS] k_1 v_1 ... k_P v_P [SEP] (q_j a_j)_{j<m} q_m``.

    Keys are ``P`` distinct draws from :data:`KEYS`, values independent draws (with repetition)
    from :data:`VALUES`; with ``value_first`` each pair is written ``v_i k_i``.  The last query
    ``q_m`` is a uniformly drawn context key; the ``m - 1 = n_queries - 1`` earlier queries are
    drawn with replacement from the other keys, each followed by its answer ``a_j`` (the value
    paired with it), so the last answer never appears after ``[SEP]`` and cannot be found by
    elimination unless the earlier queries cover every other key.  ``labels`` is the id of the
    last query's value, the gold next token.  Evidence marks the context positions of the last
    query's key and value (the queries are rankable but not evidence).  Every sequence has length
    ``2P + 2m + 1``: no padding.
    """
    if not 1 <= n_pairs <= N_KEYS:
        raise ValueError(f"n_pairs must be in 1..{N_KEYS}, got {n_pairs}")
    if n_queries < 1 or (n_queries > 1 and n_pairs < 2):
        raise ValueError(f"n_queries={n_queries} needs n_queries >= 1 and, above 1, n_pairs >= 2")
    rng = random.Random(seed)
    tokens, evidence, labels = [], [], []
    for _ in range(n):
        keys = rng.sample(KEYS, n_pairs)
        values = [rng.choice(VALUES) for _ in range(n_pairs)]
        q = rng.randrange(n_pairs)
        earlier = [rng.choice([j for j in range(n_pairs) if j != q]) for _ in range(n_queries - 1)]
        seq = ["[BOS]"]
        for k, v in zip(keys, values, strict=True):
            seq += [v, k] if value_first else [k, v]
        seq.append("[SEP]")
        for j in earlier:
            seq += [keys[j], values[j]]
        seq.append(keys[q])
        ev = [False] * len(seq)
        ev[1 + 2 * q] = ev[2 + 2 * q] = True
        tokens.append(seq)
        evidence.append(ev)
        labels.append(RECALL_VOCAB.id(values[q]))
    return _assemble(RECALL_VOCAB, tokens, evidence, labels, "right")


# --- extractive QA -----------------------------------------------------------------------------

COLOURS = ("red", "blue", "green", "yellow", "black", "white")
OBJECTS = ("box", "ball", "cup", "book", "key", "hat", "lamp", "coin")
PLACES = (
    ("kitchen",), ("garden",), ("hall",), ("attic",), ("garage",), ("office",), ("cellar",),
    ("living", "room"), ("dining", "room"), ("tool", "shed"), ("guest", "bedroom"),
)  # fmt: skip
RELATIONS = (("is", "in"), ("is", "inside"), ("was", "left", "in"), ("lies", "in"))
QA_VOCAB = Vocabulary(
    COLOURS
    + OBJECTS
    + tuple(dict.fromkeys(w for p in PLACES for w in p))
    + tuple(dict.fromkeys(w for r in RELATIONS for w in r))
    + ("the", ".", "where", "?")
)


def qa_data(
    n: int,
    seed: int,
    *,
    min_facts: int = 3,
    max_facts: int = 5,
    relations: Sequence[Sequence[str]] = RELATIONS,
    distractors: bool = True,
) -> TokenData:
    """``n`` QA samples ``[CLS] where is the c o ? [SEP] fact_1 ... fact_F [SEP]``.

    Each fact is ``the <colour> <object> <relation> the <place> .`` with distinct
    (colour, object) pairs and distinct places; ``F`` is uniform in ``[min_facts, max_facts]``
    and each relation is drawn from ``relations`` (subsequences of :data:`RELATIONS`' words).
    The asked pair is one fact's.  With ``distractors``, one other fact shares its object and,
    when ``F >= 3``, one more shares its colour, so both words are needed; without, every fact
    has a different object and a different colour, so either word identifies the fact.  ``spans`` is the answering fact's place (1 or 2
    tokens), ``question`` marks ``where is the c o ?``, ``context`` the facts; evidence marks the
    answer span and the answering fact's colour and object words.
    """
    if not 2 <= min_facts <= max_facts <= len(COLOURS):
        raise ValueError(f"need 2 <= min_facts <= max_facts <= {len(COLOURS)}")
    rng = random.Random(seed)
    tokens, evidence, questions, contexts, spans = [], [], [], [], []
    for _ in range(n):
        n_facts = rng.randint(min_facts, max_facts)
        colour, obj = rng.choice(COLOURS), rng.choice(OBJECTS)
        if distractors:
            pairs = [(colour, obj), (rng.choice([c for c in COLOURS if c != colour]), obj)]
            if n_facts >= 3:
                pairs.append((colour, rng.choice([o for o in OBJECTS if o != obj])))
            while len(pairs) < n_facts:
                p = (rng.choice(COLOURS), rng.choice(OBJECTS))
                if p not in pairs:
                    pairs.append(p)
        else:
            others_c = rng.sample([c for c in COLOURS if c != colour], n_facts - 1)
            others_o = rng.sample([o for o in OBJECTS if o != obj], n_facts - 1)
            pairs = [(colour, obj), *zip(others_c, others_o, strict=True)]
        rng.shuffle(pairs)
        places = rng.sample(PLACES, n_facts)
        q_words = ["where", "is", "the", colour, obj, "?"]
        seq = ["[CLS]"] + q_words + ["[SEP]"]
        ev = [False] * len(seq)
        span = (-1, -1)
        for (c, o), place in zip(pairs, places, strict=True):
            answer = (c, o) == (colour, obj)
            start = len(seq)
            fact = ["the", c, o, *rng.choice(relations), "the", *place, "."]
            seq += fact
            ev += [False, answer, answer] + [False] * (len(fact) - 3)
            if answer:
                span = (start + len(fact) - 1 - len(place), start + len(fact) - 2)
                for i in range(span[0], span[1] + 1):
                    ev[i] = True
        n_q = len(q_words) + 2
        context = [False] * n_q + [True] * (len(seq) - n_q) + [False]
        seq.append("[SEP]")
        ev.append(False)
        tokens.append(seq)
        evidence.append(ev)
        questions.append([False] + [True] * len(q_words) + [False] * (len(seq) - len(q_words) - 1))
        contexts.append(context)
        spans.append(span)
    return _assemble(
        QA_VOCAB,
        tokens,
        evidence,
        [0] * n,
        "right",
        question=questions,
        context=contexts,
        spans=spans,
    )


def predict_spans(start_logits: Tensor, end_logits: Tensor, context: Tensor) -> Tensor:
    """Predicted spans ``(s, e)``: ``s = argmax_{t in context} start_t``, ``e`` likewise for end.

    The two arg-maxes are independent, as in the paper; a span with ``e < s`` is invalid and
    the caller skips it.
    """
    neg = torch.finfo(start_logits.dtype).min
    s = start_logits.masked_fill(~context, neg).argmax(-1)
    e = end_logits.masked_fill(~context, neg).argmax(-1)
    return torch.stack([s, e], 1)


def span_f1(pred: Tensor, gold: Tensor) -> Tensor:
    """Token F1 of inclusive spans: ``2 P R / (P + R)`` with ``P = |overlap| / |pred|``,
    ``R = |overlap| / |gold|`` (0 without overlap)."""
    overlap = torch.minimum(pred[:, 1], gold[:, 1]) - torch.maximum(pred[:, 0], gold[:, 0]) + 1
    overlap = overlap.clamp(min=0).float()
    p = overlap / (pred[:, 1] - pred[:, 0] + 1).clamp(min=1).float()
    r = overlap / (gold[:, 1] - gold[:, 0] + 1).float()
    return torch.where(overlap > 0, 2 * p * r / (p + r).clamp(min=1e-12), torch.zeros_like(p))
