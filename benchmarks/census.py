"""OpInfo census: which of PyTorch's differentiable ops dynamiclrp explains, refuses, or gets wrong.

PyTorch's operator database (``torch.testing._internal.common_methods_invocations.op_db``, needs
``expecttest``) lists every public op with sample inputs.  For each OpInfo that supports autograd
and float64 on the CPU, the first ``--max-samples`` float64 samples are run forward, the first
floating tensor output that requires grad is picked, and it is explained with
``dynamiclrp.explain(out, inputs)`` (seeded with the output itself, ``target=None``, preset
``"dynamiclrp"``):

* once with every requires-grad tensor operand of the sample as an input (all together), and
* once per requires-grad operand alone, the others detached (held constant), the forward re-run.

A call that raises :class:`~dynamiclrp.ValueRecoveryError` asking for ``dynamiclrp.record()`` is
retried with the forward pass run under ``with dynamiclrp.record() as rec`` (counted separately).

Each case is classified:

* **explained**: the relevance is finite and the books close (``report.residual`` within 1e-6 of
  the largest entry of the books); and where the op is linear in the explained operands (tested
  numerically, ``f(a x1 + b x2) == a f(x1) + b f(x2)`` with the other operands fixed), LRP-0
  (preset ``"epsilon"`` with ``eps=1e-12``) equals gradient x input of ``sum(out)`` to 1e-8
  relative to its largest magnitude;
* **refused**: dynamiclrp raised one of its own errors naming the op before propagating
  (``UncoveredOpError``; or a ``ValueRecoveryError`` that ``record()`` does not cure);
* **crash**: any other exception (including a ``ValueRecoveryError`` asking again for
  ``record()`` under ``record()``);
* **wrong**: non-finite relevance, books that do not close, or LRP-0 != gradient x input on a
  linear operand;
* **n/a**: the case cannot be posed (the forward fails on fresh leaves, no floating output that
  requires grad, an empty or non-finite output, an operand the output does not depend on).

An OpInfo takes the class of its worst case (wrong > crash > refused > explained > n/a).

Run from the repository root::

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/census.py                 # all ops
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/census.py --ops mm,addmv  # some ops
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/census.py --out docs/coverage.md

``--out`` replaces the section between the ``<!-- census:begin -->`` / ``<!-- census:end -->``
markers of that file (appending it if absent) and keeps the rest of the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

import dynamiclrp
from dynamiclrp.errors import (
    DynamicLRPError,
    GraphError,
    NonFiniteRelevanceError,
    UncoveredOpError,
    ValueRecoveryError,
)
from dynamiclrp.rules import LEAF, OP_TABLE

SEED = 0
BOOKS_TOL = 1e-6
GXI_TOL = 1e-7
"""LRP-0 (``eps = 1e-12``) against gradient x input, relative to the largest term: a wrong rule
misses by 1e-2 and more; the stabiliser on an output that nearly cancels leaves ~1e-8."""
FD_MAX = 4096
"""Operands up to this many elements get a finite-difference second opinion where autograd's
gradient and LRP-0 disagree (exact for a linear op: ``f(x + e_i) - f(x)``)."""
TIES = {
    name: (
        "duplicate writes of equal values: the gradient gives each writer the whole output "
        "element, the rule splits it evenly between them (conservation); LRP-0 is compared "
        "off the ties only"
    )
    for name in (
        "nn.functional.max_unpool1d",
        "nn.functional.max_unpool2d",
        "nn.functional.max_unpool3d",
    )
}
"""OpInfos whose samples tie (several sources of one output element): there the gradient is a
convention, not a reference."""
SEVERITY = {"n/a": 0, "explained": 1, "refused": 2, "crash": 3, "wrong": 4}
FAMILIES = (
    "elementwise",
    "routing",
    "indexing",
    "summing",
    "reduction",
    "pooling",
    "padding",
    "normalisation",
    "contraction",
    "linalg",
    "fft",
    "random/sampling",
    "sparse",
    "other",
)
BEGIN, END = "<!-- census:begin -->", "<!-- census:end -->"

LRP0 = dataclasses.replace(dynamiclrp.preset("epsilon"), eps=1e-12)

# --- families ----------------------------------------------------------------------------------

_ROUTING = {
    "H", "T", "mH", "mT", "adjoint", "alias_copy", "as_strided", "as_strided_copy",
    "atleast_1d", "atleast_2d", "atleast_3d", "broadcast_tensors", "broadcast_to",
    "cat", "chunk", "clone", "column_stack", "contiguous", "diag", "diag_embed", "diagflat",
    "diagonal", "diagonal_copy", "dsplit", "dstack", "expand", "expand_as", "expand_copy",
    "fft.fftshift", "fft.ifftshift", "flatten", "flip", "fliplr", "flipud", "hsplit", "hstack",
    "linalg.diagonal", "movedim", "narrow", "narrow_copy", "nn.functional.channel_shuffle",
    "nn.functional.pixel_shuffle", "nn.functional.pixel_unshuffle", "nn.functional.unfold",
    "permute", "permute_copy", "ravel", "repeat", "repeat_interleave", "reshape", "reshape_as",
    "resolve_conj", "resolve_neg", "roll", "rot90", "select", "slice", "split",
    "split_with_sizes", "split_with_sizes_copy", "squeeze", "squeeze_copy", "stack", "t",
    "t_copy", "tensor_split", "tile", "to", "transpose", "transpose_copy", "tril", "triu",
    "unbind", "unbind_copy", "unflatten", "unfold", "unfold_copy", "unsafe_chunk",
    "unsafe_split", "unsqueeze", "unsqueeze_copy", "view", "view_as", "view_copy", "vsplit",
    "vstack", "swapaxes", "swapdims", "moveaxis", "block_diag", "meshgrid", "cartesian_prod",
    "combinations", "view_as_real", "view_as_complex", "nn.functional.upsample_nearest",
    "where", "masked_fill", "zero_", "clamp", "clamp_min", "clamp_max", "clip",
}  # fmt: skip
_INDEXING = {
    "__getitem__", "gather", "index_select", "index_copy", "index_fill", "index_put",
    "masked_select", "masked_scatter", "take", "take_along_dim", "put", "select_scatter",
    "slice_scatter", "diagonal_scatter", "as_strided_scatter", "_unsafe_masked_index",
    "nn.functional.embedding", "nn.functional.one_hot", "scatter", "nn.functional.max_unpool1d",
    "nn.functional.max_unpool2d", "nn.functional.max_unpool3d",
}  # fmt: skip
_SUMMING = {
    "scatter_add", "scatter_reduce", "index_add", "index_reduce", "nn.functional.embedding_bag",
    "nn.functional.fold", "_unsafe_masked_index_put_accumulate", "_segment_reduce",
}  # fmt: skip
_REDUCTION = {
    "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "logsumexp", "max", "min",
    "aminmax", "median", "nanmedian", "mode", "kthvalue", "topk", "sort", "msort", "quantile",
    "nanquantile", "norm", "renorm", "dist", "var_mean", "std_mean", "trace", "diff",
    "gradient", "trapezoid", "trapz", "cumulative_trapezoid", "sum_to_size", "cov", "corrcoef",
    "linalg.norm", "linalg.vector_norm", "linalg.matrix_norm", "cdist", "nn.functional.pdist",
    "nn.functional.pairwise_distance", "nn.functional.cosine_similarity", "argsort",
}  # fmt: skip
_CONTRACTION = {
    "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "dot", "vdot", "einsum", "inner",
    "kron", "linalg.multi_dot", "linalg.vecdot", "matmul", "__rmatmul__", "mm", "mv", "outer",
    "ger", "tensordot", "chain_matmul", "nn.functional.linear", "nn.functional.bilinear",
    "nn.functional.conv1d", "nn.functional.conv2d", "nn.functional.conv3d",
    "nn.functional.conv_transpose1d", "nn.functional.conv_transpose2d",
    "nn.functional.conv_transpose3d", "nn.functional.scaled_dot_product_attention",
    "nn.functional.multi_head_attention_forward", "torch.ops.aten._efficient_attention_forward",
    "torch.ops.aten._flash_attention_forward", "linalg.cross", "cross",
}  # fmt: skip
_NORMALISATION = {
    "native_batch_norm", "_native_batch_norm_legit", "_batch_norm_with_update",
    "native_layer_norm", "native_group_norm", "nn.functional.batch_norm",
    "nn.functional.group_norm", "nn.functional.instance_norm", "nn.functional.layer_norm",
    "nn.functional.local_response_norm", "nn.functional.rms_norm", "nn.functional.normalize",
    "masked.normalize", "softmax", "log_softmax", "nn.functional.softmin", "masked.softmax",
    "masked.log_softmax", "masked.softmin", "torch.ops.aten._safe_softmax.default",
    "_softmax_backward_data",
}  # fmt: skip
_RANDOM = {
    "bernoulli", "normal", "multinomial", "poisson", "nn.functional.rrelu", "uniform",
    "cauchy", "exponential", "geometric", "log_normal", "native_dropout_backward",
    "pca_lowrank", "svd_lowrank",
}  # fmt: skip
_LINALG_NAMES = {
    "cholesky", "cholesky_inverse", "cholesky_solve", "det", "logdet", "lu", "lu_solve",
    "lu_unpack", "matrix_exp", "ormqr", "pinverse", "qr", "svd", "triangular_solve",
    "inverse", "geqrf", "slogdet",
}  # fmt: skip


def family(op) -> str:
    """The census family of an OpInfo, from its name and OpInfo class."""
    name = op.name
    cls = type(op).__name__
    if name in _RANDOM or "dropout" in name:
        return "random/sampling"
    if name.startswith("sparse.") or name == "to_sparse":
        return "sparse"
    if name.startswith("fft.") and name not in _ROUTING or cls == "SpectralFuncInfo":
        return "fft"
    if name in ("stft", "istft"):
        return "fft"
    if name in _SUMMING:
        return "summing"
    if name in _INDEXING:
        return "indexing"
    if name in _ROUTING or cls == "ShapeFuncInfo":
        return "routing"
    if name in _CONTRACTION:
        return "contraction"
    if name in _NORMALISATION:
        return "normalisation"
    if "pool" in name:
        return "pooling"
    if name in ("nn.functional.pad", "constant_pad_nd"):
        return "padding"
    if name.startswith("linalg.") or name in _LINALG_NAMES:
        return "linalg"
    if name in _REDUCTION or cls == "ReductionOpInfo":
        return "reduction"
    if name.startswith("masked."):
        return "reduction"
    if cls in ("UnaryUfuncInfo", "BinaryUfuncInfo"):
        return "elementwise"
    if name in (
        "addcdiv", "addcmul", "lerp", "logaddexp2", "nn.functional.gelu",
        "nn.functional.hardswish", "nn.functional.leaky_relu", "nn.functional.glu",
    ):  # fmt: skip
        return "elementwise"
    if name in ("nn.functional.interpolate", "nn.functional.upsample_bilinear"):
        return "pooling" if "area" in op.variant_test_name else "reduction"
    if name == "_upsample_bilinear2d_aa":
        return "reduction"
    return "other"


# --- one case ----------------------------------------------------------------------------------


@dataclass
class Case:
    """One explanation: a sample, and which operands are explained (``"all"`` or an index)."""

    sample: int
    operands: str
    kind: str
    recorded: bool = False
    linear: bool = False
    detail: str = ""
    blocking: tuple[str, ...] = ()


@dataclass
class OpResult:
    """Every case of one OpInfo, and its class (the worst case's)."""

    name: str
    family: str
    cases: list[Case] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0

    @property
    def status(self) -> str:
        if not self.cases:
            return "n/a"
        return max((c.kind for c in self.cases), key=SEVERITY.__getitem__)

    @property
    def worst(self) -> Case | None:
        cases = [c for c in self.cases if c.kind == self.status]
        return cases[0] if cases else None

    @property
    def blocking(self) -> list[str]:
        return sorted({b for c in self.cases if c.kind == "refused" for b in c.blocking})

    @property
    def recorded(self) -> int:
        return sum(c.recorded for c in self.cases)


def op_label(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def uncovered_nodes(out: torch.Tensor) -> tuple[str, ...]:
    """Names of the nodes below ``out`` that the op table has no entry for."""
    seen, names, stack = set(), set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        name = type(fn).__name__
        if name != LEAF and name not in OP_TABLE:
            names.add(name)
        stack.extend(f for f, _ in fn.next_functions)
    return tuple(sorted(names))


def _graph_leaves(out: torch.Tensor) -> set[int]:
    """``id`` of every leaf variable below ``out``."""
    seen, ids, stack = set(), set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == LEAF:
            ids.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    return ids


class Problem:
    """A forward computation of one sample with some operands replaceable.

    ``leaves`` is the flattened ``(input, args, kwargs)`` of the sample; ``slots`` the positions
    of the floating tensors that require grad (the operands, deduplicated by identity)."""

    def __init__(self, op, sample):
        self.op = op
        self.sample = sample
        self.leaves, self.spec = pytree.tree_flatten((sample.input, sample.args, sample.kwargs))
        groups: dict[int, list[int]] = {}
        for i, t in enumerate(self.leaves):
            if (
                isinstance(t, torch.Tensor)
                and t.requires_grad
                and t.dtype.is_floating_point
                and not t.is_sparse
            ):
                groups.setdefault(id(t), []).append(i)
        self.slots = list(groups.values())  # positions sharing one tensor
        self.pick: int | None = None
        self.op_name = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")

    def forward(self, values: dict[int, torch.Tensor], grad: bool = True):
        """Run the op with operand ``k`` replaced by ``values[k]`` (the rest detached); return
        the flattened outputs."""
        leaves = [t.detach() if isinstance(t, torch.Tensor) else t for t in self.leaves]
        for k, v in values.items():
            for i in self.slots[k]:
                leaves[i] = v
        inp, args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        torch.manual_seed(SEED)
        with torch.set_grad_enabled(grad):
            out = self.op(inp, *args, **kwargs)
            out = self.sample.output_process_fn_grad(out)
        return pytree.tree_leaves(out)

    def choose_output(self, outs) -> int | None:
        for i, t in enumerate(outs):
            if (
                isinstance(t, torch.Tensor)
                and t.requires_grad
                and t.dtype.is_floating_point
                and t.numel() > 0
                and not t.is_sparse
            ):
                return i
        return None

    def value(self, k: int) -> torch.Tensor:
        return self.leaves[self.slots[k][0]].detach()


def _is_linear(prob: Problem, ks: Sequence[int]) -> bool:
    """``f(a x1 + b x2) == a f(x1) + b f(x2)`` in the operands ``ks`` (the rest fixed), for two
    draws; ``False`` where any evaluation fails."""
    try:
        gen = torch.Generator().manual_seed(SEED + 1)
        for a, b in ((0.7, -1.3), (-2.1, 0.4)):
            x1 = {k: prob.value(k) for k in ks}
            x2 = {
                k: torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device)
                for k, v in x1.items()
            }
            mix = {k: a * x1[k] + b * x2[k] for k in ks}
            f1 = prob.forward(x1, grad=False)[prob.pick]
            f2 = prob.forward(x2, grad=False)[prob.pick]
            fm = prob.forward(mix, grad=False)[prob.pick]
            expect = a * f1 + b * f2
            if not (torch.isfinite(fm).all() and torch.isfinite(expect).all()):
                return False
            scale = float(torch.stack([f1.abs().max(), f2.abs().max()]).max())
            if not torch.allclose(fm, expect, rtol=1e-9, atol=1e-9 * max(scale, 1e-300)):
                return False
        return True
    except Exception:
        return False


def _finite_difference_gxi(prob: Problem, ks: Sequence[int]) -> list[torch.Tensor] | None:
    """Gradient x input of ``sum(f)`` in the operands ``ks`` by finite differences, exact for an
    op linear in them (``sum f(x + e_i) - sum f(x)``); ``None`` for large operands."""
    values = {k: prob.value(k) for k in ks}
    if sum(v.numel() for v in values.values()) > FD_MAX:
        return None
    try:
        base = prob.forward(values, grad=False)[prob.pick].sum()
        out = []
        for k in ks:
            flat = values[k].reshape(-1)
            g = torch.zeros_like(flat)
            for i in range(flat.numel()):
                bumped = dict(values)
                e = torch.zeros_like(flat)
                e[i] = 1.0
                bumped[k] = (flat + e).reshape(values[k].shape)
                g[i] = prob.forward(bumped, grad=False)[prob.pick].sum() - base
            out.append((g * flat).reshape(values[k].shape))
        return out
    except Exception:
        return None


def _books_close(report) -> tuple[bool, float]:
    terms = [
        report.seeded,
        *report.inputs,
        report.absorbed,
        report.unrequested,
        report.stabiliser,
        report.rule,
    ]
    scale = max(abs(t) for t in terms)
    return abs(report.residual) <= BOOKS_TOL * scale + 1e-12, report.residual


def _explain(out, inputs, rules, rec=None):
    return dynamiclrp.explain(out, inputs, rules=rules, return_report=True, recording=rec)


def _asks_for_record(err: Exception) -> bool:
    """The error's advice is to run the forward pass under ``dynamiclrp.record()``."""
    return isinstance(
        err, ValueRecoveryError
    ) and "forward pass under `with dynamiclrp.record" in str(err)


def run_case(prob: Problem, ks: Sequence[int], sample_i: int, label: str) -> Case:
    """Explain the chosen output of ``prob`` in the operands ``ks`` (module docstring)."""
    case = Case(sample_i, label, "n/a")
    leaves = {k: prob.value(k).clone().requires_grad_(True) for k in ks}
    try:
        outs = prob.forward(leaves)
    except Exception as err:
        case.detail = f"forward failed: {type(err).__name__}: {str(err)[:120]}"
        return case
    prob.pick = prob.choose_output(outs)
    if prob.pick is None:
        case.detail = "no floating output that requires grad"
        return case
    out = outs[prob.pick]
    if not torch.isfinite(out).all():
        case.detail = "non-finite output"
        return case
    in_graph = _graph_leaves(out)
    ks = [k for k in ks if id(leaves[k]) in in_graph]
    if not ks:
        case.detail = "the output does not depend on the operand(s)"
        return case
    inputs = [leaves[k] for k in ks]
    case.linear = _is_linear(prob, ks)
    rec = None
    try:
        try:
            rel, report = _explain(out, inputs, "dynamiclrp")
        except ValueRecoveryError as err:
            if not _asks_for_record(err):
                raise
            with dynamiclrp.record() as rec:
                outs = prob.forward(leaves)
            out = outs[prob.pick]
            case.recorded = True
            try:
                rel, report = _explain(out, inputs, "dynamiclrp", rec)
            except ValueRecoveryError as err2:
                if _asks_for_record(err2):
                    case.kind = "crash"
                    case.detail = f"asks for record() under record(): {str(err2)[:300]}"
                    return case
                raise
        rel = rel if isinstance(rel, tuple) else (rel,)
        if not all(torch.isfinite(r).all() for r in rel):
            case.kind, case.detail = "wrong", "non-finite relevance"
            return case
        ok, residual = _books_close(report)
        if not ok:
            case.kind = "wrong"
            case.detail = f"books open: residual {residual:.3g} of seeded {report.seeded:.3g}"
            return case
        if case.linear:
            gx = torch.autograd.grad(
                out, inputs, torch.ones_like(out), retain_graph=True, allow_unused=True
            )
            gxi = [
                torch.zeros_like(x) if g is None else g * x for g, x in zip(gx, inputs, strict=True)
            ]
            r0, _ = _explain(out, inputs, LRP0, rec)
            r0 = r0 if isinstance(r0, tuple) else (r0,)
            scale = max(float(g.abs().max()) if g.numel() else 0.0 for g in gxi)
            err = max(
                float((a - b).abs().max()) if b.numel() else 0.0
                for a, b in zip(r0, gxi, strict=True)
            )
            # an op whose output has a lower precision (x.bfloat16()) is compared at that one
            tol = max(GXI_TOL, 8 * torch.finfo(out.dtype).eps)
            if err > tol * scale + 1e-12:
                fd = _finite_difference_gxi(prob, ks)
                if fd is not None:
                    err_fd = max(
                        float((a - b).abs().max()) if b.numel() else 0.0
                        for a, b in zip(r0, fd, strict=True)
                    )
                    if err_fd <= tol * scale + 1e-12:
                        case.kind = "explained"
                        case.detail = (
                            f"LRP-0 == finite-difference gradient x input ({err_fd:.2g}); "
                            f"autograd's gradient differs by {err:.3g} (its backward)"
                        )
                        return case
                if prob.op_name in TIES:
                    case.kind = "explained"
                    case.detail = TIES[prob.op_name]
                    return case
                case.kind = "wrong"
                case.detail = f"linear, LRP-0 != gradient x input: {err:.3g} of {scale:.3g}"
                return case
        case.kind = "explained"
    except UncoveredOpError as err:
        case.kind = "refused"
        case.blocking = uncovered_nodes(out) or (_first_node_named(str(err)),)
        case.detail = str(err)[:300]
    except ValueRecoveryError as err:
        case.kind = "refused"
        case.blocking = tuple(f"{n} (value)" for n in _nodes_named(str(err)))
        case.detail = f"ValueRecoveryError: {str(err)[:300]}"
    except NonFiniteRelevanceError as err:
        case.kind, case.detail = "wrong", f"NonFiniteRelevanceError: {str(err)[:300]}"
    except GraphError as err:  # InputError included: an empty or unusable output / input
        case.kind, case.detail = "n/a", f"{type(err).__name__}: {str(err)[:200]}"
    except DynamicLRPError as err:
        case.kind, case.detail = "crash", f"{type(err).__name__}: {str(err)[:300]}"
    except Exception as err:
        case.kind, case.detail = "crash", f"{type(err).__name__}: {str(err)[:300]}"
    return case


_NODE = re.compile(r"\b([A-Z][A-Za-z0-9]*Backward[0-9A-Za-z]*|CopySlices)\b")


def _nodes_named(msg: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_NODE.findall(msg)))[:1]


def _first_node_named(msg: str) -> str:
    found = _nodes_named(msg)
    return found[0] if found else "?"


def run_op(op, max_samples: int) -> OpResult:
    """Every case of the first ``max_samples`` float64 CPU samples of ``op``."""
    res = OpResult(op_label(op), family(op))
    t0 = time.perf_counter()
    try:
        if torch.float64 not in op.supported_dtypes("cpu"):
            res.note = "no float64 on the CPU"
            return res
        torch.manual_seed(SEED)
        samples = op.sample_inputs("cpu", torch.float64, requires_grad=True)
        taken, tried, skipped = 0, 0, None
        for i, sample in enumerate(samples):
            # the first max_samples samples that can be posed: samples with an empty operand
            # are passed over (many OpInfos start with them), and no more than 5 * max_samples
            # of the others are tried
            if taken >= max_samples or tried >= 5 * max_samples:
                break
            prob = Problem(op, sample)
            if not prob.slots or any(prob.value(k).numel() == 0 for k in range(len(prob.slots))):
                continue
            tried += 1
            case = run_case(prob, range(len(prob.slots)), i, "all")
            if case.kind == "n/a":
                skipped = skipped or case
                continue
            taken += 1
            res.cases.append(case)
            if len(prob.slots) > 1:
                for k in range(len(prob.slots)):
                    res.cases.append(run_case(prob, [k], i, str(k)))
        if not res.cases and skipped is not None:
            res.cases.append(skipped)
    except Exception as err:  # the sample generator itself failed
        res.note = f"samples failed: {type(err).__name__}: {str(err)[:120]}"
    finally:
        res.seconds = time.perf_counter() - t0
    if not res.cases and not res.note:
        res.note = "no sample with a floating operand that requires grad"
    return res


def load_ops(names: Sequence[str] | None = None) -> list:
    """The OpInfos that support autograd, optionally only those named (name or name.variant)."""
    from torch.testing._internal.common_methods_invocations import op_db

    ops = [op for op in op_db if op.supports_autograd]
    if names:
        wanted = set(names)
        ops = [op for op in ops if op.name in wanted or op_label(op) in wanted]
        missing = wanted - {op.name for op in ops} - {op_label(op) for op in ops}
        if missing:
            raise SystemExit(f"no autograd OpInfo named {sorted(missing)}")
    return ops


def census(
    names: Sequence[str] | None = None,
    max_samples: int = 3,
    progress: Callable[[OpResult], None] | None = None,
) -> list[OpResult]:
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for op in load_ops(names):
            res = run_op(op, max_samples)
            results.append(res)
            if progress is not None:
                progress(res)
    return results


# --- reporting ---------------------------------------------------------------------------------


def summary(results: Sequence[OpResult]) -> dict:
    total = Counter(r.status for r in results)
    fam: dict[str, Counter] = {f: Counter() for f in FAMILIES}
    for r in results:
        fam[r.family][r.status] += 1
    blocking = Counter(b for r in results for b in r.blocking)
    recorded = sum(1 for r in results if r.recorded)
    return {"total": total, "family": fam, "blocking": blocking, "recorded": recorded}


def format_section(results: Sequence[OpResult], command: str) -> str:
    s = summary(results)
    posed = [r for r in results if r.status != "n/a"]
    t = s["total"]
    cols = ("explained", "refused", "crash", "wrong", "n/a")
    lines = [
        BEGIN,
        "## OpInfo census",
        "",
        f"Generated by `{command}` (torch {torch.__version__}, float64, CPU): every OpInfo of "
        "PyTorch's `op_db` that supports autograd, its first samples explained all operands "
        "together and each operand alone (`benchmarks/census.py` says how each case is "
        "classified; an OpInfo takes the class of its worst case).",
        "",
        f"**{t['explained']} of {len(posed)} OpInfos explained** "
        f"({100 * t['explained'] / max(1, len(posed)):.1f}%), {t['refused']} refused, "
        f"{t['crash']} crash, {t['wrong']} wrong; {t['n/a']} not applicable (no case could be "
        f"posed). {s['recorded']} OpInfos needed `dynamiclrp.record()` for some case.",
        "",
        "| family | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for f in FAMILIES:
        c = s["family"][f]
        if sum(c.values()):
            lines.append(f"| {f} | " + " | ".join(str(c[k]) for k in cols) + " |")
    lines.append("| **all** | " + " | ".join(str(t[k]) for k in cols) + " |")
    lines += [
        "",
        "### Refused OpInfos and the node types that block them",
        "",
        "A node type alone has no rule (`UncoveredOpError`, raised before propagation); one "
        "marked *(value)* has a rule that needs a forward value nothing kept and "
        "`dynamiclrp.record()` cannot keep either (`ValueRecoveryError`, e.g. a constant added "
        "inside a C++ composite).",
        "",
    ]
    lines += ["| OpInfo | family | blocking nodes |", "|---|---|---|"]
    for r in sorted(results, key=lambda r: (r.family, r.name)):
        if r.status == "refused":
            why = ", ".join(f"`{b}`" for b in r.blocking) or (r.worst.detail[:100])
            lines.append(f"| `{r.name}` | {r.family} | {why} |")
    lines += ["", "Blocking node types, by the number of OpInfos they block:", ""]
    lines.append(", ".join(f"`{b}` {n}" for b, n in s["blocking"].most_common()) or "none")
    bad = [r for r in results if r.status in ("crash", "wrong")]
    lines += ["", "### Crashes and wrong maps", ""]
    if not bad:
        lines.append("None.")
    for r in bad:
        w = r.worst
        detail = w.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"- `{r.name}` ({r.family}), {r.status}, sample {w.sample}, operands {w.operands}: "
            f"{detail}"
        )
    na = [r for r in results if r.status == "n/a"]
    if na:
        lines += ["", "### Not applicable", ""]
        lines.append(
            ", ".join(
                f"`{r.name}` ({r.note or (r.worst.detail[:60] if r.worst else '')})" for r in na
            )
        )
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section if text else section
    path.write_text(text)


def print_summary(results: Sequence[OpResult]) -> None:
    s = summary(results)
    posed = sum(1 for r in results if r.status != "n/a")
    t = s["total"]
    print(
        f"\n{len(results)} OpInfos, {posed} posed: explained {t['explained']}, refused "
        f"{t['refused']}, crash {t['crash']}, wrong {t['wrong']}, n/a {t['n/a']}; "
        f"needing record() {s['recorded']}"
    )
    for f in FAMILIES:
        c = s["family"][f]
        if sum(c.values()):
            print(f"  {f:16s} " + " ".join(f"{k} {c[k]}" for k in SEVERITY if c[k]))
    print("blocking:", ", ".join(f"{b} {n}" for b, n in s["blocking"].most_common()))
    for r in results:
        if r.status in ("crash", "wrong"):
            w = r.worst
            print(f"  {r.status.upper()} {r.name} [{w.sample}/{w.operands}]: {w.detail[:300]}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", help="comma-separated OpInfo names (name or name.variant)")
    ap.add_argument("--max-samples", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write the census section into this markdown file")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per OpInfo")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = [n for n in a.ops.split(",") if n] if a.ops else None

    def progress(r: OpResult):
        if a.verbose:
            extra = ",".join(r.blocking) if r.status == "refused" else ""
            w = r.worst
            if r.status in ("crash", "wrong") and w is not None:
                extra = w.detail[:160]
            print(
                f"{r.status:9s} {r.family:16s} {r.name:45s} {r.seconds:6.2f}s {extra}", flush=True
            )

    results = census(names, a.max_samples, progress)
    print_summary(results)
    if a.out:
        cmd = "python benchmarks/census.py" + (f" --max-samples {a.max_samples}")
        cmd += f" --out {a.out}"
        write_section(a.out, format_section(results, cmd))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
