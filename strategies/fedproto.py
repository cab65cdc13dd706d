"""FedProto: federated prototype learning for heterogeneous models (Tan et al., AAAI 2022).

No model is averaged: every client keeps its own model between its rounds
(:class:`fedkd.train.FedProtoRule`). Each round a client sends its class prototypes, the
mean feature (``model.features``) of each class over its training data, computed in eval
mode after training; the server averages them per class over the clients that have the class
(uniformly, as the official ``proto_aggregation``) and sends the global prototypes back. A
client adds ``λ · MSE`` between each sample's features and its label's global prototype, and
predicts by the nearest global prototype (federated evaluation does the same; before there
are prototypes, the head). Architectures may differ; the features must have one dimension:
set ``model.feature-dim``. Judge it by per-client accuracy (``partition.test-fraction`` with
``eval.fraction = 1``).

Official code read: github.com/yuetan031/FedProto (``lib/update.py`` ``update_weights_het``:
``loss2 = MSE(proto_new, protos)`` times ``ld``, ``proto_new`` the batch's features with each
row replaced by its label's global prototype when there is one; the client's prototypes are
the per-class means of the features of its last local epoch's batches, taken during training;
``lib/utils.py`` ``proto_aggregation``: uniform over the clients that have the class) and
PFLlib's ``clientproto.py`` / ``serverproto.py`` (the same term, λ = ``--lamda`` default 1;
prototypes from ``collect_protos``, in eval mode after training; test by the smallest MSE to a
global prototype).

Deviations: the prototypes are PFLlib's (eval mode, all training data, after training), not
the official last-epoch training-mode ones. No model travels (the messages and replies carry
the prototypes and an empty model record), so the byte counters count FedProto's traffic.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedkd import records
from fedkd.errors import ConfigError
from strategies import STRATEGIES
from strategies.fd import ClassVectorStrategy


@STRATEGIES.register("fedproto")
class FedProto(ClassVectorStrategy):
    """Class prototypes shared, models local; ``lamda`` weighs the prototype term."""

    client_rule = "fedproto"
    key = "protos"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.context is not None:
            dims = {a: self.context.build(a).feature_dim for a in self.federation.groups}
            if len(set(dims.values())) > 1:
                raise ConfigError(
                    "fedproto shares class prototypes across architectures, but their feature dimensions differ "
                    f"({', '.join(f'{a} {d}' for a, d in dims.items())}); set model.feature-dim"
                )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        msgs = list(super().configure_evaluate(server_round, arrays, config, grid))
        if len(self.global_logits):  # the clients predict by the nearest global prototype
            for m in msgs:
                m.content[records.RULE_ARRAYS] = self.global_logits
        return msgs
