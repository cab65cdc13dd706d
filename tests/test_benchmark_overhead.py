"""Smoke test of benchmarks/overhead.py: the smallest run completes and prints its ratios.

Timings are never asserted: the CPU is shared, and they are the benchmark's business.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


def test_overhead_smallest_run_prints_ratios(tmp_path: Path) -> None:
    cmd = [
        sys.executable, str(SCRIPT), "--rounds", "1", "--clients", "2", "--reps", "1", "--engines", "hand,local",
        "--set", "dataset.name=digits", "--json", str(tmp_path / "overhead.json"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "| hand |" in out and "| local |" in out
    assert "ratio local/hand: per round" in out and "whole process" in out
    assert "ratio local/hand CPU seconds" in out
    # same partition, init, seeds and summation order: the local engine reproduces the loop exactly
    assert "agreement local vs hand: identical to the last bit" in out
    assert (tmp_path / "overhead.json").is_file()
