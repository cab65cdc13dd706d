"""FedGen: data-free knowledge distillation with a feature-space generator
(Zhu, Hong, Zhou, ICML 2021).

Server, each round: the global model is the base aggregation (FedAvg by default). Then a
label-conditional feature generator ``G(z | y)`` is trained for ``gen-steps`` Adam steps
(official: 50, lr 3e-4 decayed 0.98 per round, weight decay 1e-2) so that every client's
classifier head classifies ``G(z | y)`` as ``y``: the loss is
``Σ_k CE(head_k(G(z | y)), y) · mean_b w_{k, y_b}`` (``w_{k, y}`` client ``k``'s share of
class ``y``) plus a bounded diversity term, with ``y`` uniform over the labels some client
holds. ``G`` is sent to the clients inside the next round's Message. Its output ends in the
activation of the models' features (ReLU for fedkd's models), so that generated features lie
where real ones do.

ClientApp: when a message carries a generator it adds FedGen's regularizer
(:class:`fedkd.train.FedGenRegularizer`) to the first ``reg-steps`` local steps, with
weights ``α, β = max(1e-4, 10 · 0.98^(round − 1))`` (official, with a local lr of 0.01). All
clients need the same feature dimension (``model.feature-dim``).
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
from fedkd.synthesis import PRESETS, Objective, Synthesizer, build_generator, check_choice, make_objective
from generators.feature import ACTIVATIONS
from strategies import STRATEGIES

PRESETS.add("fedgen", Objective({"oh": 1.0, "div": 1.0}))
LABEL_SAMPLING = ("uniform", "prior")


@STRATEGIES.register("fedgen")
class FedGen(GroupedStrategy):
    """FedGen over any base strategy; defaults are the official code's (``sims/papers/``).

    Parameters
    ----------
    base : str
        Base Flower strategy within each architecture group.
    latent_dim, hidden_dim : int
        Generator noise and hidden sizes (FedGen on MNIST: 32, 256).
    activation : {"relu", "none"}
        Output activation of the generator: that of the models' features, so that generated
        features lie where real ones do (fedkd's models: after a ReLU).
    gen_steps, gen_batch_size : int
        Server-side generator steps per round (official: 50) and their batch size (32).
    gen_lr, gen_weight_decay, gen_lr_decay : float
        The generator's Adam, kept across rounds: lr 3e-4 decayed by 0.98 per round, L2
        weight decay 1e-2 (official).
    diversity : float
        Weight of the diversity term of the generator loss.
    alpha, beta : float
        Client regularizer weights (generated-feature CE and latent KL): ``max(1e-4, α ·
        decay^(round − 1))``. Official: 10 with plain SGD at a local lr of 0.01
        (``clients.lr = 0.01``): α·lr is what matters, and α = 10 at fedkd's default
        lr 0.05 diverged in a measured run.
    reg_steps : int
        The regularizer applies in the first ``reg_steps`` local steps (official: all 20).
    label_sampling : {"uniform", "prior"}
        Labels of generated features, on the server and the clients: uniform over the labels
        some client holds (official) or ∝ the clients' summed label counts.
    """

    uses_client_models = True

    def __init__(
        self,
        *args: Any,
        base: str = "fedavg",
        latent_dim: int = 32,
        hidden_dim: int = 256,
        activation: str = "relu",
        gen_steps: int = 50,
        gen_batch_size: int = 32,
        gen_lr: float = 3e-4,
        gen_weight_decay: float = 1e-2,
        gen_lr_decay: float = 0.98,
        diversity: float = 1.0,
        alpha: float = 10.0,
        beta: float = 10.0,
        decay: float = 0.98,
        reg_steps: int = 20,
        label_sampling: str = "uniform",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        ctx = self.context
        if ctx is None:
            raise ValueError("FedGen needs a ServerContext")
        for name, v in (("gen-steps", gen_steps), ("reg-steps", reg_steps), ("gen-batch-size", gen_batch_size)):
            if v < 1:
                raise ConfigError(f"strategy.fedgen.{name} must be ≥ 1, got {v}")
        for name, f in (("alpha", alpha), ("beta", beta), ("diversity", diversity), ("gen-weight-decay", gen_weight_decay)):
            if f < 0:
                raise ConfigError(f"strategy.fedgen.{name} must be ≥ 0, got {f}")
        for name, f in (("decay", decay), ("gen-lr-decay", gen_lr_decay)):
            if not 0 < f <= 1:
                raise ConfigError(f"strategy.fedgen.{name} must be in (0, 1], got {f}")
        if not gen_lr > 0:
            raise ConfigError(f"strategy.fedgen.gen-lr must be > 0, got {gen_lr}")
        check_choice("strategy.fedgen.label-sampling", label_sampling, LABEL_SAMPLING)
        check_choice("strategy.fedgen.activation", activation, ACTIVATIONS)
        dims = {a: ctx.build(a).feature_dim for a in self.delegates}
        if len(set(dims.values())) != 1:
            detail = ", ".join(f"{a}={d}" for a, d in dims.items())
            raise ConfigError(
                f"FedGen needs one feature dimension across client architectures, got {detail}; set model.feature-dim"
            )
        self.feature_dim = next(iter(dims.values()))
        self.latent_dim, self.hidden_dim, self.activation = latent_dim, hidden_dim, activation
        self.gen_steps, self.alpha, self.beta, self.decay, self.reg_steps = gen_steps, alpha, beta, decay, reg_steps
        self.gen_batch_size, self.gen_lr, self.gen_lr_decay = gen_batch_size, gen_lr, gen_lr_decay
        self.label_sampling = label_sampling
        gen = build_generator(
            "feature", (self.feature_dim,), ctx.num_classes, latent_dim=latent_dim, hidden_dim=hidden_dim,
            activation=activation,
        )  # fmt: skip
        self.synth = Synthesizer(
            gen.to(ctx.device), make_objective("fedgen", f"div={diversity}"), gen_batch_size, gen_lr, seed=ctx.seed,
            weight_decay=gen_weight_decay,
        )  # fmt: skip
        self.prior = self.federation.label_counts.sum(0).astype(np.float64)
        self.trained = False

    def sampling_prior(self) -> np.ndarray:
        """Probabilities of generated labels: uniform over held labels, or ∝ the counts."""
        if self.label_sampling == "uniform":
            held = (self.prior > 0).astype(np.float64)
            return held / held.sum() if held.sum() > 0 else np.full_like(self.prior, 1.0 / len(self.prior))
        return self.prior / self.prior.sum() if self.prior.sum() > 0 else np.full_like(self.prior, 1.0 / len(self.prior))

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
        scale = self.decay ** (server_round - 1)
        prior = self.sampling_prior()
        for msg in msgs:
            msg.content[records.GENERATOR] = gen
            conf = msg.content.config_records[records.CONFIG]
            conf["fedgen.alpha"] = max(1e-4, self.alpha * scale) if self.alpha > 0 else 0.0
            conf["fedgen.beta"] = max(1e-4, self.beta * scale) if self.beta > 0 else 0.0
            conf["fedgen.steps"] = self.reg_steps
            conf["fedgen.gen-batch-size"] = self.gen_batch_size
            conf["fedgen.latent-dim"] = self.latent_dim
            conf["fedgen.hidden-dim"] = self.hidden_dim
            conf["fedgen.activation"] = self.activation
            conf["fedgen.label-prior"] = [float(p) for p in prior]
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
        self.synth.label_prior = torch.as_tensor(self.sampling_prior())
        self.synth.set_lr(self.gen_lr * self.gen_lr_decay ** (server_round - 1))
        stats: dict[str, list[float]] = {}
        for _ in range(self.gen_steps):  # the official objective: Σ_k class-share-weighted CE_k + diversity
            for k, v in self.synth.step(teacher, per_member="mean").items():
                stats.setdefault(k, []).append(v)
        self.trained = True
        self.round_metrics.update({k: float(np.mean(v)) for k, v in stats.items()})
        return state, metrics
