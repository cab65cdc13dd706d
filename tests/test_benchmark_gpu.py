"""Smoke test of benchmarks/gpu.py (the GPU check) and benchmarks/batched.py, in their CPU modes.

On CPU the "device" is the CPU: the check still records every model and generator forward by
phase, so a phase that never ran, or a forward on an unexpected device, fails here too.
Timings are never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_check_smoke_mode(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "device check: passed" in proc.stdout
    result = json.loads(out.read_text())
    assert result["problems"] == [] and result["smoke"] is True
    seen = result["cpu"]["fedftg_round"]["devices"]
    assert {"clients/model", "server/model", "server/generator", "other/model"} <= set(seen)
    assert set(result["cpu"]["dfkd"]["devices"]) >= {"teacher-training/model", "distillation/generator"}
    assert result["cpu"]["clients_round"]["batched"]["devices"] == {"clients/model": ["cpu"]}


def test_gpu_check_refuses_a_missing_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py")], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: no CUDA GPU is visible"), proc.stderr


def test_batched_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    cmd = [sys.executable, str(BENCH / "batched.py"), "--archs", "mlp", "--clients", "4", "--reps", "1",
           "--set", "dataset.name=digits", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| mlp | 4 |" in proc.stdout
    (row,) = json.loads(out.read_text())
    assert row["max_weight_diff"] < 1e-3, "batched and one-by-one replies disagree"
