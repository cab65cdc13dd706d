"""`flwr run .`: the same ServerApp/ClientApp through Flower's own CLI and a local SuperLink."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO


def _pids_using(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker`` (the test's private FLWR_HOME)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _kill_all_using(*markers: str, timeout: float = 15.0) -> None:
    """SIGKILL every process that mentions a marker, again and again until none is left or
    ``timeout`` passes: a process being killed may still spawn a child, or not be gone yet."""
    deadline = time.monotonic() + timeout
    while (left := {q for m in markers for q in _pids_using(m)}) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param("", id="fedavg"),
        # stateful clients: each ClientApp process finds its SCAFFOLD control of the client's last round
        pytest.param(' clients.fraction=0.5 strategy.name="scaffold"', id="scaffold-client-state"),
    ],
)
def test_flwr_run_local_superlink(tmp_path, extra):
    home = tmp_path / "flwr-home"
    out = tmp_path / "run"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    run_config = (
        f'rounds={3 if extra else 2} clients.num=4 clients.architectures="mlp" clients.local-steps=10 '
        f'partition.name="iid" out="{out}"' + extra
    )
    flwr = Path(os.sys.executable).with_name("flwr")
    try:
        proc = subprocess.run(
            [str(flwr), "run", ".", "--run-config", run_config, "--federation-config", "num-supernodes=4", "--stream"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        deadline = time.monotonic() + 60
        while not (out / "summary.json").exists() and time.monotonic() < deadline:
            time.sleep(1)
        summary = json.loads((out / "summary.json").read_text())
        rounds = 3 if extra else 2
        assert summary["rounds"] == rounds and summary["final_accuracy"] > 0.1
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == list(range(1, rounds + 1))
        if extra:
            from tests.test_client_rules import _check_state_from

            _check_state_from(rows)
        assert "clients.architectures" not in (out / "config.toml").read_text()  # nested, not dotted
        assert 'architectures = "mlp"' in (out / "config.toml").read_text()
    finally:
        _kill_all_using(str(home))  # the detached SuperLink and its children
    assert not _pids_using(str(home))
