"""An example external fedkd strategy: FedAvg with a server learning rate and update clipping.

The server update is ``w ← w + server_lr · clip(avg − w, max_norm)``. With ``server_lr = 1``
and ``max_norm = 0`` (no clipping) it is exactly FedAvg.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


class FedAvgClipped(FedAvg):
    """FedAvg whose aggregated update is scaled by ``server_lr`` and clipped to ``max_norm``.

    Parameters
    ----------
    server_lr : float
        Server learning rate applied to the averaged update.
    max_norm : float
        Clip the update's global L2 norm to this value; 0 disables clipping.
    """

    def __init__(self, *args, server_lr: float = 1.0, max_norm: float = 0.0, **kwargs) -> None:  # noqa: ANN002,ANN003
        super().__init__(*args, **kwargs)
        self.server_lr = server_lr
        self.max_norm = max_norm
        self._current: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._current = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        avg, metrics = super().aggregate_train(server_round, replies)
        if avg is None or self._current is None:
            return avg, metrics
        old = {k: v.numpy() for k, v in self._current.items()}
        delta = {k: avg[k].numpy() - old[k] for k in old}
        norm = float(np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in delta.values())))
        scale = self.server_lr
        if self.max_norm > 0 and norm > self.max_norm:
            scale *= self.max_norm / norm
        new = ArrayRecord({k: Array(np.asarray(old[k] + scale * delta[k]).astype(old[k].dtype)) for k in old})
        return new, metrics
