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
that C++ composites create internally are not visible to it, with one exception handled here:
when ``scaled_dot_product_attention`` takes PyTorch's C++ math path (float32 grouped-query
attention on CUDA, multi-query attention, 3-D inputs, a forced math backend), it adds the mask
(``is_causal``, a boolean or a float ``attn_mask``) to the scores inside C++.  The recording
rebuilds that sum, ``(q k^T) * scale + mask``, from the call's own arguments and keeps it for the
``AddBackward0`` node the composite made (reshaped where the math path ran 3-D inputs as 4-D).

The recording is transparent: code that runs without it runs with it, with the same values, graph,
gradients and random stream.  It reads nothing under ``no_grad`` or ``inference_mode`` (autograd
makes no node there), and of each op only the tensors it returned and the first argument when the
op wrote it (its version counter moved), bypassing tensor subclasses' ``__torch_function__``:
reading the ``grad_fn`` of an arbitrary argument can raise (a view made under ``no_grad`` whose
base was written since, as ``nn.Embedding(padding_idx=...)`` makes) where the code itself does
not.  :func:`dynamiclrp.attribute` runs the forward pass under it for the caller.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .rules import OP_TABLE
from .rules.attention import FUSED_SDPA_NODES
from .rules.base import has_unrecorded_input

RESHAPES = {name for name, e in OP_TABLE.items() if e.canonize == "reshape"}

#: node type -> ``fn -> bool``: whether that node's output depends on a constant autograd did not
#: record (``OpEntry.unrecorded``, stated in the op table), so the recording keeps its result
NEEDS_RECORDING = {name: e.unrecorded for name, e in OP_TABLE.items() if e.unrecorded is not None}


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
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():  # no_grad and inference_mode: autograd makes no node
            return func(*args, **kwargs)
        first = args[0] if args and isinstance(args[0], Tensor) else None
        before = _version(first)
        out = func(*args, **kwargs)
        # reads go to the tensors' C++ attributes, not to a subclass's __torch_function__
        with torch._C.DisableTorchFunctionSubclass():
            for t in tree_leaves(out):
                if isinstance(t, Tensor):
                    self._keep(t)
            # an in-place write (y[:, 0] = v, h[:, :3].add_(c)) changes its first argument, and
            # through a view the view's base (a CopySlices node): keep both.  Only a tensor the op
            # wrote is read: reading the grad_fn of any argument could raise (a view made under
            # no_grad whose base was written since) where the unrecorded code would not.
            if first is not None and _version(first) != before:
                self._keep(first)
                if first._base is not None:
                    self._keep(first._base)
            if func is _SDPA and isinstance(out, Tensor) and out.grad_fn is not None:
                self._keep_sdpa_mask_add(out, args, kwargs)
        return out

    def _keep_sdpa_mask_add(self, out: Tensor, args: tuple, kwargs: dict) -> None:
        """Keep ``scores + mask`` for the math path of SDPA, whose mask add autograd hides."""
        if type(out.grad_fn).__name__ in FUSED_SDPA_NODES:
            return
        call = _sdpa_arguments(*args, **kwargs)
        if call["attn_mask"] is None and not call["is_causal"]:
            return  # the math path adds nothing then
        tensors = [t for t in call.values() if isinstance(t, Tensor)]
        if any(t.is_nested or t.layout != torch.strided for t in tensors):
            return  # not rebuilt here (nor explained by the engine)
        stops = {t.grad_fn for t in call.values() if isinstance(t, Tensor)} - {None}
        adds = _unrecorded_adds_below(out.grad_fn, stops)
        if len(adds) != 1:
            return  # not the layout we know: the engine's error names the node
        fn = adds[0]
        with torch.no_grad():
            value = _scores_plus_mask(**call)
        shape = tuple(fn._input_metadata[0].shape)
        if _strip_ones(value.shape) == _strip_ones(shape):
            # the math path may add leading unit dimensions (3-D inputs run as 4-D ones)
            self._values[fn] = value.reshape(shape).to(fn._input_metadata[0].dtype)

    def _keep(self, t: Tensor) -> None:
        if not t.requires_grad or t.is_nested or t.layout != torch.strided:
            return  # no node; or a nested / sparse tensor, which the engine does not explain
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


_SDPA = torch.nn.functional.scaled_dot_product_attention


def _strip_ones(shape) -> tuple[int, ...]:
    """``shape`` without its leading unit dimensions: ``(1, 4, 3, 6) -> (4, 3, 6)``."""
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


def _version(t: Tensor | None) -> int | None:
    """``t._version`` (counts in-place writes), ``None`` for no tensor or an inference tensor
    (which has no version counter)."""
    if t is None:
        return None
    with torch._C.DisableTorchFunctionSubclass():
        return None if t.is_inference() else t._version


def _sdpa_arguments(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
) -> dict:
    """The arguments of an SDPA call by name (dropout aside: an eval-mode math path has none)."""
    call = dict(locals())
    del call["dropout_p"]
    return call


def _unrecorded_adds_below(top, stops: set, budget: int = 256) -> list:
    """The ``AddBackward0`` nodes with an unrecorded operand between ``top`` and ``stops``."""
    found, seen, stack = [], set(), [top]
    while stack and len(seen) < budget:
        fn = stack.pop()
        if fn is None or fn in seen or fn in stops:
            continue
        seen.add(fn)
        entry = OP_TABLE.get(type(fn).__name__)
        if entry is not None and entry.sums and has_unrecorded_input(fn):
            found.append(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return found


def _scores_plus_mask(query, key, value, attn_mask, is_causal, scale, enable_gqa) -> Tensor:
    """``(q k^T) * scale + mask`` as the math path of SDPA forms it before its softmax.

    A boolean mask (and ``is_causal``'s lower triangle) becomes ``0`` where attention is allowed
    and ``-inf`` elsewhere; a float mask is added as it is.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if is_causal:
        length, source = query.shape[-2], key.shape[-2]
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros((), dtype=scores.dtype, device=scores.device).masked_fill(
            ~attn_mask, float("-inf")
        )
    return scores + attn_mask


def record(model: torch.nn.Module | None = None) -> Recording:
    """Context manager: run the forward pass under it to record what autograd does not.

    Pass ``model`` when its parameters are frozen (see :class:`Recording`).
    """
    return Recording(model)
