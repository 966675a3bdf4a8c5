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
from .rules.base import sum_to_shape
from .targets import make_seed

SOURCE_NODES = {"EmbeddingBackward0"}


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
        data[v] = v in data_requested or _is_source(graph, v) or any(data[c] for c in kids)
    order = [
        v
        for v in topo
        if reach[v] and any(e is not None and reach[e[0]] for e in graph.children[v])
    ]
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
    fused, fused_slot = _bias_add_pairs(graph, entries, data, reach)
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
        joins=element_wise_joins(graph, entries, data, requested, topo),
    )


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
            free[v] = v in starts
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
    """Adds of a constant (a bias that is not requested, a buffer, a scalar) to the output of a
    bias-free contraction that nothing else consumes, through reshapes only: ``x @ W`` then
    ``+ b`` is recorded as ``mm``, ``_unsafe_view``, ``add`` for a non-contiguous 3-D input and as
    ``addmm`` otherwise.  Fusing them makes the explanation independent of that layout."""
    pairs: dict[int, int] = {}
    slots: dict[int, int] = {}
    for v, e in enumerate(entries):
        if e is None or e.canonize != "add":
            continue
        kids = graph.children[v]
        d = [s for s in (0, 1) if kids[s] is not None and data[kids[s][0]]]
        if len(d) != 1 or (kids[1 - d[0]] is not None and reach[kids[1 - d[0]][0]]):
            continue
        edge = kids[d[0]]
        out_shape = tuple(graph.fns[v]._input_metadata[0].shape)
        if tuple(graph.fns[edge[0]]._input_metadata[edge[1]].shape) != out_shape:
            continue  # the constant is not a bias: it broadcasts the product
        while (
            len(graph.consumers[edge]) == 1
            and (entries[edge[0]] or OpEntry("", None)).canonize == "reshape"
        ):
            edge = graph.children[edge[0]][0]
        c, ce = edge[0], entries[edge[0]]
        if ce is None or ce.canonize != "contraction" or ce.operands != (0, 1):
            continue
        if len(graph.consumers[edge]) != 1 or _data_operand(graph, ce, data, c) != 0:
            continue
        own_bias = [k for s, k in enumerate(graph.children[c]) if s not in ce.operands]
        if any(k is not None and reach[k[0]] for k in own_bias):
            continue  # its own bias was requested: keep its relevance separate
        if ce.kind == "conv" and graph.children[c][2] is not None:
            continue  # a convolution with its own recorded bias
        pairs[v], pairs[c] = c, v
        slots[v] = d[0]
    return pairs, slots


def _is_source(graph: Graph, v: int) -> bool:
    name = graph.names[v]
    if name == LEAF:
        var = graph.fns[v].variable
        return var.requires_grad and not isinstance(var, torch.nn.Parameter)
    return name in SOURCE_NODES


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
        return None if j is None else self._context(j, [])

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
        captured: dict[Edge, Tensor] = {}
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
