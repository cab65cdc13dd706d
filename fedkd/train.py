"""Local training and evaluation: pure functions on modules and tensors.

No Flower here: the ClientApp, the tests and the benchmarks call these directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from (seed, partition-id, round, ...)."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1)
    )


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` → cuda when available, else cpu; otherwise the named device, which must exist.

    Raises :class:`~fedkd.errors.ConfigError` naming ``key`` for a malformed or unavailable device.
    """
    from fedkd.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"{key} = {name!r} is not available: {why} (use auto or cpu)")
    index = int(name[5:]) if name.startswith("cuda:") else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{key} = {name!r} is not available: {torch.cuda.device_count()} CUDA device(s) visible")
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

    @classmethod
    def from_config(cls, cfg: Any, proximal_mu: float = 0.0) -> LocalTrainConfig:
        """The ``clients.*`` keys of a run's config (FedProx's μ comes from the strategy)."""
        return cls(
            epochs=cfg.int("clients.local-epochs"),
            steps=cfg.int("clients.local-steps"),
            batch_size=cfg.int("clients.batch-size"),
            lr=cfg.float("clients.lr"),
            momentum=cfg.float("clients.momentum"),
            weight_decay=cfg.float("clients.weight-decay"),
            proximal_mu=proximal_mu,
        )


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


class Regularizer(Protocol):
    """An extra term of the local loss: ``(model, logits, y, step) -> Tensor`` or ``None``."""

    def __call__(self, model: nn.Module, logits: Tensor, y: Tensor, step: int) -> Tensor | None: ...


def train_local(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: LocalTrainConfig,
    seed: int,
    device: torch.device | None = None,
    regularizer: Regularizer | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> float:
    """Train ``model`` in place on ``(x, y)``; return the mean training loss.

    ``regularizer`` adds a term to each step's loss (e.g. :class:`FedGenRegularizer`).
    ``on_epoch(epoch, mean_loss)`` is called after each full pass (``epochs`` mode only, not
    with ``steps``); it sees the model but must not change it.
    """
    device = device or torch.device("cpu")
    model.to(device).train()
    x, y = x.to(device), y.to(device)  # once: no per-step host-to-device copies
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout etc.
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else None
    total, count = 0.0, 0
    per_epoch = math.ceil(len(x) / cfg.batch_size) if cfg.steps <= 0 else 0
    epoch_total, epoch_count = 0.0, 0
    for step, idx in enumerate(batches(len(x), cfg.batch_size, gen, cfg.steps, cfg.epochs)):
        idx = idx.to(device)
        xb, yb = x[idx], y[idx]
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        if regularizer is not None and (extra := regularizer(model, logits, yb, step)) is not None:
            loss = loss + extra
        if anchor is not None:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
            loss = loss + 0.5 * cfg.proximal_mu * prox
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
        if on_epoch is not None and per_epoch:
            epoch_total += float(loss.detach()) * len(idx)
            epoch_count += len(idx)
            if (step + 1) % per_epoch == 0:
                on_epoch((step + 1) // per_epoch, epoch_total / max(epoch_count, 1))
                epoch_total, epoch_count = 0.0, 0
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


class FedGenRegularizer:
    """FedGen's client-side regularizer (Zhu, Hong, Zhou, ICML 2021), applied in the first
    ``steps`` local steps with a frozen feature generator ``G(z | y)``:

    * ``β · KL(p_local(x) ‖ softmax(head(G(z | y))))`` for the batch's own labels, which pulls
      the local predictions toward what the shared generator implies;
    * ``(B_g / B) · α · CE(head(G(z | ŷ)), ŷ)`` with ``ŷ`` drawn from the global label prior,
      which teaches the local head the other clients' classes.

    The server sends α and β already decayed for the round.
    """

    def __init__(
        self,
        generator: nn.Module,
        alpha: float,
        beta: float,
        steps: int,
        gen_batch_size: int,
        label_prior: Tensor,
        seed: int,
    ) -> None:
        self.generator = generator.eval()
        for p in self.generator.parameters():
            p.requires_grad_(False)
        self.alpha, self.beta, self.steps, self.gen_batch_size = alpha, beta, steps, gen_batch_size
        self.prior = label_prior.double() / label_prior.double().sum()
        self.rng = torch.Generator().manual_seed(seed)
        self.latent_dim = int(getattr(generator, "latent_dim"))  # noqa: B009

    def _features(self, y: Tensor) -> Tensor:
        z = torch.randn(len(y), self.latent_dim, generator=self.rng).to(y.device)
        with torch.no_grad():
            return self.generator(z, y)

    def draw(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One step's generator draws, in RNG order: ``G(z | y)`` for the batch's labels, the
        sampled labels ``ŷ`` and ``G(z | ŷ)`` (the batched engine draws them ahead)."""
        f1 = self._features(y)
        ys = torch.multinomial(self.prior, self.gen_batch_size, replacement=True, generator=self.rng).to(y.device)
        return f1, ys, self._features(ys)

    def __call__(self, model: nn.Module, logits: Tensor, y: Tensor, step: int) -> Tensor | None:
        if step >= self.steps:
            return None
        head: nn.Module = getattr(model, "classifier")  # noqa: B009
        f1, ys, f2 = self.draw(y)
        with torch.no_grad():
            target = F.softmax(head(f1), dim=1)
        latent = self.beta * F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")
        teacher = self.alpha * F.cross_entropy(head(f2), ys)
        return latent + (self.gen_batch_size / len(y)) * teacher
