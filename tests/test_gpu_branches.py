"""benchmarks/gpu_branches.py runs (CPU against CPU here; the CUDA run needs a GPU) and fails
when the two devices disagree."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_branches  # noqa: E402


def test_dry_run_on_the_cpu_passes(capsys):
    assert gpu_branches.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok") == sum(len(p) for _, p in gpu_branches.CASES.values())
    assert "0 failed" in out


def test_a_device_that_disagrees_fails(monkeypatch, capsys):
    """Negative control: a 'device' whose relevance is off by 1e-6 is reported and fails."""
    real = gpu_branches.explain_on

    def off_by_a_little(device, program, preset):
        rel, rep = real("cpu", program, preset)
        return (rel + 1e-6 if device == "elsewhere" else rel), rep

    monkeypatch.setattr(gpu_branches, "explain_on", off_by_a_little)
    assert gpu_branches.main(["--device", "elsewhere"]) == 1
    assert "FAIL" in capsys.readouterr().out
