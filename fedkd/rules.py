"""The server side of the strategies whose clients run a local-training rule
(:class:`fedkd.train.LocalRule`: SCAFFOLD, FedDyn, MOON, FedNova).

:class:`RuleStrategy` is Flower's FedAvg plus three hooks: it names its rule and the rule's
parameters in the train config (``rule``, ``rule.<param>``), may send arrays for it
(``rule-arrays``, e.g. SCAFFOLD's server control variate), and, when the replies come back,
takes the rule's arrays and metrics out of them before Flower's FedAvg aggregates the
models, then :meth:`~RuleStrategy.combine`\\ s the two. Being a plain Flower strategy, it is
the per-group base of a :class:`~fedkd.federation.GroupedStrategy` and the ``base`` of every
KD strategy (FedFTG on SCAFFOLD, ...). Its learned server state (attributes holding
ArrayRecords) is checkpointed with the strategy; the clients' state by
:mod:`fedkd.client_state`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedkd import records

#: State-dict names of BatchNorm's running statistics: averaged as FedAvg does, never
#: moved by a rule's server update (which is defined on parameters).
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def is_parameter(name: str, value: np.ndarray) -> bool:
    """Whether a state-dict entry is a trainable parameter (not a BatchNorm statistic)."""
    return value.dtype.kind == "f" and not name.endswith(BUFFER_SUFFIXES)


@dataclass
class RuleReply:
    """One valid reply, as the rule's server side sees it."""

    weights: dict[str, np.ndarray]  # the client's model
    examples: float  # num-examples
    arrays: dict[str, np.ndarray]  # the rule's arrays (rule-arrays)
    metrics: dict[str, float]


def _numpy(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


class RuleStrategy(FedAvg):
    """FedAvg whose clients run the registered local-training rule :attr:`rule`."""

    #: The rule's name in :data:`fedkd.train.LOCAL_RULES`.
    rule: ClassVar[str] = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._current: ArrayRecord | None = None  # the group's model sent this round

    @property
    def num_clients(self) -> int:
        """Clients of this group (fedkd sets ``min_available_nodes`` to the group's size)."""
        return max(int(self.min_available_nodes), 1)

    def rule_params(self) -> dict[str, Any]:
        """The rule's keyword arguments, sent as ``rule.<param>`` config keys."""
        return {}

    def rule_arrays(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord | None:
        """Arrays the rule needs from the server this round (``rule-arrays``), or None."""
        return None

    def combine(
        self, server_round: int, current: ArrayRecord, averaged: ArrayRecord, replies: list[RuleReply]
    ) -> ArrayRecord:
        """The group's new model from the sent one, FedAvg's average and the valid replies."""
        return averaged

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._current = arrays
        config[records.RULE] = self.rule
        for k, v in self.rule_params().items():
            config[f"{records.RULE}.{k.replace('_', '-')}"] = v
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        extra = self.rule_arrays(server_round, arrays)
        if extra is not None:
            for m in msgs:
                m.content[records.RULE_ARRAYS] = extra
        return msgs

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[records.RULE] = self.rule  # a personalizing rule's clients evaluate with their own parts
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        taken: list[RuleReply] = []
        for msg in replies:
            if msg.has_error() or records.ARRAYS not in msg.content.array_records:
                continue
            extra = msg.content.array_records.get(records.RULE_ARRAYS)
            if extra is not None:  # Flower's FedAvg aggregates exactly one ArrayRecord per reply
                del msg.content[records.RULE_ARRAYS]
            metrics = msg.content.metric_records.get(records.METRICS) or MetricRecord()
            taken.append(
                RuleReply(
                    _numpy(msg.content.array_records[records.ARRAYS]),
                    float(metrics.get(records.NUM_EXAMPLES, 0.0)),  # type: ignore[arg-type]
                    _numpy(extra) if extra is not None else {},
                    {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},  # type: ignore[misc]
                )
            )
        averaged, aggregated = super().aggregate_train(server_round, replies)
        current, self._current = self._current, None
        if averaged is None or current is None or not taken:
            return averaged, aggregated
        return self.combine(server_round, current, averaged, taken), aggregated
