"""torchvision-backed datasets, read from a local root.

torchvision is optional and imported lazily: only these loaders need it. Files are read
from ``dataset.root``; they are downloaded only with ``dataset.download = true`` and a
network that allows it. Every failure a user can fix is a one-line :class:`UserError`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from fedkd.data.base import DATASETS, Dataset, from_arrays
from fedkd.errors import UserError


def import_torchvision() -> ModuleType:
    """Import torchvision or raise a one-line :class:`UserError` saying why it can't."""
    try:
        import torchvision
    except ImportError:
        raise UserError(
            "torchvision is not installed; `pip install torchvision` (a build matching your torch) "
            "to use the torchvision-backed datasets, or use mnist5k/digits"
        ) from None
    except RuntimeError as e:  # e.g. a CUDA torchvision on a CPU torch: "operator torchvision::nms does not exist"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"torchvision cannot be imported ({first}); install a torchvision build that matches "
            "your torch, or use mnist5k/digits"
        ) from None
    return torchvision


def _as_nchw(x: Any) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 3:  # (N, H, W) grayscale
        return a[:, None]
    if a.ndim == 4 and a.shape[-1] in (1, 3):  # (N, H, W, C)
        return a.transpose(0, 3, 1, 2)
    return a


def _vision(
    name: str,
    cls_name: str,
    split_kw: Callable[[bool], dict[str, Any]],
    labels_attr: str = "targets",
    num_classes: int = 10,
    fix: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
) -> Callable[[str, bool], Dataset]:
    def load(root: str = "", download: bool = False) -> Dataset:
        if not root:
            raise UserError(f"dataset {name!r} reads from a local folder: set dataset.root")
        if not Path(root).is_dir() and not download:
            raise UserError(f"dataset.root {root!r} does not exist (dataset {name!r})")
        tv = import_torchvision()
        cls = getattr(tv.datasets, cls_name)
        parts = []
        for train in (True, False):
            try:
                ds = cls(root, download=download, **split_kw(train))
            except (RuntimeError, OSError, ValueError, KeyError, EOFError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"cannot load {name!r} from dataset.root {root!r}: {msg}") from None
            x = _as_nchw(ds.data.numpy() if hasattr(ds.data, "numpy") else ds.data)
            y = np.asarray(getattr(ds, labels_attr))
            y = y.numpy() if hasattr(y, "numpy") else y
            if fix is not None:
                x, y = fix(x, y)
            parts.append((x, y))
        (xtr, ytr), (xte, yte) = parts
        return from_arrays(name, xtr, ytr, xte, yte, 255.0, num_classes=num_classes)

    load.__doc__ = f"torchvision {cls_name} from a local root."
    return load


def _emnist_fix(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # EMNIST images are stored transposed; "letters" labels run 1..26.
    return x.transpose(0, 1, 3, 2), y - 1


def _train_kw(train: bool) -> dict[str, Any]:
    return {"train": train}


DATASETS.add("mnist", _vision("mnist", "MNIST", _train_kw))
DATASETS.add("fashion-mnist", _vision("fashion-mnist", "FashionMNIST", _train_kw))
DATASETS.add(
    "emnist",
    _vision("emnist", "EMNIST", lambda t: {"split": "letters", "train": t}, num_classes=26, fix=_emnist_fix),
)
DATASETS.add("cifar10", _vision("cifar10", "CIFAR10", _train_kw))
DATASETS.add("cifar100", _vision("cifar100", "CIFAR100", _train_kw, num_classes=100))
DATASETS.add("svhn", _vision("svhn", "SVHN", lambda t: {"split": "train" if t else "test"}, labels_attr="labels"))
