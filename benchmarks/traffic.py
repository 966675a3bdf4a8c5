"""Elements moved per explanation, by autograd node type: a machine-independent cost measure.

On a CPU (and for large tensors on a GPU) most of an explanation's time beyond the contractions
is element-wise passes over activation-sized tensors, bound by memory traffic.  This script counts
them exactly: under a ``TorchDispatchMode`` every ATen op of one cached ``LRP.explain`` call
(forward pass excluded) adds the element counts of its tensor inputs and outputs, grouped by the
autograd node being propagated; views (``view``, ``transpose``, ``expand``, ...) count 0.  The
same count is printed for the gradient backward (``torch.autograd.grad`` of the explained logit)
and the forward pass.  The number does not depend on how busy the machine is.

    PYTHONPATH=src python benchmarks/traffic.py resnet50 --batch 1   # torchvision models
    PYTHONPATH=src python benchmarks/traffic.py vit_b_16 --top 8
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import dynamiclrp
from dynamiclrp import engine

FREE = {
    "view.default",
    "_unsafe_view.default",
    "t.default",
    "transpose.int",
    "expand.default",
    "permute.default",
    "unsqueeze.default",
    "squeeze.dim",
    "slice.Tensor",
    "select.int",
    "as_strided.default",
    "detach.default",
    "alias.default",
}


class Traffic(TorchDispatchMode):
    """Counts elements read and written per ATen op, under the label in ``self.label``."""

    def __init__(self):
        super().__init__()
        self.label = "-"
        self.elements: dict[str, Counter] = defaultdict(Counter)
        self.calls: dict[str, Counter] = defaultdict(Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        n = 0
        if name not in FREE:
            for t in tree_leaves((args, kwargs, out)):
                if isinstance(t, torch.Tensor):
                    n += t.numel()
        self.elements[self.label][name] += n
        self.calls[self.label][name] += 1
        return out

    def total(self, label: str | None = None) -> int:
        groups = self.elements.values() if label is None else [self.elements[label]]
        return sum(sum(c.values()) for c in groups)


def measure(model, x, rules: str = "dynamiclrp", top: int = 6) -> dict[str, float]:
    """Print elements moved by explain (per node type), gradient and forward; return totals."""
    lrp = dynamiclrp.LRP(rules)
    out = model(x)
    lrp.explain(out, x, target=out.argmax(1))  # warm the plan cache
    original = engine._Run._propagate
    mode = Traffic()

    def propagate(self, v, *a, **k):
        mode.label = self.graph.names[v]
        try:
            return original(self, v, *a, **k)
        finally:
            mode.label = "-"

    out = model(x)
    engine._Run._propagate = propagate
    try:
        with mode:
            lrp.explain(out, x, target=out.argmax(1))
    finally:
        engine._Run._propagate = original
    explain = mode.total()
    print(f"explain: {explain / 1e6:.1f} M elements moved")
    for node, c in sorted(mode.elements.items(), key=lambda kv: -sum(kv[1].values()))[:top]:
        ops = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in c.most_common(5))
        print(f"  {node:45s} {sum(c.values()) / 1e6:8.1f} M  ({ops})")
    out = model(x)
    logit = out.gather(1, out.argmax(1, keepdim=True)).sum()
    grad_mode = Traffic()
    with grad_mode:
        torch.autograd.grad(logit, x)
    fwd_mode = Traffic()
    with fwd_mode:
        model(x)
    grad, fwd = grad_mode.total(), fwd_mode.total()
    print(f"gradient backward: {grad / 1e6:.1f} M; forward: {fwd / 1e6:.1f} M")
    print(f"explain / (forward + gradient): {explain / (fwd + grad):.2f}")
    return {"explain": explain, "gradient": grad, "forward": fwd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a torchvision model name (random weights)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rules", default="dynamiclrp")
    parser.add_argument("--top", type=int, default=6, help="node types to list")
    args = parser.parse_args()
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, requires_grad=True)
    measure(model, x, args.rules, args.top)


if __name__ == "__main__":
    main()
