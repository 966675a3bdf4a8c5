"""What an op-table entry is, and what a rule sees when it runs.

An :class:`OpEntry` answers, for one autograd node type, everything the engine needs to know:

- ``family`` and ``rule``: the LRP formula, ``RuleContext -> relevance per input slot``;
- ``needs_values``: whether the rule reads forward values that the node's own saved tensors may not
  hold (then a *promise* recovers them, see :mod:`dynamiclrp.promises`);
- ``saved_inputs`` / ``saved_outputs``: which ``_saved_*`` attributes hold which forward values, so a
  node serves as an *arg node* for its inputs or output;
- ``replay``: the forward computation of the node from its input values (the forward chain of a
  promise);
- ``kind``, ``operands``, ``canonize``: what the plan needs to know of contractions and batch norms
  (which layer is the first one, which batch norm merges into which contraction);
- ``elementwise``: the op is element-wise (:mod:`dynamiclrp.regions`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..presets import Rules

Replay = Callable[["ReplayContext"], Sequence[Tensor]]
Rule = Callable[["RuleContext"], Sequence[Tensor | None]]


@dataclass(frozen=True)
class OpEntry:
    """One row of the op table (see module docstring)."""

    family: str
    rule: Rule
    needs_values: bool = False
    saved_inputs: dict[int, str] = field(default_factory=dict)
    saved_outputs: dict[int, str] = field(default_factory=dict)
    replay: Replay | None = None
    kind: str | None = None
    """Contraction kind, ``"dense"`` or ``"conv"`` (selects ``Rules.dense`` / ``Rules.conv``)."""
    operands: tuple[int, ...] = ()
    """The input slots of a contraction's two operands, the data operand's usual slot first."""
    rearranges: bool = False
    """The rule passes on its one input's relevance with the elements rearranged, none added,
    dropped or changed (reshape, permute, clone): its output relevance has the sum it received,
    so the engine's books reuse that sum instead of summing again."""
    canonize: str | None = None
    """``"contraction"``: a layer a following batch norm can merge into (its output channels are
    dimension 1); ``"batchnorm"``: a batch norm that can merge into the contraction feeding it."""
    fuses_bias: bool = False
    """A bias-free contraction whose output, plus a constant with coefficient +1, is one affine
    layer ``z = f(x, w) + c`` (``Rules.canonize_bias``)."""
    coefficient: Callable | None = None
    """For a linear op of its inputs with scalar coefficients (add, sub; a multiply or divide by a
    Python scalar, neg): ``(fn, slot) -> c``, the coefficient with which input ``slot`` enters
    the output (``a + alpha * b``, ``a - alpha * b``, ``c * x``), or ``None`` where that input
    does not enter linearly with a scalar coefficient (``x * t`` for a tensor ``t``)."""
    sums: bool = False
    """The output is the sum of its inputs times their ``coefficient`` (add, sub)."""
    factors: tuple[int, ...] = ()
    """For an element-wise product (mul, div, the product term of addcmul / addcdiv): the input
    slots of its factors, whose roles (weight, statistic, data) the plan decides."""
    source: bool = False
    """The output is the representation of integer data (an embedding lookup): it counts as data
    when the table it reads from is a requested input."""
    concatenates: bool = False
    """Each input element appears exactly once in the output, value unchanged (``cat``,
    ``stack``): the node's own backward applied to the output's value gives each input's value
    back, so a promise may undo it as it undoes a rearrangement."""
    same_values: bool = False
    """Each output element is one input element with its value (reshape, permute, expand, clone,
    cast): looked through when asking which op produced an operand (:meth:`RuleContext.producer`).
    Every ``rearranges`` entry is one too."""
    gate: bool = False
    """An element-wise nonlinearity whose output, multiplied by another data tensor, is a gate
    that ``Rules.gates = "constant"`` (CP-LRP) holds constant."""
    probabilities: bool = False
    """The output is a softmax's probabilities, which ``Rules.attention = "cp"`` holds constant."""
    fill_unsaved: bool = False
    """Fills with a value the node does not save (``masked_fill`` with a scalar): before softmaxes
    that are 0 on the mask it is rebuilt as ``-inf`` (:mod:`dynamiclrp.promises`)."""
    unrecorded: Callable | None = None
    """``fn -> bool``: whether this node's output depends on a constant autograd did not record and
    the node did not save, so that neither a replay nor a rule can rebuild it (a fill value, a
    tensor without grad added in): :func:`dynamiclrp.record` keeps such results."""
    elementwise: bool = False
    """Each output element depends only on the same-position element of each (broadcast) input:
    ``z[i] = f(a[i], b[i], ...)`` (unary ops, add, sub, mul, div, casts, clone, where).  The plan
    finds element-wise regions of one data tensor from these (:mod:`dynamiclrp.regions`)."""


def with_facts(entry: OpEntry, **facts) -> OpEntry:
    """``entry`` with more of its op's facts filled in (``gate=True``, ``unrecorded=...``)."""
    return replace(entry, **facts)


# --- when a node's output depends on a constant autograd did not record (``OpEntry.unrecorded``)


def has_unrecorded_input(fn) -> bool:
    """Some input is a constant autograd did not record (a tensor without grad, a scalar)."""
    return any(f is None for f, _ in fn.next_functions)


def self_unrecorded(fn) -> bool:
    """Input 0 (``self``, the tensor written into or added to) is such a constant."""
    return fn.next_functions[0][0] is None


def always_unrecorded(fn) -> bool:
    """The op's constant is never recorded (a Python scalar, a fill value, a strided view)."""
    return True


def product_term_unrecorded(fn) -> bool:
    """``self + c * t1 * t2`` (addcmul) or ``beta * self + alpha * (t1 @ t2)`` (addmm and kin):
    ``self``, or both factors, are constants autograd did not record (and the node did not
    save)."""
    nf = fn.next_functions
    return nf[0][0] is None or (nf[1][0] is None and nf[2][0] is None)


_WRAP = 1 << 64


def _signed(v):
    """Autograd reports negative ``int64`` attributes (``dim=-1``) as unsigned: undo that."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1 << 63:
        return v - _WRAP
    if isinstance(v, tuple):
        return tuple(_signed(u) for u in v)
    return v


def saved(fn, name: str):
    """``fn._saved_<name>``, with negative dimensions restored (``saved(fn, "_saved_dim")``)."""
    return _signed(getattr(fn, name))


class ReplayContext:
    """What a replay function sees: the node, its input values and its output metadata."""

    __slots__ = ("fn", "inputs")

    def __init__(self, fn, inputs: list[Tensor | None]):
        self.fn = fn
        self.inputs = inputs

    def saved(self, name: str):
        return saved(self.fn, name)

    def out_shape(self, k: int = 0) -> torch.Size:
        return torch.Size(self.fn._input_metadata[k].shape)

    def out_dtype(self, k: int = 0) -> torch.dtype:
        return self.fn._input_metadata[k].dtype


class RuleContext:
    """What a rule sees when it runs on one node.

    Attributes
    ----------
    fn:
        The autograd node.
    relevance:
        Relevance of each forward output of the node (zeros where none arrived).
    data:
        Per input slot: does a data source (not a parameter, buffer or constant) feed it?
    wanted:
        Per input slot: does the relevance of that slot lead to a requested input?
    rules:
        The :class:`~dynamiclrp.presets.Rules` in force.
    """

    __slots__ = (
        "fn",
        "relevance",
        "data",
        "wanted",
        "rules",
        "_engine",
        "idx",
        "parameter",
        "absorbed",
    )

    def __init__(self, engine, idx: int, fn, relevance, data, wanted, rules: Rules):
        self._engine = engine
        self.idx = idx
        self.fn = fn
        self.relevance = relevance
        self.data = data
        self.wanted = wanted
        self.rules = rules
        self.parameter: dict[int, Tensor] = {}
        self.absorbed: list[Tensor] = []

    def absorb(self, relevance: Tensor) -> None:
        """Book relevance a constant took that is not one of the node's inputs (an attention
        mask saved inside a fused node) as absorbed."""
        self.absorbed.append(relevance.sum())

    @property
    def r(self) -> Tensor:
        """Relevance of the (first) forward output."""
        return self.relevance[0]

    @property
    def recorded(self) -> bool:
        """Whether the caller passed a recording of the forward pass (an error that would ask
        for one says instead that the recording did not see the value)."""
        return self._engine.resolver.recorded

    @property
    def eps(self) -> float:
        return self.rules.eps

    def saved(self, name: str):
        return saved(self.fn, name)

    def input_value(self, slot: int) -> Tensor:
        """Forward value of input ``slot``: read from saved tensors or recovered by a promise."""
        return self._engine.input_value(self.idx, slot)

    def output_value(self, k: int = 0) -> Tensor:
        """Forward value of output ``k`` of this node, recovered like an input value."""
        return self._engine.output_value(self.idx, k)

    def known_input(self, slot: int) -> Tensor | None:
        """Input ``slot``'s forward value if it is at hand without computing anything, else
        ``None``."""
        return self._engine.known_input(self.idx, slot)

    def remember_input(self, slot: int, value: Tensor) -> None:
        """Offer a value this rule derived for input ``slot`` to the nodes below."""
        self._engine.remember_input(self.idx, slot, value)

    def known_output(self, k: int = 0) -> Tensor | None:
        """Output ``k``'s forward value if it is at hand without computing anything (recovered
        earlier in this run, saved by the node or by a consumer), else ``None``."""
        return self._engine.known_value(self.idx, k)

    def input_shape(self, slot: int) -> torch.Size:
        """Shape of input ``slot`` (from autograd's metadata, no value needed)."""
        return self._engine.input_shape(self.idx, slot)

    def n_inputs(self) -> int:
        return len(self.data)

    def layer_rule(self, family: str, *tensors: Tensor):
        """The rule for ``family`` here, honouring per-layer overrides keyed on ``tensors`` and
        ``Rules.first`` when this node is a first contraction (nearest to the input)."""
        return self.rules.rule_for(family, tensors, first=self._engine.is_first(self.idx))

    def producer_node(self, slot: int) -> int | None:
        """The node that produced input ``slot``, looking through nodes that pass values on
        unchanged (``OpEntry.rearranges`` or ``same_values``: reshapes, permutes, expands, clones,
        casts) along their first input; ``None`` for an unrecorded input."""
        g = self._engine.graph
        entries = self._engine.plan.entries
        e = g.children[self.idx][slot]
        while e is not None:
            entry = entries[e[0]]
            if entry is None or not (entry.rearranges or entry.same_values):
                return e[0]
            kids = g.children[e[0]]
            e = kids[0] if kids else None
        return None

    def producer(self, slot: int) -> OpEntry | None:
        """The op-table entry of :meth:`producer_node` (``None``: unrecorded or no entry)."""
        node = self.producer_node(slot)
        return None if node is None else self._engine.plan.entries[node]

    def is_activation(self, slot: int) -> bool:
        """Whether input ``slot`` is the output of an element-wise nonlinearity of one tensor: an
        op flagged ``OpEntry.gate`` (silu, gelu, sigmoid, ...) or the join of an element-wise
        region (``x * sigmoid(x)`` written out, :mod:`dynamiclrp.regions`)."""
        node = self.producer_node(slot)
        if node is None:
            return False
        entry = self._engine.plan.entries[node]
        return (entry is not None and entry.gate) or node in self._engine.plan.joins

    def bias_partner(self) -> RuleContext | None:
        """With ``Rules.canonize_bias``: for a contraction, the context of the add of a constant
        that is its bias (through reshapes only); for that add, the contraction's; else ``None``."""
        return self._engine.bias_partner(self.idx)

    def fused_data_slot(self) -> int:
        """For an add fused into the contraction below it: the slot of the contraction's output."""
        return self._engine.plan.fused_bias_slot[self.idx]

    def give_fused_constant(self, relevance: Tensor) -> None:
        """For a contraction fused with the add of a constant above it: pass the constant's share
        (``relevance``, in this node's output shape) to that constant when it is a requested input
        (a bias asked for in ``inputs``); the books count it as absorbed either way."""
        self._engine.give_fused_constant(self.idx, relevance)

    def fused_coefficient(self) -> float:
        """For a contraction fused with the add of a constant above it: the coefficient ``a`` of
        ``c + a * f(x, w)`` (-1 for ``c - x @ W``)."""
        return self._engine.fused_coefficient(self.idx)

    def fused_output(self) -> Tensor:
        """For a contraction fused with the add of a constant above it: that add's output value,
        in this node's output layout."""
        return self._engine.fused_output(self.idx)

    def statistic_slots(self) -> tuple[int, ...]:
        """For an element-wise product of two data factors: the factor slots that are a
        parameter-free function of the other factor's data (a norm's ``rsqrt(var)``), found by the
        plan from the graph's structure; the broadcast one of them is a statistic."""
        return self._engine.plan.statistic.get(self.idx, ())

    def partner(self) -> RuleContext | None:
        """With ``Rules.canonize_batchnorm``: the context of the batch norm this contraction merges
        with, or of the contraction this batch norm merges into (paired by the plan); else
        ``None``.  The rules still check that the batch norm is in eval mode."""
        return self._engine.partner(self.idx)


def frozen_bias(ctx: RuleContext, without_bias: Tensor) -> Tensor:
    """The bias of a layer whose bias did not require grad, as ``z - without_bias``.

    Autograd records neither such a bias nor the layer's output; the output's value is recovered
    if anything saved it (the explained output itself, a consumer's saved input), else this fails
    loudly: the rule needs the full output ``z``.
    """
    from ..errors import ValueRecoveryError

    try:
        return ctx.output_value(0) - without_bias
    except ValueRecoveryError as err:
        if ctx.recorded:  # a recording was passed and did not keep it
            raise ValueRecoveryError(
                f"{ctx.fn.name()} (node {ctx.idx}): its bias does not require grad, so autograd "
                "kept neither the bias nor the layer's output, and the recording passed to "
                "explain did not see the layer either: it ran inside an op that the recording "
                "sees only as a whole (e.g. F.multi_head_attention_forward, whose projections "
                "run below its own __torch_function__ dispatch), or in another forward pass than "
                "the one recorded. Let the frozen parameters require grad during the forward "
                "pass: record(model) does that for a model's parameters; a bias passed to a "
                "functional op as a plain tensor needs .requires_grad_()."
            ) from err
        raise ValueRecoveryError(
            f"{ctx.fn.name()} (node {ctx.idx}): its bias does not require grad, so autograd kept "
            "neither the bias nor the layer's output, and the rule needs the full output z. Keep "
            "the model's parameters requiring grad during the forward pass you explain (the "
            "default), or run the forward pass under `with dynamiclrp.record(model) as rec:` and "
            "pass recording=rec to explain (record(model) lets frozen parameters be recorded)."
        ) from err


def sum_to_shape(t: Tensor, shape: Sequence[int]) -> Tensor:
    """Undo broadcasting: sum ``t`` down to ``shape`` (what the gradient of a broadcast does)."""
    shape = torch.Size(shape)
    if t.shape == shape:
        return t
    return t.sum_to_size(shape) if len(shape) else t.sum()


def ratio(r: Tensor, den: Tensor) -> Tensor:
    """``r / den`` where ``den != 0``, and ``0`` where ``den == 0`` (for ``den >= 0``).

    The same values, bit for bit, as ``torch.where(den > 0, r / torch.where(den > 0, den, 1), 0)``
    for ``den >= 0``, in 4 ATen ops instead of 6 plus a ``scalar_tensor`` and a dtype conversion
    for each Python scalar given to ``torch.where`` (``masked_fill`` takes the scalar as is).
    A NaN in ``den`` gives NaN (the ``where`` form gave 0 there; the relevance of a NaN operand
    was NaN either way, and is reported as such)."""
    zero = den == 0
    return (r / den.masked_fill(zero, 1)).masked_fill_(zero, 0)
