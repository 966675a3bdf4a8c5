"""Use dynamiclrp where Captum or Quantus is expected.

``dynamiclrp.captum.DynamicLRP`` has the interface of Captum's attribution classes
(``attribute(inputs, target=..., additional_forward_args=..., return_convergence_delta=...)``), so
code written for ``captum.attr.LRP`` or ``InputXGradient`` takes it unchanged; Captum itself is not
needed.  ``dynamiclrp.captum.quantus_explain_func`` is Quantus' ``explain_func``.

The script trains a small CNN for a few seconds (which quadrant of a 16x16 image holds a bright
square), then

1. explains a batch with ``DynamicLRP(model, rules="captum")`` and prints the convergence delta
   (per example: the explained logit minus the summed relevance; the biases' share);
2. if ``captum`` is installed, runs ``captum.attr.LRP`` on the same batch (float64) and prints
   the largest relative difference: the ``"captum"`` preset reproduces Captum's epsilon-rule
   defaults, and the two differ only at max pooling, where Captum applies its epsilon rule
   (``R y / stab(y)``, ``1e-9`` off) and dynamiclrp routes to the winner (``tests/test_captum.py``);
3. if ``quantus`` is installed, scores the explanations with Quantus' ``FaithfulnessCorrelation``
   (correlation between a pixel subset's relevance and the logit drop when that subset is
   removed) and ``Sparseness``, next to random attributions as a baseline.

Nothing is written to disk; ``--out`` is accepted for symmetry with the other examples and, if
given, receives ``scores.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from quadrants import quadrant_data as make_data
from quadrants import train
from torch import Tensor, nn

from dynamiclrp.captum import DynamicLRP, quantus_explain_func


class CNN(nn.Module):
    """Layers Captum's ``LRP`` has rules for; flattening with ``view`` (it has none for Flatten)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.r1, self.p1 = nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.c2, self.r2, self.p2 = (
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.l1 = nn.Linear(64, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.p2(self.r2(self.c2(self.p1(self.r1(self.c1(x))))))
        return self.l1(h.view(h.shape[0], -1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps (0: random)")
    parser.add_argument("--batch", type=int, default=8, help="examples to explain and score")
    parser.add_argument("--out", help="folder for scores.json (optional)")
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = CNN()
    train(model, args.steps, g)
    model.eval()
    x, y = make_data(args.batch, g)
    with torch.no_grad():
        pred = model(x).argmax(1)
    print(f"accuracy on the batch: {(pred == y).float().mean().item():.2%}")
    scores: dict[str, float] = {}

    # 1. Captum's interface.
    lrp = DynamicLRP(model, rules="captum")
    attributions, delta = lrp.attribute(x, target=pred, return_convergence_delta=True)
    print(
        f"DynamicLRP.attribute: attributions {tuple(attributions.shape)}, convergence delta per "
        "example (logit - summed relevance = the biases' share):"
    )
    print("  " + " ".join(f"{d:+.4f}" for d in delta.tolist()))
    print(f"books residual of the batch: {lrp.report.residual:.2g}")

    # 2. Against Captum itself, in float64 (Captum's LRP changes the model's modules while it
    #    runs, so it gets a copy).
    try:
        from captum.attr import LRP as CaptumLRP
    except ImportError:
        print("captum is not installed: comparison skipped")
    else:
        model64, x64 = CNN().double().eval(), x.double()
        model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        ours = DynamicLRP(model64, rules="captum").attribute(x64, target=pred)
        theirs = CaptumLRP(model64).attribute(x64.clone().requires_grad_(True), target=pred)
        diff = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        scores["captum_max_relative_difference"] = diff
        print(f"captum.attr.LRP vs DynamicLRP(rules='captum'): max relative difference {diff:.1e}")

    # 3. Quantus metrics with dynamiclrp as explain_func.
    try:
        import quantus
    except ImportError:
        print("quantus is not installed: metrics skipped")
    else:
        x_np, y_np = x.numpy(), pred.numpy()
        a_lrp = quantus_explain_func(model, x_np, y_np, rules="epsilon")
        a_random = np.random.default_rng(0).standard_normal(a_lrp.shape).astype(np.float32)
        for name, metric in (
            (
                "FaithfulnessCorrelation",
                lambda: quantus.FaithfulnessCorrelation(
                    nr_runs=20,
                    subset_size=16,
                    perturb_baseline="black",
                    return_aggregate=True,
                    disable_warnings=True,
                    display_progressbar=False,
                ),
            ),
            (
                "Sparseness",
                lambda: quantus.Sparseness(
                    return_aggregate=True, disable_warnings=True, display_progressbar=False
                ),
            ),
        ):
            for source, a in (("dynamiclrp", a_lrp), ("random", a_random)):
                np.random.seed(0)  # Quantus draws its random subsets from numpy's global state
                value = metric()(model=model, x_batch=x_np, y_batch=y_np, a_batch=a, device="cpu")
                scores[f"{name}/{source}"] = float(np.mean(value))
                print(f"quantus {name:<24} {source:<10} {float(np.mean(value)):+.4f}")
        # explain_func: Quantus calls dynamiclrp itself (here with the epsilon preset)
        np.random.seed(0)
        via = quantus.Sparseness(
            return_aggregate=True, disable_warnings=True, display_progressbar=False
        )(
            model=model,
            x_batch=x_np,
            y_batch=y_np,
            explain_func=quantus_explain_func,
            explain_func_kwargs={"rules": "epsilon"},
            device="cpu",
        )
        print(f"quantus Sparseness via explain_func   {float(np.mean(via)):+.4f}")

    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "scores.json"
        path.write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
