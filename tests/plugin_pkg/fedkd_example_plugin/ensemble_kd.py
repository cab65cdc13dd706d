"""Example 3: a new server-side KD strategy from the building blocks.

After the base strategy aggregates within each group, the server trains a generator against
the uniform ensemble of the round's client models and fine-tunes the global model on its
samples. The generator and its optimizer persist across rounds and are checkpointed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from fedkd.api import (
    PRESETS,
    UPDATE_RULES,
    ConfigError,
    EnsembleTeacher,
    Federation,
    GroupedStrategy,
    ServerContext,
    StudentUpdater,
    Synthesizer,
    build_generator,
    kd_loss,
    load_record,
    pack,
    registered_name,
    to_record,
    unpack,
)


class EnsembleKD(GroupedStrategy):
    """Base aggregation per group, then data-free KD of the client ensemble into the global model.

    Parameters
    ----------
    base : str
        The per-group base strategy (fedkd builds it and passes ``base_factory``).
    steps : int
        Generator steps per round, each followed by one student step.
    lr : float
        SGD learning rate of the global model on the server.
    batch_size : int
        Pseudo-samples per step.
    preset : str
        The generator's objective (a registered synthesis preset).
    """

    def __init__(
        self,
        federation: Federation,
        base_factory: Any,
        context: ServerContext | None = None,
        *,
        base: str = "fedavg",
        steps: int = 10,
        lr: float = 0.01,
        batch_size: int = 64,
        preset: str = "dfad",
    ) -> None:
        super().__init__(federation, base_factory, context)
        key = f"strategy.{registered_name(type(self))}"
        if context is None:
            raise ConfigError(f"{key} needs a server context")
        if steps < 0:
            raise ConfigError(f"{key}.steps must be ≥ 0, got {steps}")
        if lr <= 0:
            raise ConfigError(f"{key}.lr must be > 0, got {lr}")
        self.steps, self.lr = steps, lr
        generator = build_generator("image", context.in_shape, context.num_classes, base_channels=16)
        self.synth = Synthesizer(generator.to(context.device), PRESETS.get(preset), batch_size, seed=context.seed)
        self.updater = StudentUpdater(UPDATE_RULES.build("plain"), kd_loss("kl"))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        state, metrics = super().aggregate_train(server_round, replies)  # the base strategy, per group
        members = self.client_models(self.accepted)  # the replies that passed validation
        if state is None or not members or self.steps == 0:
            return state, metrics
        assert self.context is not None
        teacher = EnsembleTeacher([model for model, _counts in members])
        arch = self.federation.global_arch
        student = self.context.build(arch)
        load_record(student, unpack(state, arch))
        student.train()
        optimizer = torch.optim.SGD(student.parameters(), lr=self.lr)
        g_loss, kd = 0.0, 0.0
        for _ in range(self.steps):
            g_loss = self.synth.step(teacher, student)["g_loss"]
            kd = self.updater.run(student, teacher, optimizer, self.synth.source(), 1)["kd_loss"]
        groups = {a: unpack(state, a) for a in self.federation.groups}
        groups[arch] = to_record(student)
        self.round_metrics.update({"g_loss": g_loss, "kd_loss": kd})  # columns of metrics.jsonl
        return pack(groups), metrics

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "synth": self.synth.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.synth.load_state_dict(state["synth"])
