"""Determinism: the same seed gives the same partition, sampled clients and metrics on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedkd.cli import main
from tests.conftest import REPO

SETS = ["rounds=3", "clients.num=6", "clients.architectures=cnn:3,mlp:3", "clients.local-steps=5",
        "clients.fraction=0.5", "partition.name=dirichlet", "clients.threads=1", "strategy.name=fedavg"]  # fmt: skip


def rows(out) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    raw = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in raw]


def argv(out, engine: str, *extra: str) -> list[str]:
    return ["run", "--engine", engine, "--out", str(out), *[a for s in [*SETS, *extra] for a in ("--set", s)]]


def test_two_local_runs_are_identical_and_another_seed_differs(tmp_path):
    for name in ("a", "b"):
        assert main(argv(tmp_path / name, "local")) == 0
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert a == b
    assert all(len(r["sampled"]) == 2 for r in a)  # int(0.5 × 3) = 1 per group of 3 (Flower's rounding)
    assert len({tuple(r["sampled"]) for r in a}) > 1  # sampling changes across rounds
    assert (tmp_path / "a" / "label_counts.csv").read_bytes() == (tmp_path / "b" / "label_counts.csv").read_bytes()
    assert main(argv(tmp_path / "c", "local", "seed=1")) == 0
    c = rows(tmp_path / "c")
    assert [r["sampled"] for r in c] != [r["sampled"] for r in a]
    assert (tmp_path / "c" / "label_counts.csv").read_bytes() != (tmp_path / "a" / "label_counts.csv").read_bytes()


@pytest.mark.slow
def test_local_and_ray_engines_give_the_same_metrics(tmp_path):
    """The same apps on Flower's Simulation Engine: same partition, clients and metrics, bit for bit.

    Both runs start with one OpenMP thread (``OMP_NUM_THREADS=1``), as Ray's actors do: a
    thread count changed after torch has run changes its kernels' float sums.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for engine in ("local", "ray"):
        proc = subprocess.run([sys.executable, "-m", "fedkd.cli", *argv(tmp_path / engine, engine)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=400)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    local, ray = rows(tmp_path / "local"), rows(tmp_path / "ray")
    assert (tmp_path / "local" / "label_counts.csv").read_bytes() == (
        tmp_path / "ray" / "label_counts.csv"
    ).read_bytes()
    assert [r["sampled"] for r in local] == [r["sampled"] for r in ray]
    assert local == ray


def test_config_toml_is_the_resolved_config_and_rerunning_it_reproduces_the_run(tmp_path):
    """Every key the run used is in config.toml, plug-in defaults included, so a later change of a
    default cannot change what `fedkd run DIR/config.toml` repeats; the rerun is bit for bit."""
    import tomllib

    from fedkd.config import Config, plugin_params

    extra = ["strategy.name=fedprox", "partition.name=dirichlet"]
    assert main(argv(tmp_path / "a", "local", *extra)) == 0
    text = (tmp_path / "a" / "config.toml").read_text()
    cfg = tomllib.loads(text)
    assert set(cfg["strategy"]["fedprox"]) == set(plugin_params("strategy", "fedprox")), "unset defaults written"
    assert set(cfg["partition"]["dirichlet"]) == set(plugin_params("partition", "dirichlet"))
    assert Config.from_toml(text).to_toml() == text, "reading and writing it changes nothing"
    assert main(["run", str(tmp_path / "a" / "config.toml"), "--out", str(tmp_path / "b")]) == 0
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    assert (tmp_path / "b" / "config.toml").read_text() == text
