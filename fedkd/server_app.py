"""The fedkd ServerApp (Flower Message API).

:func:`run_federation` is the whole server side of a run:

1. an opening ``query`` round asks every node for its partition id, architecture and
   label counts (this is how the server learns node → architecture on every engine);
2. the configured strategy is built over that :class:`~fedkd.federation.Federation`;
3. Flower's ``Strategy.start()`` runs the rounds; after each, the global and group models
   are evaluated on the held-out test set and one row goes to ``metrics.jsonl``.

``make_server_app`` closes over a resolved config for the local and ray engines
(``run_simulation`` passes an empty run_config); the module-level ``app`` reads the config
from ``context.run_config`` for ``flwr run``.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedkd import client_state, records, tasks
from fedkd.checkpoint import Resume, from_tree, rng_state, set_rng_state, to_tree
from fedkd.checkpoint import prune as prune_checkpoints
from fedkd.checkpoint import save as save_checkpoint
from fedkd.config import Config, from_run_config
from fedkd.data import Dataset, load_dataset
from fedkd.engines import MeteredGrid, default_out
from fedkd.errors import ConfigError, UserError
from fedkd.federation import Federation, ServerContext, build_strategy, default_global_arch, parse_architectures
from fedkd.models import FedkdModel, build_model
from fedkd.results import RunRecorder, create_run_dir, run_title, write_atomic
from fedkd.train import evaluate, group_init_seed, resolve_device

log = logging.getLogger(__name__)

OnRound = Callable[[dict[str, Any]], None]


def global_architecture(cfg: Config) -> str:
    """``global.architecture``, defaulting to the largest client group's."""
    archs = parse_architectures(cfg.str("clients.architectures"), cfg.int("clients.num"))
    name = cfg.str("global.architecture") or default_global_arch(archs)
    from fedkd.models import MODELS

    MODELS.get(name)
    return name


def initial_models(cfg: Config, ds: Dataset, groups: list[str]) -> dict[str, FedkdModel]:
    """One freshly initialised model per group, seeded from ``seed``."""
    fd = cfg.int("model.feature-dim") or None
    out = {}
    for i, arch in enumerate(groups):
        torch.manual_seed(group_init_seed(cfg.int("seed"), i))
        try:
            out[arch] = build_model(arch, ds.shape, ds.num_classes, fd)
        except RuntimeError as e:  # e.g. a kernel larger than the input
            raise ConfigError(f"model {arch!r} does not fit dataset {ds.name!r} of shape {ds.shape}: {e}") from None
    return out


def handshake(grid: Grid, cfg: Config, global_arch: str, num_classes: int, timeout: float = 600.0) -> Federation:
    """Ask every node who it is; build the :class:`Federation`."""
    n = cfg.int("clients.num")
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise UserError(f"only {len(nodes)} of clients.num={n} nodes connected within {timeout:.0f}s")
        log.info("waiting for nodes: %d/%d connected", len(nodes), n)
        time.sleep(1.0)
    content = RecordDict({records.CONFIG: records.run_config_record(cfg.to_toml())})
    msgs = [Message(content, node, "query") for node in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=cfg.float("round-timeout")))
    node_partition: dict[int, int] = {}
    node_arch: dict[int, str] = {}
    node_device: dict[int, str] = {}
    counts = np.zeros((n, num_classes), dtype=np.int64)
    for r in replies:
        if r.has_error():
            raise UserError(
                f"node {r.metadata.src_node_id} failed the opening query: {(r.error.reason or '').splitlines()[0]}"
            )
        info = r.content.config_records[records.INFO]
        pid = int(info[records.PARTITION_ID])  # type: ignore[arg-type]
        if pid in node_partition.values():
            raise UserError(f"two nodes claim partition-id {pid}")
        node_partition[r.metadata.src_node_id] = pid
        node_arch[r.metadata.src_node_id] = str(info[records.ARCHITECTURE])
        counts[pid] = np.asarray(info[records.LABEL_COUNTS], dtype=np.int64)
        node_device[r.metadata.src_node_id] = str(info.get(records.DEVICE, "cpu"))
    missing = sorted(set(range(n)) - set(node_partition.values()))
    if missing:
        raise UserError(f"no node answered for partition ids {missing[:10]}")
    fed = Federation(node_partition, node_arch, counts, global_arch, seed=cfg.int("seed"), node_device=node_device)
    log.info("clients train on %s", ", ".join(f"{d} ×{k}" for d, k in fed.device_counts().items()))
    return fed


class Evaluator:
    """Evaluate every group's model (and so the global one) on the held-out test set; in a
    class-continual run (``plan``), on the classes seen by ``server_round``'s task
    (:func:`fedkd.tasks.evaluate_tasks`), with the global model's per-task accuracy."""

    def __init__(
        self,
        models: dict[str, FedkdModel],
        ds: Dataset,
        global_arch: str,
        device: torch.device,
        batch_size: int,
        plan: tasks.TaskPlan | None = None,
    ) -> None:
        self.models, self.ds, self.global_arch = models, ds, global_arch
        self.device, self.batch_size, self.plan = device, batch_size, plan
        for m in models.values():
            m.to(device)

    def __call__(self, state: Any, server_round: int = 0) -> dict[str, Any]:
        group_acc: dict[str, float] = {}
        group_loss: dict[str, float] = {}
        out: dict[str, Any] = {}
        for arch, model in self.models.items():
            records.load_record(model, records.unpack(state, arch))
            if self.plan is None:
                group_loss[arch], group_acc[arch] = evaluate(
                    model, self.ds.x_test, self.ds.y_test, self.batch_size, self.device
                )
                continue
            ev = tasks.evaluate_tasks(model, self.ds.x_test, self.ds.y_test, self.plan,
                                      self.plan.task_of(server_round), self.batch_size, self.device)  # fmt: skip
            group_loss[arch], group_acc[arch] = ev["loss"], ev["accuracy"]
            if arch == self.global_arch:
                out = ev
        return {
            "accuracy": group_acc[self.global_arch],
            "loss": group_loss[self.global_arch],
            "group_accuracy": group_acc,
            **({"task_accuracy": out["task_accuracy"]} if out else {}),
        }


class _Continued(Strategy):
    """``strategy`` seen from Flower's round loop, with rounds numbered after ``offset``.

    ``Strategy.start()`` counts rounds from 1; a resumed run continues at ``offset + 1``, so
    every hook (sampling seeds, learning-rate decays, FedGen's schedule) sees the same
    round numbers as in an uninterrupted run.
    """

    def __init__(self, strategy: Strategy, offset: int) -> None:
        self.strategy, self.offset = strategy, offset

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Grid) -> Any:
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: Any, config: Any, grid: Grid) -> Any:
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Any) -> Any:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        self.strategy.summary()


def run_federation(
    grid: Grid,
    cfg: Config,
    run_dir: Path | None = None,
    on_round: OnRound | None = None,
    resume: Resume | None = None,
) -> dict[str, Any]:
    """Run one federated simulation on ``grid``; return the summary.

    With ``resume`` (a checkpoint of this run), continue after the checkpoint's round: the
    strategy, the server state, the RNGs and the metric rows are restored, and the
    metrics file is cut back to the checkpoint's rows.
    """
    t0 = time.perf_counter()
    device = resolve_device(cfg.str("device"))
    ds = load_dataset(cfg.str("dataset.name"), cfg.str("dataset.root"), cfg.bool("dataset.download"))
    global_arch = global_architecture(cfg)
    archs = parse_architectures(cfg.str("clients.architectures"), cfg.int("clients.num"))
    groups = list(dict.fromkeys([*archs, global_arch]))
    models = initial_models(cfg, ds, groups)

    fed = handshake(grid, cfg, global_arch, ds.num_classes)
    bs = cfg.int("eval.batch-size")
    context = ServerContext(
        ds.shape, ds.num_classes, cfg.int("model.feature-dim") or None, device, cfg.int("seed"), cfg.int("rounds"),
        evaluate=lambda model: evaluate(model, ds.x_test, ds.y_test, bs, device),
        max_update_norm=cfg.float("validation.max-update-norm"),
    )  # fmt: skip
    strategy = build_strategy(cfg, fed, context)
    recorder = RunRecorder(run_dir, on_round, run_title(cfg.resolved(), run_dir.name if run_dir is not None else ""))
    if cfg.bool("log.tensorboard"):
        recorder.open_tensorboard()
    recorder.write_label_counts(fed.label_counts)
    metered = MeteredGrid(grid)
    plan = tasks.plan_of(cfg, ds.num_classes)
    evaluator = Evaluator(models, ds, global_arch, device, cfg.int("eval.batch-size"), plan)
    initial = records.pack({a: records.to_record(models[a]) for a in fed.groups})
    clock = {"t": time.perf_counter()}
    start_eval: dict[str, Any] = {}
    offset, elapsed_before = 0, 0.0
    if resume is not None:
        payload = resume.payload
        strategy.load_state_dict(payload["strategy"])
        initial = from_tree(payload["arrays"])
        recorder.restore(payload["rows"])
        start_eval.update(payload["initial"])
        offset, elapsed_before = resume.round, float(payload["elapsed"])
        set_rng_state(payload["rng"])
        log.info("resuming %s after round %d from %s", run_dir, offset, resume.path.name)
    every, keep, rounds = cfg.int("checkpoint.every"), cfg.int("checkpoint.keep"), cfg.int("rounds")

    def checkpoint(server_round: int, arrays: Any) -> None:
        if run_dir is None or every == 0 or (server_round % every and server_round != rounds):
            return
        payload = {
            "config": cfg.to_toml(),
            "arrays": to_tree(arrays),
            "strategy": strategy.state_dict(),
            "rows": recorder.rows,
            "initial": {k: v for k, v in start_eval.items()},
            "elapsed": elapsed_before + time.perf_counter() - t0,
            "rng": rng_state(),
        }
        save_checkpoint(run_dir, server_round, payload, keep)

    def evaluate_fn(server_round: int, arrays: Any) -> MetricRecord:
        ev = evaluator(arrays, server_round + offset if server_round else 0)
        counters = metered.reset()
        now = time.perf_counter()
        if server_round == 0 and offset:  # resumed: the restored state was evaluated before
            pass
        elif server_round == 0:  # before training: the handshake's traffic is not a round's
            start_eval.update(ev)
        else:
            server_round += offset
            train: Any = strategy.last_train_metrics or {}
            extra = dict(strategy.round_metrics)
            strategy.round_metrics.clear()
            if "accuracy" in extra:  # a strategy whose output is not one model (fedensemble)
                extra["model_accuracy"], extra["model_loss"] = ev["accuracy"], ev["loss"]
            if plan is not None:  # the task, per-task accuracy and forgetting
                extra.update(tasks.task_metrics(plan, server_round, ev, tasks.matrix_rows(recorder.rows)))
            recorder.record(
                {
                    "round": server_round,
                    "accuracy": extra.pop("accuracy", ev["accuracy"]),
                    "loss": extra.pop("loss", ev["loss"]),
                    "group_accuracy": ev["group_accuracy"],
                    "train_loss": train.get(records.TRAIN_LOSS),
                    **counters,
                    "seconds": now - clock["t"],
                    **extra,
                }
            )
            if plan is not None and run_dir is not None and plan.is_task_end(server_round):
                tasks.write_matrix(run_dir, plan, recorder.rows)
            checkpoint(server_round, arrays)
        clock["t"] = now
        return MetricRecord({"accuracy": ev["accuracy"], "loss": ev["loss"]})

    run_cfg = records.run_config_record(cfg.to_toml())
    train_cfg = ConfigRecord(dict(run_cfg))
    eval_cfg = ConfigRecord(dict(run_cfg))
    if run_dir is not None:  # where clients of stateful rules keep their state (fedkd.client_state)
        train_cfg[records.STATE_DIR] = eval_cfg[records.STATE_DIR] = str((run_dir / client_state.DIRNAME).resolve())
    _Continued(strategy, offset).start(
        grid=metered,
        initial_arrays=initial,
        num_rounds=rounds - offset,
        timeout=cfg.float("round-timeout"),
        train_config=train_cfg,
        evaluate_config=eval_cfg,
        evaluate_fn=evaluate_fn,
    )
    summary = recorder.finish(
        {
            "initial_accuracy": start_eval.get("accuracy"),
            "strategy": cfg.str("strategy.name"),
            "dataset": cfg.str("dataset.name"),
            "global_architecture": global_arch,
            "groups": {a: len(fed.nodes(a)) for a in fed.groups},
            "device": str(device),
            "client_devices": fed.device_counts(),
            **(tasks.summary(plan, recorder.rows) if plan is not None else {}),
            "wall_seconds": elapsed_before + time.perf_counter() - t0,
            **({"resumed_after_round": offset} if offset else {}),
        }
    )
    if run_dir is not None:
        prune_checkpoints(run_dir, cfg.int("checkpoint.keep-final"))
        shutil.rmtree(run_dir / client_state.DIRNAME, ignore_errors=True)  # a finished run continues no more
    return summary


def make_server_app(
    cfg: Config,
    run_dir: Path | None,
    on_round: OnRound | None = None,
    sink: dict[str, Any] | None = None,
    resume: Resume | None = None,
) -> ServerApp:
    """A ServerApp bound to a resolved config (local and ray engines)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        summary = run_federation(grid, cfg, run_dir, on_round, resume)
        if sink is not None:
            sink.update(summary)

    return app


# --- `flwr run .` entry point: config from context.run_config --------------------------
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """ServerApp for ``flwr run``: pyproject defaults + ``--run-config`` overrides."""
    cfg = from_run_config(context.run_config)
    random.seed(cfg.int("seed"))
    out = Path(cfg.str("out") or default_out("flwr"))
    run_dir = create_run_dir(out)
    write_atomic(run_dir / "config.toml", cfg.to_toml())
    summary = run_federation(
        grid, cfg, run_dir, on_round=lambda r: log.info("round %s accuracy %.4f", r["round"], r["accuracy"])
    )
    log.info("run finished: %s -> %s", summary, run_dir)
