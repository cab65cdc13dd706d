"""End-to-end runs of `fedkd run`: the real ServerApp and ClientApp on the local and ray engines."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedkd.cli import main
from tests.conftest import REPO

ROW_KEYS = {
    "round",
    "accuracy",
    "loss",
    "group_accuracy",
    "train_loss",
    "failures",
    "bytes_up",
    "bytes_down",
    "seconds",
}


def run(out, *sets: str, engine: str = "local", sim: str | None = None) -> dict:
    argv = ["run", *([sim] if sim else []), "--engine", engine, "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    return json.loads((out / "summary.json").read_text())


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_local_run_writes_results(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    summary = run(out, *tiny, "rounds=3", "partition.name=dirichlet", "partition.dirichlet.alpha=0.5")
    printed = capsys.readouterr().out
    assert printed.count("round ") >= 3 and "final accuracy" in printed
    for f in ("config.toml", "metrics.jsonl", "summary.json", "accuracy.png", "partition.png", "label_counts.csv"):
        assert (out / f).is_file(), f
    r = rows(out)
    assert [x["round"] for x in r] == [1, 2, 3]
    assert all(ROW_KEYS <= set(x) for x in r)
    assert all(x["bytes_up"] > 0 and x["bytes_down"] > 0 and x["failures"] == 0 for x in r)
    for k in ("final_accuracy", "best_accuracy", "rounds", "wall_seconds"):
        assert summary[k] is not None
    assert summary["rounds"] == 3
    assert summary["final_accuracy"] > 0.3, "well above chance (0.1) after 3 rounds"
    # the resolved config reproduces the run's settings
    assert "[partition.dirichlet]" in (out / "config.toml").read_text()


def test_same_seed_same_metrics(tmp_path, tiny):
    a = run(tmp_path / "a", *tiny, "partition.name=dirichlet", "clients.fraction=0.5")
    b = run(tmp_path / "b", *tiny, "partition.name=dirichlet", "clients.fraction=0.5")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(rows(tmp_path / "a")) == strip(rows(tmp_path / "b"))
    assert a["final_accuracy"] == b["final_accuracy"]
    run(tmp_path / "c", *tiny, "partition.name=dirichlet", "clients.fraction=0.5", "seed=1")
    assert strip(rows(tmp_path / "c")) != strip(rows(tmp_path / "a"))
    assert (tmp_path / "a" / "label_counts.csv").read_text() != (tmp_path / "c" / "label_counts.csv").read_text()


def test_heterogeneous_groups_and_separate_global(tmp_path, tiny):
    out = tmp_path / "h"
    summary = run(
        out, *tiny, "clients.num=6", "clients.architectures=cnn:2,lenet5:2,mlp:2", "global.architecture=lenet5"
    )
    assert summary["groups"] == {"cnn": 2, "lenet5": 2, "mlp": 2}
    assert summary["global_architecture"] == "lenet5"
    for r in rows(out):
        assert set(r["group_accuracy"]) == {"cnn", "lenet5", "mlp"}
        assert r["accuracy"] == r["group_accuracy"]["lenet5"]


@pytest.mark.parametrize("strategy", ["fedprox", "fedavgm", "fedadam"])
def test_flower_strategies_end_to_end(tmp_path, tiny, strategy):
    extra = {"fedprox": ["strategy.fedprox.proximal-mu=0.1"], "fedadam": ["strategy.fedadam.eta=0.01"], "fedavgm": []}
    s = run(tmp_path / strategy, *tiny, f"strategy.name={strategy}", *extra[strategy])
    assert s["strategy"] == strategy and s["final_accuracy"] is not None


def test_plot_redraws(tmp_path, tiny):
    out = tmp_path / "p"
    run(out, *tiny)
    (out / "accuracy.png").unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "accuracy.png").stat().st_size > 1000


def test_digits_dataset(tmp_path, tiny):
    s = run(tmp_path / "d", *tiny, "dataset.name=digits", "clients.architectures=lenet5")
    assert s["dataset"] == "digits"


@pytest.mark.slow
def test_ray_engine_heterogeneous(tmp_path):
    """Flower's Simulation Engine, through the console script, with 3 architectures and the
    quickstart's server-side FedDF (cut to 3 generator and 3 student steps per round)."""
    out = tmp_path / "ray"
    proc = subprocess.run(
        [sys.executable, "-m", "fedkd.cli", "run", "--engine", "ray", "--out", str(out),
         "--set", "rounds=2", "--set", "clients.num=6", "--set", "clients.architectures=cnn:2,lenet5:2,mlp:2",
         "--set", "clients.local-steps=5", "--set", "partition.name=iid",
         "--set", "strategy.feddf.gen-steps=3", "--set", "strategy.feddf.student-steps=3"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = rows(out)
    assert len(r) == 2 and set(r[-1]["group_accuracy"]) == {"cnn", "lenet5", "mlp"}
    assert all("kd_loss" in x for x in r), "the quickstart's FedDF step did not run"
    assert all(x["failures"] == 0 and x["bytes_up"] > 0 for x in r)
    assert "round   2/2" in proc.stdout


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [
        ("feddf", ["strategy.feddf.iterations=2", "clients.architectures=cnn:2,mlp:2", "global.architecture=lenet5"]),
        (
            "fedftg",
            ["strategy.fedftg.iterations=2", "strategy.fedftg.base=fedprox", "strategy.fedprox.proximal-mu=0.01"],
        ),
        ("dense", ["rounds=1", "strategy.dense.iterations=2", "clients.architectures=cnn-bn:2,resnet8:2"]),
        ("fedensemble", []),
    ],
)
def test_kd_strategies_end_to_end(tmp_path, tiny, strategy, extra):
    out = tmp_path / strategy
    s = run(out, *tiny, f"strategy.name={strategy}", *extra)
    r = rows(out)
    assert s["strategy"] == strategy and s["final_accuracy"] is not None
    if strategy != "fedensemble":
        assert "kd_loss" in r[-1] and r[-1]["rejected"] == 0 and r[-1]["distill_seconds"] > 0
    else:
        assert "model_accuracy" in r[-1] and r[-1]["ensemble_size"] == 4


@pytest.mark.slow
def test_ray_engine_fedgen(tmp_path):
    """A KD strategy on Flower's Simulation Engine: the generator crosses in Messages to Ray actors."""
    out = tmp_path / "ray-fedgen"
    proc = subprocess.run(
        [sys.executable, "-m", "fedkd.cli", "run", "--engine", "ray", "--out", str(out),
         "--set", "rounds=2", "--set", "clients.num=4", "--set", "clients.architectures=cnn:2,mlp:2",
         "--set", "clients.local-steps=10", "--set", "partition.name=iid", "--set", "strategy.name=fedgen",
         "--set", "model.feature-dim=32", "--set", "strategy.fedgen.gen-steps=10"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = rows(out)
    assert len(r) == 2 and all(x["failures"] == 0 for x in r)
    assert r[1]["bytes_down"] > r[0]["bytes_down"], "round 2 carries the generator"
