"""A Captum-compatible front end: ``DynamicLRP(model).attribute(inputs, target=...)``.

:class:`DynamicLRP` follows the interface of Captum's attribution classes (``captum.attr``), so it
drops into code written for ``captum.attr.LRP`` or ``InputXGradient``::

    from dynamiclrp.captum import DynamicLRP

    lrp = DynamicLRP(model)  # rules="dynamiclrp", or any preset name or Rules object
    attributions, delta = lrp.attribute(x, target=3, return_convergence_delta=True)

Inputs, targets and ``additional_forward_args`` take the forms Captum documents (see
:meth:`DynamicLRP.attribute`); the relevance itself comes from :func:`dynamiclrp.explain` on the
autograd graph of one forward pass, so no module needs a rule attached and no hook is registered.
Captum itself is not needed.

:func:`quantus_explain_func` adapts it to Quantus' ``explain_func`` (numpy in, numpy out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from numbers import Integral
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .engine import LRP
from .errors import GraphError, InputError, TargetError, ValueRecoveryError
from .presets import Rules
from .recording import record as _record

__all__ = ["DynamicLRP", "quantus_explain_func"]


class DynamicLRP:
    """LRP on the autograd graph behind Captum's attribution interface.

    Parameters
    ----------
    forward_func:
        An ``nn.Module`` or any callable ``forward_func(*inputs, *additional_forward_args)`` that
        returns a tensor whose first dimension is the batch.
    rules:
        A preset name (``"dynamiclrp"``, ``"epsilon"``, ``"zennit-*"``, ... see
        ``docs/presets.md``) or a :class:`~dynamiclrp.presets.Rules` object.
    record:
        Run the forward pass under :func:`dynamiclrp.record` (``record(forward_func)`` when it is a
        module), the default: models with frozen parameters (``requires_grad=False``) or eager
        attention masks need it, and it changes nothing in the forward pass.  Frozen flags are
        restored after the call.  When ``forward_func`` is not a module (a function wrapping
        one), frozen parameters it uses are not found: pass the module itself, or let its
        parameters require grad.  ``record=False`` skips the recording (the error then says
        when one is needed).

    Attributes
    ----------
    forward_func:
        As given (Captum's name).
    report:
        The :class:`~dynamiclrp.ledger.RelevanceReport` of the last :meth:`attribute` call (books
        of the whole batch), ``None`` before the first.

    Notes
    -----
    A call leaves the model as it was: train/eval mode, parameters, their ``requires_grad`` flags
    and ``.grad`` are not touched, no hook is registered, and the caller's input tensors are only
    read (the forward pass sees detached copies that require grad).  Plans of the graph structures
    seen are cached (``LRP(rules, cache_size=8)``); they hold no tensors.
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        rules: str | Rules = "dynamiclrp",
        *,
        record: bool = True,
    ):
        if not callable(forward_func):
            raise InputError(
                f"forward_func must be an nn.Module or a callable, got {type(forward_func).__name__}"
            )
        self.forward_func = forward_func
        self.record = record
        self._lrp = LRP(rules, cache_size=8)
        self.report = None

    @property
    def rules(self) -> Rules:
        """The :class:`~dynamiclrp.presets.Rules` in use."""
        return self._lrp.rules

    def has_convergence_delta(self) -> bool:
        """``True``: LRP conserves relevance, so :meth:`attribute` can report what it lost."""
        return True

    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: Any = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
    ):
        """Relevance of each input for the selected output of ``forward_func``.

        Parameters
        ----------
        inputs:
            A tensor or a tuple of tensors, dimension 0 the batch (``N``).  They need not require
            grad and are never modified.
        target:
            Which output entry to explain per example, in Captum's grammar (``output`` is
            ``forward_func(*inputs, *additional_forward_args)``):

            - ``None``: the output must hold one value per example, shape ``(N,)`` or ``(N, 1)``;
            - an ``int`` ``k`` (or a tensor holding one integer): ``output[:, k]``;
            - a ``tuple`` of ints (or slices) for outputs with more than two dimensions:
              ``output[(slice(None), *target)]``;
            - a ``list`` of ``N`` ints or a 1-D integer tensor of length ``N``, for a 2-D output:
              ``output[i, target[i]]``;
            - a ``list`` of ``N`` tuples: ``output[(i, *target[i])]``.

            After selection there must be exactly one value per example (Captum's
            "Target not provided when necessary").  Bools and floating-point targets are
            rejected.  The seed of the explanation is the output's value at the selected entries,
            zero elsewhere.
        additional_forward_args:
            A value or a tuple of values passed after ``inputs`` to ``forward_func`` (a single
            non-tuple value is wrapped into a tuple, as in Captum).  They receive no relevance.
        return_convergence_delta:
            Also return ``delta``, shape ``(N,)``: per example, the seeded relevance (the selected
            output value) minus the sum of the relevance at all inputs.  It is computed in float64
            and returned in the output's dtype.  Zero up to the stabiliser for a network that
            conserves relevance; biases absorb their share.

        Returns
        -------
        The attributions, a tensor or a tuple like ``inputs`` (each of its input's shape, dtype
        and device); with ``return_convergence_delta=True`` an ``(attributions, delta)`` pair.

        Raises
        ------
        InputError
            ``inputs`` is not a tensor or a tuple of tensors, an input is not floating point, or
            ``forward_func`` did not return a tensor with a batch dimension.
        TargetError
            ``target`` does not fit the output.
        GraphError, UncoveredOpError, ValueRecoveryError, NonFiniteRelevanceError
            From :func:`dynamiclrp.explain`.
        """
        is_tuple = isinstance(inputs, tuple)
        originals = _format_inputs(inputs)
        extra = _format_additional_forward_args(additional_forward_args)
        if torch.is_inference_mode_enabled():
            raise GraphError(
                "DynamicLRP.attribute was called inside torch.inference_mode(), where autograd "
                "records nothing. Call it outside inference_mode (torch.no_grad() is fine)."
            )
        leaves = tuple(_leaf_copy(x) for x in originals)
        with torch.enable_grad():
            if self.record:
                model = (
                    self.forward_func if isinstance(self.forward_func, torch.nn.Module) else None
                )
                with _record(model) as recording:
                    output = self.forward_func(*leaves, *extra)
            else:
                recording = None
                output = self.forward_func(*leaves, *extra)
        output = _check_output(output)
        seed, seeded = _target_seed(output.detach(), target)
        try:
            relevance = self._lrp.explain(output, leaves, relevance=seed, recording=recording)
        except ValueRecoveryError as err:
            if self.record:
                raise
            raise ValueRecoveryError(
                f"{err} With DynamicLRP, pass record=True instead: "
                "DynamicLRP(model, rules, record=True)."
            ) from err
        self.report = self._lrp.report
        attributions = relevance if is_tuple else relevance[0]
        if not return_convergence_delta:
            return attributions
        delta = (seeded.double() - _sum_rows(relevance, seeded.shape[0])).to(seeded.dtype)
        return attributions, delta

    def compute_convergence_delta(
        self, attributions: Tensor | tuple[Tensor, ...], output: Tensor
    ) -> Tensor:
        """``output - sum of attributions`` per example, as Captum's ``LRP`` computes it.

        Parameters
        ----------
        attributions:
            A tensor or a tuple of tensors, dimension 0 the batch.
        output:
            The explained output value per example (``N`` values, any shape).

        Returns
        -------
        Shape ``(N,)``, in ``output``'s dtype (summed in float64).
        """
        if not isinstance(output, Tensor):
            raise InputError(f"output must be a tensor, got {type(output).__name__}")
        flat = output.detach().reshape(-1)
        summed = _sum_rows(_format_inputs(attributions, "attributions"), flat.numel())
        return (flat.double() - summed.to(flat.device)).to(flat.dtype)

    def attribute_future(self, *args, **kwargs):
        """Not supported (as for Captum's ``LRP``): explanations are computed eagerly."""
        raise NotImplementedError("attribute_future is not implemented for DynamicLRP")


def quantus_explain_func(
    model: torch.nn.Module,
    inputs,
    targets,
    rules: str | Rules = "dynamiclrp",
    *,
    device: str | torch.device | None = None,
    additional_forward_args: Any = None,
    record: bool = True,
) -> np.ndarray:
    """Quantus' ``explain_func``: ``explain_func(model=..., inputs=x_batch, targets=y_batch)``.

    Pass it as ``metric(model=model, x_batch=x, y_batch=y, explain_func=quantus_explain_func,
    explain_func_kwargs={"rules": "epsilon"})``.

    Parameters
    ----------
    model:
        The model (a callable; Quantus passes the ``nn.Module``).
    inputs:
        ``np.ndarray`` (or tensor) batch.  Converted to a tensor on ``device`` (default: the
        model's first parameter's device, else CPU) and, when floating point, to the dtype of the
        model's first floating-point parameter.
    targets:
        One class per example (``np.ndarray``, list or tensor of ints), a single int, or ``None``
        (the model then outputs one value per example).  Any target of :meth:`DynamicLRP.attribute`.
    rules:
        Preset name or :class:`~dynamiclrp.presets.Rules`.
    device:
        Quantus adds it to ``explain_func_kwargs`` when a metric is given ``device=``.
    additional_forward_args, record:
        As in :class:`DynamicLRP`.

    Returns
    -------
    ``np.ndarray`` of the inputs' shape, in the inputs' dtype when it is floating point (else the
    model's).
    """
    ref = next((p for p in _parameters(model) if p.is_floating_point()), None)
    dev = torch.device(device) if device is not None else (ref.device if ref is not None else None)
    x = torch.as_tensor(inputs)
    np_dtype = inputs.dtype if isinstance(inputs, np.ndarray) else None
    if ref is not None and x.is_floating_point():
        x = x.to(dtype=ref.dtype)
    if dev is not None:
        x = x.to(dev)
    if isinstance(targets, np.ndarray):
        if targets.dtype.kind not in "iu":
            raise TargetError(
                f"targets must hold integer class indices, got an array of dtype {targets.dtype}."
            )
        targets = torch.as_tensor(targets, dtype=torch.long, device=x.device).reshape(-1)
    elif isinstance(targets, Integral) and not isinstance(targets, bool):
        targets = int(targets)
    rel = DynamicLRP(model, rules, record=record).attribute(
        x, target=targets, additional_forward_args=additional_forward_args
    )
    out = rel.detach().cpu().numpy()
    if np_dtype is not None and np_dtype.kind == "f":
        out = out.astype(np_dtype, copy=False)
    return out


# -- helpers ----------------------------------------------------------------------------------


def _parameters(model) -> list[Tensor]:
    return list(model.parameters()) if isinstance(model, torch.nn.Module) else []


def _format_inputs(inputs, what: str = "inputs") -> tuple[Tensor, ...]:
    if isinstance(inputs, Tensor):
        return (inputs,)
    if not isinstance(inputs, tuple) or not inputs:
        kind = "an empty tuple" if isinstance(inputs, tuple) else type(inputs).__name__
        raise InputError(
            f"{what} must be a tensor or a non-empty tuple of tensors (Captum's convention), got "
            f"{kind}. Convert a list with tuple(...) and numpy arrays with torch.as_tensor."
        )
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            raise InputError(f"{what}[{i}] is a {type(t).__name__}, not a tensor.")
    return inputs


def _format_additional_forward_args(args) -> tuple:
    if args is None:
        return ()
    return args if isinstance(args, tuple) else (args,)


def _leaf_copy(x: Tensor) -> Tensor:
    if not x.is_floating_point():
        raise InputError(
            f"An input of dtype {x.dtype} (shape {tuple(x.shape)}) cannot carry relevance: only "
            "floating-point inputs have gradients. For token ids, explain the embeddings: let "
            "forward_func take inputs_embeds and pass model.get_input_embeddings()(ids)."
        )
    leaf = x.detach()
    if leaf.is_inference():
        leaf = leaf.clone()  # an inference tensor cannot require grad
    return leaf.requires_grad_(True)


def _check_output(output) -> Tensor:
    if not isinstance(output, Tensor):
        raise InputError(
            f"forward_func returned a {type(output).__name__}, not a tensor. Wrap the model so it "
            "returns the tensor to explain, e.g. lambda *a: model(*a).logits."
        )
    if output.dim() == 0:
        raise InputError(
            "forward_func returned a 0-d tensor; Captum's interface needs the batch as dimension "
            "0 (one output per example). Return shape (N,) or (N, ...) instead of a sum."
        )
    return output


def _target_seed(out: Tensor, target) -> tuple[Tensor, Tensor]:
    """The seed (``out`` at the selected entries, zero elsewhere) and the selected values ``(N,)``.

    The selection follows Captum's target grammar; it is applied to a tensor of flat positions, so
    the selected entries are known exactly, then checked to be one per example."""
    n = out.shape[0]
    positions = torch.arange(out.numel(), device=out.device).reshape(out.shape)
    selected = _select(positions, target, n)
    if selected.dim() == 0 or selected.shape[0] != n or selected[0].numel() != 1:
        what = "no target" if target is None else f"target {_show(target)}"
        raise TargetError(
            f"With {what}, the output of shape {tuple(out.shape)} gives "
            f"{tuple(selected.shape[1:])} values per example, but one scalar per example is "
            "explained (Captum: 'Target not provided when necessary'). Give a target that "
            "indexes every dimension after the batch: an int for (N, C) outputs, a tuple of "
            f"{out.dim() - 1} ints (or a list of N such tuples) for this output."
        )
    flat = selected.reshape(n)
    values = out.reshape(-1)[flat]
    seed = torch.zeros(out.shape, dtype=out.dtype, device=out.device)
    seed.view(-1)[flat] = values
    return seed, values


def _select(positions: Tensor, target, n: int) -> Tensor:
    dims = positions.dim()
    if target is None:
        return positions
    if _is_int(target):
        return _select_columns(positions, (int(target),))
    if isinstance(target, tuple):
        return _select_columns(positions, target)
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TargetError(
                f"A target tensor must hold integer indices, got dtype {target.dtype}; use "
                "target.long()."
            )
        if target.numel() == 1:
            return _select_columns(positions, (int(target.item()),))
        if target.dim() != 1 or target.numel() != n:
            raise TargetError(
                f"A target tensor must hold one integer or one per example (1-D, length {n}), "
                f"got shape {tuple(target.shape)}."
            )
        return _select_rows(positions, target.detach().cpu().tolist())
    if isinstance(target, list):
        if len(target) != n:
            raise TargetError(
                f"The target list has {len(target)} entries but the batch has {n} examples: give "
                "one target per example, or a single int / tuple for all of them."
            )
        if all(_is_int(t) for t in target):
            return _select_rows(positions, [int(t) for t in target])
        if all(isinstance(t, tuple) for t in target):
            return torch.stack(
                [_select_columns(positions[i : i + 1], t)[0] for i, t in enumerate(target)]
            )
        raise TargetError(
            "A target list must hold either ints (one class per example, 2-D outputs) or tuples "
            f"(one index tuple per example); got {_show(target)}."
        )
    raise TargetError(
        f"target must be None, an int, a tuple of ints, a list of ints or tuples, or an integer "
        f"tensor (Captum's forms), got {type(target).__name__}"
        + (" (bools are not class indices)" if isinstance(target, bool) else "")
        + (
            "; convert a numpy array with torch.as_tensor(...)"
            if isinstance(target, np.ndarray)
            else ""
        )
        + f". The output has {dims} dimensions."
    )


def _select_columns(positions: Tensor, index: tuple) -> Tensor:
    """``positions[(slice(None), *index)]`` with each index checked against its dimension."""
    shape = tuple(positions.shape)
    if len(index) > len(shape) - 1:
        raise TargetError(
            f"target {_show(index)} has {len(index)} indices but the output of shape {shape} has "
            f"only {len(shape) - 1} dimension(s) after the batch."
        )
    for dim, k in enumerate(index, start=1):
        if isinstance(k, slice):
            continue
        if not _is_int(k):
            raise TargetError(
                f"target {_show(index)}: index {dim - 1} is a {type(k).__name__}; each index must "
                "be an int (or a slice)."
            )
        if not -shape[dim] <= int(k) < shape[dim]:
            raise TargetError(
                f"target {_show(index)}: index {int(k)} is out of range for output dimension "
                f"{dim} of size {shape[dim]} (output shape {shape})."
            )
    return positions[(slice(None), *(k if isinstance(k, slice) else int(k) for k in index))]


def _select_rows(positions: Tensor, classes: Sequence[int]) -> Tensor:
    """``positions[i, classes[i]]``: one class per example of a 2-D output."""
    shape = tuple(positions.shape)
    if len(shape) != 2:
        raise TargetError(
            f"One class per example (a list of ints or a 1-D tensor) needs a 2-D (N, classes) "
            f"output; this output has shape {shape}. Give a list of N index tuples instead."
        )
    bad = [k for k in classes if not -shape[1] <= k < shape[1]]
    if bad:
        raise TargetError(
            f"target classes {bad[:8]} are out of range for {shape[1]} classes (valid: "
            f"0..{shape[1] - 1}, or negative from the end)."
        )
    index = torch.tensor(classes, dtype=torch.long, device=positions.device) % shape[1]
    return positions[torch.arange(shape[0], device=positions.device), index]


def _sum_rows(tensors: tuple[Tensor, ...], n: int) -> Tensor:
    """Per example, the float64 sum over all of ``tensors`` (each with ``n`` rows)."""
    total = None
    for i, t in enumerate(tensors):
        if t.dim() == 0 or t.shape[0] != n:
            raise InputError(
                f"Attribution {i} has shape {tuple(t.shape)}, but the convergence delta sums it "
                f"per example over {n} examples: every input needs the batch as dimension 0."
            )
        rows = t.detach().double().reshape(n, -1).sum(1)
        total = rows if total is None else total + rows.to(total.device)
    return total


def _is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _show(target) -> str:
    text = repr(target)
    return text if len(text) <= 60 else text[:57] + "..."
