"""Probe an unknown custom ``torch.autograd.Function`` for being element-wise.

A custom Function (BLOOM's ``GeLUFunction``, a fused activation) is one opaque autograd node
(``torch.autograd.function.BackwardCFunction``) that the op table cannot know by name.  When it
has one tensor input and one output of the same shape, its backward is called on two random
vectors ``v``: the node is element-wise exactly when its vector-Jacobian product is a diagonal
scaling, ``J^T v = (J^T 1) * v`` (an element-wise map has a diagonal Jacobian; a map that mixes
elements fails this for random ``v`` with probability 1).  Such a node gets the identity rule of
the element-wise unary ops (``R_in = R_out``, ``docs/rules.md`` section 2.5) and is listed in the
report (:attr:`~dynamiclrp.ledger.RelevanceReport.probed`); any other keeps the
``UncoveredOpError``.
"""

from __future__ import annotations

import inspect

import torch

from .base import OpEntry, ReplayContext
from .elementwise import identity


def _backward(fn, v: torch.Tensor) -> torch.Tensor | None:
    out = fn.apply(v)
    if isinstance(out, tuple):
        tensors = [t for t in out if t is not None]
        return tensors[0] if len(tensors) == 1 else None
    return out


def is_elementwise(fn, in_shape) -> tuple[bool, str]:
    """Whether the custom-Function node ``fn`` is element-wise, and why not.

    Conditions: one tensor input (``len(fn.next_functions) == 1``), one output, the output's shape
    ``in_shape``'s, and ``J^T v == (J^T 1) * v`` for two random ``v`` (fixed seed) to rounding
    (``64 u`` relative to the largest term, ``u`` the unit roundoff of the output's dtype)."""
    if len(fn.next_functions) != 1:
        return False, f"it has {len(fn.next_functions)} tensor inputs, not one"
    meta = fn._input_metadata
    if len(meta) != 1:
        return False, f"it has {len(meta)} outputs, not one"
    shape, dtype, device = tuple(meta[0].shape), meta[0].dtype, meta[0].device
    if shape != tuple(in_shape):
        return False, f"its output's shape {shape} is not its input's {tuple(in_shape)}"
    if not dtype.is_floating_point:
        return False, f"its output is {dtype}"
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        try:
            diag = _backward(fn, torch.ones(shape, dtype=dtype, device=device))
            for _ in range(2):
                v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
                jv = _backward(fn, v)
                if diag is None or jv is None or jv.shape != diag.shape:
                    return False, "its backward does not return one gradient of its input's shape"
                expected = diag * v
                tol = 64 * torch.finfo(dtype).eps * float(expected.abs().max().clamp_min(1e-30))
                if not torch.allclose(jv, expected, rtol=0.0, atol=tol):
                    return False, "its backward mixes elements (J^T v != (J^T 1) * v)"
        except Exception as err:  # reported in the UncoveredOpError, never swallowed silently
            return False, f"calling its backward to probe it raised {type(err).__name__}: {err}"
    return True, ""


def _replay_for(fn):
    """``Function.apply(x)`` when the Function's forward takes exactly ``(ctx, x)``; otherwise no
    replay (other arguments are not recorded anywhere)."""
    cls = getattr(fn, "_forward_cls", None)
    try:
        params = list(inspect.signature(cls.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    plain = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) != 2 or len(plain) != 2:
        return None

    def replay(c: ReplayContext):
        return (cls.apply(c.inputs[0]),)

    return replay


def probed_entry(fn) -> OpEntry:
    """The op-table entry of a custom Function found element-wise: the identity rule."""
    return OpEntry("elementwise-unary", identity, replay=_replay_for(fn))
