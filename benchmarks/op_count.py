"""ATen ops per autograd node of a dynamiclrp explanation: a machine-independent speed measure.

On a GPU an explanation of a model made of small ops is bound by the host: each ATen op the
engine and its rules run is at least one kernel launch and some microseconds of dispatch.  This
script counts them with ``torch.profiler`` on the CPU, so the number does not depend on how busy
the machine is.

Definition (kept fixed): the profiler's events whose name starts with ``aten::`` during one cached
``LRP.explain`` call (plan already cached, forward pass excluded), **all** of them (nested ones
included, e.g. ``aten::to`` and the ``aten::_to_copy`` / ``aten::copy_`` it calls), divided by
the number of autograd nodes the engine propagated (``RelevanceReport.nodes``).  ``top`` counts
only the events with no ``aten::`` event around them (one per call made from Python).

Workloads:

* ``chain``: ``benchmarks/speed.py``'s chain of alternating ``y + b``, ``y * w``, ``relu(y)`` on a
  ``(1, 4)`` tensor, run under :func:`dynamiclrp.record`;
* ``vit``: a small ViT-like transformer (patch convolution, class token, position embedding, two
  pre-norm blocks with attention written out in Python, GELU MLP, head);
* ``cnn``: a small CNN (conv, batch norm, ReLU, max pool, a residual block, average pool, linear).

Run from the repository root::

    PYTHONPATH=src python benchmarks/op_count.py            # table of ops per node
    PYTHONPATH=src python benchmarks/op_count.py --top 15   # and the most frequent ops
    PYTHONPATH=src python benchmarks/op_count.py --time 5   # and the chain's wall-clock median
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import dynamiclrp


def _speed_chain():
    """``chain`` from ``benchmarks/speed.py`` (imported, so both measure the same workload)."""
    path = Path(__file__).with_name("speed.py")
    spec = importlib.util.spec_from_file_location("_speed_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.chain


class Block(nn.Module):
    """A pre-norm transformer block, attention written out: ``softmax(q k^T / sqrt(d)) v``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) * (d // h) ** -0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.c1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.c2(self.c1(x)))
        return self.head(x)


def _workloads(chain_ops: int):
    """``name -> (forward returning (output, input, recording or None), explain kwargs)``."""
    torch.manual_seed(0)
    chain = _speed_chain()
    b = nn.Parameter(torch.rand(4) * 0.1)
    w = nn.Parameter(torch.rand(4) * 0.1 + 0.95)
    xc = (torch.rand(1, 4) + 0.5).requires_grad_(True)

    def fwd_chain():
        with dynamiclrp.record() as rec:
            out = chain(xc, b, w, chain_ops)
        return out, xc, rec, {"relevance": torch.ones_like(out)}

    vit, cnn = TinyViT().eval(), TinyCNN().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in cnn.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    img = torch.randn(1, 3, 16, 16)

    def fwd_model(model):
        def f():
            x = img.clone().requires_grad_(True)
            return model(x), x, None, {"target": 3}

        return f

    return {"chain": fwd_chain, "vit": fwd_model(vit), "cnn": fwd_model(cnn)}


def count_ops(forward, rules: str = "dynamiclrp") -> tuple[Counter, Counter, int]:
    """ATen events of one cached explanation: ``(all by name, top-level by name, nodes)``."""
    lrp = dynamiclrp.LRP(rules)
    out, x, rec, kw = forward()
    lrp.explain(out, x, recording=rec, **kw)  # builds and caches the plan
    out, x, rec, kw = forward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        lrp.explain(out, x, recording=rec, **kw)
    assert lrp.last_plan_cached, "the profiled pass did not use the cached plan"
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = Counter()
    end = -1
    for e in sorted(events, key=lambda e: (e.time_range.start, -e.time_range.end)):
        if e.time_range.start >= end:  # not inside the previous top-level aten event
            top[e.name] += 1
            end = e.time_range.end
    return Counter(e.name for e in events), top, lrp.report.nodes


def chain_time(forward, repeats: int) -> float:
    """Median wall-clock seconds of a cached explanation of the chain (forward excluded)."""
    lrp = dynamiclrp.LRP("dynamiclrp")
    times = []
    for _ in range(repeats + 1):
        out, x, rec, kw = forward()
        t0 = time.perf_counter()
        lrp.explain(out, x, recording=rec, **kw)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain-ops", type=int, default=300, help="ops in the chain (default 300)")
    ap.add_argument("--top", type=int, default=0, help="also list the N most frequent ops")
    ap.add_argument("--time", type=int, default=0, help="repeats for the chain's wall clock")
    ap.add_argument("--rules", default="dynamiclrp", help="preset (default dynamiclrp)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    loads = _workloads(args.chain_ops)
    print(f"{'workload':<8} {'nodes':>6} {'aten all':>9} {'all/node':>9} {'top/node':>9}")
    for name, fwd in loads.items():
        every, top, nodes = count_ops(fwd, args.rules)
        n_all, n_top = sum(every.values()), sum(top.values())
        print(f"{name:<8} {nodes:>6} {n_all:>9} {n_all / nodes:>9.2f} {n_top / nodes:>9.2f}")
        for op, c in every.most_common(args.top):
            print(f"    {op:<40} {c / nodes:>7.2f}/node")
    if args.time:
        t = chain_time(loads["chain"], args.time)
        nodes = count_ops(loads["chain"], args.rules)[2]
        print(f"chain wall clock (cached, median of {args.time}): {t / nodes * 1e6:.1f} us/node")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
