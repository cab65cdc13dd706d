"""Local training and evaluation: pure functions on modules and tensors.

No Flower here: the ClientApp, the tests and the benchmarks call these directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from (seed, partition-id, round, ...)."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1)
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class LocalTrainConfig:
    """Hyper-parameters of one client's local update.

    ``steps > 0`` runs exactly that many SGD steps (cycling over the data);
    otherwise ``epochs`` full passes. ``proximal_mu > 0`` adds FedProx's
    ``(mu / 2) ||w - w_global||²``.
    """

    epochs: int = 1
    steps: int = 0
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0


def batches(n: int, batch_size: int, generator: torch.Generator, steps: int = 0, epochs: int = 1) -> list[Tensor]:
    """Index batches: ``steps`` batches if ``steps > 0`` else ``epochs`` shuffled passes."""
    out: list[Tensor] = []
    if steps > 0:
        while len(out) < steps:
            perm = torch.randperm(n, generator=generator)
            out.extend(perm[i : i + batch_size] for i in range(0, n, batch_size))
        return out[:steps]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        out.extend(perm[i : i + batch_size] for i in range(0, n, batch_size))
    return out


def train_local(
    model: nn.Module, x: Tensor, y: Tensor, cfg: LocalTrainConfig, seed: int, device: torch.device | None = None
) -> float:
    """Train ``model`` in place on ``(x, y)``; return the mean training loss."""
    device = device or torch.device("cpu")
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout etc.
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else None
    total, count = 0.0, 0
    for idx in batches(len(x), cfg.batch_size, gen, cfg.steps, cfg.epochs):
        xb, yb = x[idx].to(device), y[idx].to(device)
        loss = F.cross_entropy(model(xb), yb)
        if anchor is not None:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
            loss = loss + 0.5 * cfg.proximal_mu * prox
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500, device: torch.device | None = None
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    device = device or torch.device("cpu")
    model.to(device).eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        out = model(xb)
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    n = max(len(x), 1)
    return loss / n, correct / n
