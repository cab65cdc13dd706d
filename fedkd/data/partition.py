"""Partitioners: split sample indices across clients, deterministically for a seed.

Two kinds share one registry:

* eager partitioners ``f(labels, num_partitions, seed, **params) -> list[ndarray]``, where the
  i-th array holds the (sorted) training-sample indices of client i: a disjoint split, computed
  for all clients at once;
* lazy partitioners (registered with :func:`lazy`) ``f(labels, num_partitions, seed, pid,
  **params) -> ndarray``: the (sorted) indices of client ``pid`` alone, computed from
  ``(seed, pid)`` without looking at any other client. They *sample* from the training set, so
  clients may share samples, and any number of clients fits a small dataset (for runs with
  thousands of registered clients: nothing per client is held for all clients).

:func:`partition` gives every client's indices for either kind; :func:`partition_of` gives one
client's, and for a lazy partitioner computes only that one. Parameters are set in the config
as ``partition.<name>.<param>`` (kebab-case), e.g. ``partition.dirichlet.alpha`` or
``partition.lazy-dirichlet.size``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np

from fedkd.errors import ConfigError
from fedkd.registry import Registry

Partitioner = Callable[..., Any]  # eager: -> list[ndarray]; lazy (see `lazy`): -> ndarray
PARTITIONERS: Registry[Partitioner] = Registry("partitioner")

_LAZY_FLAG = "fedkd_lazy_partitioner"
F = TypeVar("F", bound=Callable[..., np.ndarray])


def lazy(fn: F) -> F:
    """Mark ``fn`` as a lazy partitioner: ``fn(labels, num_partitions, seed, pid, **params)``
    returns client ``pid``'s indices, computed from ``(seed, pid)`` alone."""
    setattr(fn, _LAZY_FLAG, True)
    return fn


def is_lazy(name: str) -> bool:
    """Whether the registered partitioner ``name`` is lazy (one client at a time)."""
    return bool(getattr(PARTITIONERS.get(name), _LAZY_FLAG, False))


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


# --------------------------------------------------------------------------------------
# Lazy partitioners: one client from (seed, pid); samples may be shared across clients.
# --------------------------------------------------------------------------------------
def _client_rng(name: str, seed: int, pid: int) -> np.random.Generator:
    """The generator of client ``pid``: from ``(seed, partitioner, pid)`` only, never from
    ``num_partitions`` nor from other clients (``zlib.crc32``: stable across processes)."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), pid])


def _check_size(name: str, size: int, available: int, what: str) -> None:
    if size < 1:
        raise ConfigError(f"partition.{name}.size must be ≥ 1, got {size}")
    if size > available:
        raise ConfigError(f"partition.{name}.size={size} exceeds {what} ({available})")


def _class_pools(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The classes present and each class's sample indices (cached: clients of one dataset
    share them, so a client costs O(size), not a pass over the labels)."""
    labels = np.ascontiguousarray(labels)
    return _class_pools_of(labels.tobytes(), labels.dtype.str)


@lru_cache(maxsize=4)
def _class_pools_of(raw: bytes, dtype: str) -> tuple[np.ndarray, list[np.ndarray]]:
    labels = np.frombuffer(raw, dtype=dtype)
    classes = np.unique(labels)
    pools = [np.flatnonzero(labels == c) for c in classes]
    for a in (classes, *pools):
        a.setflags(write=False)
    return classes, pools


@PARTITIONERS.register("lazy-iid")
@lazy
def lazy_iid(labels: np.ndarray, num_partitions: int, seed: int, pid: int, size: int = 50) -> np.ndarray:
    """Sampling, not a split: client ``pid`` draws ``size`` samples uniformly, without
    replacement within the client, from ``rng(seed, pid)``. Clients may share samples; the
    result does not depend on ``num_partitions``, so any number of clients fits any dataset."""
    _check_size("lazy-iid", size, len(labels), "the training samples")
    return _client_rng("lazy-iid", seed, pid).choice(len(labels), size, replace=False)


@PARTITIONERS.register("lazy-dirichlet")
@lazy
def lazy_dirichlet(
    labels: np.ndarray, num_partitions: int, seed: int, pid: int, alpha: float = 0.5, size: int = 50
) -> np.ndarray:
    """Sampling, not a split: label skew per client. Client ``pid`` draws class proportions
    p ~ Dir(α) over the classes present and class counts ~ Multinomial(``size``, p) from
    ``rng(seed, pid)``, then that many samples of each class, without replacement within the
    client. Clients may share samples; the result does not depend on ``num_partitions``.
    Low α gives few classes per client (α → 0: one class), high α near-uniform classes.
    ``size`` must not exceed the smallest class (a client may draw all its samples from it).
    """
    if not alpha > 0:
        raise ConfigError(f"partition.lazy-dirichlet.alpha must be > 0, got {alpha}")
    classes, pools = _class_pools(labels)
    _check_size("lazy-dirichlet", size, min(len(q) for q in pools), "the smallest class's training samples")
    rng = _client_rng("lazy-dirichlet", seed, pid)
    p = rng.dirichlet(np.full(len(classes), alpha))
    if not (np.isfinite(p).all() and p.sum() > 0):  # every component underflowed (α ≪ 1)
        p = np.eye(len(classes))[rng.integers(len(classes))]
    counts = rng.multinomial(size, p / p.sum())
    return np.concatenate([q[rng.choice(len(q), k, replace=False)] for q, k in zip(pools, counts, strict=True) if k])


def _finish(name: str, parts: list[list[int]]) -> list[np.ndarray]:
    for i, q in enumerate(parts):
        if not q:
            raise ConfigError(f"partition.{name} leaves client {i} empty; use fewer clients or change its parameters")
    return [np.sort(np.asarray(q, dtype=np.int64)) for q in parts]


def partition(name: str, labels: np.ndarray, num_partitions: int, seed: int, **params: object) -> list[np.ndarray]:
    """Every client's indices from a registered partitioner; no client may be empty.

    A lazy partitioner is called once per client here (all clients are materialized); use
    :func:`partition_of` for one client.
    """
    if is_lazy(name):
        return [partition_of(name, labels, num_partitions, seed, pid, **params) for pid in range(num_partitions)]
    parts = PARTITIONERS.get(name)(np.asarray(labels), num_partitions, seed, **params)
    return _finish(name, [p.tolist() for p in parts])


def partition_of(
    name: str, labels: np.ndarray, num_partitions: int, seed: int, pid: int, **params: object
) -> np.ndarray:
    """Client ``pid``'s indices. A lazy partitioner computes only this client; an eager one
    computes the whole split (callers cache it, see ``fedkd.client_app``)."""
    if num_partitions < 1:
        raise ConfigError(f"clients.num must be ≥ 1, got {num_partitions}")
    if not 0 <= pid < num_partitions:
        raise ConfigError(f"partition id {pid} is outside [0, {num_partitions})")
    if not is_lazy(name):
        return partition(name, labels, num_partitions, seed, **params)[pid]
    idx = np.asarray(PARTITIONERS.get(name)(np.asarray(labels), num_partitions, seed, pid, **params))
    if idx.size == 0:
        raise ConfigError(f"partition.{name} leaves client {pid} empty; change its parameters")
    return np.sort(idx.astype(np.int64))


def holdout(idx: np.ndarray, fraction: float, seed: int, pid: int) -> tuple[np.ndarray, np.ndarray]:
    """Client ``pid``'s indices split into ``(train, test)``: a random ``fraction`` (rounded, at
    least 1 when ``fraction > 0`` and the client has 2 or more samples, never all) held out.

    The split depends on ``(seed, pid)`` only, so every engine and every process draws the
    same one; both parts are sorted.
    """
    idx = np.asarray(idx, dtype=np.int64)
    n = len(idx)
    k = 0 if fraction <= 0 or n < 2 else min(max(int(round(fraction * n)), 1), n - 1)
    if k == 0:
        return idx, idx[:0]
    perm = np.random.default_rng(np.random.SeedSequence([seed, pid, 0x7E57])).permutation(n)
    return np.sort(idx[perm[k:]]), np.sort(idx[perm[:k]])


def label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """``(num_partitions, num_classes)`` matrix of per-client label counts."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
