"""Show relevance without plotting dependencies: heatmaps, overlays, grids, PNG, HTML and ANSI text.

Only numpy and zlib are used (no matplotlib, no PIL); torch tensors are accepted duck-typed.

Colours
-------
Relevance ``R`` is first normalised symmetrically around zero: ``t = clip(R / s, -1, 1)`` with the
scale ``s = max |R|`` (or, with ``clip_percentile=p``, the ``p``-th percentile of ``|R|``, so a few
extreme values do not wash out the rest; values beyond it saturate).  Zero relevance is always the
centre colour and ``R`` and ``-R`` get mirrored colours.  ``t`` is then mapped by a diverging colour
map, a small lookup table of anchor colours at fixed ``t`` with exact linear interpolation between
neighbouring anchors (:data:`CMAPS`):

``"bwr"`` (default)
    ``t=-1`` blue ``(0, 0, 1)``, ``t=0`` white ``(1, 1, 1)``, ``t=+1`` red ``(1, 0, 0)``; so
    ``t >= 0 -> (1, 1 - t, 1 - t)`` and ``t < 0 -> (1 + t, 1 + t, 1)``.
``"seismic"``
    like matplotlib's ``seismic`` but symmetric: ``t=-1`` dark blue ``(0, 0, 0.5)``, ``-0.5`` blue,
    ``0`` white, ``+0.5`` red, ``+1`` dark red ``(0.5, 0, 0)``.
``"coldnhot"``
    centred on black, like zennit's ``coldnhot`` (without its white end): ``t=-1`` cyan
    ``(0, 1, 1)``, ``-0.5`` blue, ``0`` black, ``+0.5`` red, ``+1`` yellow ``(1, 1, 0)``.

Every map satisfies ``colour(-t) == colour(t)[::-1]`` (red and blue swap).  Colours in ``[0, 1]`` are
turned into bytes by ``floor(255 * c + 0.5)`` (round half up), so ``t = 0.5`` in ``"bwr"`` is
``(255, 128, 128)``.
"""

from __future__ import annotations

import html as _html
import math
import struct
import unicodedata
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DynamicLRPError

__all__ = [
    "CMAPS",
    "VisualizationError",
    "colorize",
    "heatmap",
    "image_grid",
    "image_heatmap",
    "normalise_symmetric",
    "overlay",
    "save_html",
    "save_png",
    "token_html",
    "token_terminal",
]


class VisualizationError(DynamicLRPError, ValueError):
    """An input to a visualisation function has the wrong shape, dtype, range or type."""


# name -> (anchor positions t in [-1, 1], anchor colours RGB in [0, 1]); linear in between.
CMAPS: dict[str, tuple[tuple[float, ...], tuple[tuple[float, float, float], ...]]] = {
    "bwr": ((-1.0, 0.0, 1.0), ((0.0, 0.0, 1.0), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0))),
    "seismic": (
        (-1.0, -0.5, 0.0, 0.5, 1.0),
        ((0.0, 0.0, 0.5), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0), (0.5, 0.0, 0.0)),
    ),
    "coldnhot": (
        (-1.0, -0.5, 0.0, 0.5, 1.0),
        ((0.0, 1.0, 1.0), (0.0, 0.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.0, 1.0, 0.0)),
    ),
}

# ITU-R BT.601 luma weights, used to desaturate images and to pick readable text colours.
_LUMA = np.array([0.299, 0.587, 0.114])


# --------------------------------------------------------------------------------------------
# numbers -> colours
# --------------------------------------------------------------------------------------------


def _as_float_array(x: Any, what: str) -> np.ndarray:
    """A float64 numpy copy of a numpy array, torch tensor (any device/dtype) or nested list."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.array(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VisualizationError(f"{what} must be numeric (array or tensor): {exc}") from exc
    return arr


def _check_cmap(cmap: str) -> None:
    if cmap not in CMAPS:
        raise VisualizationError(f"unknown colour map {cmap!r}; choose one of {sorted(CMAPS)}")


def _to_bytes(rgb: np.ndarray) -> np.ndarray:
    """Colours in [0, 1] -> uint8 by ``floor(255 * c + 0.5)`` (round half up)."""
    return np.floor(np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def colorize(t: Any, cmap: str = "bwr") -> np.ndarray:
    """Map normalised values ``t`` in ``[-1, 1]`` to uint8 RGB with a diverging colour map.

    Parameters
    ----------
    t:
        Array-like of any shape; values outside ``[-1, 1]`` are clipped.
    cmap:
        A name in :data:`CMAPS` (``"bwr"``, ``"seismic"``, ``"coldnhot"``).

    Returns
    -------
    numpy.ndarray
        ``t.shape + (3,)`` uint8.
    """
    _check_cmap(cmap)
    values = np.clip(_as_float_array(t, "t"), -1.0, 1.0)
    if not np.isfinite(values).all():
        raise VisualizationError("colorize got NaN values; normalise finite relevance first")
    positions, colours = CMAPS[cmap]
    table = np.asarray(colours)
    rgb = np.stack([np.interp(values, positions, table[:, k]) for k in range(3)], axis=-1)
    return _to_bytes(rgb)


def normalise_symmetric(
    relevance: Any, clip_percentile: float | None = None
) -> tuple[np.ndarray, float]:
    """Scale relevance into ``[-1, 1]`` symmetrically around zero.

    Parameters
    ----------
    relevance:
        Array-like or tensor of any shape, all values finite.
    clip_percentile:
        ``None``: the scale is ``max |R|``.  A number ``p`` in ``(0, 100]``: the scale is the
        ``p``-th percentile of ``|R|`` (linear interpolation, numpy's default) and larger values
        saturate at ``±1``.

    Returns
    -------
    (numpy.ndarray, float)
        ``clip(R / scale, -1, 1)`` and the scale; all zeros and scale ``0.0`` if ``R`` is all zero.
    """
    r = _as_float_array(relevance, "relevance")
    if r.size == 0:
        raise VisualizationError("relevance is empty; nothing to normalise")
    bad = int((~np.isfinite(r)).sum())
    if bad:
        raise VisualizationError(
            f"relevance holds {bad} NaN/Inf value(s) of {r.size}; a heatmap needs finite relevance "
            "(check the explanation for overflow or a non-finite input)"
        )
    magnitude = np.abs(r)
    peak = float(magnitude.max())
    if clip_percentile is None:
        scale = peak
    else:
        if not 0.0 < float(clip_percentile) <= 100.0:
            raise VisualizationError(
                f"clip_percentile must be in (0, 100], got {clip_percentile!r}"
            )
        scale = float(np.percentile(magnitude, clip_percentile))
        if scale == 0.0 and peak > 0.0:
            raise VisualizationError(
                f"the {clip_percentile}th percentile of |relevance| is 0 while the maximum is "
                f"{peak:.4g} (sparse relevance); use a higher clip_percentile or None"
            )
    if scale == 0.0:
        return np.zeros_like(r), 0.0
    return np.clip(r / scale, -1.0, 1.0), scale


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def _single_heatmap(
    r: np.ndarray, channel_axis: int | None, cmap: str, clip_percentile: float | None, name: str
) -> np.ndarray:
    if r.ndim == 3:
        if channel_axis is None:
            raise VisualizationError(
                f"{name} got a 3-D relevance of shape {r.shape} with channel_axis=None; pass the "
                "axis to sum over (0 for (C, H, W), -1 for (H, W, C))"
            )
        r = r.sum(axis=channel_axis)
    if r.ndim != 2 or 0 in r.shape:
        raise VisualizationError(
            f"{name} needs a (C, H, W) or (H, W) relevance, got shape {tuple(r.shape)}"
        )
    t, _ = normalise_symmetric(r, clip_percentile)
    return colorize(t, cmap)


def image_heatmap(
    relevance: Any,
    channel_axis: int | None = 0,
    cmap: str = "bwr",
    *,
    clip_percentile: float | None = None,
) -> np.ndarray | list[np.ndarray]:
    """Colour image relevance as an ``(H, W, 3)`` uint8 heatmap, symmetric around zero.

    Parameters
    ----------
    relevance:
        Tensor or array: ``(H, W)``; ``(C, H, W)``, summed over ``channel_axis`` (use ``-1`` for
        ``(H, W, C)``); or a batch ``(N, C, H, W)`` where ``channel_axis`` refers to each sample.
    channel_axis:
        Axis of a single sample summed before colouring.
    cmap:
        A name in :data:`CMAPS`.
    clip_percentile:
        Scale by this percentile of ``|R|`` instead of its maximum (see :func:`normalise_symmetric`).

    Returns
    -------
    numpy.ndarray or list of numpy.ndarray
        One ``(H, W, 3)`` uint8 image, or a list of them for a batch; each image is normalised on
        its own scale.
    """
    _check_cmap(cmap)
    r = _as_float_array(relevance, "relevance")
    if r.ndim == 4:
        return [_single_heatmap(x, channel_axis, cmap, clip_percentile, "image_heatmap") for x in r]
    if r.ndim in (2, 3):
        return _single_heatmap(r, channel_axis, cmap, clip_percentile, "image_heatmap")
    raise VisualizationError(
        f"image_heatmap needs an (H, W), (C, H, W) or (N, C, H, W) relevance, got shape {r.shape}"
    )


def heatmap(
    relevance: Any,
    channel_axis: int | None = 0,
    cmap: str = "bwr",
    *,
    clip_percentile: float | None = None,
) -> np.ndarray:
    """One ``(H, W, 3)`` uint8 heatmap of a ``(C, H, W)`` or ``(H, W)`` relevance (no batches).

    The single-image form of :func:`image_heatmap` kept for ``dynamiclrp.visualize``: red for
    positive, blue for negative, white for zero in the default ``"bwr"`` map.
    """
    _check_cmap(cmap)
    r = _as_float_array(relevance, "relevance")
    if r.ndim not in (2, 3):
        raise VisualizationError(
            f"heatmap needs a (C, H, W) or (H, W) relevance, got shape {r.shape}; use "
            "image_heatmap for a batch (N, C, H, W)"
        )
    return _single_heatmap(r, channel_axis, cmap, clip_percentile, "heatmap")


def _image_to_rgb_float(image: Any, hw: tuple[int, int]) -> np.ndarray:
    """An image as ``(H, W, 3)`` float in [0, 1]; accepts (H, W), (C, H, W), (H, W, C), C in 1, 3."""
    if hasattr(image, "detach") and hasattr(image, "cpu"):
        image = image.detach().cpu().numpy()
    img = np.asarray(image)
    if img.dtype == np.uint8:
        img = img.astype(np.float64) / 255.0
    elif np.issubdtype(img.dtype, np.floating):
        img = img.astype(np.float64)
        if not np.isfinite(img).all() or img.min() < 0.0 or img.max() > 1.0:
            raise VisualizationError(
                f"overlay needs a float image in [0, 1] (or uint8), got values in "
                f"[{np.nanmin(img):.4g}, {np.nanmax(img):.4g}]; undo the input normalisation first"
            )
    else:
        raise VisualizationError(f"overlay needs a uint8 or float image, got dtype {img.dtype}")
    if img.ndim == 2:
        layout = "hw"
    elif img.ndim == 3:
        hwc = img.shape[:2] == hw and img.shape[2] in (1, 3)
        chw = img.shape[1:] == hw and img.shape[0] in (1, 3)
        if hwc and chw:
            raise VisualizationError(
                f"overlay cannot tell whether the image of shape {img.shape} is (C, H, W) or "
                "(H, W, C); transpose it to (H, W, C) with C != H"
            )
        layout = "hwc" if hwc else "chw" if chw else "bad"
    else:
        layout = "bad"
    if layout == "chw":
        img = np.moveaxis(img, 0, -1)
    if layout == "bad" or img.shape[:2] != hw:
        raise VisualizationError(
            f"overlay needs an image (H, W), (C, H, W) or (H, W, C) with C in (1, 3) and "
            f"(H, W) = {hw} like the relevance, got shape {np.asarray(image).shape}"
        )
    if img.ndim == 2:
        img = img[..., None]
    return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img


def overlay(
    image: Any,
    relevance: Any,
    alpha: float = 0.5,
    *,
    channel_axis: int | None = 0,
    cmap: str = "bwr",
    clip_percentile: float | None = None,
) -> np.ndarray:
    """Blend a relevance heatmap over a desaturated copy of the image.

    ``out = alpha * heat + (1 - alpha) * gray`` per channel in ``[0, 1]``, with ``heat`` the
    :func:`heatmap` colours ``/ 255`` and ``gray = 0.299 R + 0.587 G + 0.114 B`` (BT.601 luma of
    the image, repeated on all three channels; a grayscale image is its own gray); then bytes by
    ``floor(255 * out + 0.5)``.

    Parameters
    ----------
    image:
        ``(H, W)``, ``(C, H, W)`` or ``(H, W, C)`` with ``C`` in 1 or 3; uint8, or float in
        ``[0, 1]``; array or tensor.
    relevance:
        ``(C, H, W)`` or ``(H, W)`` relevance of the same height and width.
    alpha:
        Weight of the heatmap, in ``[0, 1]``.
    channel_axis, cmap, clip_percentile:
        As in :func:`heatmap`.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise VisualizationError(f"overlay needs alpha in [0, 1], got {alpha!r}")
    heat = heatmap(relevance, channel_axis, cmap, clip_percentile=clip_percentile)
    rgb = _image_to_rgb_float(image, heat.shape[:2])
    gray = (rgb @ _LUMA)[..., None]
    out = alpha * (heat.astype(np.float64) / 255.0) + (1.0 - alpha) * gray
    return _to_bytes(out)


def image_grid(
    images: Sequence[np.ndarray] | np.ndarray,
    ncols: int | None = None,
    pad: int = 2,
    pad_value: int | Sequence[int] = 255,
) -> np.ndarray:
    """Tile equally sized uint8 images into one image, row by row.

    Parameters
    ----------
    images:
        A list of ``(H, W, 3)`` or of ``(H, W)`` uint8 arrays (all the same shape), or one array
        ``(N, H, W, 3)`` / ``(N, H, W)``.
    ncols:
        Columns of the grid; default ``ceil(sqrt(N))``.  Rows: ``ceil(N / ncols)``.
    pad:
        Pixels of ``pad_value`` between the tiles and around the border.
    pad_value:
        Fill of the padding and of unused cells: an int, or an RGB triple for colour images.

    Returns
    -------
    numpy.ndarray
        uint8 of shape ``(rows * H + (rows + 1) * pad, ncols * W + (ncols + 1) * pad[, 3])``; tile
        ``i`` starts at row ``pad + (i // ncols) * (H + pad)``, column ``pad + (i % ncols) * (W + pad)``.
    """
    tiles = [np.asarray(x) for x in images]
    if not tiles:
        raise VisualizationError("image_grid got no images")
    shape = tiles[0].shape
    for i, tile in enumerate(tiles):
        if tile.dtype != np.uint8:
            raise VisualizationError(
                f"image_grid needs uint8 images, image {i} has dtype {tile.dtype}"
            )
        if tile.shape != shape:
            raise VisualizationError(
                f"image_grid needs images of one shape: image 0 is {shape}, image {i} is {tile.shape}"
            )
    if not (len(shape) == 2 or (len(shape) == 3 and shape[2] == 3)):
        raise VisualizationError(f"image_grid needs (H, W, 3) or (H, W) images, got {shape}")
    n = len(tiles)
    ncols = math.ceil(math.sqrt(n)) if ncols is None else int(ncols)
    if ncols < 1 or int(pad) < 0:
        raise VisualizationError(f"image_grid needs ncols >= 1 and pad >= 0, got {ncols}, {pad}")
    pad = int(pad)
    fill = np.asarray(pad_value)
    if fill.ndim > 1 or (fill.ndim == 1 and (len(shape) != 3 or fill.shape[0] != 3)):
        raise VisualizationError(
            f"pad_value must be an int (or an RGB triple for colour images), got {pad_value!r}"
        )
    if ((fill < 0) | (fill > 255)).any():
        raise VisualizationError(f"pad_value must lie in [0, 255], got {pad_value!r}")
    rows = math.ceil(n / ncols)
    h, w = shape[:2]
    grid = np.empty(
        (rows * h + (rows + 1) * pad, ncols * w + (ncols + 1) * pad) + shape[2:], np.uint8
    )
    grid[...] = fill.astype(np.uint8)
    for i, tile in enumerate(tiles):
        top, left = pad + (i // ncols) * (h + pad), pad + (i % ncols) * (w + pad)
        grid[top : top + h, left : left + w] = tile
    return grid


def save_png(array: np.ndarray, path: str | Path, upscale: int = 1) -> Path:
    """Write a uint8 image as an 8-bit PNG file (RGB or grayscale), enlarged by pixel repetition.

    Parameters
    ----------
    array:
        ``(H, W, 3)`` uint8 (RGB) or ``(H, W)`` / ``(H, W, 1)`` uint8 (grayscale).  Floats are
        refused rather than guessed at: use :func:`heatmap` or convert to uint8 yourself.
    path:
        File to write (its folder must exist).
    upscale:
        Positive int; each pixel becomes an ``upscale x upscale`` block (nearest neighbour).

    Returns
    -------
    pathlib.Path
        The path written.
    """
    if hasattr(array, "detach"):
        raise VisualizationError(
            "save_png needs a numpy uint8 image, got a tensor; colour it with heatmap() first"
        )
    img = np.asarray(array)
    if img.dtype != np.uint8:
        raise VisualizationError(
            f"save_png needs a uint8 array, got dtype {img.dtype}; scale to [0, 255] and "
            "convert with .astype(np.uint8) (heatmap() already returns uint8)"
        )
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)) or 0 in img.shape:
        raise VisualizationError(
            f"save_png needs an (H, W, 3) RGB or (H, W) grayscale array, got shape {img.shape}"
        )
    if isinstance(upscale, bool) or not isinstance(upscale, (int, np.integer)) or upscale < 1:
        raise VisualizationError(f"save_png needs an int upscale >= 1, got {upscale!r}")
    img = np.repeat(np.repeat(img, int(upscale), axis=0), int(upscale), axis=1)
    h, w = img.shape[:2]
    colour_type = 2 if img.ndim == 3 else 0
    rows = np.ascontiguousarray(img).reshape(h, -1)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
    path = Path(path)
    path.write_bytes(png + chunk(b"IEND", b""))
    return path


# --------------------------------------------------------------------------------------------
# tokens
# --------------------------------------------------------------------------------------------


def _token_rows(tokens: Any, scores: Any) -> tuple[list[list[str]], list[np.ndarray]]:
    """Tokens and scores as lists of rows, checked: strings, equal lengths, finite scores."""
    if isinstance(tokens, str):
        raise VisualizationError("tokens must be a list of strings (or of lists), not one string")
    token_list = list(tokens)
    nested = bool(token_list) and all(
        isinstance(t, (list, tuple)) for t in token_list
    )  # several rows
    token_rows = [list(t) for t in token_list] if nested else [token_list]
    if hasattr(scores, "detach") and hasattr(scores, "cpu"):
        scores = scores.detach().cpu().double().numpy()
    if nested:
        if len(scores) != len(token_rows):
            raise VisualizationError(
                f"{len(token_rows)} token rows but {len(scores)} score rows; give one score row "
                "per token row"
            )
        score_rows = [_as_float_array(s, f"scores of row {i}") for i, s in enumerate(scores)]
    else:
        score_rows = [_as_float_array(scores, "scores")]
    for i, (toks, sc) in enumerate(zip(token_rows, score_rows, strict=True)):
        for j, tok in enumerate(toks):
            if not isinstance(tok, str):
                raise VisualizationError(
                    f"token {j} of row {i} is a {type(tok).__name__}, not a str; pass strings "
                    "(e.g. tokenizer.convert_ids_to_tokens(ids))"
                )
        if sc.ndim != 1 or sc.shape[0] != len(toks):
            raise VisualizationError(
                f"row {i} has {len(toks)} tokens but scores of shape {sc.shape}; give one score "
                "per token"
            )
        if not np.isfinite(sc).all():
            raise VisualizationError(f"scores of row {i} hold NaN/Inf; token scores must be finite")
    return token_rows, score_rows


def _scale(score_rows: list[np.ndarray], normalise: str | float) -> float:
    if isinstance(normalise, str):
        if normalise != "max-abs":
            raise VisualizationError(
                f"normalise must be 'max-abs' or a positive number (a fixed scale), "
                f"got {normalise!r}"
            )
        return max((float(np.abs(s).max()) for s in score_rows if s.size), default=0.0)
    scale = float(normalise)
    if not (math.isfinite(scale) and scale > 0.0):
        raise VisualizationError(f"a fixed normalise scale must be positive, got {normalise!r}")
    return scale


def _word_pieces(tokens: list[str], mode: str) -> list[tuple[bool, str]]:
    """Per token: (starts a new word, text to show) under the word-piece convention ``mode``."""
    if mode == "none":
        return [(i > 0, tok) for i, tok in enumerate(tokens)]
    if mode != "auto":
        raise VisualizationError(f"word_pieces must be 'auto' or 'none', got {mode!r}")
    bpe = any(tok[:1] in ("Ġ", "▁") for tok in tokens)
    shown = []
    for i, tok in enumerate(tokens):
        if bpe:  # GPT-2 "Ġ" / SentencePiece "▁" mark a leading space; unmarked = continuation
            new_word = tok[:1] in ("Ġ", "▁")
            text = tok[1:] if new_word and len(tok) > 1 else tok
        elif tok.startswith("##") and len(tok) > 2:  # WordPiece: "##" marks a continuation
            new_word, text = False, tok[2:]
        else:
            new_word, text = True, tok
        shown.append((new_word and i > 0, text))
    return shown


def _text_colour(rgb: np.ndarray) -> tuple[int, int, int]:
    """Black text on light backgrounds, white on dark ones (BT.601 luma < 0.5)."""
    return (0, 0, 0) if float(rgb @ _LUMA) / 255.0 >= 0.5 else (255, 255, 255)


_ROW_STYLE = "margin:0.3em 0;line-height:1.9;"
_TOKEN_STYLE = "padding:0.1em 0.15em;border-radius:3px;white-space:pre-wrap;"


def token_html(
    tokens: Sequence[str] | Sequence[Sequence[str]],
    scores: Any,
    *,
    title: str | None = None,
    normalise: str | float = "max-abs",
    cmap: str = "bwr",
    word_pieces: str = "auto",
) -> str:
    """A self-contained HTML page colouring each token by its relevance.

    Inline CSS only: no scripts, no external resources.  Every token, the title and every
    attribute value are escaped with ``html.escape(..., quote=True)``.  Each token is a ``<span>``
    whose background is the diverging colour of ``score / scale`` and whose ``title`` attribute
    (tooltip) holds the numeric score; a legend shows the colour bar from ``-scale`` to ``+scale``.

    Parameters
    ----------
    tokens:
        A list of strings (one line) or a list of lists (one line per row).
    scores:
        Matching numbers: 1-D (or list of 1-D) array, list or tensor, all finite.
    title:
        Heading of the page (escaped).
    normalise:
        ``"max-abs"``: scale by the largest ``|score|`` over all rows (colours comparable across
        rows); a positive number: that fixed scale (larger scores saturate).
    cmap:
        A name in :data:`CMAPS`.
    word_pieces:
        ``"auto"``: if any token of a row starts with ``Ġ`` (GPT-2 BPE) or ``▁`` (SentencePiece),
        those markers mean "space before" and are dropped, and unmarked tokens join the previous
        one; otherwise a ``##`` prefix (WordPiece) is dropped and the piece joins the previous
        token, and all other tokens are separated by a space.  ``"none"``: tokens shown verbatim,
        separated by spaces.  The tooltip always shows the verbatim token.

    Returns
    -------
    str
        A complete HTML document.
    """
    _check_cmap(cmap)
    token_rows, score_rows = _token_rows(tokens, scores)
    scale = _scale(score_rows, normalise)
    esc = _html.escape
    lines = []
    for toks, sc in zip(token_rows, score_rows, strict=True):
        t = np.clip(sc / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(sc)
        colours = colorize(t, cmap)
        parts = []
        for (space, text), tok, score, rgb in zip(
            _word_pieces(toks, word_pieces), toks, sc, colours, strict=True
        ):
            fg = _text_colour(rgb)
            style = (
                f"background-color:rgb({rgb[0]},{rgb[1]},{rgb[2]});"
                f"color:rgb({fg[0]},{fg[1]},{fg[2]});{_TOKEN_STYLE}"
            )
            tip = f"{tok}: {score:+.6g}"
            parts.append(
                (" " if space else "") + f'<span class="token" style="{esc(style, quote=True)}" '
                f'title="{esc(tip, quote=True)}">{esc(text, quote=True)}</span>'
            )
        lines.append(f'<div class="row" style="{_ROW_STYLE}">{"".join(parts)}</div>')
    positions, anchor_colours = CMAPS[cmap]
    stops = ", ".join(
        f"rgb({r},{g},{b}) {100 * (p + 1) / 2:g}%"
        for p, (r, g, b) in zip(positions, _to_bytes(np.asarray(anchor_colours)), strict=True)
    )
    legend = (
        '<div class="legend" style="margin-top:1em;font-size:0.85em;display:flex;'
        'align-items:center;gap:0.5em;">'
        f'<span class="legend-min">{-scale:+.4g}</span>'
        f'<span class="legend-bar" style="display:inline-block;width:12em;height:0.9em;'
        f'border:1px solid #888;background:linear-gradient(to right, {stops});"></span>'
        f'<span class="legend-max">{scale:+.4g}</span>'
        f"<span>relevance (colour scale ±{scale:.4g}; hover a token for its score)</span></div>"
    )
    if title is not None and not isinstance(title, str):
        raise VisualizationError(f"title must be a str or None, got {type(title).__name__}")
    heading = f'<h1 style="font-size:1.2em;">{esc(title, quote=True)}</h1>' if title else ""
    page_title = esc(title, quote=True) if title else "dynamiclrp token relevance"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{page_title}</title>\n</head>\n"
        '<body style="font-family:sans-serif;max-width:60em;margin:1em auto;">\n'
        f"{heading}\n" + "\n".join(lines) + f"\n{legend}\n</body>\n</html>\n"
    )


def save_html(html: str, path: str | Path) -> Path:
    """Write an HTML string (e.g. from :func:`token_html`) as UTF-8; returns the path."""
    if not isinstance(html, str):
        raise VisualizationError(f"save_html needs a str, got {type(html).__name__}")
    path = Path(path)
    path.write_text(html, encoding="utf-8")
    return path


def _printable(text: str) -> str:
    """Control characters (ESC, newline, ...) as ``\\x..`` escapes so a token cannot drive the
    terminal."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) in ("Cc", "Cf")
        else ch
        for ch in text
    )


def token_terminal(
    tokens: Sequence[str] | Sequence[Sequence[str]],
    scores: Any,
    *,
    color: bool = True,
    normalise: str | float = "max-abs",
    cmap: str = "bwr",
    word_pieces: str = "auto",
) -> str:
    """Tokens coloured by relevance for a terminal, one line per row, then a legend line.

    With ``color=True`` each token is ``ESC[48;2;R;G;Bm`` (24-bit background) ``ESC[38;2;R;G;Bm``
    (black or white text) ``token ESC[0m``; with ``color=False`` each token is followed by its
    score, e.g. ``movie[+0.12]``.  Tokens are spaced as in :func:`token_html` (word pieces join
    their word: ``un[+0.10]believ[+0.20]able[+0.05]``).  Control characters in tokens are shown as ``\\x..`` escapes.
    ``normalise``, ``cmap`` and ``word_pieces`` are as in :func:`token_html`.
    """
    _check_cmap(cmap)
    token_rows, score_rows = _token_rows(tokens, scores)
    scale = _scale(score_rows, normalise)
    lines = []
    for toks, sc in zip(token_rows, score_rows, strict=True):
        t = np.clip(sc / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(sc)
        colours = colorize(t, cmap)
        parts = []
        for (space, text), score, rgb in zip(
            _word_pieces(toks, word_pieces), sc, colours, strict=True
        ):
            text = _printable(text)
            if color:
                fg = _text_colour(rgb)
                item = (
                    f"\x1b[48;2;{rgb[0]};{rgb[1]};{rgb[2]}m\x1b[38;2;{fg[0]};{fg[1]};{fg[2]}m"
                    f"{text}\x1b[0m"
                )
            else:
                item = f"{text}[{score:+.2f}]"
            parts.append((" " if space else "") + item)
        lines.append("".join(parts))
    if color:
        lo, hi = colorize(-1.0, cmap), colorize(1.0, cmap)
        lines.append(
            f"scale: \x1b[48;2;{lo[0]};{lo[1]};{lo[2]}m  \x1b[0m {-scale:+.4g} .. "
            f"{scale:+.4g} \x1b[48;2;{hi[0]};{hi[1]};{hi[2]}m  \x1b[0m"
        )
    else:
        lines.append(f"scale: ±{scale:.4g}")
    return "\n".join(lines)
