"""Speed and peak memory of dynamiclrp against a plain gradient, on CPU or CUDA.

For each model and input, in one process, with interleaved repetitions (medians reported):

* ``fwd``     the forward pass alone (autograd recording on, as an explanation needs it);
* ``grad``    forward + ``torch.autograd.grad`` of the target logit w.r.t. the input (the floor);
* ``first``   ``dynamiclrp.LRP(rules, cache_size=0).explain`` (no cached plan), forward excluded;
* ``cached``  ``LRP.explain`` with a warm plan cache, forward excluded;
* ``zennit``  (CNNs, when ``zennit`` is importable) forward + Zennit's ``EpsilonPlus`` attribution
  (the composite registered once on a copy of the model, ResNet canonizer for ResNets);
* ``lxt``     (transformers, with ``--lxt-python``) LxT 2.1's AttnLRP, forward + backward, in a
  separate process of that Python (``lxt_speed_worker.py``);

and the peak memory each adds on top of the model and input (forward included): on CUDA
``max_memory_allocated`` in this process, on the CPU the resident set size of a fresh
subprocess per row (``benchmarks/_measure.py``).  Ratios use ``fg = T_grad``:
``first/fg``, ``cached/fg``, ``(fwd+first)/fg``, ``(fwd+cached)/fg``, ``zennit/fg``, and the
peak-memory ratios ``M_method / M_grad``.

``--overhead`` instead times a long chain of tiny ops (add / mul / relu on a ``(1, 4)`` tensor)
and reports the time per graph node of the first and the cached pass at each chain length.

Run from the repository root (see ``benchmarks/README.md``)::

    PYTHONPATH=src python benchmarks/speed.py --quick --threads 1
    PYTHONPATH=src python benchmarks/speed.py --device cuda --dtype float32,bfloat16 \\
        --out docs/performance.md --json speed.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import cpu_model, peak_memory, timed  # noqa: E402

import dynamiclrp  # noqa: E402

VISION = ("vgg16", "resnet50", "vit_b_16")
TEXT = ("bert", "llama150m", "llama1b")
MODELS = VISION + TEXT
CNNS = ("vgg16", "resnet50")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WARMUP = 2
METHODS = ("fwd", "grad", "first", "cached", "zennit")
MiB = 2**20


# --- models ------------------------------------------------------------------------------------


@dataclass
class Case:
    """One benchmarked model and input: ``forward()`` returns 2-D ``(batch, classes)`` logits."""

    name: str
    model: torch.nn.Module
    x: torch.Tensor  # the explained input (a leaf requiring grad)
    call: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    desc: str
    targets: list[int] = field(default_factory=list)
    record: bool = False  # the explained forward runs under dynamiclrp.record(model)

    def forward(self) -> torch.Tensor:
        return self.call(self.model, self.x)


def _tiny_vgg() -> torch.nn.Module:
    """A VGG of 4 conv layers (2 blocks) and VGG's 3-layer classifier, for ``--quick``."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(32, 10),
    )


def build_vision(name: str, quick: bool) -> tuple[torch.nn.Module, int]:
    """A torchvision model (random weights) and its input size; ``quick``: a tiny one."""
    import torchvision

    tvm = torchvision.models
    if name == "vgg16":
        return (_tiny_vgg(), 32) if quick else (tvm.vgg16(weights=None), 224)
    if name == "resnet50":
        if quick:
            block = tvm.resnet.Bottleneck
            return tvm.ResNet(block, [1, 1, 1, 1], num_classes=10, width_per_group=16), 32
        return tvm.resnet50(weights=None), 224
    if name == "vit_b_16":
        if quick:
            kw = dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32)
            model, size = tvm.VisionTransformer(mlp_dim=64, num_classes=10, **kw), 32
        else:
            model, size = tvm.vit_b_16(weights=None), 224
        # torchvision zero-initialises the head: give it weights so the relevance is not zero
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        return model, size
    raise ValueError(f"build_vision: unknown vision model {name!r} (choose from {VISION})")


TEXT_CONFIGS = {
    "bert": dict(),  # BertConfig defaults: BERT-base (hidden 768, 12 layers, 12 heads)
    "llama150m": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        intermediate_size=2048,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "llama1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
}
QUICK_TEXT_CONFIGS = {
    "bert": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=256,
    ),
    "llama150m": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        vocab_size=256,
    ),
    "llama1b": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=256,
    ),
}


def _bert_logits(model, x):
    return model(inputs_embeds=x).logits  # [CLS] classifier logits (batch, 2)


def _llama_logits(model, x):
    return model(inputs_embeds=x, logits_to_keep=1).logits[:, -1]  # next-token logits


def build_case(
    name: str, batch: int, seq: int, dtype: torch.dtype, device: str, quick: bool
) -> Case:
    """Model (random weights, eval mode, seed 0) and input on ``device`` in ``dtype``."""
    torch.manual_seed(0)
    with torch.device(device):
        if name in VISION:
            model, size = build_vision(name, quick)
            model = model.to(device=device, dtype=dtype).eval()
            x = torch.randn(batch, 3, size, size, dtype=dtype)
            case = Case(name, model, x, lambda m, t: m(t), f"{batch}x3x{size}x{size}")
        elif name in TEXT:
            import transformers

            cfg_kw = (QUICK_TEXT_CONFIGS if quick else TEXT_CONFIGS)[name]
            if name == "bert":
                cfg = transformers.BertConfig(attn_implementation="sdpa", **cfg_kw)
                model = transformers.BertForSequenceClassification(cfg)
                call = _bert_logits
            else:
                cfg = transformers.LlamaConfig(attn_implementation="sdpa", **cfg_kw)
                model = transformers.LlamaForCausalLM(cfg)
                call = _llama_logits
            model = model.to(device=device, dtype=dtype).eval()
            ids = torch.randint(3, cfg.vocab_size, (batch, seq))
            with torch.no_grad():
                x = model.get_input_embeddings()(ids)
            case = Case(name, model, x, call, f"{batch}x{seq} tokens (inputs_embeds)")
        else:
            raise ValueError(f"build_case: unknown model {name!r} (choose from {MODELS})")
    case.x = case.x.detach().requires_grad_(True)
    with torch.no_grad():
        case.targets = case.forward().float().argmax(1).tolist()
    return case


def needs_record(case: Case, rules) -> bool:
    """Whether this model's explanation needs the forward pass under ``dynamiclrp.record``.

    Tries one explanation without a recording; a :class:`dynamiclrp.ValueRecoveryError` (a
    constant autograd did not keep) means yes, and the row says so.
    """
    try:
        dynamiclrp.LRP(rules, cache_size=0).explain(case.forward(), case.x, target=case.targets)
    except dynamiclrp.ValueRecoveryError as err:
        print(f"  {case.name}: needs dynamiclrp.record() ({str(err)[:120]}...)", flush=True)
        return True
    return False


# --- the measured calls ------------------------------------------------------------------------


class Methods:
    """The measured calls of one case; :meth:`run` includes the forward pass of each method."""

    def __init__(self, case: Case, rules, device: str, zennit: bool):
        self.case, self.rules, self.device = case, rules, device
        self.cached = dynamiclrp.LRP(rules)
        self.index = torch.tensor(case.targets, device=case.x.device).unsqueeze(1)
        self.zmodel = self._zennit_model() if zennit else None

    def _zennit_model(self):
        from zennit.composites import EpsilonPlus

        canonizers = []
        if self.case.name == "resnet50":
            from zennit.torchvision import ResNetCanonizer

            canonizers = [ResNetCanonizer()]
        zmodel = copy.deepcopy(self.case.model)
        self.composite = EpsilonPlus(canonizers=canonizers)
        self.composite.register(zmodel)
        return zmodel

    def close(self) -> None:
        if self.zmodel is not None:
            self.composite.remove()

    def forward_for_explain(self):
        """The explained forward: ``(output, recording or None)``."""
        if not self.case.record:
            return self.case.forward(), None
        with dynamiclrp.record(self.case.model) as rec:
            out = self.case.forward()
        return out, rec

    def grad(self) -> torch.Tensor:
        out = self.case.forward()
        (g,) = torch.autograd.grad(out.gather(1, self.index).sum(), self.case.x)
        return g

    def explain(self, out, rec, lrp) -> torch.Tensor:
        return lrp.explain(out, self.case.x, target=self.case.targets, recording=rec)

    def fresh(self):
        return dynamiclrp.LRP(self.rules, cache_size=0)

    def zennit(self) -> torch.Tensor:
        out = self.case.call(self.zmodel, self.case.x)
        seed = torch.zeros_like(out).scatter_(1, self.index, out.detach().gather(1, self.index))
        (g,) = torch.autograd.grad(out, self.case.x, seed)
        return g

    def run(self, method: str):
        """``method`` with its forward pass, for the memory measurement."""
        if method == "fwd":
            return self.case.forward()
        if method == "grad":
            return self.grad()
        if method == "zennit":
            return self.zennit()
        out, rec = self.forward_for_explain()
        lrp = self.fresh() if method == "first" else self.cached
        return self.explain(out, rec, lrp)


def time_case(m: Methods, repeats: int) -> tuple[dict, dict]:
    """Median seconds per method over ``repeats`` interleaved repetitions, and sanity checks."""
    dev = m.device
    samples: dict[str, list[float]] = {k: [] for k in ("fwd", "grad", "first", "cached")}
    if m.case.record:
        samples["fwd_rec"] = []
    if m.zmodel is not None:
        samples["zennit"] = []
    checks: dict = {"cache_misses": 0}
    for rep in range(WARMUP + repeats):
        keep = rep >= WARMUP
        t = {}
        out, t["fwd"] = timed(m.case.forward, dev)
        del out
        g, t["grad"] = timed(m.grad, dev)
        del g
        (out, rec), t_rec = timed(m.forward_for_explain, dev)
        if m.case.record:
            t["fwd_rec"] = t_rec
        rel_first, t["first"] = timed(lambda o=out, r=rec: m.explain(o, r, m.fresh()), dev)
        if rep == 0:
            logit = out.detach().gather(1, m.index)[:, 0].float()
            checks["logit"] = logit.tolist()
            checks["sum_rel_first"] = rel_first.detach().float().flatten(1).sum(1).tolist()
        del out, rec
        out, rec = m.forward_for_explain()
        rel, t["cached"] = timed(lambda o=out, r=rec: m.explain(o, r, m.cached), dev)
        if keep and not m.cached.last_plan_cached:
            checks["cache_misses"] += 1
        if rep == WARMUP + repeats - 1:
            checks["finite"] = bool(torch.isfinite(rel).all())
            diff = (rel.float() - rel_first.float()).abs().max()
            checks["cached_vs_first_maxdiff"] = float(diff / rel_first.float().abs().max())
        del out, rec, rel, rel_first
        if m.zmodel is not None:
            g, t["zennit"] = timed(m.zennit, dev)
            del g
        if keep:
            for k, v in t.items():
                samples[k].append(v)
    med = {k: statistics.median(v) for k, v in samples.items()}
    spread = {k: [min(v), max(v)] for k, v in samples.items()}
    return {"median": med, "min_max": spread}, checks


def memory_case(m: Methods, methods: list[str]) -> dict[str, int]:
    """Peak bytes each method adds (CUDA, in this process)."""
    peaks = {}
    for method in methods:
        result, peaks[method] = peak_memory(lambda: m.run(method), m.device)  # noqa: B023
        del result
    return peaks


def memory_subprocess(args, name, batch, seq, dtype_name, methods) -> dict[str, int]:
    """Peak RSS each method adds, measured in a fresh Python process for this row (CPU)."""
    spec = dict(
        name=name,
        batch=batch,
        seq=seq,
        dtype=dtype_name,
        quick=args.quick,
        rules=args.rules,
        methods=methods,
    )
    env = dict(os.environ)
    # every block of 64 KiB or more gets its own mapping, returned to the system when freed, so
    # the resident set follows the live tensors (malloc keeps no freed memory after the warm-up)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["MALLOC_TRIM_THRESHOLD_"] = "0"
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(spec)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK_BYTES ")]
    if proc.returncode != 0 or len(lines) != len(methods):
        raise RuntimeError(
            f"memory subprocess for {name} failed (exit {proc.returncode}, {len(lines)} of "
            f"{len(methods)} measurements):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return {ln.split()[1]: int(ln.split()[2]) for ln in lines}


def lxt_subprocess(args, name: str, batch: int, seq: int, dtype_name: str) -> dict:
    """LxT's AttnLRP timed by ``lxt_speed_worker.py`` under ``--lxt-python``."""
    spec = dict(
        kind="bert" if name == "bert" else "llama",
        config=(QUICK_TEXT_CONFIGS if args.quick else TEXT_CONFIGS)[name],
        batch=batch,
        seq=seq,
        dtype=dtype_name,
        device=args.device,
        repeats=args.repeats,
        threads=args.threads,
    )
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lxt_speed_worker.py")
    env = dict(os.environ)  # freed memory goes back to the system, as in memory_subprocess:
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # else the worker's RSS hardly moves after warm-up
    env["MALLOC_TRIM_THRESHOLD_"] = "0"  # and its peaks read as ~0 (ratios of 100x and more)
    proc = subprocess.run(
        [args.lxt_python, worker, json.dumps(spec)], capture_output=True, text=True, env=env
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LXT_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"LxT worker for {name} failed (exit {proc.returncode}) with {args.lxt_python}:\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return json.loads(lines[-1].split(" ", 1)[1])


def memory_child(spec_json: str) -> int:
    """Entry of the CPU memory subprocess: build, warm up every method, measure each once.

    The warm-up (one run of each method) starts autograd's threads, fills the plan cache and lets
    the allocator settle; it also sets the ``ru_maxrss`` high-water mark, so the peaks below come
    mostly from the RSS sampling thread of :func:`_measure.peak_memory`.
    """
    spec = json.loads(spec_json)
    case = build_case(
        spec["name"], spec["batch"], spec["seq"], DTYPES[spec["dtype"]], "cpu", spec["quick"]
    )
    case.record = needs_record(case, spec["rules"])
    m = Methods(case, spec["rules"], "cpu", zennit="zennit" in spec["methods"])
    try:
        for method in spec["methods"]:
            result = m.run(method)
            del result
        for method in spec["methods"]:
            result, peak = peak_memory(lambda: m.run(method), "cpu")  # noqa: B023
            del result
            print(f"PEAK_BYTES {method} {peak}", flush=True)
    finally:
        m.close()
    return 0


# --- machine, table, files ---------------------------------------------------------------------


def machine(device: str) -> str:
    desc = f"CPU {cpu_model()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        desc = (
            f"GPU {p.name} ({p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}, float32 matmul precision "
            f"{torch.get_float32_matmul_precision()!r}, cuDNN TF32 "
            f"{torch.backends.cudnn.allow_tf32}); {desc}"
        )
    return desc


def versions() -> str:
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for dist in ("torchvision", "transformers", "zennit"):
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(parts + [f"dynamiclrp {dynamiclrp.__version__}"])


COLUMNS = (
    ("model", "model"),
    ("input", "input"),
    ("dtype", "dtype"),
    ("device", "device"),
    ("fwd ms", "fwd"),
    ("fwd+grad ms", "grad"),
    ("first ms", "first"),
    ("cached ms", "cached"),
    ("first/fg", "r_first"),
    ("cached/fg", "r_cached"),
    ("(fwd+first)/fg", "r_fwd_first"),
    ("(fwd+cached)/fg", "r_fwd_cached"),
    ("grad peak MiB", "m_grad"),
    ("first mem/grad", "mr_first"),
    ("cached mem/grad", "mr_cached"),
    ("Zennit ms", "zennit"),
    ("Zennit/fg", "r_zennit"),
    ("Zennit mem/grad", "mr_zennit"),
    ("LxT ms", "lxt"),
    ("LxT/fg", "r_lxt"),
    ("LxT mem/grad", "mr_lxt"),
)


def derived(row: dict) -> dict:
    """Table cells of one result row (strings)."""
    if row["status"] != "ok":
        cells = {k: "" for _, k in COLUMNS}
        cells.update({k: str(row[k]) for k in ("model", "input", "dtype", "device")})
        cells["fwd"] = "FAILED"
        return cells
    t = {k: v * 1e3 for k, v in row["ms_median"].items()}
    mem = row.get("peak_bytes") or {}
    fg = t["grad"]
    fx = t.get("fwd_rec", t["fwd"])  # the forward an explanation needs
    cells = {k: str(row[k]) for k in ("model", "input", "dtype", "device")}
    if row.get("record"):
        cells["input"] += " (record)"
    for k in ("fwd", "grad", "first", "cached", "zennit"):
        cells[k] = f"{t[k]:.2f}" if k in t else "-"
    cells["r_first"] = f"{t['first'] / fg:.2f}x"
    cells["r_cached"] = f"{t['cached'] / fg:.2f}x"
    cells["r_fwd_first"] = f"{(fx + t['first']) / fg:.2f}x"
    cells["r_fwd_cached"] = f"{(fx + t['cached']) / fg:.2f}x"
    cells["r_zennit"] = f"{t['zennit'] / fg:.2f}x" if "zennit" in t else "-"
    g = mem.get("grad")
    cells["m_grad"] = f"{g / MiB:.1f}" if g is not None else "-"
    for k in ("first", "cached", "zennit"):
        ok = g and k in mem
        cells["mr_" + k] = f"{mem[k] / g:.2f}x" if ok else "-"
    lxt = row.get("lxt")
    cells["lxt"] = "FAILED" if row.get("lxt_error") else (f"{lxt['lxt'] * 1e3:.2f}" if lxt else "-")
    cells["r_lxt"] = f"{lxt['lxt'] / lxt['fg']:.2f}x" if lxt else "-"
    ok = lxt and lxt["peak_fg"]
    cells["mr_lxt"] = f"{lxt['peak_lxt'] / lxt['peak_fg']:.2f}x" if ok else "-"
    return cells


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |"]
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for row in rows:
        c = derived(row)
        lines.append("| " + " | ".join(c[k] for _, k in COLUMNS) + " |")
    return "\n".join(lines)


def print_row(row: dict, header: bool) -> None:
    widths = [max(len(h), 9) for h, _ in COLUMNS]
    widths[0], widths[1] = 10, 28
    if header:
        print("  ".join(h.rjust(w) for (h, _), w in zip(COLUMNS, widths, strict=True)))
    c = derived(row)
    print("  ".join(c[k].rjust(w) for (_, k), w in zip(COLUMNS, widths, strict=True)), flush=True)


MD_NOTES = """\
Times are medians over the repetitions (after warm-up), in milliseconds. `fwd` is the forward
pass with autograd recording; `fwd+grad` (fg) the forward plus `torch.autograd.grad` of the
target logit w.r.t. the input; `first` a `dynamiclrp.LRP(cache_size=0).explain` (no cached plan)
and `cached` an explanation with a warm plan cache, both without their forward pass; `Zennit` is
the forward plus Zennit's `EpsilonPlus` attribution (CNNs only); `LxT` (transformers, with
`--lxt-python`) the forward, backward and `inputs_embeds * grad` of LxT 2.1's AttnLRP, measured
in its own process and environment (transformers 4.52, eager attention), and `LxT/fg`, `LxT
mem/grad` are ratios to the forward+gradient measured in that same process before LxT patches
the model. `(record)` after the input
means the explained forward ran under `dynamiclrp.record(model)`; that forward's time is then
used in the `(fwd+...)/fg` ratios. Memory columns: the peak memory a method adds on top of the
model and input, forward included, as a ratio to that of forward+gradient (`grad peak MiB`):
CUDA `max_memory_allocated` in the benchmark process, CPU resident memory in a fresh process per
row (see `benchmarks/README.md`). Vision models explain the argmax logit of each row; BERT (sequence classification,
2 labels) the argmax [CLS] classifier logit; Llama the argmax next-token logit at the last
position; transformers are explained w.r.t. `inputs_embeds` (SDPA attention). Random weights.
"""


def write_markdown(path: str, runs: list[dict]) -> None:
    parts = ["# Performance: dynamiclrp against a gradient\n", MD_NOTES]
    for run in runs:
        meta = run["meta"]
        parts.append(f"\n## {meta['device']}: {meta.get('title', '')} ({meta['date']})\n")
        parts.append(f"- machine: {meta['machine']}")
        parts.append(f"- versions: {meta['versions']}")
        parts.append(
            f"- repetitions: {meta['repeats']} (+{WARMUP} warm-up), rules: {meta['rules']}"
        )
        parts.append(f"- command: `{meta['command']}`")
        if not meta.get("complete"):
            parts.append(
                "- **incomplete**: the run stopped before its last row (killed or timed out)"
            )
        parts.append("")
        if run.get("rows"):
            parts.append(markdown_table(run["rows"]))
            for row in run["rows"]:
                for key in ("error", "lxt_error"):
                    if row.get(key):
                        what = "LxT" if key == "lxt_error" else "row"
                        msg = row[key].splitlines()[0][:300]
                        parts.append(
                            f"\n{what} FAILED: {row['model']} {row['input']} {row['dtype']}: {msg}"
                        )
        if run.get("overhead"):
            parts.append(overhead_markdown(run["overhead"]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


def write_outputs(
    args, meta: dict, rows: list[dict], overhead: list[dict] | None = None, complete=False
) -> None:
    run = {"meta": dict(meta, complete=complete), "rows": rows}
    if overhead is not None:
        run["overhead"] = overhead
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(run, f, indent=1)
    if args.out:
        write_markdown(args.out, [run])


def plot(path: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        raise RuntimeError(f"--plot {path}: no successful row to plot")
    keys = [("first", "first/fg"), ("cached", "cached/fg"), ("fwd_cached", "(fwd+cached)/fg")]
    short = {"float32": "fp32", "bfloat16": "bf16"}
    labels = [f"{r['model']}\n{r['input'].split(' ')[0]} {short[r['dtype']]}" for r in ok]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(ok) + 2), 4))
    width = 0.8 / len(keys)
    for i, (k, label) in enumerate(keys):
        vals = []
        for r in ok:
            t = r["ms_median"]
            fx = t.get("fwd_rec", t["fwd"])
            num = fx + t["cached"] if k == "fwd_cached" else t[k]
            vals.append(num / t["grad"])
        ax.bar([j + i * width for j in range(len(ok))], vals, width, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + width for j in range(len(ok))], labels, fontsize=7)
    ax.set_ylabel("time / (forward + gradient)")
    ax.set_title(f"dynamiclrp vs gradient ({ok[0]['device']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main benchmark ----------------------------------------------------------------------------


def bench_row(args, name: str, batch: int, seq: int, dtype_name: str) -> dict:
    device = args.device
    case = build_case(name, batch, seq, DTYPES[dtype_name], device, args.quick)
    case.record = needs_record(case, args.rules)
    zennit = name in CNNS and args.zennit
    m = Methods(case, args.rules, device, zennit)
    try:
        timing, checks = time_case(m, args.repeats)
        methods = ["fwd", "grad", "first", "cached"] + (["zennit"] if zennit else [])
        if args.no_memory:
            peaks = None
        elif device == "cuda":
            peaks = memory_case(m, methods)
        else:
            peaks = memory_subprocess(args, name, batch, seq, dtype_name, methods)
    finally:
        m.close()
    lxt, lxt_error = None, None
    if args.lxt_python and name in TEXT:
        try:
            lxt = lxt_subprocess(args, name, batch, seq, dtype_name)
        except Exception as err:
            traceback.print_exc()
            lxt_error = f"{type(err).__name__}: {err}"[:2000]
    return dict(
        lxt=lxt,
        lxt_error=lxt_error,
        model=name,
        input=case.desc,
        dtype=dtype_name,
        device=device,
        params=sum(p.numel() for p in case.model.parameters()),
        record=case.record,
        status="ok",
        ms_median=timing["median"],
        ms_min_max=timing["min_max"],
        peak_bytes=peaks,
        checks=checks,
    )


def row_plan(args) -> list[tuple[str, int, int, str]]:
    """``(model, batch, seq, dtype)`` of every row, in order."""
    plan = []
    for dtype_name in args.dtypes:
        for name in args.models:
            if name in VISION:
                plan += [(name, b, 0, dtype_name) for b in args.batches]
            elif name != "llama1b" or not args.llama1b:
                plan += [(name, args.text_batch, s, dtype_name) for s in args.seqs]
    if args.llama1b:
        plan.append(("llama1b", args.text_batch, 32 if args.quick else 512, "bfloat16"))
    return plan


def run_benchmark(args, meta: dict) -> int:
    rows: list[dict] = []
    for i, (name, batch, seq, dtype_name) in enumerate(row_plan(args)):
        print(f"running {name} batch {batch} seq {seq} {dtype_name} ...", flush=True)
        try:
            row = bench_row(args, name, batch, seq, dtype_name)
        except Exception as err:
            traceback.print_exc()
            sys.stderr.flush()
            inp = f"{batch}x{seq} tokens" if name in TEXT else f"batch {batch}"
            row = dict(
                model=name,
                input=inp,
                dtype=dtype_name,
                device=args.device,
                status="FAILED",
                error=f"{type(err).__name__}: {err}"[:2000],
            )
        rows.append(row)
        print_row(row, header=i == 0)
        if row.get("lxt"):
            lx = row["lxt"]
            print(
                f"    LxT ({lx['versions']}): sum R {lx['sum_rel'][0]:+.4g}  finite {lx['finite']}"
                f"  its own fwd+grad {lx['fg'] * 1e3:.2f} ms",
                flush=True,
            )
        if row["status"] == "ok":
            c = row["checks"]
            print(
                f"    checks: logit {c['logit'][0]:+.4g}  sum R (first) {c['sum_rel_first'][0]:+.4g}"
                f"  finite {c['finite']}  cached-vs-first rel. diff {c['cached_vs_first_maxdiff']:.1e}"
                f"  cache misses {c['cache_misses']}",
                flush=True,
            )
        write_outputs(args, meta, rows)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    write_outputs(args, meta, rows, complete=True)
    print()
    print(markdown_table(rows))
    if args.plot:
        plot(args.plot, rows)
    failed = [f"{r['model']} {r['input']} {r['dtype']}" for r in rows if r["status"] != "ok"]
    failed += [f"LxT {r['model']} {r['input']} {r['dtype']}" for r in rows if r.get("lxt_error")]
    if failed:
        print(f"\nFAILED rows ({len(failed)}): " + "; ".join(failed) + " (tracebacks above)")
        return 1
    return 0


# --- Python overhead per graph node ------------------------------------------------------------


def chain(x: torch.Tensor, b: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` alternating ops ``y + b``, ``y * w``, ``relu(y)`` (b, w parameters of shape (4,))."""
    y = x
    for i in range(n):
        k = i % 3
        y = y + b if k == 0 else (y * w if k == 1 else torch.relu(y))
    return y


def run_overhead(args, meta: dict) -> int:
    dev = args.device
    dtype = DTYPES[args.dtypes[0]]
    sizes = args.nodes
    torch.manual_seed(0)
    b = torch.nn.Parameter(torch.rand(4, dtype=dtype, device=dev) * 0.1)
    w = torch.nn.Parameter(torch.rand(4, dtype=dtype, device=dev) * 0.1 + 0.95)
    x = (torch.rand(1, 4, dtype=dtype, device=dev) + 0.5).requires_grad_(True)
    results = []
    print(
        f"{'ops':>7} {'nodes':>7} {'fwd us/node':>12} {'grad us/node':>13} "
        f"{'first us/node':>14} {'cached us/node':>15} {'first/fg':>9} {'cached/fg':>10}"
    )
    for n in sizes:
        lrp = dynamiclrp.LRP("dynamiclrp")
        nodes = dynamiclrp.coverage(chain(x, b, w, n)).total_nodes
        s = {k: [] for k in ("fwd", "grad", "first", "cached")}

        def grad(n=n):
            (g,) = torch.autograd.grad(chain(x, b, w, n).sum(), x)
            return g

        for rep in range(WARMUP + args.repeats):
            t = {}
            out, t["fwd"] = timed(lambda n=n: chain(x, b, w, n), dev)
            del out
            g, t["grad"] = timed(grad, dev)
            del g
            out = chain(x, b, w, n)
            rel, t["first"] = timed(
                lambda o=out: dynamiclrp.LRP("dynamiclrp", cache_size=0).explain(
                    o, x, relevance=torch.ones_like(o)
                ),
                dev,
            )
            del out, rel
            out = chain(x, b, w, n)
            rel, t["cached"] = timed(
                lambda o=out, lrp=lrp: lrp.explain(o, x, relevance=torch.ones_like(o)), dev
            )
            del out, rel
            if rep >= WARMUP:
                for k, v in t.items():
                    s[k].append(v)
        med = {k: statistics.median(v) for k, v in s.items()}
        per = {k: v / nodes * 1e6 for k, v in med.items()}
        results.append(dict(ops=n, nodes=nodes, seconds_median=med, us_per_node=per))
        print(
            f"{n:>7} {nodes:>7} {per['fwd']:>12.2f} {per['grad']:>13.2f} {per['first']:>14.2f}"
            f" {per['cached']:>15.2f} {med['first'] / med['grad']:>8.2f}x"
            f" {med['cached'] / med['grad']:>9.2f}x",
            flush=True,
        )
        write_outputs(args, meta, [], results)
    base = results[0]["us_per_node"]
    print("\nlinearity: time per node relative to the smallest chain (1.00 = linear):")
    for r in results:
        rel = {k: r["us_per_node"][k] / base[k] for k in ("first", "cached", "grad")}
        r["per_node_vs_smallest"] = rel
        print(
            f"  {r['ops']:>7} ops: first {rel['first']:.2f}  cached {rel['cached']:.2f}"
            f"  grad {rel['grad']:.2f}"
        )
    write_outputs(args, meta, [], results, complete=True)
    return 0


def overhead_markdown(results: list[dict]) -> str:
    lines = [
        "Python overhead per autograd node: a chain of alternating `y + b`, `y * w`, `relu(y)` "
        "on a (1, 4) tensor; microseconds per node (medians), and the per-node time relative to "
        "the shortest chain (1.00 = linear in the number of nodes).\n",
        "| ops | nodes | fwd us/node | fwd+grad us/node | first us/node | cached us/node "
        "| first per node vs shortest | cached per node vs shortest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = results[0]["us_per_node"]
    for r in results:
        p = r["us_per_node"]
        lines.append(
            f"| {r['ops']} | {r['nodes']} | {p['fwd']:.2f} | {p['grad']:.2f} | {p['first']:.2f} "
            f"| {p['cached']:.2f} | {p['first'] / base['first']:.2f} "
            f"| {p['cached'] / base['cached']:.2f} |"
        )
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        msg = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from err
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", help="comma list of float32, bfloat16")
    ap.add_argument(
        "--models",
        default="vgg16,resnet50,vit_b_16,bert,llama150m",
        help=f"comma list of {', '.join(MODELS)} (default: all but llama1b)",
    )
    ap.add_argument("--batch", type=_ints, default=None, help="vision batch sizes (default 1,8)")
    ap.add_argument("--seq", type=_ints, default=None, help="token counts (default 128,512)")
    ap.add_argument("--text-batch", type=int, default=1, help="transformer batch size (1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 5)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--rules", default="dynamiclrp", help="dynamiclrp preset (default dynamiclrp)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny configs of the same architectures (32x32 images, 16/32 tokens), 2 repeats",
    )
    ap.add_argument(
        "--llama1b", action="store_true", help="add the ~1B Llama in bfloat16 at 512 tokens"
    )
    ap.add_argument(
        "--lxt-python",
        help="a Python with lxt 2.1 and transformers 4.52: time LxT's AttnLRP on the "
        "transformers, in its own process (benchmarks/lxt_speed_worker.py)",
    )
    ap.add_argument("--no-zennit", dest="zennit", action="store_false", help="skip Zennit")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--out", help="write a Markdown report here (e.g. docs/performance.md)")
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--plot", help="bar chart of the time ratios (PNG, needs matplotlib)")
    ap.add_argument("--overhead", action="store_true", help="Python overhead per graph node")
    ap.add_argument(
        "--nodes", type=_ints, default=None, help="--overhead chain lengths (1000,...,32000)"
    )
    ap.add_argument(
        "--render",
        nargs="+",
        metavar="JSON",
        help="only merge these --json files into one --out Markdown report",
    )
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)} (choose from {', '.join(MODELS)})")
    args.dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = sorted(set(args.dtypes) - set(DTYPES))
    if bad or not args.dtypes:
        ap.error(f"unknown dtype(s) {bad or args.dtype!r} (choose from {', '.join(DTYPES)})")
    args.batches = args.batch or ([1, 2] if args.quick else [1, 8])
    args.seqs = args.seq or ([16, 32] if args.quick else [128, 512])
    args.nodes = args.nodes or (
        [250, 500, 1000] if args.quick else [1000, 2000, 4000, 8000, 16000, 32000]
    )
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.render and not args.out:
        ap.error("--render needs --out (the Markdown file to write)")
    if args.zennit and args.device is not None and not args.render:
        try:
            import zennit  # noqa: F401
        except ImportError:
            print("zennit is not importable: the Zennit columns stay empty (--no-zennit to hide)")
            args.zennit = False
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args.memory_child)
    if args.render:
        runs = []
        for path in args.render:
            with open(path) as f:
                runs.append(json.load(f))
        write_markdown(args.out, runs)
        print(f"wrote {args.out} from {len(runs)} run(s)")
        if args.plot:
            plot(args.plot, [row for run in runs for row in run.get("rows", [])])
            print(f"wrote {args.plot}")
        return 0
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = False
    meta = dict(
        device=args.device,
        machine=machine(args.device),
        versions=versions(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command="python " + " ".join(shlex.quote(a) for a in sys.argv),
        repeats=args.repeats,
        rules=args.rules,
        quick=args.quick,
        title="Python overhead per graph node"
        if args.overhead
        else f"{', '.join(args.dtypes)}; {', '.join(args.models)}"
        + ("; llama1b (bfloat16)" if args.llama1b else "")
        + (" (--quick: tiny models)" if args.quick else ""),
    )
    for k in ("machine", "versions", "command"):
        print(f"{k}: {meta[k]}")
    print(
        f"repeats: {args.repeats} (+{WARMUP} warm-up), medians; rules: {args.rules}\n", flush=True
    )
    if args.overhead:
        return run_overhead(args, meta)
    return run_benchmark(args, meta)


if __name__ == "__main__":
    sys.exit(main())
