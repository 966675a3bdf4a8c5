"""Loss functions: each the map of its written-out spelling (family ``reduction``).

A loss is a per-element loss ``l`` followed by a reduction (``reduction="none"``: ``R_l = R``;
``"sum"`` / ``"mean"``: a linear reduction with non-negative coefficients, split by
``Rules.reduction`` like ``sum`` / ``mean``, :func:`reduce_split`).  The per-element loss is
written out of ops the table has, and its relevance follows that spelling:

- ``mse_loss``: ``(x - y) ** 2``: ``**2`` passes ``R`` on, the sub splits it over ``x`` and ``-y``
  (``Rules.add``).
- ``huber_loss`` / ``smooth_l1_loss``: ``where(|d| < delta, 0.5 d**2, delta (|d| - 0.5 delta))``
  with ``d = x - y`` (``/ beta`` for smooth L1): every op after the sub is an element-wise map of
  ``d`` with Python-scalar constants (identity), so ``R_d = R_l``, split over ``x`` and ``-y``.
- ``soft_margin_loss``: ``log(1 + exp(-y x))`` (the target is not differentiable): ``R_x = R_l``.
- ``binary_cross_entropy``: ``-w (y log x + (1 - y) log(1 - x))``; the terms split by the add
  rule, each term a product of a target factor and an ``x`` factor (:func:`.elementwise.product_rule`);
  a constant target makes it an element-wise region of ``x`` (identity, ``R_x = R_l``).
- ``binary_cross_entropy_with_logits``: ``-w (pw y logsigmoid(x) + (1 - y) logsigmoid(-x))``,
  as binary cross entropy.
- ``multi_margin_loss``: ``l_n = sum_{j != y_n} w_{y_n} max(0, margin - x_{y_n} + x_j)^p / C``:
  the sum over ``j`` is a linear reduction (``Rules.reduction``), ``margin - x_y`` (a Python
  scalar minus a tensor) passes relevance on unchanged, so each pair's share is split over
  ``margin - x_y`` and ``x_j`` (``Rules.add``), the first share going to ``x_y``.
- ``multilabel_margin_loss``: ``l_n = sum_{j in T, i not in T} max(0, 1 - (x_j - x_i)) / C``:
  the sum over pairs is a linear reduction, each pair's share split over ``x_j`` and ``-x_i``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import OpEntry, RuleContext, ratio, sum_to_shape
from .elementwise import _product_shares, cancelled, split_sum
from .linear import safe_divide

NONE, MEAN, SUM = 0, 1, 2


def reduce_split(ctx: RuleContext, ell: Tensor, dims=None, n: int | None = None) -> Tensor:
    """Relevance of the per-element losses ``ell`` from ``R`` of their reduction.

    ``z = sum_G ell / n`` over the groups ``G`` (``dims``, all by default; ``n = |G|`` for a mean,
    1 for a sum).  ``Rules.reduction = "proportional"``: ``R_l = |l| R / sum_G |l|`` (0 where the
    group is 0); ``"signed"``: ``R_l = l R / (n stab(z))``, and where ``z`` cancels to rounding
    level below ``eps`` the proportional split (as for ``mean`` / ``sum``, :mod:`.reduction`)."""
    dims = list(range(ell.dim())) if dims is None else dims
    n = 1 if n is None else n
    r = ctx.r.reshape([1 if d in dims else s for d, s in enumerate(ell.shape)])
    if ctx.rules.reduction == "proportional":
        a = ell.abs()
        return a * ratio(r, a.sum(dims, keepdim=True) / n) / n
    z = ell.sum(dims, keepdim=True) / n
    count = max(1, ell.numel() // max(1, z.numel()))
    zero = cancelled(z, lambda: ell.abs().sum(dims, keepdim=True) / n, count, ctx.eps)
    signed = ell * (safe_divide(r, z, ctx.eps) / n)
    if zero is None:
        return signed
    a = ell.abs()
    exact = a * ratio(r, a.sum(dims, keepdim=True) / n) / n
    return torch.where(zero, exact, signed)


def _per_element(ctx: RuleContext, ell: Tensor) -> Tensor:
    """``R_l`` for a loss with ``reduction`` none / mean / sum over all elements."""
    red = ctx.saved("_saved_reduction")
    if red == NONE:
        return ctx.r
    return reduce_split(ctx, ell, n=ell.numel() if red == MEAN else 1)


def _target(ctx: RuleContext) -> Tensor:
    return ctx.saved("_saved_target")


def _recorded(ctx: RuleContext, slot: int) -> bool:
    return slot < ctx.n_inputs() and ctx.fn.next_functions[slot][0] is not None


def _to(ctx: RuleContext, slot: int, rel: Tensor) -> Tensor | None:
    """``rel`` for input ``slot``, summed to its shape; an operand autograd did not record (a
    constant target or input) absorbs it."""
    if _recorded(ctx, slot):
        return sum_to_shape(rel, ctx.input_shape(slot))
    ctx.absorb(rel)
    return None


def _difference_split(ctx: RuleContext, r_l: Tensor) -> list[Tensor | None]:
    """``R_l`` of an element-wise map of ``d = x - y`` split over ``x`` and ``-y`` (``Rules.add``);
    an operand that is not recorded (a constant target) absorbs its share."""
    x, y = ctx.saved("_saved_self"), _target(ctx)
    rx, ry = split_sum(ctx, [x, -y], ctx.rules.add, r=r_l)
    return [_to(ctx, 0, rx), _to(ctx, 1, ry)]


def mse_rule(ctx: RuleContext):
    """``mse_loss(x, y) = reduce((x - y) ** 2)``: :func:`reduce_split`, then the sub's split."""
    x, y = ctx.saved("_saved_self"), _target(ctx)
    d = x - y
    return _difference_split(ctx, _per_element(ctx, d * d))


def _huber(delta: Tensor | float, d: Tensor) -> Tensor:
    a = d.abs()
    return torch.where(a < delta, 0.5 * d * d, delta * (a - 0.5 * delta))


def huber_rule(ctx: RuleContext):
    """``huber_loss(x, y, delta)``: an element-wise map of ``d = x - y`` (identity), reduced:
    :func:`reduce_split`, then the sub's split over ``x`` and ``-y``."""
    x, y = ctx.saved("_saved_self"), _target(ctx)
    return _difference_split(ctx, _per_element(ctx, _huber(ctx.saved("_saved_delta"), x - y)))


def smooth_l1_rule(ctx: RuleContext):
    """``smooth_l1_loss(x, y, beta) = huber_loss(x, y, beta) / beta`` (``|d|`` for ``beta = 0``):
    as :func:`huber_rule`."""
    x, y = ctx.saved("_saved_self"), _target(ctx)
    beta = ctx.saved("_saved_beta")
    d = x - y
    ell = d.abs() if beta == 0 else _huber(beta, d) / beta
    return _difference_split(ctx, _per_element(ctx, ell))


def soft_margin_rule(ctx: RuleContext):
    """``soft_margin_loss(x, y) = reduce(log(1 + exp(-y x)))`` with a constant target: the
    product ``y x`` gives ``x`` all, the rest is element-wise: ``R_x = R_l``."""
    x, y = ctx.saved("_saved_self"), _target(ctx)
    return [_per_element(ctx, torch.log1p(torch.exp(-y * x)))]


def _cross_entropy_rule(ctx: RuleContext, terms: list[Tensor], gate_first: bool):
    """``l = -w (t_1 + t_2)`` with ``t_1 = y f(x)`` and ``t_2 = (1 - y) g(x)``.

    With a target that is not data (a constant, or a parameter) the spelling is an element-wise
    region of ``x`` (``x`` branches into ``f`` and ``g`` and joins at the add): identity,
    ``R_x = R_l``.  With a data target the add splits ``R_l`` over ``t_1`` and ``t_2``
    (``Rules.add``) and each term's share goes by the product rule to its two factors
    (``R / 2`` each; with ``Rules.gates = "constant"`` the target of ``t_1`` is a constant gate
    when ``gate_first`` and it is an activation's output)."""
    w = ctx.saved("_saved_weight")
    ell = -(terms[0] + terms[1])
    if w is not None:
        ell = w * ell
    r_l = _per_element(ctx, ell)
    if not (_recorded(ctx, 1) and ctx.data[1]):
        return [_to(ctx, 0, r_l), None]
    s1, s2 = split_sum(ctx, list(terms), ctx.rules.add, r=r_l)
    n = r_l.numel()
    p1 = _product_shares(ctx, s1, (0, 1), n, gate_slots=(1,) if gate_first else ())
    p2 = _product_shares(ctx, s2, (0, 1), n, gate_slots=())
    out = []
    for slot in (0, 1):
        shares = [p[slot] for p in (p1, p2) if slot in p]
        out.append(None if not shares else sum(shares[1:], shares[0]))
    return out


def bce_rule(ctx: RuleContext):
    """``binary_cross_entropy(x, y, w) = reduce(-w (y log x + (1 - y) log(1 - x)))``
    (:func:`_cross_entropy_rule`).  PyTorch clamps the logs at -100; so does the rule."""
    x, y = ctx.saved("_saved_self"), _target(ctx)
    t1 = y * torch.log(x).clamp(min=-100)
    t2 = (1 - y) * torch.log(1 - x).clamp(min=-100)
    return _cross_entropy_rule(ctx, [t1, t2], gate_first=True)


def bce_logits_rule(ctx: RuleContext):
    """``binary_cross_entropy_with_logits(x, y, w, pw)
    = reduce(-w (pw y logsigmoid(x) + (1 - y) logsigmoid(-x)))`` (:func:`_cross_entropy_rule`;
    with ``pw`` the target enters ``t_1`` through ``pw * y``, not as produced)."""
    x, y = ctx.saved("_saved_self"), _target(ctx)
    pw = ctx.saved("_saved_pos_weight")
    ls = torch.nn.functional.logsigmoid
    t1 = (y if pw is None else pw * y) * ls(x)
    t2 = (1 - y) * ls(-x)
    return _cross_entropy_rule(ctx, [t1, t2], gate_first=pw is None)


def _batch(ctx: RuleContext, ell: Tensor) -> Tensor:
    """``R`` of the per-sample losses ``ell`` (shape ``(N,)``) of a margin loss."""
    red = ctx.saved("_saved_reduction")
    if red == NONE:
        return ctx.r.reshape(ell.shape)
    return reduce_split(ctx, ell, n=ell.numel() if red == MEAN else 1)


def multi_margin_rule(ctx: RuleContext):
    """``multi_margin_loss(x, y, p, margin, w)``: ``l_n = sum_{j != y_n} m_nj / C`` with
    ``m_nj = w_{y_n} max(0, margin - x_{n y_n} + x_nj) ** p`` (module docstring): the batch
    reduction and the sum over ``j`` split by :func:`reduce_split`, each ``R_nj`` over
    ``margin - x_{n y_n}`` (to ``x_{n y_n}``) and ``x_nj`` by ``Rules.add``."""
    x0 = ctx.saved("_saved_self")
    x = x0 if x0.dim() == 2 else x0.reshape(1, -1)
    y = ctx.saved("_saved_target").reshape(-1, 1)
    p, margin, w = ctx.saved("_saved_p"), ctx.saved("_saved_margin"), ctx.saved("_saved_weight")
    c = x.shape[1]
    xy = x.gather(1, y)
    mask = torch.ones_like(x).scatter_(1, y, 0.0)
    m = (margin - xy + x).clamp(min=0) ** p * mask
    if w is not None:
        m = m * w[y]
    r_l = _batch(ctx, m.sum(1) / c).reshape(-1, 1)
    r_m = reduce_split(_Sub(ctx, r_l), m, dims=[1])
    r_xy, r_x = split_sum(ctx, [margin - xy, x], ctx.rules.add, r=r_m)
    rel = r_x.scatter_add(1, y, r_xy.sum(1, keepdim=True))
    return [rel.reshape(x0.shape)]


def multilabel_margin_rule(ctx: RuleContext):
    """``multilabel_margin_loss(x, y)``: ``l_n = sum_{j in T_n, i not in T_n} m_nji / C`` with
    ``m_nji = max(0, 1 - (x_nj - x_ni))``: the batch reduction and the sum over pairs split by
    :func:`reduce_split`, each pair's ``R`` over ``x_nj`` and ``-x_ni`` by ``Rules.add``."""
    x0 = ctx.saved("_saved_self")
    x = x0 if x0.dim() == 2 else x0.reshape(1, -1)
    t = ctx.saved("_saved_is_target").reshape(x.shape).to(x.dtype)
    c = x.shape[1]
    pair = t[:, :, None] * (1 - t)[:, None, :]
    xj, xi = x[:, :, None], x[:, None, :]
    m = (1 - (xj - xi)).clamp(min=0) * pair
    r_l = _batch(ctx, m.sum((1, 2)) / c).reshape(-1, 1, 1)
    r_m = reduce_split(_Sub(ctx, r_l), m, dims=[1, 2])
    r_j, r_i = split_sum(ctx, [xj.expand_as(m), -xi.expand_as(m)], ctx.rules.add, r=r_m)
    return [(r_j.sum(2) + r_i.sum(1)).reshape(x0.shape)]


class _Sub:
    """A view of ``ctx`` whose output relevance is ``r`` (an inner reduction of a loss)."""

    def __init__(self, ctx: RuleContext, r: Tensor):
        self.rules, self.eps, self.r = ctx.rules, ctx.eps, r


def _loss(rule, replay, target: bool = True) -> OpEntry:
    saved_inputs = {0: "_saved_self", 1: "_saved_target"} if target else {0: "_saved_self"}
    return OpEntry("reduction", rule, saved_inputs=saved_inputs, replay=replay)


def _in(c, slot: int, attr: str) -> Tensor:
    v = c.inputs[slot] if slot < len(c.inputs) else None
    return c.saved(attr) if v is None else v


_aten = torch.ops.aten

TABLE = {
    "MseLossBackward0": _loss(
        mse_rule,
        lambda c: (
            _aten.mse_loss(
                _in(c, 0, "_saved_self"), _in(c, 1, "_saved_target"), c.saved("_saved_reduction")
            ),
        ),
    ),
    "HuberLossBackward0": _loss(
        huber_rule,
        lambda c: (
            _aten.huber_loss(
                _in(c, 0, "_saved_self"),
                _in(c, 1, "_saved_target"),
                c.saved("_saved_reduction"),
                c.saved("_saved_delta"),
            ),
        ),
    ),
    "SmoothL1LossBackward0": _loss(
        smooth_l1_rule,
        lambda c: (
            _aten.smooth_l1_loss(
                _in(c, 0, "_saved_self"),
                _in(c, 1, "_saved_target"),
                c.saved("_saved_reduction"),
                c.saved("_saved_beta"),
            ),
        ),
    ),
    "SoftMarginLossBackward0": _loss(
        soft_margin_rule,
        lambda c: (
            _aten.soft_margin_loss(
                _in(c, 0, "_saved_self"), c.saved("_saved_target"), c.saved("_saved_reduction")
            ),
        ),
        target=False,
    ),
    "BinaryCrossEntropyBackward0": _loss(
        bce_rule,
        lambda c: (
            _aten.binary_cross_entropy(
                _in(c, 0, "_saved_self"),
                _in(c, 1, "_saved_target"),
                c.saved("_saved_weight"),
                c.saved("_saved_reduction"),
            ),
        ),
    ),
    "BinaryCrossEntropyWithLogitsBackward0": _loss(
        bce_logits_rule,
        lambda c: (
            _aten.binary_cross_entropy_with_logits(
                _in(c, 0, "_saved_self"),
                _in(c, 1, "_saved_target"),
                c.saved("_saved_weight"),
                c.saved("_saved_pos_weight"),
                c.saved("_saved_reduction"),
            ),
        ),
    ),
    "MultiMarginLossBackward0": _loss(
        multi_margin_rule,
        lambda c: (
            _aten.multi_margin_loss(
                _in(c, 0, "_saved_self"),
                c.saved("_saved_target"),
                c.saved("_saved_p"),
                c.saved("_saved_margin"),
                c.saved("_saved_weight"),
                c.saved("_saved_reduction"),
            ),
        ),
        target=False,
    ),
    "MultilabelMarginLossBackward0": _loss(
        multilabel_margin_rule,
        lambda c: (
            _aten.multilabel_margin_loss(
                _in(c, 0, "_saved_self"), c.saved("_saved_target"), c.saved("_saved_reduction")
            ),
        ),
        target=False,
    ),
}
