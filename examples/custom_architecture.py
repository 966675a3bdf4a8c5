"""Explain a model nobody ships LRP rules for, with one call.

The model is a small, made-up "gated scan mixer" for 16x16 images, written with primitive tensor
ops rather than library layers:

- patches cut out with ``reshape`` / ``permute`` (no ``nn.Unfold``);
- a hand-written RMS normalisation (``x * torch.rsqrt(x.pow(2).mean(-1) + eps) * g``);
- token mixing by ``torch.einsum`` with a learned token-by-token matrix;
- a causal "scan" over the patches: ``cumsum`` divided by the running count;
- a gated channel mixer ``sigmoid(x @ Wg) * (x @ Wv)`` and residual additions;
- mean pooling and a ReLU head.

No module wrapper, hook or rule registration is needed: ``dynamiclrp.explain`` walks the autograd
graph the forward pass recorded and applies one rule per op type.  The script

1. trains the model for a few seconds on a toy task (which quadrant holds a bright square),
2. explains one prediction with one call and prints the books (where the relevance went),
3. checks the two properties that can be checked independently: the books close (relevance is
   conserved up to what the rules document), and on the ReLU/linear head LRP-0 equals
   gradient x input (computed with ``torch.autograd.grad``, which knows nothing about LRP),
4. writes the heatmap (``heatmap.png``) and the input with the heatmap overlaid (``overlay.png``)
   into ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from quadrants import quadrant_data
from quadrants import train as fit
from torch import Tensor, nn

import dynamiclrp
from dynamiclrp import viz

SIZE, PATCH = 16, 4
TOKENS, PIXELS = (SIZE // PATCH) ** 2, PATCH * PATCH


class GatedScanMixer(nn.Module):
    """A made-up architecture: patches, RMS norm, einsum token mixing, a cumsum scan, a gate."""

    def __init__(self, dim: int = 24, classes: int = 4):
        super().__init__()
        self.embed = nn.Parameter(torch.randn(PIXELS, dim) / PIXELS**0.5)
        self.pos = nn.Parameter(0.02 * torch.randn(TOKENS, dim))
        self.norm1 = nn.Parameter(torch.ones(dim))
        self.token_mix = nn.Parameter(torch.eye(TOKENS) + 0.1 * torch.randn(TOKENS, TOKENS))
        self.norm2 = nn.Parameter(torch.ones(dim))
        self.w_gate = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.w_value = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.head = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, classes))
        self.features: Tensor | None = None  # the head's input, kept for the LRP-0 check

    @staticmethod
    def rms_norm(x: Tensor, gain: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gain

    def forward(self, images: Tensor) -> Tensor:
        b = images.shape[0]
        p = images.reshape(b, SIZE // PATCH, PATCH, SIZE // PATCH, PATCH)
        p = p.permute(0, 1, 3, 2, 4).reshape(b, TOKENS, PIXELS)
        x = p @ self.embed + self.pos
        h = self.rms_norm(x, self.norm1)
        x = x + torch.einsum("st,btd->bsd", self.token_mix, h)
        count = torch.arange(1, TOKENS + 1, dtype=x.dtype, device=x.device).view(1, -1, 1)
        x = x + x.cumsum(dim=1) / count  # causal scan: running mean over the patches
        h = self.rms_norm(x, self.norm2)
        x = x + torch.sigmoid(h @ self.w_gate) * (h @ self.w_value)
        self.features = x.mean(dim=1)
        return self.head(self.features)


def make_data(n: int, generator: torch.Generator, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """Noise images with one bright 4x4 square; the label is the quadrant holding it."""
    x, labels = quadrant_data(n, generator)
    return x.to(dtype), labels


def train(model: nn.Module, steps: int, generator: torch.Generator) -> float:
    fit(model, steps, generator)
    x, y = make_data(256, generator)
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out_custom_architecture", help="folder for the PNGs")
    parser.add_argument("--steps", type=int, default=150, help="training steps (0: random)")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = GatedScanMixer()
    t0 = time.perf_counter()
    acc = train(model, args.steps, g)
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.1f}s, test accuracy {acc:.2%}")
    model.double()  # float64: the numerical checks below are then tight

    x, y = make_data(1, g, torch.float64)
    x.requires_grad_(True)
    out = model(x)
    target = int(out.argmax())

    # Which op types the graph holds and which rule each gets (nothing here is registered by us).
    cov = dynamiclrp.coverage(out, x, target=target)
    print(cov)

    # 1. The explanation: one call.
    rel, report = dynamiclrp.explain(out, x, target=target, return_report=True)
    print(f"explained class {target} (true class {int(y)}): logit {out[0, target].item():.6f}")
    print(report)
    closes = abs(report.residual) <= 1e-9 * max(1.0, abs(report.seeded))
    print(f"books close: {closes} (residual {report.residual:.3g})")

    # 2. LRP-0 on the ReLU/linear head equals gradient x input at the head's input.
    lrp0 = dynamiclrp.Rules(name="lrp-0", eps=1e-12, add="signed", reduction="signed")
    feats = model.features
    r_feats = dynamiclrp.explain(out, feats, target=target, rules=lrp0)
    (grad,) = torch.autograd.grad(out[0, target], feats, retain_graph=True)
    gxi = grad * feats.detach()
    err = (r_feats - gxi).abs().max().item() / gxi.abs().max().item()
    print(f"head: LRP-0 vs gradient x input, max relative difference {err:.2e}")

    k = int(y)
    r0, c0 = (k // 2) * 8, (k % 2) * 8
    positive = rel.clamp(min=0)
    share = positive[0, 0, r0 : r0 + 8, c0 : c0 + 8].sum() / positive.sum()
    print(f"share of positive relevance in the true quadrant: {share.item():.2%}")

    heat = viz.save_png(viz.heatmap(rel[0]), out_dir / "heatmap.png", upscale=16)
    image = (x[0, 0].detach() - x.min()) / (x.max() - x.min())
    over = viz.save_png(viz.overlay(image, rel[0], alpha=0.6), out_dir / "overlay.png", upscale=16)
    print(f"wrote {heat} and {over}")
    if not closes or err > 1e-6:
        raise SystemExit("a check failed (see above)")


if __name__ == "__main__":
    main()
