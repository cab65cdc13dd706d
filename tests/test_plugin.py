"""An external strategy package, installed for real and found through its entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO / "tests" / "plugin_pkg")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert list(target.glob("fedkd_example_plugin-*.dist-info"))
    return target


def fedkd(plugin_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), str(REPO)])}
    return subprocess.run([sys.executable, "-m", "fedkd.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_plugin_is_listed_with_its_config_keys(plugin_path):
    proc = fedkd(plugin_path, "list")
    assert proc.returncode == 0, proc.stderr
    assert "fedavg-clipped" in proc.stdout
    keys = fedkd(plugin_path, "list", "--keys").stdout
    assert "strategy.fedavg-clipped.server-lr = 1.0" in keys
    assert "strategy.fedavg-clipped.max-norm = 0.0" in keys


def test_plugin_strategy_runs_and_its_keys_take_effect(plugin_path, tmp_path):
    sets = [a for s in TINY for a in ("--set", s)]
    frozen = tmp_path / "frozen"
    proc = fedkd(plugin_path, "run", *sets, "--set", "strategy.name=fedavg-clipped",
                 "--set", "strategy.fedavg-clipped.server-lr=0.0", "--out", str(frozen))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((frozen / "summary.json").read_text())
    rows = [json.loads(x) for x in (frozen / "metrics.jsonl").read_text().splitlines()]
    # server_lr = 0: the plug-in's aggregate_train ran and kept the initial model
    assert all(r["accuracy"] == summary["initial_accuracy"] for r in rows)

    learning = tmp_path / "learning"
    proc = fedkd(plugin_path, "run", *sets, "--set", "strategy.name=fedavg-clipped", "--out", str(learning))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((learning / "summary.json").read_text())["final_accuracy"] > summary["initial_accuracy"] + 0.2


def test_without_the_package_the_name_is_unknown(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedkd.cli", "run", "--set", "strategy.name=fedavg-clipped",
                           "--out", str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "unknown strategy 'fedavg-clipped'" in proc.stderr


def test_the_three_documented_plugins_are_listed_with_their_keys(plugin_path):
    keys = fedkd(plugin_path, "list", "--keys").stdout
    assert "strategy.feddf-dafl.preset = 'dafl-div'" in keys and "strategy.feddf-dafl.loss = 'js'" in keys
    assert "strategy.feddf-dafl.gen-steps = 50" in keys, "the parent's keywords stay config keys"
    assert "strategy.ensemble-kd.steps = 10" in keys and "strategy.ensemble-kd.base = 'fedavg'" in keys


def _rows(d):
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


def test_the_feddf_variant_runs_with_its_preset_and_loss(plugin_path, tmp_path):
    sets = [a for s in [*TINY, "strategy.name=feddf-dafl", "strategy.feddf-dafl.gen-steps=2",
                        "strategy.feddf-dafl.student-steps=2"] for a in ("--set", s)]  # fmt: skip
    proc = fedkd(plugin_path, "run", *sets, "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(tmp_path / "r")
    assert all({"g_ie", "g_act", "g_div", "kd_loss"} <= set(r) for r in rows), "DAFL's terms ran"
    bad = fedkd(plugin_path, "run", *sets, "--set", "strategy.feddf-dafl.loss=mse", "--out", str(tmp_path / "b"))
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and not (tmp_path / "b").exists()


def test_the_new_kd_strategy_runs_checkpoints_and_resumes(plugin_path, tmp_path):
    sets = [a for s in [*TINY, "strategy.name=ensemble-kd", "strategy.ensemble-kd.steps=3",
                        "checkpoint.keep-final=2"] for a in ("--set", s)]  # fmt: skip
    full = tmp_path / "full"
    proc = fedkd(plugin_path, "run", *sets, "--out", str(full))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all("g_loss" in r and "kd_loss" in r for r in _rows(full))
    cut = tmp_path / "cut"
    assert fedkd(plugin_path, "run", *sets, "--out", str(cut)).returncode == 0
    (cut / "summary.json").unlink()
    sorted(cut.glob("checkpoint-*.pt"))[-1].unlink()  # as if killed after the first round's checkpoint
    res = fedkd(plugin_path, "run", "--resume", str(cut))
    assert res.returncode == 0, res.stderr[-2000:]
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]  # noqa: E731
    assert strip(_rows(cut)) == strip(_rows(full)), "the generator's state came back from the checkpoint"
    bad = fedkd(plugin_path, "run", *sets, "--set", "strategy.ensemble-kd.steps=-1", "--out", str(tmp_path / "b"))
    assert bad.returncode == 2 and "strategy.ensemble-kd.steps must be ≥ 0" in bad.stderr


def test_the_stateful_plugin_keeps_each_clients_state_between_its_rounds(plugin_path, tmp_path):
    base = [*TINY, "rounds=3", "clients.fraction=0.5", "strategy.name=fedavg-prev-prox"]
    out = tmp_path / "prox"
    proc = fedkd(plugin_path, "run", *[a for s in base for a in ("--set", s)], "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    from tests.test_client_rules import _check_state_from

    _check_state_from(_rows(out))  # each sampled client's state is from the last round it was sampled in
    # mu = 0: the term is off, and the run is FedAvg's bit for bit; mu > 0 changes it
    runs = {}
    for name, extra in (("mu0", ["strategy.fedavg-prev-prox.mu=0"]), ("fedavg", ["strategy.name=fedavg"])):
        d = tmp_path / name
        sets = [a for s in [*base, *extra] for a in ("--set", s)]
        assert fedkd(plugin_path, "run", *sets, "--out", str(d)).returncode == 0
        runs[name] = [r["accuracy"] for r in _rows(d)]
    assert runs["mu0"] == runs["fedavg"] != [r["accuracy"] for r in _rows(out)]
