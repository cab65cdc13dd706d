"""The fedkd ClientApp (Flower Message API).

Thin: each handler reads the resolved config from the message, finds this node's
partition (``partition-id`` from the node config), and calls the pure core in
:mod:`fedkd.train`. The same app runs on the local, ray and deployment engines.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkd import faults as F
from fedkd import records
from fedkd.config import Config
from fedkd.data import label_counts, load_dataset, partition
from fedkd.data.partition import is_lazy, partition_of
from fedkd.errors import UserError
from fedkd.federation import parse_architectures
from fedkd.models import FedkdModel, build_model
from fedkd.train import FedGenRegularizer, LocalTrainConfig, derive_seed, evaluate, train_local

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


@lru_cache(maxsize=4)
def _partitions(
    dataset: str, root: str, download: bool, method: str, kwargs: tuple[tuple[str, object], ...], n: int, seed: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every client's indices and label counts of an eager partitioner (one split per config)."""
    ds = load_dataset(dataset, root, download)
    labels = ds.y_train.numpy()
    parts = partition(method, labels, n, seed, **dict(kwargs))
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
) -> tuple[torch.Tensor, list[int]]:
    """One client's indices and label counts of a lazy partitioner: only ``pid`` is computed,
    and the cache is bounded, so a process never holds every client's partition."""
    ds = load_dataset(dataset, root, download)
    labels = ds.y_train.numpy()
    idx = partition_of(method, labels, n, seed, pid, **dict(kwargs))
    return torch.as_tensor(idx), label_counts(labels, [idx], ds.num_classes)[0].tolist()


def client_partition(cfg: Config, pid: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(x, y, label_counts)`` of partition ``pid`` for this config (cached per process)."""
    n = cfg.int("clients.num")
    if not 0 <= pid < n:
        raise UserError(f"partition-id {pid} is outside [0, {n}) for clients.num={n}")
    method = cfg.str("partition.name")
    kwargs = tuple(sorted(cfg.plugin_kwargs("partition", method).items()))
    key = (cfg.str("dataset.name"), cfg.str("dataset.root"), cfg.bool("dataset.download"), method, kwargs, n,
           cfg.int("seed"))  # fmt: skip
    if is_lazy(method):
        idx, counts = _lazy_partition(*key, pid)
    else:
        parts, all_counts = _partitions(*key)
        idx, counts = parts[pid], all_counts[pid].tolist()
    ds = load_dataset(cfg.str("dataset.name"), cfg.str("dataset.root"), cfg.bool("dataset.download"))
    return ds.x_train[idx], ds.y_train[idx], counts


def partition_id(context: Context) -> int:
    pid = context.node_config.get(records.PARTITION_ID)
    if pid is None:
        raise UserError(
            "this SuperNode has no 'partition-id' in its node config (use --node-config 'partition-id=I num-partitions=N')"
        )
    return int(pid)


def client_model(cfg: Config, pid: int) -> FedkdModel:
    """A fresh model of this client's architecture."""
    ds = load_dataset(cfg.str("dataset.name"), cfg.str("dataset.root"), cfg.bool("dataset.download"))
    arch = parse_architectures(cfg.str("clients.architectures"), cfg.int("clients.num"))[pid]
    fd = cfg.int("model.feature-dim") or None
    return build_model(arch, ds.shape, ds.num_classes, fd)


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
    prior = torch.as_tensor(conf["fedgen.label-prior"], dtype=torch.float64)  # type: ignore[arg-type]
    return FedGenRegularizer(
        gen, float(conf["fedgen.alpha"]), float(conf["fedgen.beta"]), int(conf["fedgen.steps"]),  # type: ignore[arg-type]
        int(conf["fedgen.gen-batch-size"]), prior, seed,  # type: ignore[arg-type]
    )  # fmt: skip


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
    info = ConfigRecord({records.PARTITION_ID: pid, records.ARCHITECTURE: arch, records.LABEL_COUNTS: counts})
    return Message(RecordDict({records.INFO: info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training on this client's partition, starting from the received weights.

    Simulated faults (``faults.*``, :mod:`fedkd.faults`) apply here.
    """
    cfg, pid = _setup(msg, context)
    conf = msg.content.config_records[records.CONFIG]
    server_round = int(conf.get("server-round", 0))  # type: ignore[arg-type]
    faults = F.Faults.from_config(cfg)
    fault = F.draw(faults, cfg.int("seed"), pid, server_round, cfg.int("clients.num"))
    if fault.crash:
        raise RuntimeError(f"simulated crash of partition {pid} in round {server_round} (faults.crash-rate)")
    x, y, counts = client_partition(cfg, pid)
    model = client_model(cfg, pid)
    records.load_record(model, msg.content.array_records[records.ARRAYS])
    malicious = fault.malicious
    if malicious and faults.label_flip:
        y = F.flip_labels(y, model.num_classes)
    start = {k: v.clone() for k, v in model.state_dict().items()} if malicious else {}
    local = LocalTrainConfig.from_config(cfg, proximal_mu=float(conf.get("proximal-mu", 0.0)))  # type: ignore[arg-type]
    seed = derive_seed(cfg.int("seed"), pid, server_round)
    loss = train_local(model, x, y, local, seed=seed, regularizer=fedgen_regularizer(msg, model, seed))
    if malicious and faults.scale_attack != 1.0:
        F.scale_update(model, start, faults.scale_attack)
    if fault.nan:
        F.poison_nan(model)
    if fault.straggle:
        time.sleep(faults.straggler_delay)
    content = RecordDict(
        {
            records.ARRAYS: records.to_record(model),
            records.METRICS: MetricRecord({records.NUM_EXAMPLES: len(x), records.TRAIN_LOSS: loss}),
            records.INFO: ConfigRecord({records.LABEL_COUNTS: counts}),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Federated evaluation of the received weights on this client's local data."""
    cfg, pid = _setup(msg, context)
    x, y, _ = client_partition(cfg, pid)
    model = client_model(cfg, pid)
    records.load_record(model, msg.content.array_records[records.ARRAYS])
    loss, acc = evaluate(model, x, y, cfg.int("eval.batch-size"))
    metrics = MetricRecord({records.NUM_EXAMPLES: len(x), "local-loss": loss, "local-accuracy": acc})
    return Message(RecordDict({records.METRICS: metrics}), reply_to=msg)


__all__ = ["app", "client_partition", "message_config", "ArrayRecord"]
