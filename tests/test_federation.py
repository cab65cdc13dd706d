"""GroupedStrategy in Flower's own test shape: real RecordDict replies, no simulation."""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedkd import records
from fedkd.config import load_config
from fedkd.errors import ConfigError
from fedkd.federation import Federation, GroupedStrategy, build_strategy, default_global_arch, parse_architectures
from strategies import STRATEGIES

# nodes 11, 12 hold "a" (2-array model); nodes 21, 22, 23 hold "b" (1-array model)
NODE_ARCH = {11: "a", 12: "a", 21: "b", 22: "b", 23: "b"}
NODE_PID = {11: 0, 12: 1, 21: 2, 22: 3, 23: 4}


pytestmark = pytest.mark.usefixtures("task_identity")


def fed(global_arch: str = "a") -> Federation:
    return Federation(NODE_PID, NODE_ARCH, np.ones((5, 3), int), global_arch, seed=0)


def state(va: float, vb: float) -> ArrayRecord:
    return records.pack(
        {
            "a": ArrayRecord({"w": Array(np.full((2, 2), va, np.float32)), "b": Array(np.full(2, va, np.float32))}),
            "b": ArrayRecord({"w": Array(np.full(3, vb, np.float32))}),
        }
    )


def train_reply(reply, node: int, value: float, n: int, loss: float = 1.0):
    arch = NODE_ARCH[node]
    arrays = (
        ArrayRecord({"w": Array(np.full((2, 2), value, np.float32)), "b": Array(np.full(2, value, np.float32))})
        if arch == "a"
        else ArrayRecord({"w": Array(np.full(3, value, np.float32))})
    )
    content = RecordDict(
        {
            records.ARRAYS: arrays,
            records.METRICS: MetricRecord({records.NUM_EXAMPLES: n, records.TRAIN_LOSS: loss}),
            records.INFO: ConfigRecord({records.LABEL_COUNTS: [n, 0, 0]}),
        }
    )
    return reply(node, content)


class FakeGrid:
    """Only what strategies call during configure_*: the node list."""

    def get_node_ids(self):
        return list(NODE_ARCH)


def grouped(base_cls=FedAvg, fraction: float = 1.0, **kw) -> GroupedStrategy:
    return GroupedStrategy(
        fed(),
        lambda n: base_cls(
            fraction_train=fraction, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=n, **kw
        ),
    )


def test_each_node_gets_only_its_groups_arrays():
    s = grouped(FedProx, proximal_mu=0.1)
    msgs = list(s.configure_train(1, state(1.0, 2.0), ConfigRecord({"k": 1}), FakeGrid()))
    assert sorted(m.metadata.dst_node_id for m in msgs) == sorted(NODE_ARCH)
    for m in msgs:
        arrays = m.content.array_records[records.ARRAYS]
        expect = {"w", "b"} if NODE_ARCH[m.metadata.dst_node_id] == "a" else {"w"}
        assert set(arrays) == expect
        cfg = m.content.config_records[records.CONFIG]
        assert cfg["proximal-mu"] == 0.1 and cfg["k"] == 1 and cfg["server-round"] == 1


def test_fedavg_within_groups_is_weighted_per_group(reply):
    s = grouped()
    s.configure_train(1, state(0.0, 0.0), ConfigRecord(), FakeGrid())
    replies = [
        train_reply(reply, 11, 1.0, 10), train_reply(reply, 12, 4.0, 30),
        train_reply(reply, 21, 2.0, 1), train_reply(reply, 22, 2.0, 1), train_reply(reply, 23, 8.0, 2),
    ]  # fmt: skip
    new, metrics = s.aggregate_train(1, replies)
    a, b = records.unpack(new, "a"), records.unpack(new, "b")
    np.testing.assert_allclose(a["w"].numpy(), np.full((2, 2), (10 * 1 + 30 * 4) / 40))
    np.testing.assert_allclose(b["w"].numpy(), np.full(3, (2 + 2 + 16) / 4))
    assert metrics[records.TRAIN_LOSS] == pytest.approx(1.0)


def test_group_without_replies_keeps_its_arrays(reply):
    s = grouped()
    s.configure_train(1, state(5.0, 7.0), ConfigRecord(), FakeGrid())
    new, _ = s.aggregate_train(1, [train_reply(reply, 11, 1.0, 1)])
    np.testing.assert_allclose(records.unpack(new, "b")["w"].numpy(), 7.0)
    np.testing.assert_allclose(records.unpack(new, "a")["w"].numpy(), 1.0)
    assert list(new) == list(state(0, 0)), "key order must be stable (FedAvgM relies on it)"


def test_failed_replies_are_skipped(reply):
    from flwr.app import Error
    from flwr.app.message import make_message

    s = grouped()
    s.configure_train(1, state(0.0, 0.0), ConfigRecord(), FakeGrid())
    ok = train_reply(reply, 11, 3.0, 1)
    bad = make_message(metadata=train_reply(reply, 12, 9.0, 1).metadata, error=Error(2, "boom"))
    new, _ = s.aggregate_train(1, [ok, bad])
    np.testing.assert_allclose(records.unpack(new, "a")["w"].numpy(), 3.0)


def test_stateful_base_keeps_state_per_group(reply):
    s = grouped(FedAdam, eta=0.1, beta_1=0.0, beta_2=0.0, tau=1.0)
    s.configure_train(1, state(0.0, 0.0), ConfigRecord(), FakeGrid())
    new, _ = s.aggregate_train(1, [train_reply(reply, n, 1.0, 1) for n in NODE_ARCH])
    ada, adb = s.delegates["a"], s.delegates["b"]
    assert set(ada.m_t) == {"w", "b"} and set(adb.m_t) == {"w"}
    # Adam step: x + eta * m / (sqrt(v) + tau) with m = v^0.5 = delta = 1
    np.testing.assert_allclose(records.unpack(new, "a")["w"].numpy(), 0.1 * 1 / (1 + 1.0), rtol=1e-5)


def test_sampling_is_stratified_and_seeded():
    def sampled(seed: int) -> list[int]:
        f = Federation(NODE_PID, NODE_ARCH, np.ones((5, 3), int), "a", seed=seed)
        s = GroupedStrategy(
            f, lambda n: FedAvg(fraction_train=0.5, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=n)
        )
        random.seed(12345)  # other users of `random` must not matter
        return sorted(m.metadata.dst_node_id for m in s.configure_train(3, state(0, 0), ConfigRecord(), FakeGrid()))

    first = sampled(0)
    assert len([n for n in first if NODE_ARCH[n] == "a"]) == 1
    assert len([n for n in first if NODE_ARCH[n] == "b"]) == 1
    assert sampled(0) == first
    assert len({tuple(sampled(s)) for s in range(12)}) > 1


@pytest.mark.parametrize("name", [n for n in STRATEGIES.names() if not issubclass(STRATEGIES.get(n), GroupedStrategy)])
def test_every_flower_strategy_runs_grouped(reply, name, monkeypatch):
    # three nodes in each group: Krum and Multi-Krum need 2f + 3 replies, Bulyan 4f + 3 (f = 0)
    monkeypatch.setitem(NODE_ARCH, 13, "a")
    monkeypatch.setitem(NODE_PID, 13, 5)
    continual = getattr(STRATEGIES.get(name), "needs_tasks", False)  # finetune, FedLwF, FedEWC: a class-continual run
    cfg = load_config(None, [f"strategy.name={name}", *(["tasks.classes-per-task=5"] if continual else [])])
    s = build_strategy(cfg, Federation(NODE_PID, NODE_ARCH, np.ones((6, 3), int), "a", seed=0))
    msgs = list(s.configure_train(1, state(0.0, 0.0), ConfigRecord(), FakeGrid()))
    assert msgs
    replies = [train_reply(reply, m.metadata.dst_node_id, 1.0, 5) for m in msgs]
    for m, r in zip(msgs, replies, strict=True):
        if "clipping_norm" in m.content[records.CONFIG]:  # a client-side DP wrapper: fedkd's client reports norm_bit
            r.content[records.METRICS]["norm_bit"] = 1
    new, _ = s.aggregate_train(1, replies)
    assert new is not None and list(new) == list(state(0, 0))
    for v in new.values():
        assert np.isfinite(v.numpy()).all()


def test_parse_architectures():
    assert parse_architectures("cnn", 3) == ["cnn"] * 3
    assert parse_architectures("cnn:2, lenet5:1", 3) == ["cnn", "cnn", "lenet5"]
    for bad in ("cnn:2,lenet5", "cnn:x", "cnn:0,mlp:3", ":3", "cnn:2,,mlp:1"):
        with pytest.raises(ConfigError, match="clients.architectures: cannot parse"):
            parse_architectures(bad, 3)
    with pytest.raises(ConfigError, match="assigns 4 clients but clients.num is 3"):
        parse_architectures("cnn:2,mlp:2", 3)
    with pytest.raises(ConfigError, match="unknown model 'vgg'"):
        parse_architectures("vgg:3", 3)


def test_default_global_is_largest_group():
    assert default_global_arch(["mlp", "cnn", "cnn", "mlp", "lenet5", "cnn"]) == "cnn"
    assert default_global_arch(["mlp", "cnn"]) == "mlp"


def test_global_without_clients_needs_a_distillation_strategy():
    with pytest.raises(ConfigError, match="global.architecture 'resnet8' has no clients"):
        build_strategy(load_config(), fed("resnet8"))


def test_qfedavg_gets_the_clients_lr_and_loss_key():
    """q-FedAvg rebuilds each client's update as a gradient with the clients' lr, and weighs it by
    the loss the clients report: fedkd sets both (they are not config keys)."""
    s = build_strategy(load_config(None, ["strategy.name=qfedavg", "clients.lr=0.03"]), fed())
    for base in s.delegates.values():
        assert base.client_learning_rate == 0.03
        assert base.train_loss_key == records.TRAIN_LOSS
