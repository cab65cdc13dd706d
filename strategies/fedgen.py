"""FedGen: data-free knowledge distillation with a feature-space generator
(Zhu, Hong, Zhou, ICML 2021).

Server, each round: the global model is the base aggregation (FedAvg by default). Then a
label-conditional feature generator ``G(z | y)`` is trained so that the ensemble of the
clients' classifier heads, each weighted by the client's share of label ``y``, classifies
``G(z | y)`` as ``y`` (plus a diversity term), with ``y`` drawn from the global label prior.
``G`` and the prior are sent to the clients inside the next round's Message.

ClientApp: when a message carries a generator it adds FedGen's regularizer
(:class:`fedkd.train.FedGenRegularizer`) to the first ``reg-steps`` local steps, with
weights α, β decayed by ``decay`` per round. All clients need the same feature dimension
(``model.feature-dim``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedkd import records
from fedkd.distill import EnsembleTeacher
from fedkd.errors import ConfigError
from fedkd.federation import GroupedStrategy
from fedkd.synthesis import PRESETS, Objective, Synthesizer, build_generator, make_objective
from strategies import STRATEGIES

PRESETS.add("fedgen", Objective({"oh": 1.0, "div": 1.0}))


@STRATEGIES.register("fedgen")
class FedGen(GroupedStrategy):
    """FedGen over any base strategy.

    Parameters
    ----------
    base : str
        Base Flower strategy within each architecture group.
    latent_dim, hidden_dim : int
        Generator noise and hidden sizes (FedGen on MNIST: 32, 256).
    gen_steps, gen_batch_size, gen_lr : int, int, float
        Server-side generator steps per round, their batch size and Adam learning rate.
    diversity : float
        Weight of the diversity term of the generator loss.
    alpha, beta : float
        Client regularizer weights (teacher CE and latent KL) in round 2, decayed by
        ``decay`` per later round. The paper uses 10 with a local lr of 0.01; fedkd's local
        lr defaults to 0.05 and α = β = 10 diverged there (train loss 1041, then NaN, in a
        measured run), so the default is 1: about the same α·lr.
    reg_steps : int
        The regularizer applies in the first ``reg_steps`` local steps.
    """

    def __init__(
        self,
        *args: Any,
        base: str = "fedavg",
        latent_dim: int = 32,
        hidden_dim: int = 256,
        gen_steps: int = 100,
        gen_batch_size: int = 32,
        gen_lr: float = 1e-3,
        diversity: float = 1.0,
        alpha: float = 1.0,
        beta: float = 1.0,
        decay: float = 0.98,
        reg_steps: int = 20,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        ctx = self.context
        if ctx is None:
            raise ValueError("FedGen needs a ServerContext")
        for name, v in (("gen-steps", gen_steps), ("reg-steps", reg_steps), ("gen-batch-size", gen_batch_size)):
            if v < 1:
                raise ConfigError(f"strategy.fedgen.{name} must be ≥ 1, got {v}")
        for name, f in (("alpha", alpha), ("beta", beta), ("diversity", diversity)):
            if f < 0:
                raise ConfigError(f"strategy.fedgen.{name} must be ≥ 0, got {f}")
        if not 0 < decay <= 1:
            raise ConfigError(f"strategy.fedgen.decay must be in (0, 1], got {decay}")
        dims = {a: ctx.build(a).feature_dim for a in self.delegates}
        if len(set(dims.values())) != 1:
            detail = ", ".join(f"{a}={d}" for a, d in dims.items())
            raise ConfigError(
                f"FedGen needs one feature dimension across client architectures, got {detail}; set model.feature-dim"
            )
        self.feature_dim = next(iter(dims.values()))
        self.latent_dim, self.hidden_dim = latent_dim, hidden_dim
        self.gen_steps, self.alpha, self.beta, self.decay, self.reg_steps = gen_steps, alpha, beta, decay, reg_steps
        self.gen_batch_size = gen_batch_size
        gen = build_generator(
            "feature", (self.feature_dim,), ctx.num_classes, latent_dim=latent_dim, hidden_dim=hidden_dim
        )
        self.synth = Synthesizer(
            gen.to(ctx.device), make_objective("fedgen", f"div={diversity}"), gen_batch_size, gen_lr, seed=ctx.seed
        )
        self.prior = self.federation.label_counts.sum(0).astype(np.float64)
        self.trained = False

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "synth": self.synth.state_dict(), "prior": torch.from_numpy(self.prior.copy()),
                "trained": self.trained}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.synth.load_state_dict(state["synth"])
        self.prior, self.trained = state["prior"].numpy(), bool(state["trained"])

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        if not self.trained:  # round 1: nothing learned yet, plain local training
            return msgs
        gen = records.to_record(self.synth.generator)
        scale = self.decay ** (server_round - 2)
        for msg in msgs:
            msg.content[records.GENERATOR] = gen
            conf = msg.content.config_records[records.CONFIG]
            conf["fedgen.alpha"] = self.alpha * scale
            conf["fedgen.beta"] = self.beta * scale
            conf["fedgen.steps"] = self.reg_steps
            conf["fedgen.gen-batch-size"] = self.gen_batch_size
            conf["fedgen.latent-dim"] = self.latent_dim
            conf["fedgen.hidden-dim"] = self.hidden_dim
            conf["fedgen.label-prior"] = [float(p) for p in self.prior]
        return msgs

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        state, metrics = super().aggregate_train(server_round, replies)
        members = [(m, c) for m, c in self.client_models(self.accepted) if c.size == self.prior.size]
        if not members:
            return state, metrics
        heads = [m.classifier for m, _ in members]
        counts = np.stack([c for _, c in members])
        teacher = EnsembleTeacher(heads, counts).eval()
        self.prior = counts.sum(0).astype(np.float64) if counts.sum() > 0 else self.prior
        self.synth.label_prior = torch.as_tensor(self.prior / self.prior.sum()) if self.prior.sum() > 0 else None
        stats: dict[str, list[float]] = {}
        for _ in range(self.gen_steps):
            for k, v in self.synth.step(teacher).items():
                stats.setdefault(k, []).append(v)
        self.trained = True
        self.round_metrics.update({k: float(np.mean(v)) for k, v in stats.items()})
        return state, metrics
