"""Unit tests for the partitioners."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.data import PARTITIONERS, label_counts, partition
from fedkd.data.partition import is_lazy
from fedkd.errors import ConfigError

LABELS = np.repeat(np.arange(10), 100)  # 1,000 samples, 100 per class
NAMES = [n for n in PARTITIONERS.names() if not is_lazy(n)]  # disjoint splits; the lazy ones sample (test_scale.py)


@pytest.mark.parametrize("name", NAMES)
def test_disjoint_cover_and_deterministic(name):
    a = partition(name, LABELS, 10, seed=3)
    b = partition(name, LABELS, 10, seed=3)
    c = partition(name, LABELS, 10, seed=4)
    assert len(a) == 10
    allidx = np.concatenate(a)
    assert len(np.unique(allidx)) == len(allidx), "partitions overlap"
    if name != "pathological":  # pathological may leave classes nobody holds
        assert len(allidx) == len(LABELS)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_is_balanced():
    sizes = [len(p) for p in partition("iid", LABELS, 10, 0)]
    assert sizes == [100] * 10


def test_dirichlet_alpha_controls_skew():
    def classes_per_client(alpha: float) -> float:
        counts = label_counts(LABELS, partition("dirichlet", LABELS, 10, 0, alpha=alpha, min_size=5), 10)
        return float((counts > 0).sum(axis=1).mean())

    assert classes_per_client(0.05) < classes_per_client(1.0) < classes_per_client(100.0) + 1e-9
    assert classes_per_client(100.0) == 10.0


def test_dirichlet_min_size_holds():
    parts = partition("dirichlet", LABELS, 20, 1, alpha=0.1, min_size=20)
    assert min(len(p) for p in parts) >= 20


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_dirichlet_rejects_nonpositive_alpha(alpha):
    with pytest.raises(ConfigError, match="partition.dirichlet.alpha must be > 0"):
        partition("dirichlet", LABELS, 10, 0, alpha=alpha)


def test_dirichlet_impossible_min_size():
    with pytest.raises(ConfigError, match="could not give every one of 200 clients"):
        partition("dirichlet", LABELS, 200, 0, alpha=0.01, min_size=4, max_tries=20)


@pytest.mark.parametrize("name", NAMES)
def test_more_clients_than_samples(name):
    with pytest.raises(ConfigError, match=r"more clients \(2000\) than training samples \(1000\)"):
        partition(name, LABELS, 2000, 0)


def test_pathological_classes_per_client():
    counts = label_counts(LABELS, partition("pathological", LABELS, 10, 0, classes_per_client=2), 10)
    assert ((counts > 0).sum(axis=1) == 2).all()
    with pytest.raises(ConfigError, match="classes-per-client must be in"):
        partition("pathological", LABELS, 10, 0, classes_per_client=11)


def test_shards_give_few_classes():
    counts = label_counts(LABELS, partition("shards", LABELS, 10, 0, shards_per_client=2), 10)
    assert ((counts > 0).sum(axis=1) <= 2).all()


def test_quantity_skew_sizes_vary_labels_do_not():
    parts = partition("quantity-skew", LABELS, 10, 0, sigma=1.5)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 1 and sizes.max() > 3 * sizes.min()
    assert partition("quantity-skew", LABELS, 10, 0, sigma=0.0)[0].size in (99, 100, 101)


def test_empty_client_is_an_error():
    PARTITIONERS.add("test-empty", lambda labels, n, seed: [np.arange(len(labels))] + [np.array([], int)] * (n - 1))
    try:
        with pytest.raises(ConfigError, match="partition.test-empty leaves client 1 empty"):
            partition("test-empty", LABELS, 3, 0)
    finally:
        PARTITIONERS._items.pop("test-empty")


def test_label_counts_matrix():
    parts = [np.array([0, 1, 100]), np.array([200, 201])]
    m = label_counts(LABELS, parts, 10)
    assert m.shape == (2, 10)
    assert m[0, 0] == 2 and m[0, 1] == 1 and m[1, 2] == 2 and m.sum() == 5
