"""Engines that run the unchanged ServerApp and ClientApp.

* ``local``: :class:`LocalGrid`, an in-process :class:`~flwr.serverapp.Grid` that hands
  each message to the ClientApp directly. Every message is serialized with Flower's
  protobuf serde on the way out and back, so nothing is shared between server and
  clients, exactly as on the other engines. Fast: the default for small runs and tests.
* ``ray``: Flower's Simulation Engine (``flwr.simulation.run_simulation``).
* deployment: ``flwr run .`` against a SuperLink and SuperNodes (see the README); the
  ServerApp then reads its config from ``context.run_config``.

:class:`MeteredGrid` wraps whatever Grid an engine provides and counts the bytes of every
array that crosses, and the failed or missing replies.

The local engine sets Flower's ``TaskIdentity`` (an internal) as Flower's own runtimes do;
``tests/test_engines.py`` fails loudly if that internal changes.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # type: ignore[attr-defined]
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedkd import records
from fedkd.config import Config

log = logging.getLogger(__name__)

NODE_ID_OFFSET = 1_000  # local engine: node id = offset + partition id


def _roundtrip(msg: Message) -> Message:
    """Serialize and deserialize a message (what any transport does)."""
    proto = ProtoMessage()
    proto.ParseFromString(message_to_proto(msg).SerializeToString())
    return message_from_proto(proto)


class LocalGrid(Grid):
    """An in-process Grid: ``num_nodes`` virtual SuperNodes running ``client_app``.

    Parameters
    ----------
    client_app : ClientApp
        The unchanged ClientApp.
    num_nodes : int
        Number of virtual SuperNodes; node ``i`` gets ``partition-id = i``.
    run_id : int
        Run id reported in messages.
    batched : bool
        Train the train messages of one ``send_and_receive`` together (:mod:`fedkd.batched`):
        fedkd's ClientApp's own prepare and finish steps per message, the local updates of
        each architecture group as one computation. Other messages run one by one.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1, batched: bool = False) -> None:
        self.client_app = client_app
        self.batched = batched
        self._run = Run.create_empty(run_id)
        self.contexts: dict[int, Context] = {
            NODE_ID_OFFSET + i: Context(
                run_id=run_id,
                node_id=NODE_ID_OFFSET + i,
                node_config={records.PARTITION_ID: i, "num-partitions": num_nodes, records.ENGINE: "local"},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self._pending: dict[str, Message] = {}
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 1

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self._pending[msg.metadata.message_id] = _roundtrip(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def _execute(self, msg: Message) -> Message:
        ctx = self.contexts.get(msg.metadata.dst_node_id)
        if ctx is None:
            return Message(Error(ErrorCode.NODE_UNAVAILABLE, f"no node {msg.metadata.dst_node_id}"), reply_to=msg)
        try:
            reply = self.client_app(msg, ctx)
        except Exception as e:  # a ClientApp exception becomes an error reply, as in Flower's runtimes
            reply = self._error(msg, ctx, e)
        return self._reply(reply)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._execute(self._pending.pop(i)) for i in list(message_ids) if i in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Run every message's ClientApp call; a reply that took longer than ``timeout`` is lost.

        Clients run one after another, but each one's time is measured on its own, as if
        they ran in parallel: a straggler loses its own reply, not the others'. Batched, a
        client's time is its own prepare and finish plus its share of its group's training.
        """
        ids = self.push_messages(messages)
        timed: list[tuple[Message, float]] = []
        train = [i for i in ids if self._pending[i].metadata.message_type == MessageType.TRAIN]
        if self.batched and len(train) > 1:
            timed.extend(self._execute_batched([self._pending.pop(i) for i in train]))
            ids = [i for i in ids if i not in set(train)]
        for mid in ids:
            t = time.perf_counter()
            (reply,) = self.pull_messages([mid])
            timed.append((reply, time.perf_counter() - t))
        replies = []
        for reply, seconds in timed:
            if timeout is not None and seconds > timeout:
                log.warning("node %s replied after the %.1fs timeout: reply lost", reply.metadata.src_node_id, timeout)
                continue
            replies.append(reply)
        return replies

    def _error(self, msg: Message, ctx: Context, e: Exception) -> Message:
        log.debug("ClientApp raised on node %s:\n%s", ctx.node_id, traceback.format_exc())
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(e).__name__}: {e}"), reply_to=msg)

    def _execute_batched(self, msgs: list[Message]) -> list[tuple[Message, float]]:
        """fedkd's ClientApp train handler in three parts, the middle one batched per group."""
        from fedkd.batched import train_all
        from fedkd.client_app import finish_train, prepare_train

        out: list[tuple[Message, float]] = []
        jobs, spent = [], []
        for msg in msgs:
            ctx = self.contexts.get(msg.metadata.dst_node_id)
            t = time.perf_counter()
            if ctx is None:
                reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, f"no node {msg.metadata.dst_node_id}"), reply_to=msg)
            else:
                try:
                    jobs.append((prepare_train(msg, ctx), ctx))
                    spent.append(time.perf_counter() - t)
                    continue
                except Exception as e:
                    reply = self._error(msg, ctx, e)
            out.append((self._reply(reply), time.perf_counter() - t))
        try:
            losses, shares = train_all([j.client for j, _ in jobs])
        except Exception as e:  # the whole batch failed: every member gets the error, as one by one would
            return out + [(self._reply(self._error(j.msg, ctx, e)), s) for (j, ctx), s in zip(jobs, spent, strict=True)]
        for (job, ctx), s, loss, share in zip(jobs, spent, losses, shares, strict=True):
            t = time.perf_counter()
            try:
                reply = finish_train(job, loss)
            except Exception as e:
                reply = self._error(job.msg, ctx, e)
            out.append((self._reply(reply), s + share + time.perf_counter() - t))
        return out

    @staticmethod
    def _reply(reply: Message) -> Message:
        reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        return _roundtrip(reply)


class MeteredGrid(Grid):
    """Wrap a Grid and count array bytes down/up and failed or missing replies."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.reset()

    def reset(self) -> dict[str, int]:
        """Return the counters since the last reset and zero them."""
        names = ("bytes_down", "bytes_up", "bytes_down_extra", "bytes_up_extra", "failures")
        old = {k: getattr(self, k, 0) for k in names}
        self.bytes_down = self.bytes_up = self.bytes_down_extra = self.bytes_up_extra = self.failures = 0
        return old

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._count_sent(messages)
        return self.grid.push_messages(messages)

    def _count_sent(self, messages: list[Message]) -> None:
        self.bytes_down += sum(records.message_array_bytes(m) for m in messages)
        self.bytes_down_extra += sum(records.message_extra_bytes(m) for m in messages)

    def _count_replies(self, replies: list[Message]) -> None:
        for r in replies:
            if r.has_error():
                self.failures += 1
            else:
                self.bytes_up += records.message_array_bytes(r)
                self.bytes_up_extra += records.message_extra_bytes(r)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        self._count_replies(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self._count_sent(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self._count_replies(replies)
        self.failures += max(0, len(messages) - len(replies))  # timed out / lost
        return replies


def run_local(server_main: Callable[[Grid, Context], Any], client_app: ClientApp, num_nodes: int) -> Any:
    """Run a ServerApp main function on the in-process engine."""
    grid = LocalGrid(client_app, num_nodes)
    ctx = Context(run_id=grid.run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config={})
    return server_main(grid, ctx)


def run_ray(server_app: ServerApp, client_app: ClientApp, cfg: Config) -> None:
    """Run on Flower's Simulation Engine (Ray), with client resources from the config."""
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    backend_config = {
        "client_resources": {"num_cpus": cfg.float("ray.num-cpus"), "num_gpus": cfg.float("ray.num-gpus")},
        "init_args": {"include_dashboard": False, "num_cpus": os.cpu_count() or 1, "log_to_driver": True},
    }
    t = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.int("clients.num"),
                   backend_config=backend_config)  # type: ignore[arg-type]  # fmt: skip
    log.info("ray engine finished in %.1fs", time.perf_counter() - t)


def default_out(sim: str | Path | None) -> Path:
    """``runs/<sim-stem>-<timestamp>`` (a new directory)."""
    stem = Path(sim).stem if sim else "quickstart"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def execute(
    cfg: Config,
    run_dir: Path | None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run one simulation on the config's engine; return its summary ({} if it did not finish).

    With ``resume``, continue the unfinished run in ``run_dir`` from its last checkpoint.
    """
    from fedkd.checkpoint import latest
    from fedkd.client_app import app as client_app
    from fedkd.server_app import make_server_app

    checkpoint = None
    if resume and run_dir is not None:
        checkpoint = latest(run_dir)
        if checkpoint.payload["config"] != cfg.to_toml():
            from fedkd.errors import UserError

            raise UserError(f"{checkpoint.path} was written by another config than {run_dir / 'config.toml'}")

    summary: dict[str, Any] = {}
    server_app = make_server_app(cfg, run_dir, on_round, summary, checkpoint)
    if cfg.str("engine") == "local":
        grid = LocalGrid(client_app, cfg.int("clients.num"), batched=cfg.bool("clients.batched"))
        server_app(grid, Context(grid.run.run_id, SUPERLINK_NODE_ID, {}, RecordDict(), {}))
    else:
        run_ray(server_app, client_app, cfg)
    return summary
