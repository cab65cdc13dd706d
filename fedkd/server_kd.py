"""Server-side data-free distillation for federated strategies.

:class:`ServerDistiller` is the one distillation loop of the federated strategies (FedDF,
DENSE, FedFTG). It keeps, across rounds, a generator (a :class:`~fedkd.synthesis.Synthesizer`)
and a :class:`~fedkd.distill.StudentUpdater` with its memory buffer. Each round it runs
``iterations`` iterations of generator update(s) against the teacher (an ensemble of the
round's client models) followed by ``k`` student steps; every value of the recipe
(optimizers, learning rates and their per-round decay, what persists across rounds, how
many generator updates per client, whether the students reuse the generator's batch, the KD
loss and its reduction) is a config key, and each strategy's defaults are its official
code's (``sims/papers/``).

Retention across rounds is the update rule of the student:

* ``none``: plain steps (the global model learns only from this round's generator);
* ``replay``: a memory of pseudo-samples from earlier rounds is replayed (MB-DFKD);
* ``lra``: the retention/acquisition meta-update of "Learning to Retain while Acquiring",
  with that same memory, so the global model keeps what earlier generators taught it.

The memory receives ``memory-push`` samples of each round's pseudo-batches at the end of the
round, with the targets that round's teacher gave them; its capacity (``memory-size``) is in
samples, so it spans ``memory-size / memory-push`` rounds. Replayed samples keep those stored
targets (``memory-targets = stored``, the default: what earlier teachers taught is the point)
or are relabelled by the current teacher (``current``).

Everything runs on the server device (``device = "auto"``: cuda when present).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from torch import Tensor, nn

from fedkd import progress, records
from fedkd.distill import (
    KD_LOSSES,
    REDUCTIONS,
    EnsembleTeacher,
    MemoryBuffer,
    StudentUpdater,
    build_rule,
    kd_loss,
    targets_of,
)
from fedkd.errors import ConfigError
from fedkd.federation import BaseFactory, Federation, GroupedStrategy, ServerContext
from fedkd.registry import configurable_params, registered_name
from fedkd.synthesis import (
    PER_MEMBER,
    SAMPLE_MODES,
    Synthesizer,
    build_generator,
    check_choice,
    eval_mode,
    make_objective,
)

log = logging.getLogger(__name__)

RETENTION = {"none": "plain", "replay": "replay", "lra": "lra"}
#: same-architecture ensemble members as one vmapped call: auto = on CUDA only (vmapped
#: convolutions are 1.5-3x slower than a loop on CPU, benchmarks/RESULTS.md)
ENSEMBLE_VMAP = ("auto", "on", "off")
AUTOCAST = {"off": None, "bf16": torch.bfloat16}
OPTIMIZERS = ("sgd", "adam")
MEMORY_TARGETS = ("stored", "current")
BatchSource = Callable[[], tuple[Tensor, Tensor | None]]
Drawn = tuple[Tensor, Tensor | None]


def _last(stats: Mapping[str, list[float]], key: str) -> float | None:
    values = stats.get(key)
    return float(values[-1]) if values else None


class ServerDistiller:
    """A generator, a student updater and its memory, kept across rounds: the one server-side
    distillation loop.

    Each round (:meth:`run`) does ``iterations`` iterations. An iteration draws one batch of
    noise, makes ``gen_steps`` generator updates on it (``per_client``: one update per client
    model of the ensemble, FedFTG), then ``student_steps`` steps of every student, on the
    generator's batch again (``reuse_batch``, FedFTG) or on fresh samples (DFAD). After the
    round, ``memory_push`` of the round's pseudo-samples enter the memory with the targets the
    round's teacher gave them, so the memory spans rounds.

    Parameters
    ----------
    in_shape, num_classes : tuple, int
        Sample shape and number of classes.
    device : torch.device
        Server device; the generator lives there.
    key : str
        Config prefix of the owning strategy (``strategy.<name>``), for error messages.
    generator, latent_dim, conditional, gen_channels : str, int, bool, int
        Registered generator (``image`` for input-space synthesis), its noise, its labels and
        its width (the ``image`` generator's ``base_channels``, DCGAN's ngf: 64 in FedFTG's
        and DFAD's code; its cost grows with its square).
    preset, weights : str
        Synthesis preset and term-weight overrides (``"oh=1,adv=0.5"``); see
        :func:`fedkd.synthesis.make_objective`.
    batch_size : int
        Pseudo-samples per generator and student step.
    gen_lr, gen_lr_decay, gen_weight_decay : float
        Generator Adam: learning rate ``gen_lr · gen_lr_decay^(round − 1)`` and weight decay.
    gen_persist : bool
        Keep Adam's state across rounds (else a fresh Adam every round, as FedFTG).
    gen_steps, per_client : int, str
        Generator updates per iteration, each against the ensemble (``off``), on the sum of
        per-client losses weighted by class shares (``mean``, FedGen) or one update per
        client (``steps``, FedFTG); see :meth:`fedkd.synthesis.Synthesizer.step`.
    reuse_batch, sample_mode : bool, str
        Student steps reuse the iteration's generator batch; the generator's mode when it
        makes the students' samples (``eval``: BatchNorm running statistics).
    optimizer, student_lr, momentum, weight_decay, lr_decay, persist_optimizer : str, float, ...
        Student optimizer (sgd or adam), lr ``student_lr · lr_decay^(round − 1)``, SGD
        momentum, weight decay; ``persist_optimizer`` keeps its state across rounds.
    loss, temperature, loss_reduction : str, float, str
        KD loss of the students (kl, ce, l1, js), its temperature and reduction (see
        :func:`fedkd.distill.kd_loss`: ``mean`` is over batch × classes).
    retention : {"none", "replay", "lra"}
        Student update rule across rounds (see the module docstring).
    memory_size, memory_push, memory_targets, replay_fraction : int, int, str, float
        Memory capacity in samples; samples pushed per round; whether replayed samples keep
        the targets of the round they came from (``stored``) or are relabelled by the
        current teacher (``current``); the replayed fraction of each student batch.
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
        gen_lr_decay: float = 1.0,
        gen_weight_decay: float = 0.0,
        gen_persist: bool = True,
        gen_steps: int = 1,
        per_client: str = "off",
        reuse_batch: bool = False,
        sample_mode: str = "train",
        optimizer: str = "sgd",
        student_lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_decay: float = 1.0,
        persist_optimizer: bool = False,
        loss: str = "kl",
        temperature: float = 1.0,
        loss_reduction: str = "auto",
        retention: str = "none",
        memory_size: int = 640,
        memory_push: int = 64,
        memory_targets: str = "stored",
        replay_fraction: float = 0.125,
        lra_order: str = "second-order",
        lra_alpha: float = 0.1,
        seed: int = 0,
        latent_dim: int = 100,
        conditional: bool = False,
        gen_channels: int = 64,
        ensemble_vmap: str = "auto",
        autocast: str = "off",
    ) -> None:
        check_choice(f"{key}.retention", retention, RETENTION)
        check_choice(f"{key}.ensemble-vmap", ensemble_vmap, ENSEMBLE_VMAP)
        check_choice(f"{key}.autocast", autocast, AUTOCAST)
        check_choice(f"{key}.loss", loss, KD_LOSSES.names())
        check_choice(f"{key}.loss-reduction", loss_reduction, REDUCTIONS)
        check_choice(f"{key}.optimizer", optimizer, OPTIMIZERS)
        check_choice(f"{key}.memory-targets", memory_targets, MEMORY_TARGETS)
        check_choice(f"{key}.sample-mode", sample_mode, SAMPLE_MODES)
        check_choice(f"{key}.per-client", per_client, PER_MEMBER)
        for name, v in (("batch-size", batch_size), ("memory-size", memory_size), ("gen-steps", gen_steps)):
            if v < 1:
                raise ConfigError(f"{key}.{name} must be ≥ 1, got {v}")
        if memory_push < 0:
            raise ConfigError(f"{key}.memory-push must be ≥ 0, got {memory_push}")
        for name, f in (("gen-lr", gen_lr), ("student-lr", student_lr), ("temperature", temperature)):
            if not f > 0:
                raise ConfigError(f"{key}.{name} must be > 0, got {f}")
        for name, f in (("lr-decay", lr_decay), ("gen-lr-decay", gen_lr_decay)):
            if not 0 < f <= 1:
                raise ConfigError(f"{key}.{name} must be in (0, 1], got {f}")
        for name, f in (("weight-decay", weight_decay), ("gen-weight-decay", gen_weight_decay)):
            if not f >= 0:
                raise ConfigError(f"{key}.{name} must be ≥ 0, got {f}")
        if not 0 <= momentum < 1:
            raise ConfigError(f"{key}.momentum must be in [0, 1), got {momentum}")
        if not 0 < replay_fraction <= 1:
            raise ConfigError(f"{key}.replay-fraction must be in (0, 1], got {replay_fraction}")
        torch.manual_seed(seed)
        self.device = device
        from generators import GENERATORS

        if gen_channels < 1:
            raise ConfigError(f"{key}.gen-channels must be ≥ 1, got {gen_channels}")
        extra = {"base_channels": gen_channels} if "base_channels" in configurable_params(GENERATORS.get(generator)) else {}
        self.generator = build_generator(
            generator, in_shape, num_classes, latent_dim=latent_dim, conditional=conditional, **extra
        ).to(device)
        self.synth = Synthesizer(
            self.generator, make_objective(preset, weights), batch_size, gen_lr, seed=seed,
            weight_decay=gen_weight_decay,
        )  # fmt: skip
        self.gen_lr, self.gen_lr_decay, self.gen_persist = gen_lr, gen_lr_decay, gen_persist
        self.gen_steps, self.per_client = gen_steps, per_client
        self.reuse_batch, self.sample_mode = reuse_batch, sample_mode
        self.optimizer, self.student_lr, self.momentum = optimizer, student_lr, momentum
        self.weight_decay, self.lr_decay, self.persist_optimizer = weight_decay, lr_decay, persist_optimizer
        self.memory_push = memory_push
        self.ensemble_vmap = ensemble_vmap == "on" or (ensemble_vmap == "auto" and torch.device(device).type == "cuda")
        self.autocast = AUTOCAST[autocast]
        self._opt_states: dict[str, Any] = {}
        self._tick: Callable[[], None] = lambda: None  # progress inside a round (set by run)
        rule = build_rule(RETENTION[retention], order=lra_order, alpha=lra_alpha)
        memory = None
        if rule.uses_memory:
            memory = MemoryBuffer(memory_size, push_every=0, fraction=replay_fraction, seed=seed)
        self.updater = StudentUpdater(
            rule, kd_loss(loss, temperature, loss_reduction), memory, stored_targets=memory_targets == "stored"
        )
        self._pick = torch.Generator().manual_seed(seed + 1)

    @property
    def memory(self) -> MemoryBuffer | None:
        """The cross-round memory (``None`` without retention)."""
        return self.updater.memory

    def state_dict(self) -> dict[str, Any]:
        memory = self.memory
        return {"synth": self.synth.state_dict(), "memory": memory.state_dict() if memory is not None else None,
                "optimizers": self._opt_states, "pick": self._pick.get_state()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.synth.load_state_dict(state["synth"])
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])
        self._opt_states = dict(state.get("optimizers", {}))
        if "pick" in state:
            self._pick.set_state(state["pick"])

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

    def _student_optimizer(self, name: str, student: nn.Module, lr: float) -> torch.optim.Optimizer:
        opt: torch.optim.Optimizer
        if self.optimizer == "adam":
            opt = torch.optim.Adam(student.parameters(), lr=lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.persist_optimizer and name in self._opt_states:
            opt.load_state_dict(self._opt_states[name])
            for group in opt.param_groups:
                group["lr"] = lr
        return opt

    def _remember(self, teacher: nn.Module, pool: list[Drawn], tag: int) -> None:
        """Push ``memory_push`` random samples of the round's batches, with this teacher's targets."""
        memory = self.memory
        if memory is None or not pool or self.memory_push == 0:
            return
        x = torch.cat([b[0] for b in pool])
        labels = [b[1] for b in pool]
        y = torch.cat([v for v in labels if v is not None]) if all(v is not None for v in labels) else None
        idx = torch.randperm(len(x), generator=self._pick)[: self.memory_push].to(x.device)
        x, y = x[idx], None if y is None else y[idx]
        memory.push(x, y, targets_of(teacher, x, y), tag)

    def run(
        self,
        students: Sequence[nn.Module] | Mapping[str, nn.Module],
        teacher: nn.Module,
        iterations: int,
        student_steps: int,
        server_round: int = 1,
        source: BatchSource | None = None,
    ) -> dict[str, float]:
        """Distill ``teacher`` into each of ``students`` for one round.

        ``students`` maps a name (the architecture, which keys a persistent optimizer) to a
        model; the first is the one the generator's adversarial term plays against (the
        global model). With ``source`` (a proxy dataset), no generator is trained.

        Returns mean statistics: ``kd_loss``, ``g_loss`` and each ``g_<term>``, plus
        ``distill_seconds``.
        """
        t0 = time.perf_counter()
        named = dict(students) if isinstance(students, Mapping) else {str(i): m for i, m in enumerate(students)}
        models = list(named.values())
        teacher.eval()
        if isinstance(teacher, EnsembleTeacher):
            teacher.set_speed(vmap=self.ensemble_vmap, autocast=self.autocast)
        decay = self.lr_decay ** (server_round - 1)
        opts = {n: self._student_optimizer(n, m, self.student_lr * decay) for n, m in named.items()}
        gen_lr = self.gen_lr * self.gen_lr_decay ** (server_round - 1)
        if self.gen_persist:
            self.synth.set_lr(gen_lr)
        else:
            self.synth.reset_optimizer(gen_lr)
        stats: dict[str, list[float]] = {}
        pool: list[Drawn] = []
        throttle = progress.Throttle()

        def tick(it: int) -> None:  # a progress line at most every 5 s, for the command line's reporter
            if progress.active() and throttle():
                progress.report(
                    "server distillation", round=server_round, iteration=it, of=iterations,
                    kd_loss=_last(stats, "kd_loss"), g_loss=_last(stats, "g_loss"), seconds=time.perf_counter() - t0,
                )  # fmt: skip

        self._tick = lambda: tick(len(pool) + 1)
        for it in range(iterations):
            tick(it + 1)
            draw = source if source is not None else self._train_generator(teacher, models[0], stats)
            first = draw()
            pool.append(first)
            for name, student in named.items():
                student.train()
                out = self.updater.run(student, teacher, opts[name], _starting_with(first, draw), student_steps)
                for k, v in out.items():
                    stats.setdefault(k, []).append(v)
        self._remember(teacher, pool, server_round)
        self.updater.forget_teacher()  # the round's ensemble and batch need not outlive it
        if self.persist_optimizer:
            self._opt_states = {n: o.state_dict() for n, o in opts.items()}
        result = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in stats.items()}
        result["distill_seconds"] = time.perf_counter() - t0
        return result

    def _train_generator(self, teacher: nn.Module, student: nn.Module, stats: dict[str, list[float]]) -> BatchSource:
        """One iteration's generator updates; returns the students' batch source for it."""
        noise = self.synth.noise()
        with eval_mode(student):  # the generator seeks disagreement with a fixed student
            for _ in range(self.gen_steps):
                self._tick()
                step_noise = noise if self.reuse_batch else self.synth.noise()
                for k, v in self.synth.step(teacher, student, step_noise, per_member=self.per_client).items():
                    stats.setdefault(k, []).append(v)
        if not self.reuse_batch:
            return self.synth.source(self.sample_mode)
        batch = self.synth.generate(noise, self.sample_mode)
        return lambda: batch


def _starting_with(first: Drawn, draw: BatchSource) -> BatchSource:
    """A source whose first batch is ``first`` (already drawn), then ``draw``'s."""
    queue = [first]

    def source() -> Drawn:
        return queue.pop() if queue else draw()

    return source


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

    Every keyword of :class:`ServerDistiller` (generator, optimizers, loss, retention and
    memory) is a config key ``strategy.<name>.<param>`` too; subclasses set their own
    defaults for them (their official recipes, ``sims/papers/``).

    Parameters
    ----------
    base : str
        Base Flower strategy run within each group (fedavg, fedprox, fedavgm, fedadam, ...).
    iterations : int
        Iterations per round: generator update(s), then ``student-steps`` student steps.
    student_steps : int
        Student steps per iteration (DFAD, FedFTG: 5).
    ensemble : {"logits", "probs"}
        How the client models are combined into the teacher: averaged logits (FedDF's
        ``avg_logits``, DENSE) or a mixture of their softmax (FedFTG).
    class_level : bool
        Weight each client, for a sample of class ``y``, by its share of class ``y``
        (FedFTG) instead of uniformly.
    **distill
        :class:`ServerDistiller`'s keywords. ``lra_alpha`` defaults to 0.1, not the paper's
        0.9: with the retention gradient intact, 0.9 collapsed the student (measured in
        `fedkd dfkd`, sims/README.md).
    """

    uses_client_models = True

    __config_forward__ = (ServerDistiller, ("in_shape", "num_classes", "device", "key", "seed"))
    trains_global_without_clients: ClassVar[bool] = True
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
        ensemble: str = "logits",
        class_level: bool = False,
        **distill: Any,
    ) -> None:
        super().__init__(federation, base_factory, context)
        if context is None:
            raise ValueError(f"{type(self).__name__} needs a ServerContext")
        key = f"strategy.{self.config_name()}"
        check_choice(f"{key}.ensemble", ensemble, ("logits", "probs"))
        self.ensemble_average, self.class_level = ensemble, class_level
        for name, v in (("iterations", iterations), ("student-steps", student_steps)):
            if v < 0:
                raise ConfigError(f"{key}.{name} must be ≥ 0, got {v}")
        self.iterations, self.student_steps = iterations, student_steps
        from generators import GENERATORS

        generator = distill.get("generator", "image")
        if getattr(GENERATORS.get(generator), "space", "input") != "input":
            raise ConfigError(f"{key}.generator {generator!r} is not an input-space generator")
        self.distiller = ServerDistiller(
            context.in_shape, context.num_classes, context.device, key, seed=context.seed, **distill
        )
        # the objective must work with these architectures (e.g. `bn` needs BatchNorm)
        archs = [a for a in federation.groups if federation.nodes(a)]
        probe = EnsembleTeacher([context.build(a) for a in archs], average=self.ensemble_average)
        try:
            self.distiller.check(probe, context.build(federation.global_arch))
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None

    @classmethod
    def config_name(cls) -> str:
        """The strategy's registered name (its config prefix), which the registry recorded on it."""
        return registered_name(cls)

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
        students: dict[str, nn.Module] = {}
        for arch in targets:
            students[arch] = self.context.build(arch)
            records.load_record(students[arch], records.unpack(state, arch))
        stats = self.distiller.run(students, teacher, self.iterations, self.student_steps, server_round, self.source())
        groups = {a: records.unpack(state, a) for a in self.federation.groups}
        for arch, model in students.items():
            groups[arch] = records.to_record(model)
        self.round_metrics.update(stats)
        return records.pack(groups), metrics
