"""FD / FedDistill: federated distillation of per-class logits, for heterogeneous models
(Jeong et al., 2018, "Communication-Efficient On-Device Machine Learning: Federated
Distillation and Augmentation under Non-IID Private Data"; PFLlib / HtFLlib ``FedDistill``).

No model is averaged: every client keeps its own model between its rounds
(:class:`fedkd.train.FDRule`) and uses it for training and federated evaluation. Each round
a client sends the mean of its logits per class (over its training samples, as it trained);
the server averages them per class over the clients that have the class (uniformly, as
PFLlib's ``logit_aggregation``) and sends the global logits to the next round's clients,
which add ``λ · MSE`` toward the global logit of each sample's label. Architectures may
differ freely: only ``C × C`` logits are shared. Judge it by per-client accuracy
(``partition.test-fraction`` with ``eval.fraction = 1``); the server's global-model accuracy
is the per-group average of models no client uses.

Official code read: github.com/TsingZ0/PFLlib ``system/flcore/clients/clientdistill.py`` and
``servers/serverdistill.py`` (λ = ``--lamda`` default 1.0, ``nn.MSELoss()`` mean reduction,
logits collected during training, classes averaged over the clients that have them).

No model travels: the messages and replies carry an empty model record (the clients' models
are their own, :meth:`fedkd.federation.GroupedStrategy.kept_names`) and the logits, so the
byte counters count FD's traffic as the paper does; a client starts, in its first round, from
its group's initial model, rebuilt from the seed the server sends (as in PFLlib, where every
client starts from the same initialization). The server's model of each group is therefore
its initial one: judge FD per client.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedkd import records
from fedkd.errors import ConfigError
from fedkd.federation import GroupedStrategy
from strategies import STRATEGIES


class ClassVectorStrategy(GroupedStrategy):
    """Models stay on the clients (their rule keeps them); what is shared is one vector per
    class (:attr:`key`: ``logits`` for FD, ``protos`` for FedProto), averaged per class over
    the clients that have the class, uniformly, and sent back with a ``has`` mask."""

    key: ClassVar[str] = ""
    checkpointed = ("global_logits",)

    def __init__(self, *args: Any, base: str = "fedavg", lamda: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not lamda >= 0:
            raise ConfigError(f"strategy.{self.client_rule}.lamda must be ≥ 0, got {lamda!r}")
        self.lamda = float(lamda)
        #: The global per-class vectors (:attr:`key`: C × D, ``has``: which classes have one).
        self.global_logits = ArrayRecord()

    def client_rule_params(self) -> dict[str, Any]:
        return {"lamda": self.lamda}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        if len(self.global_logits):
            for m in msgs:
                m.content[records.RULE_ARRAYS] = self.global_logits
        return msgs

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sums: np.ndarray | None = None
        clients: np.ndarray | None = None
        for rec in self.take_rule_arrays(replies).values():  # before the per-group bases
            if self.key not in rec or "counts" not in rec:
                continue
            logits, has = rec[self.key].numpy().astype(np.float64), rec["counts"].numpy() > 0
            if logits.ndim != 2 or has.shape != (logits.shape[0],) or not np.isfinite(logits).all() \
                    or (sums is not None and sums.shape != logits.shape):  # fmt: skip
                continue
            sums = np.zeros_like(logits) if sums is None else sums
            clients = np.zeros(len(has)) if clients is None else clients
            sums[has] += logits[has]
            clients += has
        state, metrics = super().aggregate_train(server_round, replies)
        if sums is not None and clients is not None:
            have = clients > 0
            mean = np.where(have[:, None], sums / np.maximum(clients, 1)[:, None], 0.0)
            self.global_logits = ArrayRecord(
                {self.key: Array(mean.astype(np.float32)), "has": Array(have.astype(np.float32))}
            )
            self.round_metrics[f"{self.client_rule}_classes"] = int(have.sum())
        return state, metrics


@STRATEGIES.register("fd")
class FD(ClassVectorStrategy):
    """Federated distillation: per-class logits shared, models local; ``lamda`` weighs the KD term."""

    client_rule = "fd"
    key = "logits"
