"""Heatmaps without plotting dependencies: relevance -> RGB -> PNG (numpy and zlib only)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch


def heatmap(relevance: torch.Tensor, channel_axis: int | None = 0) -> np.ndarray:
    """A ``(H, W, 3)`` uint8 image: red for positive, blue for negative relevance, white for 0.

    ``relevance`` is ``(C, H, W)`` (summed over ``channel_axis``) or ``(H, W)``; colours are scaled
    by the largest absolute value, so the map is symmetric around zero.
    """
    r = relevance.detach().double().cpu()
    if r.dim() == 3 and channel_axis is not None:
        r = r.sum(channel_axis)
    if r.dim() != 2:
        raise ValueError(f"heatmap needs a (C, H, W) or (H, W) tensor, got shape {tuple(r.shape)}")
    scale = float(r.abs().max())
    v = (r / scale).numpy() if scale > 0 else np.zeros(tuple(r.shape))
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    rgb = np.stack([1 - neg, 1 - pos - neg, 1 - pos], axis=-1)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: str | Path, upscale: int = 1) -> Path:
    """Write an ``(H, W, 3)`` uint8 array as a PNG file (nearest-neighbour ``upscale``)."""
    img = np.repeat(np.repeat(np.asarray(image, dtype=np.uint8), upscale, 0), upscale, 1)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"save_png needs an (H, W, 3) array, got shape {img.shape}")
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[row].tobytes() for row in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
    path = Path(path)
    path.write_bytes(png + chunk(b"IEND", b""))
    return path
