"""State a client keeps between the rounds it takes part in (SCAFFOLD's control variate,
FedDyn's linear term, MOON's previous local model): one mechanism for every engine.

A client's state is a ``{name: tensor}`` dict, saved after its local update of round ``r``
and loaded at its next round as *the newest state saved before that round*. Two stores:

* :class:`DiskState` (used whenever the run has a directory, i.e. every ``fedkd run``):
  ``<state-dir>/<partition-id>/round-<r>.pt``, written atomically. The server sends
  ``RUN_DIR/client-state`` in each train message; a SuperNode's node config
  ``state-dir`` overrides it (a SuperNode on another machine keeps its state on its own
  disk). Nothing stays in memory, so thousands of clients cost disk, not RAM.
* :class:`ContextState`: Flower's ``Context.state`` of the node, for runs without a
  directory (in-process runs of the API and tests); it lives as long as the process.

Why "newest before the round" makes ``--resume`` exact: a run killed after its checkpoint of
round ``R`` may have saved states of rounds ``> R``. The resumed run redoes round ``R + 1``
and loads the newest state saved *before* ``R + 1``, i.e. the one the uninterrupted run
had; saving round ``r`` deletes every state of a later round (left by the killed run).
Saving also prunes: a resume may start from any of the ``checkpoint.keep`` checkpoints,
``checkpoint.every`` rounds apart, so each client keeps its newest
``checkpoint.every × checkpoint.keep + 1`` states (one without checkpoints), which always
include the one any of them needs. The server deletes the directory when the run finishes.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from fedkd.errors import UserError

State = dict[str, torch.Tensor]
DIRNAME = "client-state"  # under the run directory
_FILE = re.compile(r"^round-(\d+)\.pt$")


class ClientState(Protocol):
    """Where one client's state lives."""

    def load(self, server_round: int) -> tuple[int, State | None]:
        """``(r, state)``: the newest state saved in a round ``r < server_round``; ``(0, None)`` if none."""
        ...

    def save(self, server_round: int, state: State) -> None:
        """Keep ``state`` as the state after ``server_round``."""
        ...


class DiskState:
    """One client's states as files ``round-<r>.pt`` in ``root``; keeps the newest ``keep``."""

    def __init__(self, root: Path, keep: int = 1) -> None:
        self.root, self.keep = Path(root), max(1, keep)

    def _files(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _FILE.match(p.name))]
        return sorted(found)

    def load(self, server_round: int) -> tuple[int, State | None]:
        for r, path in reversed(self._files()):
            if r < server_round:
                state = torch.load(path, map_location="cpu", weights_only=True)
                return r, {k: v for k, v in state.items()}
        return 0, None

    def save(self, server_round: int, state: State) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
            path = self.root / f"round-{server_round}.pt"
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(buf.getvalue())
            os.replace(tmp, path)
        except OSError as e:
            raise UserError(f"cannot write client state under {self.root}: {e.strerror or e}") from None
        files = self._files()
        for r, p in files:
            if r > server_round:  # left by a run that was killed after its last checkpoint
                p.unlink(missing_ok=True)
        kept = [(r, p) for r, p in files if r <= server_round]
        for _, p in kept[: -self.keep]:
            p.unlink(missing_ok=True)


class ContextState:
    """One client's state in Flower's ``Context.state`` (newest only; no resume without a run directory)."""

    KEY, ROUND = "fedkd.client-state", "fedkd.client-state-round"

    def __init__(self, context: Context) -> None:
        self.context = context

    def load(self, server_round: int) -> tuple[int, State | None]:
        rec = self.context.state.array_records.get(self.KEY)
        meta = self.context.state.config_records.get(self.ROUND)
        if rec is None or meta is None or int(meta["round"]) >= server_round:  # type: ignore[arg-type]
            return 0, None
        return int(meta["round"]), {k: torch.from_numpy(np.array(v.numpy())) for k, v in rec.items()}  # type: ignore[arg-type]

    def save(self, server_round: int, state: State) -> None:
        self.context.state[self.KEY] = ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in state.items()})
        self.context.state[self.ROUND] = ConfigRecord({"round": server_round})


def keep_for(every: int, keep: int) -> int:
    """States a client keeps so that a resume from any kept checkpoint finds the one it needs."""
    return every * keep + 1 if every > 0 else 1


def store_for(context: Context, state_dir: str, pid: int, every: int, keep: int) -> ClientState:
    """The node config's ``state-dir``, else the server's ``state_dir``, else ``Context.state``."""
    root = str(context.node_config.get("state-dir", "") or state_dir)
    if not root:
        return ContextState(context)
    return DiskState(Path(root) / str(pid), keep_for(every, keep))
