"""The ``dynamiclrp`` command line: demo, explain-image, explain-text, evaluate, and its errors.

Commands run in-process through ``main([...])`` (one subprocess runs ``python -m dynamiclrp
demo``).  Oracles: the relevance explain-image writes equals ``x * w[target] * z / stab(z)``
computed here for a bias-free linear model under the epsilon rule, on the input preprocessed by
hand; PNG files are checked by their signature and header size; HTML for escaping; errors for
their message and exit status 2.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dynamiclrp.cli import main

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


# -- models the tests load as MODULE:CALLABLE ------------------------------------------------------


def linear_model() -> nn.Module:
    """Bias-free linear classifier of (3, 4, 4) images into 5 classes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 5, bias=False))


def fft_model() -> nn.Module:
    """A model with an op no rule covers (the real FFT)."""

    class FFT(nn.Module):
        def forward(self, x):
            return torch.fft.rfft(x.flatten(1)).abs()[:, :5]

    return FFT()


def not_a_model() -> int:
    return 3


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def run_error(argv: list[str], capsys) -> str:
    """Run ``main(argv)``, expect exit status 2, return stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# -- demo --------------------------------------------------------------------------------------


def test_demo_in_process_writes_png_and_html(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--color", "never"]) == 0
    out = capsys.readouterr().out
    # 4 digits as 2 rows of (input | heatmap) pairs: 4 tiles of 8 px + 5 px padding, x16
    assert png_size(tmp_path / "digits.png") == ((4 * 8 + 5) * 16, (2 * 8 + 3) * 16)
    html = (tmp_path / "sentiment.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "[CLS]" in html and "terrible" in html
    assert out.count("books: seeded") == 5  # digits batch + 4 sentences
    for line in (ln for ln in out.splitlines() if "books: seeded" in ln):
        assert abs(float(line.rsplit("residual ", 1)[1])) < 1e-4
    assert "digit 7: predicted 7" in out and "top 10% of pixels hold" in out
    assert "'the film was not good': negative" in out
    assert "'this movie was not terrible': positive" in out
    assert "terrible[+" in out  # plain token scores without colour
    assert str(tmp_path / "digits.png") in out and str(tmp_path / "sentiment.html") in out


def test_demo_as_a_module_in_a_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_COLOR": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dynamiclrp", "demo", "--out", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "books: seeded" in done.stdout and "\x1b[" not in done.stdout
    assert (tmp_path / "d" / "digits.png").read_bytes()[:8] == PNG


# -- explain-image --------------------------------------------------------------------------------


def test_explain_image_module_callable_and_npy_matches_epsilon_by_hand(tmp_path, capsys):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)  # (H, W, C) uint8
    np.save(tmp_path / "img.npy", img)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    argv = ["explain-image", "tests.test_cli:linear_model", str(tmp_path / "img.npy")]
    argv += ["--rules", "epsilon", "--out", str(tmp_path / "o"), "--target", "2"]
    argv += ["--mean", ",".join(map(str, mean)), "--std", ",".join(map(str, std))]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rel = np.load(tmp_path / "o" / "img_relevance.npy")
    # oracle: preprocess by hand, R = x * w[t] * z / (z + eps sign z)
    x = (np.moveaxis(img, -1, 0) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[
        :, None, None
    ]
    w = linear_model()[1].weight.detach().double().numpy()[2].reshape(3, 4, 4)
    z = float((x * w).sum())
    expected = x * w * z / (z + 1e-6 * np.sign(z))
    np.testing.assert_allclose(rel, expected, rtol=1e-4, atol=1e-6)
    assert "explained class 2" in out and "books: seeded" in out
    assert png_size(tmp_path / "o" / "img_relevance.png") == ((2 * 4 + 3) * 64, (4 + 2) * 64)


def test_explain_image_shipped_digits_from_a_png(tmp_path, capsys):
    pytest.importorskip("PIL")
    from PIL import Image

    from dynamiclrp.demo_models import load_digits_model

    _, meta = load_digits_model()
    e = meta["examples"][4]
    pixels = (np.array(e["pixels"], dtype=np.float64).reshape(8, 8) / 16 * 255).round()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(tmp_path / "four.png")
    argv = ["explain-image", "shipped:digits", str(tmp_path / "four.png"), "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "predicted 4" in capsys.readouterr().out


def test_explain_image_weights_file_with_arch(tmp_path, capsys):
    model = linear_model()
    with torch.no_grad():
        model[1].weight.mul_(-1)  # different from what linear_model() builds
    torch.save(model.state_dict(), tmp_path / "w.pt")
    img = np.full((3, 4, 4), 0.5, dtype=np.float32)  # float .npy: used as is
    np.save(tmp_path / "img.npy", img)
    argv = ["explain-image", str(tmp_path / "w.pt"), str(tmp_path / "img.npy")]
    argv += ["--arch", "tests.test_cli:linear_model", "--out", str(tmp_path)]
    assert main(argv) == 0
    logits = model(torch.from_numpy(img)[None])
    assert f"predicted {int(logits.argmax())}" in capsys.readouterr().out


# -- explain-text -------------------------------------------------------------------------------


def test_explain_text_shipped_model_escapes_html(tmp_path, capsys):
    argv = [
        "explain-text",
        "shipped:sentiment",
        "the film was <b>great</b>",
        "--out",
        str(tmp_path),
    ]
    assert main(argv + ["--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "[UNK]" in out and "positive" in out and "books: seeded" in out
    html = (tmp_path / "text_0.html").read_text()
    assert "&lt;" in html and "&gt;" in html and "<b>" not in html


def _tiny_hf_classifier(path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "film", "was", "good", "bad", "<", ">"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]",
    )  # fmt: skip
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_labels=2, id2label={0: "NEG", 1: "POS"},
        label2id={"NEG": 0, "POS": 1},
    )  # fmt: skip
    transformers.BertForSequenceClassification(config).eval().save_pretrained(path)
    fast.save_pretrained(path)


def test_explain_text_local_hugging_face_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _tiny_hf_classifier(tmp_path / "m")
    argv = ["explain-text", str(tmp_path / "m"), "the film was <good>", "--target", "POS"]
    assert main(argv + ["--out", str(tmp_path), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "explained POS" in out and "books: seeded" in out
    for line in (ln for ln in out.splitlines() if "books: seeded" in ln):
        assert abs(float(line.rsplit("residual ", 1)[1])) < 1e-4
    html = (tmp_path / "text_0.html").read_text()
    assert "&lt;" in html and "good" in html and "[CLS]" in html


def test_explain_text_missing_folder_is_a_clean_error(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = run_error(["explain-text", str(tmp_path / "nope"), "hi"], capsys)
    assert "model folder" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    err = run_error(["explain-text", str(tmp_path / "empty"), "hi"], capsys)
    assert "cannot load a Hugging Face model" in err and "--allow-download" in err
    err = run_error(["explain-text", "no-such-model-in-the-cache", "hi"], capsys)
    assert "cannot load a Hugging Face model" in err and err.count("\n") == 1


# -- evaluate ---------------------------------------------------------------------------------


def test_evaluate_digits_prints_abpc_and_beats_random(capsys):
    pytest.importorskip("sklearn")
    assert main(["evaluate", "--task", "digits", "--n", "16", "--steps", "8"]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.split()[2:3] == ["±"]}
    assert set(rows) == {"dynamiclrp", "epsilon", "random"}
    abpc = {k: float(v[1]) for k, v in rows.items()}
    assert abpc["dynamiclrp"] > abpc["random"] + 0.2
    for v in rows.values():  # ABPC = AUC LeRF - AUC MoRF
        assert float(v[1]) == pytest.approx(float(v[5]) - float(v[4]), abs=2e-3)


def test_evaluate_sentiment_and_unknown_method(capsys):
    assert main(["evaluate", "--task", "sentiment", "--n", "4", "--methods", "zplus"]) == 0
    assert "zplus" in capsys.readouterr().out
    err = run_error(["evaluate", "--task", "sentiment", "--n", "4", "--methods", "nope"], capsys)
    assert "Unknown attribution method 'nope'" in err


# -- errors ---------------------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path):
    np.save(tmp_path / "img.npy", np.zeros((3, 4, 4), dtype=np.float32))
    return str(tmp_path / "img.npy")


def test_missing_image_file(capsys, tmp_path):
    err = run_error(
        ["explain-image", "tests.test_cli:linear_model", str(tmp_path / "x.png")], capsys
    )
    assert err.count("\n") == 1 and "image file" in err and "does not exist" in err


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.no_such_module:f", "cannot import module 'tests.no_such_module'"),
        ("tests.test_cli:no_such_function", "has no attribute 'no_such_function'"),
        ("tests.test_cli:not_a_model", "returned a int, not a torch.nn.Module"),
        ("missing_weights.pt", "not found"),
        ("shipped:resnet", "unknown shipped image model"),
    ],
)
def test_bad_model_specs(spec, message, image, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    err = run_error(["explain-image", spec, image, "--out", str(tmp_path)], capsys)
    assert message in err and err.count("\n") == 1


def test_weights_without_arch_and_mismatched_weights(image, capsys, tmp_path):
    torch.save({"weight": torch.zeros(2, 2)}, tmp_path / "w.pt")
    err = run_error(["explain-image", str(tmp_path / "w.pt"), image], capsys)
    assert "--arch MODULE:CALLABLE" in err
    argv = ["explain-image", str(tmp_path / "w.pt"), image, "--arch", "tests.test_cli:linear_model"]
    err = run_error(argv + ["--out", str(tmp_path)], capsys)
    assert "do not fit the model" in err and err.count("\n") == 1


def test_pickled_module_is_refused(image, capsys, tmp_path):
    torch.save(linear_model(), tmp_path / "whole_model.pt")  # a pickled nn.Module
    argv = ["explain-image", "tests.test_cli:linear_model", image]
    err = run_error(argv + ["--weights", str(tmp_path / "whole_model.pt")], capsys)
    assert "weights_only=True" in err and "state dict" in err and "safetensors" in err
    assert err.count("\n") == 1


def test_uncovered_op_message_passes_through_and_debug_raises(image, capsys, tmp_path):
    argv = ["explain-image", "tests.test_cli:fft_model", image, "--out", str(tmp_path)]
    err = run_error(argv, capsys)
    assert "UncoveredOpError" in err and "FftR2CBackward0" in err and "--debug" in err
    from dynamiclrp import UncoveredOpError

    with pytest.raises(UncoveredOpError):
        main(argv + ["--debug"])


def test_torchvision_needs_weights_or_permission(image, capsys):
    err = run_error(["explain-image", "tv:resnet18", image], capsys)
    assert "torchvision" in err  # not installed here, or: needs --weights / --allow-download


def test_wrong_channels_and_size(capsys, tmp_path):
    np.save(tmp_path / "one.npy", np.zeros((4, 4), dtype=np.float32))
    err = run_error(
        ["explain-image", "tests.test_cli:linear_model", str(tmp_path / "one.npy")], capsys
    )
    assert "has shape (4, 4); the model takes 3 channels" in err
    np.save(tmp_path / "big.npy", np.zeros((3, 5, 5), dtype=np.float32))
    argv = ["explain-image", "tests.test_cli:linear_model", str(tmp_path / "big.npy")]
    err = run_error(argv + ["--out", str(tmp_path)], capsys)
    assert "forward pass failed" in err and "(1, 3, 5, 5)" in err
    assert main(argv + ["--out", str(tmp_path), "--size", "4"]) == 0  # resized to fit


def test_coverage_commands_still_work(capsys):
    assert main(["coverage", "tests.test_coverage:make_example"]) == 0
    assert "covered nodes 5/5" in capsys.readouterr().out
