"""The dataset container and its registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from fedkd.registry import Registry

Loader = Callable[[str, bool], "Dataset"]
DATASETS: Registry[Loader] = Registry("dataset")


@dataclass(frozen=True)
class Dataset:
    """A labelled image dataset held as normalized float tensors.

    Attributes
    ----------
    name : str
        Registered name.
    x_train, x_test : Tensor
        ``(N, C, H, W)`` float32, normalized with ``mean``/``std``.
    y_train, y_test : Tensor
        ``(N,)`` int64 labels in ``[0, num_classes)``.
    num_classes : int
    mean, std : tuple of float
        Per-channel normalization constants already applied to ``x``.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


def from_arrays(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    scale: float,
    num_classes: int | None = None,
) -> Dataset:
    """Build a :class:`Dataset` from ``(N, C, H, W)`` arrays in ``[0, scale]``.

    Normalization uses the per-channel mean/std of the training split.
    """
    xtr = torch.as_tensor(np.asarray(x_train, dtype=np.float32) / scale)
    xte = torch.as_tensor(np.asarray(x_test, dtype=np.float32) / scale)
    mean = xtr.mean(dim=(0, 2, 3))
    std = xtr.std(dim=(0, 2, 3)).clamp_min(1e-6)
    norm = lambda x: (x - mean[None, :, None, None]) / std[None, :, None, None]  # noqa: E731
    ytr = torch.as_tensor(np.asarray(y_train, dtype=np.int64))
    yte = torch.as_tensor(np.asarray(y_test, dtype=np.int64))
    k = num_classes if num_classes is not None else int(max(ytr.max(), yte.max())) + 1
    return Dataset(
        name, norm(xtr).contiguous(), ytr, norm(xte).contiguous(), yte, k,
        tuple(float(v) for v in mean), tuple(float(v) for v in std),
    )  # fmt: skip


def stratified_split(y: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified train/test index split (fixed seed, independent of runs)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@lru_cache(maxsize=4)
def load_dataset(name: str, root: str = "", download: bool = False) -> Dataset:
    """Load a registered dataset (cached per process)."""
    return DATASETS.get(name)(root, download)
