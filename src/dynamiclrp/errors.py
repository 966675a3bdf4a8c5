"""Exceptions raised by dynamiclrp.  Every error names what went wrong, where, and what to do.

Hierarchy (``docs/errors.md`` lists every wrong call that raises each)::

    DynamicLRPError
    ├── GraphError                   no autograd graph, an input not in it, a freed graph
    │   └── InputError (ValueError)  output/inputs unusable: not tensors, empty, NaN, meta, ...
    ├── TargetError (ValueError)     target= / relevance= do not fit the output
    ├── SettingError (ValueError)    rules=, preset name, Rules field, cache_size=, recording=
    │   └── RuleParameterError       a rule's own parameter (gamma, alpha/beta, z-box bounds)
    ├── UncoveredOpError             an op on the path has no rule (before propagation)
    ├── ValueRecoveryError           a forward value cannot be rebuilt from the graph
    └── NonFiniteRelevanceError (FloatingPointError)  NaN/Inf appeared during propagation
"""


class DynamicLRPError(Exception):
    """Base class of every error this library raises."""


class GraphError(DynamicLRPError):
    """The output has no usable autograd graph, or an input is not part of it."""


class InputError(GraphError, ValueError):
    """The ``output`` or ``inputs`` argument cannot be explained as given: not a tensor, empty,
    not finite, on the meta device, of an integer or complex dtype, or listed twice."""


class TargetError(DynamicLRPError, ValueError):
    """A target or relevance seed does not fit the output."""


class SettingError(DynamicLRPError, ValueError):
    """A setting of the explanation is invalid: ``rules=`` (a preset name, a :class:`Rules`
    field), ``cache_size=`` or ``recording=``."""


class RuleParameterError(SettingError):
    """A rule's own parameter is invalid (negative gamma, ``alpha - beta != 1``, z-box bounds with
    ``low > high``)."""


class UncoveredOpError(DynamicLRPError):
    """The graph holds autograd nodes that no rule covers (raised before any propagation)."""


class ValueRecoveryError(DynamicLRPError):
    """A forward value a rule needs cannot be rebuilt from what autograd saved."""


class NonFiniteRelevanceError(DynamicLRPError, FloatingPointError):
    """NaN or Inf appeared in relevance; the message names the first op that produced it."""
