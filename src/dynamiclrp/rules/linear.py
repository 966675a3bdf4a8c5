"""LRP rules for linear contractions ``z = f(x, w) + b``.

Every contraction the op table knows (``mm``, ``addmm``, ``bmm``, ``baddbmm``, convolutions of any
dimension, transposed convolutions) is described by a :class:`LinearMap`: a forward function that is
linear in each operand and its two vector-Jacobian products.  The rules below only use that
description, so each rule is written once for every contraction.

Notation (as in ``docs/rules.md``): ``J_x^T g`` is the vector-Jacobian product of ``f`` in ``x``,
``stab(z) = z + eps * sign(z)`` with ``sign(0) = +1``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class LinearMap(NamedTuple):
    """A contraction ``z = forward(x, w)``, linear in ``x`` for fixed ``w`` and in ``w`` for fixed
    ``x``.

    Attributes
    ----------
    forward:
        ``(x, w) -> z``.
    vjp_x:
        ``(g, x, w) -> J_x^T g``, a tensor of ``x``'s shape.
    vjp_w:
        ``(g, x, w) -> J_w^T g``, a tensor of ``w``'s shape.
    """

    forward: Callable[[Tensor, Tensor], Tensor]
    vjp_x: Callable[[Tensor, Tensor, Tensor], Tensor]
    vjp_w: Callable[[Tensor, Tensor, Tensor], Tensor]


class ContractionRelevance(NamedTuple):
    """What a contraction rule returns.

    ``x``: relevance of the data operand.  ``bias``: relevance absorbed by the bias, in ``z``'s
    shape summed over the dimensions the bias is broadcast along (kept as size 1; see
    :func:`bias_share`), ``None`` when there is no bias or the rule gives it none.
    """

    x: Tensor
    bias: Tensor | None


def stabilize(z: Tensor, eps: float) -> Tensor:
    """``stab(z) = z + eps * sign(z)`` with ``sign(+0) = +1`` (and ``sign(-0) = -1``): never zero,
    never flips a sign.

    ``|z| + eps`` with ``z``'s sign copied onto it, in place on one fresh buffer: three passes over
    ``z`` (``torch.where(z >= 0, z + eps, z - eps)`` made four and three temporaries).  Python
    scalars keep ``z``'s dtype and need no host-to-device copy."""
    return z.abs().add_(eps).copysign_(z)


def fits(out: Tensor, other: Tensor) -> bool:
    """Whether ``out op= other`` gives what ``out op other`` would (same shape and dtype): the
    test every rule makes before writing a result into a fresh buffer it owns."""
    return out.shape == other.shape and out.dtype == other.dtype


def safe_divide(r: Tensor, z: Tensor, eps: float) -> Tensor:
    """``r / stab(z)``, written into ``stab(z)``'s fresh buffer when the shapes and dtypes allow
    (no further allocation)."""
    s = stabilize(z, eps)
    if fits(s, r):
        return torch.div(r, s, out=s)
    return r / s


def epsilon(
    m: LinearMap,
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    r: Tensor,
    eps: float,
    z: Tensor | None = None,
) -> ContractionRelevance:
    """Epsilon rule (LRP-eps).

    ``R_x = x * J_x^T (R / stab(z))`` with ``z = f(x, w) + b`` the full output, and
    ``R_b = b * R / stab(z)``: the bias absorbs its share.  ``z`` may be passed in when the
    forward value is already known (it saves recomputing the contraction).
    """
    if z is None:
        z = m.forward(x, w)
        if bias is not None:
            z = z + bias
    g = safe_divide(r, z, eps)
    z = None  # a recomputed z is freed here (a known one stays with its owner)
    rb = None if bias is None else bias_share(bias, g)
    c = m.vjp_x(g, x, w)
    del g  # freed before the product: one activation-sized buffer fewer at the peak
    rx = c.mul_(x) if fits(c, x) else x * c
    return ContractionRelevance(rx, rb)


def bias_share(bias: Tensor, g: Tensor) -> Tensor:
    """``b * g``, summed over the dimensions ``b`` is broadcast along (kept as size 1): every
    caller reduces the bias's share to the bias's shape, and ``b * sum(g)`` is one pass over ``g``
    instead of a full-size product and its sum."""
    if bias.numel() < g.numel():
        shape = (1,) * (g.dim() - bias.dim()) + tuple(bias.shape)
        return g.sum_to_size(shape) * bias.reshape(shape)
    # an expanded view (stride 0 along the broadcast dimensions) is broadcast too
    dims = [d for d in range(bias.dim()) if bias.stride(d) == 0 and bias.shape[d] > 1]
    if not dims or bias.shape != g.shape:
        return bias * g
    narrow = tuple(slice(0, 1) if d in dims else slice(None) for d in range(bias.dim()))
    return g.sum(dims, keepdim=True) * bias[narrow]


def parameter_epsilon(
    m: LinearMap, x: Tensor, w: Tensor, bias: Tensor | None, r: Tensor, eps: float
) -> Tensor:
    """Relevance of the constant operand ``w`` under the epsilon rule.

    ``R_w = w * J_w^T (R / stab(z))``.  Computed only when the caller asked for ``w``; it is the
    epsilon rule read from the weight's side and is not part of the data relevance flow.
    """
    z = m.forward(x, w)
    if bias is not None:
        z = z + bias
    return w * m.vjp_w(safe_divide(r, z, eps), x, w)


def bilinear_uniform(
    m: LinearMap, a: Tensor, b: Tensor, r: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Uniform rule for a contraction of two data operands (AttnLRP, Prop. 3.3).

    Each product term ``a_i b_j`` gets ``a_i b_j R / stab(z)`` (the epsilon rule on terms) and gives
    half to each factor: ``R_a = a * J_a^T g / 2`` and ``R_b = b * J_b^T g / 2`` with
    ``g = R / stab(z)``.
    """
    g = safe_divide(r, m.forward(a, b), eps)
    return a * m.vjp_x(g, a, b) * 0.5, b * m.vjp_w(g, a, b) * 0.5


# --- the contractions themselves -------------------------------------------------------------


def matmul_map() -> LinearMap:
    """``z = x @ w`` for 2-D or batched 3-D operands (``mm``, ``bmm``)."""
    return LinearMap(
        forward=lambda x, w: x @ w,
        vjp_x=lambda g, x, w: g @ w.transpose(-1, -2),
        vjp_w=lambda g, x, w: x.transpose(-1, -2) @ g,
    )


def convolution_map(
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    transposed: bool,
    output_padding: tuple[int, ...],
    groups: int,
) -> LinearMap:
    """A (transposed) convolution of any dimension, without bias, as ``aten.convolution`` runs
    it."""

    def forward(x: Tensor, w: Tensor) -> Tensor:
        return torch.ops.aten.convolution(
            x, w, None, stride, padding, dilation, transposed, output_padding, groups
        )

    def vjp(g: Tensor, x: Tensor, w: Tensor, mask: list[bool]) -> tuple[Tensor, ...]:
        return torch.ops.aten.convolution_backward(
            g, x, w, None, stride, padding, dilation, transposed, output_padding, groups, mask
        )

    return LinearMap(
        forward=forward,
        vjp_x=lambda g, x, w: vjp(g, x, w, [True, False, False])[0],
        vjp_w=lambda g, x, w: vjp(g, x, w, [False, True, False])[1],
    )


# --- selectable contraction rules ------------------------------------------------------------
#
# Every rule below is a sum of *modified contributions* grouped by a shared denominator: a group
# is a list of operand pairs ``(x', w')`` plus a bias part ``b'``; its denominator is
# ``z' = sum f(x', w') + b'`` and it redistributes a relevance ``R'`` (``R`` itself, a masked part
# of ``R``, or a multiple of it) as ``R_x = sum x' * J^T_{w'} (R' / stab(z'))`` and
# ``R_b = b' * R' / stab(z')``.  Because every term ``x'_i f_ij(w')`` is a product, the same
# groups also give the relevance of the weight operand (see :func:`parameter_relevance`).


def _pos(t: Tensor) -> Tensor:
    return t.clamp(min=0)


def _neg(t: Tensor) -> Tensor:
    return t.clamp(max=0)


def _opt(fn: Callable[[Tensor], Tensor], t: Tensor | None) -> Tensor | None:
    return None if t is None else fn(t)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


class RuleGroup(NamedTuple):
    """One normalisation group of a contraction rule.

    Attributes
    ----------
    pairs:
        The modified operand pairs ``(x', w')``; each contributes ``f(x', w')`` to the denominator
        and ``x' * J^T_{w'} g`` to the data relevance.
    bias:
        The modified bias ``b'`` (in ``z``'s shape) or ``None``.
    z:
        The (unstabilised) denominator ``sum f(x', w') + b'``.
    r:
        The relevance the group redistributes; ``g = r / stab(z)``.
    """

    pairs: tuple[tuple[Tensor, Tensor], ...]
    bias: Tensor | None
    z: Tensor
    r: Tensor


def _group(
    m: LinearMap, pairs: tuple[tuple[Tensor, Tensor], ...], bias: Tensor | None, r: Tensor
) -> RuleGroup:
    """A group whose denominator is the sum of its own contributions."""
    z: Tensor | None = None
    for xa, wa in pairs:
        z = _add(z, m.forward(xa, wa))
    z = _add(z, bias)
    assert z is not None
    return RuleGroup(pairs, bias, z, r)


class ContractionRule:
    """Base class of the selectable rules for a contraction ``z = f(x, w) + b``.

    A subclass only states its normalisation groups (:meth:`groups`); calling the rule gives the
    relevance of the data operand ``x`` and of the bias, and :func:`parameter_relevance` gives the
    relevance of ``w`` from the same groups.
    """

    def groups(
        self, m: LinearMap, x: Tensor, w: Tensor, bias: Tensor | None, r: Tensor, eps: float
    ) -> list[RuleGroup]:
        """The normalisation groups of the rule for this contraction (see :class:`RuleGroup`)."""
        raise NotImplementedError

    def __call__(
        self, m: LinearMap, x: Tensor, w: Tensor, bias: Tensor | None, r: Tensor, eps: float
    ) -> ContractionRelevance:
        """Relevance of ``x`` (``x``'s shape) and of the bias (``z``'s shape or ``None``)."""
        rx: Tensor | None = None
        rb: Tensor | None = None
        for grp in self.groups(m, x, w, bias, r, eps):
            g = safe_divide(grp.r, grp.z, eps)
            for xa, wa in grp.pairs:
                rx = _add(rx, xa * m.vjp_x(g, xa, wa))
            if grp.bias is not None:
                rb = _add(rb, grp.bias * g)
        if rx is None:
            rx = torch.zeros_like(x)
        return ContractionRelevance(rx, rb)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Epsilon(ContractionRule):
    r"""Epsilon rule (LRP-:math:`\epsilon`).

    .. math::

        R_i = \sum_j \frac{x_i w_{ij}}{\mathrm{stab}(z_j)} R_j, \qquad
        R_{b_j} = \frac{b_j}{\mathrm{stab}(z_j)} R_j, \qquad z_j = \sum_i x_i w_{ij} + b_j,

    i.e. ``R_x = x * J_x^T (R / stab(z))``.  Conservative up to ``eps``; the bias absorbs its share.
    Calls :func:`epsilon`.
    """

    def groups(
        self, m: LinearMap, x: Tensor, w: Tensor, bias: Tensor | None, r: Tensor, eps: float
    ) -> list[RuleGroup]:
        return [_group(m, ((x, w),), bias, r)]

    def __call__(
        self,
        m: LinearMap,
        x: Tensor,
        w: Tensor,
        bias: Tensor | None,
        r: Tensor,
        eps: float,
        z: Tensor | None = None,
    ) -> ContractionRelevance:
        return epsilon(m, x, w, bias, r, eps, z)


class Gamma(ContractionRule):
    r"""Generalised gamma rule (LRP-:math:`\gamma`), valid for inputs of either sign.

    With :math:`c_{ij} = x_i w_{ij}` and :math:`c^\pm = \max/\min(c, 0)`, every output is
    explained by the contributions of its own sign, amplified by :math:`\gamma`:

    .. math::

        R_i = \sum_{j: z_j > 0}
                  \frac{c_{ij} + \gamma c^+_{ij}}{\mathrm{stab}(z^\uparrow_j)} R_j
            + \sum_{j: z_j \le 0}
                  \frac{c_{ij} + \gamma c^-_{ij}}{\mathrm{stab}(z^\downarrow_j)} R_j,

    :math:`z^\uparrow_j = \sum_i (c_{ij} + \gamma c^+_{ij}) + b_j + \gamma b^+_j` and
    :math:`z^\downarrow_j = \sum_i (c_{ij} + \gamma c^-_{ij}) + b_j + \gamma b^-_j`.  Since
    :math:`c^+ = x^+ w^+ + x^- w^-` and :math:`c^- = x^+ w^- + x^- w^+`, in operator form
    ``z_up = f(x+, w + g w+) + f(x-, w + g w-) + (b + g b+)``,
    ``z_dn = f(x+, w + g w-) + f(x-, w + g w+) + (b + g b-)`` and

    ``R_x = x+ J^T_{w+g w+}(R_up / stab(z_up)) + x- J^T_{w+g w-}(R_up / stab(z_up))
    + x+ J^T_{w+g w-}(R_dn / stab(z_dn)) + x- J^T_{w+g w+}(R_dn / stab(z_dn))``,

    with ``R_up = R [z > 0]``, ``R_dn = R [z <= 0]``; the bias keeps
    ``(b + g b+) R_up / stab(z_up) + (b + g b-) R_dn / stab(z_dn)``.  ``z_up >= z > 0`` and
    ``z_dn <= z <= 0``, so the denominators never change sign and the rule is conservative up to
    ``eps``.  ``gamma = 0`` is the epsilon rule; ``gamma -> inf`` tends to the z-plus rule on
    positive outputs.

    Parameters
    ----------
    gamma:
        Amplification of the contributions that agree in sign with the output; ``>= 0``.
    """

    def __init__(self, gamma: float = 0.25) -> None:
        from ..errors import RuleParameterError
        from ..validation import real_number

        value = real_number(gamma, "Gamma(gamma=...)")
        if value < 0:
            raise RuleParameterError(
                f"Gamma(gamma=...) must be >= 0, got {gamma}: 0 is the epsilon rule, larger "
                "values favour contributions of the output's sign (0.25 is usual)."
            )
        self.gamma = value

    def groups(
        self, m: LinearMap, x: Tensor, w: Tensor, bias: Tensor | None, r: Tensor, eps: float
    ) -> list[RuleGroup]:
        gm = self.gamma
        xp, xn, wp, wn = _pos(x), _neg(x), _pos(w), _neg(w)
        w_up, w_dn = w + gm * wp, w + gm * wn
        # z from the four sign blocks: 4 forward passes instead of 5.
        pos = m.forward(xp, wp) + m.forward(xn, wn)  # sum of c+
        neg = m.forward(xp, wn) + m.forward(xn, wp)  # sum of c-
        z = pos + neg
        z_up, z_dn = z + gm * pos, z + gm * neg
        b_up = b_dn = None
        if bias is not None:
            z = z + bias
            b_up, b_dn = bias + gm * _pos(bias), bias + gm * _neg(bias)
            z_up, z_dn = z_up + b_up, z_dn + b_dn
        up = z > 0
        zero = torch.zeros((), dtype=r.dtype, device=r.device)
        return [
            RuleGroup(((xp, w_up), (xn, w_dn)), b_up, z_up, torch.where(up, r, zero)),
            RuleGroup(((xp, w_dn), (xn, w_up)), b_dn, z_dn, torch.where(up, zero, r)),
        ]

    def __repr__(self) -> str:
        return f"Gamma(gamma={self.gamma!r})"


def _positive_group(
    m: LinearMap, x: Tensor, w: Tensor, bias: Tensor | None, r: Tensor
) -> RuleGroup:
    """``z+ = f(x+, w+) + f(x-, w-) + b+``: the positive contributions only."""
    return _group(m, ((_pos(x), _pos(w)), (_neg(x), _neg(w))), _opt(_pos, bias), r)


def _negative_group(
    m: LinearMap, x: Tensor, w: Tensor, bias: Tensor | None, r: Tensor
) -> RuleGroup:
    """``z- = f(x+, w-) + f(x-, w+) + b-``: the negative contributions only."""
    return _group(m, ((_pos(x), _neg(w)), (_neg(x), _pos(w))), _opt(_neg, bias), r)


class ZPlus(ContractionRule):
    r"""z-plus rule (LRP-:math:`z^+`): only positive contributions count.

    .. math::

        R_i = \sum_j \frac{c^+_{ij}}{\mathrm{stab}(z^+_j)} R_j, \qquad
        z^+_j = \sum_i c^+_{ij} + b^+_j, \qquad c^+_{ij} = \max(x_i w_{ij}, 0),

    i.e. ``R_x = x+ J^T_{w+}(R / stab(z+)) + x- J^T_{w-}(R / stab(z+))`` with
    ``z+ = f(x+, w+) + f(x-, w-) + b+``; the bias keeps ``b+ R / stab(z+)``.  The denominator is
    the clamped ``z+``, never the plain ``z``, so the rule conserves relevance (up to ``eps``)
    wherever an output has a positive contribution.  Equal to ``AlphaBeta(1, 0)``.
    """

    def groups(
        self, m: LinearMap, x: Tensor, w: Tensor, bias: Tensor | None, r: Tensor, eps: float
    ) -> list[RuleGroup]:
        return [_positive_group(m, x, w, bias, r)]


class AlphaBeta(ContractionRule):
    r"""Alpha-beta rule (LRP-:math:`\alpha\beta`).

    .. math::

        R_i = \sum_j \left(\alpha \frac{c^+_{ij}}{\mathrm{stab}(z^+_j)}
              - \beta \frac{c^-_{ij}}{\mathrm{stab}(z^-_j)}\right) R_j,

    with :math:`c^\pm_{ij} = \max/\min(x_i w_{ij}, 0)`, :math:`z^+_j = \sum_i c^+_{ij} + b^+_j` and
    :math:`z^-_j = \sum_i c^-_{ij} + b^-_j`; in operator form ``z+ = f(x+, w+) + f(x-, w-) + b+``,
    ``z- = f(x+, w-) + f(x-, w+) + b-``.  The bias keeps
    ``alpha b+ R / stab(z+) - beta b- R / stab(z-)``.  With ``alpha - beta = 1`` the rule conserves
    relevance at every output that has contributions of both signs.

    Parameters
    ----------
    alpha, beta:
        Weights of the positive and negative parts; ``alpha - beta`` must be 1.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 1.0) -> None:
        from ..errors import RuleParameterError
        from ..validation import real_number

        a, b = real_number(alpha, "AlphaBeta(alpha=...)"), real_number(beta, "AlphaBeta(beta=...)")
        if b < 0:
            raise RuleParameterError(
                f"AlphaBeta(beta=...) must be >= 0 (it weights the negative contributions), got "
                f"alpha={alpha}, beta={beta}: use e.g. AlphaBeta(2, 1) or AlphaBeta(1, 0)."
            )
        if abs(a - b - 1.0) > 1e-9 * max(1.0, abs(a), abs(b)):
            raise RuleParameterError(
                f"AlphaBeta needs alpha - beta = 1 (else relevance is not conserved), got "
                f"alpha={alpha}, beta={beta}: use e.g. AlphaBeta(2, 1) or AlphaBeta(1, 0)."
            )
        self.alpha = a
        self.beta = b

    def groups(
        self, m: LinearMap, x: Tensor, w: Tensor, bias: Tensor | None, r: Tensor, eps: float
    ) -> list[RuleGroup]:
        out = [_positive_group(m, x, w, bias, self.alpha * r)]
        if self.beta != 0:
            out.append(_negative_group(m, x, w, bias, -self.beta * r))
        return out

    def __repr__(self) -> str:
        return f"AlphaBeta(alpha={self.alpha!r}, beta={self.beta!r})"


class Flat(ContractionRule):
    r"""Flat rule: relevance spread uniformly over each output's receptive field.

    .. math::

        R_i = \sum_j \frac{\mathbb{1}[i \to j]}{\mathrm{stab}(\sum_{i'} \mathbb{1}[i' \to j])} R_j,

    i.e. ``R_x = J^T_{1}(R / stab(f(1, 1)))`` with both operands replaced by ones (no ``x`` factor).
    Zero padding is not part of the receptive field.  The bias gets nothing; conservative up to
    ``eps``.
    """

    def groups(
        self, m: LinearMap, x: Tensor, w: Tensor, bias: Tensor | None, r: Tensor, eps: float
    ) -> list[RuleGroup]:
        return [_group(m, ((torch.ones_like(x), torch.ones_like(w)),), None, r)]


class WSquare(ContractionRule):
    r"""w-square rule (LRP-:math:`w^2`).

    .. math::

        R_i = \sum_j \frac{w_{ij}^2}{\mathrm{stab}(\sum_{i'} w_{i'j}^2)} R_j,

    i.e. ``R_x = J^T_{w^2}(R / stab(f(1, w^2)))``: ``x`` replaced by ones, ``w`` by ``w**2``.  The
    bias gets nothing; conservative up to ``eps``.
    """

    def groups(
        self, m: LinearMap, x: Tensor, w: Tensor, bias: Tensor | None, r: Tensor, eps: float
    ) -> list[RuleGroup]:
        return [_group(m, ((torch.ones_like(x), w * w),), None, r)]


def _bound(v: float | Tensor, x: Tensor) -> Tensor:
    t = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    try:
        return torch.broadcast_to(t, x.shape).clone()
    except RuntimeError as err:
        from ..errors import RuleParameterError

        raise RuleParameterError(
            f"ZBox bound of shape {tuple(t.shape)} does not broadcast to the first layer's input "
            f"of shape {tuple(x.shape)}: give low/high as floats or as tensors of the input's "
            "shape (or of its shape without the batch dimension, e.g. (C, 1, 1) per channel)."
        ) from err


class ZBox(ContractionRule):
    r"""z-box rule (LRP-:math:`z^\mathcal{B}`) for inputs bounded by ``low <= x <= high``.

    .. math::

        R_i = \sum_j \frac{x_i w_{ij} - l_i w^+_{ij} - h_i w^-_{ij}}{\mathrm{stab}(z^\mathcal{B}_j)}
              R_j, \qquad
        z^\mathcal{B}_j = \sum_i (x_i w_{ij} - l_i w^+_{ij} - h_i w^-_{ij}) + b_j,

    i.e. ``R_x = x J^T_w(g) - l J^T_{w+}(g) - h J^T_{w-}(g)``,
    ``g = R / stab(f(x, w) - f(l, w+) - f(h, w-) + b)``; the bias keeps ``b g`` as in the epsilon
    rule.  Conservative up to ``eps``.

    Parameters
    ----------
    low, high:
        Lower and upper bound of the input: scalars or tensors broadcastable to ``x``.
    bias:
        ``False``: leave the layer's bias out of the denominator (it gets no share), the textbook
        form without bias that Zennit computes: there the bias enters the three terms as ``b``,
        ``b+`` and ``b-`` and cancels.
    """

    def __init__(self, low: float | Tensor, high: float | Tensor, bias: bool = True) -> None:
        from ..validation import check_box

        check_box(low, high)
        self.low = low
        self.high = high
        self.bias = bool(bias)

    def groups(
        self, m: LinearMap, x: Tensor, w: Tensor, bias: Tensor | None, r: Tensor, eps: float
    ) -> list[RuleGroup]:
        lo, hi = _bound(self.low, x), _bound(self.high, x)
        pairs = ((x, w), (-lo, _pos(w)), (-hi, _neg(w)))
        return [_group(m, pairs, bias if self.bias else None, r)]

    def __repr__(self) -> str:
        def show(v: float | Tensor) -> str:
            if isinstance(v, Tensor):
                return f"tensor(shape={tuple(v.shape)})" if v.numel() > 1 else repr(v.item())
            return repr(v)

        extra = "" if self.bias else ", bias=False"
        return f"ZBox(low={show(self.low)}, high={show(self.high)}{extra})"


def parameter_relevance(
    rule: ContractionRule | Callable[..., ContractionRelevance],
    m: LinearMap,
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    r: Tensor,
    eps: float,
) -> Tensor:
    """Relevance of the weight operand ``w`` under ``rule``, in ``w``'s shape.

    Every rule splits ``R`` over modified terms ``x'_i w'_k`` (see :class:`RuleGroup`); this sums
    the same term relevances per weight entry instead of per input entry:
    ``R_w = sum w' * J^T_{x'}(R' / stab(z'))``.  So ``R_w.sum() == R_x.sum()`` for every rule.
    The plain function :func:`epsilon` is accepted too (it gives :func:`parameter_epsilon`).
    """
    if rule is epsilon:
        return parameter_epsilon(m, x, w, bias, r, eps)
    if not isinstance(rule, ContractionRule):
        raise TypeError(f"parameter_relevance needs a ContractionRule, got {rule!r}")
    rw: Tensor | None = None
    for grp in rule.groups(m, x, w, bias, r, eps):
        g = safe_divide(grp.r, grp.z, eps)
        for xa, wa in grp.pairs:
            rw = _add(rw, wa * m.vjp_w(g, xa, wa))
    return torch.zeros_like(w) if rw is None else rw
