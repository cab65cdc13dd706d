"""Heterogeneous federations: architecture groups over Flower strategies.

A :class:`GroupedStrategy` is a Flower :class:`~flwr.serverapp.strategy.Strategy` that
keeps one instance of a base Flower strategy (FedAvg, FedProx, FedAvgM, FedAdam, or any
registered one) per architecture group. Each instance sees only its group's nodes and its
group's arrays, so stateful strategies (server momentum, Adam moments) keep per-group
state and Flower's own aggregation code runs unchanged. Flower's ``Strategy.start()`` owns
the round loop; the state it carries is one ArrayRecord with ``arch/param`` keys.

Strategies that do server-side work across groups (distillation) subclass
:class:`GroupedStrategy`, call ``super().aggregate_train`` and then do their work.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedkd import records
from fedkd.errors import ConfigError
from fedkd.models import MODELS, FedkdModel, build_model
from fedkd.train import derive_seed, group_init_seed

log = logging.getLogger(__name__)

# Constructor keywords of Flower strategies that fedkd sets itself (not config keys).
MANAGED_KWARGS = frozenset(
    {
        "fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
        "min_available_nodes", "weighted_by_key", "arrayrecord_key", "configrecord_key",
        "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn", "federation", "base_factory", "context",
        "client_learning_rate", "train_loss_key", "noise_seed", "tasks",
    }
)  # fmt: skip


def parse_architectures(spec: str, num_clients: int) -> list[str]:
    """Architecture of each partition id from ``clients.architectures``.

    ``"cnn"`` gives every client a CNN; ``"cnn:4,lenet5:3,resnet8:3"`` gives partitions
    0–3 a CNN, 4–6 a LeNet-5 and 7–9 a ResNet-8 (the counts must sum to ``clients.num``).
    """
    spec = spec.strip()
    if not spec:
        raise ConfigError("clients.architectures is empty")
    if ":" not in spec and "," not in spec:
        MODELS.get(spec)
        return [spec] * num_clients
    out: list[str] = []
    for item in spec.split(","):
        name, sep, count = item.strip().partition(":")
        name = name.strip()
        if not sep or not name or not count.strip().isdigit() or int(count) < 1:
            raise ConfigError(
                f"clients.architectures: cannot parse {item.strip()!r} in {spec!r}; "
                "expected NAME:COUNT[,NAME:COUNT...] with counts ≥ 1, e.g. 'cnn:4,lenet5:3,resnet8:3'"
            )
        MODELS.get(name)
        out.extend([name] * int(count))
    if len(out) != num_clients:
        raise ConfigError(f"clients.architectures assigns {len(out)} clients but clients.num is {num_clients}")
    return out


@dataclass(frozen=True)
class Federation:
    """Who is who, learned from the clients' replies to the opening query.

    Attributes
    ----------
    node_partition : dict
        node id → partition id.
    node_arch : dict
        node id → architecture name.
    label_counts : ndarray
        ``(num_partitions, num_classes)`` label counts reported by the clients.
    global_arch : str
        Architecture of the designated global model.
    """

    node_partition: Mapping[int, int]
    node_arch: Mapping[int, str]
    label_counts: np.ndarray
    global_arch: str
    seed: int = 0
    #: node id → the device it trains on, as the node reported it (``cpu`` when it did not).
    node_device: Mapping[int, str] = field(default_factory=dict)

    def device_counts(self) -> dict[str, int]:
        """How many nodes train on each device, e.g. ``{"cpu": 20}``."""
        out: dict[str, int] = {}
        for n in self.node_partition:
            d = self.node_device.get(n, "cpu")
            out[d] = out.get(d, 0) + 1
        return out

    @property
    def groups(self) -> list[str]:
        """Architecture groups in first-seen partition order, then the global one."""
        order = sorted(self.node_partition, key=lambda n: self.node_partition[n])
        out = list(dict.fromkeys(self.node_arch[n] for n in order))
        if self.global_arch not in out:
            out.append(self.global_arch)
        return out

    def nodes(self, arch: str) -> list[int]:
        """Node ids of group ``arch``, by partition id."""
        return sorted((n for n, a in self.node_arch.items() if a == arch), key=lambda n: self.node_partition[n])

    def group_label_counts(self, arch: str) -> np.ndarray:
        """Summed label counts of group ``arch``."""
        pids = [self.node_partition[n] for n in self.nodes(arch)]
        return self.label_counts[pids].sum(axis=0) if pids else np.zeros(self.label_counts.shape[1], dtype=int)


def default_global_arch(architectures: Sequence[str]) -> str:
    """The largest group's architecture (first listed on ties)."""
    counts: dict[str, int] = {}
    for a in architectures:
        counts[a] = counts.get(a, 0) + 1
    return max(counts, key=lambda a: (counts[a], -list(counts).index(a)))


class _GroupGrid(Grid):
    """A view of a Grid that exposes only one architecture group's nodes."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid = grid
        self._nodes = nodes  # in partition-id order, so sampling does not depend on node ids

    def set_run(self, run: Any) -> None:  # pragma: no cover - never called on a view
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(
        self, content: Any, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> list[int]:
        live = set(self._grid.get_node_ids())
        return [n for n in self._nodes if n in live]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


BaseFactory = Callable[[int], Strategy]


@dataclass(frozen=True)
class ServerContext:
    """What server-side work (distillation, synthesis) needs besides the messages.

    Attributes
    ----------
    in_shape : tuple
        ``(C, H, W)`` of the dataset's inputs.
    num_classes : int
    feature_dim : int or None
        ``model.feature-dim`` (None: each model's default).
    device : torch.device
        The server device (``device = "auto"``: cuda when available).
    seed : int
        The run's master seed.
    rounds : int
        Number of federated rounds of the run.
    evaluate : callable, optional
        ``evaluate(model) -> (loss, accuracy)`` on the held-out test set (server-side
        evaluation, e.g. of a client ensemble).
    max_update_norm : float
        ``validation.max-update-norm`` (0: no bound); see :mod:`fedkd.validation`.
    """

    in_shape: tuple[int, int, int]
    num_classes: int
    feature_dim: int | None
    device: torch.device
    seed: int = 0
    rounds: int = 1
    evaluate: Callable[[torch.nn.Module], tuple[float, float]] | None = None
    max_update_norm: float = 0.0

    def build(self, arch: str) -> FedkdModel:
        """A fresh model of ``arch`` on the server device."""
        return build_model(arch, self.in_shape, self.num_classes, self.feature_dim).to(self.device)


class GroupedStrategy(Strategy):
    """Run a base Flower strategy independently within each architecture group.

    Parameters
    ----------
    federation : Federation
        Node → architecture assignment from the opening query.
    base_factory : callable
        ``base_factory(group_size)`` returns a fresh base strategy for one group.

    Notes
    -----
    With one architecture this is exactly the base strategy. Sampling is stratified:
    each group samples ``clients.fraction`` of its own nodes.

    Every train reply is validated (:func:`fedkd.validation.check_reply`) before anything
    uses it: error replies are dropped (the Grid counts them as ``failures``), invalid ones
    are dropped and counted in ``round_metrics["rejected"]``. Subclasses that look at the
    replies themselves use :attr:`accepted`, the replies kept by the last
    ``aggregate_train``.
    """

    #: Whether the strategy trains a global architecture that no client holds.
    trains_global_without_clients: ClassVar[bool] = False
    #: A local-training rule (:data:`fedkd.train.LOCAL_RULES`) every client of every group runs,
    #: named in the train and evaluate configs with :meth:`client_rule_params` (LG-FedAvg, FD,
    #: FedProto); "" for none. The per-group bases must then not run rules of their own.
    client_rule: ClassVar[str] = ""
    #: Attributes holding learned server state (ArrayRecords) that :meth:`state_dict` saves
    #: under their own names (FD's global logits, FML's shared model).
    checkpointed: ClassVar[tuple[str, ...]] = ()
    #: Whether the server rebuilds the clients' models from their replies (:meth:`client_models`:
    #: an ensemble teacher); such a strategy refuses a base whose clients keep parts of theirs.
    uses_client_models: ClassVar[bool] = False

    def __init__(self, federation: Federation, base_factory: BaseFactory, context: ServerContext | None = None) -> None:
        from fedkd.rules import RuleStrategy

        self.federation = federation
        self.context = context
        self.delegates: dict[str, Strategy] = {
            arch: base_factory(len(federation.nodes(arch))) for arch in federation.groups if federation.nodes(arch)
        }
        ruled = [type(d).__name__ for d in self.delegates.values() if isinstance(d, RuleStrategy)]
        if self.client_rule and ruled:
            raise ConfigError(f"{self.client_rule}'s clients run its rule, but its base {ruled[0]} runs its own local "
                              "rule; use a plain base")  # fmt: skip
        self.current: ArrayRecord | None = None
        self.last_train_metrics: MetricRecord | None = None
        #: Extra server-side metrics of the current round (e.g. distillation loss, seconds of
        #: synthesis); merged into that round's row of metrics.jsonl, then cleared.
        self.round_metrics: dict[str, Any] = {}
        #: The train replies of the last round that passed validation, by partition id.
        self.accepted: list[Message] = []
        self._specs: dict[str, ArrayRecord] = {}
        self._kept: dict[str, list[str]] = {}
        if self.uses_client_models:
            for arch, base in self.delegates.items():
                if self.kept_names(arch):
                    raise ConfigError(
                        f"{type(self).__name__} builds its teacher from the clients' whole models, but the clients of "
                        f"its base {type(base).__name__} keep part of theirs (it never leaves them); use another base"
                    )

    # --- checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Learned server-side state (see :mod:`fedkd.checkpoint`): the bases' arrays and the
        attributes named in :attr:`checkpointed`; subclasses extend it."""
        from fedkd.checkpoint import object_arrays, to_tree

        own = {name: to_tree(getattr(self, name)) for name in self.checkpointed}
        return {"bases": {arch: object_arrays(base) for arch, base in self.delegates.items()}, **own}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from fedkd.checkpoint import from_tree, load_object_arrays

        for arch, base in self.delegates.items():
            load_object_arrays(base, state["bases"][arch])
        for name in self.checkpointed:
            setattr(self, name, from_tree(state[name]))

    # --- helpers -----------------------------------------------------------------
    def client_models(self, replies: Iterable[Message]) -> list[tuple[FedkdModel, np.ndarray]]:
        """Each successful reply's model (on the server device) with its label counts."""
        if self.context is None:
            raise RuntimeError(f"{type(self).__name__} needs a ServerContext")
        out = []
        for msg in replies:
            if msg.has_error() or records.ARRAYS not in msg.content.array_records:
                continue
            model = self.context.build(self.arch_of(msg))
            records.load_record(model, msg.content.array_records[records.ARRAYS])
            model.to(self.context.device).eval()
            info = msg.content.config_records.get(records.INFO)
            counts = np.asarray(
                info[records.LABEL_COUNTS] if info and records.LABEL_COUNTS in info else [], dtype=np.int64
            )
            out.append((model, counts))
        return out

    def arch_of(self, msg: Message) -> str:
        """Architecture group of the node that sent ``msg``."""
        return self.federation.node_arch[msg.metadata.src_node_id]

    def _fan_out(
        self, hook: str, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        msgs: list[Message] = []
        for i, (arch, base) in enumerate(self.delegates.items()):
            # Flower samples with the global `random`; reseed from (seed, round, group)
            random.seed(derive_seed(self.federation.seed, server_round, i, len(hook)))
            sub = records.unpack(arrays, arch)
            cfg = ConfigRecord(dict(config))  # bases add keys (e.g. FedProx's proximal-mu)
            kept = self.kept_names(arch)
            if kept:  # the clients' own parts stay on the clients: what a client lacks, it rebuilds
                sub = records.without(sub, kept)
                cfg[records.INIT_SEED] = group_init_seed(self.federation.seed, self.federation.groups.index(arch))
            if self.client_rule:
                cfg[records.RULE] = self.client_rule
                for k, v in self.client_rule_params().items():
                    cfg[f"{records.RULE}.{k.replace('_', '-')}"] = v
            msgs.extend(getattr(base, hook)(server_round, sub, cfg, _GroupGrid(grid, self.federation.nodes(arch))))
        return msgs

    def client_rule_params(self) -> dict[str, Any]:
        """Keyword arguments of :attr:`client_rule`, sent as ``rule.<param>`` config keys."""
        return {}

    def kept_names(self, arch: str) -> list[str]:
        """The state-dict entries of group ``arch`` that its clients keep as their own
        (:meth:`fedkd.train.PersonalRule.local_names` of the group's rule: FedBN's BatchNorm
        layers, FedPer's head, FD's whole model): they never travel, either way. Empty for a
        rule that keeps nothing, and without a :class:`ServerContext` (no model to name them)."""
        if arch not in self._kept:
            from fedkd.train import kept_entries

            name = self.client_rule or str(getattr(self.delegates.get(arch), "rule", "") or "")
            self._kept[arch] = kept_entries(name, self.context.build(arch)) if name and self.context is not None else []
        return self._kept[arch]

    @staticmethod
    def take_rule_arrays(replies: Iterable[Message]) -> dict[int, ArrayRecord]:
        """Each non-error reply's ``rule-arrays`` by source node, removed from the reply (the
        per-group bases, Flower strategies, aggregate exactly one ArrayRecord per reply)."""
        taken: dict[int, ArrayRecord] = {}
        for msg in replies:
            if not msg.has_error() and records.RULE_ARRAYS in msg.content.array_records:
                taken[msg.metadata.src_node_id] = msg.content.array_records[records.RULE_ARRAYS]
                del msg.content[records.RULE_ARRAYS]
        return taken

    def accept(self, replies: Iterable[Message]) -> list[Message]:
        """The valid, non-error replies; count and log the rejected ones."""
        from fedkd.validation import check_reply

        assert self.current is not None, "configure_train must run before aggregate_train"
        ok: list[Message] = []
        rejected = 0
        num_classes = self.federation.label_counts.shape[1]
        bound = self.context.max_update_norm if self.context is not None else 0.0
        for msg in replies:
            if msg.has_error():
                continue
            src = msg.metadata.src_node_id
            arch = self.federation.node_arch.get(src)
            why = (
                "unknown node"
                if arch is None
                else check_reply(
                    msg, records.without(records.unpack(self.current, arch), self.kept_names(arch)), num_classes,
                    bound, self._spec(arch),
                )
            )
            if why is None:
                ok.append(msg)
            else:
                rejected += 1
                log.warning("reply from node %s rejected: %s", src, why)
        self.round_metrics["rejected"] = self.round_metrics.get("rejected", 0) + rejected
        ok.sort(key=lambda m: self.federation.node_partition.get(m.metadata.src_node_id, -1))
        return ok

    def _spec(self, arch: str) -> ArrayRecord | None:
        """A fresh model of ``arch`` as an ArrayRecord: the names, shapes and dtypes a client sends."""
        if self.context is None:
            return None
        if arch not in self._specs:
            self._specs[arch] = records.without(records.to_record(self.context.build(arch)), self.kept_names(arch))
        return self._specs[arch]

    def _by_group(self, replies: Iterable[Message]) -> dict[str, list[Message]]:
        out: dict[str, list[Message]] = defaultdict(list)
        for msg in replies:
            arch = self.federation.node_arch.get(msg.metadata.src_node_id)
            if arch is None:
                log.warning("reply from unknown node %s ignored", msg.metadata.src_node_id)
                continue
            out[arch].append(msg)
        for msgs in out.values():  # aggregate in partition order: float sums independent of arrival order
            msgs.sort(key=lambda m: self.federation.node_partition.get(m.metadata.src_node_id, -1))
        return out

    @staticmethod
    def _merge_metrics(parts: list[tuple[MetricRecord, float]]) -> MetricRecord | None:
        """Weighted mean of per-group MetricRecords (weights: examples in each group)."""
        parts = [(m, w) for m, w in parts if m is not None and w > 0]
        if not parts:
            return None
        total = sum(w for _, w in parts)
        out = MetricRecord()
        for m, w in parts:
            for k, v in m.items():
                if isinstance(v, list):
                    continue
                out[k] = float(out.get(k, 0.0)) + float(v) * w / total  # type: ignore[arg-type]
        return out

    @staticmethod
    def _examples(replies: list[Message]) -> float:
        total = 0.0
        for msg in replies:
            if msg.has_content() and records.METRICS in msg.content.metric_records:
                total += float(msg.content.metric_records[records.METRICS].get(records.NUM_EXAMPLES, 0))  # type: ignore[arg-type]
        return total

    # --- Flower hooks --------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays
        msgs = self._fan_out("configure_train", server_round, arrays, config, grid)
        # which partitions train this round (metrics.jsonl `sampled`: a determinism witness)
        self.round_metrics["sampled"] = sorted(
            self.federation.node_partition[m.metadata.dst_node_id]
            for m in msgs
            if m.metadata.dst_node_id in self.federation.node_partition
        )
        return msgs

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.current is not None, "configure_train must run before aggregate_train"
        self.accepted = self.accept(replies)
        self._record_state_from(self.accepted)
        by_group = self._by_group(self.accepted)
        groups: dict[str, ArrayRecord] = {}
        parts: list[tuple[MetricRecord, float]] = []
        for arch in self.federation.groups:
            sub = records.unpack(self.current, arch)
            if arch in self.delegates and by_group.get(arch):
                new, metrics = self.delegates[arch].aggregate_train(server_round, by_group[arch])
                if new is not None:  # the clients' own parts (never sent) keep the server's values
                    sub = ArrayRecord({k: new[k] if k in new else v for k, v in sub.items()}) if self.kept_names(arch) else new
                if metrics is not None:
                    parts.append((metrics, self._examples(by_group[arch])))
            groups[arch] = sub
        self.last_train_metrics = self._merge_metrics(parts)
        return records.pack(groups), self.last_train_metrics

    def _record_state_from(self, replies: list[Message]) -> None:
        """metrics.jsonl ``state_from``: for each client of a stateful rule (SCAFFOLD, FedDyn,
        MOON), the round its state was saved in (0: it started fresh). A witness that
        client state persists between rounds and across ``--resume``."""
        since: dict[str, int] = {}
        for msg in replies:
            v = msg.content.metric_records[records.METRICS].get(records.STATE_FROM)
            if v is not None:
                since[str(self.federation.node_partition.get(msg.metadata.src_node_id, -1))] = int(v)  # type: ignore[arg-type]
        if since:
            self.round_metrics["state_from"] = since

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._fan_out("configure_evaluate", server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._record_client_accuracy(replies)
        parts = []
        for arch, msgs in self._by_group(replies).items():
            if arch in self.delegates:
                m = self.delegates[arch].aggregate_evaluate(server_round, msgs)
                parts.append((m, self._examples(msgs)))
        return self._merge_metrics(parts)  # type: ignore[arg-type]

    def _record_client_accuracy(self, replies: list[Message]) -> None:
        """Federated evaluation's per-client accuracies (on each client's own test split with
        ``partition.test-fraction``) into the round's row: by partition id, and their mean,
        std, minimum and 10th percentile over clients (unweighted: every client counts once)."""
        accs: dict[str, float] = {}
        for msg in replies:
            if msg.has_error():
                continue
            m = msg.content.metric_records.get(records.METRICS)
            acc = m.get("local-accuracy") if m is not None else None
            if isinstance(acc, int | float) and math.isfinite(acc):
                pid = self.federation.node_partition.get(msg.metadata.src_node_id, -1)
                accs[str(pid)] = float(acc)
        if not accs:
            return
        a = np.array(list(accs.values()))
        self.round_metrics["client_accuracy"] = dict(sorted(accs.items(), key=lambda kv: int(kv[0])))
        self.round_metrics["client_accuracy_mean"] = float(a.mean())
        self.round_metrics["client_accuracy_std"] = float(a.std())
        self.round_metrics["client_accuracy_min"] = float(a.min())
        self.round_metrics["client_accuracy_p10"] = float(np.percentile(a, 10))

    def summary(self) -> None:
        for arch, base in self.delegates.items():
            log.info("group %s: %d nodes, base %s", arch, len(self.federation.nodes(arch)), type(base).__name__)
        log.info("global model: %s", self.federation.global_arch)


def build_strategy(cfg: Any, federation: Federation, context: ServerContext | None = None) -> GroupedStrategy:
    """Build the configured strategy over ``federation``.

    A plain Flower strategy class becomes the per-group base of a :class:`GroupedStrategy`.
    A :class:`GroupedStrategy` subclass is built with its own keywords
    (``strategy.<name>.<param>``) and a base named by its ``base`` keyword.
    """
    from strategies import STRATEGIES

    name = cfg.str("strategy.name")
    obj = STRATEGIES.get(name)
    if isinstance(obj, type) and issubclass(obj, GroupedStrategy):
        kwargs = cfg.plugin_kwargs("strategy", name)
        base = str(kwargs.get("base", "fedavg"))
        if not obj.trains_global_without_clients:
            _check_global_has_clients(federation, name)
        factory = base_factory(cfg, base)
        _check_dp_models(base, federation, context)
        return obj(federation=federation, base_factory=factory, context=context, **kwargs)
    _check_global_has_clients(federation, name)
    factory = base_factory(cfg, name)
    _check_dp_models(name, federation, context)
    return GroupedStrategy(federation, factory, context)


def _check_dp_models(base: str, federation: Federation, context: ServerContext | None) -> None:
    """Flower's DP clipping scales every array of an update: refuse models with integer ones."""
    from strategies import STRATEGIES

    if context is None or not getattr(STRATEGIES.get(base), "wraps_base", False):
        return
    for arch in federation.groups:
        ints = [k for k, v in context.build(arch).state_dict().items() if not v.is_floating_point()]
        if ints:
            raise ConfigError(
                f"strategy {base!r} clips whole updates, and Flower's clipping cannot scale the integer arrays of "
                f"{arch!r} ({', '.join(ints[:2])}{', ...' if len(ints) > 2 else ''}: BatchNorm counters); "
                "use architectures without BatchNorm"
            )


def _check_global_has_clients(federation: Federation, name: str) -> None:
    if not federation.nodes(federation.global_arch):
        raise ConfigError(
            f"global.architecture {federation.global_arch!r} has no clients; strategy {name!r} cannot train it "
            "(only distillation strategies can)"
        )


#: What Flower's strategies need of their keywords (Flower checks none of them): by keyword name,
#: so every strategy that takes one (built-in or plug-in) gets the check.
STRATEGY_PARAM_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "eta": (lambda v: v > 0, "> 0"),
    "eta_l": (lambda v: v > 0, "> 0"),
    "tau": (lambda v: v > 0, "> 0"),
    "beta_1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "beta_2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "server_learning_rate": (lambda v: v > 0, "> 0"),
    "server_momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "proximal_mu": (lambda v: v >= 0, "≥ 0"),
    "beta": (lambda v: not isinstance(v, str) and 0 <= v < 0.5, "in [0, 0.5) (the fraction trimmed at each end)"),
    "num_malicious_nodes": (lambda v: v >= 0, "≥ 0"),
    "num_nodes_to_select": (lambda v: v >= 1, "≥ 1"),
    "q": (lambda v: v >= 0, "≥ 0"),
    "noise_multiplier": (lambda v: v >= 0, "≥ 0"),
    "clipping_norm": (lambda v: v > 0, "> 0"),
    "initial_clipping_norm": (lambda v: v > 0, "> 0"),
    "target_clipped_quantile": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "clip_norm_lr": (lambda v: v > 0, "> 0"),
    "clipped_count_stddev": (lambda v: v >= 0, "≥ 0 (0: Flower's default, sampled clients / 20)"),
}

#: Replies per round a robust aggregator needs, from its assumed number of malicious nodes f.
ROBUST_MIN_REPLIES: dict[str, tuple[Callable[[int], int], str]] = {
    "krum": (lambda f: 2 * f + 3, "2f + 3"),
    "multikrum": (lambda f: 2 * f + 3, "2f + 3"),
    "bulyan": (lambda f: 4 * f + 3, "4f + 3"),
}


def check_robust_params(name: str, kwargs: Mapping[str, Any], sampled: int, group_size: int) -> None:
    """Krum's, Multi-Krum's and Bulyan's assumptions against the ``sampled`` replies per round."""
    rule = ROBUST_MIN_REPLIES.get(name)
    if rule is None:
        return
    f = int(kwargs.get("num_malicious_nodes", 0))
    need = rule[0](f)
    if sampled < need:
        raise ConfigError(
            f"strategy {name!r} with num-malicious-nodes = {f} needs at least {rule[1]} = {need} replies per round, "
            f"but a group of {group_size} clients samples {sampled} (clients.fraction); "
            f"lower strategy.{name}.num-malicious-nodes or raise clients.fraction / clients.num"
        )
    m = int(kwargs.get("num_nodes_to_select", 1))
    if name == "multikrum" and m > sampled - f:
        raise ConfigError(f"strategy.multikrum.num-nodes-to-select = {m} exceeds the {sampled} − {f} honest replies "
                          f"a group of {group_size} clients sends per round")  # fmt: skip


def check_strategy_params(name: str, kwargs: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` naming ``strategy.<name>.<param>`` for a value the strategy cannot use."""
    for param, value in kwargs.items():
        rule = STRATEGY_PARAM_CHECKS.get(param)
        if rule is not None and isinstance(value, int | float) and not isinstance(value, bool) and not rule[0](value):
            raise ConfigError(f"strategy.{name}.{param.replace('_', '-')} must be {rule[1]}, got {value!r}")


def base_factory(cfg: Any, name: str) -> BaseFactory:
    """Factory of the per-group base strategy ``name`` (a plain Flower strategy)."""
    from strategies import STRATEGIES

    cls = STRATEGIES.get(name)
    if not isinstance(cls, type) or not issubclass(cls, Strategy) or issubclass(cls, GroupedStrategy):
        raise ConfigError(f"strategy {name!r} cannot be a base strategy (it must be a plain Flower strategy)")
    kwargs = cfg.plugin_kwargs("strategy", name)
    check_strategy_params(name, kwargs)
    fraction, eval_fraction = cfg.float("clients.fraction"), cfg.float("eval.fraction")
    if getattr(cls, "wraps_base", False):  # a DP wrapper (strategies/dp.py) of the base it names
        return _wrapper_factory(cfg, name, cls, kwargs, fraction)

    accepts = inspect.signature(cls).parameters
    plan = None
    if getattr(cls, "needs_tasks", False):
        from fedkd.data import load_dataset
        from fedkd.tasks import plan_of

        ds = load_dataset(cfg.str("dataset.name"), cfg.str("dataset.root"), cfg.bool("dataset.download"))
        plan = plan_of(cfg, ds.num_classes)

    def make(group_size: int) -> Strategy:
        managed: dict[str, Any] = {
            "fraction_train": fraction,
            "fraction_evaluate": eval_fraction,
            "min_train_nodes": 1,
            "min_evaluate_nodes": 1 if eval_fraction > 0 else 0,
            "min_available_nodes": group_size,
        }
        if "client_learning_rate" in accepts:  # q-FedAvg rebuilds the clients' gradients with it
            managed["client_learning_rate"] = cfg.float("clients.lr")
        if "train_loss_key" in accepts:
            managed["train_loss_key"] = records.TRAIN_LOSS
        if plan is not None:  # a class-continual strategy (strategies/continual.py) gets the run's tasks
            managed["tasks"] = plan
        check_robust_params(name, kwargs, max(int(group_size * fraction), 1), group_size)
        return cls(**managed, **kwargs)

    return make


def _wrapper_factory(cfg: Any, name: str, cls: Any, kwargs: dict[str, Any], fraction: float) -> BaseFactory:
    """Factory of a strategy that wraps the base named by its ``base`` keyword, per group."""
    from fedkd.rules import RuleStrategy
    from strategies import STRATEGIES

    inner_name = str(kwargs["base"])
    inner_cls = STRATEGIES.get(inner_name)
    if getattr(inner_cls, "wraps_base", False):
        raise ConfigError(f"strategy.{name}.base = {inner_name!r}: a DP wrapper cannot wrap another one")
    if isinstance(inner_cls, type) and issubclass(inner_cls, RuleStrategy):
        raise ConfigError(
            f"strategy.{name}.base = {inner_name!r}: its clients send state besides their model "
            f"({inner_cls.rule} rule), which Flower's DP clipping would clip as model weights; use a plain base "
            "such as fedavg, fedprox or fedadam"
        )
    inner = base_factory(cfg, inner_name)
    seed = cfg.int("seed")

    def make(group_size: int) -> Strategy:
        sampled = max(int(group_size * fraction), 1)
        try:
            return cls(inner(group_size), sampled, noise_seed=seed, **kwargs)  # type: ignore[no-any-return]
        except ValueError as e:  # Flower's own checks (e.g. the adaptive noise split)
            raise ConfigError(f"strategy {name!r} with {sampled} sampled clients per group round: {e}") from None

    return make
