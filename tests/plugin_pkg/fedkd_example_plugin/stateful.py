"""Example 4: a strategy whose clients keep state between the rounds they are sampled in.

Each client adds ``(mu / 2) ||θ − θ_prev||²`` to its loss, ``θ_prev`` being its own model at the
end of its last round (its state; none in its first round). The server is FedAvg. With
``mu = 0`` it is exactly FedAvg.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fedkd.rules import RuleStrategy
from fedkd.train import LocalRule, LocalTrainConfig


class PreviousModelProx(LocalRule):
    """The client side: registered as the local-training rule ``prev-prox``."""

    stateful = True  # fedkd keeps `self.state` for this client, and checkpoints it with the run

    def __init__(self, model: nn.Module, cfg: LocalTrainConfig, server: dict[str, Tensor],
                 state: dict[str, Tensor] | None, mu: float = 0.1) -> None:  # fmt: skip
        super().__init__(model, cfg, server, state)
        self.mu = mu
        self.prev = state  # what `end` saved at this client's last round, on the CPU; None at first

    def loss(self, model: nn.Module, x: Tensor, features: Tensor | None, logits: Tensor, y: Tensor) -> Tensor | None:
        if self.prev is None or self.mu == 0:
            return None
        terms = [((p - self.prev[n].to(p)) ** 2).sum() for n, p in model.named_parameters()]
        return 0.5 * self.mu * torch.stack(terms).sum()

    def end(self, model: nn.Module, steps: int) -> None:
        self.state = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.metrics = {"prev-prox-first": float(self.prev is None)}  # added to the reply's metrics


class FedAvgPrevProx(RuleStrategy):
    """The server side: FedAvg that names the rule and sends its parameter."""

    rule = "prev-prox"

    def __init__(self, *args: Any, mu: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mu = mu

    def rule_params(self) -> dict[str, Any]:
        return {"mu": self.mu}  # reaches the rule's constructor as `mu`
