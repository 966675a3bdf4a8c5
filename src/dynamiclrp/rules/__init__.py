"""The op table: one :class:`~.base.OpEntry` per autograd node type, grouped by rule family.

Like PyTorch's ``derivatives.yaml``, everything op-specific lives here; nothing else in the engine
knows op names.  Adding an op is adding an entry to the family module it belongs to.
"""

from __future__ import annotations

from . import (
    attention,
    contraction,
    elementwise,
    losses,
    normalisation,
    recurrent,
    reduction,
    routing,
    sequence,
    summing,
)
from .base import OpEntry, RuleContext

LEAF = "AccumulateGrad"

OP_TABLE: dict[str, OpEntry] = {}
for _family in (
    contraction,
    elementwise,
    reduction,
    losses,
    routing,
    normalisation,
    attention,
    recurrent,
    sequence,
    summing,
):
    _overlap = OP_TABLE.keys() & _family.TABLE.keys()
    assert not _overlap, f"op table entries defined twice: {_overlap}"
    OP_TABLE.update(_family.TABLE)

__all__ = ["OP_TABLE", "LEAF", "OpEntry", "RuleContext"]
