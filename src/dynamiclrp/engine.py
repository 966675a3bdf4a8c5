"""The explainer: graph -> plan -> relevance -> results.

:class:`LRP` builds the backward graph of the output, derives a :class:`Plan` (the traversal order,
which node depends on data, which leads to a requested input, which forward values came from where)
and runs the rules node by node in topological order, each node exactly once (paper, Prop. 2).
Plans are cached by graph signature and requested inputs: a second call on a graph of the same
structure skips the analysis; a different structure gets a new plan, never a stale one.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import GraphError, UncoveredOpError, ValueRecoveryError
from .graph import Edge, Graph, build_graph, gradient_edge
from .ledger import Ledger, RelevanceReport
from .precision import cast_graph, cast_value, check_dtype
from .presets import Rules, preset
from .promises import PromisePlan, PromiseResolver
from .recording import Recording
from .regions import element_wise_joins
from .rules import LEAF, OP_TABLE, OpEntry, RuleContext
from .rules.base import ReplayContext, sum_to_shape
from .rules.contraction import conv_has_bias
from .rules.probe import is_elementwise, probed_entry
from .targets import make_seed


@dataclass
class Plan:
    """Everything about a run that depends only on the graph's structure (no tensors)."""

    signature: str
    requested: tuple[Edge, ...]
    order: list[int]
    entries: list[OpEntry | None]
    data: list[bool]
    reach: list[bool]
    promises: PromisePlan
    first: frozenset[int] = frozenset()
    """The first contractions (``Rules.first``): nearest to a requested input."""
    merged: dict[int, int] = field(default_factory=dict)
    """Batch norm <-> contraction pairs, both ways (``Rules.canonize_batchnorm``)."""
    fused_bias: dict[int, int] = field(default_factory=dict)
    """Add-of-a-constant <-> contraction pairs, both ways (``Rules.canonize_bias``)."""
    fused_bias_slot: dict[int, int] = field(default_factory=dict)
    """For each fused add: the input slot holding the contraction's (reshaped) output."""
    fused_path: dict[int, tuple[Edge, ...]] = field(default_factory=dict)
    """For each fused add: the edges from its data input down to the contraction's output (a
    requested tensor there gets the layer's relevance less the bias's share)."""
    fused_chain: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    """For each fused add: the rearranging or scaling nodes between it and its contraction, top
    first, with the slot the path takes through each."""
    statistic: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """For element-wise products of two data factors: the factor slots that are a parameter-free
    function of the other factor's data (:func:`_statistic_factors`)."""
    probed: tuple[str, ...] = ()
    """Custom autograd Functions found element-wise by :mod:`.rules.probe` (identity rule)."""
    joins: dict[int, Edge] = field(default_factory=dict)
    """Joins of element-wise regions -> the edge that takes all their relevance (``regions.py``)."""


class LRP:
    """A reusable explainer.

    Parameters
    ----------
    rules:
        A preset name (``"dynamiclrp"``, ``"epsilon"``, ``"gamma"``, ``"zplus"``, ``"alpha2beta1"``,
        the ``"zennit-*"`` ones of ``docs/presets.md``) or a :class:`~dynamiclrp.presets.Rules`
        object.
    cache_size:
        How many plans (graph structures) to keep; 0 disables caching.

    After each :meth:`explain`, :attr:`report` holds the books of that run
    (:class:`~dynamiclrp.ledger.RelevanceReport`) and :attr:`last_plan_cached` says whether a
    cached plan was used.
    """

    def __init__(
        self,
        rules: str | Rules = "dynamiclrp",
        cache_size: int = 8,
        *,
        dtype: torch.dtype | None = None,
    ):
        from .validation import check_cache_size

        self.rules = preset(rules)
        self.cache_size = check_cache_size(cache_size)
        self.dtype = check_dtype(dtype)
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()
        self.report: RelevanceReport | None = None
        self.last_plan_cached = False

    def explain(
        self,
        output: Tensor,
        inputs: Tensor | Sequence[Tensor],
        target=None,
        *,
        relevance: Tensor | None = None,
        recording: Recording | None = None,
        dtype: torch.dtype | None = None,
    ):
        """Relevance of each of ``inputs`` for ``output`` (see :func:`dynamiclrp.explain`).

        ``dtype`` (default: the one given to the constructor, else the output's dtype) is the dtype
        relevance is computed in; see :mod:`dynamiclrp.precision`."""
        if torch.is_inference_mode_enabled():  # explain inside `with torch.inference_mode():`
            with torch.inference_mode(False):
                return self.explain(
                    output, inputs, target, relevance=relevance, recording=recording, dtype=dtype
                )
        from .validation import check_explain_call

        single, tensors = check_explain_call(output, inputs, recording)
        seed = make_seed(output, target, relevance)
        graph = build_graph(output.grad_fn)
        requested = tuple(_input_edge(graph, t, i) for i, t in enumerate(tensors))
        is_param = [isinstance(t, torch.nn.Parameter) for t in tensors]
        plan = self._plan(graph, requested, is_param)
        root_nr = gradient_edge(output).output_nr
        dtype = check_dtype(dtype) or self.dtype
        if dtype is not None:  # also for a float32 output of a model that upcasts its logits
            run = _Run(cast_graph(graph, dtype), plan, self.rules, dtype)
            seed = seed.to(dtype)
        else:
            run, dtype = _Run(graph, plan, self.rules), None
        # tensors we hold are arg nodes too: the output itself and every requested tensor
        run.resolver.known((0, root_nr), cast_value(output.detach(), dtype))
        for e, t in zip(requested, tensors, strict=True):
            run.resolver.known(e, cast_value(t.detach(), dtype))
        for t in (output, *tensors):  # a view's base: its value is its grad_fn's output
            run.resolver.known_base(t, lambda v: cast_value(v, dtype))
        if recording is not None:
            run.resolver.recorded = True
            for e, v in recording.values_for(graph).items():
                run.resolver.known(e, cast_value(v, dtype))
        with torch.no_grad():
            results = run.execute((0, root_nr), seed, requested, is_param)
        self.report = run.report
        out = tuple(
            r.to(dtype=t.dtype) if r.dtype != t.dtype else r
            for r, t in zip(results, tensors, strict=True)
        )
        return out[0] if single else out

    # -- planning -----------------------------------------------------------------------------

    def _plan(self, graph: Graph, requested: tuple[Edge, ...], is_param: list[bool]) -> Plan:
        key = (graph.signature, requested, tuple(is_param), self.rules.first_kinds)
        plan = self._plans.get(key)
        self.last_plan_cached = plan is not None
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        plan = make_plan(graph, requested, is_param, self.rules.first_kinds)
        if self.cache_size:
            self._plans[key] = plan
            while len(self._plans) > self.cache_size:
                self._plans.popitem(last=False)
        return plan

    # -- model-level entry point ----------------------------------------------------------------

    def attribute(
        self,
        model,
        inputs,
        target=None,
        *,
        relevance: Tensor | None = None,
        dtype: torch.dtype | None = None,
        **forward_kwargs,
    ):
        """Run ``model`` on ``inputs`` under :func:`dynamiclrp.record` and explain its output.

        ``"model + inputs + target"`` with no knowledge of recording: the forward pass is
        ``model(*inputs, **forward_kwargs)`` (``model(**inputs, **forward_kwargs)`` for a dict),
        run with autograd on and under ``record(model)``, and the relevance of the output's
        ``target`` entries is propagated back to ``inputs`` (:meth:`explain`).

        Parameters
        ----------
        model:
            The ``nn.Module`` (or any callable; only a module's frozen parameters are recorded).
            It runs in its current mode: call ``model.eval()`` first for an explanation of
            inference (train mode draws dropout masks and updates batch-norm statistics, as any
            forward pass would).
        inputs:
            A floating-point tensor, a tuple of them (passed positionally), or a dict of them
            (passed by name, e.g. ``{"inputs_embeds": e}`` for a Hugging Face model).  An input
            that does not require grad is replaced by a leaf copy that does; one that requires
            grad is used as it is.  The caller's tensors and their flags are left unchanged.
        target:
            As for :meth:`explain`: ``None`` (seed with the output), an int class, one class per
            row.
        relevance, dtype:
            As for :meth:`explain`.
        **forward_kwargs:
            Passed to ``model`` (``attention_mask=...``); they receive no relevance.

        Returns
        -------
        The relevance of each input, in the form of ``inputs``: a tensor, a tuple or a dict, each
        of its input's shape and dtype.  The logits are the output when it is a tensor, its
        ``.logits`` (Hugging Face outputs), or else its first element (a tuple or list).
        :attr:`report` holds the books.
        """
        from .errors import InputError
        from .recording import record

        if torch.is_inference_mode_enabled():
            raise GraphError(
                "LRP.attribute was called inside torch.inference_mode(), where autograd records "
                "nothing. Call it outside inference_mode (torch.no_grad() is fine: the forward "
                "pass is run with grad enabled)."
            )
        names = list(inputs) if isinstance(inputs, dict) else None
        given = (
            tuple(inputs.values())
            if names is not None
            else (inputs if isinstance(inputs, tuple) else (inputs,))
        )
        if not given:
            raise InputError(
                "inputs is empty: give the tensor(s) to explain (a tensor, a tuple or a dict)."
            )
        for i, t in enumerate(given):
            where = repr(names[i]) if names is not None else str(i)
            if not isinstance(t, Tensor):
                raise InputError(
                    f"inputs[{where}] is a {type(t).__name__}, not a tensor: pass tensors to "
                    "explain in inputs and anything else as keyword arguments (forward_kwargs)."
                )
            if not t.is_floating_point():
                raise InputError(
                    f"inputs[{where}] has dtype {t.dtype} (shape {tuple(t.shape)}) and cannot "
                    "carry relevance: only floating-point inputs have gradients. For token ids, "
                    "explain the embeddings: pass {'inputs_embeds': "
                    "model.get_input_embeddings()(ids)} as inputs."
                )
        leaves = tuple(t if t.requires_grad else _leaf(t) for t in given)
        with (
            torch.enable_grad(),
            record(model if isinstance(model, torch.nn.Module) else None) as rec,
        ):
            if names is not None:
                out = model(**dict(zip(names, leaves, strict=True)), **forward_kwargs)
            else:
                out = model(*leaves, **forward_kwargs)
        output = _logits(out)
        rel = self.explain(output, leaves, target, relevance=relevance, recording=rec, dtype=dtype)
        if names is not None:
            return dict(zip(names, rel, strict=True))
        return rel if isinstance(inputs, tuple) else rel[0]


def _leaf(t: Tensor) -> Tensor:
    """A leaf copy of ``t`` that requires grad (an inference tensor is cloned first)."""
    leaf = t.detach()
    if leaf.is_inference():
        leaf = leaf.clone()
    return leaf.requires_grad_(True)


def _logits(out) -> Tensor:
    """The tensor to explain from a model's output: itself, ``.logits``, or its first element."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    from .errors import InputError

    raise InputError(
        f"The model returned a {type(out).__name__}; LRP.attribute explains a tensor, the "
        "output's .logits or the first element of a tuple. Wrap the model so it returns the "
        "tensor to explain (lambda *a, **k: model(*a, **k).start_logits), or run the forward "
        "pass yourself under dynamiclrp.record() and call explain()."
    )


def _input_edge(graph: Graph, t, i: int) -> Edge:
    if not isinstance(t, Tensor):
        raise GraphError(f"inputs[{i}] is a {type(t).__name__}, not a tensor")
    if not t.requires_grad:
        raise GraphError(
            f"inputs[{i}] (shape {tuple(t.shape)}) does not require grad, so the output's graph "
            "does not record it. Call .requires_grad_() on it before the forward pass, or pass "
            "an intermediate tensor captured during the forward pass."
        )
    edge = gradient_edge(t)
    j = graph.index.get(edge.node)
    if j is None:
        raise GraphError(
            f"inputs[{i}] (shape {tuple(t.shape)}) is not part of the output's graph: the output "
            "does not depend on it (or it was detached, or it comes from another forward pass). "
            "Pass the very tensor the forward pass used (not a copy or a re-created tensor), and "
            "run the forward pass again after changing inputs."
        )
    return (j, edge.output_nr)


def make_plan(
    graph: Graph,
    requested: tuple[Edge, ...],
    is_param: list[bool],
    first_kinds: tuple[str, ...] = ("dense", "conv"),
) -> Plan:
    """Analyse the graph: entries, data flags, reachability, order; check coverage first.

    Also finds the first contractions of a kind in ``first_kinds`` (:func:`_first_contractions`)
    and the batch norms that can merge into the layer before them (:func:`_batchnorm_pairs`)."""
    n = len(graph)
    entries = [OP_TABLE.get(name) for name in graph.names]
    topo = graph.topological_order()
    requested_nodes = {e[0] for e in requested}
    data_requested = {e[0] for e, p in zip(requested, is_param, strict=True) if not p}
    reach = [False] * n
    data = [False] * n
    for v in reversed(topo):
        kids = [e[0] for e in graph.children[v] if e is not None]
        reach[v] = v in requested_nodes or any(reach[c] for c in kids)
        data[v] = (
            v in data_requested
            or _is_source(graph, entries[v], v, reach[v])
            or any(data[c] for c in kids)
        )
    order = [
        v
        for v in topo
        if reach[v] and any(e is not None and reach[e[0]] for e in graph.children[v])
    ]
    probed, not_elementwise = _probe_custom_functions(graph, entries, order)
    uncovered = Counter(graph.names[v] for v in order if entries[v] is None)
    if uncovered:
        listing = ", ".join(f"{name} x{count}" for name, count in uncovered.most_common())
        first = next(v for v in order if entries[v] is None)
        raise UncoveredOpError(
            f"No LRP rule for {sum(uncovered.values())} node(s) of {len(uncovered)} op type(s) on "
            f"the path from the output to the inputs: {listing}. First at "
            f"{graph.describe(first)}. Nothing was propagated. Add an entry to the op table "
            "(dynamiclrp.rules) for each, or explain an intermediate tensor below them."
            + "".join(_uncovered_hint(graph, name) for name in uncovered)
            + "".join(
                f" {name} was probed for being element-wise (then the identity rule would "
                f"apply) and is not: {why}."
                for name, why in not_elementwise.items()
                if name in uncovered
            )
        )
    # the first layers are nearest to the earliest requested inputs: a requested intermediate
    # tensor with another requested input below it does not make the layer reading it "first"
    earliest = {
        v
        for v in data_requested
        if not any(e is not None and reach[e[0]] for e in graph.children[v])
    }
    first = _first_contractions(graph, entries, data, topo, earliest, first_kinds)
    merged = _batchnorm_pairs(graph, entries, data)
    fused, fused_slot, fused_chain, fused_path = _bias_add_pairs(graph, entries, data, reach)
    statistic = _statistic_factors(graph, entries, data)
    return Plan(
        graph.signature,
        requested,
        order,
        entries,
        data,
        reach,
        PromisePlan(),
        first,
        merged,
        fused,
        fused_slot,
        fused_path,
        fused_chain,
        statistic,
        probed=tuple(sorted(probed)),
        joins=element_wise_joins(graph, entries, data, requested, topo),
    )


def _probe_custom_functions(graph: Graph, entries: list, order: list[int]):
    """Give custom ``autograd.Function`` nodes without an entry the identity rule when
    :func:`.rules.probe.is_elementwise` finds them element-wise (``entries`` is filled in place).
    Returns the names found element-wise and, for the others, why not."""
    probed: set[str] = set()
    why_not: dict[str, str] = {}
    for v in order:
        fn = graph.fns[v]
        if entries[v] is not None or not isinstance(fn, torch.autograd.function.BackwardCFunction):
            continue
        kids = graph.children[v]
        if len(kids) != 1 or kids[0] is None:
            why_not[graph.names[v]] = f"it has {len(kids)} tensor inputs, not one"
            continue
        e = kids[0]
        ok, why = is_elementwise(fn, graph.fns[e[0]]._input_metadata[e[1]].shape)
        if ok:
            entries[v] = probed_entry(fn)
            probed.add(graph.names[v])
        else:
            why_not[graph.names[v]] = why
    return probed, why_not


def _uncovered_hint(graph: Graph, name: str) -> str:
    """What to do about one uncovered node type that has a known cause."""
    if name == "CheckpointFunctionBackward":
        return (
            " CheckpointFunctionBackward is a reentrant activation checkpoint, whose segment "
            "autograd never recorded: use torch.utils.checkpoint.checkpoint(..., "
            "use_reentrant=False), which records it."
        )
    if name == "CompiledFunctionBackward":
        return (
            " CompiledFunctionBackward is a torch.compile'd region, one opaque node: explain the "
            "uncompiled model (compiled._orig_mod), or compile with backend='eager'."
        )
    fn = graph.fns[graph.names.index(name)]
    if isinstance(fn, torch.autograd.function.BackwardCFunction):
        cls = getattr(fn, "_forward_cls", None)
        return (
            f" {name} is the custom autograd.Function `{getattr(cls, '__name__', name)}`: "
            f"register a rule for it with dynamiclrp.OP_TABLE[{name!r}] = "
            "dynamiclrp.rules.OpEntry(family, rule) (docs/rules.md)."
        )
    return ""


def _data_operand(graph: Graph, entry: OpEntry | None, data: list[bool], v: int) -> int | None:
    """The slot of a contraction's only data operand (``None``: not a contraction with exactly
    one data operand, e.g. ``q @ k^T``)."""
    if entry is None or entry.kind is None:
        return None
    kids = graph.children[v]
    slots = [s for s in entry.operands if kids[s] is not None and data[kids[s][0]]]
    return slots[0] if len(slots) == 1 else None


def _first_contractions(graph, entries, data, topo, starts, kinds) -> frozenset[int]:
    """Contractions of a kind in ``kinds`` whose data operand comes from a requested data input
    (``starts``) with no other such contraction in between: Zennit's "first layer", taken from
    the graph instead of the order modules were registered in."""
    free = [False] * len(graph)  # the node's output reaches a start with no contraction between
    first = set()
    for v in reversed(topo):  # children first
        e = entries[v]
        slot = _data_operand(graph, e, data, v) if e is not None and e.kind in kinds else None
        if slot is not None:
            if free[graph.children[v][slot][0]]:
                first.add(v)
            # an added term (addmm's input, as in its expansion c + a @ b) reaches the output
            # without a contraction
            added = [k for s, k in enumerate(graph.children[v]) if s not in e.operands]
            free[v] = v in starts or any(k is not None and free[k[0]] for k in added)
        else:
            free[v] = v in starts or any(free[k[0]] for k in graph.children[v] if k is not None)
    return frozenset(first)


def _batchnorm_pairs(graph: Graph, entries, data: list[bool]) -> dict[int, int]:
    """Batch norms whose input is the output of a contraction (convolution, ``mm``, ``addmm``)
    that nothing else consumes, the contraction's data operand in its usual slot: each such pair
    maps both ways.  Whether they merge is decided when the rules run (``Rules``, eval mode)."""
    pairs: dict[int, int] = {}
    for v, e in enumerate(entries):
        if e is None or e.canonize != "batchnorm" or graph.children[v][0] is None:
            continue
        edge = graph.children[v][0]
        c = edge[0]
        ce = entries[c]
        if ce is None or ce.canonize != "contraction" or len(graph.consumers[edge]) != 1:
            continue
        if _data_operand(graph, ce, data, c) != ce.operands[0]:
            continue
        pairs[v], pairs[c] = c, v
    return pairs


def _bias_add_pairs(graph: Graph, entries, data: list[bool], reach: list[bool]):
    """Sums of a constant (a bias, a buffer, a scalar, a parameter; ``OpEntry.sums``: add, sub,
    rsub, addcmul of constant factors) and the output of a bias-free contraction with one data
    operand that nothing else consumes, through rearrangements (reshapes, permutes:
    ``OpEntry.rearranges``) and scalar scalings only: ``x @ W`` then ``+ b`` is recorded as ``mm``,
    ``_unsafe_view``, ``add`` for a non-contiguous 3-D input, as ``addmm`` otherwise, and as
    ``bmm``, views and permutes by ``einsum``.  Fusing them makes the explanation independent of
    that spelling.

    The coefficient ``a`` with which the contraction's output enters the sum (``c - x @ W``:
    -1, ``torch.add(c, x @ W, alpha=2)``: 2) is read from the node when the rules run
    (:meth:`_Run.fused_coefficient`; a cached plan may serve another ``alpha``): the layer is
    ``z = f(x, a w) + c``, an affine map with weight ``a w`` and bias ``c``."""
    pairs: dict[int, int] = {}
    slots: dict[int, int] = {}
    chains: dict[int, tuple[tuple[int, int], ...]] = {}
    paths: dict[int, tuple[Edge, ...]] = {}
    for v, e in enumerate(entries):
        if e is None or not e.sums:
            continue
        kids = graph.children[v]
        d = [s for s in range(len(kids)) if kids[s] is not None and data[kids[s][0]]]
        if len(d) != 1:
            continue
        if len(kids) > 2 and any(
            k is not None and reach[k[0]] for s, k in enumerate(kids) if s != d[0]
        ):
            continue  # a requested factor of addcmul's product term: its own share, unfused
        edge = kids[d[0]]
        out_shape = tuple(graph.fns[v]._input_metadata[0].shape)
        if tuple(graph.fns[edge[0]]._input_metadata[edge[1]].shape) != out_shape:
            continue  # the constant is not a bias: it broadcasts the product
        chain = []
        on_path = [edge]
        while len(graph.consumers[edge]) == 1:
            through = _bias_path_slot(graph, entries, edge[0])
            if through is None:
                break
            chain.append((edge[0], through))
            edge = graph.children[edge[0]][through]
            on_path.append(edge)
        c, ce = edge[0], entries[edge[0]]
        if ce is None or not ce.fuses_bias:
            continue
        if len(graph.consumers[edge]) != 1 or _data_operand(graph, ce, data, c) is None:
            continue
        own_bias = [k for s, k in enumerate(graph.children[c]) if s not in ce.operands]
        if any(k is not None for k in own_bias) or (
            ce.kind == "conv" and conv_has_bias(graph.fns[c])
        ):
            continue  # a contraction with its own bias: the add's constant is a second bias
        pairs[v], pairs[c] = c, v
        slots[v] = d[0]
        chains[v] = tuple(chain)
        paths[v] = tuple(on_path)
    return pairs, slots, chains, paths


def _bias_path_slot(graph: Graph, entries, v: int) -> int | None:
    """The input slot through which a node between a contraction and an added constant keeps the
    constant a bias of the contraction, or ``None``: the node rearranges its one input (reshape,
    permute) or may scale it by a scalar (``c + 2 * (x @ W)`` is the layer ``x @ (2 W) + c``;
    whether the factor is a scalar is read when the rules run, ``OpEntry.coefficient``)."""
    e = entries[v]
    kids = graph.children[v]
    recorded = [s for s, k in enumerate(kids) if k is not None]
    if e is None or len(recorded) != 1:
        return None
    if (e.rearranges and len(kids) == 1) or (e.coefficient is not None and not e.sums):
        return recorded[0]
    return None  # a sum (another constant added) ends the path: that sum is the layer's bias


def _statistic_factors(graph: Graph, entries, data: list[bool]):
    """Element-wise products of two data factors where one factor is a *statistic* of the other:
    a parameter-free function of the tensors the other factor is a parameter-free function of
    (``h * rsqrt(mean(h ** 2) + eps)``, ``(x - mean(x)) / std(x)``).  Returns
    ``node -> the slots that may be the statistic`` (both when the two factors are functions of
    the same tensors: the broadcast one is, when the rules run).

    Each tensor's *frontier* is where a walk down its graph through parameter-free nodes stops: at
    a contraction, a node that reads a parameter, a leaf or a node without a table entry (a
    requested intermediate tensor is looked through: asking for it changes no decision).  A
    factor is a statistic of the other when its frontier is non-empty and inside the other's, or
    when it is computed from the other factor itself, layers on the way included (a
    squeeze-excitation gate ``sigmoid(fc(pool(h)))`` rescales the ``h`` it was computed from:
    the broadcast analogue of the self-gating ``h * sigmoid(h)``, whose region gives ``h`` all).
    A router gate (``softmax(x @ W_r)`` against ``expert(x)``) or a FiLM scale (``gamma(cond)``)
    is computed from neither: the two factors then share the product's relevance (the rules
    decide the broadcast part when they run, from the shapes)."""
    candidates = []
    for v, e in enumerate(entries):
        if e is None or len(e.factors) != 2 or not data[v]:
            continue
        kids = [graph.children[v][s] for s in e.factors]
        if all(k is not None and data[k[0]] for k in kids):
            candidates.append((v, e.factors, kids))
    if not candidates:
        return {}
    memo: dict[int, frozenset[int]] = {}

    def stops(u: int) -> bool:
        entry = entries[u]
        if entry is None or entry.kind is not None:
            return True
        if graph.names[u] == LEAF:
            return True
        for k in graph.children[u]:
            if k is not None and graph.names[k[0]] == LEAF and not data[k[0]]:
                return True  # reads a parameter: a learned function
        return False

    def frontier(root: int) -> frozenset[int]:
        stack = [root]
        while stack:
            u = stack[-1]
            if u in memo:
                stack.pop()
                continue
            if stops(u):
                memo[u] = frozenset((u,))
                stack.pop()
                continue
            kids = [k[0] for k in graph.children[u] if k is not None and data[k[0]]]
            todo = [k for k in kids if k not in memo]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            memo[u] = frozenset().union(*(memo[k] for k in kids))
        return memo[root]

    # which factor nodes lie below each node, as bits of one integer (one pass, children first)
    targets = {k[0] for _, _, kids in candidates for k in kids}
    bit = {t: 1 << i for i, t in enumerate(sorted(targets))}
    below: dict[int, int] = {}
    for u in reversed(graph.topological_order()):
        if not data[u]:
            continue
        mask = bit.get(u, 0)
        for k in graph.children[u]:
            if k is not None:
                mask |= below.get(k[0], 0)
        below[u] = mask

    def computed_from(top: int, other: int) -> bool:
        """Whether node ``other`` lies below ``top`` through data: ``top``'s value is computed from
        ``other``'s (with any layers on the way, as a squeeze-excitation gate is from ``h``)."""
        return bool(below.get(top, 0) & bit[other])

    found = {}
    for v, slots, kids in candidates:
        fa, fb = frontier(kids[0][0]), frontier(kids[1][0])
        either = tuple(
            s
            for s, f, g, mine, theirs in (
                (slots[0], fa, fb, kids[0][0], kids[1][0]),
                (slots[1], fb, fa, kids[1][0], kids[0][0]),
            )
            if (f and f <= g) or (mine != theirs and computed_from(mine, theirs))
        )
        if either:
            found[v] = either
    return found


def _is_source(graph: Graph, entry: OpEntry | None, v: int, reach: bool) -> bool:
    """A data source: a leaf that requires grad and is not a parameter, or the output of an op
    that represents integer data (an embedding lookup, ``OpEntry.source``) whose table is a
    requested input.  An embedding whose table is not requested is a constant lookup, like a
    weight: ``emb(ids) * w`` gives ``w`` all of its relevance."""
    if graph.names[v] == LEAF:
        var = graph.fns[v].variable
        return var.requires_grad and not isinstance(var, torch.nn.Parameter)
    return entry is not None and entry.source and reach


class _Run:
    """One explanation's state; dropped when :meth:`LRP.explain` returns."""

    def __init__(self, graph: Graph, plan: Plan, rules: Rules, dtype: torch.dtype | None = None):
        self.graph = graph
        self.dtype = dtype  # the relevance dtype, when it differs from the model's
        self.plan = plan
        self.rules = rules
        self.resolver = PromiseResolver(graph, plan.entries, plan.promises)
        self.ledger = Ledger()
        self.report: RelevanceReport | None = None
        self._sent_now: list[tuple[Edge, Tensor]] = []  # given by the running rule to other edges
        self._captured: dict[Edge, Tensor] = {}  # relevance that arrived at requested edges

    # -- values for rules (RuleContext calls these) --------------------------------------------

    def _saved_input(self, idx: int, slot: int) -> Tensor | None:
        """Input ``slot``'s value as node ``idx`` saved it, or ``None``."""
        entry = self.plan.entries[idx]
        attr = entry.saved_inputs.get(slot) if entry is not None else None
        return None if attr is None else self.resolver.read_saved(idx, attr)

    def input_value(self, idx: int, slot: int) -> Tensor:
        v = self._saved_input(idx, slot)
        if v is not None:
            return v
        edge = self.graph.children[idx][slot]
        if edge is None:
            raise ValueRecoveryError(
                f"{self.graph.describe(idx)} needs the value of its input {slot}, a tensor that "
                "does not require grad and that the node did not save, so the graph holds no "
                "trace of it. Make that tensor require grad during the forward pass."
            )
        return self.resolver.value(edge)

    def output_value(self, idx: int, k: int) -> Tensor:
        return self.resolver.value((idx, k))

    def known_input(self, idx: int, slot: int) -> Tensor | None:
        """Input ``slot``'s value if it costs no computation (saved by the node, a neighbour, or
        recovered already), else ``None``."""
        v = self._saved_input(idx, slot)
        if v is not None:
            return v
        edge = self.graph.children[idx][slot]
        return None if edge is None else self.resolver.at_hand(edge)

    def remember_input(self, idx: int, slot: int, value: Tensor) -> None:
        """Keep a value a rule derived for input ``slot`` (``out - a`` for an add's ``b``) for
        the nodes below that need it (the contraction that produced ``b`` reads it as ``z``)."""
        edge = self.graph.children[idx][slot]
        if edge is not None:
            self.resolver.values.setdefault(edge, value)

    def known_value(self, idx: int, k: int) -> Tensor | None:
        return self.resolver.at_hand((idx, k))

    def is_first(self, idx: int) -> bool:
        return idx in self.plan.first

    def bias_partner(self, idx: int) -> RuleContext | None:
        j = self.plan.fused_bias.get(idx) if self.rules.canonize_bias else None
        if j is None or self.fused_coefficient(idx) is None:
            return None  # a factor on the way is a tensor, not a scalar: not a bias
        return self._context(j, [])

    def fused_coefficient(self, idx: int) -> float | None:
        """For a contraction or add of a fused pair: the coefficient ``a`` with which the
        contraction's output enters the sum ``c + a * f(x, w)`` (-1 for ``c - x @ W``, the product
        of the scalars on the way); ``None`` when a factor on the way is not a scalar."""
        add = idx if idx in self.plan.fused_bias_slot else self.plan.fused_bias[idx]
        slot = self.plan.fused_bias_slot[add]
        c = self.plan.entries[add].coefficient(self.graph.fns[add], slot)
        for node, through in self.plan.fused_chain[add]:
            scale = self.plan.entries[node].coefficient
            if scale is not None:
                s = scale(self.graph.fns[node], through)
                if s is None:
                    return None
                c = c * s
        return c

    def give_fused_constant(self, idx: int, relevance: Tensor) -> None:
        """The constant's share of a fused add (see :meth:`RuleContext.give_fused_constant`).

        A requested tensor on the way from the contraction up to the add (``h`` of ``h + c``)
        got the layer's relevance; it gets that less the constant's share, ``R_z - R_c``, in its
        own layout: what the add would have left it (for the epsilon rule ``R_z f / stab(z)``,
        so LRP-0 = gradient x ``h``), while the data below gets the layer's rule, requested ``h``
        or not."""
        add = self.plan.fused_bias[idx]
        path, chain = self.plan.fused_path[add], self.plan.fused_chain[add]
        share = relevance
        for i in range(len(path) - 1, -1, -1):  # from the contraction's output up to the add
            if path[i] in self._captured:
                self._captured[path[i]] = self._captured[path[i]] - share
            if i > 0:  # into the layout of the edge above (a scaling passes relevance unchanged)
                node = chain[i - 1][0]
                entry = self.plan.entries[node]
                if entry.rearranges:
                    share = entry.replay(ReplayContext(self.graph.fns[node], [share]))[0]
        if len(self.graph.children[add]) != 2:
            return  # addcmul's constant product term: its factors are not requested (the plan)
        slot = 1 - self.plan.fused_bias_slot[add]
        edge = self.graph.children[add][slot]
        if edge is None or not self.plan.reach[edge[0]]:
            return
        r = sum_to_shape(share, self.input_shape(add, slot))
        self._sent_now.append((edge, r))

    def fused_output(self, idx: int) -> Tensor:
        """For a contraction fused with the add above it: the add's output value in the
        contraction's layout (the rearrangements between them undone by their own backward)."""
        add = self.plan.fused_bias[idx]
        z = self.resolver.value((add, 0))
        for node, _ in self.plan.fused_chain[add]:  # the scalings are in fused_coefficient
            if self.plan.entries[node].rearranges:
                z = self.graph.fns[node](z)
                z = z[0] if isinstance(z, tuple) else z
        return z

    def partner(self, idx: int) -> RuleContext | None:
        j = self.plan.merged.get(idx) if self.rules.canonize_batchnorm else None
        return None if j is None else self._context(j, [])

    def _context(self, v: int, rel: list[Tensor]) -> RuleContext:
        kids = self.graph.children[v]
        return RuleContext(
            self,
            v,
            self.graph.fns[v],
            rel,
            [e is not None and self.plan.data[e[0]] for e in kids],
            [e is not None and self.plan.reach[e[0]] for e in kids],
            self.rules,
        )

    def input_shape(self, idx: int, slot: int) -> torch.Size:
        edge = self.graph.children[idx][slot]
        return torch.Size(self.graph.fns[edge[0]]._input_metadata[edge[1]].shape)

    # -- propagation ---------------------------------------------------------------------------

    def execute(self, root: Edge, seed: Tensor, requested, is_param) -> list[Tensor]:
        g, plan = self.graph, self.plan
        seeded = seed.sum()
        store: dict[Edge, Tensor] = {root: seed}
        # the 0-d sums of what each consumer sent to an edge in ``store`` (one per send): a node's
        # incoming total costs 0-d adds instead of a reduction of each input
        sums: dict[Edge, list[Tensor]] = {root: [seeded]}
        captured = self._captured
        wanted_edges = set(requested)
        for v in plan.order:
            meta = g.fns[v]._input_metadata
            rel = [store.pop((v, k), None) for k in range(len(meta))]
            if all(r is None for r in rel):
                continue
            sent = [sums.pop((v, k), ()) for k in range(len(meta))]
            for k, r in enumerate(rel):
                if (v, k) in wanted_edges and r is not None:
                    captured[(v, k)] = r
            rel = [
                r
                if r is not None
                else torch.zeros(tuple(m.shape), dtype=self.dtype or m.dtype, device=m.device)
                for r, m in zip(rel, meta, strict=True)
            ]
            self._propagate(v, rel, store, sums, sent)
        results, param_sums = [], {}
        for i, e in enumerate(requested):
            r = captured.get(e, store.get(e))
            if r is None:
                m = g.fns[e[0]]._input_metadata[e[1]]
                r = torch.zeros(tuple(m.shape), dtype=seed.dtype, device=m.device)
            results.append(r)
            if is_param[i]:
                param_sums[i] = r.sum()
        processed = set(plan.order)
        in_books = [
            not p and e[0] not in processed for e, p in zip(requested, is_param, strict=True)
        ]
        input_sums = [r.sum() for r in results]
        self.report = self.ledger.close(g.describe, seeded, input_sums, in_books, param_sums)
        self.report.promises = dict(Counter(s[0] for s in plan.promises.sources.values()))
        self.report.promise_stats = self.resolver.stats
        self.report.probed = list(plan.probed)
        return results

    def _propagate(self, v: int, rel: list[Tensor], store: dict, sums: dict, sent: list) -> None:
        """Run node ``v``'s rule, pass relevance to its inputs and keep the books.

        Nodes fed by data keep the books; nodes below a parameter (``w.t()`` on the way to a
        requested weight) carry relevance already booked where it left the data flow.

        ``sent[k]``: the 0-d sums of the relevance each consumer sent to output ``k`` (from
        ``sums``).  Each relevance passed on is summed once, for this node's ``R_out`` and, in
        ``sums``, for its producer's ``R_in``; a relevance passed on unchanged (the identity rule
        returns its input) reuses the sum its single sender made, a tensor passed to two slots is
        summed once, and a rearrangement (``OpEntry.rearranges``) passes on the sum it received.
        """
        g, plan, ledger = self.graph, self.plan, self.ledger
        kids = g.children[v]
        ctx = self._context(v, rel)
        entry = plan.entries[v]
        target = plan.joins.get(v)
        if target is None:
            outs = entry.rule(ctx)
        else:  # an element-wise region's join: the activation rule onto its source (regions.py)
            outs, kids = (ctx.r,), [target]
        books = plan.data[v]
        r_in = None  # what arrived, for the books: the sums the consumers sent
        if books:
            r_in = [s for per_slot in sent for s in per_slot]
            r_in = _total(r_in) if r_in else None
        # sums at hand, by tensor: an input that one consumer sent, an output already summed (a
        # share sent to two slots); each entry holds its tensor, so no id is reused meanwhile
        summed = {id(r): (r, s[0]) for r, s in zip(rel, sent, strict=True) if len(s) == 1}
        out_total = []
        for slot, r in enumerate(outs):
            if r is None:
                continue
            e = kids[slot] if slot < len(kids) else None
            if e is not None:
                m = g.fns[e[0]]._input_metadata[e[1]]
                if r.shape != m.shape:  # a node's own backward may leave broadcasting to autograd
                    r = sum_to_shape(r, m.shape)
                want = self.dtype or m.dtype  # as autograd casts each gradient to its input's
                if r.dtype != want and r.is_floating_point():  # (mixed bf16 / fp32 models)
                    r = r.to(want)
            s = summed.get(id(r))
            if s is None:
                # a rearrangement (reshape, permute, clone) passes on exactly what it received
                s = r_in if entry.rearranges and r_in is not None else r.sum()
                summed[id(r)] = (r, s)
            else:
                s = s[1]
            out_total.append(s)
            if e is None or not plan.data[e[0]]:
                if books:
                    ledger.absorbed.append(s)
                if e is not None and plan.reach[e[0]]:
                    _accumulate(store, e, r)
            elif not plan.reach[e[0]]:
                ledger.unrequested.append(s)
            else:
                _accumulate(store, e, r)
                if r.is_floating_point():
                    sums.setdefault(e, []).append(s)
        for slot, r in ctx.parameter.items():
            e = kids[slot]
            _accumulate(store, e, r)
            if plan.data[e[0]]:  # only a node that keeps the books reads its incoming sum
                sums.setdefault(e, []).append(r.sum())
        for s in ctx.absorbed:
            ledger.absorbed.append(s)
            out_total.append(s)
        for e, r in self._sent_now:  # booked as absorbed above: the edge is not data
            _accumulate(store, e, r)
        self._sent_now.clear()
        r_out = _total(out_total) if out_total else rel[0].new_zeros(())
        if r_in is None:  # R_in is read for the books only; R_out still serves the NaN check
            r_in = r_out if not books else r_out.new_zeros(())
        ledger.record(v, entry.family, r_in, r_out, books)


def _total(sums: list[Tensor]) -> Tensor:
    """``sums[0] + sums[1] + ...`` without Python's ``0 +`` (one kernel fewer per node)."""
    total = sums[0]
    for s in sums[1:]:
        total = total + s
    return total


def _accumulate(store: dict, e: Edge, r: Tensor) -> None:
    old = store.get(e)
    store[e] = r if old is None else old + r
