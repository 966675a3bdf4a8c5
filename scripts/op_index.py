"""Generate the op index of ``docs/rules.md`` from the op table.

Every node type of ``dynamiclrp.rules.OP_TABLE`` gets one row: its family, the section of
``docs/rules.md`` that states its rule (the first ``###`` section naming it literally), and what the
plan knows of it (forward values it recovers, whether it can be replayed, the structural facts of
its entry).  A node type no section names is listed under "not described" and fails
``tests/test_docs.py``, so the page cannot fall behind the table.

    python scripts/op_index.py            # rewrite the index in docs/rules.md
    python scripts/op_index.py --check    # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "rules.md"
START, END = "<!-- op-index:start -->", "<!-- op-index:end -->"


def sections(text: str) -> list[tuple[str, str]]:
    """``(number, body)`` of every ``### n.m`` section, the index itself left out."""
    text = text.split(START)[0] + (text.split(END, 1)[1] if END in text else "")
    parts = re.split(r"^### ", text, flags=re.M)[1:]
    out = []
    for part in parts:
        number = part.split(" ", 1)[0]
        out.append((number, part))
    return out


def section_of(name: str, secs: list[tuple[str, str]]) -> str | None:
    pattern = re.compile(r"(?<![A-Za-z0-9_])" + re.escape(name) + r"(?![A-Za-z0-9_])")
    for number, body in secs:
        if pattern.search(body):
            return number
    return None


def facts(entry) -> str:
    said = []
    if entry.needs_values:
        said.append("recovers values")
    if entry.replay is None:
        said.append("no replay")
    for flag in ("rearranges", "sums", "fuses_bias", "source"):
        if getattr(entry, flag, False):
            said.append(flag)
    if getattr(entry, "factors", ()):
        said.append(f"factors {entry.factors}")
    if getattr(entry, "elementwise", False):
        said.append("element-wise")
    if entry.kind:
        said.append(f"kind {entry.kind}")
    return ", ".join(said)


def render(text: str) -> tuple[str, list[str]]:
    """``text`` with its op index regenerated, and the node types no section describes."""
    sys.path.insert(0, str(DOC.parent.parent / "src"))
    from dynamiclrp.rules import OP_TABLE

    secs = sections(text)
    rows, missing = [], []
    for name in sorted(OP_TABLE):
        entry = OP_TABLE[name]
        where = section_of(name, secs)
        if where is None:
            missing.append(name)
        rows.append(f"| `{name}` | {entry.family} | {where or 'not described'} | {facts(entry)} |")
    body = "\n".join(
        [
            START,
            "",
            f"Generated from `dynamiclrp.rules.OP_TABLE` by `python scripts/op_index.py` "
            f"({len(OP_TABLE)} node types); *section*: where this page states the rule.",
            "",
            "| node | family | section | the plan knows |",
            "|---|---|---|---|",
            *rows,
            "",
            END,
        ]
    )
    if START in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        return head + body + tail, missing
    return text.rstrip("\n") + "\n\n## 6. Op index\n\n" + body + "\n", missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the index is stale")
    args = parser.parse_args(argv)
    text = DOC.read_text()
    new, missing = render(text)
    if missing:
        print("not described in any section: " + ", ".join(missing), file=sys.stderr)
    if args.check:
        if new != text:
            print("docs/rules.md: the op index is out of date (python scripts/op_index.py)")
            return 1
        return 1 if missing else 0
    DOC.write_text(new)
    print(f"docs/rules.md: op index regenerated, {len(missing)} node types not described")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
