"""The Promise System: recovering forward values that autograd did not keep.

Some rules need forward values their node did not save (the operands of ``a + b``, the input of a
softmax).  The paper (sections 4.2, appendix C) resolves them with *promises*: the node needing
values (the *origin*) opens one *promise branch* per missing operand; each branch walks down the
graph to the nearest *arg node* whose output can be rebuilt from saved tensors, records the forward
ops it passed (the *forward chain*), and replays them to rebuild the operand.  When a branch meets
another multi-input op it opens a child promise, so promises form a *tree*.

Here a branch is resolved by :class:`PromiseResolver`, with these arg nodes, tried in order:

1. a leaf (``AccumulateGrad``): its variable;
2. a node that saved its own output (``ReluBackward0._saved_result``, ...);
3. any *consumer* of the value that saved it as an input (``MmBackward0._saved_self``,
   ``NativeLayerNormBackward0._saved_input``, ...) — the residual stream of a pre-norm transformer
   is found this way one step from the origin;
4. otherwise the node's forward is replayed from its inputs' values, each recovered the same way:
   the forward chain, and at multi-input nodes the promise tree.

Relevance traversal and value recovery are decoupled: recovering a value never waits for relevance,
so the deadlock of the paper's figure 2 (a branch stalled behind a node whose relevance is not
complete, which Pre-Promises exist to break) cannot arise, and every node still has its relevance
propagated exactly once, in topological order.  Each recovered value is computed once per run and
shared by every branch that needs it (the paper's aggregation branches).  The walk is iterative, so
chains of any length work.  Which source served each value is recorded in a :class:`PromisePlan`
(structure only, no tensors) that a cached explainer reuses: the next run goes straight to the arg
node without searching.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import ValueRecoveryError
from .graph import Edge, Graph
from .rules.base import OpEntry, ReplayContext

LEAF, OWN_SAVED, CONSUMER_SAVED, REPLAY = "leaf", "own-saved", "consumer-saved", "replay"
UNDONE = "undone-rearrangement"


@dataclass
class PromisePlan:
    """How each recovered value was obtained: ``edge -> (kind, node, attribute)``.

    ``kind`` is one of ``leaf``, ``own-saved``, ``consumer-saved`` (``node`` is the consumer that
    saved it, ``attribute`` its ``_saved_*`` name) or ``replay`` (a forward chain step).
    """

    sources: dict[Edge, tuple[str, int, str]] = field(default_factory=dict)

    def count(self, kind: str) -> int:
        return sum(1 for s in self.sources.values() if s[0] == kind)


@dataclass
class PromiseStats:
    """What the promises of one run cost (the paper's table 2, in this design's terms).

    ``promises``: values rules asked for that their node had not saved (a value shared by several
    origins counts once per origin, like the paper's aggregation branches); ``internal_nodes``:
    nodes replayed to rebuild them (forward-chain steps, each at most once per run); ``delta``:
    the sum over promises of the forward-chain length behind the value; ``max_depth``: the
    longest one.
    """

    promises: int = 0
    internal_nodes: int = 0
    delta: int = 0
    max_depth: int = 0


class PromiseResolver:
    """Recovers forward values for one run; holds them only until the run ends."""

    def __init__(self, graph: Graph, entries: list[OpEntry | None], plan: PromisePlan):
        self.graph = graph
        self.entries = entries
        self.plan = plan
        self.values: dict[Edge, Tensor] = {}
        self.recorded = False  # set when the caller passed a recording of the forward pass
        self.depth: dict[Edge, int] = {}  # forward-chain length behind each recovered value
        self.stats = PromiseStats()

    def known(self, edge: Edge, value: Tensor) -> None:
        """Register a value held by the caller (the output, a requested tensor)."""
        self.values[edge] = value

    def known_base(self, t: Tensor, cast=lambda v: v) -> None:
        """Register the base of a view the caller holds (the output, a requested tensor).

        ``t._base`` is a tensor whose ``grad_fn`` describes its current value (an in-place write
        replaces the ``grad_fn``), so its value is that node's output: e.g. the ``CopySlices`` of
        ``h[:, :3].add_(c)`` when the output is ``h[:, 1:5]``.  ``cast`` converts the value to the
        relevance dtype."""
        base = t._base
        if base is None or base.grad_fn is None:
            return  # not a view, or a view of a leaf (whose node holds the variable)
        j = self.graph.index.get(base.grad_fn)
        if j is not None:
            self.values.setdefault((j, base.output_nr), cast(base.detach()))

    def at_hand(self, edge: Edge) -> Tensor | None:
        """The value of ``edge`` if it costs no computation: recovered already in this run, or
        saved by its node or a consumer; ``None`` otherwise (nothing is replayed or raised)."""
        v = self.values.get(edge)
        if v is not None:
            return v
        for source in self._candidates(edge):
            v = self._read(edge, source)
            if v is not None:
                return v
        return None

    def value(self, edge: Edge) -> Tensor:
        """The forward value of ``edge`` (node, output_nr): a promise, resolved at once."""
        self.stats.promises += 1
        v = self.values.get(edge)
        if v is not None:
            d = self.depth.get(edge, 0)
            self.stats.delta += d
            return v
        stack = [edge]
        while stack:
            e = stack[-1]
            if e in self.values:
                stack.pop()
                continue
            v = self._direct(e)
            if v is not None:
                self.values[e] = v
                stack.pop()
                continue
            missing = [
                c for c in self.graph.children[e[0]] if c is not None and c not in self.values
            ]
            if missing:
                stack.extend(missing)
                continue
            stack.pop()
            self._replay(e)
            kids = [c for c in self.graph.children[e[0]] if c is not None]
            self.depth[e] = 1 + max((self.depth.get(c, 0) for c in kids), default=0)
            self.stats.internal_nodes += 1
        d = self.depth.get(edge, 0)
        self.stats.delta += d
        self.stats.max_depth = max(self.stats.max_depth, d)
        return self.values[edge]

    # -- arg nodes ----------------------------------------------------------------------------

    def _direct(self, e: Edge) -> Tensor | None:
        """The value of ``e`` from an arg node without replay, or ``None``."""
        known = self.plan.sources.get(e)
        if known is not None:
            if known[0] == REPLAY:
                if self.entries[e[0]].fill_unsaved:
                    self._check_masked_softmax(e[0])  # values differ from run to run
                return None
            v = self._read(e, known)
            if v is not None:
                return v
        for source in self._candidates(e):
            v = self._read(e, source)
            if v is not None:
                self.plan.sources[e] = source
                return v
        entry = self.entries[e[0]]
        unrecorded = None if entry is None else entry.unrecorded
        if entry is not None and entry.fill_unsaved and e[1] == 0:
            self._check_masked_softmax(e[0])  # raises where the fill cannot be rebuilt
            self.plan.sources[e] = (REPLAY, e[0], "")
            return None
        if unrecorded is not None and unrecorded(self.graph.fns[e[0]]):
            if self.recorded:
                raise ValueRecoveryError(
                    f"Cannot recover the forward value of {self.graph.describe(e[0])}: it adds or "
                    "fills with a constant autograd did not record, and the recording did not see "
                    "it either: the op ran inside a C++ composite that adds or fills internally "
                    "(the recording rebuilds only the mask add of scaled_dot_product_attention's "
                    "math path; write other such ops out in Python), or in a forward pass other "
                    "than the one recorded (explain the output of the pass run under record())."
                )
            what = (
                "it is an in-place op on a view (h[:, :3].add_(c), y[:, 0] = v) whose operands "
                "autograd does not expose"
                if self.graph.names[e[0]] == "CopySlices"
                else "one of its operands is a constant autograd did not record (a Python scalar, "
                "a tensor that does not require grad, a frozen bias, a fill value)"
            )
            raise ValueRecoveryError(
                f"Cannot recover the forward value of {self.graph.describe(e[0])}: {what}, and "
                "no node saved the result, but a rule needs it. Run the forward pass under "
                "`with dynamiclrp.record(model) as rec:` and pass recording=rec to explain."
            )
        if entry is None or entry.replay is None:
            raise ValueRecoveryError(
                f"Cannot recover the forward value of output {e[1]} of "
                f"{self.graph.describe(e[0])}: no node saved it and the op has no replay rule, "
                "but a rule upstream needs it (a promise passed through here). Add a replay "
                "entry for this op to the op table (dynamiclrp.rules), or request the tensor "
                "itself in inputs (a requested tensor's value is known)." + self._record_hint()
            )
        self.plan.sources[e] = (REPLAY, e[0], "")
        return None

    def _candidates(self, e: Edge):
        j, k = e
        if self.graph.names[j] == "AccumulateGrad":
            yield (LEAF, j, "variable")
        entry = self.entries[j]
        if entry is not None and k in entry.saved_outputs:
            yield (OWN_SAVED, j, entry.saved_outputs[k])
        consumers = self.graph.consumers.get(e, ())
        for p, slot in consumers:
            pe = self.entries[p]
            if pe is not None and slot in pe.saved_inputs:
                yield (CONSUMER_SAVED, p, pe.saved_inputs[slot])
        for p, slot in consumers:  # a view or concatenation of it whose value is at hand: undo it
            pe = self.entries[p]  # a permutation of elements, or each element placed once
            if pe is not None and (pe.rearranges or pe.concatenates):
                yield (UNDONE, p, str(slot))

    def _read(self, e: Edge, source: tuple[str, int, str]) -> Tensor | None:
        if source[0] != UNDONE:
            return self.read_saved(source[1], source[2])
        out = self.at_hand((source[1], 0))
        if out is None:
            return None
        v = self.graph.fns[source[1]](out)
        v = v[int(source[2] or 0)] if isinstance(v, tuple) else v
        if v is None:
            return None
        self.values[e] = v
        return v

    def read_saved(self, node: int, attr: str) -> Tensor | None:
        """``fn._saved_*`` of ``node``, failing loudly if autograd already freed it."""
        try:
            return getattr(self.graph.fns[node], attr)
        except RuntimeError as err:  # saved tensor freed by backward() or modified in place
            raise ValueRecoveryError(
                f"Reading {attr} of {self.graph.describe(node)} failed: the graph's saved tensors "
                "were freed (backward() or autograd.grad() ran on this output without "
                "retain_graph=True) or modified in place. Explain a fresh forward pass, or keep "
                f"the graph with retain_graph=True. PyTorch said: {err}"
            ) from err

    def _record_hint(self) -> str:
        """Advice to record, when the graph has unrecorded constants and no recording was given:
        frozen parameters (``requires_grad=False``) leave their layers' biases unrecorded, and
        the promise that failed may be one such a bias made necessary."""
        if self.recorded:
            return ""
        g = self.graph
        for j, entry in enumerate(self.entries):
            check = None if entry is None else entry.unrecorded
            if check is not None and check(g.fns[j]):
                return (
                    f" The graph also holds constants autograd did not record (first at "
                    f"{g.describe(j)}; frozen parameters leave their biases so): run the forward "
                    "pass under `with dynamiclrp.record(model) as rec:` and pass recording=rec to "
                    "explain, which records frozen parameters and keeps those results."
                )
        return ""

    def _check_masked_softmax(self, j: int) -> None:
        """Check that ``x.masked_fill(mask, fill)`` (node ``j``) may be rebuilt as
        ``x.masked_fill(mask, -inf)`` (the replay of ``MaskedFillBackward0``); raise if not.

        Autograd saves the mask, not the fill.  Where every consumer is a softmax whose saved
        output ``s`` is 0 wherever the mask applies (a log-softmax: ``-inf`` there), the fill's
        value does not enter any map: the softmax rule ``R_x = x * (R - s sum R)`` uses ``x`` on
        the unmasked elements only for ``x``'s own relevance, and the masked elements route to
        the fill, which absorbs ``fill * R`` there -- 0 for ``-inf`` (an infinite logit takes
        nothing), what a recording gives for a ``-inf`` fill.  A finite fill so negative that
        ``s`` underflows to 0 (``finfo.min``) gives the same relevance for every input; only
        the fill's absorbed share at masked elements, ``fill * R``, is then booked as 0.
        """
        g = self.graph
        advice = (
            "Run the forward pass under `with dynamiclrp.record(model) as rec:` and pass "
            "recording=rec to explain, which keeps the filled tensor."
            if not self.recorded
            else "The recording did not see the fill either: it ran inside a C++ composite "
            "(a loss such as poisson_nll_loss fills internally) or in another forward pass than "
            "the one recorded; write the op out in Python, or explain its output instead."
        )
        head = (
            f"Cannot recover the forward value of {g.describe(j)}: autograd saves the mask of "
            "masked_fill but not its fill value, which can be rebuilt (as -inf) only when every "
            "consumer is a softmax whose saved output is 0 where the mask applies"
        )
        consumers = g.consumers.get((j, 0), ())
        softmaxes = {
            p
            for p, _ in consumers
            if self.entries[p] is not None and self.entries[p].family == "softmax"
        }
        others = [p for p, _ in consumers if p not in softmaxes]
        if not consumers or others:
            who = g.describe(others[0]) if others else "no node of the graph"
            raise ValueRecoveryError(f"{head}, but {who} reads it. {advice}")
        mask = self.read_saved(j, "_saved_mask")
        for p, _ in consumers:
            s = self.read_saved(p, "_saved_result")
            log = not self.entries[p].probabilities  # a log-softmax: -inf where the mask applies
            empty = torch.isneginf(s) if log else s == 0
            if not bool((empty | ~mask).all()):
                zero = "-inf (a log-softmax)" if log else "0"
                raise ValueRecoveryError(
                    f"{head}, and the output of {g.describe(p)} is not {zero} everywhere the "
                    f"mask applies: the fill was a finite value the graph does not keep. {advice}"
                )

    def _saved_input(self, j: int, slot: int) -> Tensor | None:
        """An input the graph does not record (no grad) but the node saved, e.g. a frozen weight."""
        attr = self.entries[j].saved_inputs.get(slot)
        return None if attr is None else self.read_saved(j, attr)

    def _replay(self, e: Edge) -> None:
        """Replay node ``e[0]``'s forward from its inputs' values (one forward-chain step)."""
        j = e[0]
        entry = self.entries[j]
        inputs = [
            self.values[c] if c is not None else self._saved_input(j, slot)
            for slot, c in enumerate(self.graph.children[j])
        ]
        try:
            outs = entry.replay(ReplayContext(self.graph.fns[j], inputs))
        except ValueRecoveryError as err:
            raise ValueRecoveryError(f"{self.graph.describe(j)}: {err}") from err
        except Exception as err:
            raise ValueRecoveryError(
                f"Replaying the forward of {self.graph.describe(j)} to recover a value failed: {err}"
            ) from err
        for k, out in enumerate(outs):
            if out is not None:
                self.values.setdefault((j, k), out)
        if e not in self.values:
            raise ValueRecoveryError(
                f"Replaying {self.graph.describe(j)} did not produce output {e[1]}."
            )
