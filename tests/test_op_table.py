"""The op table itself: one literal entry per node type, in one place."""

from __future__ import annotations

import ast
from pathlib import Path

import dynamiclrp.rules as rules

RULES = Path(rules.__file__).parent


def _table_keys(path: Path) -> list[tuple[str, int]]:
    """The string keys of every dict literal assigned to ``TABLE`` in ``path``, with lines."""
    keys = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "TABLE" for t in node.targets
        ):
            for sub in ast.walk(node.value):
                if isinstance(sub, ast.Dict):
                    for k in sub.keys:
                        if isinstance(k, ast.Constant) and isinstance(k.value, str):
                            keys.append((k.value, k.lineno))
    return keys


def test_no_node_type_is_written_twice():
    """A dict literal keeps the last of two equal keys silently: a second entry for a node type
    (two branches adding the same op) would shadow the first without a word."""
    seen: dict[str, str] = {}
    twice = []
    for path in sorted(RULES.glob("*.py")):
        for name, line in _table_keys(path):
            where = f"{path.name}:{line}"
            if name in seen:
                twice.append(f"{name} at {seen[name]} and {where}")
            seen[name] = where
    assert not twice, twice


def test_every_key_is_a_node_type_name_written_literally():
    literal = {name for path in RULES.glob("*.py") for name, _ in _table_keys(path)}
    built = sorted(set(rules.OP_TABLE) - literal)
    assert not built, f"op-table keys not written literally: {built}"
