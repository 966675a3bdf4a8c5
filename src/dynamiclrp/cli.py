"""Command line: ``dynamiclrp coverage MODULE:CALLABLE`` (or a zoo entry, ``zoo:NAME``), and
``dynamiclrp coverage-table [--out docs/coverage.md]`` for the whole zoo.

The callable takes no arguments and returns ``(output, inputs)``: the output tensor of a forward
pass (2-D ``(batch, classes)``, or anything with ``--target none``) and the tensor(s) to explain.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _load(spec: str):
    if spec.startswith("zoo:"):
        from . import zoo

        return lambda: zoo.run(spec[4:])
    module, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"expected MODULE:CALLABLE or zoo:NAME, got {spec!r}")
    sys.path.insert(0, "")
    return getattr(importlib.import_module(module), attr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dynamiclrp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cov = sub.add_parser("coverage", help="op coverage and promise statistics of one graph")
    cov.add_argument("spec", help="MODULE:CALLABLE returning (output, inputs), or zoo:NAME")
    cov.add_argument("--target", default="argmax", help="'argmax' (per row), 'none', or an int")
    cov.add_argument("--rules", default="dynamiclrp", help="rule preset")
    table = sub.add_parser("coverage-table", help="coverage of every zoo entry, as Markdown")
    table.add_argument("--out", help="write the table to this file (default: print it)")
    args = parser.parse_args(argv)

    if args.command == "coverage-table":
        from .zoo import coverage_table

        text = coverage_table()
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        else:
            print(text)
        return 0

    from . import coverage

    output, inputs = _load(args.spec)()
    if args.target == "none":
        target = None
    elif args.target == "argmax":
        target = output.detach().argmax(-1) if output.dim() == 2 else None
    else:
        target = int(args.target)
    print(coverage(output, inputs, target, rules=args.rules))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
