"""LG-FedAvg: local representations, one global head shared by every architecture
(Liang et al., 2020, "Think Locally, Act Globally"; HtFLlib's heterogeneous-model version).

Each client keeps its representation (everything but ``classifier``) between its rounds
(:class:`fedkd.train.LGFedAvgRule`) and uses it for training and federated evaluation; the
server averages the classifier heads of all clients, across architecture groups, weighted
by examples, and sends that one head to everyone. Architectures may differ: only the heads
(``feature_dim × classes``) must match, so set ``model.feature-dim``. Within a group the
base strategy (``base``, default FedAvg) aggregates the heads first. The representations never
travel: a client starts from its group's initial one, rebuilt from the seed the server sends,
and the server's model keeps it (judge LG-FedAvg by per-client accuracy:
``partition.test-fraction`` with ``eval.fraction = 1``).

Official code: github.com/pliang279/LG-FedAvg (``main_lg.py``: ``w_glob_keys``, the global
layers, averaged; the rest local). HtFLlib (``serverlg.py`` / ``clientlg.py``) shares the
head across heterogeneous models as here.

Deviations: the first round starts every client from the group's initial representation
(the official code pre-trains with FedAvg for some rounds first).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fedkd import records
from fedkd.errors import ConfigError
from fedkd.federation import GroupedStrategy
from strategies import STRATEGIES

HEAD = "classifier."


def check_one_head(strategy: GroupedStrategy, name: str) -> None:
    """Refuse architectures whose classifier heads differ in shape (one head is shared by all)."""
    if strategy.context is None:
        return
    ctx = strategy.context
    shapes = {a: tuple(ctx.build(a).classifier.weight.shape) for a in strategy.federation.groups}
    if len(set(shapes.values())) > 1:
        raise ConfigError(
            f"{name} shares one classifier head across architectures, but their heads differ "
            f"({', '.join(f'{a} {s[1]}→{s[0]}' for a, s in shapes.items())}); set model.feature-dim"
        )


@STRATEGIES.register("lgfedavg")
class LGFedAvg(GroupedStrategy):
    """Local representations, a global classifier head averaged over every group."""

    client_rule = "lgfedavg"

    def __init__(self, *args: Any, base: str = "fedavg", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_one_head(self, "lgfedavg")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        state, metrics = super().aggregate_train(server_round, replies)
        if state is None or not self.accepted:
            return state, metrics
        total: dict[str, np.ndarray] = {}
        weight = 0.0
        for msg in self.accepted:  # every client's head, weighted by its examples, whatever its architecture
            n = float(msg.content.metric_records[records.METRICS][records.NUM_EXAMPLES])  # type: ignore[arg-type]
            for k, v in msg.content.array_records[records.ARRAYS].items():
                if k.startswith(HEAD):
                    total[k] = total.get(k, 0.0) + n * v.numpy().astype(np.float64)
            weight += n
        head = {k: v / weight for k, v in total.items()}
        groups = {}
        for arch in self.federation.groups:
            sub = records.unpack(state, arch)
            groups[arch] = ArrayRecord(
                {k: Array(head[k].astype(v.numpy().dtype)) if k in head else v for k, v in sub.items()}
            )
        return records.pack(groups), metrics
