"""Per-layer rules: a preset plus overrides for chosen layers, and what changes.

The common LRP recipe for CNNs (Montavon et al., "Layer-wise Relevance Propagation: An Overview",
2019) uses a different rule per depth: z-box on the first layer (it knows the input's bounds),
gamma on the convolutions (favours positive contributions, less noisy maps) and epsilon on the
dense layers.  Here that recipe is built from the ``"epsilon"`` preset with overrides, by
parameter tensor and by parameter name::

    rules = (
        dynamiclrp.preset("epsilon")
        .override(dynamiclrp.ZBox(0.0, 1.0), params=[model[0].weight])
        .override(dynamiclrp.Gamma(0.25), names=["2.weight", "5.weight"], model=model)
    )

The script trains a small CNN for a few seconds (which quadrant of a 16x16 image in [0, 1] holds
a bright square), explains one image with the plain presets and with the recipe, prints the books
of the recipe and a table of how the maps differ (relevance at the input, absorbed by biases,
share of the positive relevance on the square, share of negative relevance, correlation with the
epsilon map), and checks:

- the same recipe written as ``Rules(conv=Gamma(0.25), first=ZBox(0, 1))`` (first-layer rule
  found from the graph) gives the same relevance as the overrides;
- the z-box override on the first layer, recomputed by hand from the relevance at that layer's
  output with ``torch.autograd.grad`` on ``F.conv2d`` (the formula of ``docs/rules.md``).

A PNG grid of the input and each map goes to ``--out`` (``layer_rule_override.png``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from quadrants import quadrant_data, train
from torch import Tensor, nn

import dynamiclrp
from dynamiclrp import Epsilon, Gamma, Rules, ZBox, viz

LOW, HIGH = 0.0, 1.0  # the pixel range: the z-box bounds


def make_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),  # 0: z-box
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),  # 2: gamma
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1),  # 5: gamma
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 32),  # 9: epsilon (the preset's dense rule)
        nn.ReLU(),
        nn.Linear(32, 4),  # 11: epsilon
    )


def make_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Images in [0, 1] (the z-box rule needs bounds): the dim background of ``quadrants``."""
    return quadrant_data(n, generator, background="dim")


def zbox_by_hand(x: Tensor, conv: nn.Conv2d, r_out: Tensor, eps: float) -> Tensor:
    """The z-box rule (bias kept in the denominator) for one convolution, from its formula."""
    x = x.detach().requires_grad_(True)
    lo = torch.full_like(x, LOW, requires_grad=True)
    hi = torch.full_like(x, HIGH, requires_grad=True)
    w, b = conv.weight.detach(), conv.bias.detach()
    kw = dict(padding=conv.padding)
    z = (
        F.conv2d(x, w, b, **kw)
        - F.conv2d(lo, w.clamp(min=0), **kw)
        - F.conv2d(hi, w.clamp(max=0), **kw)
    )
    s = r_out / (z + eps * torch.where(z >= 0, 1.0, -1.0)).detach()
    gx, glo, ghi = torch.autograd.grad((z * s).sum(), [x, lo, hi])
    # d z / d lo = -(w+)^T, d z / d hi = -(w-)^T, so lo * glo = -lo (w+)^T s (the rule's term)
    return x * gx + lo * glo + hi * ghi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out_layer_rule_override", help="folder for the PNG")
    parser.add_argument("--steps", type=int, default=150, help="training steps (0: random)")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = make_model()
    train(model, args.steps, g, background="dim")
    model.eval().double()

    recipe = (
        dynamiclrp.preset("epsilon")
        .override(ZBox(LOW, HIGH), params=[model[0].weight])
        .override(Gamma(0.25), names=["2.weight", "5.weight"], model=model)
    )
    print(f"dense layers: {recipe.dense!r}; overrides: {[o.rule for o in recipe.overrides]}")

    x, y = make_data(1, g)
    x = x.double().requires_grad_(True)
    first_output: list[Tensor] = []
    hook = model[0].register_forward_hook(lambda module, args, output: first_output.append(output))
    out = model(x)
    hook.remove()
    target = int(out.argmax())
    print(f"class {target} (true {int(y)}), logit {out[0, target].item():.6f}")

    maps, books = {}, {}
    for name, rules in (("epsilon", "epsilon"), ("gamma", "gamma"), ("recipe", recipe)):
        maps[name], books[name] = dynamiclrp.explain(
            out, x, target, rules=rules, return_report=True
        )
    print("books of the recipe (z-box / gamma / epsilon):")
    print(books["recipe"])

    square = x.detach() == 1.0  # the bright square's pixels
    reference = maps["epsilon"].flatten()
    print(
        f"{'rules':<9} {'at input':>9} {'absorbed':>9} {'on square':>10} {'negative':>9} "
        f"{'corr. eps':>9}"
    )
    for name, rel in maps.items():
        pos, neg = rel.clamp(min=0), rel.clamp(max=0)
        on_square = (pos[square].sum() / pos.sum()).item()
        negative = (neg.abs().sum() / rel.abs().sum()).item()
        corr = torch.corrcoef(torch.stack([rel.flatten(), reference]))[0, 1].item()
        print(
            f"{name:<9} {books[name].inputs[0]:>9.4f} {books[name].absorbed:>9.4f} "
            f"{on_square:>10.2%} {negative:>9.2%} {corr:>9.3f}"
        )

    ok = True
    # Check 1: the same recipe as Rules fields (first-layer rule found from the graph).
    as_fields = Rules(
        name="recipe-fields",
        add="signed",
        reduction="signed",
        dense=Epsilon(),
        conv=Gamma(0.25),
        first=ZBox(LOW, HIGH),
    )
    same = dynamiclrp.explain(out, x, target, rules=as_fields)
    diff = (same - maps["recipe"]).abs().max().item()
    ok &= diff <= 1e-12 * maps["recipe"].abs().max().item()
    print(f"overrides vs Rules(conv=Gamma, first=ZBox): max abs difference {diff:.1e}")

    # Check 2: the first layer's z-box by hand, from the relevance at that layer's output.
    (z1,) = first_output
    r_z1 = dynamiclrp.explain(out, z1, target, rules=recipe)
    hand = zbox_by_hand(x, model[0], r_z1, eps=recipe.eps)
    err = ((maps["recipe"] - hand).abs().max() / hand.abs().max()).item()
    ok &= err < 1e-10
    print(f"first layer z-box vs the formula by hand: max rel. difference {err:.1e}")

    tiles = [viz.heatmap(x[0].detach())] + [viz.heatmap(maps[n][0]) for n in maps]
    path = viz.save_png(
        viz.image_grid(tiles, ncols=len(tiles)), out_dir / "layer_rule_override.png", 8
    )
    print(f"wrote {path} (input, {', '.join(maps)})")
    if not ok:
        raise SystemExit("a check failed (see above)")


if __name__ == "__main__":
    main()
