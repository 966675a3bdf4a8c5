"""Exceptions raised by dynamiclrp.  Every error names what went wrong, where, and what to do."""


class DynamicLRPError(Exception):
    """Base class of every error this library raises."""


class GraphError(DynamicLRPError):
    """The output has no autograd graph, or an input is not part of it."""


class TargetError(DynamicLRPError, ValueError):
    """A target or relevance seed does not fit the output."""


class UncoveredOpError(DynamicLRPError):
    """The graph holds autograd nodes that no rule covers (raised before any propagation)."""


class ValueRecoveryError(DynamicLRPError):
    """A forward value a rule needs cannot be rebuilt from what autograd saved."""


class NonFiniteRelevanceError(DynamicLRPError, FloatingPointError):
    """NaN or Inf appeared in relevance; the message names the first op that produced it."""
