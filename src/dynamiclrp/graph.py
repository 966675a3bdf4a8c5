"""The backward graph as plain Python data, built iteratively from ``output.grad_fn``.

Nodes are numbered in a deterministic depth-first order, so two graphs of the same structure number
their nodes alike and a cached plan (:mod:`dynamiclrp.plan`) can be replayed by index.  Nothing is
written onto PyTorch's nodes; the :class:`Graph` only holds references to them for the duration of
one explanation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

Edge = tuple[int, int]
"""``(node index, output_nr)``: one forward output of one node."""


@dataclass
class Graph:
    """The backward graph of one output.

    Attributes
    ----------
    fns:
        The autograd nodes, index 0 is ``output.grad_fn``.
    names:
        ``type(fn).__name__`` of each node.
    children:
        For each node, one entry per input slot: the :data:`Edge` the input came from, or ``None``
        when that input did not require grad (a constant the graph does not record).
    consumers:
        For each edge, the ``(node, slot)`` pairs that consumed it in the forward pass.
    signature:
        A digest of names and edges: equal signatures mean equal structure.
    """

    fns: list
    names: list[str]
    children: list[list[Edge | None]]
    consumers: dict[Edge, list[tuple[int, int]]] = field(default_factory=dict)
    signature: str = ""
    index: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.fns)

    def describe(self, idx: int) -> str:
        """``'AddBackward0 (node 12)'``: how errors name a node."""
        return f"{self.names[idx]} (node {idx} of {len(self.fns)} in the backward graph)"

    def topological_order(self) -> list[int]:
        """Parents before children (node 0 first); iterative Kahn's algorithm."""
        pending = [0] * len(self.fns)
        for kids in self.children:
            for e in kids:
                if e is not None:
                    pending[e[0]] += 1
        order, stack = [], [0]
        while stack:
            v = stack.pop()
            order.append(v)
            for e in self.children[v]:
                if e is None:
                    continue
                pending[e[0]] -= 1
                if pending[e[0]] == 0:
                    stack.append(e[0])
        return order


def build_graph(root) -> Graph:
    """Walk ``root.next_functions`` iteratively (no recursion limit) into a :class:`Graph`."""
    index = {root: 0}
    fns, names, children = [root], [type(root).__name__], []
    h = hashlib.blake2b(digest_size=16)
    i = 0
    while i < len(fns):  # breadth-first: the numbering is the visiting order
        kids: list[Edge | None] = []
        for child, output_nr in fns[i].next_functions:
            if child is None:
                kids.append(None)
                continue
            j = index.get(child)
            if j is None:
                j = index[child] = len(fns)
                fns.append(child)
                names.append(type(child).__name__)
            kids.append((j, output_nr))
        children.append(kids)
        h.update(f"{names[i]}{kids};".encode())
        i += 1
    consumers: dict[Edge, list[tuple[int, int]]] = {}
    for v, kids in enumerate(children):
        for slot, e in enumerate(kids):
            if e is not None:
                consumers.setdefault(e, []).append((v, slot))
    return Graph(fns, names, children, consumers, h.hexdigest(), index)


def gradient_edge(t: torch.Tensor):
    """The autograd ``(node, output_nr)`` a tensor's gradient flows into (leaf or not)."""
    return torch.autograd.graph.get_gradient_edge(t)
