"""Localisation metrics (Arras et al. 2022) on hand-computed examples."""

import math

import pytest
import torch

from dynamiclrp.evaluation.localisation import (
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)

T, F = True, False


def test_mass_accuracy_counts_only_positive_relevance():
    rel = torch.tensor([[3.0, -1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[T, F, F, T], [F, T, T, T]])
    # row 0: positive mass 3 + 1 = 4, inside 3 (+0) -> 0.75; row 1: 3 / 4
    assert relevance_mass_accuracy(rel, mask).tolist() == [0.75, 0.75]


def test_mass_accuracy_on_images():
    rel = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    mask = torch.tensor([[[T, T], [F, F]]])
    assert relevance_mass_accuracy(rel, mask).tolist() == [pytest.approx(0.3)]


def test_mass_accuracy_is_nan_without_positive_relevance():
    rel = torch.tensor([[-1.0, 0.0, -2.0], [0.0, 0.0, 0.0], [0.0, 2.0, -5.0]])
    mask = torch.tensor([[T, F, F], [T, F, F], [F, T, F]])
    out = relevance_mass_accuracy(rel, mask)
    assert math.isnan(out[0]) and math.isnan(out[1]) and out[2].item() == 1.0


def test_unrankable_features_are_left_out():
    rel = torch.tensor([[3.0, -1.0, 1.0, 100.0]])
    mask = torch.tensor([[T, F, F, F]])
    rankable = torch.tensor([[T, T, T, F]])
    assert relevance_mass_accuracy(rel, mask, rankable=rankable).tolist() == [0.75]
    assert pointing_game(rel, mask, rankable=rankable).tolist() == [1.0]
    assert pointing_game(rel, mask).tolist() == [0.0]
    assert relevance_rank_accuracy(rel, mask, rankable=rankable).tolist() == [1.0]
    with pytest.raises(ValueError, match="not rankable"):
        relevance_mass_accuracy(rel, ~mask, rankable=rankable)


def test_rank_accuracy():
    rel = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    mask = torch.tensor([[F, T, F, T, F]])  # K = 2, top-2 = {0, 1}: one hit
    assert relevance_rank_accuracy(rel, mask).tolist() == [0.5]
    mask = torch.tensor([[T, T, T, F, F]])  # K = 3, top-3 = {0, 1, 2}
    assert relevance_rank_accuracy(rel, mask).tolist() == [1.0]
    img = torch.tensor([[[0.0, 9.0], [8.0, 1.0]]])
    assert relevance_rank_accuracy(img, torch.tensor([[[T, F], [T, F]]])).tolist() == [0.5]


def test_rank_accuracy_ties_take_the_expected_value():
    rel = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[T, T, F, F, F], [F, F, T, F, F]])
    # row 0: K = 2, feature 0 is in, one slot left for three tied features, one of them in the
    # mask: (1 + 1/3) / 2.  Row 1: all tied, K = 1: chance level 1/5.
    out = relevance_rank_accuracy(rel, mask)
    assert out.tolist() == [pytest.approx(2 / 3), pytest.approx(1 / 5)]


def test_pointing_game():
    rel = torch.tensor([[0.0, 3.0, 1.0], [5.0, 3.0, 1.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[F, T, F], [F, T, T], [T, F, F]])
    assert pointing_game(rel, mask).tolist() == [1.0, 0.0, pytest.approx(1 / 3)]
    img = torch.tensor([[[0.0, 1.0], [7.0, 1.0]]])
    assert pointing_game(img, torch.tensor([[[F, F], [T, F]]])).tolist() == [1.0]


def test_errors():
    rel = torch.ones(2, 3)
    with pytest.raises(ValueError, match="mask is empty in rows \\[1\\]"):
        relevance_rank_accuracy(rel, torch.tensor([[T, F, F], [F, F, F]]))
    with pytest.raises(ValueError, match="bool tensor"):
        pointing_game(rel, torch.ones(2, 3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        relevance_mass_accuracy(torch.tensor([[1.0, float("nan")]]), torch.tensor([[T, F]]))
