"""dynamiclrp demo: train a small CNN for a few seconds, explain it, print the books, save a heatmap.

The task: 16x16 images of noise with one bright 4x4 square; the class is the quadrant holding the
square.  A faithful explanation puts its positive relevance on the square.
"""

import argparse
import time

import torch
from quadrants import quadrant_data as make_data
from quadrants import train
from torch import nn

import dynamiclrp
from dynamiclrp.visualize import heatmap, save_png


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_heatmap.png", help="heatmap file to write")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 4),
    )
    t0 = time.perf_counter()
    train(model, args.steps, g)
    x, y = make_data(256, g)
    acc = (model(x).argmax(1) == y).float().mean().item()
    print(f"trained in {time.perf_counter() - t0:.1f}s, test accuracy {acc:.2%}")

    x, y = make_data(1, g)
    x.requires_grad_(True)
    out = model(x)
    target = int(out.argmax())
    rel, report = dynamiclrp.explain(out, x, target=target, return_report=True)
    print(f"explained class {target} (true class {int(y)}): logit {out[0, target].item():.4f}")
    print(report)
    k = int(y)
    r0, c0 = (k // 2) * 8, (k % 2) * 8
    share = rel[0, 0, r0 : r0 + 8, c0 : c0 + 8].clamp(min=0).sum() / rel.clamp(min=0).sum()
    print(f"share of positive relevance in the true quadrant: {share.item():.2%}")
    path = save_png(heatmap(rel[0]), args.out, upscale=16)
    print(f"heatmap written to {path}")


if __name__ == "__main__":
    main()
