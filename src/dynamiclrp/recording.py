"""Recording the few forward values autograd keeps no trace of.

Autograd records nothing of a constant that does not require grad: ``scores + causal_mask``,
``x.masked_fill(mask, -inf)``, ``torch.where(c, x, 0.0)``, or the bias of a frozen layer.  Where no
other node saved the result, such a value cannot be rebuilt after the fact, and the engine says so.
Running the forward pass under :func:`record` keeps exactly those results (and nothing else)::

    with dynamiclrp.record() as rec:
        out = model(x)
    rel = dynamiclrp.explain(out, x, target=0, recording=rec)

The recording holds the recorded results (one tensor per such op) until it is dropped; it changes
nothing in the forward computation.
"""

from __future__ import annotations

from torch import Tensor
from torch.overrides import TorchFunctionMode

from .errors import ValueRecoveryError


def _has_unrecorded_input(fn) -> bool:
    return any(f is None for f, _ in fn.next_functions)


def _conv_bias_unrecorded(fn) -> bool:
    sizes = getattr(fn, "_saved_bias_sym_sizes_opt", None)
    return fn.next_functions[2][0] is None and bool(sizes) and tuple(sizes) != (0,)


def _norm_bias_unrecorded(fn) -> bool:
    return fn.next_functions[2][0] is None and getattr(fn, "_saved_weight", None) is not None


NEEDS_RECORDING = {
    "AddBackward0": _has_unrecorded_input,
    "SubBackward0": _has_unrecorded_input,
    "WhereBackward0": _has_unrecorded_input,
    "MaskedFillBackward0": lambda fn: True,
    "MaskedFillBackward1": _has_unrecorded_input,
    "AddmmBackward0": lambda fn: fn.next_functions[0][0] is None,
    "BaddbmmBackward0": lambda fn: fn.next_functions[0][0] is None,
    "ConvolutionBackward0": _conv_bias_unrecorded,
    "NativeBatchNormBackward0": _norm_bias_unrecorded,
    "NativeGroupNormBackward0": _norm_bias_unrecorded,
}


class Recording(TorchFunctionMode):
    """The results of ops whose constant operands autograd does not record (see module doc)."""

    def __init__(self):
        super().__init__()
        self._values: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, Tensor):
            self._keep(out)
        elif isinstance(out, tuple):
            for t in out:
                if isinstance(t, Tensor):
                    self._keep(t)
        return out

    def _keep(self, t: Tensor) -> None:
        fn = t.grad_fn
        if fn is None:
            return
        check = NEEDS_RECORDING.get(type(fn).__name__)
        if check is not None and check(fn):
            value = t.detach()
            self._values[fn] = (value, value._version)

    def __len__(self) -> int:
        return len(self._values)

    def values_for(self, graph) -> dict:
        """``edge -> value`` for the recorded nodes that are part of ``graph``."""
        found = {}
        for fn, (value, version) in self._values.items():
            j = graph.index.get(fn)
            if j is None:
                continue
            if value._version != version:
                raise ValueRecoveryError(
                    f"The recorded output of {graph.describe(j)} was modified in place after it "
                    "was recorded; record and explain a forward pass that does not modify it."
                )
            found[(j, 0)] = value
        return found


def record() -> Recording:
    """Context manager: run the forward pass under it to record what autograd does not."""
    return Recording()
