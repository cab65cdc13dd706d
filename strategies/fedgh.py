"""FedGH: heterogeneous federated learning with a generalized global header (Yi et al., ACM
Multimedia 2023), for heterogeneous models.

Each client keeps its representation (everything but ``classifier``) between its rounds and
trains its whole model with cross-entropy (:class:`fedkd.train.FedGHRule`); after training it
sends the mean feature of each of its classes. The server trains one linear header, for every
architecture, on those (prototype, class) pairs, one epoch of SGD per round, and sends it to
everyone as their head (in the model, as LG-FedAvg's global head). Architectures may differ:
only the heads (``feature_dim × classes``) must match, so set ``model.feature-dim``. Scored
per client (``partition.test-fraction`` with ``eval.fraction = 1``).

Official code read: PFLlib / HtFLlib ``clientgh.py`` / ``servergh.py`` (prototypes from
``collect_protos``, eval mode, all training data, after training; ``train_head``: one pass over
the uploaded pairs, shuffled, batch ``--batch_size`` (HtFLlib default 10), SGD without momentum
at ``--server_learning_rate`` (HtFLlib default 0.01), ``nn.CrossEntropyLoss``; the header
starts as the first client's head).

Deviations: the header starts as the global architecture's initial head; a rejected reply's
prototypes are not used. The representations never travel (the messages carry the header,
the replies their head and prototypes).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from torch import nn
from torch.nn import functional as F

from fedkd import records
from fedkd.errors import ConfigError
from fedkd.federation import GroupedStrategy
from fedkd.train import derive_seed
from strategies import STRATEGIES
from strategies.lgfedavg import HEAD, check_one_head


@STRATEGIES.register("fedgh")
class FedGH(GroupedStrategy):
    """Local representations; one header for all, trained by the server on the clients' class
    prototypes (``server_lr``, ``batch_size``)."""

    client_rule = "fedgh"

    def __init__(self, *args: Any, base: str = "fedavg", server_lr: float = 0.01, batch_size: int = 10,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        check_one_head(self, "fedgh")
        if not server_lr > 0:
            raise ConfigError(f"strategy.fedgh.server-lr must be > 0, got {server_lr!r}")
        if batch_size < 1:
            raise ConfigError(f"strategy.fedgh.batch-size must be ≥ 1, got {batch_size!r}")
        self.server_lr, self.batch_size = float(server_lr), int(batch_size)
        self._sent_head: dict[str, np.ndarray] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sub = records.unpack(arrays, self.federation.global_arch)
        self._sent_head = {k: v.numpy() for k, v in sub.items() if k.startswith(HEAD)}
        return super().configure_train(server_round, arrays, config, grid)

    def train_head(self, server_round: int, protos: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        """One epoch of SGD on ``(protos, labels)`` from the header sent this round."""
        w, b = self._sent_head[HEAD + "weight"], self._sent_head[HEAD + "bias"]
        head = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(w))
            head.bias.copy_(torch.from_numpy(b))
        opt = torch.optim.SGD(head.parameters(), lr=self.server_lr)
        x, y = torch.from_numpy(protos).float(), torch.from_numpy(labels).long()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(derive_seed(self.federation.seed, server_round, 0x6E)))
        for i in range(0, len(x), self.batch_size):
            idx = order[i : i + self.batch_size]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.round_metrics["fedgh_head_loss"] = float(F.cross_entropy(head(x), y).detach())
        return {HEAD + "weight": head.weight.detach().numpy().astype(w.dtype),
                HEAD + "bias": head.bias.detach().numpy().astype(b.dtype)}  # fmt: skip

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent = self.take_rule_arrays(replies)  # before the per-group bases
        state, metrics = super().aggregate_train(server_round, replies)
        if state is None or not self._sent_head:
            return state, metrics
        dim = self._sent_head[HEAD + "weight"].shape[1]
        xs, ys = [], []
        for msg in self.accepted:
            rec = sent.get(msg.metadata.src_node_id)
            if rec is None or "protos" not in rec or "counts" not in rec:
                continue
            p, counts = rec["protos"].numpy(), rec["counts"].numpy()
            if p.ndim != 2 or p.shape[1] != dim or counts.shape != (p.shape[0],) or not np.isfinite(p).all():
                continue
            have = np.flatnonzero(counts > 0)
            xs.append(p[have])
            ys.append(have)
        if not xs:
            return state, metrics
        head = self.train_head(server_round, np.concatenate(xs), np.concatenate(ys))
        self.round_metrics["fedgh_prototypes"] = int(sum(len(y) for y in ys))
        groups = {}
        for arch in self.federation.groups:
            sub = records.unpack(state, arch)
            groups[arch] = ArrayRecord({k: Array(head[k]) if k in head else v for k, v in sub.items()})
        return records.pack(groups), metrics
