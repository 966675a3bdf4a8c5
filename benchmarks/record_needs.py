"""Which zoo models need ``dynamiclrp.record()`` with the plain ``explain(output, ...)`` call.

For every zoo entry that can be built here (``src/dynamiclrp/zoo*.py``; the vision entries need
``torchvision``), the model is built as the zoo builds it (tiny, random weights, float64, eval
mode, batch 1), run **without** a recording, and explained with
``dynamiclrp.explain(out, x, target=out.argmax(1))``.  The outcome is one of

* ``ok``: the plain call works;
* ``needs record()``: a :class:`~dynamiclrp.ValueRecoveryError` that asks for a recording, with
  the node it names (the first value the engine could not recover);
* ``error``: anything else (it should not happen: ``tests/test_zoo.py`` explains every entry with
  a recording), with its type.

With ``--frozen`` the parameters are frozen first (``model.requires_grad_(False)``), the case
``record(model)`` exists for.  ``--check`` also explains each entry that needs a recording under
``dynamiclrp.record(model)`` and reports whether that works.

Run from the repository root (before/after a change: point ``PYTHONPATH`` at the other tree)::

    PYTHONPATH=src python benchmarks/record_needs.py                 # Markdown table + counts
    PYTHONPATH=src python benchmarks/record_needs.py --frozen --check
    PYTHONPATH=src python benchmarks/record_needs.py --only gpt2_eager,llama_eager
"""

from __future__ import annotations

import argparse
import re
import time

import torch

import dynamiclrp
from dynamiclrp import zoo


def _plain(name: str, frozen: bool, recorded: bool = False) -> tuple[str, str]:
    """``(outcome, detail)`` of the plain explain call on entry ``name``."""
    entry = zoo.ZOO[name]
    model = zoo.build(name)
    if frozen:
        model.requires_grad_(False)
    kwargs = zoo.example(name, model, batch=1)
    x = kwargs[entry.explained]
    if x.is_floating_point():
        x = kwargs[entry.explained] = x.double().detach().requires_grad_()
    try:
        if recorded:
            with dynamiclrp.record(model) as rec:
                out = entry.select(model(**kwargs))
        else:
            rec = None
            out = entry.select(model(**kwargs))
        dynamiclrp.explain(out, x, target=out.detach().argmax(1), recording=rec)
    except dynamiclrp.ValueRecoveryError as err:
        node = re.search(r"(\w+) \(node \d+", str(err))
        kind = "needs record()" if "record(" in str(err) else "error"
        return kind, node.group(1) if node else str(err)[:80]
    except Exception as err:  # reported, not hidden: the table says which and why
        return "error", f"{type(err).__name__}: {str(err)[:80]}"
    return "ok", ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frozen", action="store_true", help="freeze the parameters first")
    parser.add_argument("--check", action="store_true", help="retry under record(model)")
    parser.add_argument("--only", default="", help="comma-separated zoo names")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or sorted(zoo.ZOO)
    print(
        f"dynamiclrp {dynamiclrp.__version__} ({dynamiclrp.__file__}), torch {torch.__version__}"
        f", parameters {'frozen' if args.frozen else 'trainable'}\n"
    )
    print("| model | plain explain() | node named | under record(model) | s |")
    print("|---|---|---|---|---|")
    counts: dict[str, int] = {}
    missing = []
    for name in names:
        if not zoo.available(name):
            missing.append(f"{name} ({zoo.ZOO[name].requires})")
            continue
        t0 = time.perf_counter()
        outcome, detail = _plain(name, args.frozen)
        retry = ""
        if args.check and outcome != "ok":
            retry = _plain(name, args.frozen, recorded=True)[0]
        counts[outcome] = counts.get(outcome, 0) + 1
        dt = time.perf_counter() - t0
        print(f"| {name} | {outcome} | {detail} | {retry} | {dt:.1f} |", flush=True)
    total = sum(counts.values())
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    print(f"\n{total} entries measured ({summary})")
    if missing:
        print(f"not measured (package not installed): {', '.join(missing)}")


if __name__ == "__main__":
    main()
