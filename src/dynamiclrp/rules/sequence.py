"""Sequence-model ops: state-space scans, mixture-of-experts routing and grouped products.

Mamba's reference path (``slow_forward``: causal conv1d, selective scan written as a Python loop of
``mul``/``add``/``bmm``, ``stack``) and mixture-of-experts routing (``topk``, ``softmax``, gathers)
record only ops that other families already cover.  This module holds the two ops that mixture-of-
experts layers add on top:

- ``grouped_mm`` (family ``contraction``), the expert products of ``transformers``' default
  ``experts_implementation="grouped_mm"``: every group ``e`` of a jagged operand is multiplied by
  its own matrix, ``z[rows of e] = x[rows of e] @ W[e]``.  It is a contraction linear in each
  operand, so the contraction rules apply unchanged (section 2.1/2.2 of ``docs/rules.md``): with a
  constant weight the preset's ``dense`` rule or a per-layer override (epsilon by default,
  ``R_x = x * J_x^T(R / stab(z))``), with two data operands the uniform rule
  (``R_a = a * J_a^T g / 2``, ``R_b = b * J_b^T g / 2``, ``g = R / stab(z)``).  ``J^T`` is the
  per-group transpose product written out below, so the rule also runs in float64, which the CPU
  kernel does not.
- ``index_add`` (family ``elementwise-binary``), the scatter-add that combines expert outputs in
  the reference (``eager``) experts loop: ``out = self.index_add(dim, index, alpha * source)``, a
  sum of terms split like add (``Rules.add``, section 2.3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ValueRecoveryError
from .base import OpEntry, ReplayContext, RuleContext, ratio, self_unrecorded
from .contraction import contract
from .linear import LinearMap, matmul_map, safe_divide

# --- grouped matrix product ----------------------------------------------------------------------


def _bounds(offs: Tensor) -> list[tuple[int, int, int]]:
    """``(group, start, end)`` of each group of a jagged dimension; ``offs[g]`` ends group ``g``."""
    ends = [int(e) for e in offs.tolist()]
    return [(g, 0 if g == 0 else ends[g - 1], e) for g, e in enumerate(ends)]


def grouped_mm_map(offs: Tensor | None, a_dim: int, b_dim: int) -> LinearMap:
    """``z = grouped_mm(a, b, offs)`` (``torch._grouped_mm``) written out per group.

    ============  =======================================  ========================================
    a, b          ``offs`` partitions                      output
    ============  =======================================  ========================================
    2-D, 3-D      the rows of ``a`` (``M``)                ``z[s:e] = a[s:e] @ b[g]``, (M, N)
    3-D, 2-D      the columns of ``b`` (``N``)             ``z[:, s:e] = a[g] @ b[:, s:e]``, (M, N)
    2-D, 2-D      the shared dimension ``K``               ``z[g] = a[:, s:e] @ b[s:e]``, (G, M, N)
    3-D, 3-D      nothing (``offs`` is ``None``)           ``z[g] = a[g] @ b[g]``, (G, M, N)
    ============  =======================================  ========================================

    Elements beyond ``offs[-1]`` belong to no group: their output is 0 here (the kernel leaves
    them unwritten) and they receive no relevance.
    """
    if offs is None:
        return matmul_map()
    bounds = _bounds(offs)

    def zeros(x: Tensor, w: Tensor, shape) -> Tensor:
        return torch.zeros(shape, dtype=torch.promote_types(x.dtype, w.dtype), device=x.device)

    if (a_dim, b_dim) == (2, 3):

        def forward(a, b):
            z = zeros(a, b, (a.shape[0], b.shape[-1]))
            for g, s, e in bounds:
                z[s:e] = a[s:e] @ b[g]
            return z

        def vjp_a(gz, a, b):
            out = torch.zeros_like(a)
            for g, s, e in bounds:
                out[s:e] = gz[s:e] @ b[g].transpose(0, 1)
            return out

        def vjp_b(gz, a, b):
            out = torch.zeros_like(b)
            for g, s, e in bounds:
                out[g] = a[s:e].transpose(0, 1) @ gz[s:e]
            return out

    elif (a_dim, b_dim) == (3, 2):

        def forward(a, b):
            z = zeros(a, b, (a.shape[1], b.shape[-1]))
            for g, s, e in bounds:
                z[:, s:e] = a[g] @ b[:, s:e]
            return z

        def vjp_a(gz, a, b):
            out = torch.zeros_like(a)
            for g, s, e in bounds:
                out[g] = gz[:, s:e] @ b[:, s:e].transpose(0, 1)
            return out

        def vjp_b(gz, a, b):
            out = torch.zeros_like(b)
            for g, s, e in bounds:
                out[:, s:e] = a[g].transpose(0, 1) @ gz[:, s:e]
            return out

    elif (a_dim, b_dim) == (2, 2):

        def forward(a, b):
            z = zeros(a, b, (len(bounds), a.shape[0], b.shape[-1]))
            for g, s, e in bounds:
                z[g] = a[:, s:e] @ b[s:e]
            return z

        def vjp_a(gz, a, b):
            out = torch.zeros_like(a)
            for g, s, e in bounds:
                out[:, s:e] = gz[g] @ b[s:e].transpose(0, 1)
            return out

        def vjp_b(gz, a, b):
            out = torch.zeros_like(b)
            for g, s, e in bounds:
                out[s:e] = a[:, s:e].transpose(0, 1) @ gz[g]
            return out

    else:
        raise NotImplementedError(f"grouped_mm of a {a_dim}-D and a {b_dim}-D operand with offs")
    return LinearMap(forward, vjp_a, vjp_b)


def _grouped_map(fn) -> LinearMap:
    return grouped_mm_map(
        fn._saved_offs, len(fn._saved_self_sym_sizes), len(fn._saved_mat2_sym_sizes)
    )


def grouped_mm_rule(ctx: RuleContext):
    """``z = grouped_mm(x, W, offs)``: the contraction rules on the per-group products (module
    docstring): ``Rules.dense`` or an override keyed on ``W`` for one data operand, the uniform
    rule for two.  A ``bias`` passed to ``grouped_mm`` is neither recorded nor saved by autograd
    and is not seen."""
    return contract(ctx, _grouped_map(ctx.fn), "dense", (0, 1), None)


# --- index_add: scatter-add of a source into self ------------------------------------------------


def _index_add_terms(ctx: RuleContext) -> tuple[Tensor, Tensor]:
    """``self`` and ``alpha * source``, the two kinds of summands of the output.

    An unrecorded ``self`` (``torch.zeros(...).index_add_(...)``, the accumulator of an experts
    loop) is rebuilt as ``out - index_add(0, alpha * source)`` when the output's value is known.
    """
    dim, index, alpha = (
        ctx.saved("_saved_dim"),
        ctx.saved("_saved_index"),
        ctx.saved("_saved_alpha"),
    )
    src = ctx.saved("_saved_source")
    src = src if alpha == 1 else alpha * src
    if ctx.fn.next_functions[0][0] is not None:
        return ctx.input_value(0), src
    try:
        out = ctx.output_value(0)
    except ValueRecoveryError as err:
        raise ValueRecoveryError(
            f"{ctx.fn.name()} (node {ctx.idx}) adds into a tensor that does not require grad (a "
            "torch.zeros accumulator), so autograd recorded neither it nor the sum, and no node "
            "saved the sum: the add rule cannot see the accumulator's value. Make the "
            "accumulator require grad, or explain this node's output itself."
        ) from err
    return out - torch.zeros_like(out).index_add(dim, index, src), src


def index_add_rule(ctx: RuleContext):
    """``out = self.index_add(dim, index, alpha * source)``: each output element is ``self`` plus
    the source elements scattered onto it; ``R`` is split over those summands like add
    (``Rules.add``), with ``t = alpha * source``, ``S`` the scatter-add and ``G`` its transpose
    (``index_select`` along ``dim``):

    - proportional: ``g = R / (|self| + S|t|)`` (0 where the denominator is 0 or infinite),
      ``R_self = |self| * g``, ``R_source = |t| * G g``;
    - signed: ``g = R / stab(self + S t)``, ``R_self = self * g``, ``R_source = t * G g``.

    An unrecorded ``self`` takes its share, which is absorbed; a source that does not require
    grad is seen as ``out - self`` (:func:`.summing.constant_added`).  No relevance is created or lost
    except through ``stab`` (signed) or all-zero sums (proportional)."""
    if ctx.fn.next_functions[1][0] is None:  # saved neither source nor index: self + C
        from .summing import constant_added

        return constant_added(ctx)
    dim, index = ctx.saved("_saved_dim"), ctx.saved("_saved_index")
    a, t = _index_add_terms(ctx)
    if ctx.rules.add == "proportional":
        a, t = a.abs(), t.abs()
        den = a.index_add(dim, index, t)
        g = ratio(ctx.r, den)  # 0 where den is 0; r / inf is 0 where it is infinite
    else:
        g = safe_divide(ctx.r, a.index_add(dim, index, t), ctx.eps)
    gs = g.index_select(dim, index).reshape(t.shape)
    return [a * g, t * gs]


def _index_add_replay(c: ReplayContext):
    x, src = c.inputs
    if x is None:
        raise ValueRecoveryError(
            "index_add into a tensor that does not require grad (a torch.zeros accumulator): "
            "autograd kept no trace of the accumulator's value, so the sum cannot be replayed"
        )
    return (
        x.index_add(
            c.saved("_saved_dim"), c.saved("_saved_index"), src, alpha=c.saved("_saved_alpha")
        ),
    )


TABLE = {
    "GroupedMmBackward0": OpEntry(
        "contraction",
        grouped_mm_rule,
        saved_inputs={0: "_saved_self", 1: "_saved_mat2"},
        replay=lambda c: (_grouped_map(c.fn).forward(c.inputs[0], c.inputs[1]),),
    ),
    "IndexAddBackward0": OpEntry(
        "elementwise-binary",
        index_add_rule,
        needs_values=True,
        saved_inputs={1: "_saved_source"},
        replay=_index_add_replay,
        unrecorded=self_unrecorded,
    ),
}
