"""The dtype relevance is computed in, when it should differ from the model's.

A model run in ``bfloat16`` or ``float16`` saves its forward values in that dtype.  By default an
explanation computes relevance in the output's dtype, like the gradient would.  With
``dtype=torch.float32`` (:class:`~dynamiclrp.LRP` or :func:`~dynamiclrp.explain`) every floating
forward value a rule reads (``_saved_*`` tensors, parameters, values rebuilt by promises) is
converted to ``float32`` when first read, so the rules accumulate in ``float32`` on the model's own
forward values; the relevance returned is converted back to each input's dtype.

The conversion happens on read, through :class:`CastNode`, a read-only view of an autograd node:
the graph and its saved tensors are not modified.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .errors import DynamicLRPError
from .graph import Graph

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class PrecisionError(DynamicLRPError, ValueError):
    """A relevance dtype that cannot be used."""


def check_dtype(dtype) -> torch.dtype | None:
    """``dtype`` if it is ``None`` or a floating dtype, else :class:`PrecisionError`."""
    if dtype is None or dtype in FLOATING:
        return dtype
    raise PrecisionError(
        f"dtype={dtype!r} cannot hold relevance: pass None (the output's dtype) or one of "
        "torch.float32, torch.float64, torch.bfloat16, torch.float16 (torch.float32 is the usual "
        "choice for a bfloat16 or float16 model)."
    )


class CastNode:
    """An autograd node whose floating ``_saved_*`` tensors (and ``variable``) read as ``dtype``.

    Every other attribute (``next_functions``, ``_input_metadata``, ``name()``) is the node's own.
    Converted tensors are kept for the node's lifetime, so a value read twice is converted once.
    """

    __slots__ = ("_fn", "_dtype", "_cache")

    def __init__(self, fn, dtype: torch.dtype):
        self._fn = fn
        self._dtype = dtype
        self._cache: dict[str, object] = {}

    def __getattr__(self, name: str):
        value = getattr(self._fn, name)
        if not (name.startswith("_saved_") or name == "variable"):
            return value
        hit = self._cache.get(name)
        if hit is None:
            hit = self._cache[name] = self._convert(value)
        return hit

    def __call__(self, *grads):
        """The node's own backward (routing rules run it on relevance), in the dtype the node
        computed in (kernels such as max-pool's check it); the result reads as ``dtype``.  Exact
        for the pure routing ops that call it; the relevance is rounded to the node's dtype."""
        meta = self._fn._input_metadata
        grads = tuple(
            g.to(m.dtype) if isinstance(g, Tensor) and g.dtype != m.dtype else g
            for g, m in zip(grads, meta, strict=False)
        )
        out = self._fn(*grads)
        if isinstance(out, tuple):
            return tuple(None if o is None else cast_value(o, self._dtype) for o in out)
        return None if out is None else cast_value(out, self._dtype)

    def _convert(self, value):
        if isinstance(value, Tensor):
            if value.is_floating_point() and value.dtype != self._dtype:
                return value.detach().to(self._dtype)
            return value
        if isinstance(value, (tuple, list)):
            return type(value)(self._convert(v) for v in value)
        return value


def cast_graph(graph: Graph, dtype: torch.dtype) -> Graph:
    """``graph`` with every node wrapped in a :class:`CastNode` reading as ``dtype``."""
    return replace(graph, fns=[None if f is None else CastNode(f, dtype) for f in graph.fns])


def cast_value(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``t`` converted to ``dtype`` if it is floating and ``dtype`` is set."""
    if dtype is None or not t.is_floating_point() or t.dtype == dtype:
        return t
    return t.to(dtype)
