"""FedDyn: federated learning with dynamic regularization (Acar et al., ICLR 2021).

Each client minimizes ``L_i(θ) − ⟨g_i, θ⟩ + (α/2) ||θ − x||²`` and updates its state
``g_i ← g_i − α (θ_i − x)`` (:class:`fedkd.train.FedDynRule`, state kept between its rounds).
The server keeps ``h`` (zero at first): ``h ← h − α (1/N) Σ_{i∈P} (θ_i − x)`` over the N
clients of the group, and the new model is ``(1/|P|) Σ_{i∈P} θ_i − h / α``. The official
code (github.com/alpemreacar/FedDyn, ``utils_methods.py``, ``train_FedDyn``) does the same with
the average uniform over the round's clients; here BatchNorm's running statistics are
averaged as FedAvg does (by examples) and ``h`` acts on parameters only.

Deviations: the official code divides α by each client's relative data size
(``alpha_coef / weight_list[clnt]``); fedkd uses one α for every client. The official local
training clips gradients at norm 10; fedkd's does not (no local rule clips). fedkd evaluates
the model it sends (the cloud model ``mean θ − h/α``); the official code reports the plain
averages of the round's (``tst_perf_sel``) and of all clients' latest models
(``tst_perf_all``). Audit and recipe: ``sims/papers/mnist5k-feddyn-dir0.1.toml``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedkd.errors import ConfigError
from fedkd.rules import RuleReply, RuleStrategy, is_parameter, to_record
from strategies import STRATEGIES


@STRATEGIES.register("feddyn")
class FedDyn(RuleStrategy):
    """FedDyn with regularization strength ``alpha`` (the paper's α; 0.01 in its experiments)."""

    rule = "feddyn"

    def __init__(self, *args: Any, alpha: float = 0.01, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not alpha > 0:
            raise ConfigError(f"strategy.feddyn.alpha must be > 0, got {alpha!r}")
        self.alpha = float(alpha)
        #: The server's ``h`` by parameter name (empty: all zero).
        self.h = ArrayRecord()

    def rule_params(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def combine(
        self, server_round: int, current: ArrayRecord, averaged: ArrayRecord, replies: list[RuleReply]
    ) -> ArrayRecord:
        sent = {k: v.numpy() for k, v in current.items()}
        h = {k: v.numpy().astype(np.float64) for k, v in self.h.items()}
        out: dict[str, np.ndarray] = {}
        for k, a in averaged.items():
            x = sent[k]
            if not is_parameter(k, x):
                out[k] = a.numpy()
                continue
            thetas = [r.weights[k].astype(np.float64) for r in replies]
            drift = sum(t - x for t in thetas)
            h[k] = h.get(k, np.zeros(x.shape)) - self.alpha * drift / self.num_clients
            out[k] = (sum(thetas) / len(thetas) - h[k] / self.alpha).astype(x.dtype)
        self.h = to_record({k: v.astype(np.float32) for k, v in h.items()})
        return to_record(out)
