"""The models shipped in dynamiclrp/assets: they load safely and reach the recorded accuracy.

Oracles: the held-out accuracy is recomputed here from the data (the digits split rebuilt with
``torch.randperm`` and scikit-learn's data, independently of ``demo_models.digits_split``; the
sentiment labels checked against the negation rule), not read from the JSON; the weights are
read with plain ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynamiclrp import demo_models
from dynamiclrp.evaluation import synthetic_text as st

ASSETS = Path(demo_models.__file__).parent / "assets"
ROOT = Path(__file__).resolve().parents[1]


def _meta(stem: str) -> dict:
    return json.loads((ASSETS / f"{stem}.json").read_text())


@pytest.mark.parametrize("stem", ["digits_cnn", "sentiment_transformer"])
def test_asset_files_are_small_state_dicts(stem):
    for suffix in (".pt", ".json"):
        assert (ASSETS / f"{stem}{suffix}").stat().st_size < 200_000
    state = torch.load(ASSETS / f"{stem}.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    meta = _meta(stem)
    assert meta["command"] == "python scripts/train_assets.py"
    assert meta["params"] == sum(v.numel() for k, v in state.items())


def test_digits_model_reaches_its_recorded_accuracy_on_the_held_out_split():
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    test = perm[1797 - 449 :]
    x = torch.tensor(data.data, dtype=torch.float32)[test].reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(data.target)[test]
    model, meta = demo_models.load_digits_model()
    assert not model.training
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).double().mean().item()
    assert acc >= 0.97
    assert abs(acc - meta["test_accuracy"]) <= 1 / 449 + 1e-12  # one digit of slack
    # the demo's example digits are test digits with their true labels
    for e in meta["examples"]:
        assert e["row"] in test.tolist()
        assert e["label"] == int(data.target[e["row"]])
        assert e["pixels"] == [int(v) for v in data.data[e["row"]]]
    # and no training digit is in the test split the package computes
    _, _, train_rows, test_rows = demo_models.digits_split(0, 0.25)
    assert torch.equal(test_rows, test) and not set(train_rows.tolist()) & set(test.tolist())


def test_sentiment_model_reaches_its_recorded_accuracy_on_held_out_sentences():
    model, tok, meta = demo_models.load_sentiment_model()
    assert meta["vocabulary"] == list(st.SENTIMENT_VOCAB.tokens)
    d = meta["data"]
    data = st.sentiment_data(
        2000, seed=d["test_seed"], min_words=d["min_words"], max_words=d["max_words"]
    )
    # labels by the negation rule, recomputed from the words
    labels = torch.tensor([st.sentiment_label(data.words(i)[1:-1]) for i in range(len(data))])
    assert torch.equal(labels, data.labels)
    with torch.no_grad():
        acc = (model(data.ids, data.mask).argmax(-1) == labels).double().mean().item()
    assert acc >= 0.97
    assert abs(acc - meta["test_accuracy"]) <= 2 / 2000 + 1e-12
    # a test seed no training epoch used
    assert d["test_seed"] > meta["train"]["epochs"]


def test_sentiment_model_reads_negations():
    model, tok, meta = demo_models.load_sentiment_model()
    pos = meta["labels"].index("positive")
    for text, label in [
        ("the film was good", 1),
        ("the film was not good", 0),
        ("the film was bad", 0),
        ("the film was never bad", 1),
    ]:
        _, ids = tok.encode(text)
        assert int(model(ids).argmax(-1)) == (pos if label else 1 - pos), text


def test_tokenizer_and_length_limit():
    model, tok, _ = demo_models.load_sentiment_model()
    tokens, ids = tok.encode("The FILM, was 'great'!")
    assert tokens == ["[CLS]", "the", "film", ",", "was", "'great'", "!", "[SEP]"]
    unk = tok.ids["[UNK]"]
    assert ids[0, 5].item() == unk and ids[0, 2].item() == tok.ids["film"]
    assert tok.unknown("the film, was 'great'!") == [",", "'great'", "!"]
    with pytest.raises(ValueError, match="longer than"):
        model.embed(torch.zeros(1, model.max_len + 1, dtype=torch.long))


def test_missing_asset_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="digits_cnn.pt"):
        demo_models.load_digits_model(tmp_path)


@pytest.mark.slow
def test_training_script_reproduces_the_shipped_weights(tmp_path):
    """~1-2 min: retrain both models; with the recorded torch version the weights are equal."""
    pytest.importorskip("sklearn")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_assets.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for stem in ("digits_cnn", "sentiment_transformer"):
        new = json.loads((tmp_path / f"{stem}.json").read_text())
        old = _meta(stem)
        assert new["test_accuracy"] == pytest.approx(old["test_accuracy"], abs=0.01)
        if new["torch"] == old["torch"]:
            a = torch.load(tmp_path / f"{stem}.pt", weights_only=True)
            b = torch.load(ASSETS / f"{stem}.pt", weights_only=True)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
