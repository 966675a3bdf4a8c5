"""The image data of the faithfulness benchmark: synthetic shapes with a known target object, and
the 32x32 digits.  Expected values come from numpy re-implementations of the drawing rules, from
:mod:`colorsys`, and from geometric properties of each shape."""

import colorsys

import numpy as np
import pytest
import torch

from dynamiclrp.evaluation.synthetic_images import (
    SHAPES,
    hsv_to_rgb,
    is_target_colour,
    load_digits_32,
    make_shapes,
)

N = 64


@pytest.fixture(scope="module")
def shapes():
    return make_shapes(N, seed=11, return_layout=True)


def _red(images):
    """The target colour, straight from the thresholds stated in the docs, in numpy."""
    a = images.numpy()
    return (a[:, 0] > 0.6) & (a[:, 1] < 0.35) & (a[:, 2] < 0.35)


def _numpy_shape(shape, cx, cy, r, size):
    """The shape predicates of the module docstring, for one object, in numpy."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = x - cx, y - cy
    adx, ady = np.abs(dx), np.abs(dy)
    name = SHAPES[shape]
    if name == "square":
        return np.maximum(adx, ady) <= 0.85 * r
    if name == "circle":
        return dx**2 + dy**2 <= r**2
    if name == "triangle":
        return (dy >= -r) & (dy <= r) & (adx <= (dy + r) / 2)
    return (np.minimum(adx, ady) <= r / 3) & (np.maximum(adx, ady) <= r)


def test_same_seed_same_images_other_seed_other_images():
    a = make_shapes(8, seed=5)
    b = make_shapes(8, seed=5)
    c = make_shapes(8, seed=6)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("size", [32, 48])
def test_shapes_and_dtypes(size):
    images, labels, masks = make_shapes(5, size=size, seed=0)
    assert images.shape == (5, 3, size, size) and images.dtype == torch.float32
    assert labels.shape == (5,) and labels.dtype == torch.long
    assert masks.shape == (5, size, size) and masks.dtype == torch.bool
    assert images.min() >= 0 and images.max() <= 1
    assert labels.min() >= 0 and labels.max() < len(SHAPES)


def test_mask_is_exactly_the_redrawn_target(shapes):
    images, labels, masks, layout = shapes
    for i in range(N):
        expected = _numpy_shape(
            int(layout["shape"][i]),
            float(layout["cx"][i]),
            float(layout["cy"][i]),
            float(layout["r"][i]),
            32,
        )
        assert expected.sum() > 0
        np.testing.assert_array_equal(masks[i].numpy(), expected)
        # and the target is drawn in its colour over all of its pixels
        pixels = images[i].numpy()[:, expected]  # (3, pixels of the target)
        colour = layout["colour"][i].numpy()[:, None]
        np.testing.assert_array_equal(pixels, np.broadcast_to(colour, pixels.shape))


def test_masks_are_the_only_target_coloured_pixels(shapes):
    images, _, masks, _ = shapes
    assert masks.sum((1, 2)).min() >= 10
    np.testing.assert_array_equal(_red(images), masks.numpy())
    assert torch.equal(is_target_colour(images), masks)


def test_no_distractor_colour_is_red_over_many_images():
    images, _, masks = make_shapes(2000, seed=3, n_distractors=3, n_lines=6)
    assert not _red(images)[~masks.numpy()].any()


def test_label_is_the_target_shape(shapes):
    _, labels, _, layout = shapes
    assert torch.equal(layout["shape"], labels)  # default classes are SHAPES in order
    images, labels, masks, layout = make_shapes(
        40, seed=2, classes=("cross", "circle"), return_layout=True
    )
    assert set(labels.tolist()) == {0, 1}
    names = [("cross", "circle")[k] for k in labels.tolist()]
    assert [SHAPES[k] for k in layout["shape"].tolist()] == names


def _geometry(mask):
    rows = np.where(mask.any(1))[0]
    cols = np.where(mask.any(0))[0]
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def test_each_label_has_the_geometry_of_its_shape():
    images, labels, masks = make_shapes(200, seed=4)
    seen = set()
    for label, mask in zip(labels.tolist(), masks.numpy(), strict=True):
        box = _geometry(mask)
        h, w = box.shape
        name = SHAPES[label]
        seen.add(name)
        if name == "square":
            assert box.all() and abs(h - w) <= 1
        elif name == "circle":
            assert not box[0, 0] and not box[-1, -1] and box.all(0).any() and box.all(1).any()
            assert 0.6 < box.mean() < 0.95  # pi/4 = 0.785 of the bounding box
        elif name == "triangle":
            widths = box.sum(1)
            assert (np.diff(widths) >= 0).all() and widths[0] < widths[-1]
        else:  # cross
            assert not box[0, 0] and not box[-1, -1] and not box[0, -1] and not box[-1, 0]
            assert box.all(0).any() and box.all(1).any()
    assert seen == set(SHAPES)


def test_distractors_come_in_every_shape():
    _, labels, _, layout = make_shapes(400, seed=8, n_distractors=3, return_layout=True)
    d = layout["distractor_shapes"]
    assert d.shape == (400, 3)
    for k in range(len(SHAPES)):
        # every shape is a distractor, also in images whose target has that same shape
        assert (d == k).any(1)[labels == k].any()
        assert 0.15 < (d == k).float().mean() < 0.35


def test_objects_do_not_overlap_so_each_distractor_is_visible():
    # 3x3 cells for 8 distractors in 48x48; every distractor adds distinct coloured pixels,
    # so the non-grey pixels outside the target cover more than 8 minimal shapes.
    images, _, masks = make_shapes(10, size=48, seed=1, n_distractors=8, n_lines=0)
    a = images.numpy()
    coloured = (a.max(1) - a.min(1)) > 0.1  # grey background has R = G = B
    outside = coloured & ~masks.numpy()
    assert (outside.sum((1, 2)) >= 8 * 10).all()


def test_no_lines_no_distractors_leaves_only_grey_and_target():
    images, _, masks = make_shapes(6, seed=9, n_distractors=0, n_lines=0)
    a = images.numpy()
    grey = (a[:, 0] == a[:, 1]) & (a[:, 1] == a[:, 2])
    np.testing.assert_array_equal(grey, ~masks.numpy())
    assert a[:, 0][~masks.numpy()].max() <= 0.55


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown"):
        make_shapes(2, seed=0, classes=("square", "star"))
    with pytest.raises(ValueError, match="too small"):
        make_shapes(2, seed=0, size=16, n_distractors=8)
    with pytest.raises(ValueError, match="n >= 1"):
        make_shapes(0, seed=0)


@pytest.mark.parametrize("h", [0.0, 0.05, 0.2, 0.45, 0.7, 0.875, 0.99])
def test_hsv_to_rgb_matches_colorsys(h):
    s, v = 0.7, 0.9
    got = hsv_to_rgb(torch.tensor([h]), torch.tensor([s]), torch.tensor([v]))[0]
    np.testing.assert_allclose(got.numpy(), colorsys.hsv_to_rgb(h, s, v), atol=1e-6)


def test_digits_loader():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    x_tr, y_tr, x_te, y_te = load_digits_32(seed=0)
    # round(0.25 * 1797) = round(449.25) = 449 test rows, 1797 - 449 = 1348 training rows
    assert x_tr.shape == (1348, 1, 32, 32) and x_te.shape == (449, 1, 32, 32)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.long
    assert abs(float(x_tr.mean())) < 1e-5 and abs(float(x_tr.std()) - 1) < 1e-5
    counts = np.bincount(load_digits().target, minlength=10)
    np.testing.assert_array_equal(
        np.bincount(np.concatenate([y_tr.numpy(), y_te.numpy()]), minlength=10), counts
    )
    again = load_digits_32(seed=0)
    assert torch.equal(again[2], x_te) and torch.equal(again[3], y_te)
    other = load_digits_32(seed=1)
    assert not torch.equal(other[3], y_te)
