"""The precision benchmark (``benchmarks/precision.py``): its metrics on hand-made maps, its
pipeline on two tiny zoo entries against an explanation computed here, and how it classifies
failures."""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import precision  # noqa: E402

import dynamiclrp  # noqa: E402
from dynamiclrp import zoo  # noqa: E402

# --- metrics on hand-made maps ---------------------------------------------------------------


def test_cosine_by_hand():
    a = torch.tensor([[3.0, 4.0]])
    assert precision.cosine(a, a) == pytest.approx(1.0, abs=1e-15)
    assert precision.cosine(a, -a) == pytest.approx(-1.0, abs=1e-15)
    assert precision.cosine(a, torch.tensor([[4.0, 3.0]])) == pytest.approx(24 / 25, abs=1e-15)
    assert precision.cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == 0.0
    # low-precision input against a float64 reference: computed in float64
    bf = torch.tensor([3.0, 4.0], dtype=torch.bfloat16)
    assert precision.cosine(bf, torch.tensor([4.0, 3.0], dtype=torch.float64)) == pytest.approx(
        0.96, abs=1e-15
    )
    assert math.isnan(precision.cosine(torch.zeros(3), torch.ones(3)))


def test_relative_l2_by_hand():
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)  # norm 5
    assert precision.relative_l2(ref.clone(), ref) == 0.0
    assert precision.relative_l2(torch.tensor([3.0, 5.0]), ref) == pytest.approx(0.2, abs=1e-15)
    assert precision.relative_l2(torch.zeros(2), ref) == pytest.approx(1.0, abs=1e-15)
    assert math.isnan(precision.relative_l2(ref, torch.zeros(2)))


def test_top_overlap_by_hand():
    ref = torch.arange(20.0)  # top-10% = 2 elements by |R|: indices 19 and 18
    assert precision.top_overlap(ref.clone(), ref) == 1.0
    a = ref.clone()
    a[5] = 100.0  # a's top 2: 5 and 19 -> one of the reference's two
    assert precision.top_overlap(a, ref) == 0.5
    a[19] = 0.0  # a's top 2: 5 and 18
    assert precision.top_overlap(a, ref) == 0.5
    a[18] = -1.0  # a's top 2: 5 and 17
    assert precision.top_overlap(a, ref) == 0.0
    # by magnitude: a large negative relevance is in the top set
    neg = ref.clone()
    neg[0] = -50.0  # top 2: 0 and 19
    assert precision.top_overlap(neg, neg) == 1.0
    assert precision.top_overlap(ref, neg) == 0.5
    # k = ceil(0.1 * 25) = 3
    r25 = torch.arange(25.0)
    b = r25.clone()
    b[22] = 0.0  # b's top 3: 24, 23, 21
    assert precision.top_overlap(b, r25) == pytest.approx(2 / 3)
    # k capped at the reference's non-zeros: ties among its zeros do not count
    sparse = torch.zeros(20)
    sparse[7] = 1.0
    other = torch.zeros(20)
    other[7], other[3] = 0.5, 0.1
    assert precision.top_overlap(other, sparse) == 1.0
    assert math.isnan(precision.top_overlap(other, torch.zeros(20)))


def test_graph_difference_by_hand():
    ref = Counter({"AddmmBackward0": 2, "MulBackward0": 3})
    assert precision.graph_difference(ref.copy(), ref) == ""
    other = Counter({"AddmmBackward0": 2, "MulBackward0": 1, "ClampBackward0": 2})
    assert precision.graph_difference(other, ref) == "+ClampBackward0 x2, -MulBackward0 x2"
    # dtype conversions differ between precisions by design: not counted
    upcast = ref + Counter({"ToCopyBackward0": 4})
    assert precision.graph_difference(upcast, ref) == ""
    assert precision.graph_difference(ref, upcast) == ""


def test_node_types_of_a_known_graph():
    x = torch.ones(2, requires_grad=True)
    y = (x * 2).relu().sum()
    assert precision.node_types(y) == Counter(
        {
            "SumBackward0": 1,
            "ReluBackward0": 1,
            "MulBackward0": 1,
            "torch::autograd::AccumulateGrad": 1,
        }
    )


# --- the pipeline on two tiny zoo entries ------------------------------------------------------


def _independent(name: str, dtype: torch.dtype, compute=None) -> torch.Tensor:
    """The relevance of entry ``name`` in ``dtype``, built here from the zoo's pieces."""
    torch.manual_seed(0)
    model = zoo.ZOO[name].build().double().eval()  # the zoo's seeded random weights
    kwargs = zoo.ZOO[name].inputs(model, 1, torch.Generator().manual_seed(0))
    x64 = kwargs["x"].double()
    target = model(x64).argmax(1)
    model = model.to(dtype)
    x = x64.to(dtype).requires_grad_()
    with dynamiclrp.record(model) as rec:
        out = model(x)
    return dynamiclrp.explain(out, x, target=target, recording=rec, dtype=compute)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a * b).sum() / (a.pow(2).sum().sqrt() * b.pow(2).sum().sqrt()))


@pytest.mark.parametrize("name", ["gru", "multihead_attention"])
def test_measure_entry_matches_an_independent_explanation(name):
    results = precision.measure_entry(name)
    assert [r.mode for r in results] == [m.name for m in precision.MODES]
    assert all(r.entry == name and r.ok for r in results), [r.error for r in results]
    ref, f32, bf16, bf16_acc = results[0], results[1], results[2], results[3]
    assert ref.cosine == pytest.approx(1.0, abs=1e-12)
    assert ref.rel_l2 == 0.0 and ref.top10 == 1.0 and ref.output_err == 0.0
    assert ref.graph_diff == "" and ref.seconds > 0
    r64 = _independent(name, torch.float64)
    for res, dtype, compute in (
        (f32, torch.float32, None),
        (bf16, torch.bfloat16, None),
        (bf16_acc, torch.bfloat16, torch.float32),
    ):
        rel = _independent(name, dtype, compute)
        assert rel.dtype == dtype
        assert res.cosine == pytest.approx(_cos(rel, r64), abs=1e-12)
        expected_l2 = float((rel.double() - r64).norm() / r64.norm())
        assert res.rel_l2 == pytest.approx(expected_l2, rel=1e-9)
    # measured (docs/precision.md): these small recurrent / attention models agree closely
    assert f32.cosine > 1 - 1e-9
    assert bf16.cosine > 0.99 and bf16_acc.cosine > 0.99
    assert 0 < f32.output_err < 1e-5 < bf16.output_err < 0.05


def test_the_first_mode_must_be_the_reference():
    with pytest.raises(ValueError, match="float64 reference"):
        precision.measure_entry("gru", precision.MODES[1:])


# --- failure classification --------------------------------------------------------------------


class _NoHalf(nn.Module):
    """Raises in float16, like an op torch lacks for that dtype."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        if x.dtype == torch.float16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return self.lin(x)


class _Opaque(torch.autograd.Function):
    """A custom Function: no LRP rule, and a backward that fails in bfloat16."""

    @staticmethod
    def forward(ctx, x):
        ctx.dtype = x.dtype
        return x.flip(-1) * 2  # mixes elements: the element-wise probe declines it

    @staticmethod
    def backward(ctx, g):
        if ctx.dtype == torch.bfloat16:
            raise RuntimeError("backward not implemented for 'BFloat16'")
        return g.flip(-1) * 2


class _WithOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return _Opaque.apply(self.lin(x))


def _register(monkeypatch, name, build):
    inputs = lambda model, batch, g: {"x": torch.randn(batch, 4, generator=g)}  # noqa: E731
    entry = zoo.ZooEntry(name, "torch", build, inputs, "x", lambda out: out)
    monkeypatch.setitem(zoo.ZOO, name, entry)


def test_failures_are_classified(monkeypatch):
    _register(monkeypatch, "_no_half", _NoHalf)
    by_mode = {r.mode: r for r in precision.measure_entry("_no_half")}
    assert by_mode["float16"].error_kind == "torch (forward)"
    assert "not implemented for 'Half'" in by_mode["float16"].error
    assert math.isnan(by_mode["float16"].cosine) and math.isnan(by_mode["float16"].output_err)
    assert by_mode["bfloat16"].ok and by_mode["bfloat16"].cosine > 0.99

    _register(monkeypatch, "_opaque", _WithOpaque)
    by_mode = {r.mode: r for r in precision.measure_entry("_opaque")}
    assert by_mode["float64"].error_kind == "dynamiclrp: UncoveredOpError"
    assert all(math.isnan(r.cosine) for r in by_mode.values())  # no reference, no metrics


def test_a_crash_is_told_apart_from_a_torch_backward_limit(monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("boom inside a rule")

    monkeypatch.setattr(precision.dynamiclrp, "explain", crash)
    _register(monkeypatch, "_opaque", _WithOpaque)
    by_mode = {r.mode: r for r in precision.measure_entry("_opaque")}
    # the gradient works in float32: the explanation's failure is ours
    assert by_mode["float32"].error_kind == "dynamiclrp crash"
    assert by_mode["float32"].error.startswith("RuntimeError: boom inside a rule")
    assert "boom inside a rule" in by_mode["float32"].traceback
    # torch's own backward fails in bfloat16: a torch limit
    assert by_mode["bfloat16"].error_kind == "torch (backward)"
    assert "gradient: RuntimeError: backward not implemented" in by_mode["bfloat16"].error


def test_report_keeps_its_hand_written_header(tmp_path):
    out = tmp_path / "precision.md"
    out.write_text("# Precision\n\nHand-written.\n\n" + precision.MARKER + "\nold table\n")
    assert precision.main(["--entries", "gru", "--repeats", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Precision\n\nHand-written.\n\n" + precision.MARKER)
    assert "old table" not in text
    assert "| gru | bfloat16 +f32 | 1-" in text
    assert "| float64, bf16-rounded |" in text


def test_accumulation_rows_pair_entries_by_hand():
    def res(entry, mode, rel_l2, seconds, error_kind=""):
        return precision.Result(entry, mode, rel_l2=rel_l2, seconds=seconds, error_kind=error_kind)

    results = [
        res("a", "bfloat16", 0.2, 1.0),
        res("a", "bfloat16 +f32", 0.1, 2.0),  # closer (ratio 0.5), twice the time
        res("b", "bfloat16", 0.1, 1.0),
        res("b", "bfloat16 +f32", 0.3, 4.0),  # farther (ratio 3)
        res("c", "bfloat16", 0.1, 1.0),
        res("c", "bfloat16 +f32", 0.1, 1.0, error_kind="dynamiclrp crash"),  # not paired
        res("a", "float16", 0.01, 1.0),
        res("a", "float16 +f32", 0.0104, 1.0),  # within 10%: neither
    ]
    rows = precision.accumulation_rows(results, precision.MODES)
    assert rows[2] == "| bfloat16 | 2 | 1.5e-01 | 2.0e-01 | 1 / 1 | 3.00 |"
    assert rows[3] == "| float16 | 1 | 1.0e-02 | 1.0e-02 | 0 / 0 | 1.00 |"
    assert len(rows) == 4
