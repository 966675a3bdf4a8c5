"""Heatmap colours and the PNG writer."""

import struct
import zlib

import numpy as np
import pytest
import torch

from dynamiclrp.visualize import heatmap, save_png


def test_known_relevance_gives_known_colours():
    img = heatmap(torch.tensor([[2.0, -2.0], [0.0, 1.0]]))
    assert img.dtype == np.uint8 and img.shape == (2, 2, 3)
    assert img[0, 0].tolist() == [255, 0, 0]  # the largest positive value: red
    assert img[0, 1].tolist() == [0, 0, 255]  # the largest negative value: blue
    assert img[1, 0].tolist() == [255, 255, 255]  # zero: white
    assert img[1, 1].tolist() == [255, 128, 128]  # half the scale: light red


def test_channels_are_summed_and_zero_maps_to_white():
    rel = torch.zeros(3, 4, 5)
    assert (heatmap(rel) == 255).all()
    rel[0, 1, 2], rel[2, 1, 2] = 1.0, 1.0
    assert heatmap(rel)[1, 2].tolist() == [255, 0, 0]
    with pytest.raises(ValueError, match="heatmap needs"):
        heatmap(torch.zeros(2, 2, 2, 2))


def test_png_round_trip(tmp_path):
    img = heatmap(torch.tensor([[1.0, -1.0]]))
    path = save_png(img, tmp_path / "h.png", upscale=2)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (4, 2)
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4 : idat])[0]
    raw = zlib.decompress(data[idat + 4 : idat + 4 + length])
    rows = [raw[i * (1 + 12) + 1 : (i + 1) * (1 + 12)] for i in range(2)]
    assert rows[0] == bytes([255, 0, 0] * 2 + [0, 0, 255] * 2) == rows[1]
