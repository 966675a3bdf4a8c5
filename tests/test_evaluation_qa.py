"""Extractive QA metrics (paper, table A.3) on hand-computed examples."""

import pytest
import torch

from dynamiclrp.evaluation.qa import span_iou, top_k_in_span

T, F = True, False
#                      0    1    2    3    4    5
REL = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.7]])
QUESTION = torch.tensor([[F, T, F, F, F, F]])  # token 1 is a question token
# After excluding token 1 the order is 3, 5, 2, 4, 0.


def test_top_k_with_the_question_masked():
    span_35, span_24 = torch.tensor([[3, 5]]), torch.tensor([[2, 4]])
    assert top_k_in_span(REL, span_35, exclude=QUESTION).tolist() == [True]
    assert top_k_in_span(REL, span_35, k=2, exclude=QUESTION).tolist() == [True]  # {3, 5}
    assert top_k_in_span(REL, span_35, k=3, exclude=QUESTION).tolist() == [False]  # 2 is out
    assert top_k_in_span(REL, span_35, k=2, exclude=QUESTION, strict=True).tolist() == [True]
    assert top_k_in_span(REL, span_24, exclude=QUESTION).tolist() == [True]  # 3 in [2, 4]
    assert top_k_in_span(REL, span_24, k=2, exclude=QUESTION).tolist() == [False]  # 5 is out
    assert top_k_in_span(REL, span_24, exclude=QUESTION, strict=True).tolist() == [False]
    # without the exclusion the question token 1 is the top token
    assert top_k_in_span(REL, span_35).tolist() == [False]


def test_span_iou():
    span_35, span_24 = torch.tensor([[3, 5]]), torch.tensor([[2, 4]])
    # span [2, 4]: top-3 {3, 5, 2}, intersection {2, 3}: 2 / (3 + 3 - 2) = 0.5
    assert span_iou(REL, span_24, exclude=QUESTION).tolist() == [0.5]
    # strict: top-2 {3, 5} vs {2, 4}: 0
    assert span_iou(REL, span_24, exclude=QUESTION, strict=True).tolist() == [0.0]
    # span [3, 5]: top-3 {3, 5, 2} vs {3, 4, 5}: 2 / 4; strict {3, 5} vs {3, 5}: 1
    assert span_iou(REL, span_35, exclude=QUESTION).tolist() == [0.5]
    assert span_iou(REL, span_35, exclude=QUESTION, strict=True).tolist() == [1.0]
    # one-token span: L = 1; top-1 token 3 -> IoU 1 with span (3, 3), 0 with (4, 4)
    assert span_iou(REL, torch.tensor([[3, 3]]), exclude=QUESTION).tolist() == [1.0]
    assert span_iou(REL, torch.tensor([[4, 4]]), exclude=QUESTION).tolist() == [0.0]
    # top-4 {3, 5, 2, 4} vs span [2, 5]: 4 / 4
    assert span_iou(REL, torch.tensor([[2, 5]]), exclude=QUESTION).tolist() == [1.0]
    # top-2 {3, 5} vs span [4, 5]: 1 / 3
    assert span_iou(REL, torch.tensor([[4, 5]]), exclude=QUESTION).tolist() == [
        pytest.approx(1 / 3)
    ]


def test_batches_and_ties():
    rel = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    spans = torch.tensor([[1, 1], [2, 2]])
    # ties go to the lower index: row 0 top-1 is token 0, row 1 top-1 is token 1
    assert top_k_in_span(rel, spans).tolist() == [False, False]
    assert top_k_in_span(rel, torch.tensor([[0, 0], [1, 2]])).tolist() == [True, True]
    # strict top-2 of a one-token span can never hold: the hit set has one element
    assert top_k_in_span(rel, torch.tensor([[0, 0], [1, 2]]), k=2, strict=True).tolist() == [
        False,
        True,
    ]


def test_errors():
    with pytest.raises(ValueError, match="rows \\[0\\]"):
        top_k_in_span(REL, torch.tensor([[4, 3]]))
    with pytest.raises(ValueError, match="excluded tokens"):
        top_k_in_span(REL, torch.tensor([[1, 3]]), exclude=QUESTION)
    with pytest.raises(ValueError, match="fewer than k=6"):
        top_k_in_span(REL, torch.tensor([[3, 5]]), k=6, exclude=QUESTION)
    with pytest.raises(ValueError, match="positive int"):
        top_k_in_span(REL, torch.tensor([[3, 5]]), k=0)
