"""Server-side data-free distillation for federated strategies.

:class:`ServerDistiller` is the one distillation loop of the federated strategies (FedDF,
DENSE, FedFTG). It keeps, across rounds, a generator with its optimizer (a
:class:`~fedkd.synthesis.Synthesizer`) and a :class:`~fedkd.distill.StudentUpdater` with
its memory buffer. Each round it alternates one generator step against the teacher (an
ensemble of the round's client models) with ``k`` student steps on fresh samples, as in
DFAD and PAPERS.md.

Retention across rounds is the update rule of the student:

* ``none``: plain steps (the global model learns only from this round's generator);
* ``replay``: a memory of pseudo-samples from earlier rounds is replayed (MB-DFKD);
* ``lra``: the retention/acquisition meta-update of "Learning to Retain while Acquiring",
  with that same memory, so the global model keeps what earlier generators taught it.

Everything runs on the server device (``device = "auto"``: cuda when present).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from torch import Tensor, nn

from fedkd import records
from fedkd.distill import EnsembleTeacher, MemoryBuffer, StudentUpdater, build_rule, kd_loss
from fedkd.errors import ConfigError
from fedkd.federation import BaseFactory, Federation, GroupedStrategy, ServerContext
from fedkd.synthesis import Synthesizer, build_generator, eval_mode, make_objective

log = logging.getLogger(__name__)

RETENTION = {"none": "plain", "replay": "replay", "lra": "lra"}
BatchSource = Callable[[], tuple[Tensor, Tensor | None]]


def check_choice(key: str, value: str, choices: Any) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


class ServerDistiller:
    """A generator and a student updater, kept across rounds.

    Parameters
    ----------
    in_shape, num_classes : tuple, int
        Sample shape and number of classes.
    device : torch.device
        Server device; the generator lives there.
    key : str
        Config prefix of the owning strategy (``strategy.<name>``), for error messages.
    generator : str
        Registered generator name (``image`` for input-space synthesis).
    preset, weights : str
        Synthesis preset and term-weight overrides (``"oh=1,adv=0.5"``); see
        :func:`fedkd.synthesis.make_objective`.
    batch_size : int
        Pseudo-samples per generator and student step.
    gen_lr, student_lr : float
        Adam learning rate of the generator; SGD learning rate of the student(s).
    loss : {"kl", "l1", "js"}
        KD loss of the student; ``temperature`` applies to KL and JS.
    retention : {"none", "replay", "lra"}
        Student update rule across rounds (see the module docstring).
    memory_batches : int
        Memory capacity in pushes (each push stores ``batch_size / 8`` samples).
    lra_order, lra_alpha : str, float
        Variant and inner step size of the ``lra`` rule.
    seed : int
        Seed of the generator's noise and labels and of the memory.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        device: torch.device,
        key: str,
        generator: str = "image",
        preset: str = "dafl",
        weights: str = "",
        batch_size: int = 64,
        gen_lr: float = 1e-3,
        student_lr: float = 0.01,
        loss: str = "kl",
        temperature: float = 1.0,
        retention: str = "none",
        memory_batches: int = 10,
        lra_order: str = "second-order",
        lra_alpha: float = 0.1,
        seed: int = 0,
        latent_dim: int = 100,
        conditional: bool = False,
    ) -> None:
        check_choice(f"{key}.retention", retention, RETENTION)
        check_choice(f"{key}.loss", loss, ("kl", "l1", "js"))
        for name, v in (("batch-size", batch_size), ("memory-batches", memory_batches)):
            if v < 1:
                raise ConfigError(f"{key}.{name} must be ≥ 1, got {v}")
        for name, f in (("gen-lr", gen_lr), ("student-lr", student_lr), ("temperature", temperature)):
            if not f > 0:
                raise ConfigError(f"{key}.{name} must be > 0, got {f}")
        torch.manual_seed(seed)
        self.device = device
        self.generator = build_generator(
            generator, in_shape, num_classes, latent_dim=latent_dim, conditional=conditional
        ).to(device)
        self.synth = Synthesizer(self.generator, make_objective(preset, weights), batch_size, gen_lr, seed=seed)
        self.student_lr = student_lr
        rule = build_rule(RETENTION[retention], order=lra_order, alpha=lra_alpha)
        fraction = 0.125
        memory = None
        if rule.uses_memory:
            per_push = max(1, int(np.ceil(fraction * batch_size)))
            memory = MemoryBuffer(memory_batches * per_push, push_every=1, fraction=fraction, seed=seed)
        self.updater = StudentUpdater(rule, kd_loss(loss, temperature), memory)

    def state_dict(self) -> dict[str, Any]:
        memory = self.updater.memory
        return {"synth": self.synth.state_dict(), "memory": memory.state_dict() if memory is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.synth.load_state_dict(state["synth"])
        if self.updater.memory is not None:
            self.updater.memory.load_state_dict(state["memory"])

    def set_label_prior(self, counts: np.ndarray | None) -> None:
        """Sample labels ∝ ``counts`` (FedFTG's customized label sampling); None: uniform."""
        if counts is None or float(np.sum(counts)) <= 0:
            self.synth.label_prior = None
            return
        p = torch.as_tensor(np.asarray(counts, dtype=np.float64))
        self.synth.label_prior = p / p.sum()

    def check(self, teacher: nn.Module, student: nn.Module) -> None:
        """Raise ConfigError if the synthesis objective cannot use these models."""
        with eval_mode(teacher):
            self.synth.check(teacher, student)

    def run(
        self,
        students: Sequence[nn.Module],
        teacher: nn.Module,
        iterations: int,
        student_steps: int,
        lr_scale: float = 1.0,
        source: BatchSource | None = None,
    ) -> dict[str, float]:
        """Distill ``teacher`` into each of ``students``.

        Each iteration: one generator step (against the first student, e.g. the global
        model, for the adversarial term), then ``student_steps`` steps of every student on
        fresh samples. With ``source`` (a proxy dataset), no generator is trained.

        Returns mean statistics: ``kd_loss``, ``g_loss`` and each ``g_<term>``, plus
        ``distill_seconds``.
        """
        t0 = time.perf_counter()
        teacher.eval()
        opts = [torch.optim.SGD(s.parameters(), lr=self.student_lr * lr_scale, momentum=0.9) for s in students]
        stats: dict[str, list[float]] = {}
        draw = source or self.synth.source()
        for _ in range(iterations):
            if source is None:
                with eval_mode(*students):  # the generator seeks disagreement with fixed students
                    for k, v in self.synth.step(teacher, students[0]).items():
                        stats.setdefault(k, []).append(v)
            for student, opt in zip(students, opts, strict=True):
                student.train()
                out = self.updater.run(student, teacher, opt, draw, student_steps)
                for k, v in out.items():
                    stats.setdefault(k, []).append(v)
        result = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in stats.items()}
        result["distill_seconds"] = time.perf_counter() - t0
        return result


def proxy_source(x: Tensor, batch_size: int, device: torch.device, gen: torch.Generator) -> BatchSource:
    """Unlabelled proxy data (FedDF with a proxy dataset) as a batch source drawing with ``gen``."""

    def draw() -> tuple[Tensor, Tensor | None]:
        idx = torch.randint(len(x), (batch_size,), generator=gen)
        return x[idx].to(device), None

    return draw


# --------------------------------------------------------------------------- strategies' base


class DistillationStrategy(GroupedStrategy):
    """Base aggregation within each group, then server-side ensemble distillation.

    After ``super().aggregate_train`` (the base Flower strategy in every architecture
    group), the round's client models form an :class:`~fedkd.distill.EnsembleTeacher`
    and are distilled into the global model (and, with ``distill_groups``, into every
    group's model) by a :class:`ServerDistiller` kept across rounds. The distilled
    weights go back into the server state, so the next round starts from them.

    Subclasses set the class attributes and the defaults of their own keywords; every
    keyword here is a config key ``strategy.<name>.<param>`` of each subclass.

    Parameters
    ----------
    base : str
        Base Flower strategy run within each group (fedavg, fedprox, fedavgm, fedadam, ...).
    iterations : int
        Generator steps per round (each followed by ``student-steps`` student steps).
    student_steps : int
        Student steps per iteration (DFAD: 5).
    batch_size, gen_lr, student_lr, lr_decay : int, float, float, float
        Pseudo-batch size; generator Adam lr; student SGD lr, multiplied by
        ``lr_decay ** (round - 1)``.
    loss, temperature : str, float
        KD loss of the student (kl, l1, js) and its temperature.
    generator, preset, weights, latent_dim, conditional : str, str, str, int, bool
        Generator and its synthesis objective (see :mod:`fedkd.synthesis`).
    retention : {"none", "replay", "lra"}
        Keep the global model from forgetting earlier rounds' pseudo-samples.
    memory_batches, lra_order, lra_alpha : int, str, float
        Memory size and LRA variant used by ``replay`` / ``lra``. α defaults to 0.1, not the
        paper's 0.9: with the retention gradient intact, 0.9 collapses the student (measured
        in `fedkd dfkd`, sims/README.md, and in S1: FedDF + lra at α = 0.9 ended at 64.5% and
        10.0% on seeds 0 and 1).
    """

    trains_global_without_clients: ClassVar[bool] = True
    #: "logits" (FedDF, DENSE) or "probs" (FedFTG) averaging of the ensemble.
    ensemble_average: ClassVar[str] = "logits"
    #: Weight each member by its share of the class (FedFTG, DENSE) instead of uniformly.
    class_level: ClassVar[bool] = False
    #: Also distill into every group's model (FedDF), not only the global one.
    distill_groups: ClassVar[bool] = False

    def __init__(
        self,
        federation: Federation,
        base_factory: BaseFactory,
        context: ServerContext | None = None,
        *,
        base: str = "fedavg",
        iterations: int = 20,
        student_steps: int = 5,
        batch_size: int = 64,
        gen_lr: float = 1e-3,
        student_lr: float = 0.01,
        lr_decay: float = 1.0,
        loss: str = "kl",
        temperature: float = 1.0,
        generator: str = "image",
        preset: str = "dafl",
        weights: str = "",
        latent_dim: int = 100,
        conditional: bool = False,
        retention: str = "none",
        memory_batches: int = 10,
        lra_order: str = "second-order",
        lra_alpha: float = 0.1,
    ) -> None:
        super().__init__(federation, base_factory, context)
        if context is None:
            raise ValueError(f"{type(self).__name__} needs a ServerContext")
        key = f"strategy.{self.config_name()}"
        for name, v in (("iterations", iterations), ("student-steps", student_steps)):
            if v < 0:
                raise ConfigError(f"{key}.{name} must be ≥ 0, got {v}")
        if not 0 < lr_decay <= 1:
            raise ConfigError(f"{key}.lr-decay must be in (0, 1], got {lr_decay}")
        self.iterations, self.student_steps, self.lr_decay = iterations, student_steps, lr_decay
        from generators import GENERATORS

        if getattr(GENERATORS.get(generator), "space", "input") != "input":
            raise ConfigError(f"{key}.generator {generator!r} is not an input-space generator")
        self.distiller = ServerDistiller(
            context.in_shape, context.num_classes, context.device, key, generator=generator, preset=preset,
            weights=weights, batch_size=batch_size, gen_lr=gen_lr, student_lr=student_lr, loss=loss,
            temperature=temperature, retention=retention, memory_batches=memory_batches, lra_order=lra_order,
            lra_alpha=lra_alpha, seed=context.seed, latent_dim=latent_dim, conditional=conditional,
        )  # fmt: skip
        # the objective must work with these architectures (e.g. `bn` needs BatchNorm)
        archs = [a for a in federation.groups if federation.nodes(a)]
        probe = EnsembleTeacher([context.build(a) for a in archs], average=self.ensemble_average)
        try:
            self.distiller.check(probe, context.build(federation.global_arch))
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None

    @classmethod
    def config_name(cls) -> str:
        """The strategy's registered name (its config prefix)."""
        from strategies import STRATEGIES

        for name in STRATEGIES.names():
            if STRATEGIES.get(name) is cls:
                return name
        return cls.__name__.lower()

    def source(self) -> BatchSource | None:
        """Distillation data; None: the generator's samples (data-free)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "distiller": self.distiller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.distiller.load_state_dict(state["distiller"])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        state, metrics = super().aggregate_train(server_round, replies)
        members = self.client_models(self.accepted)
        if state is None or not members or self.iterations == 0:
            return state, metrics
        assert self.context is not None
        counts = np.stack([c for _, c in members])
        teacher = EnsembleTeacher(
            [m for m, _ in members], counts if self.class_level else None, average=self.ensemble_average
        )
        self.distiller.set_label_prior(counts.sum(0))
        targets = [self.federation.global_arch]
        if self.distill_groups:
            targets += [a for a in self.federation.groups if a != self.federation.global_arch]
        students = []
        for arch in targets:
            model = self.context.build(arch)
            records.load_record(model, records.unpack(state, arch))
            students.append(model)
        stats = self.distiller.run(
            students, teacher, self.iterations, self.student_steps, self.lr_decay ** (server_round - 1), self.source()
        )
        groups = {a: records.unpack(state, a) for a in self.federation.groups}
        for arch, model in zip(targets, students, strict=True):
            groups[arch] = records.to_record(model)
        self.round_metrics.update(stats)
        return records.pack(groups), metrics
