"""Checkpoint and resume: kill -9 mid-run, resume, and get the uninterrupted run's metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedkd import checkpoint
from fedkd.cli import main
from fedkd.config import load_config
from fedkd.engines import execute
from tests.conftest import REPO

BASE = ["rounds=4", "clients.num=4", "clients.architectures=mlp", "clients.local-steps=10", "partition.name=iid",
        "strategy.name=fedavg"]
KD = [*BASE, "strategy.name=feddf", "strategy.feddf.iterations=2", "strategy.feddf.retention=lra",
      "strategy.feddf.batch-size=16"]  # fmt: skip


def metrics(run_dir: Path) -> list[dict]:
    """Rows without wall-clock fields (the only thing two identical runs may differ in)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


def argv(out: Path, sets: list[str]) -> list[str]:
    return ["run", "--out", str(out), *[a for s in sets for a in ("--set", s)]]


class Stop(Exception):
    pass


def interrupted(out: Path, sets: list[str], after: int) -> None:
    """Run in-process and stop while round ``after + 1`` is being recorded."""
    cfg = load_config(REPO / "sims" / "quickstart.toml", sets, None)
    from fedkd.cli import prepare_run

    run_dir = prepare_run(cfg, out, None)

    def stop(row: dict) -> None:
        if row["round"] == after + 1:  # its row is written, its checkpoint is not
            raise Stop

    with pytest.raises(Stop):
        execute(cfg, run_dir, stop)


@pytest.mark.parametrize(
    "sets",
    [
        pytest.param(KD, id="feddf-lra"),
        pytest.param([*BASE, "strategy.name=fedadam"], id="fedadam"),
        # stateful clients: each client's SCAFFOLD control comes back from the round it was last sampled in
        pytest.param([*BASE, "strategy.name=scaffold", "clients.fraction=0.5"], id="scaffold-client-state"),
        pytest.param([*BASE, "clients.architectures=mlp:2,lenet5:2", "strategy.name=fedgen",
                      "model.feature-dim=16", "strategy.fedgen.gen-steps=5"], id="fedgen-hetero"),  # fmt: skip
    ],
)
def test_resume_equals_uninterrupted(tmp_path, sets):
    assert main(argv(tmp_path / "full", sets)) == 0
    interrupted(tmp_path / "cut", sets, after=2)
    assert len(metrics(tmp_path / "cut")) == 3  # one row past the last checkpoint
    assert main(["run", "--resume", str(tmp_path / "cut")]) == 0
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["resumed_after_round"] == 2 and summary["rounds"] == 4


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    assert main(argv(tmp_path / "full", KD)) == 0
    interrupted(tmp_path / "cut", KD, after=3)
    ckpts = checkpoint.checkpoints(tmp_path / "cut")
    assert [p.name for p in ckpts] == ["checkpoint-00003.pt", "checkpoint-00002.pt"]  # checkpoint.keep = 2
    data = ckpts[0].read_bytes()
    ckpts[0].write_bytes(data[: len(data) // 2])  # truncated
    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path / "cut")]) == 0
    assert "checkpoint-00003.pt is corrupt (checksum mismatch" in capsys.readouterr().out
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")


def test_a_finished_run_keeps_checkpoint_keep_final_checkpoints(tmp_path):
    assert main(argv(tmp_path / "one", BASE)) == 0
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "one")] == ["checkpoint-00004.pt"]
    assert main(argv(tmp_path / "none", [*BASE, "checkpoint.keep-final=0"])) == 0
    assert checkpoint.checkpoints(tmp_path / "none") == []


def test_checkpoints_load_without_unpickling(tmp_path):
    assert main(argv(tmp_path / "r", BASE)) == 0
    (newest, *_) = checkpoint.checkpoints(tmp_path / "r")
    raw = newest.read_bytes().partition(b"\n")[2]
    import io

    payload = torch.load(io.BytesIO(raw), weights_only=True)  # raises on any pickled object
    assert payload["round"] == 4 and len(payload["rows"]) == 4
    # a checkpoint that smuggles a pickled object is refused, even with a valid checksum
    import hashlib

    buf = io.BytesIO()
    torch.save({"version": 1, "round": 5, "evil": Path("/")}, buf)
    evil = tmp_path / "r" / "checkpoint-00005.pt"
    evil.write_bytes(hashlib.sha256(buf.getvalue()).hexdigest().encode() + b"\n" + buf.getvalue())
    with pytest.raises(checkpoint.CorruptCheckpoint, match="cannot load it"):
        checkpoint.read(evil)


@pytest.mark.parametrize(
    ("setup", "extra", "fragment"),
    [
        ("finished", [], "already finished"),
        ("none", [], "is not a run directory"),
        ("nockpt", [], "has no checkpoint to resume from"),
        ("allbad", [], "every checkpoint is corrupt"),
        ("finished", ["--set", "rounds=3"], "--resume takes the run's own config; drop --set"),
        ("missing", [], "is not a directory"),
    ],
)
def test_resume_bad_input(tmp_path, capsys, setup, extra, fragment):
    d = tmp_path / "d"
    if setup in ("finished", "nockpt", "allbad"):
        assert main(argv(d, [*BASE, "rounds=2"])) == 0
    if setup in ("nockpt", "allbad"):
        (d / "summary.json").unlink()
        for p in checkpoint.checkpoints(d):
            p.unlink() if setup == "nockpt" else p.write_bytes(b"garbage\n")
    if setup == "none":
        d.mkdir()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["run", "--resume", str(d), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def kill_after_first_checkpoint(cmd: list[str], out: Path) -> None:
    """Start ``cmd`` (a ``fedkd run`` into ``out``) and SIGKILL its process group 0.3 s after its
    first checkpoint appears, i.e. during the next round."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (checkpoint.checkpoints(out) if out.is_dir() else []):
            time.sleep(0.05)
        time.sleep(0.3)  # into the next round
        assert proc.poll() is None, "the run finished before it could be killed; make it longer"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


SCAFFOLD = [*BASE, "strategy.name=scaffold", "clients.fraction=0.5", "rounds=5", "clients.threads=1"]


@pytest.mark.parametrize(
    ("sets", "engine"),
    [
        pytest.param([*KD, "rounds=5"], [], id="feddf-lra"),
        # stateful clients: the SCAFFOLD controls on disk survive the kill; metrics equal => each came back
        pytest.param(SCAFFOLD, [], id="scaffold-local"),
        pytest.param(SCAFFOLD, ["--engine", "ray"], id="scaffold-ray", marks=pytest.mark.slow),
    ],
)
def test_kill_9_mid_round_then_resume(tmp_path, sets, engine):
    """The issue's test: a real process killed with SIGKILL mid-run, resumed from the CLI."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    fedkd = [sys.executable, "-m", "fedkd.cli"]
    # the reference run is a subprocess too: same process-level settings (torch threads) as the cut one, and on the
    # same engine (local and ray agree on accuracy, not on the last bits of the train loss)
    ref = subprocess.run([*fedkd, *argv(full, sets), *engine], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    kill_after_first_checkpoint([*fedkd, *argv(cut, sets), *engine], cut)
    assert not (cut / "summary.json").exists()
    res = subprocess.run([*fedkd, "run", "--resume", str(cut)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming" in res.stdout
    assert metrics(cut) == metrics(full)
    if "strategy.name=scaffold" in sets:
        rows = metrics(cut)
        assert any(v > 0 for r in rows for v in r["state_from"].values())  # states did come from earlier rounds
        assert not (cut / "client-state").exists()


def test_the_accuracy_plot_title_names_strategy_dataset_and_partition():
    from fedkd.config import load_config
    from fedkd.results import run_title

    cfg = load_config(Path(__file__).resolve().parents[1] / "sims" / "suites" / "s1" / "mnist5k-fedftg_fedprox-dir0.1.toml")
    assert run_title(cfg.resolved(), "seed0") == "seed0\nfedftg on fedprox · mnist5k · dirichlet α=0.1 · 20 clients"
