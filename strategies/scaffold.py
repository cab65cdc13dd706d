"""SCAFFOLD: stochastic controlled averaging (Karimireddy et al., ICML 2020), option II.

The server keeps a control variate ``c`` (zero at first) and sends it with the model; each
client corrects every local gradient by ``c − c_i`` with its own control ``c_i`` (kept
between its rounds, :mod:`fedkd.client_state`), then sends its model and
``Δc_i = c_i⁺ − c_i`` (:class:`fedkd.train.ScaffoldRule`). The server moves the model by
``η_g`` times the average update and sets ``c ← c + (1/N) Σ_{i∈S} Δc_i`` over the N clients
of the group.

Deviation: the average of the clients' models is FedAvg's, weighted by examples (the paper's
is uniform), so that SCAFFOLD differs from the FedAvg it is compared with only by its
control variates. The control variates double what travels each way; the byte counters
count it. The correction is added to the gradient before the optimizer step, so with
``clients.momentum > 0`` it goes through the momentum buffer (Flower's niid_bench adds it
after; identical at momentum 0); ``c`` is updated uniformly, as in the paper (niid_bench and
the FedDyn authors' baseline weight it by examples); no gradient clipping (the FedDyn
authors' baseline clips at 10). Recipe and audit: ``sims/papers/mnist5k-scaffold-dir0.1.toml``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedkd.errors import ConfigError
from fedkd.rules import RuleReply, RuleStrategy, is_parameter, to_record
from strategies import STRATEGIES


@STRATEGIES.register("scaffold")
class Scaffold(RuleStrategy):
    """SCAFFOLD; ``server_learning_rate`` is the paper's global step ``η_g`` (1: the average)."""

    rule = "scaffold"

    def __init__(self, *args: Any, server_learning_rate: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not server_learning_rate > 0:
            raise ConfigError(f"strategy.scaffold.server-learning-rate must be > 0, got {server_learning_rate!r}")
        self.server_learning_rate = float(server_learning_rate)
        #: The server control variate ``c`` by parameter name (empty: all zero).
        self.control = ArrayRecord()

    def rule_arrays(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord | None:
        return self.control

    def combine(
        self, server_round: int, current: ArrayRecord, averaged: ArrayRecord, replies: list[RuleReply]
    ) -> ArrayRecord:
        c = {k: v.numpy().astype(np.float64) for k, v in self.control.items()}
        for r in replies:
            for k, d in r.arrays.items():
                c[k] = c.get(k, 0.0) + d.astype(np.float64) / self.num_clients
        sent = {k: v.numpy() for k, v in current.items()}
        self.control = to_record({k: v.astype(sent[k].dtype if k in sent else np.float32) for k, v in c.items()})
        if self.server_learning_rate == 1.0:
            return averaged
        out = {}
        for k, a in averaged.items():
            avg, x = a.numpy(), sent[k]
            out[k] = (x + self.server_learning_rate * (avg - x)).astype(x.dtype) if is_parameter(k, x) else avg
        return to_record(out)
