"""docs/rules.md keeps up with the op table: every node type is named in the section that states
its rule, and the op index at the end is the one generated from the table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _op_index():
    spec = importlib.util.spec_from_file_location("op_index", ROOT / "scripts" / "op_index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_node_type_is_described_and_the_index_is_current():
    op_index = _op_index()
    text = (ROOT / "docs" / "rules.md").read_text()
    new, missing = op_index.render(text)
    assert not missing, f"node types no section of docs/rules.md names: {missing}"
    assert new == text, "docs/rules.md: the op index is out of date (python scripts/op_index.py)"


def test_a_node_type_no_section_names_is_reported():
    op_index = _op_index()
    text = (ROOT / "docs" / "rules.md").read_text().replace("`CumsumBackward0`", "`cumsum`")
    _, missing = op_index.render(text)
    assert "CumsumBackward0" in missing
