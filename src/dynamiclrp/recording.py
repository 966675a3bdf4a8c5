"""Recording the few forward values autograd keeps no trace of.

Autograd records nothing of a constant that does not require grad: ``scores + causal_mask``,
``x.masked_fill(mask, -inf)``, ``torch.where(c, x, 0.0)``, or the bias of a frozen layer.  Where no
other node saved the result, such a value cannot be rebuilt after the fact, and the engine says so.
Running the forward pass under :func:`record` keeps exactly those results (and nothing else)::

    with dynamiclrp.record() as rec:        # record(model) for a model with frozen parameters
        out = model(x)
    rel = dynamiclrp.explain(out, x, target=0, recording=rec)

The recording holds a copy of each recorded result (one tensor per such op: an extra activation
for each frozen layer) until it is dropped; it changes nothing in the forward computation.  Ops
that C++ composites create internally (the causal mask that the math path of
``scaled_dot_product_attention`` adds, e.g. for 3-D inputs) are not visible to it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .rules import OP_TABLE
from .rules.contraction import conv_has_bias


def _has_unrecorded_input(fn) -> bool:
    return any(f is None for f, _ in fn.next_functions)


def _conv_bias_unrecorded(fn) -> bool:
    return fn.next_functions[2][0] is None and conv_has_bias(fn)


def _norm_bias_unrecorded(fn) -> bool:
    return fn.next_functions[2][0] is None and getattr(fn, "_saved_weight", None) is not None


RESHAPES = {name for name, e in OP_TABLE.items() if e.canonize == "reshape"}

NEEDS_RECORDING = {
    "AddBackward0": _has_unrecorded_input,
    "SubBackward0": _has_unrecorded_input,
    "WhereBackward0": _has_unrecorded_input,
    "MaskedFillBackward0": lambda fn: True,
    "MaskedFillBackward1": _has_unrecorded_input,
    "AddcmulBackward0": lambda fn: (
        fn.next_functions[0][0] is None
        or (fn.next_functions[1][0] is None and fn.next_functions[2][0] is None)
    ),
    "AddcdivBackward0": lambda fn: (
        fn.next_functions[0][0] is None
        or (fn.next_functions[1][0] is None and fn.next_functions[2][0] is None)
    ),
    "LerpBackward0": _has_unrecorded_input,
    "IndexAddBackward0": lambda fn: fn.next_functions[0][0] is None,
    # a Python scalar recorded nowhere: c - x, x + c, x - c as unary nodes (no replay)
    "RsubBackward1": lambda fn: True,
    "AddBackward1": lambda fn: True,
    "SubBackward1": lambda fn: True,
    # an in-place write into a slice (y[:, 0] = v): no replay
    "CopySlices": lambda fn: True,
    "AddmmBackward0": lambda fn: fn.next_functions[0][0] is None,
    "BaddbmmBackward0": lambda fn: fn.next_functions[0][0] is None,
    "ConvolutionBackward0": _conv_bias_unrecorded,
    "NativeBatchNormBackward0": _norm_bias_unrecorded,
    "NativeGroupNormBackward0": _norm_bias_unrecorded,
}


class Recording(TorchFunctionMode):
    """The results of ops whose constant operands autograd does not record (see module doc).

    Parameters
    ----------
    model:
        Optional.  Its frozen parameters (``requires_grad=False``) are made to require grad for
        the duration of the forward pass, so autograd records them like any parameter (a frozen
        bias then needs no recording, also inside composites such as
        ``F.multi_head_attention_forward`` that the recording cannot look into).  The flags are
        restored on exit; the graph of that forward pass keeps the parameters as leaves.
    """

    def __init__(self, model: torch.nn.Module | None = None):
        if model is not None and not isinstance(model, torch.nn.Module):
            from .errors import SettingError

            raise SettingError(
                f"record(model=...) takes the nn.Module whose frozen parameters should be recorded "
                f"(or nothing), got {type(model).__name__}: pass the model itself, e.g. "
                "record(model)."
            )
        super().__init__()
        self._values: dict = {}
        self._model = model
        self._unfrozen: list[torch.nn.Parameter] = []

    def __enter__(self):
        if self._model is not None:
            self._unfrozen = [p for p in self._model.parameters() if not p.requires_grad]
            for p in self._unfrozen:
                p.requires_grad_(True)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for p in self._unfrozen:
                p.requires_grad_(False)
            self._unfrozen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, Tensor):
            self._keep(out)
        elif isinstance(out, tuple):
            for t in out:
                if isinstance(t, Tensor):
                    self._keep(t)
        if args and isinstance(args[0], Tensor) and args[0] is not out:
            self._keep(args[0])  # in-place writes (y[:, 0] = v) change their first argument
        return out

    def _keep(self, t: Tensor) -> None:
        fn = t.grad_fn
        # composite ops (F.linear on 3-D input) return a reshape of the node that needs recording
        while fn is not None and type(fn).__name__ in RESHAPES:
            fn = fn.next_functions[0][0]
        if fn is None:
            return
        check = NEEDS_RECORDING.get(type(fn).__name__)
        if check is not None and check(fn) and fn not in self._values:
            # a copy: an in-place op (ReLU(inplace=True)) may overwrite the result later
            value = t.detach().reshape(fn._input_metadata[0].shape).clone()
            self._values[fn] = value

    def __len__(self) -> int:
        return len(self._values)

    def values_for(self, graph) -> dict:
        """``edge -> value`` for the recorded nodes that are part of ``graph``."""
        found = {}
        for fn, value in self._values.items():
            j = graph.index.get(fn)
            if j is not None:
                found[(j, 0)] = value
        return found


def record(model: torch.nn.Module | None = None) -> Recording:
    """Context manager: run the forward pass under it to record what autograd does not.

    Pass ``model`` when its parameters are frozen (see :class:`Recording`).
    """
    return Recording(model)
