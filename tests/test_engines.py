"""The in-process engine and the metering wrapper, against the real ClientApp API."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkd import records
from fedkd.engines import NODE_ID_OFFSET, LocalGrid, MeteredGrid


def test_flower_internals_the_local_engine_relies_on():
    """Fails loudly if Flower moves the internals LocalGrid uses (pinned: flwr>=1.41,<1.42)."""
    import flwr
    from flwr.common.serde import message_from_proto, message_to_proto  # noqa: F401
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    assert flwr.__version__.startswith("1.41"), flwr.__version__
    for attr in ("run_id", "node_id", "task_id"):
        assert isinstance(getattr(type(TaskIdentity), attr), property)
    assert Run.create_empty(5).run_id == 5


def echo_app(mutate: bool = False, fail_on: int | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if pid == fail_on:
            raise ValueError("client exploded")
        arrays = msg.content.array_records["arrays"]
        if mutate:
            arrays["w"] = Array(np.full(4, 99.0, np.float32))
        out = ArrayRecord({"w": Array(arrays["w"].numpy() + pid)})
        return Message(RecordDict({"arrays": out, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    return app


def _msgs(grid: LocalGrid, record: ArrayRecord) -> list[Message]:
    return [Message(RecordDict({"arrays": record, "config": ConfigRecord()}), n, "train") for n in grid.get_node_ids()]


def test_local_grid_runs_the_client_app_per_node():
    grid = LocalGrid(echo_app(), 3)
    assert grid.get_node_ids() == [NODE_ID_OFFSET + i for i in range(3)]
    rec = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    replies = grid.send_and_receive(_msgs(grid, rec))
    got = {r.metadata.src_node_id: r.content.array_records["arrays"]["w"].numpy()[0] for r in replies}
    assert got == {NODE_ID_OFFSET + i: float(i) for i in range(3)}
    assert all(r.metadata.reply_to_message_id for r in replies)


def test_nothing_is_shared_between_server_and_clients():
    grid = LocalGrid(echo_app(mutate=True), 2)
    rec = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    grid.send_and_receive(_msgs(grid, rec))
    np.testing.assert_array_equal(rec["w"].numpy(), 0.0)


def test_client_exception_is_an_error_reply_and_counted():
    grid = MeteredGrid(LocalGrid(echo_app(fail_on=1), 3))
    rec = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    replies = list(grid.send_and_receive(_msgs(grid.grid, rec)))  # type: ignore[arg-type]
    errors = [r for r in replies if r.has_error()]
    assert len(errors) == 1 and "client exploded" in errors[0].error.reason
    counters = grid.reset()
    wire = len(Array(np.zeros(4, np.float32)).data)  # .npy bytes as sent: header + 16 bytes
    assert counters == {"bytes_down": 3 * wire, "bytes_up": 2 * wire, "bytes_down_extra": 0, "bytes_up_extra": 0,
                        "failures": 1}  # fmt: skip
    assert grid.reset() == {"bytes_down": 0, "bytes_up": 0, "bytes_down_extra": 0, "bytes_up_extra": 0, "failures": 0}


def test_array_bytes_count_every_array_record():
    a = ArrayRecord({"x": Array(np.zeros((10, 10), np.float32))})
    g = ArrayRecord({"y": Array(np.zeros(5, np.float64))})
    grid = LocalGrid(echo_app(), 1)
    msg = Message(RecordDict({"arrays": a, "generator": g}), grid.get_node_ids()[0], "train")
    assert records.message_array_bytes(msg) == len(a["x"].data) + len(g["y"].data)
    assert len(a["x"].data) >= 400 and len(g["y"].data) >= 40
    assert records.message_extra_bytes(msg) == len(g["y"].data)  # beyond the model weights


@pytest.mark.parametrize("arch", ["cnn", "resnet8"])
def test_pack_unpack(arch):
    import torch

    from fedkd.models import build_model

    m = build_model(arch, (1, 8, 8), 10)
    st = records.pack({arch: records.to_record(m), "mlp": records.to_record(build_model("mlp", (1, 8, 8), 10))})
    assert records.architectures_in(st) == [arch, "mlp"]
    m2 = build_model(arch, (1, 8, 8), 10)
    records.load_record(m2, records.unpack(st, arch))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values(), strict=True))
