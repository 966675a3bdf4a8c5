"""Where relevance went: the books of one explanation.

Every node's rule is checked in and out: relevance arriving at the node, relevance it passes to each
input, and the difference.  The difference is *stabiliser* loss for rules with ``stab(z)``
denominators (contractions, normalisation, signed add and reductions) and for constants a rule
leaves out of its map (the running mean of an eval-mode batch norm), and *rule* gain or loss for rules that do not conserve by design (softmax,
attention).  Relevance a routing op drops (elements a ``masked_fill`` replaced) and relevance a rule sends to a constant operand (bias, buffer, mask, class token) is
*absorbed*; relevance sent to data that reaches no requested input is *unrequested*.  Then::

    seeded = inputs + absorbed + unrequested + stabiliser + rule    (up to rounding)

Sums are kept as tensors during the run and read once at the end (one device sync), which is also
when non-finite relevance is detected and traced back to the first node that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import NonFiniteRelevanceError

STABILISER_FAMILIES = {
    "contraction",
    "normalisation",
    "elementwise-binary",
    "reduction",
    "recurrent",
}


@dataclass
class RelevanceReport:
    """The books of one explanation (floats; holds no tensors of the run).

    Attributes
    ----------
    seeded:
        Sum of the seed relevance.
    inputs:
        Sum of relevance per requested input (in the order given).
    in_books:
        Per input, whether it counts in the books: not a parameter, and not an intermediate tensor
        whose relevance propagates on to another requested input below it.
    parameters:
        Relevance read at requested parameters (a view from the weights' side, outside the books).
    absorbed, unrequested, stabiliser, rule:
        See the module docstring.
    by_family:
        ``family -> (stabiliser or rule difference)`` summed over that family's nodes.
    promises:
        How forward values were recovered: counts per source kind.
    promise_stats:
        :class:`~dynamiclrp.promises.PromiseStats` of the run.
    probed:
        Custom ``autograd.Function`` node types without an op-table entry that a probe found
        element-wise (:mod:`dynamiclrp.rules.probe`), explained with the identity rule.
    """

    seeded: float = 0.0
    inputs: list[float] = field(default_factory=list)
    in_books: list[bool] = field(default_factory=list)
    parameters: dict[int, float] = field(default_factory=dict)
    absorbed: float = 0.0
    unrequested: float = 0.0
    stabiliser: float = 0.0
    rule: float = 0.0
    by_family: dict[str, float] = field(default_factory=dict)
    promises: dict[str, int] = field(default_factory=dict)
    promise_stats: object = None
    nodes: int = 0
    probed: list[str] = field(default_factory=list)

    @property
    def residual(self) -> float:
        """``seeded - (inputs + absorbed + unrequested + stabiliser + rule)``: ~0 when the books close."""
        return self.seeded - (
            sum(v for v, b in zip(self.inputs, self.in_books, strict=True) if b)
            + self.absorbed
            + self.unrequested
            + self.stabiliser
            + self.rule
        )

    def __str__(self) -> str:
        lines = [
            f"seeded at the output          {self.seeded: .6g}",
            *(f"arrived at input {i:<13} {v: .6g}" for i, v in enumerate(self.inputs)),
            f"absorbed by constants/biases  {self.absorbed: .6g}",
            f"sent to unrequested data      {self.unrequested: .6g}",
            f"lost to stabiliser/centring   {self.stabiliser: .6g}",
            f"changed by non-conserving rules {self.rule: .6g}",
            f"residual (books close at ~0)  {self.residual: .3g}",
        ]
        lines += [f"  {fam}: {v: .6g}" for fam, v in sorted(self.by_family.items())]
        if self.parameters:
            lines += [f"parameter input {i}: {v: .6g}" for i, v in self.parameters.items()]
        if self.promises:
            lines.append(
                "forward values recovered: "
                + ", ".join(f"{k} {v}" for k, v in self.promises.items())
            )
        if self.probed:
            lines.append(
                "custom autograd Functions probed element-wise (identity rule): "
                + ", ".join(self.probed)
            )
        return "\n".join(lines)


class Ledger:
    """Collects per-node sums as tensors during a run."""

    def __init__(self):
        self.nodes: list[int] = []
        self.families: list[str] = []
        self.r_in: list[Tensor] = []
        self.r_out: list[Tensor] = []
        self.absorbed: list[Tensor] = []
        self.unrequested: list[Tensor] = []

    def record(self, node: int, family: str, r_in: Tensor, r_out: Tensor, books: bool) -> None:
        """Check node ``node`` in and out; ``books=False`` for parameter relevance (checked for
        NaN, outside the books).  Only the 0-d sums are kept; the arithmetic on them waits for
        :meth:`close`, so a node costs no extra kernels here."""
        self.nodes.append(node)
        self.families.append(family if books else "")
        self.r_in.append(r_in)
        self.r_out.append(r_out)

    def close(
        self, describe, seeded: Tensor, inputs: list[Tensor], in_books: list[bool], parameters
    ) -> RelevanceReport:
        """Read all sums (one sync), raise on non-finite relevance, return the report."""
        checks, r_in = _stack64(self.r_out), _stack64(self.r_in)
        books = torch.tensor([bool(f) for f in self.families], dtype=torch.bool)
        diffs = torch.where(books, r_in - checks, 0.0) if len(books) else torch.zeros(0)
        bad = (~torch.isfinite(checks)).nonzero()
        if len(bad):
            i = int(bad[0])
            hint = (
                "Check the model's output and inputs for NaN/Inf, or raise Rules.eps if a "
                "denominator vanished."
            )
            if seeded.dtype == torch.float16:  # inf, or inf - inf = NaN in a sum
                hint = (
                    "In float16 this is most likely an overflow (its largest value is 65504, and "
                    "relevance of cancelling terms can exceed the output): explain with "
                    "dtype=torch.float32 (relevance accumulated in float32 on the model's float16 "
                    "values), or run the model in bfloat16. " + hint
                )
            raise NonFiniteRelevanceError(
                f"Relevance became NaN or Inf at {describe(self.nodes[i])} (the first op, in "
                f"propagation order, whose output relevance is not finite; {len(bad)} ops in all). "
                + hint
            )
        seeded_f = float(seeded)
        report = RelevanceReport(seeded=seeded_f, nodes=len(self.nodes))
        report.inputs = [float(t) for t in inputs]
        report.in_books = list(in_books)
        report.parameters = {i: float(t) for i, t in parameters.items()}
        # one stack, conversion and sum each (a conversion and an add per term before)
        report.absorbed = float(_stack64(self.absorbed).sum())
        report.unrequested = float(_stack64(self.unrequested).sum())
        for fam, d in zip(self.families, diffs.tolist(), strict=True):
            if not fam:
                continue
            report.by_family[fam] = report.by_family.get(fam, 0.0) + d
            if fam == "routing":  # elements replaced by constants (masked_fill, pad, ...)
                report.absorbed += d
            elif fam in STABILISER_FAMILIES:
                report.stabiliser += d
            else:
                report.rule += d
        if not all(map(torch.isfinite, (torch.tensor(report.absorbed), torch.tensor(seeded_f)))):
            raise NonFiniteRelevanceError(
                "Relevance absorbed by constants, or the seed, is NaN or Inf: check the output."
            )
        return report


def _stack64(sums: list[Tensor]) -> Tensor:
    """0-d sums as one float64 CPU vector (one device-to-host copy when they share a dtype)."""
    if not sums:
        return torch.zeros(0, dtype=torch.float64)
    if len({t.dtype for t in sums}) == 1 and len({t.device for t in sums}) == 1:
        return torch.stack(sums).double().cpu()
    return torch.stack([t.detach().to("cpu", torch.float64) for t in sums])
