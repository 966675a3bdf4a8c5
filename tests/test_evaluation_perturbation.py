"""Perturbation curves, AUC, ABPC: expected values computed by hand or with numpy."""

import numpy as np
import pytest
import torch

from dynamiclrp.evaluation.perturbation import (
    auc,
    feature_order,
    gaussian_blur,
    image_perturbation,
    token_perturbation,
)

W4 = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]], dtype=torch.float64)  # pixel weights 4,3,2,1


def linear_score(weights):
    """score = sum(w * x) per image."""
    return lambda batch, idx: (batch * weights).sum(dim=(1, 2, 3))


def linear_image(**kw):
    images = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    return image_perturbation(
        linear_score(W4), images, W4.clone(), replacement="zero", batch_size=3, **kw
    )


def test_linear_model_one_feature_per_step_gives_the_hand_computed_curves():
    res = linear_image(per_step=1)
    # MoRF removes 4,3,2,1: 10,6,3,1,0.  LeRF removes 1,2,3,4: 10,9,7,4,0.
    assert res.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert res.morf.tolist() == [[10.0, 6.0, 3.0, 1.0, 0.0]]
    assert res.lerf.tolist() == [[10.0, 9.0, 7.0, 4.0, 0.0]]
    # trapezoid: 0.25 * (8 + 4.5 + 2 + 0.5) = 3.75 and 0.25 * (9.5 + 8 + 5.5 + 2) = 6.25
    assert res.auc_morf.tolist() == [3.75]
    assert res.auc_lerf.tolist() == [6.25]
    assert res.original.tolist() == [10.0]
    assert res.abpc.tolist() == [2.5]
    assert res.comprehensiveness.tolist() == [6.25]
    assert res.sufficiency.tolist() == [3.75]
    assert res.n_features.tolist() == [4]


def test_steps_grid_rounds_counts_half_up():
    res = linear_image(steps=2)  # counts 0, 2, 4
    assert res.fractions.tolist() == [0.0, 0.5, 1.0]
    assert res.morf.tolist() == [[10.0, 3.0, 0.0]]
    assert res.lerf.tolist() == [[10.0, 7.0, 0.0]]
    assert res.auc_morf.tolist() == [4.0]  # 0.5 * (6.5 + 1.5)
    assert res.auc_lerf.tolist() == [6.0]  # 0.5 * (8.5 + 3.5)
    res = linear_image(steps=3)  # 4k/3 = 0, 1.33, 2.67, 4 -> counts 0, 1, 3, 4
    assert res.morf.tolist() == [[10.0, 6.0, 1.0, 0.0]]
    assert res.lerf.tolist() == [[10.0, 9.0, 4.0, 0.0]]
    assert res.auc_morf.item() == pytest.approx((8 + 3.5 + 0.5) / 3)
    assert res.auc_lerf.item() == pytest.approx((9.5 + 6.5 + 2) / 3)
    res = linear_image(steps=8)  # 4k/8 = 0, .5, 1, 1.5, ... -> counts 0, 1, 1, 2, 2, 3, 3, 4, 4
    assert res.morf.tolist() == [[10.0, 6.0, 6.0, 3.0, 3.0, 1.0, 1.0, 0.0, 0.0]]


def test_per_step_uses_the_actual_fraction_of_features_removed():
    res = linear_image(per_step=3)  # counts 0, 3, 4
    assert res.fractions.tolist() == [0.0, 0.75, 1.0]
    assert res.morf.tolist() == [[10.0, 1.0, 0.0]]
    assert res.lerf.tolist() == [[10.0, 4.0, 0.0]]
    assert res.auc_morf.item() == pytest.approx(0.75 * 5.5 + 0.25 * 0.5)
    assert res.auc_lerf.item() == pytest.approx(0.75 * 7.0 + 0.25 * 2.0)


def test_ties_are_broken_by_feature_index_in_both_orders():
    rel = torch.tensor([[1.0, 2.0, 2.0, 1.0]])
    assert feature_order(rel).tolist() == [[1, 2, 0, 3]]
    assert feature_order(rel, descending=False).tolist() == [[0, 3, 1, 2]]
    w = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    res = token_perturbation(
        lambda ids, idx: (ids * w).sum(1), torch.ones(1, 4, dtype=torch.long), rel, replacement_id=0
    )
    assert res.morf.tolist() == [[1111.0, 1101.0, 1001.0, 1000.0, 0.0]]
    assert res.lerf.tolist() == [[1111.0, 1110.0, 110.0, 100.0, 0.0]]


def test_unrankable_tokens_are_never_perturbed_and_do_not_count():
    w = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, 0.0])
    seen = []

    def score(ids, idx):
        seen.append(ids.clone())
        return (ids * w).sum(1).double()

    ids = torch.tensor([[1, 1, 1, 1, 7, 7]])
    rankable = torch.tensor([[True, True, True, True, False, False]])
    rel = torch.tensor([[4.0, 3.0, 2.0, 1.0, 1e9, float("nan")]])  # pads: huge, even NaN
    res = token_perturbation(score, ids, rel, replacement_id=0, rankable=rankable)
    assert all(bool((b[:, 4:] == 7).all()) for b in seen)
    plain = token_perturbation(
        lambda x, idx: (x * w[:4]).sum(1).double(),
        ids[:, :4],
        rel[:, :4],
        replacement_id=0,
    )
    assert res.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert res.morf.tolist() == [[10.0, 6.0, 3.0, 1.0, 0.0]]
    assert torch.equal(res.auc_morf, plain.auc_morf) and torch.equal(res.auc_lerf, plain.auc_lerf)
    assert res.n_features.tolist() == [4]


def test_samples_with_different_numbers_of_rankable_tokens_share_a_fraction_grid():
    ids = torch.ones(2, 4, dtype=torch.long)
    rankable = torch.tensor([[True] * 4, [True, True, False, False]])
    rel = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 0.0, 0.0]])
    weights = torch.tensor([[4.0, 3.0, 2.0, 1.0], [5.0, 7.0, 0.0, 0.0]])
    res = token_perturbation(
        lambda x, idx: (x * weights[idx]).sum(1), ids, rel, replacement_id=0, rankable=rankable
    )
    # sample 1: MoRF removes token 1 (w 7) then token 0 (w 5): 12, 5, 0 at x = 0, 1/2, 1;
    # interpolated onto the 4-step grid of sample 0: 12, 8.5, 5, 2.5, 0.
    assert res.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert res.morf[1].tolist() == [12.0, 8.5, 5.0, 2.5, 0.0]
    assert res.morf[0].tolist() == [10.0, 6.0, 3.0, 1.0, 0.0]
    assert res.auc_morf.tolist() == [3.75, 0.5 * (8.5 + 2.5)]
    assert res.auc_lerf[1].item() == 0.5 * (9.5 + 3.5)  # LeRF: 12, 7, 0
    assert res.n_features.tolist() == [4, 2]
    # a steps grid is common without interpolation: round(k * 2 / 4) = 0, 1, 1, 2, 2 for sample 1
    res = token_perturbation(
        lambda x, idx: (x * weights[idx]).sum(1),
        ids,
        rel,
        replacement_id=0,
        rankable=rankable,
        steps=4,
    )
    assert res.morf[1].tolist() == [12.0, 5.0, 5.0, 0.0, 0.0]
    assert res.auc_morf[1].item() == pytest.approx(0.25 * (8.5 + 5 + 2.5 + 0))


def test_patch_pooling_max_and_sum_rank_cells_differently():
    rel = torch.zeros(1, 4, 4)
    rel[0, 0, 0] = 5.0  # cell A (top left): max 5, sum 5
    rel[0, :2, 2:] = 2.0  # cell B (top right): max 2, sum 8
    rel[0, 2:, :2] = 0.1  # cell C (bottom left): max 0.1, sum 0.4; cell D: 0
    cell_w = torch.tensor([[1.0, 10.0], [100.0, 1000.0]]).repeat_interleave(2, 0)
    cell_w = cell_w.repeat_interleave(2, 1)
    score = linear_score(cell_w)
    images = torch.ones(1, 1, 4, 4)
    common = dict(patch=2, per_step=1, replacement="zero")
    by_max = image_perturbation(score, images, rel, patch_pool="max", **common)
    by_sum = image_perturbation(score, images, rel, patch_pool="sum", **common)
    assert by_max.morf.tolist() == [[4444.0, 4440.0, 4400.0, 4000.0, 0.0]]  # A, B, C, D
    assert by_sum.morf.tolist() == [[4444.0, 4404.0, 4400.0, 4000.0, 0.0]]  # B, A, C, D
    assert by_max.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def numpy_blur(img, k, sigma):
    """Direct 2-D correlation of a reflect-padded image with a hand-built Gaussian kernel."""
    n, c, h, w = img.shape
    ky, kx = min(k, 2 * h - 1), min(k, 2 * w - 1)

    def g(size):
        t = np.arange(size) - (size - 1) / 2
        v = np.exp(-(t**2) / (2 * sigma**2))
        return v / v.sum()

    kern = np.outer(g(ky), g(kx))
    pad = np.pad(img, ((0, 0), (0, 0), (ky // 2, ky // 2), (kx // 2, kx // 2)), mode="reflect")
    out = np.zeros_like(img)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = (pad[:, :, i : i + ky, j : j + kx] * kern).sum(axis=(2, 3))
    return out


@pytest.mark.parametrize("k,sigma", [(3, 1.0), (5, 0.7), (51, 20.0)])
def test_gaussian_blur_equals_a_direct_convolution(k, sigma):
    img = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = numpy_blur(img.numpy(), k, sigma)  # k = 51 is clipped to 9 x 11 here
    np.testing.assert_allclose(gaussian_blur(img, k, sigma).numpy(), expected, atol=1e-12)


def test_replacements_write_the_blurred_mean_zero_or_given_values():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 2, 4, 6, dtype=torch.float64, generator=gen)
    rel = torch.randn(2, 4, 6, dtype=torch.float64, generator=gen)
    given = torch.randn(2, 2, 4, 6, dtype=torch.float64, generator=gen)
    expected = {
        "blur": torch.from_numpy(numpy_blur(images.numpy(), 3, 1.5)),
        "mean": images.mean((2, 3), keepdim=True).expand_as(images),
        "zero": torch.zeros_like(images),
    }
    for name, target in [*expected.items(), ("tensor", given)]:
        seen = {}

        def score(batch, idx, seen=seen):
            for b, i in zip(batch, idx.tolist(), strict=True):
                seen.setdefault(i, []).append(b.clone())
            return batch.sum((1, 2, 3))

        repl = given if name == "tensor" else name
        image_perturbation(
            score, images, rel, steps=1, replacement=repl, blur_kernel=3, blur_sigma=1.5
        )
        for i in range(2):  # steps=1: the original and the fully replaced image
            assert torch.equal(seen[i][0], images[i])
            torch.testing.assert_close(seen[i][1], target[i], rtol=0, atol=1e-12)


def test_partial_replacement_touches_exactly_the_top_cells():
    images = torch.arange(16.0).reshape(1, 1, 4, 4)
    rel = torch.zeros(1, 4, 4)
    rel[0, 2:, 2:] = 1.0  # bottom right cell is the most relevant
    seen = []
    image_perturbation(
        lambda b, idx: seen.append(b.clone()) or b.sum((1, 2, 3)),
        images,
        rel,
        patch=2,
        per_step=1,
        replacement=torch.full_like(images, -1.0),
        batch_size=100,
    )
    first = next(b for b in torch.cat(seen) if (b == -1).sum() == 4)
    expected = images[0].clone()
    expected[0, 2:, 2:] = -1.0
    assert torch.equal(first, expected)


def batch_problem():
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(5, 3, 4, 4, dtype=torch.float64, generator=gen)
    rel = torch.randn(5, 4, 4, dtype=torch.float64, generator=gen)
    w = torch.randn(3, 4, 4, dtype=torch.float64, generator=gen)
    return images, rel, w


def test_results_do_not_depend_on_the_batch_size():
    images, rel, w = batch_problem()
    sizes = {1: [], 7: []}

    def run(bs):
        def score(batch, idx):
            sizes[bs].append((len(batch), len(set(idx.tolist()))))
            assert not torch.is_grad_enabled()
            return torch.sigmoid((batch * w).sum((1, 2, 3)) + idx)

        return image_perturbation(score, images, rel, patch=2, steps=4, batch_size=bs)

    one, seven = run(1), run(7)
    for name in ("morf", "lerf", "auc_morf", "auc_lerf", "original"):
        torch.testing.assert_close(getattr(one, name), getattr(seven, name), rtol=0, atol=1e-14)
    assert max(s for s, _ in sizes[7]) == 7 and max(u for _, u in sizes[7]) > 1
    assert max(s for s, _ in sizes[1]) == 1
    # each sample: original + fully replaced + 3 inner steps for each order = 8 evaluations
    assert sum(s for s, _ in sizes[1]) == 5 * 8
    expected_original = torch.sigmoid((images * w).sum((1, 2, 3)) + torch.arange(5))
    torch.testing.assert_close(one.original, expected_original, rtol=0, atol=1e-14)


def test_metric_identities_and_summary():
    images, rel, w = batch_problem()
    res = image_perturbation(
        lambda b, idx: torch.sigmoid((b * w).sum((1, 2, 3))), images, rel, per_step=3
    )
    x, morf, lerf = res.fractions.numpy(), res.morf.numpy(), res.lerf.numpy()
    np.testing.assert_allclose(res.fractions.numpy(), np.minimum(np.arange(7) * 3, 16) / 16)
    np.testing.assert_allclose(res.auc_morf.numpy(), np.trapezoid(morf, x, axis=1))
    np.testing.assert_allclose(res.auc_lerf.numpy(), np.trapezoid(lerf, x, axis=1))
    np.testing.assert_allclose(auc(res.morf, res.fractions).numpy(), np.trapezoid(morf, x, axis=1))
    torch.testing.assert_close(res.abpc, res.comprehensiveness - res.sufficiency)
    torch.testing.assert_close(res.original, res.morf[:, 0])
    torch.testing.assert_close(res.morf[:, -1], res.lerf[:, -1])  # all replaced in both orders
    s = res.summary()
    abpc = np.trapezoid(lerf, x, axis=1) - np.trapezoid(morf, x, axis=1)
    assert s["n"] == 5
    assert s["abpc"] == pytest.approx(abpc.mean())
    assert s["abpc_se"] == pytest.approx(abpc.std(ddof=1) / np.sqrt(5))
    assert s["sufficiency"] == pytest.approx((morf[:, 0] - np.trapezoid(lerf, x, axis=1)).mean())


def test_progress_bar_runs():
    pytest.importorskip("tqdm")
    res = linear_image(per_step=1, progress=True)
    assert res.auc_morf.tolist() == [3.75]


def test_errors_are_specific():
    images = torch.ones(1, 1, 4, 4)
    rel = torch.ones(1, 4, 4)
    ok = lambda b, idx: b.sum((1, 2, 3))  # noqa: E731
    with pytest.raises(ValueError, match="no default step count"):
        image_perturbation(ok, images, rel)
    with pytest.raises(ValueError, match="not both"):
        image_perturbation(ok, images, rel, steps=2, per_step=2)
    with pytest.raises(ValueError, match="dividing H=4"):
        image_perturbation(ok, images, rel, patch=3, steps=2)
    with pytest.raises(ValueError, match=r"score_fn must return a \(2,\) tensor"):
        image_perturbation(lambda b, idx: b.sum((2, 3)), images, rel, steps=1, batch_size=2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        image_perturbation(ok, images, rel * float("nan"), steps=2)
    with pytest.raises(ValueError, match="replacement="):
        image_perturbation(ok, images, rel, steps=2, replacement="noise")
    with pytest.raises(ValueError, match="odd"):
        image_perturbation(ok, images, rel, steps=2, blur_kernel=4)
    with pytest.raises(ValueError, match="no rankable features"):
        token_perturbation(
            lambda x, idx: x.sum(1).double(),
            torch.ones(1, 3, dtype=torch.long),
            torch.ones(1, 3),
            replacement_id=0,
            rankable=torch.zeros(1, 3, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="NaN/inf"):
        image_perturbation(lambda b, idx: b.sum((1, 2, 3)) / 0 * 0, images, rel, steps=2)
