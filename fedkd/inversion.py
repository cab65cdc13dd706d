"""Model-inversion synthesizers: each synthesis call optimizes one new batch and keeps it in a pool.

The continual :class:`~fedkd.synthesis.Synthesizer` trains one generator for the whole run and
serves fresh samples to every student step. The synthesizers here follow the other family of
data-free KD (DeepInversion, CMI, Fast-DFKD, in zju-vipa's Fast-Datafree): every call builds a
*new* batch by a few steps of optimization against the teacher, stores it in a **pool**, and the
student trains on batches drawn from the whole pool (every batch synthesized so far, augmented).

* ``fast`` — **Fast-DFKD** (Fang et al., "Up to 100× Faster Data-free Knowledge Distillation",
  AAAI 2022; official ``datafree/synthesis/fast_meta.py``). A *meta* generator is the shared
  initialization: each call clones it, optimizes the clone and a fresh noise batch ``z`` jointly
  (Adam, betas (0.5, 0.999); ``lr`` for the clone, ``lr_z`` for ``z``) for ``iterations`` steps on
  ``bn · L_bn + oh · CE(t(x̃), y) + adv · L_adv`` (``x̃`` the augmented batch, ``y`` random labels),
  keeps the lowest-loss batch, and updates the meta generator by first-order MAML: the clone's
  gradients, summed over the iterations, are one Adam step of the meta generator at
  ``lr · iterations``. ``L_bn`` is DeepInversion's statistics loss with Fast's momentum: the batch
  statistics are mixed with an exponential average of earlier calls' (``bn_momentum``).
  ``L_adv = −mean_b 1[s(x̃)_b agrees with t(x̃)_b] · KL(t ‖ s)_b`` (the preset ``fast``'s
  ``kl-masked`` metric), active after the warm-up.

* ``cmi`` — **CMI**, Contrastive Model Inversion (Fang et al., IJCAI 2021; official
  ``datafree/synthesis/contrastive.py``). Each call re-initializes the generator (N(0, 0.02)
  weights) and optimizes it with a fresh ``z`` (Adam, betas (0.5, 0.999)) for ``iterations``
  steps on ``bn · L_bn + oh · CE + adv · L_adv + cr · L_cr`` over a *global* view (random crop)
  of the batch. ``L_cr`` is an InfoNCE loss that makes the batch unlike every batch before it:
  the teacher's per-channel instance means at the input of every BatchNorm layer, of a *local*
  view (random resized crop, scale 0.25–1) and of the global view, are projected by an MLP head
  (trained alongside, L2-normalized); each local projection must pick its own global one
  (temperature ``cr_temperature``) among the batch and ``negatives`` features drawn from a
  memory bank of the kept batches of earlier calls.

A synthesizer here has the continual one's interface (``step``, ``source``, ``sample``, ``probe``,
``check``, ``state_dict``), so ``fedkd dfkd`` runs either through one loop.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedkd.distill import BatchSource
from fedkd.errors import ConfigError
from fedkd.synthesis import (
    SYNTHESIZERS,
    BNStatistics,
    ForwardHooks,
    Objective,
    bn_layers,
    check_choice,
    eval_mode,
    oh_loss,
)

FAST_TERMS = ("bn", "oh", "adv")
META_RULES = ("fomaml", "off")


class MomentumBNStatistics(BNStatistics):
    """DeepInversion's BN loss against a momentum mix of batch statistics (Fast-DFKD's ``bn_mmt``).

    With ``μ, σ²`` this batch's statistics at a BN layer and ``μ̄, σ̄²`` the running average of
    the batches of earlier calls, the layer's term is
    ``‖σ²_run − ((1 − m) σ² + m σ̄²)‖₂ + ‖μ_run − ((1 − m) μ + m μ̄)‖₂`` (plain DeepInversion
    until an average exists). :meth:`update` folds the last batch's statistics into the average.
    """

    def __init__(self, model: nn.Module, momentum: float, average: list[tuple[Tensor, Tensor]] | None) -> None:
        super().__init__(model)
        self.momentum = momentum
        self.average = average
        self.last: list[tuple[Tensor, Tensor]] = []

    def reset(self) -> None:
        super().reset()
        self.last = []

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        assert module.running_mean is not None and module.running_var is not None
        x = inputs[0]
        dims = [d for d in range(x.ndim) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        i = len(self.last)
        self.last.append((mean.detach(), var.detach()))
        if self.average is not None and self.momentum > 0:
            m_mean, m_var = self.average[i]
            mean = (1 - self.momentum) * mean + self.momentum * m_mean
            var = (1 - self.momentum) * var + self.momentum * m_var
        self.terms.append(
            torch.linalg.vector_norm(module.running_var - var) + torch.linalg.vector_norm(module.running_mean - mean)
        )


def random_crop_flip(x: Tensor, padding: int, flip: bool, rng: torch.Generator) -> Tensor:
    """Per-sample random crop after zero padding, and an optional horizontal flip (Fast-DFKD's
    augmentation, kornia's ``RandomCrop(padding)`` + ``RandomHorizontalFlip``). Differentiable."""
    if padding <= 0 and not flip:
        return x
    b, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=rng).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=rng).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
        x = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mirror = (torch.rand(b, generator=rng) < 0.5).to(x.device)
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


def random_resized_crop(x: Tensor, scale: tuple[float, float], flip: bool, rng: torch.Generator) -> Tensor:
    """Per-sample random resized crop (kornia's ``RandomResizedCrop(scale, ratio=(3/4, 4/3))``),
    resampled bilinearly to the input size, and an optional horizontal flip. Differentiable."""
    b = x.shape[0]
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=rng)
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=rng)
    ratio = log_ratio.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # fractions of the width and height
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=rng) * 2 - 1) * (1 - w)  # centres, in [-1, 1] coordinates
    cy = (torch.rand(b, generator=rng) * 2 - 1) * (1 - h)
    if flip:
        w = torch.where(torch.rand(b, generator=rng) < 0.5, -w, w)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def masked_kl_adv(s: Tensor, t: Tensor) -> Tensor:
    """``−mean_b 1[argmax s_b = argmax t_b] · KL(softmax t_b ‖ softmax s_b)`` (Fast-DFKD, CMI)."""
    agree = (s.argmax(1) == t.argmax(1)).float()
    return -(F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="none").sum(1) * agree).mean()


class PooledSynthesizer:
    """What the pooled synthesizers share: the pool of kept batches, the student's batches drawn
    from it (augmented), samples and probes for plots and the collapse statistics."""

    generator: nn.Module
    batch_size: int
    pool_size: int
    crop_padding: int
    flip: bool
    conditional = False
    _rng: torch.Generator
    _pool: list[Tensor]

    def _setup(
        self,
        name: str,
        terms: tuple[str, ...],
        generator: nn.Module,
        objective: Objective,
        batch_size: int,
        lr: float,
        seed: int,
        warmup: int,
        iterations: int,
        pool_size: int,
        crop_padding: int,
        flip: bool,
        checks: tuple[tuple[bool, str], ...] = (),
    ) -> None:
        """The checks and state every pooled synthesizer shares; ``checks`` are its own
        ``(condition, message)`` pairs, checked after the shared ones."""
        extra = sorted(set(objective.active) - set(terms))
        if extra:
            raise ConfigError(f"synthesizer {name!r} takes the terms {', '.join(terms)}; got {', '.join(extra)}")
        if getattr(generator, "conditional", False):
            raise ConfigError(f"synthesizer {name!r} needs an unconditional generator (its labels go to the teacher only)")
        key = f"synthesizer.{name}"
        shared = (
            (iterations >= 1, f"{key}.iterations must be ≥ 1, got {iterations}"),
            *checks,
            (pool_size >= 0, f"{key}.pool-size must be ≥ 0, got {pool_size}"),
            (crop_padding >= 0, f"{key}.crop-padding must be ≥ 0, got {crop_padding}"),
            (batch_size >= 1, f"synthesis batch size must be ≥ 1, got {batch_size}"),
            (lr > 0, f"generator learning rate must be > 0, got {lr}"),
        )
        for ok, message in shared:
            if not ok:
                raise ConfigError(message)
        self.generator, self.objective, self.batch_size, self.lr = generator, objective, batch_size, lr
        self.warmup, self.iterations = warmup, iterations
        self.pool_size, self.crop_padding, self.flip = pool_size, crop_padding, flip
        self.num_classes: int = getattr(generator, "num_classes")  # noqa: B009
        self.latent_dim: int = getattr(generator, "latent_dim")  # noqa: B009
        self._rng = torch.Generator().manual_seed(seed)
        self._pool = []
        self.calls = 0

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def __len__(self) -> int:
        """Samples in the pool."""
        return sum(len(b) for b in self._pool)

    def augment(self, x: Tensor) -> Tensor:
        return random_crop_flip(x, self.crop_padding, self.flip, self._rng)

    def _keep(self, batch: Tensor) -> None:
        self._pool.append(batch.detach().cpu())
        if self.pool_size and len(self._pool) > self.pool_size:
            self._pool = self._pool[-self.pool_size :]

    def _draw(self, n: int) -> Tensor:
        pool = torch.cat(self._pool) if len(self._pool) > 1 else self._pool[0]
        idx = torch.randperm(len(pool), generator=self._rng)[: min(n, len(pool))]
        return pool[idx].to(self.device)

    def source(self, mode: str = "train") -> BatchSource:
        """Student batches: ``batch_size`` pooled samples drawn at random, augmented (no labels)."""

        def draw() -> tuple[Tensor, Tensor | None]:
            if not self._pool:
                raise RuntimeError("the pool is empty: call step() first")
            with torch.no_grad():
                return self.augment(self._draw(self.batch_size)), None

        return draw

    @torch.no_grad()
    def sample(self, n: int | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
        """The newest ``n`` pooled samples (no labels; ``z`` is empty)."""
        n = n or self.batch_size
        recent = torch.cat(self._pool[::-1])[:n] if self._pool else torch.zeros(0)
        return recent.to(self.device), None, torch.zeros(0)

    @torch.no_grad()
    def probe(self, z: Tensor, y: Tensor | None) -> Tensor:
        """What the student learns from now: the newest pooled samples (the probe's noise is unused)."""
        return self.sample(len(z))[0]

    def check(self, teacher: nn.Module, student: nn.Module | None = None) -> None:
        active = getattr(self, "objective").active  # noqa: B009
        if "bn" in active and not bn_layers(teacher):
            raise ConfigError(
                "generator loss term 'bn' needs a teacher with BatchNorm layers (e.g. resnet8, mobilenetv2)"
            )
        if "adv" in active and student is None:
            raise ConfigError("generator loss term 'adv' needs a student")


@SYNTHESIZERS.register("fast")
class FastSynthesizer(PooledSynthesizer):
    """Fast-DFKD: a meta-learned generator initialization, a few inversion steps per batch, a pool.

    Parameters
    ----------
    generator : nn.Module
        The meta generator (a registered input-space generator, unconditional).
    objective : Objective
        Weights of ``bn``, ``oh`` and ``adv`` (preset ``fast``); other terms are refused.
    batch_size : int
        Samples per synthesized batch and per student batch drawn from the pool.
    lr : float
        Adam learning rate of the cloned generator (``lr_g``); the meta step uses ``lr · iterations``.
    seed : int
        Seed of the noise, labels, augmentation and pool sampling.
    warmup : int
        Synthesis calls without the adversarial term (the student is not trained meanwhile).
    iterations : int
        Optimization steps per synthesized batch (``g_steps``; the paper's Fast-2/5/10).
    lr_z : float
        Adam learning rate of the noise batch ``z``.
    bn_momentum : float
        Momentum of the BN statistics average (``bn_mmt``; 0: plain DeepInversion).
    pool_size : int
        Batches kept in the pool, oldest dropped first; 0 keeps every batch (the official code).
    crop_padding : int
        Padding of the random crop applied before the teacher, in synthesis and to pool batches.
    flip : bool
        Random horizontal flips too (the official CIFAR setting; off for digits).
    meta : {"fomaml", "off"}
        ``off`` never updates the initialization (every batch starts from the same generator).
    """

    def __init__(
        self,
        generator: nn.Module,
        objective: Objective,
        batch_size: int,
        lr: float,
        seed: int,
        warmup: int,
        iterations: int = 2,
        lr_z: float = 0.015,
        bn_momentum: float = 0.9,
        pool_size: int = 0,
        crop_padding: int = 4,
        flip: bool = False,
        meta: str = "fomaml",
    ) -> None:
        self._setup("fast", FAST_TERMS, generator, objective, batch_size, lr, seed, warmup, iterations, pool_size,
                    crop_padding, flip, (
                        (lr_z > 0 and math.isfinite(lr_z), f"synthesizer.fast.lr-z must be > 0, got {lr_z}"),
                        (0 <= bn_momentum < 1, f"synthesizer.fast.bn-momentum must be in [0, 1), got {bn_momentum}"),
                    ))  # fmt: skip
        check_choice("synthesizer.fast.meta", meta, META_RULES)
        self.lr_z, self.bn_momentum, self.meta = lr_z, bn_momentum, meta
        self.meta_optimizer = torch.optim.Adam(generator.parameters(), lr=lr * iterations, betas=(0.5, 0.999))
        self._bn_average: list[tuple[Tensor, Tensor]] | None = None

    def step(self, teacher: nn.Module, student: nn.Module | None = None) -> dict[str, float]:
        """One synthesis call: optimize a new batch from the meta generator, pool it, meta-update.

        Returns ``g_loss`` and ``g_<term>`` of the kept (lowest-loss) iteration and ``pool``.
        """
        self.calls += 1
        adversarial = student is not None and self.calls > self.warmup and "adv" in self.objective.active
        w = self.objective.active
        dev = self.device
        z = torch.randn(self.batch_size, self.latent_dim, generator=self._rng).to(dev).requires_grad_(True)
        y = torch.randint(self.num_classes, (self.batch_size,), generator=self._rng).to(dev)
        fast = copy.deepcopy(self.generator).train()
        groups: list[dict[str, Any]] = [{"params": list(fast.parameters())}, {"params": [z], "lr": self.lr_z}]
        opt = torch.optim.Adam(groups, lr=self.lr, betas=(0.5, 0.999))
        if self.meta == "fomaml":
            self.meta_optimizer.zero_grad(set_to_none=True)
        best: tuple[float, Tensor, dict[str, float]] | None = None
        stats_bn: MomentumBNStatistics | None = None
        modes = [m for m in (teacher, student) if m is not None]
        with eval_mode(*modes):
            for _ in range(self.iterations):
                x = fast(z)
                xa = self.augment(x)
                terms: dict[str, Tensor] = {}
                if "bn" in w:
                    stats_bn = MomentumBNStatistics(teacher, self.bn_momentum, self._bn_average)
                    with stats_bn:
                        t = teacher(xa)
                    terms["bn"] = stats_bn.loss
                else:
                    t = teacher(xa)
                if "oh" in w:
                    terms["oh"] = oh_loss(t, y)
                if adversarial:
                    assert student is not None
                    terms["adv"] = masked_kl_adv(student(xa), t)
                total = sum((w[k] * v for k, v in terms.items()), torch.zeros((), device=dev))
                value = float(total.detach())
                if best is None or value < best[0]:
                    best = (value, x.detach().clone(), {k: float(v.detach()) for k, v in terms.items()})
                opt.zero_grad(set_to_none=True)
                total.backward()
                if self.meta == "fomaml":  # first-order MAML: the clone's gradients, summed over iterations
                    for p, q in zip(self.generator.parameters(), fast.parameters(), strict=True):
                        if q.grad is not None:
                            p.grad = q.grad.detach().clone() if p.grad is None else p.grad + q.grad.detach()
                opt.step()
        if self.meta == "fomaml":
            self.meta_optimizer.step()
            self.meta_optimizer.zero_grad(set_to_none=True)
        if stats_bn is not None and self.bn_momentum > 0:
            last = stats_bn.last
            if self._bn_average is None:
                self._bn_average = [(m.clone(), v.clone()) for m, v in last]
            else:
                r = self.bn_momentum
                self._bn_average = [
                    (r * am + (1 - r) * m, r * av + (1 - r) * v)
                    for (am, av), (m, v) in zip(self._bn_average, last, strict=True)
                ]
        assert best is not None
        self._keep(best[1])
        out = {"g_loss": best[0], **{f"g_{k}": v for k, v in best[2].items()}, "pool": float(len(self))}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "rng": self._rng.get_state(),
            "pool": list(self._pool),
            "bn_average": [] if self._bn_average is None else [list(mv) for mv in self._bn_average],
            "calls": self.calls,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self._rng.set_state(state["rng"])
        self._pool = list(state["pool"])
        avg = state["bn_average"]
        self._bn_average = [(m, v) for m, v in avg] if avg else None
        self.calls = int(state["calls"])


CMI_TERMS = ("bn", "oh", "adv")


class InstanceMeans(ForwardHooks):
    """Forward hooks collecting the per-channel spatial mean of the input of every BatchNorm2d
    layer of ``model`` (CMI's ``InstanceMeanHook``), one ``(B, Σ channels)`` matrix per forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
        self.means: list[Tensor] = []

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.means.append(inputs[0].mean((2, 3)))

    def reset(self) -> None:
        self.means = []

    def take(self) -> Tensor:
        """The features of the forward since the last call."""
        out, self.means = torch.cat(self.means, 1), []
        return out


def reinit_generator(generator: nn.Module, rng: torch.Generator) -> None:
    """CMI's ``reset_model``: conv / linear weights ~ N(0, 0.02), biases 0; BN weights ~ N(1, 0.02), biases 0."""
    with torch.no_grad():
        for m in generator.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=rng) * 0.02)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.copy_(1.0 + torch.randn(m.weight.shape, generator=rng) * 0.02)
                m.bias.zero_()


@SYNTHESIZERS.register("cmi")
class CMISynthesizer(PooledSynthesizer):
    """CMI: contrastive model inversion; every call inverts a new batch from a re-initialized generator.

    Parameters
    ----------
    generator, objective, batch_size, lr, seed, warmup
        As :class:`FastSynthesizer` (``lr`` is the Adam rate of the generator, ``z`` and the head).
    iterations : int
        Optimization steps per batch (CMI: 200; its tuned fast variant: 5).
    contrastive : float
        Weight ``cr`` of the contrastive loss (0: plain DeepInversion with a generator).
    cr_temperature : float
        Temperature of the contrastive logits.
    bank_size : int
        Feature pairs kept in the memory bank (FIFO).
    negatives : int
        Bank features drawn per step as negatives.
    head_dim : int
        Output width of the projection head.
    local_scale : float
        Smallest area fraction of the local view's random resized crop.
    pool_size, crop_padding, flip
        As :class:`FastSynthesizer`.
    """

    def __init__(
        self,
        generator: nn.Module,
        objective: Objective,
        batch_size: int,
        lr: float,
        seed: int,
        warmup: int,
        iterations: int = 200,
        contrastive: float = 0.8,
        cr_temperature: float = 0.2,
        bank_size: int = 40960,
        negatives: int = 4096,
        head_dim: int = 256,
        local_scale: float = 0.25,
        pool_size: int = 0,
        crop_padding: int = 4,
        flip: bool = False,
    ) -> None:
        self._setup("cmi", CMI_TERMS, generator, objective, batch_size, lr, seed, warmup, iterations, pool_size,
                    crop_padding, flip, (
                        (contrastive >= 0, f"synthesizer.cmi.contrastive must be ≥ 0, got {contrastive}"),
                        (cr_temperature > 0, f"synthesizer.cmi.cr-temperature must be > 0, got {cr_temperature}"),
                        (bank_size >= 1, f"synthesizer.cmi.bank-size must be ≥ 1, got {bank_size}"),
                        (negatives >= 1, f"synthesizer.cmi.negatives must be ≥ 1, got {negatives}"),
                        (head_dim >= 1, f"synthesizer.cmi.head-dim must be ≥ 1, got {head_dim}"),
                        (0 < local_scale <= 1, f"synthesizer.cmi.local-scale must be in (0, 1], got {local_scale}"),
                    ))  # fmt: skip
        self.contrastive, self.cr_temperature, self.bank_size = contrastive, cr_temperature, bank_size
        self.negatives, self.head_dim, self.local_scale = negatives, head_dim, local_scale
        self._bank: Tensor | None = None  # (n, 2·D): local ⊕ global features of kept batches
        self.head: nn.Module | None = None  # built on the first call, when the feature width is known
        self.head_optimizer: torch.optim.Optimizer | None = None
        self._pending_head: dict[str, Any] | None = None

    def _build_head(self, dim: int) -> None:
        torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=self._rng)))
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, self.head_dim)).to(self.device)
        self.head_optimizer = torch.optim.Adam(self.head.parameters(), lr=self.lr)
        if self._pending_head is not None:  # restored from a checkpoint before the first call
            self.head.load_state_dict(self._pending_head["head"])
            self.head_optimizer.load_state_dict(self._pending_head["optimizer"])
            self._pending_head = None

    def contrastive_loss(self, local: Tensor, glob: Tensor) -> Tensor:
        """InfoNCE of the local views against the global ones, the bank's pairs as extra rows and columns."""
        assert self.head is not None
        n = len(local)
        cached_l = cached_g = local[:0]
        if self._bank is not None:
            idx = torch.randperm(len(self._bank), generator=self._rng)[: self.negatives]
            cached_l, cached_g = self._bank[idx].to(local.device).chunk(2, dim=1)
        proj = F.normalize(self.head(torch.cat([local, cached_l, glob, cached_g])), dim=1)
        p_local, p_global = proj.chunk(2, dim=0)
        logits = p_local @ p_global.detach().T / self.cr_temperature
        per = F.cross_entropy(logits, torch.arange(len(logits), device=logits.device), reduction="none")
        return per[:n].mean() + per[n:].mean() if len(per) > n else per.mean()

    def step(self, teacher: nn.Module, student: nn.Module | None = None) -> dict[str, float]:
        """One synthesis call: invert a new batch from a re-initialized generator, pool it, bank its features."""
        self.calls += 1
        adversarial = student is not None and self.calls > self.warmup and "adv" in self.objective.active
        w = self.objective.active
        dev = self.device
        reinit_generator(self.generator, self._rng)
        self.generator.train()
        z = torch.randn(self.batch_size, self.latent_dim, generator=self._rng).to(dev).requires_grad_(True)
        y = torch.randint(self.num_classes, (self.batch_size,), generator=self._rng).sort().values.to(dev)
        groups: list[dict[str, Any]] = [{"params": list(self.generator.parameters())}, {"params": [z]}]
        opt = torch.optim.Adam(groups, lr=self.lr, betas=(0.5, 0.999))
        best: tuple[float, Tensor, dict[str, float], Tensor | None] | None = None
        means = InstanceMeans(teacher)
        modes = [m for m in (teacher, student) if m is not None]
        with eval_mode(*modes), means:
            for _ in range(self.iterations):
                x = self.generator(z)
                glob_view = self.augment(x)
                terms: dict[str, Tensor] = {}
                if "bn" in w:
                    with BNStatistics(teacher) as stats:
                        t = teacher(glob_view)
                    terms["bn"] = stats.loss
                else:
                    t = teacher(glob_view)
                glob = means.take()
                if "oh" in w:
                    terms["oh"] = oh_loss(t, y)
                if adversarial:
                    assert student is not None
                    terms["adv"] = masked_kl_adv(student(glob_view), t)
                feats: Tensor | None = None
                total = sum((w[k] * v for k, v in terms.items()), torch.zeros((), device=dev))
                if self.contrastive > 0:
                    teacher(random_resized_crop(x, (self.local_scale, 1.0), self.flip, self._rng))
                    local = means.take()
                    if self.head is None:
                        self._build_head(local.shape[1])
                    terms["cr"] = self.contrastive_loss(local, glob)
                    total = total + self.contrastive * terms["cr"]
                    feats = torch.cat([local, glob], 1).detach()
                value = float(total.detach())
                if best is None or value < best[0]:
                    best = (value, x.detach().clone(), {k: float(v.detach()) for k, v in terms.items()}, feats)
                opt.zero_grad(set_to_none=True)
                if self.head_optimizer is not None:
                    self.head_optimizer.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                if self.head_optimizer is not None and self.contrastive > 0:
                    self.head_optimizer.step()
        assert best is not None
        self._keep(best[1])
        if best[3] is not None:
            kept = best[3].cpu()
            self._bank = kept if self._bank is None else torch.cat([self._bank, kept])[-self.bank_size :]
        return {"g_loss": best[0], **{f"g_{k}": v for k, v in best[2].items()}, "pool": float(len(self))}

    def state_dict(self) -> dict[str, Any]:
        head = None
        if self.head is not None and self.head_optimizer is not None:
            head = {"head": self.head.state_dict(), "optimizer": self.head_optimizer.state_dict()}
        return {"generator": self.generator.state_dict(), "rng": self._rng.get_state(), "pool": list(self._pool),
                "bank": self._bank, "head": head, "calls": self.calls}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self._rng.set_state(state["rng"])
        self._pool = list(state["pool"])
        self._bank = state["bank"]
        self.calls = int(state["calls"])
        if state["head"] is not None:
            if self.head is None:
                self._pending_head = state["head"]
                dim = state["head"]["head"]["0.weight"].shape[1]
                saved_rng = self._rng.get_state()
                self._build_head(dim)  # consumes a seed draw; restore the stream afterwards
                self._rng.set_state(saved_rng)
            else:
                assert self.head_optimizer is not None
                self.head.load_state_dict(state["head"]["head"])
                self.head_optimizer.load_state_dict(state["head"]["optimizer"])
