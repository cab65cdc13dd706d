"""Partitioners: split sample indices across clients, deterministically for a seed.

Each partitioner is ``f(labels, num_partitions, seed, **params) -> list[ndarray]`` where the
i-th array holds the (sorted) training-sample indices of client i. Parameters are set in
the config as ``partition.<name>.<param>`` (kebab-case), e.g. ``partition.dirichlet.alpha``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedkd.errors import ConfigError
from fedkd.registry import Registry

Partitioner = Callable[..., list[np.ndarray]]
PARTITIONERS: Registry[Partitioner] = Registry("partitioner")


def _check_common(labels: np.ndarray, n: int) -> None:
    if n < 1:
        raise ConfigError(f"clients.num must be ≥ 1, got {n}")
    if n > len(labels):
        raise ConfigError(f"more clients ({n}) than training samples ({len(labels)})")


@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Uniformly random, equal-sized shards."""
    _check_common(labels, num_partitions)
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(p) for p in np.array_split(perm, num_partitions)]


@PARTITIONERS.register("dirichlet")
def dirichlet(
    labels: np.ndarray, num_partitions: int, seed: int, alpha: float = 0.5, min_size: int = 10, max_tries: int = 1000
) -> list[np.ndarray]:
    """Label skew: each class is split across clients by proportions ~ Dir(α).

    Follows Hsu et al. (2019) as implemented in FedML/NIID-Bench: clients already holding
    ``N / n`` samples get no more, and the draw is repeated until every client holds at
    least ``min_size`` samples (at most ``max_tries`` draws).
    """
    _check_common(labels, num_partitions)
    if not alpha > 0:
        raise ConfigError(f"partition.dirichlet.alpha must be > 0, got {alpha}")
    if min_size < 1:
        raise ConfigError(f"partition.dirichlet.min-size must be ≥ 1, got {min_size}")
    if min_size * num_partitions > len(labels):
        raise ConfigError(
            f"partition.dirichlet.min-size={min_size} × {num_partitions} clients exceeds the "
            f"{len(labels)} training samples"
        )
    rng = np.random.default_rng(seed)
    n, classes = len(labels), np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_partitions, alpha))
            p = p * np.array([len(q) < n / num_partitions for q in parts])
            p = p / p.sum() if p.sum() > 0 else np.full(num_partitions, 1 / num_partitions)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for q, chunk in zip(parts, np.split(idx, cuts), strict=True):
                q.extend(chunk.tolist())
        if min(len(q) for q in parts) >= min_size:
            return [np.sort(np.asarray(q, dtype=np.int64)) for q in parts]
    raise ConfigError(
        f"partition.dirichlet could not give every one of {num_partitions} clients ≥ {min_size} "
        f"samples at alpha={alpha} in {max_tries} draws; lower partition.dirichlet.min-size or clients.num"
    )


@PARTITIONERS.register("pathological")
def pathological(labels: np.ndarray, num_partitions: int, seed: int, classes_per_client: int = 2) -> list[np.ndarray]:
    """Each client holds ``classes_per_client`` classes; a class's samples are split evenly
    among the clients that hold it. Classes are dealt round-robin over a seeded permutation."""
    _check_common(labels, num_partitions)
    classes = np.unique(labels)
    if not 1 <= classes_per_client <= len(classes):
        raise ConfigError(
            f"partition.pathological.classes-per-client must be in [1, {len(classes)}], got {classes_per_client}"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    owned = [[order[(i * classes_per_client + j) % len(classes)] for j in range(classes_per_client)]
             for i in range(num_partitions)]  # fmt: skip
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for i, cs in enumerate(owned):
        for c in cs:
            holders[int(c)].append(i)
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for c, hs in holders.items():
        if not hs:
            continue
        idx = rng.permutation(np.flatnonzero(labels == c))
        for h, chunk in zip(hs, np.array_split(idx, len(hs)), strict=True):
            parts[h].extend(chunk.tolist())
    return _finish("pathological", parts)


@PARTITIONERS.register("shards")
def shards(labels: np.ndarray, num_partitions: int, seed: int, shards_per_client: int = 2) -> list[np.ndarray]:
    """McMahan et al. (2017): sort by label, cut into ``n × shards_per_client`` shards,
    and give each client ``shards_per_client`` random shards."""
    _check_common(labels, num_partitions)
    if shards_per_client < 1:
        raise ConfigError(f"partition.shards.shards-per-client must be ≥ 1, got {shards_per_client}")
    total = num_partitions * shards_per_client
    if total > len(labels):
        raise ConfigError(f"partition.shards needs {total} shards but there are only {len(labels)} samples")
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, total)
    assign = rng.permutation(total).reshape(num_partitions, shards_per_client)
    return _finish("shards", [np.concatenate([pieces[s] for s in row]).tolist() for row in assign])


@PARTITIONERS.register("quantity-skew")
def quantity_skew(labels: np.ndarray, num_partitions: int, seed: int, sigma: float = 1.0) -> list[np.ndarray]:
    """IID labels, log-normal client sizes: size_i ∝ exp(N(0, σ²)), every client ≥ 1 sample."""
    _check_common(labels, num_partitions)
    if sigma < 0:
        raise ConfigError(f"partition.quantity-skew.sigma must be ≥ 0, got {sigma}")
    rng = np.random.default_rng(seed)
    w = rng.lognormal(0.0, sigma, num_partitions)
    extra = len(labels) - num_partitions  # one sample each, the rest by weight
    sizes = 1 + np.floor(w / w.sum() * extra).astype(int)
    sizes[np.argmax(w)] += len(labels) - sizes.sum()
    perm = rng.permutation(len(labels))
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def _finish(name: str, parts: list[list[int]]) -> list[np.ndarray]:
    for i, q in enumerate(parts):
        if not q:
            raise ConfigError(f"partition.{name} leaves client {i} empty; use fewer clients or change its parameters")
    return [np.sort(np.asarray(q, dtype=np.int64)) for q in parts]


def partition(name: str, labels: np.ndarray, num_partitions: int, seed: int, **params: object) -> list[np.ndarray]:
    """Run a registered partitioner and check that no client is empty."""
    parts = PARTITIONERS.get(name)(np.asarray(labels), num_partitions, seed, **params)
    return _finish(name, [p.tolist() for p in parts])


def label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """``(num_partitions, num_classes)`` matrix of per-client label counts."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
