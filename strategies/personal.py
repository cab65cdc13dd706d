"""Personalized FL on FedAvg: FedBN, FedPer and FedRep (part of each client's model stays local).

The server is Flower's FedAvg (weighted by examples) over the shared part of the model; each
client keeps its own copy of the rest between its rounds (:class:`fedkd.train.PersonalRule`,
kept by :mod:`fedkd.client_state`) and uses it for training and for federated evaluation; the
local part never travels, either way. Judge them by per-client accuracy:
``partition.test-fraction`` with ``eval.fraction = 1``; the server's model keeps the initial
values of the local parts, so its accuracy is not a model any client uses.

- ``fedbn`` (Li et al., ICLR 2021; official code github.com/med-air/FedBN, ``federated/fed_digits.py``:
  the server skips ``bn`` keys when it averages): BatchNorm layers stay local.
- ``fedper`` (Arivazhagan et al., 2019): the classifier head stays local.
- ``fedrep`` (Collins et al., ICML 2021; official code github.com/lgcollins/FedRep,
  ``models/Update.py`` ``LocalUpdate.train``): the head stays local; ``head-steps`` head-only
  steps, then the representation's.

Deviations: FedRep counts its phases in optimizer
steps (``clients.local-steps``), the official code in epochs.
"""

from __future__ import annotations

from typing import Any

from fedkd.errors import ConfigError
from fedkd.rules import RuleStrategy
from strategies import STRATEGIES


@STRATEGIES.register("fedbn")
class FedBN(RuleStrategy):
    """FedAvg whose clients keep their BatchNorm layers."""

    rule = "fedbn"


@STRATEGIES.register("fedper")
class FedPer(RuleStrategy):
    """FedAvg whose clients keep their classifier heads."""

    rule = "fedper"


@STRATEGIES.register("fedrep")
class FedRep(RuleStrategy):
    """FedPer with FedRep's alternating local update: ``head_steps`` head-only steps, then the body's."""

    rule = "fedrep"

    def __init__(self, *args: Any, head_steps: int = 10, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if head_steps < 0:
            raise ConfigError(f"strategy.fedrep.head-steps must be ≥ 0, got {head_steps!r}")
        self.head_steps = int(head_steps)

    def rule_params(self) -> dict[str, Any]:
        return {"head_steps": self.head_steps}
