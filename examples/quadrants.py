"""The toy image task the examples train on: 16x16 noise with one bright 4x4 square; the label is
the quadrant holding the square, so a faithful explanation puts its positive relevance there.

Imported by the example scripts beside it (run them from anywhere: Python puts a script's own
folder on the path).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def quadrant_data(
    n: int, generator: torch.Generator, background: str = "noise"
) -> tuple[Tensor, Tensor]:
    """``n`` images ``(n, 1, 16, 16)`` and their labels (0-3, the square's quadrant).

    ``background="noise"``: ``0.1 * N(0, 1)`` with the square added (+1); ``"dim"``: images in
    ``[0, 1]``, ``0.3 * U(0, 1)`` with the square set to 1 (for rules that need input bounds)."""
    if background == "noise":
        x = 0.1 * torch.randn(n, 1, 16, 16, generator=generator)
    else:
        x = 0.3 * torch.rand(n, 1, 16, 16, generator=generator)
    labels = torch.randint(0, 4, (n,), generator=generator)
    for i, k in enumerate(labels.tolist()):
        r0, c0 = (k // 2) * 8, (k % 2) * 8
        r, c = torch.randint(0, 5, (2,), generator=generator).tolist()
        square = x[i, 0, r0 + r : r0 + r + 4, c0 + c : c0 + c + 4]
        if background == "noise":
            square += 1.0
        else:
            square.fill_(1.0)
    return x, labels


def train(
    model: nn.Module, steps: int, generator: torch.Generator, background: str = "noise"
) -> nn.Module:
    """Adam (lr 0.01) on batches of 64 for ``steps`` steps; returns the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x, y = quadrant_data(64, generator, background)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
