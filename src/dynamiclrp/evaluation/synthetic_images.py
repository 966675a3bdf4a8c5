"""Image data for the faithfulness benchmark: synthetic shapes with known evidence, and digits.

:func:`make_shapes` draws RGB images in which the class is the shape of the one *target*
object, the only object in the target colour (red), among distractor objects of every shape in
other colours, on a cluttered grey background crossed by coloured lines.  Its mask of the target
object's pixels is a ground truth of what decides the label.

:func:`load_digits_32` is scikit-learn's 8x8 digits, upsampled to 32x32.

Shapes, for an object of centre ``(cx, cy)`` and radius ``r`` (pixel centres at integer
coordinates; ``dx = x - cx``, ``dy = y - cy``):

==========  ==========================================================================
square      ``max(|dx|, |dy|) <= 0.85 r``
circle      ``dx^2 + dy^2 <= r^2``
triangle    ``-r <= dy <= r`` and ``|dx| <= (dy + r) / 2`` (apex up, base ``2r`` wide)
cross       ``min(|dx|, |dy|) <= r / 3`` and ``max(|dx|, |dy|) <= r`` (a plus sign)
==========  ==========================================================================
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
"""The shapes :func:`make_shapes` can draw, in the order of their default class index."""

TARGET_HUE = 0.0
"""Hue of the target colour (red), in turns (0..1)."""

DISTRACTOR_HUES = (45 / 360, 315 / 360)
"""Hues of distractors and lines: from orange-yellow through green and blue to magenta."""


def is_target_colour(images: Tensor) -> Tensor:
    """Which pixels of ``(N, 3, H, W)`` images are in the target colour: ``R > 0.6``,
    ``G < 0.35`` and ``B < 0.35``.  Returns ``(N, H, W)`` bool.

    Target objects always satisfy it; distractors, lines and the grey background never do.
    """
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    return (r > 0.6) & (g < 0.35) & (b < 0.35)


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """RGB of hue ``h`` (turns, 0..1), saturation ``s`` and value ``v``, stacked on a new last
    axis: ``c_k = v - v s max(0, min(k', 4 - k', 1))`` with ``k' = (k + 6h) mod 6`` and
    ``k = 5, 3, 1`` for R, G, B (the standard formula)."""
    out = []
    for k in (5.0, 3.0, 1.0):
        kk = torch.remainder(k + 6.0 * h, 6.0)
        out.append(v - v * s * torch.clamp(torch.minimum(kk, 4.0 - kk), 0.0, 1.0))
    return torch.stack(out, -1)


def shape_mask(shape: Tensor, cx: Tensor, cy: Tensor, r: Tensor, size: int) -> Tensor:
    """``(n, size, size)`` bool masks of the shapes ``shape`` (indices into :data:`SHAPES`) of
    centres ``(cx, cy)`` and radii ``r`` (each ``(n,)``); the predicates are in the module
    docstring."""
    coords = torch.arange(size, dtype=torch.float32)
    dx = coords.view(1, 1, size) - cx.view(-1, 1, 1)
    dy = coords.view(1, size, 1) - cy.view(-1, 1, 1)
    rr = r.view(-1, 1, 1)
    adx, ady = dx.abs(), dy.abs()
    square = torch.maximum(adx, ady) <= 0.85 * rr
    circle = dx * dx + dy * dy <= rr * rr
    triangle = (dy >= -rr) & (dy <= rr) & (adx <= (dy + rr) / 2)
    cross = (torch.minimum(adx, ady) <= rr / 3) & (torch.maximum(adx, ady) <= rr)
    all_shapes = torch.stack([square, circle, triangle, cross], 1)  # (n, 4, H, W)
    return all_shapes[torch.arange(len(shape)), shape]


def _background(n: int, size: int, n_lines: int, gen: torch.Generator) -> Tensor:
    """Grey texture in ``[0.05, 0.55]`` (coarse noise upsampled plus fine noise) crossed by
    ``n_lines`` one-pixel lines of distractor colours per image."""
    coarse = torch.rand(n, 1, max(size // 4, 1), max(size // 4, 1), generator=gen)
    coarse = torch.nn.functional.interpolate(
        coarse, size=(size, size), mode="bilinear", align_corners=False
    )
    fine = torch.rand(n, 1, size, size, generator=gen)
    grey = 0.05 + 0.5 * (0.7 * coarse + 0.3 * fine)
    img = grey.expand(n, 3, size, size).clone()
    coords = torch.arange(size, dtype=torch.float32)
    for _ in range(n_lines):
        # A line through a random point at a random angle: pixels within 0.5 of it.
        px, py = (torch.rand(2, n, generator=gen) * size).unbind(0)
        angle = torch.rand(n, generator=gen) * math.pi
        dist = (coords.view(1, 1, size) - px.view(-1, 1, 1)) * torch.sin(angle).view(-1, 1, 1)
        dist = dist - (coords.view(1, size, 1) - py.view(-1, 1, 1)) * torch.cos(angle).view(
            -1, 1, 1
        )
        on = dist.abs() < 0.5
        colour = _distractor_colours(n, gen)
        img = torch.where(on.unsqueeze(1), colour.view(n, 3, 1, 1), img)
    return img


def _distractor_colours(n: int, gen: torch.Generator) -> Tensor:
    lo, hi = DISTRACTOR_HUES
    h = lo + (hi - lo) * torch.rand(n, generator=gen)
    s = 0.6 + 0.4 * torch.rand(n, generator=gen)
    v = 0.7 + 0.3 * torch.rand(n, generator=gen)
    return hsv_to_rgb(h, s, v)


def _target_colours(n: int, gen: torch.Generator) -> Tensor:
    h = TARGET_HUE + (torch.rand(n, generator=gen) - 0.5) * (20 / 360)
    s = 0.8 + 0.2 * torch.rand(n, generator=gen)
    v = 0.8 + 0.2 * torch.rand(n, generator=gen)
    return hsv_to_rgb(h, s, v)


def make_shapes(
    n: int,
    *,
    size: int = 32,
    seed: int,
    n_distractors: int = 3,
    n_lines: int = 3,
    classes: tuple[str, ...] = SHAPES,
    return_layout: bool = False,
) -> tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """Draw ``n`` images whose class is the shape of the one red object among distractors.

    Layout: the image is cut into a ``g x g`` grid of cells, ``g = ceil(sqrt(n_distractors + 1))``;
    the target and each distractor occupy distinct random cells, so objects never overlap.  An
    object's radius is uniform in ``[0.6 r_max, r_max]`` with ``r_max = cell / 2 - 1``, and its
    centre is uniform over the positions that keep it inside its cell.  Distractor shapes are
    uniform over ``classes`` (so every shape also appears as a distractor); their colours, and
    those of the lines, have hues in :data:`DISTRACTOR_HUES`, never the target's red.

    Parameters
    ----------
    n:
        Number of images.
    size:
        Height and width in pixels.
    seed:
        Seed of the generator that draws everything: the same seed gives the same images.
    n_distractors:
        Distractor objects per image.
    n_lines:
        Background lines per image.
    classes:
        Shape names (from :data:`SHAPES`) in class-index order; the label is the index of the
        target's shape in ``classes``.
    return_layout:
        Also return the drawing parameters: ``shape``, ``cx``, ``cy``, ``r``, ``colour`` of the
        target, each with a leading ``n`` axis, and ``distractor_shapes`` ``(n, n_distractors)``;
        shapes as indices into :data:`SHAPES`.

    Returns
    -------
    images:
        ``(n, 3, size, size)`` float32 in ``[0, 1]``.
    labels:
        ``(n,)`` long, the target's class index, uniform over ``classes``.
    masks:
        ``(n, size, size)`` bool: exactly the target object's pixels.
    """
    unknown = [c for c in classes if c not in SHAPES]
    if unknown or len(set(classes)) != len(classes) or len(classes) < 2:
        raise ValueError(
            f"classes {classes!r} must be at least two distinct names from {SHAPES}"
            + (f"; unknown: {unknown}" if unknown else "")
        )
    if n < 1 or n_distractors < 0 or n_lines < 0:
        raise ValueError(
            f"need n >= 1, n_distractors >= 0, n_lines >= 0; got {n}, {n_distractors}, {n_lines}"
        )
    grid = math.ceil(math.sqrt(n_distractors + 1))
    cell = size / grid
    r_max = cell / 2 - 1
    if r_max < 3:
        raise ValueError(
            f"{n_distractors} distractors leave cells of {cell:.1f} pixels in a {size}x{size} "
            f"image, too small for a recognisable shape (radius {r_max:.1f} < 3); use a larger "
            "size or fewer distractors"
        )
    gen = torch.Generator().manual_seed(seed)
    class_shape = torch.tensor([SHAPES.index(c) for c in classes])

    images = _background(n, size, n_lines, gen)
    cells = torch.argsort(torch.rand(n, grid * grid, generator=gen), dim=1)[:, : n_distractors + 1]

    def place(k: int) -> tuple[Tensor, Tensor, Tensor]:
        r = r_max * (0.6 + 0.4 * torch.rand(n, generator=gen))
        row, col = cells[:, k] // grid, cells[:, k] % grid
        # centre inside [lo + r, lo + cell - r] in continuous pixel-edge coordinates, then
        # shifted by -0.5 to pixel-centre coordinates.
        u, v = torch.rand(2, n, generator=gen).unbind(0)
        cx = col * cell + r + u * (cell - 2 * r) - 0.5
        cy = row * cell + r + v * (cell - 2 * r) - 0.5
        return cx, cy, r

    labels = torch.randint(len(classes), (n,), generator=gen)
    t_shape = class_shape[labels]
    t_cx, t_cy, t_r = place(0)
    t_colour = _target_colours(n, gen)
    d_shapes = []
    for k in range(1, n_distractors + 1):
        shape = class_shape[torch.randint(len(classes), (n,), generator=gen)]
        d_shapes.append(shape)
        cx, cy, r = place(k)
        colour = _distractor_colours(n, gen)
        m = shape_mask(shape, cx, cy, r, size)
        images = torch.where(m.unsqueeze(1), colour.view(n, 3, 1, 1), images)
    masks = shape_mask(t_shape, t_cx, t_cy, t_r, size)
    images = torch.where(masks.unsqueeze(1), t_colour.view(n, 3, 1, 1), images)
    images = images.clamp(0.0, 1.0).contiguous()
    if return_layout:
        layout = {"shape": t_shape, "cx": t_cx, "cy": t_cy, "r": t_r, "colour": t_colour}
        layout["distractor_shapes"] = (
            torch.stack(d_shapes, 1) if d_shapes else torch.zeros(n, 0, dtype=torch.long)
        )
        return images, labels, masks, layout
    return images, labels, masks


def load_digits_32(
    *, seed: int, test_fraction: float = 0.25
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits (1797 8x8 images, 10 classes) upsampled to ``(1, 32, 32)``.

    Each image is scaled to ``[0, 1]`` (divided by 16), upsampled bilinearly
    (``align_corners=False``) and standardised with the training set's pixel mean ``m`` and
    standard deviation ``s``: ``x' = (x - m) / s``.  The rows are split by a permutation drawn
    from a generator seeded with ``seed``: the last ``round(test_fraction * 1797)`` rows of it
    are the test set.

    Returns
    -------
    X_train, y_train, X_test, y_test:
        float32 ``(n, 1, 32, 32)`` images and long ``(n,)`` labels.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("load_digits_32 needs scikit-learn (pip install scikit-learn)") from err
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(y))
    train, test = perm[: len(y) - n_test], perm[len(y) - n_test :]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train].contiguous(), y[train], x[test].contiguous(), y[test]
