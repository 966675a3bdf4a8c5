"""Every script in ``examples/`` runs as a newcomer would run it, and says what it should.

Each example is run as a subprocess with small arguments (few training steps, a temporary
``--out``); the test checks its exit status, the key lines it prints (parsing the numbers of its
own checks against independent computations: conservation, LRP-0 = gradient x input, a z-box
computed by hand, Captum's LRP, the logit of a plain forward pass) and the files it writes.
The examples exit non-zero when one of their checks fails, so a wrong number fails here twice.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SHARED = {"quadrants.py"}  # the toy image task the scripts share
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(script: str, *args: str) -> str:
    """Run ``examples/<script>`` with ``args``; return its stdout (stderr shown on failure)."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def number(pattern: str, text: str) -> float:
    """The float captured by ``pattern`` (one group) in ``text``."""
    found = re.search(pattern, text, re.M)
    assert found, f"no line matching {pattern!r} in:\n{text}"
    return float(found.group(1))


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and b"IEND" in data[-12:], path


def test_every_example_has_a_docstring_and_help():
    scripts = sorted(EXAMPLES.glob("*.py"))
    assert {p.name for p in scripts} >= {
        "demo.py",
        "custom_architecture.py",
        "hf_language_model.py",
        "intermediate_and_neuron.py",
        "layer_rule_override.py",
        "captum_quantus.py",
        "tiny_hf.py",
    }
    for path in scripts:
        text = path.read_text(encoding="utf-8")
        assert text.startswith('"""'), f"{path.name} has no module docstring"
        if path.name in SHARED:  # imported by the scripts, not run
            continue
        assert "argparse" in text and "--out" in text, f"{path.name} takes no --out"


def test_demo_runs_and_writes_a_png(tmp_path):
    out = tmp_path / "heatmap.png"
    stdout = run("demo.py", "--out", str(out), "--steps", "60")
    assert "residual (books close at ~0)" in stdout
    assert "share of positive relevance in the true quadrant" in stdout
    assert_png(out)


def test_custom_architecture(tmp_path):
    stdout = run("custom_architecture.py", "--out", str(tmp_path), "--steps", "20")
    # coverage lists the primitive ops the made-up model is built from, each with a rule
    for op in ("BmmBackward0", "CumsumBackward0", "RsqrtBackward0", "SigmoidBackward0"):
        assert re.search(rf"^{op}\s+\d+\s+\S", stdout, re.M), op
    assert re.search(r"covered nodes (\d+)/\1,", stdout), "an op without a rule"
    assert "residual (books close at ~0)" in stdout
    assert "books close: True" in stdout
    assert number(r"LRP-0 vs gradient x input, max relative difference (\S+)", stdout) < 1e-8
    assert_png(tmp_path / "heatmap.png")
    assert_png(tmp_path / "overlay.png")


def test_intermediate_and_neuron(tmp_path):
    stdout = run("intermediate_and_neuron.py", "--out", str(tmp_path), "--steps", "20")
    assert "hidden channels with the most relevance:" in stdout
    for name in ("hidden layer", "pixels"):
        assert number(rf"conservation, {name}: .*\(rel\. diff (\S+)\)", stdout) < 1e-4
        assert number(rf"LRP-0 vs gradient x input, {name.split()[0]}\w*: .* (\S+)$", stdout) < 1e-8
    assert number(r"channel \d+: seeded .*\(rel\. diff (\S+)\)", stdout) < 1e-4
    assert number(r"outside its receptive field (\S+);", stdout) == 0.0
    assert number(r"unit .*LRP-0 vs gradient x input (\S+)$", stdout) < 1e-8
    assert_png(tmp_path / "intermediate_and_neuron.png")


def test_layer_rule_override(tmp_path):
    stdout = run("layer_rule_override.py", "--out", str(tmp_path), "--steps", "20")
    assert "overrides: [ZBox(low=0.0, high=1.0), Gamma(gamma=0.25)]" in stdout
    assert "books of the recipe" in stdout and "residual (books close at ~0)" in stdout
    rows = {
        m.group(1): [float(v) for v in m.group(2).replace("%", "").split()]
        for m in re.finditer(r"^(epsilon|gamma|recipe)\s+(\S+ +\S+ +\S+ +\S+ +\S+)$", stdout, re.M)
    }
    assert set(rows) == {"epsilon", "gamma", "recipe"}
    assert rows["epsilon"][-1] == pytest.approx(1.0)  # the reference correlates with itself
    assert rows["recipe"][0] != rows["epsilon"][0]  # the overrides change the result
    assert (
        number(r"overrides vs Rules\(conv=Gamma, first=ZBox\): max abs difference (\S+)", stdout)
        == 0
    )
    assert (
        number(r"first layer z-box vs the formula by hand: max rel\. difference (\S+)", stdout)
        < 1e-10
    )
    assert_png(tmp_path / "layer_rule_override.png")


def needs(module: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"{module} is not installed"
    )


@needs("transformers")
@needs("tokenizers")
def test_hf_language_model_tiny_llama(tmp_path):
    stdout = run("hf_language_model.py", "--out", str(tmp_path))
    assert "model: tiny Llama" in stdout
    # trained for a second on 18 sentences, it has memorised the answer
    assert "predicted next token: ' Paris'; explained: ' Paris'" in stdout
    assert "\x1b[48;2;" in stdout  # tokens coloured for the terminal
    assert re.search(r"seed = logit of a plain forward pass \(\S+\): True", stdout)
    assert re.search(r"books close \(residual \S+\): True", stdout)
    html = (tmp_path / "next_token.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "Paris" in html and "<script" not in html


@needs("transformers")
@needs("tokenizers")
def test_tiny_hf_models_load_from_disk(tmp_path):
    """``tiny_hf.py`` writes checkpoints; ``--model PATH`` explains one through ``hf.load``."""
    stdout = run("tiny_hf.py", "--out", str(tmp_path / "models"), "--steps", "2")
    for name in ("classifier", "llama", "qa"):
        assert re.search(rf"^{name}\s+\S+ +\(trained 2 steps, loss \S+\)$", stdout, re.M)
        folder = tmp_path / "models" / name
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    stdout = run(
        "hf_language_model.py",
        "--model",
        str(tmp_path / "models" / "llama"),
        "--target",
        " Paris",
        "--no-color",
        "--out",
        str(tmp_path / "html"),
    )
    assert "model: LlamaForCausalLM from" in stdout
    assert "explained: ' Paris'" in stdout
    assert "\x1b[" not in stdout
    assert re.search(r"^<s>\[[+-]\d\.\d\d\] The\[[+-]\d\.\d\d\]", stdout, re.M)
    assert re.search(r"seed = logit of a plain forward pass \(\S+\): True", stdout)
    assert (tmp_path / "html" / "next_token.html").is_file()


@needs("captum")
@needs("quantus")
def test_captum_quantus(tmp_path):
    stdout = run("captum_quantus.py", "--steps", "20", "--batch", "4", "--out", str(tmp_path))
    delta = re.search(r"summed relevance = the biases' share\):\n\s+(.+)$", stdout, re.M)
    assert delta and len(delta.group(1).split()) == 4
    assert number(r"captum\.attr\.LRP vs DynamicLRP\(rules='captum'\): .* (\S+)$", stdout) < 1e-6
    for name in ("FaithfulnessCorrelation", "Sparseness"):
        for source in ("dynamiclrp", "random"):
            assert re.search(rf"quantus {name} +{source} +[+-]\d", stdout), (name, source)
    # Quantus calling dynamiclrp itself scores the same as the precomputed attributions
    assert number(r"Sparseness +dynamiclrp +(\S+)", stdout) == number(
        r"Sparseness via explain_func +(\S+)", stdout
    )
    assert (tmp_path / "scores.json").is_file()
