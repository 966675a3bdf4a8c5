"""Checks of the arguments users pass, before anything is computed.

Every check raises a :mod:`dynamiclrp.errors` class whose message names the argument, the bad
value and what to do instead; ``docs/errors.md`` lists them all (and ``tests/test_errors.py``
keeps the two in step).  The checks are cheap: type and shape tests, one ``isnan`` pass over
the output and each input (a single host sync), and a look at the first saved tensor of the
graph; nothing runs per node.

:func:`check_explain_call` runs at the top of :meth:`dynamiclrp.LRP.explain`; :func:`real_number`,
:func:`check_rule` and :func:`unknown_preset` serve the constructors of the rules and of
:class:`~dynamiclrp.presets.Rules`.  Target and seed checks live in :mod:`dynamiclrp.targets`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from .errors import GraphError, InputError, RuleParameterError, SettingError

RULE_EXAMPLES = (
    "Epsilon(), Gamma(0.25), ZPlus(), AlphaBeta(2, 1), ZBox(low, high), Flat(), WSquare()"
)
"""How messages spell the rule objects a user can pass."""

GRAPH_PROBE_NODES = 64
"""How many backward nodes :func:`check_graph_alive` looks at for a saved tensor."""


def show(value: object, limit: int = 60) -> str:
    """``value`` for a message: what it is, without printing its contents."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if hasattr(value, "__array__") and hasattr(value, "shape"):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} item(s)"
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, type)):
        text = repr(value)
        if len(text) > limit:
            text = text[: limit - 3] + "..."
        return f"{type(value).__name__} {text}"
    return f"a {type(value).__name__}"


# --- numbers and rules -----------------------------------------------------------------------


def real_number(value: object, name: str, error: type[SettingError] = RuleParameterError) -> float:
    """``value`` as a finite float, or ``error`` naming ``name`` (e.g. ``"Gamma(gamma=...)"``).

    Accepts Python and NumPy numbers and one-element tensors; rejects bools, strings, NaN and
    infinities."""
    if isinstance(value, (str, bytes)):
        raise error(
            f"{name} must be a real number, got {show(value)}: pass the number itself, "
            f"{value!r} without the quotes."
        )
    if isinstance(value, bool) or value is None:
        raise error(f"{name} must be a real number, got {show(value)}.")
    if isinstance(value, Tensor) and value.numel() != 1:
        raise error(
            f"{name} must be a real number, got {show(value)}: pass a Python float "
            "(a tensor is accepted only with one element)."
        )
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        raise error(f"{name} must be a real number, got {show(value)}.") from None
    if not math.isfinite(number):
        raise error(f"{name} must be finite, got {number}: pass a finite float.")
    return number


def check_rule(rule: object, where: str) -> None:
    """``rule`` is usable as a contraction rule (a rule object or a rule function), for the
    field or argument ``where`` (e.g. ``"Rules.dense"``)."""
    from .rules.linear import ContractionRule  # imported late: the rules use this module

    if isinstance(rule, ContractionRule):
        return
    if isinstance(rule, type):
        hint = f"{rule.__name__}()" if issubclass(rule, ContractionRule) else RULE_EXAMPLES
        raise RuleParameterError(
            f"{where} is the class {rule.__name__}, not a rule object: create one, e.g. {hint}."
        )
    if isinstance(rule, str):
        raise RuleParameterError(
            f"{where}={rule!r} is a string; {where} takes a rule object: {RULE_EXAMPLES}. "
            f"For a whole preset use dynamiclrp.preset({rule!r}) or rules={rule!r}."
        )
    if not callable(rule):
        raise RuleParameterError(
            f"{where} must be a rule object ({RULE_EXAMPLES}), got {show(rule)}."
        )


def unknown_preset(name: str, known: Iterable[str]) -> SettingError:
    """The error for an unknown preset name, with the closest known names."""
    known = sorted(known)
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(by_lower[c]) for c in close)}?" if close else ""
    return SettingError(
        f"Unknown rules preset {name!r}.{hint} Known presets: {', '.join(known)}; or pass a "
        "dynamiclrp.Rules object (docs/presets.md)."
    )


def rules_argument_error(rules: object, known: Iterable[str]) -> SettingError:
    """The error for a ``rules=`` argument that is neither a preset name nor a ``Rules``."""
    from .rules.linear import ContractionRule

    if isinstance(rules, str):
        return unknown_preset(rules, known)
    if isinstance(rules, type) and issubclass(rules, ContractionRule):
        got, rule = f"the rule class {rules.__name__}", f"{rules.__name__}(...)"
    elif isinstance(rules, ContractionRule):
        got, rule = f"the rule {rules!r}", repr(rules)
    else:
        got = rule = ""
    if rule:
        return SettingError(
            f"rules= takes a preset name or a dynamiclrp.Rules object, got {got}. "
            f"To use it on every layer: rules=dynamiclrp.Rules(dense={rule}, conv={rule}); "
            f"for some layers only: dynamiclrp.preset('epsilon').override({rule}, params=[...])."
        )
    return SettingError(
        f"rules= must be a preset name ({', '.join(sorted(known))}) or a dynamiclrp.Rules "
        f"object, got {show(rules)}."
    )


def check_cache_size(cache_size: object) -> int:
    """``LRP(cache_size=...)``: an int >= 0."""
    if isinstance(cache_size, bool) or not hasattr(cache_size, "__index__"):
        raise SettingError(
            f"cache_size must be an int >= 0 (how many plans to keep; 0 disables the cache), "
            f"got {show(cache_size)}."
        )
    size = int(cache_size.__index__())  # type: ignore[union-attr]
    if size < 0:
        raise SettingError(
            f"cache_size must be an int >= 0 (how many plans to keep; 0 disables the cache), "
            f"got {size}."
        )
    return size


# --- output and inputs -----------------------------------------------------------------------


def check_explain_call(
    output: object, inputs: object, recording: object = None
) -> tuple[bool, list[Tensor]]:
    """All checks of :meth:`LRP.explain`'s ``output``, ``inputs`` and ``recording`` arguments.

    Returns ``(single, tensors)``: whether ``inputs`` was a single tensor, and the input tensors
    as a list.  Target and seed are checked by :func:`dynamiclrp.targets.make_seed`."""
    check_output(output)
    assert isinstance(output, Tensor)
    single, tensors = check_inputs(inputs)
    check_no_nan(output, tensors)
    check_graph_alive(output)
    check_recording(recording)
    return single, tensors


def check_output(output: object) -> None:
    """``output`` is a floating-point tensor with a live autograd graph and some elements."""
    if not isinstance(output, Tensor):
        if hasattr(output, "logits"):
            hint = "pass the tensor to explain, e.g. output.logits"
        elif isinstance(output, (tuple, list)):
            hint = "pass one tensor of it, e.g. output[0]"
        elif hasattr(output, "__array__"):
            hint = "a NumPy array has no autograd graph: pass the tensor the model returned"
        else:
            hint = "pass the tensor the forward pass returned"
        raise InputError(f"output must be a tensor, got {show(output)}: {hint}.")
    if output.layout != torch.strided:
        raise InputError(
            f"output has layout {output.layout} (a sparse or other non-dense tensor); the LRP "
            "rules work on dense tensors: explain the dense result, e.g. output.to_dense() "
            "(or explain the tensor before the .to_sparse())."
        )
    if output.device.type == "meta":
        raise InputError(
            f"output (shape {tuple(output.shape)}) is on the meta device: it has a shape but no "
            "values, so there is nothing to explain. Materialise the model's weights on a real "
            "device (load them, e.g. without device_map='meta' / init_empty_weights) and run the "
            "forward pass again."
        )
    if not output.is_floating_point():
        what = "complex" if output.is_complex() else "integer or bool"
        hint = (
            "explain a real tensor computed from it, e.g. output.abs() or output.real"
            if output.is_complex()
            else "explain the scores it came from instead, e.g. "
            "explain(logits, x, target=logits.argmax(1)) rather than explain(logits.argmax(1), x)"
        )
        raise InputError(
            f"output has dtype {output.dtype} ({what}), which carries no relevance: {hint}."
        )
    if output.grad_fn is None:
        if output.requires_grad:
            raise InputError(
                f"output (shape {tuple(output.shape)}) is a leaf tensor (an input or a "
                "parameter), not the result of a forward pass, so it has no grad_fn: pass what "
                "the model returned, e.g. explain(model(x), x)."
            )
        inference = " It is an inference tensor (made under torch.inference_mode())." * (
            output.is_inference()
        )
        raise GraphError(
            "The output has no grad_fn, so there is no graph to explain." + inference + " Run "
            "the forward pass with autograd recording (not under torch.no_grad() or "
            "inference_mode) and with an input or parameter that requires grad, and do not "
            ".detach() the output."
        )
    if output.numel() == 0:
        raise InputError(
            f"output has no elements (shape {tuple(output.shape)}): there is nothing to explain. "
            "Skip empty batches before calling explain()."
        )


def check_inputs(inputs: object) -> tuple[bool, list[Tensor]]:
    """``inputs`` is a tensor or a non-empty collection of distinct tensors that require grad.

    (An input on the meta device cannot occur with an output on a real device; the output's
    check covers it.  Whether each input is part of the output's graph is checked when the graph
    is built.)"""
    if isinstance(inputs, Tensor):
        tensors, single = [inputs], True
    else:
        _check_collection(inputs)
        tensors, single = list(inputs), False  # type: ignore[call-overload]
        if not tensors:
            raise InputError(
                "inputs is empty: pass the tensor(s) to explain, e.g. explain(out, x) or "
                "explain(out, [x, model.fc.weight])."
            )
    seen: dict = {}
    for i, t in enumerate(tensors):
        name = "inputs" if single else f"inputs[{i}]"
        _check_input_tensor(t, name)
        # a leaf is one Python object; a computed tensor is one output of its node (not
        # get_gradient_edge: it fails for leaves inside inference_mode)
        key = (id(t), None) if t.grad_fn is None else (t.grad_fn, t.output_nr)
        if key in seen:
            raise InputError(
                f"{name} is the same tensor as inputs[{seen[key]}] (one tensor listed twice): "
                "pass each tensor once; a tensor's relevance already sums over all its uses."
            )
        seen[key] = i
    return single, tensors


def _check_collection(inputs: object) -> None:
    if inputs is None:
        raise InputError(
            "inputs is None: pass the tensor(s) to explain, e.g. explain(out, x) with x the "
            "tensor the forward pass used (created with requires_grad=True)."
        )
    if isinstance(inputs, torch.nn.Module):
        raise InputError(
            f"inputs is a module ({type(inputs).__name__}), not a tensor: pass the data tensor "
            "the model ran on, or list(model.parameters()) for the relevance of its parameters."
        )
    if isinstance(inputs, Mapping):
        raise InputError(
            f"inputs is a {type(inputs).__name__} (a mapping), not a tensor: pass its tensors, "
            "e.g. list(d.values()), or the one that requires grad (e.g. inputs_embeds)."
        )
    if hasattr(inputs, "__array__"):
        raise InputError(
            f"inputs is {show(inputs)}, not a tensor: a NumPy array has no autograd graph. "
            "Convert it before the forward pass, x = torch.as_tensor(a).requires_grad_(), run "
            "the model on x and pass x."
        )
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Iterable):
        raise InputError(f"inputs must be a tensor or a list of tensors, got {show(inputs)}.")


def _check_input_tensor(t: object, name: str) -> None:
    if not isinstance(t, Tensor):
        hint = (
            "a NumPy array has no autograd graph: convert it before the forward pass, "
            "x = torch.as_tensor(a).requires_grad_(), and pass x"
            if hasattr(t, "__array__")
            else "pass tensors the forward pass used"
        )
        raise InputError(f"{name} is {show(t)}, not a tensor: {hint}.")
    if t.layout != torch.strided:
        raise InputError(
            f"{name} has layout {t.layout} (a sparse or other non-dense tensor); the LRP rules "
            "work on dense tensors: make the input dense before the forward pass, "
            "x = a.to_dense().requires_grad_(), run the model on x and pass x."
        )
    if not (t.is_floating_point() or t.is_complex()):
        raise InputError(
            f"{name} has dtype {t.dtype} (token ids, labels or a mask?), which cannot require "
            "grad or carry relevance: explain a floating-point tensor the model computes from "
            "it, e.g. the embedding output (a Hugging Face model takes inputs_embeds="
            "model.get_input_embeddings()(ids).detach().requires_grad_())."
        )
    if t.is_complex():
        raise InputError(
            f"{name} has complex dtype {t.dtype}: the LRP rules are defined for real tensors; "
            "explain the real tensors the complex one is built from."
        )
    if not t.requires_grad:
        raise InputError(
            f"{name} (shape {tuple(t.shape)}) does not require grad, so the output's graph "
            "does not record it (a detached copy, or a tensor made after the forward pass?). "
            "Call .requires_grad_() on it before the forward pass and run the forward again, "
            "or pass an intermediate tensor captured during the forward pass."
        )


def check_no_nan(output: Tensor, tensors: list[Tensor]) -> None:
    """No NaN in ``output`` or in any input (one host sync).

    Infinities are allowed: a masked logit of ``-inf`` (in the output off the target, or in an
    intermediate input such as attention scores) gets relevance zero.  The seed itself must be
    finite; :func:`dynamiclrp.targets.make_seed` checks it."""
    with torch.no_grad():
        flags = [torch.isnan(t).any() for t in [output, *tensors]]
        if all(f.device == output.device for f in flags):
            bad = torch.stack(flags).tolist()
        else:  # inputs on another device than the output (model parallel)
            bad = [bool(f) for f in flags]
    if not any(bad):
        return
    if not any(bad[1:]):  # the inputs have no NaN: the forward pass made it
        count, first = _nan_count(output)
        raise InputError(
            f"output has {count} NaN value(s) (first at index {first}), and NaN poisons every "
            "relevance it meets. Find where the forward pass makes it (torch.autograd."
            "detect_anomaly() or torch.isnan checks per layer) and fix the model or its input."
        )
    i = bad.index(True, 1) - 1
    name = "inputs" if len(tensors) == 1 else f"inputs[{i}]"
    count, first = _nan_count(tensors[i])
    raise InputError(
        f"{name} (shape {tuple(tensors[i].shape)}) has {count} NaN value(s) (first at index "
        f"{first}): relevance through them is undefined. Clean the input (e.g. "
        "torch.nan_to_num) and run the forward pass again."
    )


def _nan_count(t: Tensor) -> tuple[int, tuple[int, ...]]:
    with torch.no_grad():
        where = torch.isnan(t).nonzero()
    return len(where), tuple(where[0].tolist())


def check_graph_alive(output: Tensor) -> None:
    """The graph still holds its saved tensors: look at the first node (breadth-first, at most
    :data:`GRAPH_PROBE_NODES`) that saved one and read it.

    ``backward()`` without ``retain_graph=True`` frees them; an in-place write to a saved tensor
    invalidates it.  Either way the forward values the rules need are gone."""
    queue, seen = [output.grad_fn], {output.grad_fn}
    for node in queue:
        if len(queue) > GRAPH_PROBE_NODES:
            return
        probed = False
        for attr in (a[len("_raw_saved_") :] for a in dir(node) if a.startswith("_raw_saved_")):
            try:
                getattr(node, "_saved_" + attr)
            except AttributeError:  # a Python Function's node: its saved tensors are elsewhere
                continue
            except RuntimeError as err:
                raise _damaged_graph(node, attr, err) from err
            probed = True
        if probed:
            return
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                queue.append(child)


def _damaged_graph(node, attr: str, err: RuntimeError) -> GraphError:
    where = f"{type(node).__name__}._saved_{attr}"
    if "inplace" in str(err) or "in-place" in str(err):
        return GraphError(
            f"The output's graph is invalid: a tensor it saved ({where}) was modified in place "
            "after the forward pass. Do not modify the model's tensors in place between the "
            "forward pass and explain(); run the forward pass again."
        )
    if "freed" in str(err) or "second time" in str(err):
        return GraphError(
            f"The output's graph was freed: its saved tensors (e.g. {where}) are gone, because "
            "backward() or torch.autograd.grad() ran through it without retain_graph=True. Run "
            "the forward pass again and call explain() before any backward(), or pass "
            "retain_graph=True to that backward()."
        )
    return GraphError(
        f"The output's graph cannot be read: {where} failed ({err}). Run the forward pass "
        "again and call explain() right after it."
    )


def check_recording(recording: object) -> None:
    """``recording`` is ``None`` or a finished :func:`dynamiclrp.record`.

    Whether it recorded *this* forward pass is not checked here (a recording of a whole pass may
    hold nothing from the graph of an early output): a value it should have held and did not is
    reported by the engine (:class:`~dynamiclrp.errors.ValueRecoveryError`)."""
    if recording is None:
        return
    from .recording import Recording  # imported late, as the rules: no import cycles

    if not isinstance(recording, Recording):
        raise SettingError(
            f"recording= must be what dynamiclrp.record() returns, got {show(recording)}: "
            "with dynamiclrp.record(model) as rec: out = model(x), then "
            "explain(out, x, recording=rec)."
        )
    if any(mode is recording for mode in torch.overrides._get_current_function_mode_stack()):
        raise SettingError(
            "explain() was called inside the `with dynamiclrp.record() as rec:` block of "
            "recording=: the recording is complete only when the block ends. Call explain() "
            "after the block."
        )


def check_box(low: object, high: object) -> None:
    """``ZBox(low, high)``: finite real bounds, broadcastable to each other, ``low <= high``."""
    bounds = []
    for name, v in (("low", low), ("high", high)):
        if isinstance(v, Tensor):
            if not v.is_floating_point() and (v.is_complex() or v.dtype == torch.bool):
                raise RuleParameterError(
                    f"ZBox({name}=...) must be a real number or a real tensor, got {show(v)}."
                )
            t = v.detach().to("cpu", torch.float64)
            if not torch.isfinite(t).all():
                raise RuleParameterError(
                    f"ZBox({name}=...) holds NaN or Inf: the bounds of the input must be finite "
                    "(e.g. the smallest and largest normalised pixel values)."
                )
        else:
            t = torch.tensor(real_number(v, f"ZBox({name}=...)"), dtype=torch.float64)
        bounds.append(t)
    lo, hi = bounds
    try:
        torch.broadcast_shapes(lo.shape, hi.shape)
    except RuntimeError:
        raise RuleParameterError(
            f"ZBox bounds do not broadcast together: low has shape {tuple(lo.shape)}, high "
            f"{tuple(hi.shape)}. Give both the shape the input broadcasts against, e.g. "
            "(1, 3, 1, 1) for per-channel bounds of images (N, 3, H, W)."
        ) from None
    above = lo > hi
    if above.any():
        raise RuleParameterError(
            f"ZBox needs low <= high, but low > high in {int(above.sum())} place(s) "
            f"(low={_bound_text(low)}, high={_bound_text(high)}): swap them, or compute both "
            "from the same normalisation, low = (0 - mean) / std, high = (1 - mean) / std."
        )


def _bound_text(v: object) -> str:
    if isinstance(v, Tensor):
        return repr(v.item()) if v.numel() == 1 else f"tensor of shape {tuple(v.shape)}"
    return repr(v)
