"""Loss rules (``dynamiclrp.rules.losses``): each loss gives the map of its written-out spelling.

Every loss node is compared, under every preset of ``dynamiclrp.presets.PRESETS`` and for
``reduction`` none / mean / sum, with the same loss written out of plain torch ops (the spellings
of the module docstring), explained by the engine through the table's existing rules; the books
of the loss node close.  The written-out spellings are independent of the code under test (plain
torch ops), and a by-hand check fixes the proportional split of ``mse_loss``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from oracle import gen, randn

import dynamiclrp
from dynamiclrp.presets import PRESETS

DT = torch.float64
REDUCTIONS = ["none", "mean", "sum"]


def _reduce(ell: torch.Tensor, reduction: str) -> torch.Tensor:
    return {"none": ell, "mean": ell.mean(), "sum": ell.sum()}[reduction]


def _same_map(loss, spelled, xs, R=None, presets=None, record=False):
    """``loss(*xs)`` and ``spelled(*xs)`` give the same relevance of ``xs`` under every preset;
    the books close."""
    for name in presets or PRESETS:
        rules = dynamiclrp.preset(name)
        out = loss(*xs)
        rel = R if R is not None or out.dim() == 0 else torch.ones_like(out)
        got, rep = dynamiclrp.explain(out, list(xs), relevance=rel, rules=rules, return_report=True)
        if record:
            with dynamiclrp.record() as rec:
                ref_out = spelled(*xs)
        else:
            rec, ref_out = None, spelled(*xs)
        torch.testing.assert_close(ref_out.detach(), out.detach())  # the same function
        ref = dynamiclrp.explain(ref_out, list(xs), relevance=rel, rules=rules, recording=rec)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(
                a, b, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
            )
        assert abs(rep.residual) < 1e-9 * max(1.0, float(out.detach().abs().sum())), (
            name,
            rep.residual,
        )


def _huber_spelled(delta):
    def f(x, y):
        d = x - y
        a = d.abs()
        return torch.where(a < delta, 0.5 * d**2, delta * (a - 0.5 * delta))

    return f


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_data", [False, True])
@pytest.mark.parametrize("name", ["mse", "huber", "smooth_l1"])
def test_difference_losses_are_their_written_out_spelling(name, target_data, reduction) -> None:
    g = gen(1)
    x = randn(g, 3, 4, grad=True)
    y = randn(g, 3, 4, grad=target_data)
    ell = {
        "mse": lambda x, y: (x - y) ** 2,
        "huber": _huber_spelled(0.7),
        "smooth_l1": lambda x, y: _huber_spelled(0.7)(x, y) / 0.7,
    }[name]
    loss = {
        "mse": lambda x, y: F.mse_loss(x, y, reduction=reduction),
        "huber": lambda x, y: F.huber_loss(x, y, reduction=reduction, delta=0.7),
        "smooth_l1": lambda x, y: F.smooth_l1_loss(x, y, reduction=reduction, beta=0.7),
    }[name]
    xs = (x, y) if target_data else (x,)

    def bind(f):
        return (lambda x, y: f(x, y)) if target_data else (lambda x: f(x, y))

    # the written-out spelling adds constants autograd does not record (a constant target, the
    # huber offset as a wrapped number): record() keeps those sums for the reference
    _same_map(bind(loss), bind(lambda x, y: _reduce(ell(x, y), reduction)), xs, record=True)


def test_mse_by_hand() -> None:
    """Proportional (default preset): ``R_e = e R / sum(e)``, then ``R_x = R_e |x| / (|x|+|y|)``."""
    g = gen(2)
    x, y = randn(g, 5, grad=True), randn(g, 5)
    out = F.mse_loss(x, y)
    (rx,), rep = dynamiclrp.explain(out, [x], return_report=True)
    e = (x.detach() - y) ** 2
    re = out.detach() * e / e.sum()
    torch.testing.assert_close(rx, re * x.detach().abs() / (x.detach().abs() + y.abs()))
    torch.testing.assert_close(torch.as_tensor(rep.absorbed, dtype=DT), (re - rx).sum())


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_soft_margin_is_its_written_out_spelling(reduction) -> None:
    g = gen(3)
    x, y = randn(g, 3, 4, grad=True), randn(g, 3, 4).sign()
    _same_map(
        lambda x: F.soft_margin_loss(x, y, reduction=reduction),
        lambda x: _reduce(torch.log1p(torch.exp(-y * x)), reduction),
        (x,),
    )


def _bce_spelled(x, y, w, reduction):
    ell = -(y * torch.log(x) + (1 - y) * torch.log(1 - x))
    return _reduce(ell if w is None else w * ell, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_data", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_bce_is_its_written_out_spelling(weighted, target_data, reduction) -> None:
    g = gen(4)
    h = randn(g, 3, 4, grad=True)
    y = torch.rand(3, 4, generator=g, dtype=DT).requires_grad_(target_data)
    w = torch.rand(3, 4, generator=g, dtype=DT) + 0.5 if weighted else None
    if target_data:
        _same_map(
            lambda h, y: F.binary_cross_entropy(h.sigmoid(), y, w, reduction=reduction),
            lambda h, y: _bce_spelled(h.sigmoid(), y, w, reduction),
            (h, y),
        )
    else:
        _same_map(
            lambda h: F.binary_cross_entropy(h.sigmoid(), y, w, reduction=reduction),
            lambda h: _bce_spelled(h.sigmoid(), y, w, reduction),
            (h,),
        )


def _bce_logits_spelled(x, y, w, pw, reduction):
    t1 = (y if pw is None else pw * y) * F.logsigmoid(x)
    ell = -(t1 + (1 - y) * F.logsigmoid(-x))
    return _reduce(ell if w is None else w * ell, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_data", [False, True])
@pytest.mark.parametrize("pos_weight", [False, True])
def test_bce_with_logits_is_its_written_out_spelling(pos_weight, target_data, reduction) -> None:
    g = gen(5)
    x = randn(g, 3, 4, grad=True)
    y = torch.rand(3, 4, generator=g, dtype=DT).requires_grad_(target_data)
    w = torch.rand(3, 4, generator=g, dtype=DT) + 0.5
    pw = torch.rand(4, generator=g, dtype=DT) + 0.5 if pos_weight else None

    def loss(x, y=y):
        return F.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw)

    def spelled(x, y=y):
        return _bce_logits_spelled(x, y, w, pw, reduction)

    _same_map(loss, spelled, (x, y) if target_data else (x,))


def _multi_margin_spelled(x, y, p, margin, w, reduction):
    c = x.shape[1]
    xy = x.gather(1, y[:, None])
    mask = torch.ones(x.shape, dtype=DT).scatter_(1, y[:, None], 0.0)
    m = (margin - xy + x).clamp(min=0) ** p * mask
    if w is not None:
        m = m * w[y][:, None]
    return _reduce(m.sum(1) / c, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("p,weighted", [(1, False), (2, True)])
def test_multi_margin_is_its_written_out_spelling(p, weighted, reduction) -> None:
    g = gen(6)
    x = randn(g, 4, 5, grad=True)
    y = torch.tensor([0, 3, 4, 3])
    w = torch.rand(5, generator=g, dtype=DT) + 0.5 if weighted else None
    _same_map(
        lambda x: F.multi_margin_loss(x, y, p=p, margin=0.8, weight=w, reduction=reduction),
        lambda x: _multi_margin_spelled(x, y, p, 0.8, w, reduction),
        (x,),
    )


def _multilabel_spelled(x, y, reduction):
    c = x.shape[1]
    t = torch.zeros(x.shape, dtype=DT)
    for n in range(x.shape[0]):
        for label in y[n]:
            if label < 0:
                break
            t[n, label] = 1.0
    pair = t[:, :, None] * (1 - t)[:, None, :]
    m = (1 - (x[:, :, None] - x[:, None, :])).clamp(min=0) * pair
    return _reduce(m.sum((1, 2)) / c, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_multilabel_margin_is_its_written_out_spelling(reduction) -> None:
    g = gen(7)
    x = (0.5 * randn(g, 3, 4)).requires_grad_()
    y = torch.tensor([[3, 0, -1, 1], [1, 2, 3, -1], [0, -1, 2, 2]])
    _same_map(
        lambda x: F.multilabel_margin_loss(x, y, reduction=reduction),
        lambda x: _multilabel_spelled(x, y, reduction),
        (x,),
    )


def test_lrp0_of_mse_sum_against_a_constant_target() -> None:
    """``sum((x - y)**2)`` is not linear in ``x``, but LRP-0 on the pieces is the exact written-out
    algebra: ``R_x = x (x - y)`` summed with ``R_y = -y (x - y)`` gives the loss back."""
    g = gen(8)
    x, y = randn(g, 6, grad=True), randn(g, 6)
    lrp0 = dataclasses.replace(dynamiclrp.preset("epsilon"), eps=1e-12)
    out = F.mse_loss(x, y, reduction="sum")
    (rx,), rep = dynamiclrp.explain(out, [x], rules=lrp0, return_report=True)
    d = x.detach() - y
    torch.testing.assert_close(rx, x.detach() * d, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(torch.as_tensor(rep.absorbed, dtype=DT), (-y * d).sum())


@pytest.mark.parametrize("logits", [False, True])
def test_cross_entropy_with_an_activation_target(logits) -> None:
    """A target that is an activation's output (``sigmoid(u)``): under ``cp-lrp`` it is a constant
    gate in ``y * log(x)`` (entering the product as produced), as in the written-out spelling."""
    g = gen(9)
    h, u = randn(g, 3, 4, grad=True), randn(g, 3, 4, grad=True)
    if logits:

        def loss(h, u):
            return F.binary_cross_entropy_with_logits(h, u.sigmoid(), reduction="sum")

        def spelled(h, u):
            return _bce_logits_spelled(h, u.sigmoid(), None, None, "sum")
    else:

        def loss(h, u):
            return F.binary_cross_entropy(h.sigmoid(), u.sigmoid(), reduction="sum")

        def spelled(h, u):
            return _bce_spelled(h.sigmoid(), u.sigmoid(), None, "sum")

    _same_map(loss, spelled, (h, u))


def _loss_forwards():
    g = gen(10)
    x = randn(g, 3, 4, grad=True)
    y = torch.rand(3, 4, generator=g, dtype=DT)
    w = torch.rand(3, 4, generator=g, dtype=DT)
    cls = torch.tensor([0, 3, 1])
    labels = torch.tensor([[3, 0, -1, 1], [1, 2, 3, -1], [0, -1, 2, 2]])
    return [
        lambda r: F.mse_loss(x, y, reduction=r),
        lambda r: F.huber_loss(x, y, reduction=r, delta=0.5),
        lambda r: F.smooth_l1_loss(x, y, reduction=r, beta=0.5),
        lambda r: F.soft_margin_loss(x, y.sign(), reduction=r),
        lambda r: F.binary_cross_entropy(x.sigmoid(), y, w, reduction=r),
        lambda r: F.binary_cross_entropy_with_logits(x, y, w, reduction=r, pos_weight=w[0]),
        lambda r: F.multi_margin_loss(x, cls, p=2, margin=0.5, weight=w[0], reduction=r),
        lambda r: F.multilabel_margin_loss(x, labels, reduction=r),
    ]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("k", range(8))
def test_loss_replays_rebuild_the_forward(k, reduction) -> None:
    """Each loss entry's replay, from the node's input values, gives the loss."""
    from dynamiclrp.rules import OP_TABLE
    from dynamiclrp.rules.base import ReplayContext

    out = _loss_forwards()[k](reduction)
    fn = out.grad_fn
    h = fn.next_functions[0][0]  # the loss's input: x itself or sigmoid(x)
    x_in = fn._saved_self
    assert h is not None
    values = [x_in] + [None] * (len(fn.next_functions) - 1)
    replayed = OP_TABLE[fn.name()].replay(ReplayContext(fn, values))[0]
    torch.testing.assert_close(replayed, out.detach(), rtol=0, atol=0)
