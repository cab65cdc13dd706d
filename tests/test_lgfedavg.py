"""LG-FedAvg across architectures: one head averaged over every group, local representations,
per-client evaluation; mocked replies in Flower's style, then a real run with 3 architectures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedkd import records
from fedkd.cli import main
from fedkd.config import load_config
from fedkd.errors import ConfigError
from fedkd.federation import Federation, ServerContext, build_strategy
from fedkd.train import LGFedAvgRule

ARCHS = {11: "mlp", 12: "mlp", 21: "lenet5"}
pytestmark = pytest.mark.usefixtures("task_identity")


def _context(feature_dim: int | None = 16) -> ServerContext:
    return ServerContext((1, 8, 8), 10, feature_dim, torch.device("cpu"), 0, 3)


def _federation() -> Federation:
    return Federation({n: i for i, n in enumerate(ARCHS)}, ARCHS, np.full((3, 10), 5), "mlp", seed=0)


class _Grid:
    def get_node_ids(self):
        return list(ARCHS)


def _model(ctx: ServerContext, arch: str, seed: int):
    torch.manual_seed(seed)
    return ctx.build(arch)


def test_only_the_head_travels_and_is_averaged_over_every_architecture(reply):
    ctx, fed = _context(), _federation()
    s = build_strategy(load_config(None, ["strategy.name=lgfedavg"]), fed, ctx)
    state = records.pack({a: records.to_record(_model(ctx, a, 0)) for a in fed.groups})
    msgs = list(s.configure_train(1, state, ConfigRecord(), _Grid()))
    assert all(m.content[records.CONFIG][records.RULE] == "lgfedavg" for m in msgs)  # the clients keep their body
    # the representation never travels: the message holds the head and the group's init seed
    assert all(set(m.content[records.ARRAYS]) == {"classifier.weight", "classifier.bias"} for m in msgs)
    assert all(records.INIT_SEED in m.content[records.CONFIG] for m in msgs)
    models = {n: _model(ctx, a, n) for n, a in ARCHS.items()}
    examples = {11: 10, 12: 30, 21: 60}
    sent = {n: records.without(records.to_record(m), LGFedAvgRule.local_names(m)) for n, m in models.items()}
    replies = [
        reply(n, RecordDict({records.ARRAYS: sent[n],
                             records.METRICS: MetricRecord({records.NUM_EXAMPLES: examples[n]}),
                             records.INFO: ConfigRecord({records.LABEL_COUNTS: [examples[n]] + [0] * 9})}))
        for n in ARCHS
    ]  # fmt: skip
    new, _ = s.aggregate_train(1, replies)
    assert s.round_metrics["rejected"] == 0
    head = sum(examples[n] * models[n].classifier.weight.detach().double() for n in ARCHS) / 100
    for arch in ("mlp", "lenet5"):
        got, before = records.unpack(new, arch), records.unpack(state, arch)
        np.testing.assert_allclose(got["classifier.weight"].numpy(), head.numpy(), rtol=1e-5, atol=1e-6)
        # the server's representation is untouched: no client sent one
        assert list(got.keys()) == list(before.keys())
        assert all(np.array_equal(got[k].numpy(), before[k].numpy()) for k in before if not k.startswith("classifier."))
    # a reply that sends its representation anyway is rejected
    leaky = reply(11, RecordDict({records.ARRAYS: records.to_record(models[11]),
                                  records.METRICS: MetricRecord({records.NUM_EXAMPLES: 10}),
                                  records.INFO: ConfigRecord({records.LABEL_COUNTS: [10] + [0] * 9})}))  # fmt: skip
    list(s.configure_train(2, new, ConfigRecord(), _Grid()))
    s.aggregate_train(2, [leaky])
    assert s.round_metrics["rejected"] == 1


def test_heads_of_different_shapes_and_a_rule_base_are_refused():
    with pytest.raises(ConfigError, match="set model.feature-dim"):
        build_strategy(load_config(None, ["strategy.name=lgfedavg"]), _federation(), _context(None))
    with pytest.raises(ConfigError, match="runs its own local rule"):
        build_strategy(load_config(None, ["strategy.name=lgfedavg", "strategy.lgfedavg.base=scaffold"]),
                       _federation(), _context())  # fmt: skip


def test_the_client_keeps_everything_but_the_head():
    names = LGFedAvgRule.local_names(_model(_context(), "lenet5", 0))
    assert names and not any(n.startswith("classifier.") for n in names)
    assert {n for n in _model(_context(), "lenet5", 0).state_dict() if n not in names} == {
        "classifier.weight", "classifier.bias"}  # fmt: skip


def test_lgfedavg_runs_with_three_architectures_and_reports_per_client_accuracy(tmp_path):
    out = tmp_path / "lg"
    sets = ["rounds=2", "clients.num=6", "clients.architectures=mlp:2,lenet5:2,cnn:2", "model.feature-dim=16",
            "clients.local-steps=5", "clients.threads=1", "strategy.name=lgfedavg", "partition.name=dirichlet",
            "partition.test-fraction=0.25", "eval.fraction=1"]  # fmt: skip
    assert main(["run", "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["client_accuracy"]) == 6 for r in rows)
    assert json.loads((out / "summary.json").read_text())["final_client_accuracy"] > 0.1
