"""The two small trained models that ship with dynamiclrp, for ``dynamiclrp demo`` and the CLI.

- :class:`DigitsCNN`: a CNN on scikit-learn's 8x8 digits (pixels ``0..16`` scaled to ``[0, 1]``),
  loaded by :func:`load_digits_model`.
- :class:`SentimentTransformer`: a two-block transformer encoder with its own word vocabulary,
  trained on :func:`dynamiclrp.evaluation.synthetic_text.sentiment_data` (sentences with sentiment
  words and negations), loaded by :func:`load_sentiment_model` with its
  :class:`SentimentTokenizer`.

The weights are ``torch.save``\\ d state dicts in ``dynamiclrp/assets`` (``*.pt``, read with
``torch.load(..., weights_only=True)``), each with a JSON file holding the architecture, the
vocabulary, the held-out accuracy and the command that trained it
(``python scripts/train_assets.py``, deterministic).  Nothing is trained or downloaded at run time.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ASSETS = Path(__file__).parent / "assets"
"""Folder of the shipped weights and their JSON descriptions."""
DIGITS_FILES = ("digits_cnn.pt", "digits_cnn.json")
SENTIMENT_FILES = ("sentiment_transformer.pt", "sentiment_transformer.json")


class DigitsCNN(nn.Module):
    """``(N, 1, 8, 8)`` digits in ``[0, 1]`` -> ``(N, 10)`` logits: conv3x3-ReLU-conv3x3-ReLU-
    maxpool2, then Flatten-Linear-ReLU-Linear."""

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 32, classes: int = 10):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention ``softmax(q k^T / sqrt(d) + mask) v``; ``mask`` ``(N, T)`` bool
    marks real tokens (keys outside it get ``-inf``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by the number of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = scores.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` (GELU MLP)."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


class SentimentTransformer(nn.Module):
    """Token ids ``(N, T)`` -> ``(N, classes)`` logits read at position 0 (``[CLS]``).

    ``embed(ids)`` is the token plus the position embedding, the tensor a token's relevance is
    read at; ``classify(x, mask)`` is the rest of the network, so
    ``forward(ids, mask) = classify(embed(ids), mask)``.
    """

    def __init__(
        self,
        vocab_size: int,
        max_len: int = 24,
        dim: int = 32,
        depth: int = 2,
        heads: int = 2,
        mlp: int = 64,
        classes: int = 2,
    ):
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, max_len, dim))
        self.blocks = nn.ModuleList([EncoderBlock(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def embed(self, ids: Tensor) -> Tensor:
        """``(N, T)`` ids -> ``(N, T, dim)`` token + position embeddings."""
        if ids.shape[1] > self.max_len:
            raise ValueError(
                f"sequence of {ids.shape[1]} tokens is longer than this model's {self.max_len}"
            )
        return self.tok(ids) + self.pos[:, : ids.shape[1]]

    def classify(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Embeddings ``(N, T, dim)`` (and the ``(N, T)`` bool mask of real tokens) -> logits."""
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x)[:, 0])

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.classify(self.embed(ids), mask)


class SentimentTokenizer:
    """Lower-cases, splits into words and punctuation, maps words to ids (unknown -> ``[UNK]``)
    and wraps them as ``[CLS] words [SEP]``."""

    def __init__(self, tokens: list[str]):
        self.tokens = list(tokens)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        for special in ("[CLS]", "[SEP]", "[UNK]", "[PAD]", "[MASK]"):
            if special not in self.ids:
                raise ValueError(f"SentimentTokenizer: the vocabulary has no {special} token")

    def words(self, text: str) -> list[str]:
        """The words of ``text``: lower-case runs of letters, digits or apostrophes, and single
        punctuation characters."""
        return re.findall(r"[a-z0-9']+|[^\sa-z0-9']", text.lower())

    def encode(self, text: str) -> tuple[list[str], Tensor]:
        """``(tokens, ids (1, T))`` of ``[CLS] words [SEP]``; unknown words become ``[UNK]`` in
        the ids but keep their spelling in ``tokens``."""
        words = self.words(text)
        tokens = ["[CLS]", *words, "[SEP]"]
        unk = self.ids["[UNK]"]
        ids = [self.ids.get(t, unk) for t in tokens]
        return tokens, torch.tensor([ids], dtype=torch.long)

    def unknown(self, text: str) -> list[str]:
        """Words of ``text`` that are not in the vocabulary."""
        return [w for w in self.words(text) if w not in self.ids]


def _read(files: tuple[str, str], folder: Path | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    folder = ASSETS if folder is None else Path(folder)
    weights, meta = (folder / f for f in files)
    for path in (weights, meta):
        if not path.is_file():
            raise FileNotFoundError(
                f"shipped model file {path} is missing; reinstall dynamiclrp or run "
                "`python scripts/train_assets.py` in a source checkout"
            )
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return state, json.loads(meta.read_text())


def load_digits_model(folder: str | Path | None = None) -> tuple[DigitsCNN, dict[str, Any]]:
    """The shipped digits CNN in eval mode and its description (``architecture``,
    ``preprocessing``, ``split``, ``test_accuracy``, ``examples``: a few test digits)."""
    state, meta = _read(DIGITS_FILES, folder)
    arch = meta["architecture"]
    model = DigitsCNN(tuple(arch["channels"]), arch["hidden"], arch["classes"])
    model.load_state_dict(state)
    return model.eval(), meta


def load_sentiment_model(
    folder: str | Path | None = None,
) -> tuple[SentimentTransformer, SentimentTokenizer, dict[str, Any]]:
    """The shipped sentiment transformer in eval mode, its tokenizer and its description
    (``architecture``, ``vocabulary``, ``labels``, ``data``, ``test_accuracy``)."""
    state, meta = _read(SENTIMENT_FILES, folder)
    arch = meta["architecture"]
    model = SentimentTransformer(len(meta["vocabulary"]), **arch)
    model.load_state_dict(state)
    return model.eval(), SentimentTokenizer(meta["vocabulary"]), meta


def digits_split(
    seed: int = 0, test_fraction: float = 0.25
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits as ``(pixels (1797, 64) float 0..16, labels, train rows, test rows)``.

    The rows are split by ``torch.randperm(1797, generator=Generator().manual_seed(seed))``: the
    last ``round(test_fraction * 1797)`` of it are the test set (449 rows for 0.25), the split
    the shipped digits model was trained and tested on.  Needs scikit-learn.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "the digits data set comes from scikit-learn: pip install scikit-learn"
        ) from err
    data = load_digits()
    pixels = torch.tensor(data.data, dtype=torch.float32)
    labels = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(labels))
    return pixels, labels, perm[: len(labels) - n_test], perm[len(labels) - n_test :]


def digits_images(pixels: list | Tensor) -> Tensor:
    """sklearn digits pixels (``0..16``, any shape ending in 64 or ``(8, 8)``) -> ``(N, 1, 8, 8)``
    float32 model inputs in ``[0, 1]``."""
    x = torch.as_tensor(pixels, dtype=torch.float32)
    return (x.reshape(-1, 1, 8, 8) / 16.0).contiguous()


__all__ = [
    "ASSETS",
    "DigitsCNN",
    "SentimentTokenizer",
    "SentimentTransformer",
    "digits_images",
    "digits_split",
    "load_digits_model",
    "load_sentiment_model",
]
