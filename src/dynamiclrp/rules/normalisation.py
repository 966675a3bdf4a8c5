"""Native normalisation ops: LayerNorm, GroupNorm, BatchNorm (eval and train).

The statistic (mean, standard deviation) is held constant, which leaves a linear map: centring
followed by a per-feature affine map, ``y = J x + b`` with ``J x = (x - mean(x)) * w / sigma``.
The epsilon rule on that map: ``R_x = x * J^T (R / stab(y))``; the bias absorbs ``b * R / stab(y)``.
Because ``J`` is linear, ``sum(R_x) = sum((y - b) * R / stab(y))``: conservative up to the bias and
the stabiliser.  BatchNorm in eval mode uses its running statistics and has no centring term.

BatchNorm with ``Rules.batchnorm = "pass"``, or merged into the contraction before it
(``Rules.canonize_batchnorm``, eval mode, see :mod:`.contraction`), passes relevance through.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import OpEntry, RuleContext, frozen_bias, sum_to_shape
from .linear import safe_divide


def norm_bias_unrecorded(fn) -> bool:
    """A norm with an affine weight whose bias does not require grad (``OpEntry.unrecorded``)."""
    return fn.next_functions[2][0] is None and getattr(fn, "_saved_weight", None) is not None


def _bias_out(ctx: RuleContext, slot: int, rb, per_channel: bool = False):
    """The bias's share, summed to the bias's shape (per channel = dimension 1 for batch/group norm)."""
    if rb is None:
        return None
    if ctx.fn.next_functions[slot][0] is None:  # a frozen bias absorbs its share all the same
        ctx.absorb(rb)
        return None
    if per_channel:
        return rb.sum([d for d in range(rb.dim()) if d != 1])
    return sum_to_shape(rb, ctx.input_shape(slot))


def _weight_share(ctx: RuleContext, scaled: Tensor, gy: Tensor, per_channel: bool = False):
    """A requested weight ``w`` of ``y = xhat * w + b``: the rule read from the weight's side,
    ``R_w = sum (xhat * w) * R / stab(y)`` over the dimensions ``w`` is broadcast along (outside
    the books, like a contraction's weight).  ``scaled`` is ``xhat * w``, ``gy`` is
    ``R / stab(y)``."""
    if ctx.n_inputs() < 2 or ctx.fn.next_functions[1][0] is None or not ctx.wanted[1]:
        return
    if ctx.data[1]:
        return  # a data weight takes its share through the rule itself (layer norm of a constant)
    rw = scaled * gy
    if per_channel:
        rw = rw.sum([d for d in range(rw.dim()) if d != 1])
    ctx.parameter[1] = sum_to_shape(rw, ctx.input_shape(1)).to(rw.dtype)


def _layer_norm(ctx: RuleContext):
    """``y = (x - mean) * rstd * w + b`` with the statistics held constant:
    ``R_x = x * (g - mean(g))``, ``g = w * rstd * R / stab(y)``, and the bias absorbs
    ``b * R / stab(y)`` (summed per feature as ``b * sum(R / stab(y))``).  When ``x`` is a
    constant and the weight is data, ``y`` is linear in ``w``: ``R_w = xhat * w * R / stab(y)``."""
    fn = ctx.fn
    x = ctx.input_value(0)
    w, b = fn._saved_weight, fn._saved_bias
    mean, rstd = fn._saved_result1, fn._saved_result2
    dims = tuple(range(x.dim() - len(fn._saved_normalized_shape), x.dim()))
    scale = rstd if w is None else rstd * w
    y = (x - mean).mul_(scale) if b is None else torch.addcmul(b, x - mean, scale)
    gy = safe_divide(ctx.r, y, ctx.eps)
    if w is not None:
        _weight_share(ctx, (x - mean) * scale, gy)
    rb = None
    if b is not None:
        lead = tuple(range(gy.dim() - b.dim()))
        rb = (gy.sum(lead) if lead else gy) * b
        if fn.next_functions[2][0] is not None:
            rb = sum_to_shape(rb, ctx.input_shape(2))
        else:  # a frozen bias absorbs its share all the same
            ctx.absorb(rb)
            rb = None
    if w is not None and ctx.data[1] and not ctx.data[0]:
        # census (issue 14): x is a constant and the weight is data: y = xhat * w + b is linear
        # in w, the epsilon rule R_w = xhat * w * R / stab(y) (summed over the leading dims)
        rw = (x - mean).mul_(scale).mul_(gy)
        return [None, sum_to_shape(rw, ctx.input_shape(1)), rb]
    g = gy.mul_(scale) if gy.shape == torch.broadcast_shapes(gy.shape, scale.shape) else gy * scale
    rx = (
        g.sub_(g.mean(dims, keepdim=True)).mul_(x)
        if g.dtype == x.dtype
        else x * (g - g.mean(dims, keepdim=True))
    )
    return [rx.to(x.dtype), None, rb]  # CUDA keeps bf16 stats in fp32


def _affine_bias(ctx: RuleContext, has_affine: bool, per_channel, without_bias):
    """The bias, broadcastable to the output, or ``None`` (no affine part)."""
    if ctx.fn.next_functions[2][0] is not None:
        return ctx.input_value(2).view(per_channel)
    return frozen_bias(ctx, without_bias) if has_affine else None


def _group_norm(ctx: RuleContext):
    fn = ctx.fn
    x = ctx.input_value(0)
    n, c, groups = fn._saved_N, fn._saved_C, fn._saved_group
    w = fn._saved_weight
    shape = x.shape
    xg = x.reshape(n, groups, -1)
    mean = fn._saved_result1.reshape(n, groups, 1)
    rstd = fn._saved_result2.reshape(n, groups, 1)
    per_channel = [1, c] + [1] * (x.dim() - 2)
    wv = (
        torch.ones(per_channel, dtype=x.dtype, device=x.device)
        if w is None
        else w.view(per_channel)
    )
    xhat = ((xg - mean) * rstd).reshape(shape)
    y = xhat * wv
    b = _affine_bias(ctx, w is not None, per_channel, y)
    if b is not None:
        y = y + b
    gy = safe_divide(ctx.r, y, ctx.eps)
    if w is not None:
        _weight_share(ctx, xhat * wv, gy, per_channel=True)
    g = (gy * wv).reshape(n, groups, -1) * rstd
    rx = (xg * (g - g.mean(-1, keepdim=True))).reshape(shape).to(x.dtype)
    rb = None if b is None else b * gy
    return [rx, None, _bias_out(ctx, 2, rb, per_channel=True)]


def _bn_eps(fn) -> float:
    """Batch norm's ``eps``: ``_saved_eps`` (native), ``_saved_epsilon`` (cuDNN)."""
    return fn._saved_eps if hasattr(fn, "_saved_eps") else fn._saved_epsilon


#: Batch-norm nodes that save no ``_saved_training`` flag: the op itself fixes the mode.
_FIXED_MODE = {
    "BatchNormWithUpdateBackward0": True,  # aten::_batch_norm_with_update: batch statistics
    "BatchNormNoUpdateBackward0": False,  # aten::_batch_norm_no_update: running statistics
    "NativeBatchNormLegitNoTrainingBackward0": False,
}


def _training(fn) -> bool:
    """Whether the batch norm used batch statistics (``_saved_training``, else fixed by the op)."""
    if hasattr(fn, "_saved_training"):
        return bool(fn._saved_training)
    return _FIXED_MODE[type(fn).__name__]


def batchnorm_affine(ctx: RuleContext):
    """``(scale, shift)`` with ``y = x * scale + shift`` of an eval-mode batch norm, viewed
    ``(1, C, 1, ...)`` (``shift`` in the output's shape when a frozen bias had to be recovered);
    ``None`` in training mode (batch statistics: nothing to merge)."""
    fn = ctx.fn
    if _training(fn):
        return None
    per_channel = [1, -1] + [1] * (len(fn._input_metadata[0].shape) - 2)
    w = fn._saved_weight
    scale = torch.rsqrt(fn._saved_running_var + _bn_eps(fn)).view(per_channel)
    if w is not None:
        scale = scale * w.view(per_channel)
    shift = -fn._saved_running_mean.view(per_channel) * scale
    if ctx.fn.next_functions[2][0] is not None:
        return scale, shift + ctx.input_value(2).view(per_channel)
    if w is None:
        return scale, shift
    return scale, shift + frozen_bias(ctx, ctx.input_value(0) * scale + shift)


def _batch_norm(ctx: RuleContext):
    fn = ctx.fn
    passes = ctx.rules.batchnorm == "pass" or ctx.partner() is not None
    if passes and not _training(fn):  # batch statistics (instance norm): a normaliser, below
        if ctx.wanted[1] and fn._saved_weight is not None:  # the weight read from its side
            x = ctx.input_value(0)
            y = ctx.output_value(0)
            w = fn._saved_weight.view([1, -1] + [1] * (x.dim() - 2))
            shift = ctx.input_value(2).view(w.shape) if fn.next_functions[2][0] else 0
            _weight_share(ctx, y - shift, safe_divide(ctx.r, y, ctx.eps), per_channel=True)
        return [ctx.r, None, None]  # Zennit's Pass, or merged into the layer before it
    x = ctx.input_value(0)
    c = x.shape[1]
    per_channel = [1, c] + [1] * (x.dim() - 2)
    w = fn._saved_weight
    if _training(fn):
        mean, invstd = fn._saved_result1, fn._saved_result2
    else:
        mean = fn._saved_running_mean
        invstd = torch.rsqrt(fn._saved_running_var + _bn_eps(fn))
    scale = invstd.view(per_channel)
    if w is not None:
        scale = scale * w.view(per_channel)
    if not _training(fn) and (w is None or fn.next_functions[2][0] is not None):
        return _batch_norm_eval(ctx, x, scale, mean.view(per_channel), per_channel)
    y = (x - mean.view(per_channel)) * scale
    b = _affine_bias(ctx, w is not None, per_channel, y)
    scaled = y
    if b is not None:
        y = y + b
    gy = safe_divide(ctx.r, y, ctx.eps)
    _weight_share(ctx, scaled, gy, per_channel=True)
    g = gy * scale
    if _training(fn):  # batch statistics: the centring is part of the linear map
        dims = [0] + list(range(2, x.dim()))
        rx = x * (g - g.mean(dims, keepdim=True))
    else:
        rx = x * g  # running mean is a constant shift: it absorbs its share, like a bias
    rx = rx.to(x.dtype)  # cuDNN keeps the statistics of bf16 / fp16 inputs in fp32
    rb = None if b is None else b * gy
    return [rx, None, _bias_out(ctx, 2, rb, per_channel=True)]


def _batch_norm_eval(ctx: RuleContext, x, scale, mean, per_channel):
    """Eval-mode batch norm with a recorded (or no) bias: ``y = x * s + (b - mean * s)``.

    The epsilon rule of :func:`_batch_norm` in fewer passes over the activation: ``y`` in one
    ``addcmul``, ``g = R / stab(y)`` in its buffer, the bias's per-channel share as
    ``b_c * sum(g)`` over that channel, and ``R_x = x * s * g`` in place."""
    shift = -mean * scale
    b = None
    if ctx.fn.next_functions[2][0] is not None:
        b = ctx.input_value(2).view(per_channel)
        shift = shift + b
    g = safe_divide(ctx.r, torch.addcmul(shift, x, scale), ctx.eps)
    _weight_share(ctx, (x - mean) * scale, g, per_channel=True)
    rb = None
    if b is not None:
        rb = b.flatten() * g.sum([d for d in range(g.dim()) if d != 1])
    rx = g.mul_(scale).mul_(x).to(x.dtype)  # cuDNN keeps bf16 / fp16 statistics in fp32
    return [rx, None, rb]


def _bn_replay(c):
    fn = c.fn
    x, b = c.inputs[0], c.inputs[2]
    w = c.inputs[1] if c.inputs[1] is not None else fn._saved_weight
    per_channel = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if _training(fn):
        mean, invstd = fn._saved_result1, fn._saved_result2
    else:
        mean = fn._saved_running_mean
        invstd = torch.rsqrt(fn._saved_running_var + _bn_eps(fn))
    y = (x - mean.view(per_channel)) * invstd.view(per_channel)
    if w is not None:
        y = y * w.view(per_channel)
    return ((y if b is None else y + b.view(per_channel)).to(x.dtype),)


def _gn_replay(c):
    fn = c.fn
    x, b = c.inputs[0], c.inputs[2]
    w = c.inputs[1] if c.inputs[1] is not None else fn._saved_weight
    n, groups = fn._saved_N, fn._saved_group
    mean = fn._saved_result1.reshape(n, groups, 1)
    rstd = fn._saved_result2.reshape(n, groups, 1)
    y = ((x.reshape(n, groups, -1) - mean) * rstd).reshape(x.shape)
    per_channel = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if w is not None:
        y = y * w.view(per_channel)
    return ((y if b is None else y + b.view(per_channel)).to(x.dtype),)


def _ln_replay(c):
    fn = c.fn
    w = c.inputs[1] if c.inputs[1] is not None else fn._saved_weight
    b = c.inputs[2] if c.inputs[2] is not None else fn._saved_bias
    y = (c.inputs[0] - fn._saved_result1) * fn._saved_result2
    if w is not None:
        y = y * w
    return ((y if b is None else y + b).to(c.inputs[0].dtype),)


def _batch_norm_entry() -> OpEntry:
    """A batch-norm node (native, cuDNN, and the other native variants: same op, same saved
    tensors)."""
    return OpEntry(
        "normalisation",
        _batch_norm,
        saved_inputs={0: "_saved_input", 1: "_saved_weight"},
        replay=_bn_replay,
        canonize="batchnorm",
        unrecorded=norm_bias_unrecorded,
    )


def _weight_norm(ctx: RuleContext):
    """``w = g * v / ||v||``: ``g / ||v||`` is a per-row statistic, so (as for mul by a broadcast
    statistic) all relevance goes to the full-shape ``v``: ``R_v = R_w``, ``R_g = 0``."""
    return [ctx.r, None]


def _weight_norm_replay(c):
    return (torch._weight_norm(c.inputs[0], c.inputs[1], c.saved("_saved_dim")),)


TABLE = {
    "WeightNormInterfaceBackward0": OpEntry(
        "normalisation",
        _weight_norm,
        saved_inputs={0: "_saved_v", 1: "_saved_g"},
        replay=_weight_norm_replay,
    ),
    "NativeLayerNormBackward0": OpEntry(
        "normalisation",
        _layer_norm,
        saved_inputs={0: "_saved_input", 1: "_saved_weight", 2: "_saved_bias"},
        replay=_ln_replay,
    ),
    "NativeGroupNormBackward0": OpEntry(
        "normalisation",
        _group_norm,
        saved_inputs={0: "_saved_input", 1: "_saved_weight"},
        replay=_gn_replay,
        unrecorded=norm_bias_unrecorded,
    ),
    "NativeBatchNormBackward0": _batch_norm_entry(),
    "CudnnBatchNormBackward0": _batch_norm_entry(),
    # --- census (issue 14): the other native batch-norm nodes (same op, same saved tensors)
    "NativeBatchNormLegitBackward0": _batch_norm_entry(),
    "NativeBatchNormLegitNoTrainingBackward0": _batch_norm_entry(),
    "BatchNormWithUpdateBackward0": _batch_norm_entry(),
    "BatchNormNoUpdateBackward0": _batch_norm_entry(),
}
