"""FD (FedDistill): the client's KD term and per-class logits, the server's per-class average
over the clients that have a class (mocked replies), checkpointing, and a real run with 3
architectures judged per client."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedkd import records
from fedkd.cli import main
from fedkd.config import load_config
from fedkd.federation import Federation, ServerContext, build_strategy
from fedkd.models import build_model
from fedkd.train import FDRule, LocalTrainConfig, train_local

C = 4


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("mlp", (1, 8, 8), C, 6).double()


def _data(n: int = 20):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2] * 6 + [0, 1])


def test_the_kd_term_pulls_toward_the_global_logit_of_each_label_that_has_one():
    model = _model()
    x, y = _data()
    glob = torch.randn(C, C, dtype=torch.float64)
    has = torch.tensor([1.0, 0.0, 1.0, 1.0])  # class 1 has no global logit
    rule = FDRule(model, LocalTrainConfig(steps=1), {"logits": glob, "has": has}, None, lamda=0.5)
    logits = model(x)
    target = logits.detach().clone()
    for i, c in enumerate(y.tolist()):
        if has[c]:
            target[i] = glob[c]
    want = 0.5 * ((logits - target) ** 2).mean()  # MSE over batch × classes; class-1 rows add 0
    got = rule.loss(model, x, None, logits, y)
    assert torch.allclose(got, want)
    assert FDRule(model, LocalTrainConfig(steps=1), {}, None).loss(model, x, None, logits, y) is None  # first round


def test_the_client_sends_its_per_class_mean_logits_and_keeps_its_whole_model():
    model = _model()
    x, y = _data()
    cfg = LocalTrainConfig(steps=0, epochs=1, batch_size=8, lr=1e-12)  # one pass, the model ~unchanged
    rule = FDRule(model, cfg, {}, None)
    train_local(model, x, y, cfg, seed=0, rule=rule)
    with torch.no_grad():
        z = model(x)
    for c in range(3):
        assert torch.allclose(rule.arrays["logits"][c].double(), z[y == c].mean(0), atol=1e-5)
    assert rule.arrays["counts"].tolist() == [7.0, 7.0, 6.0, 0.0]
    assert set(rule.state) == set(model.state_dict())


def _fed() -> tuple[Federation, ServerContext]:
    archs = {11: "mlp", 21: "lenet5"}
    fed = Federation({11: 0, 21: 1}, archs, np.full((2, C), 5), "mlp", seed=0)
    return fed, ServerContext((1, 8, 8), C, 8, torch.device("cpu"), 0, 3)


class _Grid:
    def get_node_ids(self):
        return [11, 21]


def test_the_server_averages_each_class_over_the_clients_that_have_it(reply, task_identity):
    fed, ctx = _fed()
    s = build_strategy(load_config(None, ["strategy.name=fd", "strategy.fd.lamda=0.3"]), fed, ctx)
    state = records.pack({a: records.to_record(ctx.build(a)) for a in fed.groups})
    msgs = list(s.configure_train(1, state, ConfigRecord(), _Grid()))
    assert all(m.content[records.CONFIG][records.RULE] == "fd" for m in msgs)
    assert all(m.content[records.CONFIG]["rule.lamda"] == pytest.approx(0.3) for m in msgs)
    assert not any(records.RULE_ARRAYS in m.content.array_records for m in msgs)  # nothing global yet
    a, b = np.arange(16, dtype=np.float32).reshape(4, 4), -np.ones((4, 4), np.float32)
    counts = {11: np.array([3, 0, 2, 0], np.float32), 21: np.array([1, 5, 0, 0], np.float32)}
    replies = []
    for n, logits in ((11, a), (21, b)):
        torch.manual_seed(n)
        content = RecordDict({
            records.ARRAYS: records.to_record(ctx.build(fed.node_arch[n])),
            records.RULE_ARRAYS: ArrayRecord({"logits": Array(logits), "counts": Array(counts[n])}),
            records.METRICS: MetricRecord({records.NUM_EXAMPLES: 5}),
            records.INFO: ConfigRecord({records.LABEL_COUNTS: [5, 0, 0, 0]}),
        })  # fmt: skip
        replies.append(reply(n, content))
    new, _ = s.aggregate_train(1, replies)
    assert new is not None
    g = s.global_logits["logits"].numpy()
    np.testing.assert_allclose(g[0], (a[0] + b[0]) / 2)  # both have class 0: uniform over clients
    np.testing.assert_allclose(g[1], b[1])  # only the second
    np.testing.assert_allclose(g[2], a[2])  # only the first
    assert s.global_logits["has"].numpy().tolist() == [1, 1, 1, 0]
    msgs = list(s.configure_train(2, new, ConfigRecord(), _Grid()))
    assert all(np.array_equal(m.content[records.RULE_ARRAYS]["logits"].numpy(), g) for m in msgs)
    fresh = build_strategy(load_config(None, ["strategy.name=fd"]), fed, ctx)
    fresh.load_state_dict(s.state_dict())  # checkpointed with the run
    np.testing.assert_array_equal(fresh.global_logits["logits"].numpy(), g)


def test_fd_runs_with_three_architectures_and_reports_per_client_accuracy(tmp_path):
    out = tmp_path / "fd"
    sets = ["rounds=2", "clients.num=6", "clients.architectures=mlp:2,lenet5:2,cnn:2", "clients.local-steps=5",
            "clients.threads=1", "strategy.name=fd", "partition.name=dirichlet", "partition.test-fraction=0.25",
            "eval.fraction=1"]  # fmt: skip
    assert main(["run", "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["client_accuracy"]) == 6 and r["fd_classes"] == 10 for r in rows)
    assert rows[-1]["rejected"] == 0
    # the models stay on the clients: the logits (C x C and the counts, each way) are the whole traffic
    assert all(r["bytes_up"] == r["bytes_up_extra"] and r["bytes_down"] == r["bytes_down_extra"] for r in rows)
    assert 0 < rows[0]["bytes_up"] <= 6 * (10 * 10 + 10) * 4 * 1.01 + 6 * 4096


def test_lamda_zero_is_local_training_alone():
    model, ref = _model(), _model()
    x, y = _data()
    cfg = LocalTrainConfig(steps=3, batch_size=8, lr=0.1)
    glob = {"logits": torch.randn(C, C, dtype=torch.float64), "has": torch.ones(C)}
    train_local(model, x, y, cfg, seed=2, rule=FDRule(model, cfg, glob, None, lamda=0.0))
    train_local(ref, x, y, cfg, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))
