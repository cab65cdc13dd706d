"""FedProto: the prototype term, eval-mode class prototypes, nearest-prototype evaluation, the
server's per-class average (mocked replies), and a real run with 3 architectures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedkd import records
from fedkd.cli import main
from fedkd.config import load_config
from fedkd.errors import ConfigError
from fedkd.federation import Federation, ServerContext, build_strategy
from fedkd.models import build_model
from fedkd.train import FedProtoRule, LocalTrainConfig, evaluate, train_local

C, D = 4, 6


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("mlp", (1, 8, 8), C, D).double()


def _data(n: int = 20):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2] * 6 + [0, 1])


def test_the_term_pulls_features_toward_their_labels_global_prototype():
    model = _model()
    x, y = _data()
    protos, has = torch.randn(C, D, dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0, 1.0])
    rule = FedProtoRule(model, LocalTrainConfig(steps=1), {"protos": protos, "has": has}, None, lamda=2.0)
    h = model.features(x)
    target = h.detach().clone()
    for i, c in enumerate(y.tolist()):
        if has[c]:
            target[i] = protos[c]
    assert torch.allclose(rule.loss(model, x, h, model.classifier(h), y), 2.0 * ((h - target) ** 2).mean())


def test_the_prototypes_are_eval_mode_class_means_of_the_training_features_after_training():
    model = _model()
    x, y = _data()
    cfg = LocalTrainConfig(steps=2, batch_size=8, lr=0.1)
    rule = FedProtoRule(model, cfg, {}, None)
    train_local(model, x, y, cfg, seed=0, rule=rule)
    model.eval()
    with torch.no_grad():
        h = model.features(x)
    for c in range(3):
        assert torch.allclose(rule.arrays["protos"][c].double(), h[y == c].mean(0), atol=1e-6)
    assert rule.arrays["counts"].tolist() == [7.0, 7.0, 6.0, 0.0]
    assert set(rule.state) == set(model.state_dict())  # the whole model stays with the client


def test_evaluation_predicts_the_nearest_global_prototype():
    model = _model()
    x, y = _data()
    with torch.no_grad():
        h = model.features(x)
    protos = torch.stack([h[y == c].mean(0) if c < 3 else torch.zeros(D, dtype=torch.float64) for c in range(C)])
    has = torch.tensor([1.0, 1.0, 1.0, 0.0])
    scorer = FedProtoRule.evaluation_model(model, {"protos": protos, "has": has})
    d = ((h[:, None] - protos[None]) ** 2).sum(-1)
    d[:, 3] = float("inf")
    _, acc = evaluate(scorer, x, y)
    assert acc == pytest.approx(float((d.argmin(1) == y).double().mean()))
    assert FedProtoRule.evaluation_model(model, {}) is model  # no prototypes yet: the head


class _Grid:
    def get_node_ids(self):
        return [11, 21]


def test_the_server_averages_prototypes_per_class_and_sends_them_for_evaluation(reply, task_identity):
    archs = {11: "mlp", 21: "lenet5"}
    fed = Federation({11: 0, 21: 1}, archs, np.full((2, C), 5), "mlp", seed=0)
    ctx = ServerContext((1, 8, 8), C, D, torch.device("cpu"), 0, 3)
    s = build_strategy(load_config(None, ["strategy.name=fedproto", "eval.fraction=1"]), fed, ctx)
    state = records.pack({a: records.to_record(ctx.build(a)) for a in fed.groups})
    s.configure_train(1, state, ConfigRecord(), _Grid())
    p1, p2 = np.ones((C, D), np.float32), 3 * np.ones((C, D), np.float32)
    counts = {11: np.array([1, 1, 0, 0], np.float32), 21: np.array([1, 0, 1, 0], np.float32)}
    replies = [reply(n, RecordDict({
        records.ARRAYS: records.to_record(ctx.build(archs[n])),
        records.RULE_ARRAYS: ArrayRecord({"protos": Array(p), "counts": Array(counts[n])}),
        records.METRICS: MetricRecord({records.NUM_EXAMPLES: 2}),
        records.INFO: ConfigRecord({records.LABEL_COUNTS: [2, 0, 0, 0]})})) for n, p in ((11, p1), (21, p2))]  # fmt: skip
    s.aggregate_train(1, replies)
    g = s.global_logits["protos"].numpy()
    assert g[:, 0].tolist() == [2.0, 1.0, 3.0, 0.0] and s.global_logits["has"].numpy().tolist() == [1, 1, 1, 0]
    msgs = list(s.configure_evaluate(1, state, ConfigRecord(), _Grid()))
    assert msgs and all(records.RULE_ARRAYS in m.content.array_records for m in msgs)
    with pytest.raises(ConfigError, match="set model.feature-dim"):
        build_strategy(load_config(None, ["strategy.name=fedproto"]), fed,
                       ServerContext((1, 8, 8), C, None, torch.device("cpu"), 0, 3))  # fmt: skip


def test_fedproto_runs_with_three_architectures_and_reports_per_client_accuracy(tmp_path):
    out = tmp_path / "fp"
    sets = ["rounds=2", "clients.num=6", "clients.architectures=mlp:2,lenet5:2,cnn:2", "model.feature-dim=16",
            "clients.local-steps=5", "clients.threads=1", "strategy.name=fedproto", "partition.name=dirichlet",
            "partition.test-fraction=0.25", "eval.fraction=1"]  # fmt: skip
    assert main(["run", "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["client_accuracy"]) == 6 and r["fedproto_classes"] == 10 for r in rows)
