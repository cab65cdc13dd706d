"""MOON: model-contrastive federated learning (Li, He, Song, CVPR 2021).

The server is FedAvg; each client adds ``μ · ℓ_con``, a contrastive term that pulls the
features of its local model toward the received global model's and away from its own
previous round's model (:class:`fedkd.train.MoonRule`, the previous model kept between the
client's rounds, :mod:`fedkd.client_state`).

Deviations from the official code (github.com/QinbinLi/MOON, ``main.py``,
``train_net_fedcon``; ``model.py``): the representation is the model's feature layer
(``features``, ``model.feature-dim``), not an extra projection head: the official
``--use_project_head 0`` (PFLlib does the same). A client's first round, which has no
previous model, trains without the term: the official code's round 1 does too (its pool is
empty), but with partial participation its later first-timers use their random-init net as
the negative. The official optimizer hard-codes momentum 0.9 and weight decay 1e-5; here
they are ``clients.momentum`` / ``clients.weight-decay`` (default 0). The last partial batch
is kept (the official drops it). As in the official code: one previous model (buffer size
1), the global and previous models frozen in eval mode, μ = 1 and τ = 0.5 by default.
Audit and recipe: ``sims/papers/mnist5k-moon-dir0.1.toml``.
"""

from __future__ import annotations

from typing import Any

from fedkd.errors import ConfigError
from fedkd.rules import RuleStrategy
from strategies import STRATEGIES


@STRATEGIES.register("moon")
class Moon(RuleStrategy):
    """MOON with weight ``mu`` (paper: 5 on CIFAR-10, 1 elsewhere) and temperature ``temperature`` (0.5)."""

    rule = "moon"

    def __init__(self, *args: Any, mu: float = 1.0, temperature: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not mu >= 0:
            raise ConfigError(f"strategy.moon.mu must be ≥ 0, got {mu!r}")
        if not temperature > 0:
            raise ConfigError(f"strategy.moon.temperature must be > 0, got {temperature!r}")
        self.mu, self.temperature = float(mu), float(temperature)

    def rule_params(self) -> dict[str, Any]:
        return {"mu": self.mu, "temperature": self.temperature}
