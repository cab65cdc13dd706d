"""torchvision-backed datasets, read from a local root.

torchvision is optional and imported lazily: only these loaders need it. Files are read
from ``dataset.root``; they are downloaded only with ``dataset.download = true`` and a
network that allows it. Every failure a user can fix is a one-line :class:`UserError`.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np

from fedkd.data.base import DATASETS, Dataset, from_arrays
from fedkd.errors import UserError

Layout = Literal["NHW", "NHWC", "NCHW"]

# What torchvision raises on files that are missing, truncated or not in the expected format:
# idx files fail asserts and dtype checks (AssertionError, TypeError), pickles fail to unpickle,
# downloads fail with URLError (an OSError).
_FILE_ERRORS = (
    RuntimeError,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    EOFError,
    AssertionError,
    TypeError,
    pickle.UnpicklingError,
)
_TV_DOWNLOAD_HINT = "You can use download=True to download it"


# The only callables a CIFAR batch (a pickled dict of numpy arrays, from Python 2) may name.
SAFE_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }
)  # fmt: skip
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
)


def check_pickle(path: Path) -> None:
    """Refuse a pickle that could run anything but numpy's array reconstruction.

    The file is only *read* here, opcode by opcode (:mod:`pickletools`), never executed:
    every global it references must be in :data:`SAFE_PICKLE_GLOBALS`, and the opcodes
    that reach callables any other way (extension codes) are refused. Only then may
    torchvision unpickle it.
    """
    import pickletools

    recent: list[str | None] = []  # what the last opcodes pushed, when they were strings
    memo: dict[int, str | None] = {}
    try:
        data = path.read_bytes()
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                ref = (module, attr)
            elif name == "STACK_GLOBAL":
                ok = len(recent) >= 2 and recent[-2] is not None and recent[-1] is not None
                ref = (str(recent[-2]), str(recent[-1])) if ok else ("<computed>", "<computed>")
            elif name in ("EXT1", "EXT2", "EXT4"):
                ref = ("copyreg extension", str(arg))
            else:
                top = recent[-1] if recent else None
                if name in _STRING_OPS:
                    recent.append(str(arg))
                elif name == "MEMOIZE":
                    memo[len(memo)] = top
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = top  # type: ignore[arg-type]
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    recent.append(memo.get(int(arg)))  # type: ignore[arg-type]
                else:
                    recent.append(None)
                continue
            if ref not in SAFE_PICKLE_GLOBALS:
                raise UserError(f"refusing to unpickle {path}: it references {ref[0]}.{ref[1]}, not only numpy arrays")
            recent.append(None)
    except (ValueError, EOFError, IndexError) as e:  # truncated or not a pickle
        raise UserError(f"{path} is corrupted or not a pickle ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else ""


def import_torchvision() -> ModuleType:
    """Import torchvision or raise a one-line :class:`UserError` saying why it can't."""
    try:
        import torchvision
    except ImportError:
        raise UserError(
            "torchvision is not installed; `pip install torchvision` (a build matching your torch) "
            "to use the torchvision-backed datasets, or use mnist5k/digits"
        ) from None
    except Exception as e:  # e.g. a CUDA torchvision on a CPU torch: "operator torchvision::nms does not exist"
        raise UserError(
            f"torchvision cannot be imported ({_first_line(e) or type(e).__name__}); install a torchvision "
            "build that matches your torch, or use mnist5k/digits"
        ) from None
    return torchvision


def _to_nchw(x: Any, layout: Layout) -> np.ndarray:
    a = np.asarray(x.numpy() if hasattr(x, "numpy") else x)
    if a.ndim != len(layout):
        raise ValueError(f"images have shape {a.shape}, expected {layout}")
    if layout == "NHW":
        return a[:, None]
    if layout == "NHWC":
        return a.transpose(0, 3, 1, 2)
    return a


def _check(x: np.ndarray, y: np.ndarray, num_classes: int, split: str) -> None:
    """Reject what torchvision reads without complaint but is still corrupt."""
    if len(x) == 0:
        raise ValueError(f"the {split} split holds no images")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"the {split} split has {len(x)} images but {y.size} labels")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"{split} labels span {y.min()}..{y.max()}, expected 0..{num_classes - 1}")


def _vision(
    name: str,
    cls_name: str,
    split_kw: Callable[[bool], dict[str, Any]],
    files: str,
    layout: Layout,
    labels_attr: str = "targets",
    num_classes: int = 10,
    fix: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
    pickles: bool = False,
) -> Callable[[str, bool], Dataset]:
    def load(root: str = "", download: bool = False) -> Dataset:
        if not root:
            raise UserError(f"dataset {name!r} reads from a local folder: set dataset.root")
        if not download:
            if not Path(root).exists():
                raise UserError(f"dataset.root {root!r} does not exist (dataset {name!r})")
            if not Path(root).is_dir():
                raise UserError(f"dataset.root {root!r} is not a folder (dataset {name!r})")
        if pickles and not download:  # torchvision unpickles these files: check them first
            folder = Path(root) / files
            for f in sorted(folder.iterdir()) if folder.is_dir() else []:
                if f.is_file():
                    check_pickle(f)
        tv = import_torchvision()
        cls = getattr(tv.datasets, cls_name)
        where = f"cannot load {name!r} from dataset.root {root!r} (expects {files})"
        parts = []
        for train in (True, False):
            split = "train" if train else "test"
            try:
                ds = cls(root, download=download, **split_kw(train))
                x = _to_nchw(ds.data, layout)
                y = np.asarray(getattr(ds, labels_attr)).astype(np.int64)
                if fix is not None:
                    x, y = fix(x, y)
                _check(x, y, num_classes, split)
            except _FILE_ERRORS as e:
                msg = _first_line(e)
                if _TV_DOWNLOAD_HINT in msg:  # torchvision's hint names its API, not fedkd's config
                    msg = msg.replace(_TV_DOWNLOAD_HINT, "Set dataset.download=true to fetch it (needs a network)")
                    raise UserError(f"{where}: {msg}") from None
                detail = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
                raise UserError(
                    f"{where}: a {split} file is corrupt or not in the expected format ({detail})"
                ) from None
            parts.append((x, y))
        (xtr, ytr), (xte, yte) = parts
        return from_arrays(name, xtr, ytr, xte, yte, 255.0, num_classes=num_classes)

    load.__doc__ = f"torchvision {cls_name} from a local root ({files})."
    return load


def _emnist_fix(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # EMNIST images are stored transposed; "letters" labels run 1..26.
    return x.transpose(0, 1, 3, 2), y - 1


def _train_kw(train: bool) -> dict[str, Any]:
    return {"train": train}


def _mnist_files(folder: str, prefix: str = "") -> str:
    return f"{folder}/raw/{prefix}{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte"


DATASETS.add("mnist", _vision("mnist", "MNIST", _train_kw, _mnist_files("MNIST"), "NHW"))
DATASETS.add("fashion-mnist", _vision("fashion-mnist", "FashionMNIST", _train_kw, _mnist_files("FashionMNIST"), "NHW"))
DATASETS.add(
    "emnist",
    _vision(
        "emnist",
        "EMNIST",
        lambda t: {"split": "letters", "train": t},
        "EMNIST/raw/emnist-letters-{train,test}-{images-idx3,labels-idx1}-ubyte",
        "NHW",
        num_classes=26,
        fix=_emnist_fix,
    ),
)
DATASETS.add("cifar10", _vision("cifar10", "CIFAR10", _train_kw, "cifar-10-batches-py/", "NHWC", pickles=True))
DATASETS.add(
    "cifar100", _vision("cifar100", "CIFAR100", _train_kw, "cifar-100-python/", "NHWC", num_classes=100, pickles=True)
)
DATASETS.add(
    "svhn",
    _vision(
        "svhn",
        "SVHN",
        lambda t: {"split": "train" if t else "test"},
        "train_32x32.mat and test_32x32.mat",
        "NCHW",
        labels_attr="labels",
    ),
)
