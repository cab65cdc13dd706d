"""Fast-DFKD: the official ``fast_meta`` synthesis step against fedkd's ``fast``, side by side.

Does fedkd's ``fast`` synthesizer fail to make samples that carry their sampled classes because
of the budget, or because of a defect? This script re-implements the official synthesis step
(written from the method; the fetched repository is not imported) and runs it next to fedkd's
``fast`` (``fedkd/inversion.py``, configured exactly as ``benchmarks/dfkd_pairs.py``'s ``fast``
method) on the same teacher (fedkd's cached ResNet-8 on mnist5k from
``sims/results/dfkd-pairs/teachers``), the same seed and noise stream, the same synthesis batch
size (128) and the same number of synthesis calls. Every call logs, on the kept (lowest-loss)
batch: ``g_oh`` (CE of the teacher toward the sampled labels as optimized, on the augmented batch;
ln 10 = 2.30 is chance), ``g_bn`` (the BN-statistics term as optimized), ``acc_y`` (teacher argmax
== sampled label, on the kept un-augmented batch), ``ent`` (entropy of the teacher's batch-mean
softmax over ln 10) and ``conf`` (the teacher's mean max-probability). No student is trained
during synthesis: this is the official warm-up phase (``--warmup 20``: synthesis only, ``adv``
off). ``--student-steps N`` then distills fedkd's student on each variant's final pool (fixed,
no adversarial term) with the recipe's KD loss at the ``--student-lrs``. ::

    python benchmarks/fast_official_check.py         # fedkd, official-fedkd-gen, official-ngf16, fedkd-sigmoid-head
    python benchmarks/fast_official_check.py --calls 40 --variants official          # ~3 min, ngf 64
    python benchmarks/fast_official_check.py --calls 40 --variants fedkd --student-steps 1000
    python benchmarks/fast_official_check.py --calls 100 --out runs/fast-official-check  # + JSON

Official files read (github.com/zju-vipa/Fast-Datafree, HEAD 0dcecbc):
``datafree/synthesis/fast_meta.py`` (FastMetaSynthesizer, reptile_grad, fomaml_grad, reset_l0,
reset_bn), ``datafree/hooks.py`` (DeepInversionHook), ``datafree/criterions.py`` (kldiv),
``datafree/utils/_utils.py`` (ImagePool, DataIter, Normalizer), ``datafree/models/generator.py``
(Generator), ``datafree_kd.py`` (the driver) and ``scripts/fast_cifar.sh`` (the recipes).

The official values (``scripts/fast_cifar.sh``, "modify --dataset (and nothing else) to apply to
CIFAR10"; Fast-2 rows): batch 256 (= synthesis batch), g_steps 2, lr_g 5e-3, lr_z 0.015, bn 10,
oh 0.5 (resnet34 / vgg11; 0.4 for the WRN teachers), adv 1.33 / 1.0 / 1.1, bn_mmt 0.9, warmup 20,
reset_l0 1 (once, at call 120 + warmup), reset_bn 0 (``reset_bn`` is never called by
``fast_meta.py``), is_maml 1 (FOMAML), T 20, KD SGD lr 0.2 momentum 0.9 wd 1e-4 cosine,
kd_steps = ep_steps = 400 (one synthesis call per epoch), 220 epochs; generator
``Generator(nz=256, ngf=64)``, Sigmoid output, normalized inside the augmentation.

Variants (``--variants``):

* ``fedkd`` — fedkd's ``FastSynthesizer.step`` as ``dfkd_pairs.py --method fast`` builds it.
* ``official-fedkd-gen`` — the official step on fedkd's ``ImageGenerator`` (same initial weights,
  same random stream, fedkd's augmentation), the BN term summed in fedkd's floating-point order:
  a port check (it reproduces ``fedkd`` bit for bit; in the official order the two drift apart by
  rounding, which Adam's sign-like first steps amplify, but follow the same course).
* ``official`` — the official step with the official generator (``Generator``: Sigmoid output in
  [0, 1], the normalizer inside the augmentation, ngf 64) and the official augmentation (random
  crop with padding 4 filled with black, random horizontal flip).
* ``official-ngf16`` / ``official-fedkd-aug`` — ablations: the official step and generator at
  fedkd's width (``base-channels`` 16), or with fedkd's augmentation (padding 2, no flip).
* ``fedkd-sigmoid-head`` — ablation: fedkd's own ``FastSynthesizer`` with fedkd's
  ``ImageGenerator`` whose last layers (tanh, BatchNorm without affine) are replaced by the
  official ones (Sigmoid, then the dataset's normalization), by subclassing.

Findings (seed 0, teacher 97.4%, 40 calls): the official step does the same as fedkd's (the port
is exact), and with the official generator it does worse on this pair (its Sigmoid output starts
saturated: one class, ``ent`` 0). Neither brings ``g_oh`` near 2.3 in 40 calls (fedkd's plateaus
at ~3.3–3.6 by 100–300 calls, ``acc_y`` 0.25–0.3). The samples are nevertheless usable: a student
distilled 1000 steps on fedkd's 40-call pool reaches 68% at lr 0.01 but 20% at the recipe's lr 0.1
(KL at T = 20, scaled by T²); the 10% of the published run is the student's learning rate, not
the synthesizer.

Single-threaded (``torch.set_num_threads(1)``); per call on a shared core about 0.8 s for fedkd's
generator (base 16) and 5–7 s for the official ngf 64 one; a student check about 65 s per lr.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from dfkd_pairs import METHODS  # noqa: E402

from fedkd import dfkd  # noqa: E402
from fedkd.config import load_config  # noqa: E402
from fedkd.inversion import FastSynthesizer, random_crop_flip  # noqa: E402
from generators.image import ImageGenerator  # noqa: E402

PAIR = ("mnist5k", "resnet8", "lenet5-half")
TEACHER_CACHE = REPO / "sims" / "results" / "dfkd-pairs" / "teachers"


# --------------------------------------------------------------------------- the official code, rewritten


class DeepInversionHook:
    """``datafree/hooks.py`` DeepInversionHook: BN loss against a momentum mix of batch statistics.

    ``r = ‖σ²_run − ((1−m) σ² + m σ̄²)‖₂ + ‖μ_run − ((1−m) μ + m μ̄)‖₂`` (plain DeepInversion until
    ``update_mmt`` has run once); ``update_mmt`` folds the last forward's statistics (detached)
    into ``(μ̄, σ̄²)``: the first call sets them, later ones ``m·avg + (1−m)·new``.
    """

    def __init__(self, module: nn.BatchNorm2d, mmt_rate: float, fedkd_order: bool = False) -> None:
        self.handle = module.register_forward_hook(self.hook_fn)
        self.mmt_rate = mmt_rate
        self.fedkd_order = fedkd_order  # the same value in fedkd's floating-point order (bit-exact port check)
        self.mmt: tuple[Tensor, Tensor] | None = None
        self.tmp_val: tuple[Tensor, Tensor] | None = None
        self.r_feature: Tensor | None = None

    def hook_fn(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0]
        nch = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
        rv, rm = module.running_var.data, module.running_mean.data  # type: ignore[union-attr]
        if self.fedkd_order:
            mean, var = x.mean([0, 2, 3]), x.var([0, 2, 3], unbiased=False)
            self.tmp_val = (mean, var)
            if self.mmt is not None:
                m = self.mmt_rate
                mean, var = (1 - m) * mean + m * self.mmt[0], (1 - m) * var + m * self.mmt[1]
            self.r_feature = torch.linalg.vector_norm(rv - var) + torch.linalg.vector_norm(rm - mean)
            return
        if self.mmt is None:
            r = torch.norm(rv - var, 2) + torch.norm(rm - mean, 2)
        else:
            mean_mmt, var_mmt = self.mmt
            m = self.mmt_rate
            r = torch.norm(rv - (1 - m) * var - m * var_mmt, 2) + torch.norm(rm - (1 - m) * mean - m * mean_mmt, 2)
        self.r_feature = r
        self.tmp_val = (mean, var)

    def update_mmt(self) -> None:
        assert self.tmp_val is not None
        mean, var = self.tmp_val
        if self.mmt is None:
            self.mmt = (mean.data, var.data)
        else:
            mean_mmt, var_mmt = self.mmt
            m = self.mmt_rate
            self.mmt = (m * mean_mmt + (1 - m) * mean.data, m * var_mmt + (1 - m) * var.data)

    def remove(self) -> None:
        self.handle.remove()


def kldiv(logits: Tensor, targets: Tensor, reduction: str = "batchmean") -> Tensor:
    """``datafree/criterions.py`` kldiv at T = 1: ``KL(softmax targets ‖ softmax logits)``."""
    return F.kl_div(F.log_softmax(logits, 1), F.softmax(targets, 1), reduction=reduction)


def fomaml_grad(src: nn.Module, tar: nn.Module) -> None:
    """Add the fast generator's gradients to the meta generator's (first-order MAML)."""
    for p, tar_p in zip(src.parameters(), tar.parameters()):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.data.add_(tar_p.grad.data)


def reptile_grad(src: nn.Module, tar: nn.Module) -> None:
    """REPTILE: the meta gradient is ``67 · (θ_meta − θ_fast)`` (the official constant)."""
    for p, tar_p in zip(src.parameters(), tar.parameters()):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.data.add_(p.data - tar_p.data, alpha=67)


def reset_l0(model: nn.Module) -> None:
    """``reset_l0`` (at epoch 120 + warmup): the first Linear and the first BN get N(0, 0.02) weights, 0 bias."""
    for n, m in model.named_modules():
        if n in ("l1.0", "conv_blocks.0", "fc", "bn0"):  # official names, then fedkd's ImageGenerator's
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.constant_(m.bias, 0)


class OfficialGenerator(nn.Module):
    """``datafree/models/generator.py`` Generator (nz, ngf, img_size, nc): Sigmoid images in [0, 1]."""

    def __init__(self, nz: int = 256, ngf: int = 64, img_size: int = 28, nc: int = 1) -> None:
        super().__init__()
        self.init_size = img_size // 4
        self.l1 = nn.Sequential(nn.Linear(nz, ngf * 2 * self.init_size**2))
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(ngf * 2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf * 2, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, nc, 3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: Tensor) -> Tensor:
        out = self.l1(z).view(z.shape[0], -1, self.init_size, self.init_size)
        return self.conv_blocks(out)


class OfficialFastMeta:
    """``FastMetaSynthesizer.synthesize`` step by step (the pool, the DataLoader and the files left out).

    ``aug`` maps the generator's output to the teacher's input (official: crop, flip, normalize);
    ``to_input`` maps it without augmentation (for measuring). The noise, labels and augmentation
    draw from ``rng`` in fedkd's order (z, then y, then each iteration's augmentation), so that on
    fedkd's generator the two can be compared number for number.
    """

    def __init__(self, teacher: nn.Module, generator: nn.Module, *, nz: int, num_classes: int, batch_size: int,
                 iterations: int, lr_g: float, lr_z: float, bn: float, oh: float, adv: float, bn_mmt: float,
                 warmup: int, reset_l0: int, is_maml: int, aug: Callable[[Tensor], Tensor],
                 rng: torch.Generator, student: nn.Module | None = None, fedkd_order: bool = False) -> None:  # fmt: skip
        self.teacher, self.student, self.generator = teacher, student, generator.train()
        self.nz, self.num_classes, self.batch_size, self.iterations = nz, num_classes, batch_size, iterations
        self.lr_g, self.lr_z, self.bn, self.oh, self.adv = lr_g, lr_z, bn, oh, adv
        self.bn_mmt, self.ep_start, self.reset_l0, self.ismaml = bn_mmt, warmup, reset_l0, is_maml
        self.aug, self.rng = aug, rng
        self.ep = 0
        # both branches of the official code: Adam(lr_g · iterations, betas (0.5, 0.999)) on the meta generator
        self.meta_optimizer = torch.optim.Adam(generator.parameters(), lr_g * iterations, betas=(0.5, 0.999))
        self.hooks = [
            DeepInversionHook(m, bn_mmt, fedkd_order) for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)
        ]
        self.pool: list[Tensor] = []

    def close(self) -> None:
        for h in self.hooks:
            h.remove()

    def synthesize(self) -> tuple[Tensor, Tensor, dict[str, float]]:
        self.ep += 1
        if self.student is not None:
            self.student.eval()
        self.teacher.eval()
        best_cost = 1e6
        if self.ep == 120 + self.ep_start and self.reset_l0:
            reset_l0(self.generator)
        best_inputs: Tensor | None = None
        best_terms: dict[str, float] = {}
        dev = next(self.generator.parameters()).device
        z = torch.randn(self.batch_size, self.nz, generator=self.rng).to(dev).requires_grad_()
        targets = torch.randint(self.num_classes, (self.batch_size,), generator=self.rng).to(dev)
        fast_generator = copy.deepcopy(self.generator).train()  # official: generator.clone() (load_state_dict)
        optimizer = torch.optim.Adam(
            [{"params": fast_generator.parameters()}, {"params": [z], "lr": self.lr_z}],
            lr=self.lr_g,
            betas=(0.5, 0.999),
        )
        for it in range(self.iterations):
            inputs = fast_generator(z)
            inputs_aug = self.aug(inputs)
            t_out = self.teacher(inputs_aug)
            loss_bn = sum(h.r_feature for h in self.hooks)  # type: ignore[misc]
            loss_oh = F.cross_entropy(t_out, targets)
            if self.adv > 0 and self.ep >= self.ep_start and self.student is not None:
                s_out = self.student(inputs_aug)
                mask = (s_out.max(1)[1] == t_out.max(1)[1]).float()
                loss_adv = -(kldiv(s_out, t_out, reduction="none").sum(1) * mask).mean()
            else:
                loss_adv = loss_oh.new_zeros(1)
            loss = self.bn * loss_bn + self.oh * loss_oh + self.adv * loss_adv
            with torch.no_grad():
                if best_cost > loss.item() or best_inputs is None:
                    best_cost = loss.item()
                    best_inputs = inputs.data
                    best_terms = {"g_loss": loss.item(), "g_bn": float(loss_bn), "g_oh": loss_oh.item()}
            optimizer.zero_grad()
            loss.backward()
            if self.ismaml:
                if it == 0:
                    self.meta_optimizer.zero_grad()
                fomaml_grad(self.generator, fast_generator)
                if it == self.iterations - 1:
                    self.meta_optimizer.step()
            optimizer.step()
        if self.bn_mmt != 0:
            for h in self.hooks:
                h.update_mmt()
        if not self.ismaml:
            self.meta_optimizer.zero_grad()
            reptile_grad(self.generator, fast_generator)
            self.meta_optimizer.step()
        assert best_inputs is not None
        self.pool.append(best_inputs.detach().cpu())  # ImagePool.add
        return best_inputs, targets, best_terms


# --------------------------------------------------------------------------- augmentation and heads


class Normalize(nn.Module):
    """The dataset's per-channel normalization (the official ``Normalizer``)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def official_aug(padding: int, flip: bool, normalize: Normalize, rng: torch.Generator) -> Callable[[Tensor], Tensor]:
    """kornia ``RandomCrop(padding, fill 0)`` + ``RandomHorizontalFlip`` on [0, 1] images, then normalize.

    Zero padding in [0, 1] is black; it is fedkd's ``random_crop_flip`` after shifting black to 0.
    """
    return lambda x: normalize(random_crop_flip(x, padding, flip, rng))


class SigmoidHeadImageGenerator(ImageGenerator):
    """fedkd's ``ImageGenerator`` with the official output layers: ``conv → Sigmoid → normalize``
    instead of ``conv → tanh → BatchNorm(affine=False)`` (the candidate fix, by subclassing)."""

    def __init__(self, *args: Any, mean: tuple[float, ...], std: tuple[float, ...], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        conv = self.head[0]
        self.head = nn.Sequential(conv, nn.Sigmoid(), Normalize(mean, std))


# --------------------------------------------------------------------------- measuring


@torch.no_grad()
def measure(teacher: nn.Module, x_input: Tensor, y: Tensor) -> dict[str, float]:
    """The teacher on the kept batch (un-augmented, in its input space) against the sampled labels."""
    p = torch.softmax(teacher(x_input), 1)
    mean = p.mean(0)
    return {
        "acc_y": float((p.argmax(1) == y).float().mean()),
        "ce_clean": float(F.nll_loss(p.clamp_min(1e-12).log(), y)),
        "ent": float(-(mean * mean.clamp_min(1e-12).log()).sum()) / math.log(p.shape[1]),
        "conf": float(p.max(1).values.mean()),
    }


def build_plan(seed: int) -> Any:
    """fedkd's own plan for ``dfkd_pairs.py --method fast`` on mnist5k ResNet-8 → LeNet-5-half (teacher cached)."""
    sim, extra, _ = METHODS["fast"]
    items = [f"dataset.name={PAIR[0]}", f"dfkd.teacher={PAIR[1]}", f"dfkd.student={PAIR[2]}",
             f"dfkd.teacher-cache={TEACHER_CACHE}", *extra]  # fmt: skip
    cfg = load_config(REPO / sim, items, seed)
    plan = dfkd.prepare(cfg)
    info = dfkd.obtain_teacher(plan, TEACHER_CACHE)
    print(f"teacher {PAIR[1]} on {PAIR[0]}: {info.accuracy * 100:.1f}% ({info.source}: {info.path})", flush=True)
    torch.set_num_threads(1)  # prepare() sets dfkd.threads = 1 too
    return plan


def fast_kwargs(plan: Any) -> dict[str, Any]:
    """fedkd's fast hyper-parameters of this plan, in the official names."""
    s: FastSynthesizer = plan.synthesizer
    w = s.objective.active
    return {"nz": s.latent_dim, "num_classes": s.num_classes, "batch_size": s.batch_size, "iterations": s.iterations,
            "lr_g": s.lr, "lr_z": s.lr_z, "bn": w.get("bn", 0.0), "oh": w.get("oh", 0.0), "adv": 0.0,
            "bn_mmt": s.bn_momentum, "warmup": 20, "reset_l0": 1, "is_maml": 1}  # fmt: skip


def run_variant(name: str, plan: Any, calls: int, seed_noise: int, every: int) -> tuple[list[dict[str, float]], Tensor]:
    """``calls`` synthesis calls of one variant from the same initial state: one row per call, and
    the pool (every kept batch, in the teacher's input space)."""
    teacher = plan.teacher
    ds = plan.dataset
    s0: FastSynthesizer = plan.synthesizer
    gen0_state = copy.deepcopy(s0.generator.state_dict())
    gen_kwargs = {"out_shape": ds.shape, "num_classes": ds.num_classes, "latent_dim": s0.latent_dim,
                  "base_channels": plan.cfg.int("generator.image.base-channels")}  # fmt: skip
    init_seed = dfkd._seed(plan.cfg, dfkd._GENERATOR_INIT)
    normalize = Normalize(ds.mean, ds.std)
    rng = torch.Generator().manual_seed(seed_noise)
    rows: list[dict[str, float]] = []
    t0 = time.perf_counter()

    def log(i: int, row: dict[str, float]) -> None:
        row = {"call": i, **row, "s": time.perf_counter() - t0}
        rows.append(row)
        if i % every == 0 or i == calls:
            print(f"  {name:22s} call {i:4d}  g_oh {row['g_oh']:7.3f}  g_bn {row['g_bn']:7.3f}  "
                  f"acc_y {row['acc_y']:.3f}  ent {row['ent']:.3f}  conf {row['conf']:.3f}  {row['s']:.0f}s", flush=True)  # fmt: skip

    if name in ("fedkd", "fedkd-sigmoid-head"):
        if name == "fedkd":
            gen = ImageGenerator(**gen_kwargs)
            gen.load_state_dict(gen0_state)
        else:
            torch.manual_seed(init_seed)
            gen = SigmoidHeadImageGenerator(**gen_kwargs, mean=ds.mean, std=ds.std)
        s = plan.cfg.plugin_kwargs("synthesizer", "fast")
        synth = FastSynthesizer(gen, s0.objective, s0.batch_size, s0.lr, seed_noise, s0.warmup, **s)
        for i in range(1, calls + 1):
            state = synth._rng.get_state()  # replay the stream to recover this call's labels
            replay = torch.Generator().manual_seed(0)
            replay.set_state(state)
            torch.randn(synth.batch_size, synth.latent_dim, generator=replay)
            y = torch.randint(synth.num_classes, (synth.batch_size,), generator=replay)
            out = synth.step(teacher, None)
            log(i, {"g_oh": out["g_oh"], "g_bn": out["g_bn"], **measure(teacher, synth._pool[-1], y)})
        return rows, torch.cat(synth._pool)

    kw = fast_kwargs(plan)
    if name == "official-fedkd-gen":
        gen = ImageGenerator(**gen_kwargs)
        gen.load_state_dict(gen0_state)
        pad, flip = s0.crop_padding, s0.flip
        aug: Callable[[Tensor], Tensor] = lambda x: random_crop_flip(x, pad, flip, rng)  # noqa: E731
        to_input: Callable[[Tensor], Tensor] = lambda x: x  # noqa: E731
    else:
        ngf = {"official": 64, "official-fedkd-aug": 64, "official-ngf16": 16}[name]
        pad, flip = (2, False) if name == "official-fedkd-aug" else (4, True)
        torch.manual_seed(init_seed)
        gen = OfficialGenerator(nz=kw["nz"], ngf=ngf, img_size=ds.shape[1], nc=ds.shape[0])
        aug = official_aug(pad, flip, normalize, rng)
        to_input = normalize
    off = OfficialFastMeta(teacher, gen, aug=aug, rng=rng, fedkd_order=name == "official-fedkd-gen", **kw)
    try:
        for i in range(1, calls + 1):
            x, y, terms = off.synthesize()
            log(i, {**terms, **measure(teacher, to_input(x), y)})
    finally:
        off.close()
    with torch.no_grad():
        return rows, torch.cat([to_input(b) for b in off.pool])


def student_check(plan: Any, pool: Tensor, lrs: list[float], steps: int, seed: int) -> dict[float, float]:
    """Distill fedkd's student on a fixed pool with the recipe's loss (``distill.loss`` at
    ``distill.temperature``, SGD momentum 0.9, weight decay 1e-4, cosine) at each learning rate in
    ``lrs``; the student's test accuracy after ``steps`` steps. No adversarial term, no new samples:
    it asks only whether the pooled samples, as they are, carry the teacher's classes to a student."""
    from fedkd.distill import kd_loss
    from fedkd.train import evaluate

    cfg, ds, teacher = plan.cfg, plan.dataset, plan.teacher
    loss_fn = kd_loss(cfg.str("distill.loss"), cfg.float("distill.temperature"), cfg.str("distill.loss-reduction"))
    init = copy.deepcopy(plan.student.state_dict())
    pad, flip = plan.synthesizer.crop_padding, plan.synthesizer.flip
    out: dict[float, float] = {}
    for lr in lrs:
        student = copy.deepcopy(plan.student)
        student.load_state_dict(init)
        student.train()
        opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=cfg.float("distill.momentum"),
                              weight_decay=cfg.float("distill.weight-decay"))  # fmt: skip
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        rng = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        for _ in range(steps):
            idx = torch.randperm(len(pool), generator=rng)[: plan.synthesizer.batch_size]
            x = random_crop_flip(pool[idx], pad, flip, rng)
            with torch.no_grad():
                t = teacher(x)
            loss = loss_fn(student(x), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        student.eval()
        _, acc = evaluate(student, ds.x_test, ds.y_test, cfg.int("eval.batch-size"), torch.device("cpu"))
        out[lr] = acc
        print(f"  student on the pool ({len(pool)} samples), lr {lr:g}, {steps} steps: test accuracy {acc * 100:.1f}%"
              f"  (last kd loss {float(loss.detach()):.3f}, {time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip
    return out


VARIANTS = ("fedkd", "official-fedkd-gen", "official", "official-ngf16", "official-fedkd-aug", "fedkd-sigmoid-head")
QUICK = ("fedkd", "official-fedkd-gen", "official-ngf16", "fedkd-sigmoid-head")  # the default: ~3 min


def summary_table(results: dict[str, list[dict[str, float]]], marks: list[int]) -> str:
    head = "| variant | call | g_oh | g_bn | acc_y | ent | conf |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for c in marks:
            if c <= len(rows):
                r = rows[c - 1]
                lines.append(f"| {name} | {c} | {r['g_oh']:.3f} | {r['g_bn']:.3f} | {r['acc_y']:.3f} | "
                             f"{r['ent']:.3f} | {r['conf']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=40, help="synthesis calls (meta iterations) per variant")
    p.add_argument("--variants", default=",".join(QUICK), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=10, help="print every N calls")
    p.add_argument("--out", help="directory for <variant>.json trajectories and summary.md")
    p.add_argument(
        "--student-steps",
        type=int,
        default=0,
        help="also distill fedkd's student on each variant's final pool for N steps (0: off)",
    )
    p.add_argument("--student-lrs", default="0.1,0.01", help="student learning rates of --student-steps")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; valid: {', '.join(VARIANTS)}")
    plan = build_plan(args.seed)
    seed_noise = dfkd._seed(plan.cfg, dfkd._NOISE)  # the noise seed fedkd's run gives its synthesizer
    print(f"fedkd fast, as dfkd_pairs.py configures it: {fast_kwargs(plan)} "
          f"{plan.cfg.plugin_kwargs('synthesizer', 'fast')}")  # fmt: skip
    results: dict[str, list[dict[str, float]]] = {}
    students: dict[str, dict[float, float]] = {}
    for name in names:
        results[name], pool = run_variant(name, plan, args.calls, seed_noise, args.every)
        if args.student_steps > 0:
            lrs = [float(v) for v in args.student_lrs.split(",")]
            students[name] = student_check(plan, pool, lrs, args.student_steps, args.seed)
    marks = sorted({1, 2, 5, 10, 20, 40, 60, 100, 200, args.calls})
    table = summary_table(results, [m for m in marks if m <= args.calls])
    for name, accs in students.items():
        table += f"\nstudent on the {name} pool, {args.student_steps} steps: " + ", ".join(
            f"lr {lr:g} → {acc * 100:.1f}%" for lr, acc in accs.items()
        )
    print(table, end="\n")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, rows in results.items():
            (out / f"{name}.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
        (out / "summary.md").write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
