"""Safe by default: nothing unpickled, nothing fetched from the network unless asked, HTML escaped.

The static part reads every Python file the project ships or runs (``src/``, ``benchmarks/``,
``examples/``, ``scripts/``) and checks each call that can deserialise or download; the runtime
part runs the user-facing entry points with every socket connection refused.
"""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [
    p for d in ("src", "benchmarks", "examples", "scripts") for p in (ROOT / d).rglob("*.py")
]


def _calls(name: str):
    """``(file, call)`` for every call of an attribute or function called ``name``."""
    for path in SHIPPED:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if called == name:
                    yield path.relative_to(ROOT), node


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def test_the_scan_sees_the_files_and_calls_it_checks():
    """A scan that found nothing would pass vacuously."""
    assert len(SHIPPED) > 50
    assert len(list(_calls("load"))) >= 5 and len(list(_calls("from_pretrained"))) >= 3


def test_every_torch_load_is_weights_only():
    for path, call in _calls("load"):
        owner = call.func.value if isinstance(call.func, ast.Attribute) else None
        if not (isinstance(owner, ast.Name) and owner.id == "torch"):
            continue
        flag = _keyword(call, "weights_only")
        assert isinstance(flag, ast.Constant) and flag.value is True, f"{path}:{call.lineno}"


def test_every_numpy_load_refuses_pickles():
    for path, call in _calls("load"):
        owner = call.func.value if isinstance(call.func, ast.Attribute) else None
        if not (isinstance(owner, ast.Name) and owner.id in ("np", "numpy")):
            continue
        flag = _keyword(call, "allow_pickle")
        assert isinstance(flag, ast.Constant) and flag.value is False, f"{path}:{call.lineno}"


@pytest.mark.parametrize("name", ["loads", "Unpickler"])
def test_nothing_calls_pickle_directly(name):
    for path, call in _calls(name):
        owner = call.func.value if isinstance(call.func, ast.Attribute) else None
        assert not (isinstance(owner, ast.Name) and owner.id in ("pickle", "cPickle")), (
            f"{path}:{call.lineno}"
        )
    for path, call in _calls("load"):
        owner = call.func.value if isinstance(call.func, ast.Attribute) else None
        assert not (isinstance(owner, ast.Name) and owner.id == "pickle"), f"{path}:{call.lineno}"


def test_every_from_pretrained_is_local_unless_the_caller_asked():
    """A literal ``local_files_only=True``, or a value the user controls (``hf.load``'s
    ``allow_download``: checked at run time below)."""
    for path, call in _calls("from_pretrained"):
        flag = _keyword(call, "local_files_only")
        starred = any(kw.arg is None for kw in call.keywords)
        assert flag is not None or starred, f"{path}:{call.lineno} may download"
        if isinstance(flag, ast.Constant):
            assert flag.value is True, f"{path}:{call.lineno}"


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection raises; the list records the attempts."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test that forbids it")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # we must be offline by ourselves
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return attempts


def test_the_demo_runs_offline_and_its_html_is_escaped(no_network, tmp_path, capsys):
    from dynamiclrp import cli

    assert cli.main(["demo", "--out", str(tmp_path), "--color", "never"]) in (0, None)
    html = (tmp_path / "sentiment.html").read_text()
    assert "<script" not in html.lower() and "http://" not in html and "https://" not in html
    assert no_network == []


def test_hf_load_is_local_by_default(no_network):
    pytest.importorskip("transformers")
    from dynamiclrp import hf

    with pytest.raises(OSError):  # not in the cache: an error, not a download
        hf.load("someone/not-cached-model-xyz")
    assert no_network == []


def test_a_pickled_model_file_is_refused_not_unpickled(tmp_path, capsys):
    """``torch.save(model)`` pickles the class: the CLI reads weights with weights_only=True and
    refuses the file without running any of it."""
    from dynamiclrp import cli

    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    np = pytest.importorskip("numpy")
    np.save(tmp_path / "x.npy", np.zeros((1, 2), dtype=np.float32))
    argv = ["explain-image", str(path), str(tmp_path / "x.npy"), "--arch", "torch.nn:Identity"]
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 2
    assert "pickled" in capsys.readouterr().err
