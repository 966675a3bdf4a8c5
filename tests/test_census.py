"""The OpInfo census (``benchmarks/census.py``) on a fixed subset of PyTorch's ``op_db``.

The same classification as the benchmark, loaded from it: each OpInfo's first float64 samples are
explained (all operands together and each alone); a case is *explained* when the relevance is
finite, the books close and, where the op is linear in the explained operands, LRP-0 equals
gradient x input.  No OpInfo here may crash or be wrong, and every one of ``EXPECTED_EXPLAINED``
must be explained.  The classifier itself is checked on a rule broken on purpose.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import expecttest  # noqa: F401  (op_db imports it; in the test extras: a missing one must fail)
import pytest

from dynamiclrp.rules import OP_TABLE

ROOT = Path(__file__).resolve().parents[1]


def _load_census():
    spec = importlib.util.spec_from_file_location("_census_bench", ROOT / "benchmarks/census.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


census = _load_census()

EXPECTED_EXPLAINED = {
    "elementwise": [
        "add", "sub", "mul", "div.no_rounding_mode", "rsub", "abs", "exp", "tanh", "sigmoid",
        "nn.functional.relu", "nn.functional.gelu", "addcmul", "lerp", "maximum", "fmin",
        # element-wise binary ops (docs/rules.md 2.19)
        "logaddexp", "logaddexp2", "hypot", "atan2", "copysign", "div.floor_rounding",
        "div.trunc_rounding", "fmod", "remainder", "ldexp", "nextafter", "frexp", "fill",
        "nn.functional.prelu", "special.xlog1py", "special.entr",
    ],
    "routing": [
        "reshape", "permute", "transpose", "cat", "stack", "split", "chunk", "flip", "roll",
        "rot90", "expand", "repeat", "tile", "tril", "diagonal", "view_copy", "permute_copy",
        "squeeze_copy", "unbind_copy", "narrow_copy", "nn.functional.pixel_shuffle",
        "nn.functional.pixel_unshuffle", "nn.functional.channel_shuffle", "where", "masked_fill",
        "clamp_min", "zero_", "block_diag", "diag_embed",
    ],
    "indexing": [
        "__getitem__", "gather", "index_select", "take", "masked_select", "select_scatter",
        "slice_scatter", "diagonal_scatter", "masked_scatter", "index_fill",
        "nn.functional.embedding", "index_copy", "nn.functional.max_unpool2d.grad",
    ],
    "reduction": [
        "sum", "mean", "cumsum", "amax", "max.reduction_with_dim", "min.reduction_with_dim",
        "topk", "sort", "kthvalue", "median", "mode", "cummax", "var", "std_mean", "prod",
        "norm", "nansum", "trace", "masked.norm", "masked.prod", "dist", "cdist",
        "nn.functional.pdist",
    ],
    "pooling": [
        "nn.functional.max_pool2d", "nn.functional.avg_pool2d",
        "nn.functional.adaptive_avg_pool2d", "nn.functional.adaptive_max_pool3d",
        "nn.functional.fractional_max_pool2d",
    ],
    "padding": [
        "nn.functional.pad.reflect", "nn.functional.pad.replicate", "nn.functional.pad.circular",
        "constant_pad_nd",
    ],
    "normalisation": [
        "nn.functional.layer_norm", "native_layer_norm", "nn.functional.batch_norm",
        "_native_batch_norm_legit", "_batch_norm_with_update", "nn.functional.group_norm",
        "softmax",
    ],
    "contraction": [
        "mm", "addmm", "addmv", "addr", "addbmm", "baddbmm", "bmm", "dot", "vdot", "matmul",
        "linalg.cross", "nn.functional.linear", "nn.functional.conv2d", "einsum",
    ],
    "other": [
        "nn.functional.nll_loss", "nn.functional.cross_entropy", "nn.functional.l1_loss",
        # losses (docs/rules.md 2.19)
        "nn.functional.mse_loss", "nn.functional.huber_loss", "nn.functional.smooth_l1_loss",
        "nn.functional.soft_margin_loss", "nn.functional.binary_cross_entropy",
        "nn.functional.binary_cross_entropy_with_logits", "nn.functional.multi_margin_loss",
        "nn.functional.multilabel_margin_loss",
    ],
}  # fmt: skip
# issue 14: more reductions, scatters, contractions
EXPECTED_EXPLAINED["reduction"] += ["logsumexp", "masked.logsumexp", "logcumsumexp", "renorm"]
EXPECTED_EXPLAINED["summing"] = [
    "index_reduce.mean", "index_reduce.prod", "index_reduce.amin", "index_reduce.amax",
    "_segment_reduce.lengths", "_segment_reduce.offsets", "_unsafe_masked_index_put_accumulate",
    "nn.functional.embedding_bag",
]  # fmt: skip
EXPECTED_EXPLAINED["indexing"] += ["put"]
EXPECTED_EXPLAINED["contraction"] += ["nn.functional.bilinear"]
# run too, not expected to be explained: a composite the recording cannot see (a specific
# refusal, not a crash), and ops whose nodes have no rule
ALSO_RUN = ["nn.functional.margin_ranking_loss", "linalg.det"]
ALL = sorted({n for names in EXPECTED_EXPLAINED.values() for n in names} | set(ALSO_RUN))
MAX_SAMPLES = 2


@pytest.fixture(scope="module")
def results():
    return {r.name: r for r in census.census(ALL, MAX_SAMPLES)}


def _describe(r) -> str:
    w = r.worst
    return f"{r.name} ({r.family}): {r.status}" + (
        f", sample {w.sample} operands {w.operands}: {w.detail}" if w else f" {r.note}"
    )


def test_no_crash_and_no_wrong_map(results) -> None:
    bad = [_describe(r) for r in results.values() if r.status in ("crash", "wrong")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("family", list(EXPECTED_EXPLAINED))
def test_expected_ops_are_explained(results, family: str) -> None:
    missing = [n for n in EXPECTED_EXPLAINED[family] if n not in results]
    assert not missing, f"not in op_db: {missing}"
    for name in EXPECTED_EXPLAINED[family]:
        assert census.family(_op(name)) == family, name
    bad = [
        _describe(r) for n in EXPECTED_EXPLAINED[family] if (r := results[n]).status != "explained"
    ]
    assert not bad, "\n".join(bad)


def test_every_expected_op_poses_a_linear_check_somewhere(results) -> None:
    """The gradient x input check ran: many of these ops are linear in some operand."""
    linear = {n for n, r in results.items() if any(c.linear for c in r.cases)}
    need = ["reshape", "cat", "sum", "trace", "mm", "vdot", "nn.functional.pad.reflect"]
    assert not [n for n in need if n not in linear], [n for n in need if n not in linear]


def test_uncovered_node_is_refused(results) -> None:
    r = results["linalg.det"]
    assert r.status == "refused", _describe(r)
    assert "LinalgDetBackward0" in r.blocking
    assert "LinalgDetBackward0" not in OP_TABLE


def test_composite_under_record_is_refused_not_crashed(results) -> None:
    r = results["nn.functional.margin_ranking_loss"]
    assert r.status == "refused", _describe(r)


def _op(label: str):
    return next(op for op in census.load_ops() if census.op_label(op) == label)


def test_classifier_sees_a_wrong_map(monkeypatch) -> None:
    """A routing rule that doubles relevance: the books do not close, the census says wrong."""
    entry = OP_TABLE["TBackward0"]

    def doubled(ctx):
        return (2 * ctx.r.t(),)

    monkeypatch.setitem(OP_TABLE, "TBackward0", dataclasses.replace(entry, rule=doubled))
    (r,) = census.census(["t"], 1)
    assert r.status == "wrong", _describe(r)


def test_classifier_sees_lrp0_differ_from_gradient_times_input(monkeypatch) -> None:
    """A conserving but wrong route (reversed): books close, LRP-0 != gradient x input."""
    entry = OP_TABLE["TBackward0"]

    def reversed_route(ctx):
        return (ctx.r.t().flip(-1),)

    monkeypatch.setitem(OP_TABLE, "TBackward0", dataclasses.replace(entry, rule=reversed_route))
    (r,) = census.census(["t"], 1)
    assert r.status == "wrong", _describe(r)
    assert "gradient x input" in r.worst.detail


def test_classifier_sees_a_crash(monkeypatch) -> None:
    entry = OP_TABLE["TBackward0"]

    def broken(ctx):
        raise RuntimeError("broken on purpose")

    monkeypatch.setitem(OP_TABLE, "TBackward0", dataclasses.replace(entry, rule=broken))
    (r,) = census.census(["t"], 1)
    assert r.status == "crash" and "broken on purpose" in r.worst.detail, _describe(r)


def test_section_is_replaced_not_duplicated(tmp_path) -> None:
    doc = tmp_path / "coverage.md"
    doc.write_text("# Coverage\n\nkept above\n")
    res = census.census(["t"], 1)
    census.write_section(doc, census.format_section(res, "cmd"))
    census.write_section(doc, census.format_section(res, "cmd"))
    text = doc.read_text()
    assert text.startswith("# Coverage\n\nkept above\n")
    assert text.count(census.BEGIN) == 1 and text.count("## OpInfo census") == 1
