"""Train the two models shipped in ``src/dynamiclrp/assets`` (deterministic, CPU, about a minute).

    python scripts/train_assets.py [--out src/dynamiclrp/assets] [--only digits|sentiment]

- ``digits_cnn.pt`` / ``.json``: :class:`dynamiclrp.demo_models.DigitsCNN` on scikit-learn's
  8x8 digits (needs scikit-learn), pixels / 16; the rows are split by
  ``torch.randperm(1797, generator=torch.Generator().manual_seed(0))``, the last 449 (25 %) are
  the test set.
- ``sentiment_transformer.pt`` / ``.json``: :class:`dynamiclrp.demo_models.SentimentTransformer`
  on :func:`dynamiclrp.evaluation.synthetic_text.sentiment_data` (3 to 22 words, fresh sentences
  each epoch, seeds ``1 + epoch``); the test set is 2000 sentences of seed :data:`EVAL_SEED`.

Every run with the same torch version writes the same weights (one thread, deterministic
algorithms, fixed seeds).  The JSON files record the architecture, the vocabulary, the test
accuracy and this command.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dynamiclrp.demo_models import (  # noqa: E402
    DigitsCNN,
    SentimentTransformer,
    digits_split,
)
from dynamiclrp.evaluation import synthetic_text as st  # noqa: E402

COMMAND = "python scripts/train_assets.py"
SPLIT_SEED = 0
TEST_FRACTION = 0.25
EVAL_SEED = 999_983
"""Seed of the sentiment test set; training sets use seeds 1, 2, ... (one per epoch)."""
SENTENCE_WORDS = (3, 22)


def _cosine(step: int, total: int, lr: float) -> float:
    return lr * (1 + math.cos(math.pi * step / total)) / 2


def train_digits(out: Path) -> dict:
    cfg = {"seed": 0, "epochs": 30, "batch_size": 32, "lr": 3e-3, "weight_decay": 1e-4}
    arch = {"channels": [16, 32], "hidden": 32, "classes": 10}
    pixels, labels, train, test = digits_split(SPLIT_SEED, TEST_FRACTION)
    x = (pixels / 16.0).reshape(-1, 1, 8, 8)
    torch.manual_seed(cfg["seed"])
    model = DigitsCNN(tuple(arch["channels"]), arch["hidden"], arch["classes"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    steps = cfg["epochs"] * math.ceil(len(train) / cfg["batch_size"])
    step = 0
    for _ in range(cfg["epochs"]):
        model.train()
        order = train[torch.randperm(len(train), generator=gen)]
        for b in range(0, len(order), cfg["batch_size"]):
            idx = order[b : b + cfg["batch_size"]]
            for group in opt.param_groups:
                group["lr"] = _cosine(step, steps, cfg["lr"])
            loss = F.cross_entropy(model(x[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    with torch.no_grad():
        acc = (model(x[test]).argmax(-1) == labels[test]).double().mean().item()
    # one test digit per class (the first of each in test order) for the demo
    examples = []
    for cls in range(10):
        row = int(next(r for r in test.tolist() if int(labels[r]) == cls))
        examples.append({"row": row, "label": cls, "pixels": pixels[row].int().tolist()})
    meta = {
        "name": "digits-cnn",
        "architecture": arch,
        "input": "(N, 1, 8, 8) float32",
        "preprocessing": "sklearn.datasets.load_digits pixels (0..16) divided by 16",
        "labels": [str(c) for c in range(10)],
        "split": {
            "source": "sklearn.datasets.load_digits",
            "permutation": "torch.randperm(1797, generator=torch.Generator().manual_seed(0))",
            "test": "the last 449 rows of the permutation",
            "seed": SPLIT_SEED,
            "test_fraction": TEST_FRACTION,
        },
        "test_accuracy": acc,
        "n_test": len(test),
        "params": sum(p.numel() for p in model.parameters()),
        "train": cfg,
        "examples": examples,
        "torch": torch.__version__,
        "command": COMMAND,
    }
    _write(out, "digits_cnn", model, meta)
    return meta


def train_sentiment(out: Path) -> dict:
    cfg = {"seed": 0, "epochs": 80, "n_train": 2000, "batch_size": 64, "lr": 3e-3}
    cfg["weight_decay"] = 0.01
    arch = {"max_len": 24, "dim": 32, "depth": 2, "heads": 2, "mlp": 64, "classes": 2}
    lo, hi = SENTENCE_WORDS
    vocab = st.SENTIMENT_VOCAB
    torch.manual_seed(cfg["seed"])
    model = SentimentTransformer(len(vocab), **arch)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    steps = cfg["epochs"] * math.ceil(cfg["n_train"] / cfg["batch_size"])
    step = 0
    for epoch in range(cfg["epochs"]):
        data = st.sentiment_data(cfg["n_train"], seed=1 + epoch, min_words=lo, max_words=hi)
        model.train()
        order = torch.randperm(len(data), generator=gen)
        for b in range(0, len(order), cfg["batch_size"]):
            idx = order[b : b + cfg["batch_size"]]
            for group in opt.param_groups:
                group["lr"] = _cosine(step, steps, cfg["lr"])
            loss = F.cross_entropy(model(data.ids[idx], data.mask[idx]), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
    model.eval()
    test = st.sentiment_data(2000, seed=EVAL_SEED, min_words=lo, max_words=hi)
    with torch.no_grad():
        acc = (model(test.ids, test.mask).argmax(-1) == test.labels).double().mean().item()
    meta = {
        "name": "sentiment-transformer",
        "architecture": arch,
        "input": "(N, T) token ids [CLS] words [SEP], T <= max_len; mask (N, T) bool",
        "vocabulary": list(vocab.tokens),
        "labels": ["negative", "positive"],
        "data": {
            "generator": "dynamiclrp.evaluation.synthetic_text.sentiment_data",
            "min_words": lo,
            "max_words": hi,
            "train_seeds": f"1..{cfg['epochs']} (one fresh set of {cfg['n_train']} per epoch)",
            "test": f"sentiment_data(2000, seed={EVAL_SEED}, min_words={lo}, max_words={hi})",
            "test_seed": EVAL_SEED,
            "n_test": 2000,
        },
        "test_accuracy": acc,
        "params": sum(p.numel() for p in model.parameters()),
        "train": cfg,
        "torch": torch.__version__,
        "command": COMMAND,
    }
    _write(out, "sentiment_transformer", model, meta)
    return meta


def _write(out: Path, stem: str, model: torch.nn.Module, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out / f"{stem}.pt")
    (out / f"{stem}.json").write_text(json.dumps(meta, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "src" / "dynamiclrp" / "assets")
    parser.add_argument("--only", choices=("digits", "sentiment"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name, fn in (("digits", train_digits), ("sentiment", train_sentiment)):
        if args.only in (None, name):
            t0 = time.perf_counter()
            meta = fn(args.out)
            print(
                f"{meta['name']}: test accuracy {meta['test_accuracy']:.4f}, "
                f"{meta['params']} parameters, {time.perf_counter() - t0:.0f} s"
            )


if __name__ == "__main__":
    main()
