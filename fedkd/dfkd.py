"""Centralized data-free KD, the study behind ``fedkd dfkd``.

A teacher is trained on the real training split (or loaded: from ``dfkd.teacher-checkpoint``,
or from a cache keyed by everything that shapes it, in ``dfkd.teacher-cache`` or the run
directory's parent). Then a student learns from it on generator samples only: each
iteration is one generator step (:class:`~fedkd.synthesis.Synthesizer`) and
``distill.steps`` student steps (:class:`~fedkd.distill.StudentUpdater`, rule ``plain`` /
``replay`` / ``lra`` / ``lra-official``). The student is evaluated on the held-out test
split after every epoch.

Every epoch also measures the generator on a fixed probe batch: ``class_entropy``, the
entropy of the teacher's batch-mean prediction as a fraction of ``log C`` (1: every class
equally often), and ``diversity``, the batch's mean pairwise distance as a fraction of a
real test batch's. Either under its threshold (``dfkd.collapse-*``) flags the epoch as a
likely generator collapse, on the progress line and in ``summary.json``.

A run directory gets ``config.toml`` (written by the CLI), ``metrics.jsonl`` (one row per
epoch), ``checkpoint-<epoch>.pt`` (every ``checkpoint.every`` epochs, for ``fedkd dfkd
--resume``), ``summary.json``, ``accuracy.png`` and ``samples.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedkd import checkpoint as ckpt
from fedkd.config import Config
from fedkd.data import Dataset, load_dataset
from fedkd.distill import MemoryBuffer, StudentUpdater, build_rule, kd_loss
from fedkd.errors import ConfigError, UserError
from fedkd.models import MODELS, FedkdModel, build_model
from fedkd.results import SUMMARY, RunRecorder, check_tensorboard, save_axes, write_atomic
from fedkd.synthesis import PRESETS, SYNTHESIZERS, Objective, bn_layers, build_generator, make_objective
from fedkd.train import LocalTrainConfig, derive_seed, evaluate, resolve_device, train_local

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fedkd-teacher/1"
# Seed streams derived from (seed, _STREAM, what): one per source of randomness.
_STREAM = 0xDF
_TEACHER_INIT, _STUDENT_INIT, _GENERATOR_INIT, _NOISE, _MEMORY, _TEACHER_TRAIN, _PROBE = range(1, 8)
PROBE_SIZE = 64


@dataclass
class DFKDPlan:
    """Everything a run needs, built and validated before any file is written.

    Attributes
    ----------
    cfg : Config
    dataset : Dataset
    device : torch.device
    teacher, student : FedkdModel
        Freshly initialized (the teacher is loaded already when ``checkpoint`` is set).
    synthesizer : Synthesizer or FastSynthesizer
        The registered synthesizer ``synthesizer.name`` (see :data:`~fedkd.synthesis.SYNTHESIZERS`).
    updater : StudentUpdater
    checkpoint : Path or None
        The explicit teacher checkpoint, if any.
    bn_auto : bool
        Whether ``dfkd.bn-auto`` added the BN-statistics term to the objective.
    """

    cfg: Config
    dataset: Dataset
    device: torch.device
    teacher: FedkdModel
    student: FedkdModel
    synthesizer: Any
    updater: StudentUpdater
    checkpoint: Path | None
    bn_auto: bool = False


@dataclass(frozen=True)
class TeacherInfo:
    """Where the teacher came from and how good it is."""

    accuracy: float
    source: str  # "trained", "cache" or "checkpoint"
    path: Path | None
    seconds: float


def _seed(cfg: Config, what: int) -> int:
    return derive_seed(cfg.int("seed"), _STREAM, what)


def _build_model(cfg: Config, key: str, ds: Dataset, what: int) -> FedkdModel:
    name = cfg.str(key)
    if name not in MODELS:
        raise ConfigError(f"{key}: unknown model {name!r}; valid: {', '.join(MODELS.names())}")
    feature_dim = cfg.int("model.feature-dim") or None
    torch.manual_seed(_seed(cfg, what))
    try:
        return build_model(name, ds.shape, ds.num_classes, feature_dim)
    except (RuntimeError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"{key}: model {name!r} does not fit the input shape {ds.shape} of dataset {ds.name!r} ({first})"
        ) from None


def prepare(cfg: Config) -> DFKDPlan:
    """Load the data, build and check every component; raise :class:`UserError` on bad input."""
    if cfg.int("dfkd.threads") > 0:
        torch.set_num_threads(cfg.int("dfkd.threads"))
    ds = load_dataset(cfg.str("dataset.name"), cfg.str("dataset.root"), cfg.bool("dataset.download"))
    device = resolve_device(cfg.str("device"))
    teacher = _build_model(cfg, "dfkd.teacher", ds, _TEACHER_INIT)
    student = _build_model(cfg, "dfkd.student", ds, _STUDENT_INIT)

    from generators import GENERATORS

    gname = cfg.str("generator.name")
    space = getattr(GENERATORS.get(gname), "space", "input")
    if space != "input":
        raise ConfigError(
            f"generator.name: fedkd dfkd needs an input-space generator; {gname!r} produces {space}s (FedGen)"
        )
    torch.manual_seed(_seed(cfg, _GENERATOR_INIT))
    generator = build_generator(gname, ds.shape, ds.num_classes, **cfg.plugin_kwargs("generator", gname))
    preset = cfg.str("synthesis.preset")
    if preset not in PRESETS:
        raise ConfigError(f"synthesis.preset: unknown preset {preset!r}; valid: {', '.join(PRESETS.names())}")
    objective = make_objective(
        preset,
        cfg.str("synthesis.weights"),
        cfg.str("synthesis.adv-metric"),
        cfg.float("synthesis.temperature"),
    )
    bn_added = bn_auto(cfg, objective, teacher)
    if bn_added:
        objective = objective.with_weights({"bn": 1.0})

    rule_name = cfg.str("distill.rule")
    rule = build_rule(
        rule_name,
        order=cfg.str("distill.lra-order"),
        alpha=cfg.float("distill.lra-alpha"),
        retention_weight=cfg.float("distill.lra-beta"),
    )
    memory = None
    if rule.uses_memory:
        capacity = cfg.int("distill.memory-capacity")
        if capacity < 1:
            raise ConfigError(f"distill.memory-capacity must be ≥ 1 with distill.rule = {rule_name!r}, got {capacity}")
        push_every = 0 if cfg.int("distill.memory-push-epochs") > 0 else cfg.int("distill.memory-push-every")
        memory = MemoryBuffer(
            capacity, push_every, cfg.float("distill.replay-fraction"), _seed(cfg, _MEMORY),
            mode=cfg.str("distill.replay-mode"),
        )  # fmt: skip
    check_tensorboard(cfg)
    cache = cfg.str("dfkd.teacher-cache")
    if cache and Path(cache).exists() and not Path(cache).is_dir():
        raise ConfigError(f"dfkd.teacher-cache: {cache!r} exists and is not a directory")
    loss = kd_loss(cfg.str("distill.loss"), cfg.float("distill.temperature"), cfg.str("distill.loss-reduction"))
    updater = StudentUpdater(rule, loss, memory)

    checkpoint = None
    if cfg.str("dfkd.teacher-checkpoint"):
        checkpoint = Path(cfg.str("dfkd.teacher-checkpoint"))
        if not checkpoint.is_file():
            what = "is not a file" if checkpoint.exists() else "does not exist"
            raise ConfigError(f"dfkd.teacher-checkpoint: {str(checkpoint)!r} {what}")
        load_teacher(checkpoint, teacher, cfg.str("dfkd.teacher"), ds)

    teacher.to(device).eval()
    student.to(device).train()
    generator.to(device)
    import fedkd.inversion  # noqa: F401 - registers the pooled synthesizers

    sname = cfg.str("synthesizer.name")
    synthesizer = SYNTHESIZERS.get(sname)(
        generator, objective, cfg.int("synthesis.batch-size"), cfg.float("synthesis.lr"), _seed(cfg, _NOISE),
        cfg.int("dfkd.warmup-epochs") * cfg.int("dfkd.iterations"), **cfg.plugin_kwargs("synthesizer", sname),
    )  # fmt: skip
    synthesizer.check(teacher, student)
    return DFKDPlan(cfg, ds, device, teacher, student, synthesizer, updater, checkpoint, bn_added)


def student_optimizer(cfg: Config, student: nn.Module) -> torch.optim.SGD:
    """The student's SGD: ``distill.lr``, ``distill.momentum``, ``distill.weight-decay``."""
    return torch.optim.SGD(student.parameters(), lr=cfg.float("distill.lr"), momentum=cfg.float("distill.momentum"),
                           weight_decay=cfg.float("distill.weight-decay"))  # fmt: skip


def bn_auto(cfg: Config, objective: Objective, teacher: nn.Module) -> bool:
    """Whether ``dfkd.bn-auto`` adds the BN-statistics term: on, a BatchNorm teacher, and neither the
    preset nor ``synthesis.weights`` names ``bn`` (an explicit ``bn=0`` keeps it off)."""
    return cfg.bool("dfkd.bn-auto") and "bn" not in objective.weights and bool(bn_layers(teacher))


# --------------------------------------------------------------------------- teacher checkpoints


def save_teacher(path: Path, model: FedkdModel, arch: str, ds: Dataset, accuracy: float) -> None:
    """Save ``model`` with the metadata that :func:`load_teacher` checks (atomically)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "dataset": ds.name,
        "in_shape": list(ds.shape),
        "num_classes": ds.num_classes,
        "feature_dim": model.feature_dim,
        "accuracy": accuracy,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_teacher(path: Path, model: FedkdModel, arch: str, ds: Dataset) -> dict[str, Any]:
    """Load a teacher checkpoint into ``model`` (``torch.load(weights_only=True)``).

    Accepts a fedkd teacher checkpoint (checked against ``arch`` and the dataset's input
    shape and classes) or a bare state dict. Returns the checkpoint's metadata.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file fails anywhere in the unpickler (e.g. IndexError)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load teacher checkpoint {str(path)!r}: {first}") from None
    if not isinstance(payload, Mapping):
        raise UserError(f"teacher checkpoint {str(path)!r} holds a {type(payload).__name__}, not a state dict")
    meta: dict[str, Any] = {}
    state: Mapping[str, Any] = payload
    if payload.get("format") == CHECKPOINT_FORMAT:
        meta = {k: v for k, v in payload.items() if k != "state_dict"}
        missing = [k for k in ("arch", "dataset", "in_shape", "num_classes", "state_dict") if k not in payload]
        if missing:
            raise UserError(f"teacher checkpoint {str(path)!r} is incomplete: no {', '.join(missing)}")
        state = payload["state_dict"]
        if tuple(meta["in_shape"]) != ds.shape or meta["num_classes"] != ds.num_classes:
            raise ConfigError(
                f"teacher checkpoint {str(path)!r} was trained on inputs {tuple(meta['in_shape'])} with "
                f"{meta['num_classes']} classes ({meta['dataset']}); dataset {ds.name!r} has {ds.shape} and {ds.num_classes}"
            )
        if meta["arch"] != arch:
            raise ConfigError(
                f"teacher checkpoint {str(path)!r} holds a {meta['arch']!r}, but dfkd.teacher is {arch!r}"
            )
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"teacher checkpoint {str(path)!r} does not fit {arch!r} on {ds.name!r} inputs {ds.shape}: {first}"
        ) from None
    return meta


def teacher_cache_path(cfg: Config, ds: Dataset, cache_dir: Path) -> Path:
    """The cache file of the teacher this config trains: keyed by everything that shapes it."""
    shaping = (
        "dfkd.teacher",
        "model.feature-dim",
        "seed",
        "dfkd.teacher-epochs",
        "dfkd.teacher-lr",
        "dfkd.teacher-momentum",
        "dfkd.teacher-batch-size",
    )
    key = {"format": CHECKPOINT_FORMAT, "dataset": ds.name, "shape": list(ds.shape), **{k: cfg[k] for k in shaping}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir / f"teacher-{ds.name}-{cfg.str('dfkd.teacher')}-{digest}.pt"


def cache_dir(cfg: Config, run_dir: Path | None) -> Path | None:
    """Where the teacher cache lives: ``dfkd.teacher-cache``, else the run directory's parent."""
    if cfg.str("dfkd.teacher-cache"):
        return Path(cfg.str("dfkd.teacher-cache"))
    return run_dir.parent if run_dir is not None else None


def obtain_teacher(
    plan: DFKDPlan, cache_dir: Path | None, on_epoch: Callable[[int, float], None] | None = None
) -> TeacherInfo:
    """Make ``plan.teacher`` ready: the explicit checkpoint, else the cache, else train (and cache) it.

    ``on_epoch(epoch, loss)`` reports each epoch of teacher training (progress lines).
    """
    cfg, ds, teacher = plan.cfg, plan.dataset, plan.teacher
    arch = cfg.str("dfkd.teacher")
    t = time.perf_counter()
    source, path = "checkpoint", plan.checkpoint
    if path is None:
        path = teacher_cache_path(cfg, ds, cache_dir) if cache_dir is not None else None
        source = "trained"
        if path is not None and path.is_file():
            try:
                load_teacher(path, teacher, arch, ds)
                source = "cache"
            except UserError as e:
                log.warning("ignoring the teacher cache (%s); training again", e)
        if source == "trained":
            tc = LocalTrainConfig(
                epochs=cfg.int("dfkd.teacher-epochs"), batch_size=cfg.int("dfkd.teacher-batch-size"),
                lr=cfg.float("dfkd.teacher-lr"), momentum=cfg.float("dfkd.teacher-momentum"),
            )  # fmt: skip
            train_local(
                teacher, ds.x_train, ds.y_train, tc, _seed(cfg, _TEACHER_TRAIN), plan.device, on_epoch=on_epoch
            )
    _, acc = evaluate(teacher, ds.x_test, ds.y_test, cfg.int("eval.batch-size"), plan.device)
    if source == "trained" and path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_teacher(path, teacher, arch, ds, acc)
        except OSError as e:
            log.warning("could not cache the teacher in %s (%s)", path.parent, e.strerror)
    teacher.eval().requires_grad_(False)
    return TeacherInfo(acc, source, path, time.perf_counter() - t)


# --------------------------------------------------------------------------- the distillation loop


def _means(rows: list[dict[str, float]], prefix: str) -> dict[str, float]:
    keys = dict.fromkeys(k for r in rows for k in r)
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r and not math.isnan(r[k])]
        out[prefix + k] = float(np.mean(vals)) if vals else math.nan
    return out


def mean_pairwise_distance(x: Tensor) -> float:
    """Mean Euclidean distance between the samples of a batch, per input element (RMS units)."""
    flat = x.detach().flatten(1).float()
    return float(torch.pdist(flat).mean()) / math.sqrt(flat.shape[1]) if len(flat) > 1 else 0.0


class CollapseProbe:
    """Measures a generator on a fixed probe batch without touching it (no noise drawn from the
    synthesizer's stream, no BatchNorm statistics updated).

    ``class_entropy``: entropy of the teacher's batch-mean softmax over ``log C``;
    ``diversity``: :func:`mean_pairwise_distance` of the probe samples over that of
    ``real`` (a batch of real inputs, the reference scale).
    """

    def __init__(self, synthesizer: Any, real: Tensor, seed: int, n: int = PROBE_SIZE) -> None:
        rng = torch.Generator().manual_seed(seed)
        self.z = torch.randn(n, synthesizer.latent_dim, generator=rng).to(synthesizer.device)
        self.y = (torch.arange(n) % synthesizer.num_classes).to(synthesizer.device) if synthesizer.conditional else None
        self.synthesizer = synthesizer
        self.reference = max(mean_pairwise_distance(real[:n]), 1e-12)

    @torch.no_grad()
    def measure(self, teacher: nn.Module) -> dict[str, float]:
        x = self.synthesizer.probe(self.z, self.y)
        if len(x) < 2:
            return {"class_entropy": math.nan, "diversity": math.nan}
        p = torch.softmax(teacher(x), 1).mean(0)
        entropy = float(-(p * p.clamp_min(1e-12).log()).sum()) / math.log(p.numel())
        return {"class_entropy": entropy, "diversity": mean_pairwise_distance(x) / self.reference}


def collapsed(row: Mapping[str, Any], cfg: Config) -> bool:
    """Whether an epoch's probe statistics are under the collapse thresholds."""
    return bool(
        row.get("class_entropy", 1.0) < cfg.float("dfkd.collapse-entropy")
        or row.get("diversity", 1.0) < cfg.float("dfkd.collapse-diversity")
    )


def student_lr(cfg: Config, epoch: int) -> float:
    """The student's learning rate in its ``epoch``-th training epoch (from 1, after the warm-up):
    constant, or cosine-annealed from ``distill.lr`` toward ``distill.lr-min`` over the
    ``dfkd.epochs − dfkd.warmup-epochs`` training epochs (``CosineAnnealingLR(T_max, eta_min)``
    stepped after each epoch)."""
    lr, low = cfg.float("distill.lr"), cfg.float("distill.lr-min")
    if cfg.str("distill.lr-schedule") == "cosine":
        span = max(1, cfg.int("dfkd.epochs") - cfg.int("dfkd.warmup-epochs"))
        return low + (lr - low) * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / span))
    return lr


def distill(
    plan: DFKDPlan,
    run_dir: Path | None,
    teacher: TeacherInfo,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    started: float | None = None,
    resume: ckpt.Resume | None = None,
) -> dict[str, Any]:
    """Distill ``plan.teacher`` into ``plan.student`` data-free; return the summary.

    Writes ``metrics.jsonl`` (per epoch), checkpoints, ``summary.json``, ``accuracy.png`` and
    ``samples.png`` into ``run_dir`` (nothing when ``run_dir`` is ``None``). ``started``
    is the ``time.perf_counter()`` of the whole command, for ``wall_seconds``. With
    ``resume`` (a checkpoint of this run) the loop continues after its epoch, bit for bit.
    """
    cfg, ds, device = plan.cfg, plan.dataset, plan.device
    started = time.perf_counter() if started is None else started
    student, synth, updater = plan.student, plan.synthesizer, plan.updater
    opt = student_optimizer(cfg, student)
    source = synth.source()
    epochs, iterations, steps = cfg.int("dfkd.epochs"), cfg.int("dfkd.iterations"), cfg.int("distill.steps")
    push_epochs, warmup = cfg.int("distill.memory-push-epochs"), cfg.int("dfkd.warmup-epochs")
    every, keep = cfg.int("checkpoint.every"), cfg.int("checkpoint.keep")
    probe = CollapseProbe(synth, ds.x_test[:PROBE_SIZE].to(device), _seed(cfg, _PROBE))
    recorder = RunRecorder(run_dir, on_round=on_epoch)
    if cfg.bool("log.tensorboard"):
        recorder.open_tensorboard()
    pixel = (torch.tensor(ds.std).view(1, -1, 1, 1), torch.tensor(ds.mean).view(1, -1, 1, 1))
    best, first, spent = -1.0, 1, 0.0
    if resume is not None:
        state = resume.payload
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        synth.load_state_dict(state["synthesizer"])
        if updater.memory is not None:
            updater.memory.load_state_dict(state["memory"])
        ckpt.set_rng_state(state["rng"])
        recorder.restore(state["rows"])
        best, first, spent = float(state["best"]), resume.round + 1, float(state["distill_seconds"])
    t_distill = time.perf_counter() - spent
    for epoch in range(first, epochs + 1):
        t = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = student_lr(cfg, max(1, epoch - warmup))
        student.train()
        g_rows, s_rows = [], []
        for _ in range(iterations):
            g_rows.append(synth.step(plan.teacher, student))
            if epoch > warmup:  # warm-up epochs synthesize only
                s_rows.append(updater.run(student, plan.teacher, opt, source, steps))
        if push_epochs and (epoch - 1) % push_epochs == 0:
            updater.push_last()
        loss, acc = evaluate(student, ds.x_test, ds.y_test, cfg.int("eval.batch-size"), device)
        best = max(best, acc)
        row: dict[str, Any] = {"round": epoch, "epoch": epoch, "accuracy": acc, "loss": loss, "best_accuracy": best}
        row.update(_means(g_rows, ""))
        row.update(_means(s_rows, "s_"))
        row["memory"] = len(updater.memory) if updater.memory is not None else 0
        if hasattr(synth, "__len__"):
            row["pool"] = len(synth)
        row["lr"] = opt.param_groups[0]["lr"]
        row.update(probe.measure(plan.teacher))
        if recorder.tensorboard is not None:  # what the student learns from, in pixel space
            with torch.no_grad():
                x = synth.probe(probe.z, probe.y)[:16].cpu()
            if len(x):
                recorder.tensorboard.add_images("samples", (x * pixel[0] + pixel[1]).clamp(0, 1), epoch)
        row["collapse"] = collapsed(row, cfg)
        row["seconds"] = time.perf_counter() - t
        row["elapsed"] = time.perf_counter() - started
        recorder.record(row)
        if run_dir is not None and every and (epoch % every == 0 or epoch == epochs):
            payload = {
                "student": student.state_dict(), "optimizer": opt.state_dict(), "synthesizer": synth.state_dict(),
                "memory": updater.memory.state_dict() if updater.memory is not None else {},
                "rng": ckpt.rng_state(), "rows": recorder.rows, "best": best,
                "distill_seconds": time.perf_counter() - t_distill,
            }  # fmt: skip
            ckpt.save(run_dir, epoch, payload, keep)
    student.train()
    accs = np.array([r["accuracy"] for r in recorder.rows], dtype=float)
    tail = accs[len(accs) // 2 :]
    distill_seconds = time.perf_counter() - t_distill
    summary: dict[str, Any] = {
        "teacher": cfg.str("dfkd.teacher"),
        "student": cfg.str("dfkd.student"),
        "dataset": ds.name,
        "preset": cfg.str("synthesis.preset"),
        "rule": cfg.str("distill.rule"),
        "lra_order": cfg.str("distill.lra-order") if cfg.str("distill.rule") == "lra" else None,
        "seed": cfg.int("seed"),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "teacher_accuracy": teacher.accuracy,
        "teacher_source": teacher.source,
        "teacher_seconds": teacher.seconds,
        "epochs": epochs,
        "student_final_accuracy": float(accs[-1]),
        "student_best_accuracy": float(accs.max()),
        "best_epoch": int(accs.argmax()) + 1,
        "mean_accuracy": float(accs.mean()),
        "var_accuracy": float(accs.var()),
        "mean_accuracy_second_half": float(tail.mean()),
        "var_accuracy_second_half": float(tail.var()),
        "final_over_teacher": float(accs[-1] / teacher.accuracy) if teacher.accuracy > 0 else None,
        "generator_terms": plan.synthesizer.objective.active,
        "bn_auto": plan.bn_auto,
        "collapse_epochs": sum(bool(r.get("collapse")) for r in recorder.rows),
        "final_class_entropy": recorder.rows[-1].get("class_entropy"),
        "final_diversity": recorder.rows[-1].get("diversity"),
        "resumed": resume is not None,
        "distill_seconds": distill_seconds,
        "seconds_per_epoch": distill_seconds / epochs,
        "wall_seconds": time.perf_counter() - started,
    }
    if run_dir is not None:
        write_atomic(run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
        ckpt.prune(run_dir, cfg.int("checkpoint.keep-final"))
        plot_dfkd_accuracy(recorder.rows, teacher.accuracy, run_dir / "accuracy.png", title=run_dir.name)
        plot_samples(plan, run_dir / "samples.png")
    return summary


def format_epoch(row: Mapping[str, Any], total: int) -> str:
    """The one-line progress report of an epoch."""
    parts = [f"epoch {row['epoch']:>3}/{total}", f"acc {row['accuracy']:.4f}", f"best {row['best_accuracy']:.4f}"]
    for key, label in (("g_loss", "g_loss"), ("s_kd_loss", "kd"), ("s_ret_loss", "ret")):
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.4f}")
    if row.get("memory"):
        parts.append(f"mem {row['memory']}")
    if row.get("class_entropy") is not None:
        parts.append(f"classes {row['class_entropy']:.2f}  div {row['diversity']:.2f}")
    parts.append(f"{row['seconds']:.1f}s")
    if row.get("collapse"):
        parts.append("WARNING: the generator may have collapsed (classes: entropy of the teacher's mean "
                     "prediction / log C; div: spread of the samples / a real batch's)")  # fmt: skip
    return "  ".join(parts)


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_dfkd_accuracy(rows: list[dict[str, Any]], teacher_accuracy: float, path: Path, title: str = "") -> None:
    """Student test accuracy per epoch, with the teacher's as a reference line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["epoch"] for r in rows], [r["accuracy"] for r in rows], marker="o", ms=3, lw=2, label="student")
    ax.axhline(teacher_accuracy, color="k", ls="--", lw=1, label=f"teacher ({teacher_accuracy:.3f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    save_axes(fig, ax, path, title)


def plot_samples(plan: DFKDPlan, path: Path, n: int = 64) -> None:
    """A grid of ``n`` generator samples in pixel space, titled with the teacher's predictions."""
    ds = plan.dataset
    with torch.no_grad():
        x, y, _ = plan.synthesizer.sample(n)
        pred = plan.teacher(x).argmax(1).cpu()
    n = len(x)  # a pooled synthesizer may hold fewer
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    img = (x.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    plt = _pyplot()
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 1.0))
    for i, ax in enumerate(np.asarray(axes).ravel()):
        ax.axis("off")
        if i < n:
            ax.imshow(img[i, :, :, 0] if img.shape[-1] == 1 else img[i], cmap="gray", vmin=0, vmax=1)
            label = f"T:{int(pred[i])}" + ("" if y is None else f" y:{int(y[i])}")
            ax.set_title(label, fontsize=6)
    fig.suptitle("generator samples (teacher prediction)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: Config, run_dir: Path | None, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Prepare, obtain the teacher (see :func:`cache_dir`) and distill; the summary."""
    started = time.perf_counter()
    plan = prepare(cfg)
    info = obtain_teacher(plan, cache_dir(cfg, run_dir))
    return distill(plan, run_dir, info, on_epoch, started)
