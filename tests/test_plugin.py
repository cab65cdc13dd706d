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
