"""Element-wise regions: one activation, whatever ops spell it (``docs/rules.md``, 2.16).

A connected piece of the graph that computes an element-wise function of one data tensor (same
shape in and out, only constants besides) is one activation and gets the activation rule,
``R_in = R_out``, however it is written: ``x * torch.sigmoid(x)`` is ``silu(x)``,
``0.5 * x * (1 + torch.tanh(c * (x + 0.044715 * x**3)))`` is ``gelu(x, "tanh")``.

The analysis uses the graph's structure only (no tensors), from the op table's
``OpEntry.elementwise`` flags and the plan's data flags:

- Every edge gets a *source*.  The output of an element-wise node whose data operands all carry
  the same source ``s`` and all have the output's shape has source ``s``; any other edge (the
  output of a contraction, a reduction, a reshape, a leaf, a requested tensor, an element-wise node
  fed by two different data tensors or by a broadcast data operand) is its own source.
- A *join* is an element-wise node with two or more data operands, all with the same source: the
  place where two paths of one region meet again (the final product of ``x * sigmoid(x)``).
- The join's *target* is the nearest edge that every data path from the join down to the source
  passes through (its dominator in the region): ``x`` for ``x * sigmoid(x)``, whatever lies
  below ``x``.  The engine gives the join's whole relevance to that edge; the nodes in between
  receive nothing from the join.

A chain with one data path (``x -> + constant -> relu``) has no join and keeps its per-op rules:
a constant added there keeps its share, LRP's bias treatment.
"""

from __future__ import annotations

from collections.abc import Sequence

from .graph import Edge, Graph
from .rules.base import OpEntry


def _shape(graph: Graph, e: Edge) -> tuple[int, ...]:
    return tuple(graph.fns[e[0]]._input_metadata[e[1]].shape)


def element_wise_joins(
    graph: Graph,
    entries: Sequence[OpEntry | None],
    data: Sequence[bool],
    requested: Sequence[Edge],
    topo: Sequence[int] | None = None,
) -> dict[int, Edge]:
    """The joins of the graph's element-wise regions, each mapped to the edge that receives its
    relevance (module docstring).

    Parameters
    ----------
    graph:
        The backward graph.
    entries:
        The op-table entry of each node (``None``: uncovered).
    data:
        Per node: does a data source feed it (``Plan.data``)?
    requested:
        The requested input edges: each is its own source, so no join routes relevance past it.
    topo:
        ``graph.topological_order()``, if already computed.

    Returns
    -------
    ``{join node: target edge}``.
    """
    topo = graph.topological_order() if topo is None else topo
    position = {v: i for i, v in enumerate(topo)}  # consumers before producers
    own = set(requested)
    source: dict[Edge, Edge] = {}  # edges inside a region; any other edge is its own source
    below: dict[Edge, Edge] = {}  # region edge -> the nearest edge all its data paths pass
    joins: dict[int, Edge] = {}
    for v in reversed(topo):  # producers first
        entry = entries[v]
        if entry is None or not entry.elementwise or len(graph.fns[v]._input_metadata) != 1:
            continue
        operands = {e for e in graph.children[v] if e is not None and data[e[0]]}
        if not operands:
            continue
        sources = {source.get(e, e) for e in operands}
        out_shape = tuple(graph.fns[v]._input_metadata[0].shape)
        if len(sources) != 1 or any(_shape(graph, e) != out_shape for e in operands):
            continue
        target = _dominator(position, below, operands)
        if sum(e is not None and data[e[0]] for e in graph.children[v]) >= 2:
            joins[v] = target
        if (v, 0) not in own:
            source[(v, 0)] = sources.pop()
            below[(v, 0)] = target
    return joins


def _dominator(position: dict[int, int], below: dict[Edge, Edge], frontier: set[Edge]) -> Edge:
    """The nearest edge every data path from ``frontier`` down to the region's source passes
    through.

    The frontier edge whose producer is nearest the output is replaced by the edge below it that
    all its own paths pass through (``below``: its one data operand, or the target of the join
    that made it) until one edge is left.  An edge every path passes through is reached by all the
    others' paths first (their producers lie above it), so it is never replaced while another edge
    remains: the first single edge is the nearest such edge.  Each step jumps a whole inner region,
    so a chain of ``k`` joins costs ``O(k)``, not ``O(k^2)``."""
    while len(frontier) > 1:
        e = min(frontier, key=lambda f: position[f[0]])
        frontier.remove(e)
        frontier.add(below[e])
    return next(iter(frontier))
