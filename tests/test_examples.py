"""The README's demo runs and writes a heatmap (the first thing a newcomer runs)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_writes_a_png(tmp_path):
    out = tmp_path / "heatmap.png"
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--out", str(out), "--steps", "60"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert "residual (books close at ~0)" in done.stdout
    assert "share of positive relevance in the true quadrant" in done.stdout
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" in data[-12:]
