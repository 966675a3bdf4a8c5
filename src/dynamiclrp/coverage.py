"""Which autograd ops a graph holds, which have a rule, and what the promises cost.

:func:`coverage` answers the paper's table A.4 (nodes, covered nodes, unique ops) and, when given the
inputs to explain, its table 2 (promises, internal nodes, delta, density rho) from one explanation,
plus how well the books close.  Counting is honest: an op counts as covered only if the op table
has a dedicated entry for it; there is no fallback to count.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

from .errors import GraphError
from .graph import build_graph
from .rules import LEAF, OP_TABLE


@dataclass
class OpCount:
    """One autograd node type in a graph."""

    name: str
    count: int
    covered: bool
    family: str
    promise_generating: bool


@dataclass
class CoverageReport:
    """Coverage of one graph (see module docstring)."""

    ops: list[OpCount] = field(default_factory=list)
    leaves: int = 0
    promises: int | None = None
    internal_nodes: int | None = None
    delta: int | None = None
    max_depth: int | None = None
    conservation: float | None = None
    residual: float | None = None

    @property
    def total_nodes(self) -> int:
        """Operations (autograd nodes other than leaves)."""
        return sum(o.count for o in self.ops)

    @property
    def covered_nodes(self) -> int:
        return sum(o.count for o in self.ops if o.covered)

    @property
    def unique_ops(self) -> int:
        return len(self.ops)

    @property
    def unique_covered(self) -> int:
        return sum(1 for o in self.ops if o.covered)

    @property
    def uncovered(self) -> list[OpCount]:
        return [o for o in self.ops if not o.covered]

    @property
    def rho(self) -> float:
        """Promise density: promise-generating ops / all ops."""
        n = self.total_nodes
        return sum(o.count for o in self.ops if o.promise_generating) / n if n else 0.0

    def __str__(self) -> str:
        lines = [f"{'op':<48} {'count':>6}  {'rule':<20}"]
        for o in self.ops:
            rule = o.family if o.covered else "NO RULE"
            lines.append(
                f"{o.name:<48} {o.count:>6}  {rule:<20}{' promise' * o.promise_generating}"
            )
        lines.append(
            f"covered nodes {self.covered_nodes}/{self.total_nodes}, unique ops covered "
            f"{self.unique_covered}/{self.unique_ops}, leaves {self.leaves}, rho {self.rho:.3f}"
        )
        if self.promises is not None:
            lines.append(
                f"promises {self.promises}, internal nodes {self.internal_nodes}, "
                f"delta {self.delta}, max depth {self.max_depth}, "
                f"(inputs + absorbed) / seeded {self.conservation:.6f}, books residual / seeded "
                f"{self.residual:.2e}"
            )
        return "\n".join(lines)


def coverage(
    output: Tensor,
    inputs: Tensor | Sequence[Tensor] | None = None,
    target=None,
    *,
    relevance: Tensor | None = None,
    rules="dynamiclrp",
    recording=None,
) -> CoverageReport:
    """Coverage of ``output``'s graph; with ``inputs``, also explain once for promise statistics.

    The explanation (when ``inputs`` is given) raises like :func:`dynamiclrp.explain` would, so an
    uncovered op on the path to the inputs is reported as an error there; the static table lists
    every node of the graph whatever the inputs.
    """
    if not isinstance(output, Tensor) or output.grad_fn is None:
        raise GraphError("coverage() needs an output tensor with a grad_fn (see explain()).")
    from .engine import _probe_custom_functions

    graph = build_graph(output.grad_fn)
    counts = Counter(graph.names)
    report = CoverageReport(leaves=counts.pop(LEAF, 0))
    entries = [OP_TABLE.get(name) for name in graph.names]
    _probe_custom_functions(graph, entries, range(len(graph)))  # element-wise custom Functions
    found = {name: e for name, e in zip(graph.names, entries, strict=True) if e is not None}
    for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        entry = found.get(name)
        report.ops.append(
            OpCount(
                name,
                count,
                entry is not None,
                entry.family if entry is not None else "",
                entry is not None and entry.needs_values,
            )
        )
    if inputs is not None:
        from . import explain

        _, run = explain(
            output,
            inputs,
            target,
            relevance=relevance,
            rules=rules,
            recording=recording,
            return_report=True,
        )
        stats = run.promise_stats
        report.promises = stats.promises
        report.internal_nodes = stats.internal_nodes
        report.delta = stats.delta
        report.max_depth = stats.max_depth
        books = sum(v for v, b in zip(run.inputs, run.in_books, strict=True) if b) + run.absorbed
        report.conservation = books / run.seeded if run.seeded else float("nan")
        report.residual = run.residual / run.seeded if run.seeded else float("nan")
    return report
