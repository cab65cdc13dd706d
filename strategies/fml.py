"""FML: federated mutual learning for heterogeneous models (Shen et al., 2020, "Federated
Mutual Learning", arXiv:2006.16765; PFLlib / HtFLlib ``FML``), and the server side that it
shares with FedKD: a second model of one architecture for every client.

Every client keeps its own model (its group's architecture) between its rounds and trains,
beside it, the *meme* model, one architecture for all clients (``shared``, default the run's
global architecture), by deep mutual learning (:class:`fedkd.train.FMLRule`). Only the meme
is shared: the server averages the clients' memes, weighted by their examples, and sends the
average to the next round's clients in the message's rule arrays; it also scores it on the
held-out test set every round (``shared_accuracy``, ``shared_loss``). Judge FML by per-client
accuracy (``partition.test-fraction`` with ``eval.fraction = 1``): a client predicts with its
own model.

Official code read: there is none from the authors; PFLlib's ``clientfml.py`` /
``serverfml.py`` and HtFLlib's (``args.global_model``, a small CNN for every client;
``nn.KLDivLoss()``; both models' gradients clipped at norm 10; the meme's SGD at the local lr).

Deviations: α = β = 0.5 by default, the paper's (HtFLlib's defaults, α = β = 1, switch the
mutual terms off); each KL is the true KL (``batchmean``) toward the other model's detached
prediction, as the paper's per-model losses (PFLlib's ``nn.KLDivLoss()`` is KL / C and lets
each KL's gradient reach both models); the memes are averaged weighted by examples, as the
paper's FedAvg (PFLlib averages uniformly). The client's own model never travels (the messages
and replies carry an empty model record and the meme), so the byte counters count FML's traffic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedkd import records
from fedkd.errors import ConfigError
from fedkd.federation import GroupedStrategy
from fedkd.models import MODELS
from fedkd.train import derive_seed, recover_svd
from strategies import STRATEGIES

log = logging.getLogger(__name__)


class SharedModelStrategy(GroupedStrategy):
    """Clients keep their models (their rule keeps them); a second, shared model of one
    architecture (:attr:`shared_arch`) travels in the rule arrays, and the server averages it
    over the accepted replies, weighted by examples. Subclasses say how it is encoded on the
    way out (:meth:`outgoing`)."""

    client_rule: ClassVar[str] = ""
    checkpointed = ("shared",)

    def __init__(self, *args: Any, base: str = "fedavg", shared: str = "", clip: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        name = self.client_rule
        if self.context is None:
            raise ConfigError(f"{name} needs the server's context (model shapes) to build its shared model")
        self.shared_arch = shared or self.federation.global_arch
        MODELS.get(self.shared_arch)  # an unknown name is one error line
        if not clip >= 0:
            raise ConfigError(f"strategy.{name}.clip must be ≥ 0 (0: no clipping), got {clip!r}")
        self.clip = float(clip)
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(self.context.seed, 0x5EED))
            model = self.context.build(self.shared_arch)
        #: The shared model's weights (the server's average after each round).
        self.shared = records.to_record(model)
        self._round = 0

    def client_rule_params(self) -> dict[str, Any]:
        return {"shared": self.shared_arch, "clip": self.clip}

    def outgoing(self, server_round: int) -> ArrayRecord:
        """The shared model as this round's messages carry it."""
        return self.shared

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round = server_round
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        out = self.outgoing(server_round)
        for m in msgs:
            m.content[records.RULE_ARRAYS] = out
        return msgs

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent = self.take_rule_arrays(replies)  # before the per-group bases
        state, metrics = super().aggregate_train(server_round, replies)
        spec = {k: v.numpy() for k, v in self.shared.items()}
        total: dict[str, np.ndarray] = {}
        weight, replied = 0.0, 0  # replied: accepted replies that sent a shared model
        for msg in self.accepted:
            rec = sent.get(msg.metadata.src_node_id)
            if rec is None:
                continue
            replied += 1
            got = {k: v.numpy() for k, v in recover_svd({k: torch.from_numpy(v.numpy()) for k, v in rec.items()}).items()}
            if set(got) != set(spec) or any(got[k].shape != spec[k].shape or not np.isfinite(got[k]).all() for k in spec):
                log.warning("%s: node %s sent a shared model that does not fit; ignored",
                            self.client_rule, msg.metadata.src_node_id)  # fmt: skip
                continue
            n = float(msg.content.metric_records[records.METRICS][records.NUM_EXAMPLES])  # type: ignore[arg-type]
            for k, v in got.items():
                total[k] = total.get(k, 0.0) + n * v.astype(np.float64)
            weight += n
        if weight > 0:
            self.shared = ArrayRecord(
                {k: Array((total[k] / weight).round().astype(v.dtype) if v.dtype.kind in "iu" else
                          (total[k] / weight).astype(v.dtype)) for k, v in spec.items()}  # fmt: skip
            )
            self.round_metrics[f"{self.client_rule}_shared_clients"] = replied
        if self.context is not None and self.context.evaluate is not None:
            model = self.context.build(self.shared_arch)
            records.load_record(model, self.shared)
            loss, acc = self.context.evaluate(model)
            self.round_metrics["shared_loss"], self.round_metrics["shared_accuracy"] = loss, acc
        return state, metrics


@STRATEGIES.register("fml")
class FML(SharedModelStrategy):
    """Federated mutual learning: local models and a shared meme model (``shared``) teach each
    other; ``alpha`` / ``beta`` weigh the local / meme cross-entropy against its KL term."""

    client_rule = "fml"

    def __init__(self, *args: Any, alpha: float = 0.5, beta: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for key, v in (("alpha", alpha), ("beta", beta)):
            if not 0 <= v <= 1:
                raise ConfigError(f"strategy.fml.{key} must be in [0, 1], got {v!r}")
        self.alpha, self.beta = float(alpha), float(beta)

    def client_rule_params(self) -> dict[str, Any]:
        return {**super().client_rule_params(), "alpha": self.alpha, "beta": self.beta}
