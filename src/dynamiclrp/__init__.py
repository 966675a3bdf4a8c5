"""dynamiclrp: Layer-wise Relevance Propagation for any PyTorch model, op by op.

>>> out = model(x)
>>> rel = dynamiclrp.explain(out, inputs=x, target=3)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .coverage import CoverageReport, coverage
from .engine import LRP, Plan
from .errors import (
    DynamicLRPError,
    GraphError,
    InputError,
    NonFiniteRelevanceError,
    RuleParameterError,
    SettingError,
    TargetError,
    UncoveredOpError,
    ValueRecoveryError,
)
from .ledger import RelevanceReport
from .presets import PRESETS, Rules, preset
from .recording import Recording, record
from .rules import OP_TABLE
from .rules.linear import AlphaBeta, Epsilon, Flat, Gamma, WSquare, ZBox, ZPlus

__version__ = "0.1.0"


def explain(
    output: Tensor,
    inputs: Tensor | Sequence[Tensor],
    target=None,
    *,
    relevance: Tensor | None = None,
    rules: str | Rules = "dynamiclrp",
    return_report: bool = False,
    recording: Recording | None = None,
    dtype=None,
):
    """Explain ``output`` in terms of ``inputs`` with LRP on the autograd graph.

    Parameters
    ----------
    output:
        A tensor with a ``grad_fn`` (the result of a forward pass with autograd recording).
    inputs:
        A tensor or a sequence of tensors the output depends on: leaves (data with
        ``requires_grad``, parameters) or intermediate tensors captured during the forward pass.
        The relevance of a tensor is the sum over all of its uses.
    target:
        ``None``: seed with the output itself.  For a 2-D ``(batch, classes)`` output, an int class
        or one class per row.
    relevance:
        An explicit seed of the output's shape (instead of ``target``).
    rules:
        A preset name or a :class:`Rules` object.
    return_report:
        Also return the :class:`RelevanceReport` (where relevance went).
    recording:
        A :func:`record` of the forward pass, for models that add or fill with constants that do
        not require grad where nothing else kept the result (eager attention masks, frozen
        biases); the error message says when it is needed.
    dtype:
        The dtype relevance is computed in (default: the output's).  ``torch.float32`` for a
        ``bfloat16`` or ``float16`` model accumulates in float32 on the model's own forward values
        (:mod:`dynamiclrp.precision`); the relevance returned has each input's dtype.

    Returns
    -------
    One relevance tensor per input (same shape, dtype and device), a single tensor when
    ``inputs`` was a single tensor; with ``return_report=True`` a ``(relevance, report)`` pair.
    """
    lrp = LRP(rules, cache_size=0)
    rel = lrp.explain(output, inputs, target, relevance=relevance, recording=recording, dtype=dtype)
    return (rel, lrp.report) if return_report else rel


def attribute(
    model,
    inputs,
    target=None,
    *,
    rules: str | Rules = "dynamiclrp",
    return_report: bool = False,
    relevance: Tensor | None = None,
    dtype=None,
    **forward_kwargs,
):
    """Run ``model(*inputs, **forward_kwargs)`` and explain its output in terms of ``inputs``.

    The model-level counterpart of :func:`explain`: the forward pass runs under
    :func:`record` (``record(model)``), so no knowledge of recording is needed::

        rel = dynamiclrp.attribute(model.eval(), x, target=3)
        rel = dynamiclrp.attribute(llm, {"inputs_embeds": e}, target=t, attention_mask=m)

    Parameters
    ----------
    model:
        The model (an ``nn.Module`` or a callable), run in its current mode.
    inputs:
        A floating-point tensor, a tuple (positional) or a dict (by name) of them; copies that
        require grad are made where they do not.
    target, relevance, dtype:
        As for :func:`explain`.
    rules, return_report:
        As for :func:`explain`.
    **forward_kwargs:
        Passed to the model; they receive no relevance.

    Returns
    -------
    The relevance in the form of ``inputs`` (see :meth:`LRP.attribute`); with
    ``return_report=True`` a ``(relevance, report)`` pair.
    """
    lrp = LRP(rules, cache_size=0)
    rel = lrp.attribute(model, inputs, target, relevance=relevance, dtype=dtype, **forward_kwargs)
    return (rel, lrp.report) if return_report else rel


__all__ = [
    "LRP",
    "CoverageReport",
    "coverage",
    "OP_TABLE",
    "PRESETS",
    "AlphaBeta",
    "DynamicLRPError",
    "Epsilon",
    "Flat",
    "Gamma",
    "GraphError",
    "InputError",
    "RuleParameterError",
    "SettingError",
    "NonFiniteRelevanceError",
    "Plan",
    "Recording",
    "RelevanceReport",
    "Rules",
    "TargetError",
    "UncoveredOpError",
    "ValueRecoveryError",
    "WSquare",
    "ZBox",
    "ZPlus",
    "attribute",
    "explain",
    "preset",
    "record",
]
