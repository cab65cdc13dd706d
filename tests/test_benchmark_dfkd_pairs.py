"""Smoke test of benchmarks/dfkd_pairs.py: a two-pair matrix runs, tabulates, skips non-BN teachers for
BN-only recipes and reuses finished runs. Accuracies and timings are not asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dfkd_pairs.py"
TINY = ["--set", "dfkd.epochs=1", "--set", "dfkd.iterations=1", "--set", "dfkd.teacher-epochs=1",
        "--set", "distill.steps=1", "--set", "synthesis.batch-size=16"]  # fmt: skip


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "pairs"), *args, *TINY]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_two_pairs_tabulate_and_rerun_reuses(tmp_path: Path) -> None:
    pairs = "digits:lenet5:lenet5-half,digits:resnet8:mlp"
    proc = _run(tmp_path, "--pairs", pairs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = (tmp_path / "pairs" / "dfad.md").read_text()
    assert "| digits | lenet5 | lenet5-half | 1 |" in table and "| digits | resnet8 | mlp | 1 |" in table
    assert "≥ 95" in table and "≥ 90" in table, "one-family pairs have the higher goal"
    assert (tmp_path / "pairs" / "dfad" / "digits-lenet5-lenet5-half" / "seed0" / "summary.json").is_file()
    assert len(list((tmp_path / "pairs" / "teachers").glob("teacher-*.pt"))) == 2
    again = _run(tmp_path, "--pairs", pairs)
    assert again.returncode == 0 and "seed 0: teacher" not in again.stdout and "  dfad " not in again.stdout
    one = _run(tmp_path, "--pairs", "digits:resnet8:mlp")
    assert one.returncode == 0, one.stdout + one.stderr
    assert "| digits | lenet5 | lenet5-half | 1 |" in (tmp_path / "pairs" / "dfad.md").read_text(), (
        "a run on one pair keeps the other finished pairs' rows")
    check = SCRIPT.with_name("dfkd_sample_check.py")
    run_dir = tmp_path / "pairs" / "dfad" / "digits-resnet8-mlp" / "seed0"
    before = {f.name: f.stat().st_mtime_ns for f in run_dir.iterdir()}
    proc = subprocess.run([sys.executable, str(check), str(run_dir), "--steps", "4"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "real   final test acc" in proc.stdout and "frozen final test acc" in proc.stdout
    assert {f.name: f.stat().st_mtime_ns for f in run_dir.iterdir()} == before, "the check writes nothing"
    bad = subprocess.run([sys.executable, str(check), str(tmp_path), "--steps", "4"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "config.toml" in bad.stderr
    fast = _run(tmp_path, "--pairs", pairs, "--method", "fast")
    assert fast.returncode == 0, fast.stdout + fast.stderr
    assert "skipping digits:lenet5:lenet5-half" in fast.stdout
    assert "| digits | resnet8 | mlp |" in (tmp_path / "pairs" / "fast.md").read_text()
    bad = _run(tmp_path, "--pairs", "digits:lenet5")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --pairs")


def test_speed_compares_methods_against_wall_time(tmp_path: Path) -> None:
    proc = _run(tmp_path, "--speed", "digits:resnet8:mlp", "--methods", "adi,fast")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    md = (tmp_path / "pairs" / "speed-digits-resnet8-mlp.md").read_text()
    assert "| adi |" in md and "| fast |" in md and (tmp_path / "pairs" / "speed-digits-resnet8-mlp.png").is_file()
    bad = _run(tmp_path, "--speed", "digits:resnet8:mlp", "--methods", "adi,dfq")
    assert bad.returncode == 2 and "unknown dfq" in bad.stderr


def test_lra_study_runs_its_variants_and_tabulates(tmp_path: Path) -> None:
    script = SCRIPT.with_name("lra_study.py")
    tiny = ["--set", "dataset.name=digits", "--set", "dfkd.epochs=2", "--set", "dfkd.iterations=1",
            "--set", "dfkd.teacher-epochs=1", "--set", "distill.steps=2", "--set", "synthesis.batch-size=16",
            "--set", "distill.memory-push-epochs=1"]  # fmt: skip
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "lra"), *tiny],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    md = (tmp_path / "lra" / "rules.md").read_text()
    assert all(f"| {r} | 1 |" in md for r in ("plain", "replay", "lra-official", "lra"))
    best = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "lra"), "--stage", "best",
                           "--best", "lra-a0.1-b0.5-so-m160", *tiny], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert best.returncode == 0 and "| lra-a0.1-b0.5-so-m160 | 1 |" in best.stdout, best.stdout + best.stderr
    cfg = (tmp_path / "lra" / "lra-a0.1-b0.5-so-m160" / "seed0" / "config.toml").read_text()
    assert "lra-beta = 0.5" in cfg and "lra-alpha = 0.1" in cfg
    bad = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "lra"), "--stage", "best", "--best", "x"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: --best")
