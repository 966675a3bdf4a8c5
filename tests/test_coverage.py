"""Coverage report and CLI."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import dynamiclrp
from dynamiclrp.cli import main


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()


def test_counts_every_node_type_and_leaves():
    model = small_net()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    report = dynamiclrp.coverage(model(x))
    counts = {o.name: o.count for o in report.ops}
    # two addmm, two weight transposes, one relu; leaves: x, 2 weights, 2 biases
    assert counts == {"AddmmBackward0": 2, "TBackward0": 2, "ReluBackward0": 1}
    assert report.leaves == 5
    assert report.total_nodes == 5 and report.covered_nodes == 5 and report.unique_ops == 3
    assert report.promises is None  # nothing explained without inputs


def test_uncovered_ops_are_counted_honestly():
    x = torch.randn(3, 3, requires_grad=True)
    y = torch.linalg.det(x * 2.0)  # (logcumsumexp, the example before, has a rule now)
    report = dynamiclrp.coverage(y)
    assert [o.name for o in report.uncovered] == ["LinalgDetBackward0"]
    assert report.covered_nodes == report.total_nodes - 1
    assert "NO RULE" in str(report)


def test_promise_statistics_of_a_residual_block():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4).double()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    y = (x + lin(x).view(2, 2, 2).transpose(1, 2).reshape(2, 4)).sum(1, keepdim=True)
    report = dynamiclrp.coverage(y, x, relevance=torch.ones(2, 1, dtype=torch.float64))
    # sum needs the add's output (replayed: add <- reshape <- transpose <- view <- addmm), the
    # add needs lin(x)'s reshaped value (replayed) and x (a leaf)
    assert report.promises >= 2 and report.internal_nodes >= 4 and report.max_depth >= 4
    assert report.rho == pytest.approx(2 / report.total_nodes)  # add and sum need values
    assert abs(report.residual) < 1e-12


def make_example():
    torch.manual_seed(0)
    model = small_net()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    return model(x), x


def test_cli_on_a_user_callable(capsys):
    assert main(["coverage", "tests.test_coverage:make_example"]) == 0
    out = capsys.readouterr().out
    assert "AddmmBackward0" in out and "covered nodes 5/5" in out and "promises" in out


def test_cli_rejects_a_bad_spec():
    with pytest.raises(SystemExit):
        main(["coverage", "no_colon_here"])


def test_cli_entry_point_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "dynamiclrp.cli", "coverage", "tests.test_coverage:make_example"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "covered nodes 5/5" in done.stdout


def test_cli_on_a_zoo_entry(capsys):
    pytest.importorskip("transformers")
    assert main(["coverage", "zoo:bert"]) == 0
    out = capsys.readouterr().out
    assert "NativeLayerNormBackward0" in out and "promises" in out
    total = next(line for line in out.splitlines() if line.startswith("covered nodes"))
    covered, all_nodes = total.split()[2].rstrip(",").split("/")
    assert covered == all_nodes


def test_coverage_table_lists_every_zoo_entry_and_gap(tmp_path):
    pytest.importorskip("transformers")
    from dynamiclrp import zoo

    out = tmp_path / "coverage.md"
    assert main(["coverage-table", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    names = [row.split("|")[1].strip() for row in rows]
    assert sorted(names) == sorted(list(zoo.ZOO) + list(zoo.GAPS))
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        if cells[2].isdigit():  # built here: every node has a dedicated rule
            assert cells[3] == cells[2], row
