"""How much an explanation changes with the model's precision, across the architecture zoo.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/precision.py --out docs/precision.md

Every entry of :mod:`dynamiclrp.zoo` is built once (seeded, random weights) in float64; each mode
explains a copy of that model converted with ``.to(dtype)``, on the same inputs converted with
``.to(dtype)`` (floating tensors only), for the same target (the argmax of the float64 output):

========================  ===============  ========================================
mode                      model and input  relevance computed in
========================  ===============  ========================================
``float64`` (reference)   float64          float64
``float32``               float32          float32
``bfloat16``              bfloat16         bfloat16
``bfloat16 +f32``         bfloat16         float32 (``explain(..., dtype=torch.float32)``)
``float16``               float16          float16
``float16 +f32``          float16          float32 (``explain(..., dtype=torch.float32)``)
========================  ===============  ========================================

plus two diagnostic modes (:data:`DIAGNOSTIC_MODES`): float64 arithmetic on weights and inputs
rounded to bfloat16 / float16, which tell the rounding of the model from low-precision arithmetic.

Against the float64 map ``R_ref`` (all tensors flattened, compared in float64): the cosine
similarity, the relative L2 error ``||R - R_ref|| / ||R_ref||``, and the share of the reference's
top-10% elements (by ``|R|``) that are also in the mode's top-10%.  A mode that raises is
classified: ``torch (forward)`` when the model's own forward pass fails in that dtype,
``torch (backward)`` when the explanation fails and so does ``torch.autograd.grad`` of the same
output (a kernel torch lacks for the dtype), ``dynamiclrp: <Error>`` for one of dynamiclrp's own
errors (e.g. ``NonFiniteRelevanceError`` on a float16 overflow), and ``dynamiclrp crash`` when
an explanation raises something else while the gradient works (an engine bug).

Entries whose package (``torchvision``, ``transformers``) is missing are listed and skipped.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import dynamiclrp
from dynamiclrp import zoo
from dynamiclrp.errors import DynamicLRPError

REFERENCE = "float64"


@dataclass(frozen=True)
class Mode:
    """A precision to explain in: the model's dtype and the relevance dtype (None: the model's)."""

    name: str
    model_dtype: torch.dtype
    relevance_dtype: torch.dtype | None = None
    rounded_to: torch.dtype | None = None  # weights and inputs rounded to this dtype first


MODES: tuple[Mode, ...] = (
    Mode("float64", torch.float64),
    Mode("float32", torch.float32),
    Mode("bfloat16", torch.bfloat16),
    Mode("bfloat16 +f32", torch.bfloat16, torch.float32),
    Mode("float16", torch.float16),
    Mode("float16 +f32", torch.float16, torch.float32),
)
DIAGNOSTIC_MODES: tuple[Mode, ...] = (
    Mode("float64, bf16-rounded", torch.float64, rounded_to=torch.bfloat16),
    Mode("float64, fp16-rounded", torch.float64, rounded_to=torch.float16),
)
"""float64 arithmetic on weights and inputs rounded to bfloat16 / float16: how much of a
low-precision mode's difference the rounding of the model and input alone explains."""


@dataclass
class Result:
    """One entry explained in one mode."""

    entry: str
    mode: str
    cosine: float = math.nan
    rel_l2: float = math.nan
    top10: float = math.nan
    output_err: float = math.nan  # max |out - out_ref| / max |out_ref| over the explained logits
    seconds: float = math.nan  # median explanation time (forward excluded)
    graph_diff: str = ""  # autograd node types that differ from the float64 graph's
    error_kind: str = ""  # "" when it ran
    error: str = ""  # "ErrorType: first words"
    traceback: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        return not self.error_kind


# --- metrics -------------------------------------------------------------------------------------


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two maps (flattened, in float64); NaN if either is all zeros."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return math.nan
    return float(a @ b / (na * nb))


def relative_l2(a: Tensor, ref: Tensor) -> float:
    """``||a - ref|| / ||ref||`` (flattened, in float64); NaN if ``ref`` is all zeros."""
    a, ref = a.detach().double().flatten(), ref.detach().double().flatten()
    n = ref.norm()
    return math.nan if n == 0 else float((a - ref).norm() / n)


def top_overlap(a: Tensor, ref: Tensor, fraction: float = 0.1) -> float:
    """Share of the reference's top ``fraction`` elements by ``|R|`` found in ``a``'s top ones.

    ``k = ceil(fraction * n)``, capped at the number of non-zero reference elements (so that ties
    among exact zeros do not count); both sets have ``k`` elements, so this is also the precision.
    NaN if the reference is all zeros.
    """
    a, ref = a.detach().double().flatten().abs(), ref.detach().double().flatten().abs()
    k = min(math.ceil(fraction * ref.numel()), int((ref != 0).sum()))
    if k == 0:
        return math.nan
    top_ref = set(ref.topk(k).indices.tolist())
    top_a = set(a.topk(k).indices.tolist())
    return len(top_ref & top_a) / k


# --- one entry -----------------------------------------------------------------------------------


def _cast_kwargs(kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {
        k: v.detach().to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v
        for k, v in kwargs.items()
    }


def node_types(output: Tensor) -> Counter:
    """How many autograd nodes of each type the graph of ``output`` holds."""
    seen, stack, count = set(), [output.grad_fn], Counter()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        count[fn.name()] += 1
        stack.extend(f for f, _ in fn.next_functions)
    return count


IGNORED_NODES = ("ToCopyBackward0",)
"""Dtype conversions: a model that upcasts (``h.to(torch.float32)``) has them in one precision
and not in another (a float32 tensor converted to float32 records no node)."""


def graph_difference(types: Counter, reference: Counter) -> str:
    """``"+A x2, -B x1"``: node types this graph has more (+) or fewer (-) of than the reference,
    dtype conversions (:data:`IGNORED_NODES`) aside."""
    types = Counter({k: v for k, v in types.items() if k not in IGNORED_NODES})
    reference = Counter({k: v for k, v in reference.items() if k not in IGNORED_NODES})
    more, fewer = types - reference, reference - types
    return ", ".join(
        [f"+{k} x{v}" for k, v in sorted(more.items())]
        + [f"-{k} x{v}" for k, v in sorted(fewer.items())]
    )


def _first_words(err: BaseException, words: int = 24) -> str:
    text = " ".join(str(err).split())
    cut = " ".join(text.split(" ")[:words])
    return f"{type(err).__name__}: {cut}{' ...' if cut != text else ''}"


def _run_mode(
    name: str,
    mode: Mode,
    model64: torch.nn.Module,
    kwargs64: dict[str, Any],
    target: Tensor,
    rules: str,
    repeats: int,
) -> tuple[Result, Tensor | None, Tensor | None, Counter | None]:
    """Explain the entry in ``mode``: ``(result without metrics, relevance, explained logits,
    autograd node types)``; what the forward did not produce is ``None``."""
    res = Result(name, mode.name)
    model, kwargs = copy.deepcopy(model64), kwargs64
    if mode.rounded_to is not None:
        model = model.to(mode.rounded_to)
        kwargs = _cast_kwargs(kwargs, mode.rounded_to)
    model = model.to(mode.model_dtype)
    kwargs = _cast_kwargs(kwargs, mode.model_dtype)
    rows = torch.arange(len(target))
    try:
        out, x, rec = zoo.forward(name, dtype=mode.model_dtype, model=model, kwargs=kwargs)
    except Exception as err:
        res.error_kind, res.error = "torch (forward)", _first_words(err)
        res.traceback = traceback.format_exc()
        return res, None, None, None
    logits = out.detach()[rows, target]
    types = node_types(out)
    times = []
    rel = None
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            rel = dynamiclrp.explain(
                out, x, target=target, rules=rules, recording=rec, dtype=mode.relevance_dtype
            )
            times.append(time.perf_counter() - t0)
    except DynamicLRPError as err:
        res.error_kind, res.error = f"dynamiclrp: {type(err).__name__}", _first_words(err)
        res.traceback = traceback.format_exc()
        return res, None, logits, types
    except Exception as err:
        res.error, res.traceback = _first_words(err), traceback.format_exc()
        try:  # does torch's own backward run in this dtype?
            torch.autograd.grad(out[rows, target].sum(), x)
        except Exception as grad_err:
            res.error_kind = "torch (backward)"
            res.error += f" (gradient: {_first_words(grad_err, 8)})"
        else:
            res.error_kind = "dynamiclrp crash"
        return res, None, logits, types
    res.seconds = statistics.median(times)
    if rel.dtype != x.dtype:
        res.error_kind = "dynamiclrp: wrong dtype"
        res.error = f"relevance returned as {rel.dtype} for a {x.dtype} input"
    elif not torch.isfinite(rel).all():
        res.error_kind = "dynamiclrp: non-finite"
        res.error = "relevance returned with NaN/Inf and no NonFiniteRelevanceError"
    return res, rel, logits, types


def measure_entry(
    name: str,
    modes: tuple[Mode, ...] = MODES,
    *,
    rules: str = "dynamiclrp",
    batch: int = 1,
    repeats: int = 1,
) -> list[Result]:
    """Explain zoo entry ``name`` in every mode and compare each map with the float64 one.

    The first mode must be the float64 reference; a failing reference leaves every metric NaN.
    """
    if modes[0].model_dtype != torch.float64 or modes[0].relevance_dtype not in (
        None,
        torch.float64,
    ):
        raise ValueError(f"the first mode must be the float64 reference, not {modes[0]}")
    model64 = zoo.build(name, torch.float64)
    kwargs64 = _cast_kwargs(zoo.example(name, model64, batch=batch), torch.float64)
    with torch.no_grad():
        target = zoo.ZOO[name].select(model64(**kwargs64)).argmax(1)
    results, ref, ref_logits, ref_types = [], None, None, None
    for i, mode in enumerate(modes):
        res, rel, logits, types = _run_mode(name, mode, model64, kwargs64, target, rules, repeats)
        if i == 0:
            ref, ref_logits, ref_types = rel, logits, types
        if types is not None and ref_types is not None:
            res.graph_diff = graph_difference(types, ref_types)
        if ref_logits is not None and logits is not None:
            scale = ref_logits.abs().max()
            res.output_err = float((logits.double() - ref_logits).abs().max() / scale)
        if ref is not None and rel is not None and torch.isfinite(rel).all():
            res.cosine = cosine(rel, ref)
            res.rel_l2 = relative_l2(rel, ref)
            res.top10 = top_overlap(rel, ref)
        results.append(res)
    return results


# --- report --------------------------------------------------------------------------------------


def _f(v: float, fmt: str) -> str:
    return "" if math.isnan(v) else format(v, fmt)


def _cos(v: float) -> str:
    """Cosine with enough digits to tell 0.9999 from 1 (``1 - cos`` for values above 0.999)."""
    if math.isnan(v):
        return ""
    if v >= 1 - 1e-15:
        return "1"
    return f"1-{1 - v:.0e}" if 0.999 < v < 1 else f"{v:.4f}"


def summary_rows(results: list[Result], modes: tuple[Mode, ...]) -> list[str]:
    rows = [
        "| mode | ran | raised | cosine median | cosine worst | rel. L2 median | rel. L2 worst "
        "| top-10% median | top-10% worst | output err. median | time median (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in modes:
        rs = [r for r in results if r.mode == mode.name]
        ok = [r for r in rs if r.ok and not math.isnan(r.cosine)]
        if not ok:
            rows.append(f"| {mode.name} | 0 | {len(rs) - len(ok)} | | | | | | | | |")
            continue
        cos = [r.cosine for r in ok]
        l2 = [r.rel_l2 for r in ok]
        top = [r.top10 for r in ok if not math.isnan(r.top10)]
        oe = [r.output_err for r in ok]
        worst = min(ok, key=lambda r: r.cosine)
        worst_l2 = max(ok, key=lambda r: r.rel_l2)
        worst_top = min((r for r in ok if not math.isnan(r.top10)), key=lambda r: r.top10)
        rows.append(
            f"| {mode.name} | {len(ok)} | {sum(not r.ok for r in rs)} "
            f"| {_cos(statistics.median(cos))} | {_cos(worst.cosine)} ({worst.entry}) "
            f"| {statistics.median(l2):.1e} | {worst_l2.rel_l2:.1e} ({worst_l2.entry}) "
            f"| {statistics.median(top):.2f} | {worst_top.top10:.2f} ({worst_top.entry}) "
            f"| {statistics.median(oe):.1e} | {statistics.median(r.seconds for r in ok):.3f} |"
        )
    return rows


def accumulation_rows(results: list[Result], modes: tuple[Mode, ...]) -> list[str]:
    """What float32 accumulation changes, paired by entry: for each low-precision model dtype,
    the entries where both the plain mode and its ``+f32`` twin ran."""
    rows = [
        "| model dtype | entries (both ran) | rel. L2 median, plain | rel. L2 median, +f32 "
        "| +f32 closer / farther (rel. L2 ratio < 0.9 / > 1.1) | time +f32 / plain, median |",
        "|---|---|---|---|---|---|",
    ]
    by = {(r.entry, r.mode): r for r in results}
    for plain in modes:
        twin = next(
            (
                m
                for m in modes
                if m.model_dtype == plain.model_dtype
                and m.relevance_dtype == torch.float32
                and plain.relevance_dtype is None
                and m.rounded_to is None
                and plain.rounded_to is None
            ),
            None,
        )
        if twin is None:
            continue
        pairs = [
            (by[e, plain.name], by[e, twin.name])
            for e, m in by
            if m == plain.name and (e, twin.name) in by
        ]
        pairs = [(a, b) for a, b in pairs if a.ok and b.ok and a.rel_l2 > 0 and b.rel_l2 > 0]
        if not pairs:
            continue
        ratios = [b.rel_l2 / a.rel_l2 for a, b in pairs]
        rows.append(
            f"| {plain.name} | {len(pairs)} | {statistics.median(a.rel_l2 for a, _ in pairs):.1e} "
            f"| {statistics.median(b.rel_l2 for _, b in pairs):.1e} "
            f"| {sum(q < 0.9 for q in ratios)} / {sum(q > 1.1 for q in ratios)} "
            f"| {statistics.median(b.seconds / a.seconds for a, b in pairs):.2f} |"
        )
    return rows


def cosine_matrix(results: list[Result], modes: tuple[Mode, ...], entries: list[str]) -> list[str]:
    shown = modes[1:]
    rows = [
        "| entry | " + " | ".join(m.name for m in shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    by = {(r.entry, r.mode): r for r in results}
    for name in entries:
        cells = []
        for m in shown:
            r = by.get((name, m.name))
            if r is None:
                cells.append("")
            elif not r.ok:
                cells.append(f"raised ({r.error_kind})")
            else:
                cells.append(_cos(r.cosine) + (" (g)" if r.graph_diff else ""))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def detail_rows(results: list[Result]) -> list[str]:
    rows = [
        "| entry | mode | cosine | rel. L2 | top-10% | output err. | time (s) | raised "
        "| graph vs float64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        raised = f"{r.error_kind}: {r.error}".replace("|", "\\|") if r.error_kind else ""
        rows.append(
            f"| {r.entry} | {r.mode} | {_cos(r.cosine)} | {_f(r.rel_l2, '.1e')} "
            f"| {_f(r.top10, '.2f')} | {_f(r.output_err, '.1e')} | {_f(r.seconds, '.3f')} "
            f"| {raised} | {r.graph_diff} |"
        )
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    versions = [f"torch {torch.__version__}", f"dynamiclrp {dynamiclrp.__version__}"]
    for pkg in ("torchvision", "transformers"):
        try:
            versions.append(f"{pkg} {__import__(pkg).__version__}")
        except ImportError:
            versions.append(f"{pkg} not installed")
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), "
        f"Python {platform.python_version()}, " + ", ".join(versions)
    )


# --- main ----------------------------------------------------------------------------------------


def failure_rows(results: list[Result]) -> list[str]:
    """The explanations that raised, grouped by whose limit it is."""
    rows = ["| kind | entry | mode | error |", "|---|---|---|---|"]
    for r in sorted((r for r in results if not r.ok), key=lambda r: (r.error_kind, r.entry)):
        error = r.error.replace("|", "\\|")
        rows.append(f"| {r.error_kind} | {r.entry} | {r.mode} | {error} |")
    return rows


def run_preset(names: list[str], modes: tuple[Mode, ...], rules: str, args) -> list[Result]:
    """Every available entry of ``names`` in every mode, printed as it goes."""
    results: list[Result] = []
    for name in names:
        t0 = time.perf_counter()
        rs = measure_entry(name, modes, rules=rules, batch=args.batch, repeats=args.repeats)
        results += rs
        cells = [
            f"{r.mode}={'RAISED ' + r.error_kind if not r.ok else _cos(r.cosine)}" for r in rs[1:]
        ]
        print(
            f"[{rules}] {name:20s} {time.perf_counter() - t0:5.1f}s  " + "  ".join(cells),
            flush=True,
        )
        for r in rs:
            if r.error_kind:
                print(f"    {r.mode}: {r.error_kind}: {r.error}", flush=True)
                if r.error_kind == "dynamiclrp crash":
                    print(r.traceback, file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """Measure, print, and write the report; exit status 1 if an explanation crashed inside
    dynamiclrp (not for torch's limits or dynamiclrp's own errors)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the Markdown report here (default: print it)")
    parser.add_argument("--entries", help="comma-separated zoo entries (default: all)")
    parser.add_argument(
        "--rules",
        default="dynamiclrp,gamma",
        help="comma-separated presets; the first gets every table, the others a summary and the "
        "cosine table (default: dynamiclrp,gamma)",
    )
    parser.add_argument("--batch", type=int, default=1, help="rows per input (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed explanations per mode")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = MODES + DIAGNOSTIC_MODES
    presets = args.rules.split(",")
    names = args.entries.split(",") if args.entries else sorted(zoo.ZOO)
    unknown = [n for n in names if n not in zoo.ZOO]
    if unknown:
        parser.error(f"unknown zoo entries {unknown}; known: {', '.join(sorted(zoo.ZOO))}")
    print(machine(), flush=True)
    skipped = [n for n in names if not zoo.available(zoo.ZOO[n])]
    for n in skipped:
        print(f"note: {n} skipped, it needs {zoo.ZOO[n].requires}, not installed here")
    names = [n for n in names if zoo.available(zoo.ZOO[n])]
    start = time.perf_counter()
    by_preset = {rules: run_preset(names, modes, rules, args) for rules in presets}
    total = time.perf_counter() - start
    results = by_preset[presets[0]]
    failures = [r for r in results if not r.ok]
    command = "python benchmarks/precision.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"Generated by `{command.strip()}` in {total:.0f} s on: {machine()}. "
        f"Batch {args.batch}; times are medians of {args.repeats} explanations.",
        "",
        f"## Preset `{presets[0]}`: summary per mode",
        "",
        *summary_rows(results, modes),
        "",
        f"## Preset `{presets[0]}`: what float32 accumulation changes",
        "",
        *accumulation_rows(results, modes),
        "",
        f"## Preset `{presets[0]}`: cosine similarity to float64, per entry",
        "",
        "(g): the autograd graph differs from the float64 one (see the last column below).",
        "",
        *cosine_matrix(results, modes, names),
        "",
    ]
    for rules in presets[1:]:
        lines += [
            f"## Preset `{rules}`: summary per mode",
            "",
            *summary_rows(by_preset[rules], modes),
            "",
            f"## Preset `{rules}`: what float32 accumulation changes",
            "",
            *accumulation_rows(by_preset[rules], modes),
            "",
            f"## Preset `{rules}`: cosine similarity to float64, per entry",
            "",
            *cosine_matrix(by_preset[rules], modes, names),
            "",
        ]
    lines += [
        f"## Preset `{presets[0]}`: explanations that raised",
        "",
        f"{len(failures)} of {len(results)} explanations raised.",
        "",
        *(failure_rows(results) if failures else []),
        "",
        f"## Preset `{presets[0]}`: every measurement",
        "",
        *detail_rows(results),
        "",
    ]
    if skipped:
        missing = ", ".join(f"{n} ({zoo.ZOO[n].requires})" for n in skipped)
        lines += [f"Not measured here (package missing): {missing}.", ""]
    body = "\n".join(lines)
    if args.out:
        head = ""
        if os.path.exists(args.out):  # keep the hand-written header above the marker
            with open(args.out) as f:
                text = f.read()
            if MARKER in text:
                head = text.split(MARKER)[0]
        with open(args.out, "w") as f:
            f.write((head or "# Precision\n\n") + MARKER + "\n\n" + body)
        print(f"wrote {args.out}")
    else:
        print(body)
    crashed = any(r.error_kind == "dynamiclrp crash" for rs in by_preset.values() for r in rs)
    return 1 if crashed else 0


MARKER = "<!-- generated by benchmarks/precision.py below this line -->"

if __name__ == "__main__":
    sys.exit(main())
