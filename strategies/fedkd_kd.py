"""FedKD: communication-efficient federated learning via adaptive mutual knowledge
distillation (Wu et al., Nature Communications 13, 2032, 2022), for heterogeneous models.

Every client keeps its own large model, the *mentor* (its group's architecture), and trains
beside it the shared *mentee* (``shared``, default the run's global architecture), the two
teaching each other with losses scaled by their cross-entropies (adaptive mutual
distillation, and a hidden-state loss through a local projection ``W_h``;
:class:`fedkd.train.FedKDRule`). Only the mentee travels, compressed: each weight matrix is
sent as its truncated SVD holding a fraction ``energy`` of its squared norm, the fraction
rising linearly from ``t_start`` in the first round to ``t_end`` in the last (dynamic
gradient approximation); the server decompresses the replies, averages them weighted by
examples, and compresses the average the same way for the next round. Scored per client
(``partition.test-fraction`` with ``eval.fraction = 1``); the mentee is scored on the held-out
test set every round (``shared_accuracy``).

Official code read: github.com/wuch15/FedKD ``model_bert.py`` (one loss
``CE_t + CE_s + (KL_ts + KL_st + 2·MSE)/(CE_t + CE_s)``, ``nn.KLDivLoss()`` mean reduction,
nothing detached), PFLlib / HtFLlib ``clientkd.py`` / ``serverkd.py`` (``W_h`` a bias-free
linear map of the mentee's features, SGD at the local lr for mentor, mentee and ``W_h``,
gradients clipped at 10, ``T_start = 0.95``, ``T_end = 0.98``, SVD of every parameter with
more than one row and more than one dimension).

Deviations: the mentees are averaged weighted by examples (PFLlib: uniformly); convolution
kernels travel whole (PFLlib decomposes each ``k × k`` kernel slice, which saves nothing at
``k ≤ 5``) and so does a matrix whose factors would not be smaller; the first round sends the
initial mentee whole (PFLlib's clients start from their own copy). The client's own model never
travels, so the byte counters count FedKD's traffic: the mentee's factors.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import Array, ArrayRecord

from fedkd.errors import ConfigError
from fedkd.train import compress_svd
from strategies import STRATEGIES
from strategies.fml import SharedModelStrategy


@STRATEGIES.register("fedkd")
class FedKD(SharedModelStrategy):
    """Adaptive mutual distillation between local mentors and a shared mentee (``shared``),
    whose weights travel as truncated SVDs holding ``t_start`` → ``t_end`` of their energy."""

    client_rule = "fedkd"

    def __init__(self, *args: Any, t_start: float = 0.95, t_end: float = 0.98, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for key, v in (("t-start", t_start), ("t-end", t_end)):
            if not 0 < v <= 1:
                raise ConfigError(f"strategy.fedkd.{key} must be in (0, 1] (1: no compression), got {v!r}")
        self.t_start, self.t_end = float(t_start), float(t_end)

    def energy(self, server_round: int) -> float:
        """The fraction of each matrix's energy sent in ``server_round`` (1-based)."""
        rounds = max(self.context.rounds if self.context is not None else 1, 1)
        return self.t_start + (server_round - 1) / rounds * (self.t_end - self.t_start)

    def client_rule_params(self) -> dict[str, Any]:
        return {**super().client_rule_params(), "energy": self.energy(self._round)}

    def outgoing(self, server_round: int) -> ArrayRecord:
        if server_round <= 1:
            return self.shared
        state = {k: torch.from_numpy(v.numpy().copy()) for k, v in self.shared.items()}
        return ArrayRecord({k: Array(v.numpy()) for k, v in compress_svd(state, self.energy(server_round - 1)).items()})
