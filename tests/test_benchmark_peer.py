"""benchmarks/peer_pflib.py without PFLlib: its bad-input path and its partition conversion.

The peer run itself needs a PFLlib checkout and minutes of CPU; it is not run here (nor in CI).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peer_pflib.py"


def _module():
    spec = importlib.util.spec_from_file_location("peer_pflib", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _error_only(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert proc.stdout == ""
    return lines[0]


def test_not_a_pflib_checkout_is_one_error_line_and_exit_2(tmp_path: Path) -> None:
    run = lambda *a: subprocess.run([sys.executable, str(SCRIPT), *a], capture_output=True, text=True, timeout=60)  # noqa: E731
    assert "not a PFLlib checkout" in _error_only(run(str(tmp_path)))
    assert "not a directory" in _error_only(run(str(tmp_path / "missing")))
    (tmp_path / "system").mkdir()
    (tmp_path / "system" / "main.py").write_text("print('hello')\n")
    assert "not a PFLlib checkout" in _error_only(run(str(tmp_path)))
    assert "--rounds must be >= 2" in _error_only(run(str(tmp_path), "--rounds", "1"))


def test_partition_conversion_writes_pflib_npz_with_fedkd_counts(tmp_path: Path) -> None:
    from fedkd.client_app import client_partition
    from fedkd.config import load_config
    from fedkd.data import load_dataset

    mod = _module()
    n = 4
    cfg = load_config(None, ["dataset.name=digits", f"clients.num={n}", "partition.name=dirichlet",
                             "partition.dirichlet.alpha=0.1", "partition.dirichlet.min-size=2", "seed=3"])  # fmt: skip
    info = mod.write_pflib_dataset(cfg, tmp_path, "MNIST_test")
    ds = load_dataset("digits")
    base = tmp_path / "dataset" / "MNIST_test"
    assert sorted(p.name for p in (base / "train").iterdir()) == [f"{i}.npz" for i in range(n)]
    assert sorted(p.name for p in (base / "test").iterdir()) == [f"{i}.npz" for i in range(n)]
    for i in range(n):
        # read as PFLlib's utils/data_utils.py read_data does
        with open(base / "train" / f"{i}.npz", "rb") as f:
            train = np.load(f, allow_pickle=True)["data"].tolist()
        with open(base / "test" / f"{i}.npz", "rb") as f:
            test = np.load(f, allow_pickle=True)["data"].tolist()
        x, y, counts = client_partition(cfg, i)
        assert train["x"].dtype == np.float32 and train["x"].shape == (len(y), 1, 8, 8)
        assert train["y"].dtype == np.int64 and np.array_equal(train["y"], y.numpy())
        assert np.array_equal(train["x"], x.numpy())
        assert np.bincount(train["y"], minlength=10).tolist() == counts == info["train_label_counts"][i]
        assert np.array_equal(test["y"], ds.y_test.numpy()[i::n]) and test["x"].shape == (len(test["y"]), 1, 8, 8)
    assert sum(info["train_sizes"]) == len(ds.y_train) and sum(info["test_sizes"]) == len(ds.y_test)
    assert (base / "config.json").is_file()
    mod.write_pflib_dataset(cfg, tmp_path, "MNIST_test")  # its own directory: replaced
    (tmp_path / "dataset" / "MNIST_other").mkdir()
    with pytest.raises(mod.BadInput, match="was not written by this script"):
        mod.write_pflib_dataset(cfg, tmp_path, "MNIST_other")
