"""Zoo entries built with torchvision and plain ``torch.nn`` (random weights)."""

from __future__ import annotations

from .zoo import ZooEntry, register  # noqa: F401
