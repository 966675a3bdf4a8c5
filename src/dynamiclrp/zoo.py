"""A zoo of tiny architectures with random weights, for coverage tests and the CLI.

Every entry builds a small model from a config (no downloads), in eval mode, and an example input;
:func:`forward` runs it and returns what to explain.  Entries need optional packages
(``transformers``, ``torchvision``); :func:`available` says which can be built here.  Nothing in
the library depends on this module: it is test and demo infrastructure.

    out, x, rec = zoo.forward("gpt2", batch=2)
    rel = dynamiclrp.explain(out, x, target=out.argmax(1), recording=rec)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .recording import Recording


@dataclass(frozen=True)
class ZooEntry:
    """One architecture.

    Attributes
    ----------
    name:
        Zoo name (``"gpt2"``).
    requires:
        The optional package it needs (``"transformers"``, ``"torchvision"``) or ``"torch"``.
    build:
        ``() -> model``: tiny, random weights; the zoo seeds, casts and sets eval mode.
    inputs:
        ``(model, batch, generator) -> forward kwargs``; the explained tensor is one of them.
    explained:
        The kwarg holding the tensor to explain (embeddings, pixels, audio, features).
    select:
        ``model output -> 2-D (batch, k) tensor`` whose per-row argmax is explained.
    note:
        What is explained (e.g. "next-token logits at the last position").
    """

    name: str
    requires: str
    build: Callable[[], nn.Module]
    inputs: Callable[[nn.Module, int, torch.Generator], dict[str, Any]]
    explained: str
    select: Callable[[Any], Tensor]
    note: str = ""


ZOO: dict[str, ZooEntry] = {}

GAPS: dict[str, str] = {}
"""Architectures not in the zoo yet, with the specific reason (listed in docs/coverage.md)."""


def register(entry: ZooEntry) -> ZooEntry:
    if entry.name in ZOO:
        raise ValueError(f"zoo entry {entry.name!r} defined twice")
    ZOO[entry.name] = entry
    return entry


def available(entry: ZooEntry | str) -> bool:
    """Whether the package an entry needs is installed."""
    entry = ZOO[entry] if isinstance(entry, str) else entry
    return entry.requires == "torch" or importlib.util.find_spec(entry.requires) is not None


def build(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """The entry's model, seeded, cast to ``dtype``, in eval mode."""
    entry = ZOO[name]
    torch.manual_seed(seed)
    return entry.build().to(dtype).eval()


def example(name: str, model: nn.Module, batch: int = 1, seed: int = 0) -> dict[str, Any]:
    """Forward kwargs for entry ``name``: a batch of random inputs (seeded)."""
    return ZOO[name].inputs(model, batch, torch.Generator().manual_seed(seed))


def forward(
    name: str,
    batch: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    model: nn.Module | None = None,
    kwargs: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor, Recording]:
    """Run entry ``name`` under :func:`dynamiclrp.record` (on ``kwargs`` or a fresh example).

    Returns ``(output, explained_input, recording)`` with ``output`` 2-D ``(batch, k)``.
    """
    entry = ZOO[name]
    model = build(name, dtype) if model is None else model
    kwargs = dict(example(name, model, batch, seed) if kwargs is None else kwargs)
    x = kwargs[entry.explained]
    if x.is_floating_point():
        x = kwargs[entry.explained] = x.to(dtype).detach().requires_grad_()
    with Recording(model) as rec:
        out = entry.select(model(**kwargs))
    return out, x, rec


def run(name: str) -> tuple[Tensor, Tensor]:
    """``(output, input)`` for the CLI (``dynamiclrp coverage zoo:NAME``)."""
    out, x, _ = forward(name)
    return out, x


# --- helpers for entries -----------------------------------------------------------------------


def coverage_table() -> str:
    """The zoo's coverage as a Markdown table (``dynamiclrp coverage-table``): per entry the
    autograd nodes, those with a dedicated rule, unique op types, the promise statistics of one
    explanation (promises, replayed internal nodes, delta, max depth, density rho), and how the
    relevance divides: (inputs + absorbed) / seeded, and the books' residual."""
    import time

    import torch as _torch

    from . import __version__, coverage

    rows = [
        "| model | needs | nodes | covered | unique ops | promises | internal | delta | depth "
        "| rho | (in + absorbed) / seeded | residual | explain s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(ZOO):
        entry = ZOO[name]
        if not available(entry):
            rows.append(f"| {name} | {entry.requires} | not installed here | | | | | | | | | | |")
            continue
        out, x, rec = forward(name)
        t0 = time.perf_counter()
        r = coverage(out, x, out.detach().argmax(1), recording=rec)
        dt = time.perf_counter() - t0
        missing = ", ".join(f"{o.name} x{o.count}" for o in r.uncovered)
        rows.append(
            f"| {name} | {entry.requires} | {r.total_nodes} | {r.covered_nodes}"
            f"{' (no rule: ' + missing + ')' if missing else ''} | {r.unique_ops} | {r.promises} "
            f"| {r.internal_nodes} | {r.delta} | {r.max_depth} | {r.rho:.3f} "
            f"| {r.conservation:.4f} | {r.residual:.1e} | {dt:.2f} |"
        )
    for name in sorted(GAPS):
        rows.append(f"| {name} | not yet: {GAPS[name]} | | | | | | | | | | | |")
    head = (
        "# Coverage of the architecture zoo\n\n"
        "Generated by `dynamiclrp coverage-table --out docs/coverage.md` (dynamiclrp "
        f"{__version__}, torch {_torch.__version__}); every model tiny, random weights, float64, "
        "batch 1, explaining the argmax of its 2-D output (see `src/dynamiclrp/zoo*.py`).\n\n"
        "- *nodes*: autograd nodes other than leaves; *covered*: those with a dedicated rule "
        "(no fallback exists).\n"
        "- *promises*: forward values rules asked for that their node had not saved; *internal*: "
        "nodes replayed to rebuild them; *delta*: summed forward-chain length; *rho*: "
        "promise-generating nodes / nodes (the paper's table 2).\n"
        "- *(in + absorbed) / seeded*: relevance at the input plus what biases and constants "
        "absorbed, over the seed; the rest is the stabiliser, the non-conserving softmax rule "
        "(attention) and relevance sent to unrequested data (e.g. decoder tokens); *residual*: "
        "what the books miss after all of those (0 up to rounding).\n\n"
    )
    return head + "\n".join(rows) + "\n\n" + ZOO_TABLE_END + "\n"


ZOO_TABLE_END = "<!-- zoo table end: the sections below are written by benchmarks/ scripts -->"


# the entries live in one module per source library
from . import zoo_hf, zoo_vision  # noqa: E402, F401  (registers entries)
