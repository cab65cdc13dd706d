"""FedEnsemble: the ensemble of the round's client models, evaluated as an upper bound.

Within each group the base strategy aggregates as usual (that is the model sent back to
clients); the reported ``accuracy`` of a round is the test accuracy of the uniform
ensemble of the client models of that round, as FedGen (Table 1) and DENSE (the "ensemble"
row) report it. ``model_accuracy`` keeps the aggregated global model's. With ``rounds = 1``
it is DENSE's one-shot upper bound.

``ensemble`` chooses how the members are combined, with the same key and meaning as the
distillation strategies': ``logits`` (default; the logit average DENSE and FedGen evaluate)
or ``probs`` (the probability average FedDF's and FedFTG's defaults distil), so that the bound
printed beside a distilled model is the teacher that model was distilled from.

ClientApp: ordinary local training.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord

from fedkd.distill import EnsembleTeacher
from fedkd.federation import GroupedStrategy
from fedkd.synthesis import check_choice
from strategies import STRATEGIES


@STRATEGIES.register("fedensemble")
class FedEnsemble(GroupedStrategy):
    """Base aggregation per group; the round's client ensemble is what is evaluated."""

    uses_client_models = True

    def __init__(self, *args: object, base: str = "fedavg", ensemble: str = "logits", **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        check_choice("strategy.fedensemble.ensemble", ensemble, ("logits", "probs"))
        self.ensemble_average = ensemble

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        state, metrics = super().aggregate_train(server_round, replies)
        members = self.client_models(self.accepted)
        if members and self.context is not None and self.context.evaluate is not None:
            loss, acc = self.context.evaluate(EnsembleTeacher([m for m, _ in members], average=self.ensemble_average))
            self.round_metrics.update({"accuracy": acc, "loss": loss, "ensemble_size": len(members)})
        return state, metrics
