"""Relevance of an intermediate layer, and explaining a hidden neuron instead of a class.

A small bias-free ReLU CNN is trained for a few seconds on a toy task (which quadrant of a 16x16
image holds a bright square).  The script then shows two things the plain "input heatmap for a
class" does not:

1. **Intermediate relevance.**  The activation of the second convolution is kept during the
   forward pass and passed to ``dynamiclrp.explain`` next to the image (``inputs=[x, hidden]``):
   one call gives the relevance of every hidden unit and of every pixel for the class.  The
   script prints the channels carrying the most relevance.
2. **Neuron relevance.**  The seed need not be a class logit: ``explain(hidden, x, relevance=s)``
   with ``s`` zero everywhere except one channel (or one unit) explains that hidden channel (or
   unit): which pixels make it fire.

The numbers are checked against independent ones.  The model has no biases, so LRP conserves
relevance: the relevance at the hidden layer and at the pixels each sums to the explained logit
(or to the seeded activation for a neuron), up to the stabiliser ``eps`` the books report.  And
for a ReLU network with LRP-0 (epsilon with ``eps`` ~ 0) the relevance equals gradient x input,
computed with ``torch.autograd.grad``.  Heatmaps go to ``--out`` as one PNG grid
(``intermediate_and_neuron.png``: input, class relevance, hidden-layer relevance, channel
relevance, single-unit relevance).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from quadrants import quadrant_data as make_data
from quadrants import train
from torch import Tensor, nn

import dynamiclrp
from dynamiclrp import viz


class SmallCNN(nn.Module):
    """Bias-free ReLU CNN; ``forward`` keeps the second convolution's activation in ``hidden``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.fc = nn.Linear(16 * 4, 4, bias=False)
        self.hidden: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)  # (B, 8, 8, 8)
        self.hidden = torch.relu(self.conv2(h))  # (B, 16, 8, 8): the layer we look at
        pooled = nn.functional.adaptive_avg_pool2d(self.hidden, 2)
        return self.fc(pooled.flatten(1))


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out_intermediate_and_neuron", help="folder for the PNG")
    parser.add_argument("--steps", type=int, default=150, help="training steps (0: random)")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = SmallCNN()
    train(model, args.steps, g)
    model.eval().double()

    x, y = make_data(1, g)
    x = x.double().requires_grad_(True)
    out = model(x)
    hidden = model.hidden
    target = int(out.argmax())
    logit = out[0, target].item()
    print(f"class {target} (true {int(y)}), logit {logit:.6f}")
    ok = True

    # -- 1. the class, explained at the pixels and at the hidden layer in one call ---------------
    (r_x, r_hidden), report = dynamiclrp.explain(
        out, [x, hidden], target=target, return_report=True
    )
    print(report)
    per_channel = r_hidden[0].sum(dim=(1, 2))
    top = per_channel.argsort(descending=True)[:3].tolist()
    print(
        "hidden channels with the most relevance: "
        + ", ".join(f"{c} ({per_channel[c].item():+.4f})" for c in top)
    )
    for name, total in (("hidden layer", r_hidden.sum().item()), ("pixels", r_x.sum().item())):
        err = relative(total, logit)
        ok &= err < 1e-4
        print(f"conservation, {name}: sum {total:.6f} vs logit {logit:.6f} (rel. diff {err:.1e})")

    # LRP-0 = gradient x input (ReLU network, no biases): an oracle that knows nothing of LRP.
    lrp0 = dynamiclrp.Rules(name="lrp-0", eps=1e-12, add="signed", reduction="signed")
    r0_x, r0_hidden = dynamiclrp.explain(out, [x, hidden], target=target, rules=lrp0)
    g_x, g_hidden = torch.autograd.grad(out[0, target], [x, hidden], retain_graph=True)
    for name, r, gxi in (("pixels", r0_x, g_x * x), ("hidden", r0_hidden, g_hidden * hidden)):
        err = ((r - gxi).abs().max() / gxi.abs().max()).item()
        ok &= err < 1e-8
        print(f"LRP-0 vs gradient x input, {name}: max rel. diff {err:.1e}")

    # -- 2. a hidden channel, and a single hidden unit, explained at the pixels ------------------
    channel = top[0]
    seed = torch.zeros_like(hidden)
    seed[:, channel] = hidden[:, channel].detach()  # seed = the channel's own activation
    r_channel = dynamiclrp.explain(hidden, x, relevance=seed)
    err = relative(r_channel.sum().item(), seed.sum().item())
    ok &= err < 1e-4
    print(
        f"channel {channel}: seeded {seed.sum().item():.6f}, at the pixels "
        f"{r_channel.sum().item():.6f} (rel. diff {err:.1e})"
    )

    flat = hidden[0, channel].detach().flatten()
    i, j = divmod(int(flat.argmax()), hidden.shape[-1])
    unit = torch.zeros_like(hidden)
    unit[0, channel, i, j] = hidden[0, channel, i, j].detach()
    r_unit = dynamiclrp.explain(hidden, x, relevance=unit)
    # A unit of conv2 sees an 8x8 patch of pixels (3x3 conv after 2x2 pooling after 3x3 conv):
    # no relevance may land outside it.
    outside = r_unit.clone()
    outside[..., max(0, 2 * i - 3) : 2 * i + 5, max(0, 2 * j - 3) : 2 * j + 5] = 0
    ok &= outside.abs().max().item() == 0.0
    (g_unit,) = torch.autograd.grad(hidden[0, channel, i, j], x, retain_graph=True)
    r0_unit = dynamiclrp.explain(hidden, x, relevance=unit, rules=lrp0)
    err = ((r0_unit - g_unit * x).abs().max() / (g_unit * x).abs().max()).item()
    ok &= err < 1e-8
    print(
        f"unit ({channel}, {i}, {j}): activation {unit.sum().item():.6f}, relevance at the pixels "
        f"{r_unit.sum().item():.6f}, outside its receptive field "
        f"{outside.abs().max().item():.1g}; LRP-0 vs gradient x input {err:.1e}"
    )

    tiles = [
        viz.heatmap(x[0].detach()),
        viz.heatmap(r_x[0]),
        viz.heatmap(r_hidden[0].repeat_interleave(2, -1).repeat_interleave(2, -2)),
        viz.heatmap(r_channel[0]),
        viz.heatmap(r_unit[0]),
    ]
    path = viz.save_png(viz.image_grid(tiles, ncols=5), out_dir / "intermediate_and_neuron.png", 8)
    print(f"wrote {path} (input, class, hidden layer, channel {channel}, unit)")
    if not ok:
        raise SystemExit("a check failed (see above)")


if __name__ == "__main__":
    main()
