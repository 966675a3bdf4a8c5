"""The faithfulness benchmark's runner (``benchmarks/faithfulness.py``) on a hand-made task.

A linear image "model" whose score is ``sum(w * x)`` with the evidence known by construction:
every number checked here follows from that formula, not from the code under test.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import faithfulness  # noqa: E402

from dynamiclrp.evaluation.task import Task  # noqa: E402


class TwoClassLinear(nn.Module):
    """Logits ``(sum(w * x), 0)``: class 0 is decided by the pixels where ``w != 0``."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        s = (x * self.w).flatten(1).sum(1)
        return torch.stack([s, torch.zeros_like(s)], 1)


def linear_task(n: int = 4) -> Task:
    w = torch.zeros(1, 4, 4, dtype=torch.float64)
    w[0, 1, 1] = w[0, 2, 2] = 3.0  # the evidence: two pixels
    model = TwoClassLinear(w)
    x = torch.ones(n, 1, 4, 4, dtype=torch.float64)
    evidence = (w[0] != 0).expand(n, 4, 4).clone()
    return Task(
        name="linear",
        kind="image",
        model=model,
        inputs=x,
        targets=torch.zeros(n, dtype=torch.long),
        labels=torch.zeros(n, dtype=torch.long),
        to_x=lambda t: t,
        forward=lambda x_, idx: model(x_),
        evidence=evidence,
        replacement="zero",
    )


def args(**kw) -> argparse.Namespace:
    base = dict(
        quick=True,
        methods=None,
        steps=16,
        replacement=None,
        batch_size=2,
        eval_batch_size=8,
        progress=False,
        lxt_python=None,
    )
    return argparse.Namespace(**{**base, **kw})


def test_lrp_on_a_linear_model_finds_the_evidence_and_scores_its_curves() -> None:
    """LRP-epsilon of ``s = 3 x_a + 3 x_b`` puts all relevance on the two evidence pixels, so
    localisation is perfect; MoRF removes them in the first two of 16 features: the logit falls
    6 -> 3 -> 0 and the probability softmax(s, 0) from sigmoid(6) to 1/2 and stays there."""
    row = faithfulness.evaluate(linear_task(), "dynamiclrp:epsilon", args())
    m = row.metrics
    assert m["mass acc"] == pytest.approx(1.0)
    assert m["rank acc"] == pytest.approx(1.0)
    assert m["pointing"] == pytest.approx(1.0)
    sig = torch.sigmoid(torch.tensor([6.0, 3.0, 0.0], dtype=torch.float64)).tolist()
    # MoRF at fractions k/16: sig(6), sig(3), then 1/2 for k = 2..16 (trapezoid on [0, 1])
    morf = [sig[0], sig[1]] + [0.5] * 15
    auc_morf = sum((a + b) / 2 for a, b in zip(morf, morf[1:], strict=False)) / 16
    # LeRF removes the 14 zero-weight pixels first (score unchanged), then the two evidence pixels
    lerf = [sig[0]] * 15 + [sig[1], 0.5]
    auc_lerf = sum((a + b) / 2 for a, b in zip(lerf, lerf[1:], strict=False)) / 16
    assert m["auc_morf"] == pytest.approx(auc_morf, abs=1e-9)
    assert m["auc_lerf"] == pytest.approx(auc_lerf, abs=1e-9)
    assert m["abpc"] == pytest.approx(auc_lerf - auc_morf, abs=1e-9)
    assert m["comprehensiveness"] == pytest.approx(sig[0] - auc_morf, abs=1e-9)
    assert m["abpc_se"] == pytest.approx(0.0, abs=1e-12)  # four identical samples


def test_random_ranking_is_not_rewarded() -> None:
    row = faithfulness.evaluate(linear_task(8), "random", args())
    lrp = faithfulness.evaluate(linear_task(8), "dynamiclrp:epsilon", args())
    assert row.metrics["abpc"] < lrp.metrics["abpc"]
    assert row.metrics["mass acc"] < 1.0


def test_blur_is_the_papers_scaled_to_the_image() -> None:
    """Kernel 51 and sigma 20 at 224 px; at 32 px 51 * 32 / 224 = 7.3 -> odd 7, sigma 2.86."""
    big = SimpleNamespace(inputs=torch.zeros(1, 3, 224, 224))
    small = SimpleNamespace(inputs=torch.zeros(1, 3, 32, 32))
    assert faithfulness.blur_kernel(big) == 51
    assert faithfulness.blur_sigma(big) == pytest.approx(20.0)
    assert faithfulness.blur_kernel(small) == 7
    assert faithfulness.blur_sigma(small) == pytest.approx(20.0 * 32 / 224)


def test_replacement_order_flag_then_task_then_blur() -> None:
    task = linear_task()
    assert faithfulness.replacement(task, args()) == "zero"
    assert faithfulness.replacement(task, args(replacement="mean")) == "mean"
    task.replacement = None
    assert faithfulness.replacement(task, args()) == "blur"


def test_lxt_rows_only_for_families_lxt_maps() -> None:
    task = linear_task()
    llama = SimpleNamespace(config=SimpleNamespace(model_type="llama"))
    t5 = SimpleNamespace(config=SimpleNamespace(model_type="t5"))
    a = args(lxt_python="/some/python")
    task.hf = {"model": llama, "output": "logits"}
    assert {"lxt:attnlrp", "lxt:cp-lrp"} <= set(faithfulness.methods_for(task, a))
    task.hf = {"model": t5, "output": "span"}
    assert not any(m.startswith("lxt:") for m in faithfulness.methods_for(task, a))
    task.hf = {"model": llama, "output": "cosine_mean_pool"}  # nothing the worker can rebuild
    assert not any(m.startswith("lxt:") for m in faithfulness.methods_for(task, a))
    task.hf = {"model": llama, "output": "logits"}
    assert not any(m.startswith("lxt:") for m in faithfulness.methods_for(task, args()))


def test_report_marks_failures_and_formats_missing_values() -> None:
    assert faithfulness.fmt(math.nan) == "-"
    assert faithfulness.fmt(None) == "-"
    assert faithfulness.fmt(1234.5) == "1234"
    rows = [
        faithfulness.Row("t", "a", {"abpc": 0.5, "abpc_se": 0.1}),
        faithfulness.Row("t", "b", error="ValueError: boom"),
    ]
    lines = faithfulness.task_table(linear_task(), rows)
    assert "**0.500** ± 0.100" in lines[2]
    assert "FAILED: ValueError: boom" in lines[3]
