"""Overhead of a dynamiclrp explanation against a plain gradient, on torchvision models.

Measures, in one run, on the same model and input:

* ``T_fwd``    forward pass alone;
* ``T_grad``   forward + ``torch.autograd.grad`` of the target logit w.r.t. the input;
* ``T_first``  ``dynamiclrp.explain`` (a fresh explainer, no cached plan), forward excluded;
* ``T_cached`` ``LRP().explain`` with a warm plan cache, forward excluded;

each the median over ``--repeats`` repetitions after warm-up runs, and prints the ratios
``explain / (fwd+grad)`` (first and cached) and ``(fwd+explain) / (fwd+grad)``.

Run from the repository root::

    python benchmarks/overhead.py --models vgg16,vit_b_16 --repeats 5

Targets: first pass <= 3x and cached <= 2x of forward+gradient.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
import traceback

import torch

import dynamiclrp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import cpu_model  # noqa: E402

TARGET_FIRST = 3.0
TARGET_CACHED = 2.0
WARMUP = 2
MODELS = ("vgg16", "vit_b_16", "resnet50")


def build_model(name: str) -> torch.nn.Module:
    import torchvision

    if name == "vgg16":
        model = torchvision.models.vgg16(weights=None)
    elif name == "vit_b_16":
        model = torchvision.models.vit_b_16(weights=None)
        # torchvision zero-initialises the classifier head; give it weights so the logits
        # (and hence the relevance) are not all zero.
        with torch.no_grad():
            torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    elif name == "resnet50":
        model = torchvision.models.resnet50(weights=None)
    else:
        raise SystemExit(f"unknown model {name!r} (choose from vgg16, vit_b_16, resnet50)")
    return model.eval()


def cpu_pressure() -> str | None:
    """The kernel's CPU pressure ("some" avg10/avg60), a hint of other processes competing."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    kv = dict(item.split("=") for item in line.split()[1:])
                    return f"{kv['avg10']}% (10 s) {kv['avg60']}% (60 s)"
    except (OSError, ValueError, KeyError):
        pass
    return None


class Timer:
    """Times a region with perf_counter; collects garbage first and keeps gc off inside."""

    def __enter__(self):
        gc.collect()
        gc.disable()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        gc.enable()
        return False


def bench_model(name: str, batch: int, repeats: int, freeze: bool = False) -> dict:
    torch.manual_seed(0)
    model = build_model(name)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    x = torch.randn(batch, 3, 224, 224).requires_grad_(True)

    with torch.no_grad():
        target = int(model(x)[0].argmax())

    def forward():
        return model(x)

    def grad(out):
        (g,) = torch.autograd.grad(out[:, target].sum(), x)
        return g

    cached_lrp = dynamiclrp.LRP(rules="dynamiclrp")

    # With frozen parameters autograd keeps no trace of the biases, so dynamiclrp needs the
    # forward pass run under dynamiclrp.record(model); that recorded forward is timed as fwd_rec.
    def forward_for_explain():
        if not freeze:
            return model(x), {}
        with dynamiclrp.record(model) as rec:
            out = model(x)
        return out, {"recording": rec}

    def explain_first(out, kw):
        return dynamiclrp.explain(out, inputs=x, target=target, **kw)

    def explain_cached(out, kw):
        return cached_lrp.explain(out, x, target=target, **kw)

    t_fwd, t_grad, t_first, t_cached, t_fwd_rec = [], [], [], [], []
    checks = {}
    for rep in range(WARMUP + repeats):
        keep = rep >= WARMUP

        with Timer() as t:
            out = forward()
        if keep:
            t_fwd.append(t.seconds)
        del out

        with Timer() as t:
            out = forward()
            g = grad(out)
        if keep:
            t_grad.append(t.seconds)
        del out, g

        with Timer() as t:
            out, kw = forward_for_explain()
        if keep:
            t_fwd_rec.append(t.seconds)
        with Timer() as t:
            rel = explain_first(out, kw)
        if keep:
            t_first.append(t.seconds)
        if rep == 0:
            logit = out[:, target].detach()
            checks["first_rel_sum"] = rel.detach().flatten(1).sum(1)
            checks["logit"] = logit
        del out, rel, kw

        out, kw = forward_for_explain()
        with Timer() as t:
            rel = explain_cached(out, kw)
        if keep:
            t_cached.append(t.seconds)
            if not cached_lrp.last_plan_cached:
                checks["cache_miss"] = checks.get("cache_miss", 0) + 1
        if rep == WARMUP + repeats - 1:
            checks["cached_rel_sum"] = rel.detach().flatten(1).sum(1)
            checks["finite"] = bool(torch.isfinite(rel).all())
        del out, rel, kw

    samples = {"fwd": t_fwd, "grad": t_grad, "first": t_first, "cached": t_cached}
    if freeze:
        samples["fwd_rec"] = t_fwd_rec
    return {
        "median": {k: statistics.median(v) for k, v in samples.items()},
        "min": {k: min(v) for k, v in samples.items()},
        "max": {k: max(v) for k, v in samples.items()},
        "checks": checks,
    }


def print_table(results: dict, stat: str) -> None:
    hdr = (
        f"{'model':<10} {'fwd ms':>9} {'fwd+grad':>9} {'first ms':>9} {'cached ms':>9}"
        f" {'first/fg':>9} {'cached/fg':>9} {'f+first/fg':>10} {'f+cach/fg':>10}"
    )
    print(hdr)
    print("-" * len(hdr))
    for name, res in results.items():
        r = res[stat]
        fg = r["grad"]
        fx = r.get("fwd_rec", r["fwd"])  # the forward an explanation needs
        print(
            f"{name:<10} {r['fwd'] * 1e3:9.1f} {fg * 1e3:9.1f} {r['first'] * 1e3:9.1f}"
            f" {r['cached'] * 1e3:9.1f} {r['first'] / fg:8.2f}x {r['cached'] / fg:8.2f}x"
            f" {(fx + r['first']) / fg:9.2f}x {(fx + r['cached']) / fg:9.2f}x"
        )
        if "fwd_rec" in r:
            print(
                f"{'':<10} forward under dynamiclrp.record(model): {fx * 1e3:.1f} ms (used in f+*/fg)"
            )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models",
        default="vgg16,vit_b_16",
        help="comma-separated: vgg16, vit_b_16, resnet50 (default: vgg16,vit_b_16)",
    )
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions (default 5)")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)"
    )
    ap.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    ap.add_argument(
        "--freeze-params",
        action="store_true",
        help="set requires_grad=False on the parameters and run the explained forward passes "
        "under dynamiclrp.record(model) (default: parameters require grad, as torchvision makes them)",
    )
    args = ap.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)} (choose from {', '.join(MODELS)})")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.freeze_params and not hasattr(dynamiclrp, "record"):
        ap.error("--freeze-params needs dynamiclrp.record(), which this dynamiclrp lacks")

    import torchvision

    print(
        f"python {platform.python_version()}  torch {torch.__version__}  "
        f"torchvision {torchvision.__version__}  dynamiclrp {dynamiclrp.__version__}"
    )
    print(
        f"cpu: {cpu_model()}  ({os.cpu_count()} logical cores)  "
        f"torch threads: {torch.get_num_threads()}"
    )
    print(
        f"device: cpu  batch: {args.batch}  repeats: {args.repeats} (+{WARMUP} warm-up)  "
        f"statistics: median (headline), min, max  params require grad: {not args.freeze_params}"
    )
    print()

    pressure = cpu_pressure()
    if pressure:
        print(f"cpu pressure before: {pressure}")
    results, failed = {}, []
    for name in names:
        print(f"running {name} ...", flush=True)
        try:
            results[name] = bench_model(name, args.batch, args.repeats, args.freeze_params)
        except Exception:
            failed.append(name)
            print(f"ERROR on {name}:", flush=True)
            traceback.print_exc()
            sys.stderr.flush()
        gc.collect()
    print()

    if results:
        print("median over repetitions (the headline numbers):")
        print_table(results, "median")
        print()
        print(
            "fg = forward + gradient (T_grad); first/cached exclude the forward; "
            f"targets: first/fg <= {TARGET_FIRST:g}x, cached/fg <= {TARGET_CACHED:g}x"
        )
        print()
        print("minimum over repetitions (less sensitive to background load):")
        print_table(results, "min")
        print()
        print("maximum over repetitions (ms), to spot interference:")
        for name, res in results.items():
            s = "  ".join(f"{k} {v * 1e3:.1f}" for k, v in res["max"].items())
            print(f"  {name:<10} {s}")
        print()
        print("sanity (sample 0): logit, sum of relevance (first / cached), finite, cache misses:")
        for name, r in results.items():
            c = r["checks"]
            print(
                f"  {name:<10} logit {c['logit'][0].item():+.4g}  "
                f"sum R {c['first_rel_sum'][0].item():+.4g} / {c['cached_rel_sum'][0].item():+.4g}"
                f"  finite {c['finite']}  cache misses {c.get('cache_miss', 0)}"
            )
        verdicts = []
        for name, r in results.items():
            m = r["median"]
            ok_f = m["first"] / m["grad"] <= TARGET_FIRST
            ok_c = m["cached"] / m["grad"] <= TARGET_CACHED
            verdicts.append(
                f"{name}: first {'ok' if ok_f else 'OVER'}, cached {'ok' if ok_c else 'OVER'}"
            )
        print()
        print("targets (medians): " + "; ".join(verdicts))
    pressure = cpu_pressure()
    if pressure:
        print(
            f"cpu pressure after: {pressure} (well above 0 means other processes competed for the CPU)"
        )
    if failed:
        print(f"\nfailed: {', '.join(failed)} (traceback above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
