"""Checkpoints of a federated run: atomic, checksummed, loaded without unpickling.

After every ``checkpoint.every`` rounds the ServerApp writes ``checkpoint-<round>.pt`` into
the run directory. It holds everything needed to continue: the server state (global and
group models), every strategy's state (base-strategy moments, generators, their
optimizers, memory buffers), the RNG states and the metric rows so far.
``fedkd run --resume RUN_DIR`` continues from the newest checkpoint that loads.

Safety and integrity:

* a file is written to a temp name, fsynced, then renamed: a crash leaves either the old
  or the new checkpoint, never half of one;
* the first line is the SHA-256 of the payload: a truncated or corrupted file is detected,
  reported, and the previous checkpoint is used (``checkpoint.keep`` are kept);
* the payload is read with ``torch.load(weights_only=True)``: tensors, numbers, strings,
  lists, tuples and dicts only. Nothing is ever unpickled.

Flower's ArrayRecords and numpy arrays are stored as tensors (:func:`to_tree` /
:func:`from_tree`), so they round-trip bit for bit.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedkd.errors import UserError

log = logging.getLogger(__name__)

VERSION = 1
PATTERN = re.compile(r"^checkpoint-(\d+)\.pt$")
_KIND = "__fedkd_kind__"


# --------------------------------------------------------------------------- safe trees
def to_tree(obj: Any) -> Any:
    """Turn ArrayRecords and numpy arrays (nested in dicts, lists, tuples) into tensors."""
    if isinstance(obj, ArrayRecord):
        return {_KIND: "arrayrecord", "items": {k: to_tree(v.numpy()) for k, v in obj.items()}}
    if isinstance(obj, np.ndarray):
        return {_KIND: "ndarray", "t": torch.from_numpy(np.array(obj, copy=True))}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_tree(v) for v in obj)
    return obj


def from_tree(obj: Any) -> Any:
    """Inverse of :func:`to_tree`."""
    if isinstance(obj, dict):
        kind = obj.get(_KIND)
        if kind == "arrayrecord":
            return ArrayRecord({k: Array(from_tree(v)) for k, v in obj["items"].items()})
        if kind == "ndarray":
            return obj["t"].numpy()
        return {k: from_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(from_tree(v) for v in obj)
    return obj


_STATE_TYPES = (ArrayRecord, np.ndarray)


def _is_state(v: Any) -> bool:
    if isinstance(v, _STATE_TYPES):
        return True
    if isinstance(v, dict) and v:
        return all(isinstance(x, _STATE_TYPES) for x in v.values())
    if isinstance(v, list) and v:
        return all(isinstance(x, _STATE_TYPES) for x in v)
    return False


def object_arrays(obj: Any) -> dict[str, Any]:
    """The array-valued attributes of a (Flower) strategy: its learned state.

    Flower's strategies keep their state in attributes such as ``current_arrays``,
    ``momentum_vector`` (FedAvgM) or ``m_t``/``v_t`` (FedAdam, FedYogi, FedAdagrad):
    ArrayRecords, arrays, or dicts and lists of arrays. Hyper-parameters are rebuilt from
    the config, so only these are saved; None-valued ones are saved as None.
    """
    out: dict[str, Any] = {}
    for k, v in vars(obj).items():
        if v is None or _is_state(v):
            out[k] = to_tree(v)
    return out


def load_object_arrays(obj: Any, state: Mapping[str, Any]) -> None:
    for k, v in state.items():
        setattr(obj, k, from_tree(v))


# --------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np.array(np_state[1])), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])


# --------------------------------------------------------------------------- files
def path_for(run_dir: Path, server_round: int) -> Path:
    return run_dir / f"checkpoint-{server_round:05d}.pt"


def save(run_dir: Path, server_round: int, payload: dict[str, Any], keep: int = 2) -> Path:
    """Write ``checkpoint-<round>.pt`` atomically; keep the newest ``keep``."""
    buf = io.BytesIO()
    torch.save({"version": VERSION, "round": server_round, **payload}, buf)
    data = buf.getvalue()
    path = path_for(run_dir, server_round)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(hashlib.sha256(data).hexdigest().encode() + b"\n")
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in checkpoints(run_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints of a finished run (0: none)."""
    for old in checkpoints(run_dir)[keep:]:
        old.unlink(missing_ok=True)


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files of ``run_dir``, newest round first."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


class CorruptCheckpoint(Exception):
    pass


def read(path: Path) -> dict[str, Any]:
    """Load one checkpoint; :class:`CorruptCheckpoint` if it is truncated or altered."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CorruptCheckpoint(f"cannot read it: {e.strerror}") from None
    head, sep, data = raw.partition(b"\n")
    if not sep or len(head) != 64:
        raise CorruptCheckpoint("no checksum header")
    if hashlib.sha256(data).hexdigest().encode() != head:
        raise CorruptCheckpoint("checksum mismatch (truncated or altered)")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to load is a corrupt file
        raise CorruptCheckpoint(f"cannot load it: {type(e).__name__}") from None
    if not isinstance(payload, dict) or payload.get("version") != VERSION:
        raise CorruptCheckpoint("not a fedkd checkpoint of this version")
    return payload


@dataclass(frozen=True)
class Resume:
    """The newest good checkpoint of a run directory."""

    path: Path
    payload: dict[str, Any]

    @property
    def round(self) -> int:
        return int(self.payload["round"])


def latest(run_dir: Path) -> Resume:
    """The newest checkpoint that loads; corrupt ones are reported and skipped."""
    files = checkpoints(run_dir)
    if not files:
        raise UserError(f"{run_dir} has no checkpoint to resume from (was checkpoint.every = 0?)")
    for p in files:
        try:
            return Resume(p, read(p))
        except CorruptCheckpoint as e:
            log.warning("checkpoint %s is corrupt (%s); trying the previous one", p.name, e)
            print(f"warning: checkpoint {p} is corrupt ({e}); using the previous one", flush=True)
    raise UserError(f"{run_dir}: every checkpoint is corrupt ({', '.join(p.name for p in files)})")
