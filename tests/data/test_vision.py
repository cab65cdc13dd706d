"""The torchvision-backed datasets, loaded from tiny files written in the real on-disk formats.

The torchvision 0.28.0 wheel is a CUDA build; with the CPU torch 2.13.0 its import fails on
``operator torchvision::nms does not exist``. The ``tv`` fixture defines the two missing op
schemas (``nms``, ``qnms``) before importing it, so the loaders can be exercised here. That is a
test-only shim and it lasts for the rest of the process; the product never does it, and
``test_real_environment_*`` checks, in a clean interpreter, what a user on this machine sees.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io
import torch

from fedkd.cli import main
from fedkd.data import DATASETS, load_dataset
from fedkd.errors import UserError

if importlib.util.find_spec("torchvision") is None:
    pytest.skip("torchvision is not installed (pip install --no-deps torchvision)", allow_module_level=True)

VISION = ("mnist", "fashion-mnist", "emnist", "cifar10", "cifar100", "svhn")
N_TRAIN, N_TEST = 10, 4  # CIFAR-10's train split is 5 batches of 2

_KEEP: list[torch.library.Library] = []  # the schemas live as long as this process


@pytest.fixture(scope="module")
def tv() -> Any:
    """torchvision, importable even where its C++ ops don't match torch (test-only shim)."""
    try:
        import torchvision
    except RuntimeError:  # operator torchvision::nms does not exist
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP.append(lib)
        import torchvision
    import torchvision.datasets

    return torchvision


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    load_dataset.cache_clear()


# ---- writers: each returns the arrays fedkd must produce, (N, C, H, W) uint8 and int labels ----

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_idx(path: Path, a: np.ndarray) -> None:
    """An idx-ubyte file: big-endian magic 0x0000 08 <ndim>, the dims as big-endian uint32, the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.ascontiguousarray(a, dtype=np.uint8)
    path.write_bytes(struct.pack(">I", 0x0800 | a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes())


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def write_mnist_like(folder: str) -> Callable[[Path, np.random.Generator], Arrays]:
    def write(root: Path, rng: np.random.Generator) -> Arrays:
        out = []
        for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
            x = _images(rng, n, (28, 28))
            y = np.arange(n) % 10
            write_idx(root / folder / "raw" / f"{split}-images-idx3-ubyte", x)
            write_idx(root / folder / "raw" / f"{split}-labels-idx1-ubyte", y)
            out += [x[:, None], y]
        return tuple(out)  # type: ignore[return-value]

    return write


def write_emnist(root: Path, rng: np.random.Generator) -> Arrays:
    out = []
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x = _images(rng, n, (28, 28))
        letters = np.array([1, 26, *rng.integers(1, 27, size=n - 2)])  # "letters" labels run 1..26
        prefix = root / "EMNIST" / "raw" / f"emnist-letters-{split}"
        write_idx(Path(f"{prefix}-images-idx3-ubyte"), x.transpose(0, 2, 1))  # EMNIST stores images transposed
        write_idx(Path(f"{prefix}-labels-idx1-ubyte"), letters)
        out += [x[:, None], letters - 1]
    return tuple(out)  # type: ignore[return-value]


def _pickle(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))  # the real batches are Python 2 pickles


def _cifar_batch(x: np.ndarray, labels: dict[str, list[int]], name: str) -> dict[str, Any]:
    # one row per image: the 1024 red, then green, then blue pixels, each plane row-major
    return {"batch_label": name, "data": x.reshape(len(x), 3 * 32 * 32), "filenames": [f"{i}.png" for i in range(len(x))],
            **labels}  # fmt: skip


def write_cifar10(root: Path, rng: np.random.Generator) -> Arrays:
    base = root / "cifar-10-batches-py"
    xtr, ytr = _images(rng, N_TRAIN, (3, 32, 32)), np.arange(N_TRAIN) % 10
    for b in range(5):
        sl = slice(2 * b, 2 * b + 2)
        _pickle(base / f"data_batch_{b + 1}", _cifar_batch(xtr[sl], {"labels": ytr[sl].tolist()}, f"batch {b + 1}"))
    xte, yte = _images(rng, N_TEST, (3, 32, 32)), np.array([9, 0, 3, 7])
    _pickle(base / "test_batch", _cifar_batch(xte, {"labels": yte.tolist()}, "test"))
    _pickle(
        base / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": 2, "num_vis": 3072}
    )
    return xtr, ytr, xte, yte


def write_cifar100(root: Path, rng: np.random.Generator) -> Arrays:
    base = root / "cifar-100-python"
    out = []
    for split, y in (("train", np.array([0, 99, 5, 17, 42, 63, 71, 88, 1, 98])), ("test", np.array([99, 0, 50, 7]))):
        x = _images(rng, len(y), (3, 32, 32))
        _pickle(base / split, _cifar_batch(x, {"fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist()}, split))
        out += [x, y]
    _pickle(base / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                            "coarse_label_names": [f"c{i}" for i in range(20)]})  # fmt: skip
    return tuple(out)  # type: ignore[return-value]


def write_svhn(root: Path, rng: np.random.Generator) -> Arrays:
    out = []
    for split, y in (("train", np.arange(N_TRAIN) % 10), ("test", np.array([0, 9, 1, 0]))):
        x = _images(rng, len(y), (3, 32, 32))
        # X is (H, W, C, N) and y is (N, 1); the digit 0 is stored as 10
        mat = {"X": x.transpose(2, 3, 1, 0), "y": np.where(y == 0, 10, y).astype(np.uint8)[:, None]}
        root.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(root / f"{split}_32x32.mat", mat)
        out += [x, y]
    return tuple(out)  # type: ignore[return-value]


WRITERS: dict[str, tuple[Callable[[Path, np.random.Generator], Arrays], int]] = {
    "mnist": (write_mnist_like("MNIST"), 10),
    "fashion-mnist": (write_mnist_like("FashionMNIST"), 10),
    "emnist": (write_emnist, 26),
    "cifar10": (write_cifar10, 10),
    "cifar100": (write_cifar100, 100),
    "svhn": (write_svhn, 10),
}


def pin_checksums(monkeypatch: pytest.MonkeyPatch, tv: Any, root: Path) -> None:
    """Make torchvision expect the md5 of the tiny files instead of the real ones.

    The integrity check itself still runs (and still rejects a file changed afterwards); only
    the table of expected checksums is swapped, for this test only.
    """
    for cls in (tv.datasets.CIFAR10, tv.datasets.CIFAR100):
        base = root / cls.base_folder
        if not base.is_dir():
            continue
        for attr in ("train_list", "test_list"):
            monkeypatch.setattr(cls, attr, [[f, md5(base / f)] for f, _ in getattr(cls, attr)])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(base / cls.meta["filename"])})
    svhn = tv.datasets.SVHN
    pinned = {k: [url, f, md5(root / f) if (root / f).is_file() else h] for k, (url, f, h) in svhn.split_list.items()}
    monkeypatch.setattr(svhn, "split_list", pinned)


def make(name: str, root: Path, monkeypatch: pytest.MonkeyPatch, tv: Any) -> Arrays:
    arrays = WRITERS[name][0](root, np.random.default_rng(sorted(WRITERS).index(name)))
    pin_checksums(monkeypatch, tv, root)
    return arrays


def one_line_error(excinfo: pytest.ExceptionInfo[UserError]) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


# ---- loading ----


def test_every_vision_dataset_has_a_writer() -> None:
    assert set(VISION) <= set(DATASETS.names())
    assert set(WRITERS) == set(VISION)


@pytest.mark.parametrize("name", VISION)
def test_loads_the_real_format(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tv: Any) -> None:
    xtr, ytr, xte, yte = make(name, tmp_path, monkeypatch, tv)
    ds = load_dataset(name, str(tmp_path))

    assert ds.name == name and ds.num_classes == WRITERS[name][1]
    assert tuple(ds.x_train.shape) == xtr.shape and tuple(ds.x_test.shape) == xte.shape
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.y_train.tolist() == ytr.tolist() and ds.y_test.tolist() == yte.tolist()
    # normalized with the train split's per-channel statistics ...
    assert len(ds.mean) == len(ds.std) == xtr.shape[1]
    assert torch.allclose(ds.x_train.mean(dim=(0, 2, 3)), torch.zeros(xtr.shape[1]), atol=1e-5)
    assert torch.allclose(ds.x_train.std(dim=(0, 2, 3)), torch.ones(xtr.shape[1]), atol=1e-4)
    # ... and undoing it gives back every pixel where it was written (orientation and channel order)
    mean, std = torch.tensor(ds.mean)[None, :, None, None], torch.tensor(ds.std)[None, :, None, None]
    for x, want in ((ds.x_train, xtr), (ds.x_test, xte)):
        assert torch.allclose(x * std + mean, torch.as_tensor(want / 255.0, dtype=torch.float32), atol=1e-5)


# ---- errors a user can fix: one line, and exit code 2 through the CLI ----


def test_no_root() -> None:
    with pytest.raises(UserError) as e:
        load_dataset("mnist", "")
    assert "set dataset.root" in one_line_error(e)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        load_dataset("cifar10", str(tmp_path / "nope"))
    assert "does not exist" in one_line_error(e)


def test_root_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError) as e:
        load_dataset("svhn", str(tmp_path / "f"))
    assert "is not a folder" in one_line_error(e)


@pytest.mark.parametrize("name", VISION)
def test_root_without_the_files(name: str, tmp_path: Path, tv: Any) -> None:
    with pytest.raises(UserError) as e:
        load_dataset(name, str(tmp_path))
    msg = one_line_error(e)
    assert f"cannot load {name!r}" in msg and "not found" in msg and "dataset.download=true" in msg
    assert "download=True" not in msg  # torchvision's hint names its own API, not fedkd's key


def _corrupt_idx(kind: str, raw: Path) -> None:
    images, labels = raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"
    if kind == "empty":
        images.write_bytes(b"")
    elif kind == "garbage":
        images.write_bytes(b"<html>404 Not Found</html>" * 40)
    elif kind == "truncated":
        images.write_bytes(images.read_bytes()[:500])
    elif kind == "int32-images":  # a well-formed idx file, but of int32 (type code 0x0C)
        images.write_bytes(struct.pack(">4I", 0x0C03, N_TRAIN, 28, 28) + np.zeros(N_TRAIN * 28 * 28, ">i4").tobytes())
    elif kind == "fewer-labels":
        write_idx(labels, np.arange(N_TRAIN - 3) % 10)
    elif kind == "label-out-of-range":
        write_idx(labels, np.full(N_TRAIN, 10))
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["empty", "garbage", "truncated", "int32-images", "fewer-labels", "label-out-of-range"]
)
def test_corrupt_idx_file(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tv: Any) -> None:
    make("mnist", tmp_path, monkeypatch, tv)
    _corrupt_idx(kind, tmp_path / "MNIST" / "raw")
    with pytest.raises(UserError) as e:
        load_dataset("mnist", str(tmp_path))
    assert "train file is corrupt" in one_line_error(e)


def test_emnist_label_zero_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tv: Any) -> None:
    make("emnist", tmp_path, monkeypatch, tv)
    write_idx(tmp_path / "EMNIST" / "raw" / "emnist-letters-test-labels-idx1-ubyte", np.zeros(N_TEST))  # "N/A"
    with pytest.raises(UserError) as e:
        load_dataset("emnist", str(tmp_path))
    assert "test file is corrupt" in one_line_error(e) and "expected 0..25" in str(e.value)


@pytest.mark.parametrize(("name", "path"), [("cifar10", "cifar-10-batches-py/data_batch_3"),
                                            ("cifar100", "cifar-100-python/meta"),
                                            ("svhn", "test_32x32.mat")])  # fmt: skip
def test_checksum_still_guards_the_files(
    name: str, path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tv: Any
) -> None:
    make(name, tmp_path, monkeypatch, tv)
    f = tmp_path / path
    f.write_bytes(f.read_bytes()[:-7])  # truncated after its checksum was recorded
    with pytest.raises(UserError) as e:
        load_dataset(name, str(tmp_path))
    assert "corrupted" in one_line_error(e)


def _cli(capsys: pytest.CaptureFixture[str], out: Path, *sets: str) -> tuple[int, str]:
    argv = ["run", "--set", "dataset.name=mnist", *(a for s in sets for a in ("--set", s)), "--out", str(out)]
    rc = main(argv)
    err = capsys.readouterr().err
    assert not out.exists()  # nothing is created before the inputs are checked
    return rc, err


@pytest.mark.parametrize("case", ["no root", "missing root", "root without the files", "corrupt file"])
def test_cli_one_line_exit_2(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tv: Any
) -> None:
    root = tmp_path / "data"
    if case == "missing root":
        sets, want = ["dataset.root=/nonexistent"], "does not exist"
    elif case == "no root":
        sets, want = [], "set dataset.root"
    else:
        root.mkdir()
        if case == "corrupt file":
            make("mnist", root, monkeypatch, tv)
            (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
        sets, want = (
            [f"dataset.root={root}"],
            "not found" if case == "root without the files" else "test file is corrupt",
        )
    rc, err = _cli(capsys, tmp_path / "o", *sets)
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], err


# ---- the real environment, without the fixture's shim ----

_CLEAN = """
import contextlib, io, json, sys
from fedkd.cli import main
from fedkd.data import load_dataset
from fedkd.errors import UserError
root = sys.argv[1]
err = io.StringIO()
with contextlib.redirect_stderr(err):
    rc = main(["run", "--set", "dataset.name=mnist", "--set", "dataset.root=" + root, "--out", root + "/o"])
try:
    load_dataset("mnist", root)
    direct = None
except UserError as e:
    direct = str(e)
try:
    import torchvision  # noqa: F401
    importable = True
except Exception:
    importable = False
print(json.dumps({"rc": rc, "stderr": err.getvalue(), "direct": direct, "importable": importable}))
"""


def test_real_environment_says_torchvision_cannot_be_imported(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _CLEAN, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if got["importable"]:
        pytest.skip("torchvision imports cleanly in this environment (a build matching torch)")
    assert got["rc"] == 2 and "Traceback" not in got["stderr"]
    lines = got["stderr"].strip().splitlines()
    assert len(lines) == 1, got["stderr"]
    assert lines[0].startswith("error: torchvision cannot be imported (") or lines[0].startswith(
        "error: torchvision is not installed"
    )
    assert got["direct"] == lines[0].removeprefix("error: ")
    assert not (tmp_path / "o").exists()


class _Evil:
    """Unpickling this runs a shell command: the attack check_pickle must stop."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickles_are_checked_before_anything_unpickles_them(tmp_path: Path, protocol: int) -> None:
    from fedkd.data.vision import check_pickle

    good = tmp_path / "good"
    good.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "x": np.arange(3), "labels": [1, 2]},
                                  protocol=protocol))  # fmt: skip
    check_pickle(good)  # numpy arrays only: accepted
    marker = tmp_path / "pwned"
    evil = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    evil.parent.mkdir()
    evil.write_bytes(pickle.dumps({"data": _Evil(marker)}, protocol=protocol))
    with pytest.raises(UserError, match=r"refusing to unpickle .*data_batch_1: it references (posix|os)\.system"):
        load_dataset("cifar10", str(tmp_path))  # before torchvision is even imported
    assert not marker.exists()
    (tmp_path / "trunc").write_bytes(good.read_bytes()[:20])
    with pytest.raises(UserError, match="is corrupted or not a pickle"):
        check_pickle(tmp_path / "trunc")
