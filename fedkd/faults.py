"""Simulated faulty and malicious clients (``faults.*`` config keys).

Every draw depends on ``(seed, partition id, round)`` only, so a run with faults is as
reproducible as one without, on every engine. The ClientApp applies them:

* ``crash-rate``: the train handler raises (Flower turns it into an error reply);
* ``nan-rate``: the returned weights hold NaN and Inf;
* ``straggler-rate``: the client sleeps ``straggler-delay`` seconds before replying; a
  reply later than ``round-timeout`` is lost;
* ``malicious-fraction``: a fixed set of partitions (drawn once from the seed) is
  malicious. They send ``w_global + scale-attack · (w_local − w_global)`` and, with
  ``label-flip``, train on labels ``y → C − 1 − y``.

The server never trusts a reply: see :mod:`fedkd.validation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedkd.train import derive_seed

_CRASH, _NAN, _STRAGGLE, _MALICIOUS = 1, 2, 3, 4


@dataclass(frozen=True)
class Faults:
    crash_rate: float = 0.0
    nan_rate: float = 0.0
    straggler_rate: float = 0.0
    straggler_delay: float = 5.0
    malicious_fraction: float = 0.0
    scale_attack: float = 1.0
    label_flip: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> Faults:
        return cls(
            crash_rate=cfg.float("faults.crash-rate"),
            nan_rate=cfg.float("faults.nan-rate"),
            straggler_rate=cfg.float("faults.straggler-rate"),
            straggler_delay=cfg.float("faults.straggler-delay"),
            malicious_fraction=cfg.float("faults.malicious-fraction"),
            scale_attack=cfg.float("faults.scale-attack"),
            label_flip=cfg.bool("faults.label-flip"),
        )

    @property
    def active(self) -> bool:
        return self != Faults(straggler_delay=self.straggler_delay)


def _draw(seed: int, pid: int, server_round: int, what: int) -> float:
    return float(np.random.default_rng(derive_seed(seed, 4201, what, pid, server_round)).random())


def malicious_partitions(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """The fixed set of ``round(fraction · num_clients)`` malicious partition ids."""
    k = int(round(fraction * num_clients))
    rng = np.random.default_rng(derive_seed(seed, 4201, _MALICIOUS))
    return frozenset(int(i) for i in rng.permutation(num_clients)[:k])


@dataclass(frozen=True)
class ClientFaults:
    """What happens to one client in one round."""

    crash: bool = False
    nan: bool = False
    straggle: bool = False
    malicious: bool = False


def draw(faults: Faults, seed: int, pid: int, server_round: int, num_clients: int) -> ClientFaults:
    """The faults of partition ``pid`` in ``server_round`` (deterministic)."""
    return ClientFaults(
        crash=faults.crash_rate > 0 and _draw(seed, pid, server_round, _CRASH) < faults.crash_rate,
        nan=faults.nan_rate > 0 and _draw(seed, pid, server_round, _NAN) < faults.nan_rate,
        straggle=faults.straggler_rate > 0 and _draw(seed, pid, server_round, _STRAGGLE) < faults.straggler_rate,
        malicious=faults.malicious_fraction > 0
        and pid in malicious_partitions(num_clients, faults.malicious_fraction, seed),
    )


def flip_labels(y: Tensor, num_classes: int, classes: tuple[int, ...] = ()) -> Tensor:
    """The label-flip poisoning: ``y → C − 1 − y``; within ``classes`` (a class-continual task's:
    the i-th of k classes → the (k − 1 − i)-th) when given."""
    if classes:
        cls = torch.as_tensor(classes, device=y.device)
        where = (y.view(-1, 1) == cls.view(1, -1)).float().argmax(1)
        return cls.flip(0)[where]
    return (num_classes - 1) - y


@torch.no_grad()
def scale_update(model: nn.Module, start: dict[str, Tensor], factor: float) -> None:
    """``w ← w_start + factor · (w − w_start)`` for every floating tensor of the state dict."""
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            v.copy_(start[k] + factor * (v - start[k]))


@torch.no_grad()
def poison_nan(model: nn.Module) -> None:
    """Put NaN and Inf into the first floating parameter (a diverged or corrupted update)."""
    for p in model.parameters():
        if p.is_floating_point() and p.numel() >= 2:
            p.view(-1)[0] = float("nan")
            p.view(-1)[1] = float("inf")
            return
