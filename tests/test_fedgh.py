"""FedGH: the client keeps its representation and sends class prototypes; the server trains
one header on the accepted clients' (prototype, class) pairs (mocked replies) and puts it in
every group's model; a real run with 3 architectures judged per client."""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch.nn import functional as F

from fedkd import records
from fedkd.cli import main
from fedkd.config import load_config
from fedkd.federation import Federation, ServerContext, build_strategy
from fedkd.models import build_model
from fedkd.train import FedGHRule, LocalTrainConfig, train_local

C = 4


def test_the_client_keeps_its_representation_and_sends_eval_mode_class_means():
    torch.manual_seed(0)
    model = build_model("cnn-bn", (1, 8, 8), C, 6).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2] * 6 + [0, 1])
    cfg = LocalTrainConfig(steps=3, batch_size=8, lr=0.1)
    rule = FedGHRule(model, cfg, {}, None)
    train_local(model, x, y, cfg, seed=0, rule=rule)
    assert rule.state and not any(k.startswith("classifier.") for k in rule.state)  # the head is the server's
    model.eval()
    with torch.no_grad():
        h = model.features(x)
    for c in range(3):
        assert torch.allclose(rule.arrays["protos"][c].double(), h[y == c].mean(0), atol=1e-5)
    assert rule.arrays["counts"].tolist() == [7.0, 7.0, 6.0, 0.0]


def _fed() -> tuple[Federation, ServerContext]:
    archs = {11: "mlp", 21: "lenet5", 31: "lenet5"}
    fed = Federation({11: 0, 21: 1, 31: 2}, archs, np.full((3, C), 5), "mlp", seed=0)
    return fed, ServerContext((1, 8, 8), C, 3, torch.device("cpu"), 0, 3)


class _Grid:
    def get_node_ids(self):
        return [11, 21, 31]


def test_the_server_trains_one_header_on_the_prototypes_and_gives_it_to_every_group(reply, task_identity):
    fed, ctx = _fed()
    s = build_strategy(load_config(None, ["strategy.name=fedgh", "strategy.fedgh.server-lr=0.5",
                                          "strategy.fedgh.batch-size=2"]), fed, ctx)  # fmt: skip
    state = records.pack({a: records.to_record(ctx.build(a)) for a in fed.groups})
    s.configure_train(1, state, ConfigRecord(), _Grid())
    head = records.unpack(state, "mlp")
    protos = {11: np.arange(12, dtype=np.float32).reshape(4, 3) / 10, 21: -np.ones((4, 3), np.float32),
              31: np.full((4, 3), 9.0, np.float32)}  # fmt: skip
    counts = {11: [3, 0, 2, 0], 21: [1, 4, 0, 0], 31: [5, 0, 0, 0]}
    replies = []
    for n in (11, 21, 31):
        torch.manual_seed(n)
        content = RecordDict({
            # what a client sends: its head (its representation stays local)
            records.ARRAYS: records.without(records.to_record(ctx.build(fed.node_arch[n])), s.kept_names(fed.node_arch[n])),
            records.RULE_ARRAYS: ArrayRecord({"protos": Array(protos[n]), "counts": Array(np.array(counts[n], np.float32))}),
            records.METRICS: MetricRecord({records.NUM_EXAMPLES: 5}),
            records.INFO: ConfigRecord({records.LABEL_COUNTS: counts[n] if n != 31 else [4, 0, 0, 0]}),
        })  # fmt: skip
        replies.append(reply(n, content))  # node 31's label counts do not sum to num-examples: rejected
    new, _ = s.aggregate_train(1, replies)
    assert new is not None and s.round_metrics["fedgh_prototypes"] == 4 and s.round_metrics["rejected"] == 1
    # the reference: one epoch of plain SGD over the accepted pairs, in the strategy's seeded order
    x = torch.tensor(np.concatenate([protos[11][[0, 2]], protos[21][[0, 1]]]))
    y = torch.tensor([0, 2, 0, 1])
    lin = torch.nn.Linear(3, C)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(head["classifier.weight"].numpy()))
        lin.bias.copy_(torch.from_numpy(head["classifier.bias"].numpy()))
    from fedkd.train import derive_seed

    order = torch.randperm(4, generator=torch.Generator().manual_seed(derive_seed(0, 1, 0x6E)))
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    for i in (0, 2):
        opt.zero_grad()
        F.cross_entropy(lin(x[order[i : i + 2]]), y[order[i : i + 2]]).backward()
        opt.step()
    for arch in fed.groups:
        sub = records.unpack(new, arch)
        np.testing.assert_allclose(sub["classifier.weight"].numpy(), lin.weight.detach().numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(sub["classifier.bias"].numpy(), lin.bias.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert not np.array_equal(records.unpack(new, "mlp")["classifier.weight"].numpy(), head["classifier.weight"].numpy())


def test_fedgh_runs_with_three_architectures_and_reports_per_client_accuracy(tmp_path):
    out = tmp_path / "fedgh"
    sets = ["rounds=2", "clients.num=6", "clients.architectures=mlp:2,lenet5:2,cnn:2", "clients.local-steps=5",
            "clients.threads=1", "strategy.name=fedgh", "partition.name=dirichlet", "partition.test-fraction=0.25",
            "eval.fraction=1", "model.feature-dim=16"]  # fmt: skip
    assert main(["run", "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["client_accuracy"]) == 6 and r["fedgh_prototypes"] >= 6 for r in rows)
    assert rows[-1]["rejected"] == 0
