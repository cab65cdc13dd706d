"""The fedkd ClientApp (Flower Message API).

Thin: each handler reads the resolved config from the message, finds this node's
partition (``partition-id`` from the node config), and calls the pure core in
:mod:`fedkd.train`. The same app runs on the local, ray and deployment engines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT, compute_adaptive_clip_model_update

from fedkd import faults as F
from fedkd import records, tasks
from fedkd.batched import Client, train_one
from fedkd.client_state import ClientState, store_for
from fedkd.config import Config
from fedkd.data import label_counts, load_dataset, partition
from fedkd.data.partition import holdout, is_lazy, partition_of
from fedkd.errors import UserError
from fedkd.federation import parse_architectures
from fedkd.models import FedkdModel, build_model
from fedkd.train import (
    LOCAL_RULES,
    FedGenRegularizer,
    LocalRule,
    LocalTrainConfig,
    PersonalRule,
    derive_seed,
    evaluate,
    kept_entries,
    resolve_device,
)

log = logging.getLogger(__name__)

app = ClientApp()


@lru_cache(maxsize=8)
def _config(text: str) -> Config:
    return Config.from_toml(text)


def message_config(msg: Message) -> Config:
    """The resolved run config carried by a server message."""
    cfg_rec = msg.content.config_records.get(records.CONFIG)
    if cfg_rec is None or records.RUN_CONFIG not in cfg_rec:
        raise UserError(f"message has no {records.RUN_CONFIG!r}: is the ServerApp fedkd's?")
    return _config(str(cfg_rec[records.RUN_CONFIG]))


@lru_cache(maxsize=16)
def _partitions(
    dataset: str, root: str, download: bool, method: str, kwargs: tuple[tuple[str, object], ...], n: int, seed: int,
    classes: tuple[int, ...] = (),
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every client's indices and label counts of an eager partitioner (one split per config);
    with ``classes`` (a task's, :mod:`fedkd.tasks`), a split of those classes' samples only."""
    ds = load_dataset(dataset, root, download)
    labels = ds.y_train.numpy()
    pool = np.flatnonzero(np.isin(labels, classes)) if classes else np.arange(len(labels))
    parts = [pool[p] for p in partition(method, labels[pool], n, seed, **dict(kwargs))]
    counts = torch.as_tensor(label_counts(labels, parts, ds.num_classes))
    return [torch.as_tensor(p) for p in parts], counts


@lru_cache(maxsize=1024)
def _lazy_partition(
    dataset: str,
    root: str,
    download: bool,
    method: str,
    kwargs: tuple[tuple[str, object], ...],
    n: int,
    seed: int,
    pid: int,
    classes: tuple[int, ...] = (),
) -> tuple[torch.Tensor, list[int]]:
    """One client's indices and label counts of a lazy partitioner: only ``pid`` is computed,
    and the cache is bounded, so a process never holds every client's partition."""
    ds = load_dataset(dataset, root, download)
    labels = ds.y_train.numpy()
    pool = np.flatnonzero(np.isin(labels, classes)) if classes else np.arange(len(labels))
    idx = pool[partition_of(method, labels[pool], n, seed, pid, **dict(kwargs))]
    return torch.as_tensor(idx), label_counts(labels, [idx], ds.num_classes)[0].tolist()


def _indices(cfg: Config, pid: int, seed: int, classes: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[int]]:
    method = cfg.str("partition.name")
    kwargs = tuple(sorted(cfg.plugin_kwargs("partition", method).items()))
    key = (cfg.str("dataset.name"), cfg.str("dataset.root"), cfg.bool("dataset.download"), method, kwargs,
           cfg.int("clients.num"), seed)  # fmt: skip
    if is_lazy(method):
        return _lazy_partition(*key, pid, classes)
    parts, all_counts = _partitions(*key, classes)
    return parts[pid], all_counts[pid].tolist()


def client_partition(cfg: Config, pid: int, task: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(x, y, label_counts)`` of partition ``pid`` for this config (cached per process).

    In a class-continual run (``tasks.*``, :mod:`fedkd.tasks`) the client's share of ``task``'s
    samples (each task's samples split by the partitioner with a seed of its own); with ``task``
    None, its shares of every task together (what it holds over the whole run).
    """
    n = cfg.int("clients.num")
    if not 0 <= pid < n:
        raise UserError(f"partition-id {pid} is outside [0, {n}) for clients.num={n}")
    ds = load_dataset(cfg.str("dataset.name"), cfg.str("dataset.root"), cfg.bool("dataset.download"))
    plan = tasks.plan_of(cfg, ds.num_classes)
    if plan is not None:
        which = range(plan.num_tasks) if task is None else [task]
        idx = torch.cat([_indices(cfg, pid, tasks.task_seed(cfg.int("seed"), t), plan.classes(t))[0] for t in which])
        counts = torch.bincount(ds.y_train[idx], minlength=ds.num_classes).tolist()
        return ds.x_train[idx], ds.y_train[idx], counts
    idx, counts = _indices(cfg, pid, cfg.int("seed"))
    if cfg.float("partition.test-fraction") > 0:  # train on the rest of the client's own split
        train, _ = holdout(idx.numpy(), cfg.float("partition.test-fraction"), cfg.int("seed"), pid)
        idx = torch.as_tensor(train)
        counts = torch.bincount(ds.y_train[idx], minlength=ds.num_classes).tolist()
    return ds.x_train[idx], ds.y_train[idx], counts


def client_test_split(cfg: Config, pid: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x, y)`` of client ``pid``'s own test split (``partition.test-fraction``), or None."""
    fraction = cfg.float("partition.test-fraction")
    if fraction <= 0:
        return None
    idx = _indices(cfg, pid, cfg.int("seed"))[0]
    _, test = holdout(idx.numpy(), fraction, cfg.int("seed"), pid)
    ds = load_dataset(cfg.str("dataset.name"), cfg.str("dataset.root"), cfg.bool("dataset.download"))
    return ds.x_train[test], ds.y_train[test]


def current_task(
    cfg: Config, server_round: int
) -> tuple[int | None, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """In a class-continual run: round ``server_round``'s task, the classes of the clients'
    cross-entropy (``tasks.local-classes``: the task's, or () for every logit), the classes of
    the earlier tasks and the classes seen so far; ``(None, (), (), ())`` otherwise."""
    ds = load_dataset(cfg.str("dataset.name"), cfg.str("dataset.root"), cfg.bool("dataset.download"))
    plan = tasks.plan_of(cfg, ds.num_classes)
    if plan is None:
        return None, (), (), ()
    task = plan.task_of(server_round)
    classes = plan.classes(task) if cfg.str("tasks.local-classes") == "current" else ()
    return task, classes, plan.old(task), plan.seen(task)


def plan_classes(cfg: Config, task: int | None) -> tuple[int, ...]:
    """The classes of ``task`` in a class-continual run (() when there are no tasks)."""
    if task is None:
        return ()
    ds = load_dataset(cfg.str("dataset.name"), cfg.str("dataset.root"), cfg.bool("dataset.download"))
    plan = tasks.plan_of(cfg, ds.num_classes)
    return plan.classes(task) if plan is not None else ()


def partition_id(context: Context) -> int:
    pid = context.node_config.get(records.PARTITION_ID)
    if pid is None:
        raise UserError(
            "this SuperNode has no 'partition-id' in its node config (use --node-config 'partition-id=I num-partitions=N')"
        )
    return int(pid)


def client_model(cfg: Config, pid: int, init_seed: int | None = None) -> FedkdModel:
    """A fresh model of this client's architecture; with ``init_seed``, its group's initial
    model exactly as the server built it (:func:`fedkd.train.group_init_seed`), the global
    RNG left as it was."""
    ds = load_dataset(cfg.str("dataset.name"), cfg.str("dataset.root"), cfg.bool("dataset.download"))
    arch = parse_architectures(cfg.str("clients.architectures"), cfg.int("clients.num"))[pid]
    fd = cfg.int("model.feature-dim") or None
    if init_seed is None:
        return build_model(arch, ds.shape, ds.num_classes, fd)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return build_model(arch, ds.shape, ds.num_classes, fd)


def kept_names(conf: ConfigRecord, model: FedkdModel) -> list[str]:
    """The entries of ``model`` this client keeps as its own, which never travel: its
    personalizing rule's :meth:`~fedkd.train.PersonalRule.local_names`, when the server says
    they stay local (it sends the group's ``init-seed`` instead of them)."""
    if records.INIT_SEED not in conf:
        return []
    return kept_entries(str(conf.get(records.RULE, "") or ""), model)


def received_model(msg: Message, cfg: Config, pid: int) -> tuple[FedkdModel, list[str]]:
    """This client's model with the message's weights, and the names it keeps as its own (those
    the message leaves out start at the group's initial values; a personalizing rule then
    replaces them by the client's saved copy)."""
    conf = msg.content.config_records[records.CONFIG]
    seed = conf.get(records.INIT_SEED)
    model = client_model(cfg, pid, None if seed is None else int(seed))  # type: ignore[arg-type]
    kept = kept_names(conf, model)
    records.load_record(model, msg.content.array_records[records.ARRAYS], kept)
    return model, kept


def fedgen_regularizer(msg: Message, model: FedkdModel, seed: int) -> FedGenRegularizer | None:
    """FedGen's regularizer when the server sent a generator (``strategies/fedgen.py``)."""
    rec = msg.content.array_records.get(records.GENERATOR)
    if rec is None:
        return None
    conf = msg.content.config_records[records.CONFIG]
    from fedkd.synthesis import build_generator

    gen = build_generator(
        "feature", (model.feature_dim,), model.num_classes,
        latent_dim=int(conf["fedgen.latent-dim"]), hidden_dim=int(conf["fedgen.hidden-dim"]),  # type: ignore[arg-type]
        activation=str(conf.get("fedgen.activation", "relu")),
    )  # fmt: skip
    records.load_record(gen, rec)
    gen.to(next(model.parameters()).device)
    prior = torch.as_tensor(conf["fedgen.label-prior"], dtype=torch.float64)  # type: ignore[arg-type]
    return FedGenRegularizer(
        gen, float(conf["fedgen.alpha"]), float(conf["fedgen.beta"]), int(conf["fedgen.steps"]),  # type: ignore[arg-type]
        int(conf["fedgen.gen-batch-size"]), prior, seed,  # type: ignore[arg-type]
    )  # fmt: skip


def rule_arrays(msg: Message, device: torch.device) -> dict[str, torch.Tensor]:
    """The server's arrays for the strategy's rule (``rule-arrays``) as tensors on ``device``."""
    rec = msg.content.array_records.get(records.RULE_ARRAYS)
    return {k: torch.from_numpy(v.numpy().copy()).to(device) for k, v in rec.items()} if rec is not None else {}


def client_store(msg: Message, cfg: Config, context: Context, pid: int) -> ClientState:
    """Where this client's rule state is kept (:func:`fedkd.client_state.store_for`)."""
    conf = msg.content.config_records[records.CONFIG]
    return store_for(context, str(conf.get(records.STATE_DIR, "") or ""), pid,
                     cfg.int("checkpoint.every"), cfg.int("checkpoint.keep"))  # fmt: skip


def local_rule(
    msg: Message, cfg: Config, context: Context, model: FedkdModel, local: LocalTrainConfig, pid: int, server_round: int
) -> tuple[LocalRule | None, ClientState | None, int]:
    """The strategy's local-training rule for this message (``rule`` in its config), built
    with its ``rule.<param>`` keys, the server's ``rule-arrays`` and, for a stateful rule, the
    state this client saved last (:mod:`fedkd.client_state`): ``(rule, store, state_round)``."""
    conf = msg.content.config_records[records.CONFIG]
    name = str(conf.get(records.RULE, "") or "")
    if not name:
        return None, None, 0
    cls = LOCAL_RULES.get(name)
    prefix = f"{records.RULE}."
    params = {k[len(prefix) :].replace("-", "_"): v for k, v in conf.items() if k.startswith(prefix)}
    server = rule_arrays(msg, next(model.parameters()).device)
    store, since, state = None, 0, None
    if cls.stateful:
        store = client_store(msg, cfg, context, pid)
        since, state = store.load(server_round)
    return cls(model, local, server, state, **params), store, since


def client_device(cfg: Config, node_config: Mapping[str, Any]) -> torch.device:
    """The device this client trains on.

    A SuperNode's node config ``device`` wins; otherwise ``clients.device``. ``auto`` means:
    on the local engine, the server's device (``device``: the clients share it); on the ray
    engine, cuda when the actor has a GPU share (``ray.num-gpus > 0``) and sees one, else cpu;
    elsewhere (a SuperNode), cuda when this process sees a GPU.
    """
    if records.DEVICE in node_config:
        return resolve_device(str(node_config[records.DEVICE]), "the SuperNode's node config 'device'")
    name = cfg.str("clients.device")
    if name != "auto":
        return resolve_device(name, "clients.device")
    if node_config.get(records.ENGINE) == "local":
        return resolve_device(cfg.str("device"))
    if cfg.str("engine") == "ray" and cfg.float("ray.num-gpus") <= 0:
        return torch.device("cpu")
    return resolve_device("auto")


def _setup(msg: Message, context: Context) -> tuple[Config, int]:
    cfg = message_config(msg)
    threads = cfg.int("clients.threads")
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return cfg, partition_id(context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Opening handshake: report partition id, architecture and label counts."""
    cfg, pid = _setup(msg, context)
    _, _, counts = client_partition(cfg, pid)
    arch = parse_architectures(cfg.str("clients.architectures"), cfg.int("clients.num"))[pid]
    device = str(client_device(cfg, context.node_config))
    info = ConfigRecord({records.PARTITION_ID: pid, records.ARCHITECTURE: arch, records.LABEL_COUNTS: counts,
                         records.DEVICE: device})  # fmt: skip
    return Message(RecordDict({records.INFO: info}), reply_to=msg)


@dataclass
class TrainJob:
    """A train message, prepared: everything its local update needs, and what its reply needs."""

    msg: Message
    client: Client  # model (with the server's weights, on the device), data, recipe, seed, FedGen term
    counts: list[int]
    faults: F.Faults
    fault: F.ClientFaults
    start: dict[str, torch.Tensor]  # the received weights, kept for a scaling attack
    server_round: int = 0
    store: ClientState | None = None  # where a stateful rule's state is kept
    state_from: int = 0  # the round of the state the rule started from (0: none)
    clip: tuple[float, list[Any]] | None = None  # DP clipping norm and the received arrays (strategies/dp.py)
    kept: list[str] = field(default_factory=list)  # the client's own entries, left out of the reply


def prepare_train(msg: Message, context: Context) -> TrainJob:
    """Everything before the local update: config, faults, partition, model, regularizer."""
    cfg, pid = _setup(msg, context)
    conf = msg.content.config_records[records.CONFIG]
    server_round = int(conf.get("server-round", 0))  # type: ignore[arg-type]
    faults = F.Faults.from_config(cfg)
    fault = F.draw(faults, cfg.int("seed"), pid, server_round, cfg.int("clients.num"))
    if fault.crash:
        raise RuntimeError(f"simulated crash of partition {pid} in round {server_round} (faults.crash-rate)")
    task, local_classes, old, seen = current_task(cfg, server_round)
    x, y, counts = client_partition(cfg, pid, task)
    device = client_device(cfg, context.node_config)
    model, kept = received_model(msg, cfg, pid)
    model.to(device)
    if fault.malicious and faults.label_flip:  # in a class-continual run, within the task's classes
        y = F.flip_labels(y, model.num_classes, plan_classes(cfg, task))
    start = {k: v.clone() for k, v in model.state_dict().items()} if fault.malicious else {}
    local = LocalTrainConfig.from_config(cfg, proximal_mu=float(conf.get("proximal-mu", 0.0)))  # type: ignore[arg-type]
    if task is not None:
        local = replace(local, classes=local_classes, old_classes=old, seen_classes=seen)
    seed = derive_seed(cfg.int("seed"), pid, server_round)
    rule, store, since = local_rule(msg, cfg, context, model, local, pid, server_round)
    client = Client(model, x, y, local, seed, device, fedgen_regularizer(msg, model, seed), rule)
    clip = None
    if KEY_CLIPPING_NORM in conf:  # a client-side DP wrapper asks for the update clipped
        clip = (float(conf[KEY_CLIPPING_NORM]), msg.content.array_records[records.ARRAYS].to_numpy_ndarrays())  # type: ignore[arg-type]
    return TrainJob(msg, client, counts, faults, fault, start, server_round, store, since, clip, kept)


def run_train(job: TrainJob) -> float:
    """The local update of one prepared job (one by one)."""
    return train_one(job.client)


def finish_train(job: TrainJob, loss: float) -> Message:
    """Everything after the local update: the attacks and faults on the result, then the reply."""
    model, faults, fault, rule = job.client.model, job.faults, job.fault, job.client.rule
    metrics = MetricRecord({records.NUM_EXAMPLES: len(job.client.x), records.TRAIN_LOSS: loss})
    arrays: dict[str, Any] = {records.ARRAYS: None}
    if rule is not None:  # the rule's outputs describe the honest update, before any attack
        if job.store is not None:
            job.store.save(job.server_round, rule.state)
            metrics[records.STATE_FROM] = job.state_from
        for k, v in rule.metrics.items():
            metrics[k] = float(v)
        if rule.arrays:
            arrays[records.RULE_ARRAYS] = ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in rule.arrays.items()})
    if fault.malicious and faults.scale_attack != 1.0:
        F.scale_update(model, job.start, faults.scale_attack)
    if fault.nan:
        F.poison_nan(model)
    if fault.straggle:
        time.sleep(faults.straggler_delay)
    arrays[records.ARRAYS] = records.without(records.to_record(model), job.kept)
    if job.clip is not None:  # what Flower's fixedclipping_mod / adaptiveclipping_mod do to the reply
        norm, received = job.clip
        sent = arrays[records.ARRAYS]
        values = sent.to_numpy_ndarrays()
        metrics[KEY_NORM_BIT] = int(compute_adaptive_clip_model_update(values, received, norm))
        arrays[records.ARRAYS] = ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(sent.keys(), values, strict=True)})
    content = RecordDict(
        {**arrays, records.METRICS: metrics, records.INFO: ConfigRecord({records.LABEL_COUNTS: job.counts})}
    )
    return Message(content, reply_to=job.msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training on this client's partition, starting from the received weights.

    Simulated faults (``faults.*``, :mod:`fedkd.faults`) apply here. The batched engine
    (``clients.batched``, :mod:`fedkd.batched`) runs the same three parts, with the middle one
    shared by the clients of a group.
    """
    job = prepare_train(msg, context)
    return finish_train(job, run_train(job))


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Federated evaluation of the received weights on this client's own test split
    (``partition.test-fraction``), or on its local training data when it has none."""
    cfg, pid = _setup(msg, context)
    split = client_test_split(cfg, pid)
    conf = msg.content.config_records[records.CONFIG]
    task = current_task(cfg, int(conf.get("server-round", 0)))[0]  # type: ignore[arg-type]
    x, y = split if split is not None else client_partition(cfg, pid, task)[:2]
    model, _ = received_model(msg, cfg, pid)
    rule = LOCAL_RULES.get(str(conf[records.RULE])) if conf.get(records.RULE) else None
    if rule is not None and issubclass(rule, PersonalRule):  # the client's own parts (FedBN, FedPer, FedRep)
        store = client_store(msg, cfg, context, pid)
        rule.personalize(model, store.load(int(conf.get("server-round", 0)) + 1)[1])  # type: ignore[arg-type]
        model = rule.evaluation_model(model, rule_arrays(msg, torch.device("cpu")))  # type: ignore[assignment]
    loss, acc = evaluate(model, x, y, cfg.int("eval.batch-size"), client_device(cfg, context.node_config))
    metrics = MetricRecord({records.NUM_EXAMPLES: len(x), "local-loss": loss, "local-accuracy": acc})
    return Message(RecordDict({records.METRICS: metrics}), reply_to=msg)


__all__ = ["app", "client_partition", "message_config", "ArrayRecord"]
