"""dynamiclrp.viz: colours from hand-computed formulas and matplotlib, PNG decoded independently,
HTML parsed with the standard library, terminal escape codes spelled out."""

from __future__ import annotations

import struct
import zlib
from html.parser import HTMLParser

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import torch
from PIL import Image

import dynamiclrp.visualize
from dynamiclrp import viz
from dynamiclrp.errors import DynamicLRPError
from dynamiclrp.viz import (
    VisualizationError,
    colorize,
    heatmap,
    image_grid,
    image_heatmap,
    overlay,
    save_html,
    save_png,
    token_html,
    token_terminal,
)

# --------------------------------------------------------------------------------------------
# colours
# --------------------------------------------------------------------------------------------

# Hand-computed bytes floor(255 * c + 0.5) at R = 0, +-max, +-max/2, +max/4 and +3max/4.
EXPECTED = {
    "bwr": {
        0.0: (255, 255, 255),
        1.0: (255, 0, 0),
        -1.0: (0, 0, 255),
        0.5: (255, 128, 128),  # 1 - 0.5 = 0.5 -> 127.5 -> 128
        -0.5: (128, 128, 255),
        0.25: (255, 191, 191),  # 0.75 * 255 = 191.25
        0.75: (255, 64, 64),  # 0.25 * 255 = 63.75
    },
    "seismic": {
        0.0: (255, 255, 255),
        1.0: (128, 0, 0),  # dark red (0.5, 0, 0)
        -1.0: (0, 0, 128),
        0.5: (255, 0, 0),
        -0.5: (0, 0, 255),
        0.25: (255, 128, 128),  # halfway white -> red
        0.75: (191, 0, 0),  # halfway red -> dark red: 0.75 * 255
    },
    "coldnhot": {
        0.0: (0, 0, 0),
        1.0: (255, 255, 0),  # yellow
        -1.0: (0, 255, 255),  # cyan
        0.5: (255, 0, 0),
        -0.5: (0, 0, 255),
        0.25: (128, 0, 0),  # halfway black -> red
        0.75: (255, 128, 0),  # halfway red -> yellow
    },
}


@pytest.mark.parametrize("cmap", sorted(EXPECTED))
def test_known_relevance_gives_known_colours(cmap):
    fractions = list(EXPECTED[cmap])
    scale = 3.0  # the largest |R| is 3: R = fraction * 3
    rel = torch.tensor([fractions]) * scale
    img = image_heatmap(rel, cmap=cmap)
    assert img.dtype == np.uint8 and img.shape == (1, len(fractions), 3)
    for k, f in enumerate(fractions):
        assert tuple(img[0, k].tolist()) == EXPECTED[cmap][f], (cmap, f)
    assert colorize(np.array(fractions), cmap).tolist() == [
        list(EXPECTED[cmap][f]) for f in fractions
    ]


@pytest.mark.parametrize("name,lowest", [("bwr", -1.0), ("seismic", -0.5)])
def test_colours_match_matplotlib_within_rounding(name, lowest):
    # matplotlib's bwr is the same blue-white-red line; its seismic equals ours from -0.5 up
    # (its negative end is (0, 0, 0.3) where ours is the symmetric (0, 0, 0.5)).
    n = 2049
    lut = matplotlib.colormaps[name].resampled(n)(np.arange(n))[:, :3]  # entry i at t = i/1024 - 1
    t = np.arange(n) / 1024.0 - 1.0
    keep = t >= lowest
    ours = colorize(t[keep], name).astype(float)
    assert np.abs(ours - 255.0 * lut[keep]).max() <= 0.5 + 1e-9


@pytest.mark.parametrize("cmap", sorted(EXPECTED))
def test_negating_relevance_mirrors_colours(cmap):
    g = torch.Generator().manual_seed(0)
    rel = torch.randint(-64, 65, (3, 9, 7), generator=g).double() / 64  # exact dyadic values
    rel[:, 0, :3] = 0.0
    pos, neg = image_heatmap(rel, cmap=cmap), image_heatmap(-rel, cmap=cmap)
    np.testing.assert_array_equal(neg, pos[..., ::-1])  # red and blue swap, green stays
    r = rel.sum(0)
    white_or_black = (255, 255, 255) if cmap != "coldnhot" else (0, 0, 0)
    zero = (r == 0).numpy()
    assert zero.any() and (pos[zero] == white_or_black).all()


def test_scale_is_max_abs_and_zero_is_centre_colour():
    # the scale is max |R| whatever the sign: here the negative value sets it
    img = heatmap(np.array([[-4.0, 2.0, 0.0]]))
    assert img[0].tolist() == [[0, 0, 255], [255, 128, 128], [255, 255, 255]]
    assert (heatmap(torch.zeros(3, 4, 5)) == 255).all()  # all-zero relevance: all white
    assert (heatmap(torch.zeros(4, 5), cmap="coldnhot") == 0).all()


def test_clip_percentile_scales_by_the_percentile():
    # |R| = 1, 2, 3, 4: numpy's linear 50th percentile is 2.5 -> t = 0.4, 0.8, 1 (clipped), -1
    rel = np.array([[1.0, 2.0], [3.0, -4.0]])
    img = heatmap(rel, clip_percentile=50)
    assert img.reshape(-1, 3).tolist() == [[255, 153, 153], [255, 51, 51], [255, 0, 0], [0, 0, 255]]
    assert (heatmap(rel, clip_percentile=100) == heatmap(rel)).all()
    with pytest.raises(VisualizationError, match="percentile of \\|relevance\\| is 0"):
        heatmap(np.array([[0.0, 0.0, 0.0, 5.0]]), clip_percentile=50)
    with pytest.raises(VisualizationError, match="clip_percentile must be in"):
        heatmap(rel, clip_percentile=0)


def test_channels_batches_dtypes_and_layouts():
    g = torch.Generator().manual_seed(1)
    rel = torch.randn(2, 3, 4, 5, generator=g)
    batch = image_heatmap(rel)
    assert isinstance(batch, list) and len(batch) == 2
    for k in range(2):  # each sample on its own scale, channels summed
        np.testing.assert_array_equal(batch[k], heatmap(rel[k].sum(0)))
        np.testing.assert_array_equal(batch[k], heatmap(rel[k].numpy()))
    hwc = rel[0].permute(1, 2, 0)
    np.testing.assert_array_equal(image_heatmap(hwc, channel_axis=-1), batch[0])
    # half-precision tensors are accepted and read in double
    half = torch.tensor([[2.0, -1.0]], dtype=torch.bfloat16)
    assert heatmap(half).tolist() == [[[255, 0, 0], [128, 128, 255]]]


def test_bad_heatmap_inputs_are_named():
    with pytest.raises(VisualizationError, match="image_heatmap needs"):
        image_heatmap(torch.zeros(5))
    with pytest.raises(VisualizationError, match="heatmap needs"):
        heatmap(torch.zeros(2, 2, 2, 2))
    with pytest.raises(VisualizationError, match="channel_axis=None"):
        heatmap(torch.zeros(3, 2, 2), channel_axis=None)
    with pytest.raises(VisualizationError, match="NaN/Inf"):
        heatmap(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(VisualizationError, match="unknown colour map 'jet'"):
        heatmap(torch.ones(2, 2), cmap="jet")
    assert issubclass(VisualizationError, DynamicLRPError)
    assert issubclass(VisualizationError, ValueError)


# --------------------------------------------------------------------------------------------
# overlay
# --------------------------------------------------------------------------------------------


def test_overlay_formula_on_hand_computed_pixels():
    image = np.array([[[200, 100, 50], [200, 100, 50]]], dtype=np.uint8)  # (1, 2, 3) HWC
    rel = np.array([[3.0, 0.0]])
    # gray = (0.299*200 + 0.587*100 + 0.114*50) / 255 = 124.2 / 255; alpha = 0.5
    # pixel 0 heat red (1, 0, 0): R = 127.5 + 62.1 = 189.6 -> 190, G = B = 62.1 -> 62
    # pixel 1 heat white: 189.6 -> 190 on every channel
    out = overlay(image, rel, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3)
    assert out.tolist() == [[[190, 62, 62], [190, 190, 190]]]
    # the same image as float CHW tensor gives the same result
    chw = torch.tensor(image, dtype=torch.float64).permute(2, 0, 1) / 255
    np.testing.assert_array_equal(overlay(chw, torch.tensor(rel)), out)


def test_overlay_of_a_grayscale_image():
    image = np.full((2, 3), 0.4)
    rel = np.zeros((2, 3))
    rel[1, 2] = -1.0
    # alpha 0.25, heat blue (0, 0, 1): R = G = 0.75*0.4 = 0.3 -> 76.5 -> 77, B = 0.55 -> 140.25
    out = overlay(image, rel, alpha=0.25)
    assert out[1, 2].tolist() == [77, 77, 140]
    # elsewhere heat is white: 0.25 + 0.3 = 0.55 -> 140 on every channel
    assert out[0, 0].tolist() == [140, 140, 140]
    np.testing.assert_array_equal(overlay(image[None], rel, alpha=0.25), out)  # (1, H, W)
    np.testing.assert_array_equal(overlay(image[..., None], rel, alpha=0.25), out)  # (H, W, 1)
    assert (overlay(image, rel, alpha=0.0) == 102).all()  # 0.4 * 255 = 102: the image alone
    np.testing.assert_array_equal(overlay(image, rel, alpha=1.0), heatmap(rel))


def test_overlay_rejects_bad_images():
    rel = np.ones((4, 5))
    with pytest.raises(VisualizationError, match="float image in \\[0, 1\\]"):
        overlay(np.full((4, 5, 3), 2.0), rel)
    with pytest.raises(VisualizationError, match="dtype int16"):
        overlay(np.zeros((4, 5, 3), np.int16), rel)
    with pytest.raises(VisualizationError, match="like the relevance"):
        overlay(np.zeros((4, 6, 3)), rel)
    with pytest.raises(VisualizationError, match="cannot tell"):
        overlay(np.zeros((3, 3, 3)), np.ones((3, 3)))
    with pytest.raises(VisualizationError, match="alpha in \\[0, 1\\]"):
        overlay(np.zeros((4, 5)), rel, alpha=1.5)


# --------------------------------------------------------------------------------------------
# grid
# --------------------------------------------------------------------------------------------


def test_grid_layout_and_padding():
    tiles = [np.full((2, 3, 3), 10 * (i + 1), np.uint8) for i in range(5)]
    grid = image_grid(tiles, ncols=3, pad=1, pad_value=7)
    # 2 rows x 3 columns: height 2*2 + 3*1 = 7, width 3*3 + 4*1 = 13
    assert grid.shape == (7, 13, 3) and grid.dtype == np.uint8
    expected = np.full((7, 13, 3), 7, np.uint8)
    for i in range(5):
        top, left = 1 + (i // 3) * 3, 1 + (i % 3) * 4
        expected[top : top + 2, left : left + 3] = 10 * (i + 1)
    np.testing.assert_array_equal(grid, expected)  # the sixth cell stays pad_value
    # default columns: ceil(sqrt(5)) = 3; default pad 2 and white
    assert image_grid(tiles).shape == (2 * 2 + 3 * 2, 3 * 3 + 4 * 2, 3)
    assert image_grid(tiles)[0, 0].tolist() == [255, 255, 255]
    # grayscale tiles, a stacked array, an RGB pad colour
    gray = image_grid(np.zeros((4, 2, 2), np.uint8), ncols=4, pad=0)
    assert gray.shape == (2, 8)
    rgb = image_grid(tiles[:1], pad=1, pad_value=(1, 2, 3))
    assert rgb[0, 0].tolist() == [1, 2, 3] and rgb.shape == (4, 5, 3)


def test_grid_rejects_mixed_or_bad_tiles():
    with pytest.raises(VisualizationError, match="one shape"):
        image_grid([np.zeros((2, 2, 3), np.uint8), np.zeros((2, 3, 3), np.uint8)])
    with pytest.raises(VisualizationError, match="uint8"):
        image_grid([np.zeros((2, 2, 3))])
    with pytest.raises(VisualizationError, match="no images"):
        image_grid([])
    with pytest.raises(VisualizationError, match="pad_value"):
        image_grid([np.zeros((2, 2), np.uint8)], pad_value=(1, 2, 3))


# --------------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------------


def _decode_png(data: bytes) -> tuple[int, int, int, np.ndarray]:
    """A minimal independent PNG reader: chunks and CRCs checked, filter type 0 rows only."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, colour_type, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, comp, filt, interlace) == (8, 0, 0, 0)
    channels = {0: 1, 2: 3}[colour_type]
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + w * channels
    assert len(raw) == h * stride
    assert all(raw[y * stride] == 0 for y in range(h))
    pixels = np.frombuffer(
        b"".join(raw[y * stride + 1 : (y + 1) * stride] for y in range(h)), np.uint8
    )
    return w, h, colour_type, pixels.reshape(h, w, channels)


def test_png_round_trip_rgb(tmp_path):
    g = np.random.default_rng(0)
    img = g.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = save_png(img, tmp_path / "x.png", upscale=3)
    assert path == tmp_path / "x.png"
    w, h, colour_type, pixels = _decode_png(path.read_bytes())
    assert (w, h, colour_type) == (21, 15, 2)
    big = img.repeat(3, 0).repeat(3, 1)
    np.testing.assert_array_equal(pixels, big)
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), big)
    decoded = matplotlib.image.imread(path)  # float in [0, 1]
    np.testing.assert_array_equal(np.round(decoded[..., :3] * 255).astype(np.uint8), big)


def test_png_round_trip_grayscale(tmp_path):
    img = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    path = save_png(img, tmp_path / "g.png")
    w, h, colour_type, pixels = _decode_png(path.read_bytes())
    assert (w, h, colour_type) == (4, 3, 0)
    np.testing.assert_array_equal(pixels[..., 0], img)
    opened = Image.open(path)
    assert opened.mode == "L"
    np.testing.assert_array_equal(np.asarray(opened), img)
    save_png(img[..., None], tmp_path / "g1.png")  # (H, W, 1) is grayscale too
    assert (tmp_path / "g1.png").read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    "array,upscale,match",
    [
        (np.zeros((2, 2, 3)), 1, "uint8 array, got dtype float64"),
        (np.zeros((2, 2, 4), np.uint8), 1, "got shape \\(2, 2, 4\\)"),
        (np.zeros((2, 2, 3, 1), np.uint8), 1, "got shape"),
        (np.zeros((0, 2, 3), np.uint8), 1, "got shape"),
        (torch.zeros(2, 2, 3, dtype=torch.uint8), 1, "got a tensor"),
        (np.zeros((2, 2, 3), np.uint8), 0, "upscale >= 1"),
        (np.zeros((2, 2, 3), np.uint8), 1.5, "upscale >= 1"),
    ],
)
def test_save_png_rejects_bad_arrays(tmp_path, array, upscale, match):
    with pytest.raises(VisualizationError, match=match):
        save_png(array, tmp_path / "bad.png", upscale=upscale)
    assert not (tmp_path / "bad.png").exists()


def test_visualize_is_a_compatibility_alias():
    assert dynamiclrp.visualize.heatmap is viz.heatmap
    assert dynamiclrp.visualize.save_png is viz.save_png


# --------------------------------------------------------------------------------------------
# token HTML
# --------------------------------------------------------------------------------------------


class _Page(HTMLParser):
    """Collects every tag, every token span (style, title, text) and the text of each row."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.spans, self.rows, self.legend_text = [], [], [], []
        self._span, self._row, self._legend = None, None, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "div" and a.get("class") == "row":
            self._row = []
        if tag == "div" and a.get("class") == "legend":
            self._legend = 1
        if tag == "span" and a.get("class") == "token":
            self._span = {"style": a["style"], "title": a["title"], "text": ""}

    def handle_endtag(self, tag):
        if tag == "span" and self._span is not None:
            self.spans.append(self._span)
            self._span = None
        if tag == "div" and self._row is not None:
            self.rows.append("".join(self._row))
            self._row = None
        if tag == "div" and self._legend:
            self._legend = 0

    def handle_data(self, data):
        if self._span is not None:
            self._span["text"] += data
        if self._row is not None:
            self._row.append(data)
        if self._legend:
            self.legend_text.append(data)


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    return page


EVIL = ["<script>alert(1)</script>", "\"&'", "<img src=x onerror=alert(2)>", "ok"]


def test_html_escapes_every_token_and_the_title():
    html = token_html(EVIL, [1.0, -0.5, 0.25, 0.0], title="<b>title</b> & 'quotes'")
    assert "<script" not in html.lower() and "<img" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&quot;&amp;&#x27;" in html
    assert "&lt;b&gt;title&lt;/b&gt; &amp; &#x27;quotes&#x27;" in html
    assert "\"&'" not in html and "<b>" not in html
    page = _parse(html)
    # the parser gets back exactly the tokens and the title: escaping is lossless
    assert [s["text"] for s in page.spans] == EVIL
    assert [s["title"].rsplit(": ", 1)[0] for s in page.spans] == EVIL
    assert {t for t, _ in page.tags} <= {
        "html",
        "head",
        "meta",
        "title",
        "body",
        "h1",
        "div",
        "span",
    }
    assert not any(k.startswith("on") or k in ("src", "href") for _, a in page.tags for k in a)
    # self-contained: no scripts, links, images, imports or URLs outside the (escaped) tokens
    plain = token_html(["a", "b"], [1.0, -1.0], title="t")
    for needle in ("<script", "<link", "<img", "src=", "href=", "@import", "url(", "http"):
        assert needle not in plain.lower()


def test_html_colours_tooltips_and_legend():
    tokens, scores = ["a", "b", "c", "d", "e"], [2.0, -2.0, 1.0, -1.0, 0.0]
    page = _parse(token_html(tokens, scores))
    backgrounds = [s["style"].split("background-color:")[1].split(";")[0] for s in page.spans]
    assert backgrounds == [
        "rgb(255,0,0)",
        "rgb(0,0,255)",
        "rgb(255,128,128)",
        "rgb(128,128,255)",
        "rgb(255,255,255)",
    ]
    assert [float(s["title"].rsplit(": ", 1)[1]) for s in page.spans] == scores
    legend = "".join(page.legend_text)
    assert "-2" in legend and "+2" in legend
    bars = [a for t, a in page.tags if a.get("class") == "legend-bar"]
    assert len(bars) == 1 and "linear-gradient" in bars[0]["style"]
    assert "rgb(0,0,255) 0%" in bars[0]["style"] and "rgb(255,0,0) 100%" in bars[0]["style"]
    # a fixed scale: 2 / 4 is half red, 10 saturates; the legend shows the fixed scale
    page = _parse(token_html(["x", "y"], torch.tensor([2.0, 10.0]), normalise=4.0))
    assert "rgb(255,128,128)" in page.spans[0]["style"] and "rgb(255,0,0)" in page.spans[1]["style"]
    assert "+4" in "".join(page.legend_text)


def test_html_rows_share_one_scale():
    page = _parse(token_html([["a", "b"], ["c"]], [[2.0, 0.0], [1.0]]))
    assert len(page.rows) == 2
    assert "rgb(255,128,128)" in page.spans[2]["style"]  # 1 of a shared scale 2
    page = _parse(token_html([["a", "b"], ["c"]], torch.tensor([[2.0, 0.0]]).tolist() + [[1.0]]))
    assert len(page.spans) == 3


@pytest.mark.parametrize(
    "tokens,shown",
    [
        (["[CLS]", "un", "##believ", "##able", "film", "[SEP]"], "[CLS] unbelievable film [SEP]"),
        (["The", "Ġmovie", "Ġwas", "Ġgre", "at"], "The movie was great"),
        (["▁The", "▁mo", "vie", "▁!"], "The movie !"),
        (["##"], "##"),  # a bare marker is kept as text
    ],
)
def test_word_pieces_are_joined(tokens, shown):
    page = _parse(token_html(tokens, [0.0] * len(tokens)))
    assert page.rows == [shown]
    assert [s["title"].rsplit(": ", 1)[0] for s in page.spans] == tokens  # verbatim in tooltips
    raw = _parse(token_html(tokens, [0.0] * len(tokens), word_pieces="none"))
    assert raw.rows == [" ".join(tokens)]


def test_bad_token_inputs_are_named(tmp_path):
    with pytest.raises(VisualizationError, match="2 tokens but scores of shape \\(3,\\)"):
        token_html(["a", "b"], [1.0, 2.0, 3.0])
    with pytest.raises(VisualizationError, match="token 1 of row 0 is a int"):
        token_html(["a", 5], [1.0, 2.0])
    with pytest.raises(VisualizationError, match="not one string"):
        token_html("ab", [1.0, 2.0])
    with pytest.raises(VisualizationError, match="NaN/Inf"):
        token_terminal(["a"], [float("inf")])
    with pytest.raises(VisualizationError, match="2 token rows but 1 score rows"):
        token_html([["a"], ["b"]], [[1.0]])
    with pytest.raises(VisualizationError, match="normalise must be"):
        token_html(["a"], [1.0], normalise="minmax")
    with pytest.raises(VisualizationError, match="positive"):
        token_html(["a"], [1.0], normalise=0.0)
    with pytest.raises(VisualizationError, match="needs a str"):
        save_html(b"<html>", tmp_path / "x.html")


def test_save_html_round_trip(tmp_path):
    html = token_html(["é", "ü"], [1.0, -1.0], title="ünïcode")
    path = save_html(html, tmp_path / "t.html")
    assert path.read_text(encoding="utf-8") == html
    assert '<meta charset="utf-8">' in html


# --------------------------------------------------------------------------------------------
# terminal
# --------------------------------------------------------------------------------------------


def test_terminal_ansi_colours():
    out = token_terminal(["good", "bad", "meh"], [0.5, -1.0, 0.0])
    lines = out.split("\n")
    assert len(lines) == 2  # one row and the legend
    # +0.5 of scale 1 -> (255, 128, 128), black text; -1 -> blue, white text; 0 -> white
    assert lines[0] == (
        "\x1b[48;2;255;128;128m\x1b[38;2;0;0;0mgood\x1b[0m "
        "\x1b[48;2;0;0;255m\x1b[38;2;255;255;255mbad\x1b[0m "
        "\x1b[48;2;255;255;255m\x1b[38;2;0;0;0mmeh\x1b[0m"
    )
    assert "\x1b[48;2;0;0;255m" in lines[1] and "\x1b[48;2;255;0;0m" in lines[1]
    assert "-1" in lines[1] and "+1" in lines[1]


def test_terminal_plain_mode_and_rows():
    out = token_terminal([["un", "##real"], ["Ġ"]], [[0.12, -0.5], [0.0]], color=False)
    assert "\x1b" not in out
    assert out.split("\n") == ["un[+0.12]real[-0.50]", "Ġ[+0.00]", "scale: ±0.5"]


def test_terminal_neutralises_control_characters():
    out = token_terminal(["\x1b[2J", "a\nb"], [1.0, 1.0])
    assert "\x1b[2J" not in out and "\\x1b[2J" in out
    assert "a\\nb" in out and out.count("\n") == 1  # the row and the legend only
