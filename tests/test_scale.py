"""Scale: the lazy partitioners, the ClientApp's per-client cache, and a smoke run of
benchmarks/scale.py (timings are never asserted: the CPU is shared)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedkd.config import load_config
from fedkd.data import label_counts, partition
from fedkd.data.partition import PARTITIONERS, is_lazy, partition_of
from fedkd.errors import ConfigError

LABELS = np.repeat(np.arange(10), 100)  # 1,000 samples, 100 per class
LAZY = ["lazy-iid", "lazy-dirichlet"]
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


def test_lazy_flag_in_the_registry():
    assert {n for n in PARTITIONERS.names() if is_lazy(n)} >= set(LAZY)
    assert not any(is_lazy(n) for n in ("iid", "dirichlet", "pathological", "shards", "quantity-skew"))


@pytest.mark.parametrize("name", LAZY)
def test_deterministic_per_seed_and_pid(name):
    a = partition_of(name, LABELS, 10, 3, 7)
    assert np.array_equal(a, partition_of(name, LABELS, 10, 3, 7))
    assert not np.array_equal(a, partition_of(name, LABELS, 10, 4, 7))  # another seed
    assert not np.array_equal(a, partition_of(name, LABELS, 10, 3, 6))  # another client


@pytest.mark.parametrize("name", LAZY)
def test_independent_of_num_partitions_and_of_other_clients(name):
    a = partition_of(name, LABELS, 10, 0, 5)
    assert np.array_equal(a, partition_of(name, LABELS, 6, 0, 5))
    assert np.array_equal(a, partition_of(name, LABELS, 5000, 0, 5))  # more clients than samples is fine
    # the eager view calls the same per-client function
    assert all(np.array_equal(p, partition_of(name, LABELS, 10, 0, i)) for i, p in enumerate(partition(name, LABELS, 10, 0)))  # fmt: skip


@pytest.mark.parametrize("name", LAZY)
@pytest.mark.parametrize("size", [1, 7, 100])
def test_sizes_sorted_unique_in_range(name, size):
    for pid in range(50):
        p = partition_of(name, LABELS, 50, 1, pid, size=size)
        assert len(p) == size and p.dtype == np.int64
        assert np.array_equal(p, np.unique(p)), "sorted, no sample twice within a client"
        assert 0 <= p.min() and p.max() < len(LABELS)


def test_clients_share_samples_across_clients():
    parts = partition("lazy-iid", LABELS, 100, 0, size=50)  # 5,000 draws from 1,000 samples
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) < len(allidx)


def test_lazy_iid_labels_roughly_uniform():
    counts = label_counts(LABELS, partition("lazy-iid", LABELS, 200, 0, size=50), 10)
    share = counts.sum(axis=0) / counts.sum()
    assert np.abs(share - 0.1).max() < 0.02
    assert (counts > 0).sum(axis=1).mean() > 8  # 50 uniform draws hit nearly every class


def _classes_per_client(alpha: float, n: int = 200) -> float:
    counts = label_counts(LABELS, partition("lazy-dirichlet", LABELS, n, 0, alpha=alpha, size=50), 10)
    return float((counts > 0).sum(axis=1).mean())


def test_lazy_dirichlet_alpha_controls_skew():
    low, mid, high = _classes_per_client(0.01), _classes_per_client(1.0), _classes_per_client(100.0)
    assert low < 1.5 < mid < high
    assert high > 9.5


def test_lazy_dirichlet_follows_the_proportions():
    # mean class share over many clients is E[p] = 1/C; each client's share spreads as Dir(α)
    counts = label_counts(LABELS, partition("lazy-dirichlet", LABELS, 400, 2, alpha=0.5, size=50), 10)
    share = counts / counts.sum(axis=1, keepdims=True)
    assert np.abs(share.mean(axis=0) - 0.1).max() < 0.03
    # Var of a Dir(α·1) component: (1/C)(1 − 1/C)/(Cα + 1) = 0.09/6 = 0.015 (+ multinomial noise 0.09/50)
    assert 0.010 < share.var(axis=0).mean() < 0.025


def test_lazy_dirichlet_tiny_alpha_gives_one_class_and_no_empty_client():
    parts = partition("lazy-dirichlet", LABELS, 100, 0, alpha=1e-4, size=20)
    counts = label_counts(LABELS, parts, 10)
    assert (counts.sum(axis=1) == 20).all()
    assert ((counts > 0).sum(axis=1) <= 2).mean() > 0.95


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("lazy-dirichlet", {"alpha": 0.0}, r"partition.lazy-dirichlet.alpha must be > 0"),
        ("lazy-dirichlet", {"alpha": -1.0}, r"partition.lazy-dirichlet.alpha must be > 0"),
        ("lazy-dirichlet", {"size": 0}, r"partition.lazy-dirichlet.size must be ≥ 1"),
        ("lazy-dirichlet", {"size": 101}, r"size=101 exceeds the smallest class's training samples \(100\)"),
        ("lazy-iid", {"size": 0}, r"partition.lazy-iid.size must be ≥ 1"),
        ("lazy-iid", {"size": 1001}, r"size=1001 exceeds the training samples \(1000\)"),
    ],
)
def test_bad_params(name, params, match):
    with pytest.raises(ConfigError, match=match):
        partition_of(name, LABELS, 10, 0, 0, **params)


def test_bad_partition_id():
    with pytest.raises(ConfigError, match=r"partition id 10 is outside \[0, 10\)"):
        partition_of("lazy-iid", LABELS, 10, 0, 10)


def test_config_keys_come_from_the_signature():
    cfg = load_config(None, ["partition.name=lazy-dirichlet", "partition.lazy-dirichlet.alpha=1",
                             "partition.lazy-dirichlet.size=20"])  # fmt: skip
    assert cfg.plugin_kwargs("partition", "lazy-dirichlet") == {"alpha": 1.0, "size": 20}
    with pytest.raises(ConfigError, match="takes: partition.lazy-dirichlet.alpha, partition.lazy-dirichlet.size"):
        load_config(None, ["partition.lazy-dirichlet.pid=3"])
    with pytest.raises(ConfigError, match="partition.lazy-iid.size must be an integer"):
        load_config(None, ["partition.lazy-iid.size=1.5"])


def test_client_partition_is_lazy_and_bounded():
    from fedkd.client_app import _lazy_partition, _partitions, client_partition

    cfg = load_config(None, ["clients.num=5000", "partition.name=lazy-dirichlet", "partition.lazy-dirichlet.size=30"])
    _lazy_partition.cache_clear()
    eager_before = _partitions.cache_info().currsize
    x, y, counts = client_partition(cfg, 4999)
    assert len(x) == len(y) == 30 and counts == np.bincount(y.numpy(), minlength=10).tolist()
    again = client_partition(cfg, 4999)
    assert np.array_equal(again[1].numpy(), y.numpy())
    info = _lazy_partition.cache_info()
    assert (info.hits, info.misses, info.currsize) == (1, 1, 1) and info.maxsize is not None
    assert _partitions.cache_info().currsize == eager_before  # no split of all 5,000 clients
    # the eager partitioners still go through the whole-split cache
    x2, y2, c2 = client_partition(load_config(None, ["partition.name=iid"]), 3)
    assert len(x2) == 400 and sum(c2) == 400


def test_scale_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "scale.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text(encoding="utf-8")
    assert "| engine | registered | sampled / round |" in text
    lines = [ln for ln in text.splitlines() if ln.startswith("| local |")]
    assert [ln.split("|")[2].strip() for ln in lines] == ["100", "300"]
    assert all(ln.rstrip().endswith("| ok |") for ln in lines)
    assert "Load average" in text and text in proc.stdout
