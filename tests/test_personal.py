"""FedBN, FedPer and FedRep: which parts stay local, that training and federated evaluation
use the client's own copy, FedRep's alternating phases, and real runs judged per client."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedkd import records
from fedkd.cli import main
from fedkd.client_state import DiskState
from fedkd.config import load_config
from fedkd.models import build_model
from fedkd.train import LOCAL_RULES, FedBNRule, FedPerRule, FedRepRule, LocalTrainConfig, evaluate, train_local
from strategies import STRATEGIES


def _model(arch: str = "mlp", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(arch, (1, 28, 28), 10, 16)


def test_registered_as_rules_and_strategies():
    assert {"fedbn", "fedper", "fedrep"} <= set(LOCAL_RULES.names()) & set(STRATEGIES.names())


def test_fedbn_keeps_exactly_the_batchnorm_entries():
    names = FedBNRule.local_names(_model("resnet8"))
    sd = _model("resnet8").state_dict()
    bn = [k for k in sd if k.rsplit(".", 1)[-1] in {"running_mean", "running_var", "num_batches_tracked"}]
    assert bn and set(bn) <= set(names)
    modules = dict(_model("resnet8").named_modules())
    assert all(isinstance(modules[k.rsplit(".", 1)[0]], torch.nn.BatchNorm2d) for k in names)
    assert len(names) == 5 * len(bn) // 3  # weight, bias and the three statistics of each BN layer
    assert FedBNRule.local_names(_model("mlp")) == []


def test_the_clients_own_head_replaces_the_received_one_and_is_saved():
    server, own = _model(seed=0), _model(seed=1)
    state = {k: v.clone() for k, v in own.state_dict().items() if k.startswith("classifier.")}
    model = _model(seed=0)
    rule = FedPerRule(model, LocalTrainConfig(steps=1), {}, state)
    for k, v in model.state_dict().items():
        want = own.state_dict()[k] if k.startswith("classifier.") else server.state_dict()[k]
        assert torch.equal(v, want), k
    rule.end(model, 1)
    assert set(rule.state) == {"classifier.weight", "classifier.bias"}
    first = _model(seed=0)
    FedPerRule(first, LocalTrainConfig(steps=1), {}, None)  # first round: the server's head
    assert torch.equal(first.classifier.weight, server.classifier.weight)


def test_fedrep_trains_the_head_first_then_only_the_representation():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    cfg = LocalTrainConfig(steps=3, batch_size=16, lr=0.1, momentum=0.9, weight_decay=1e-3)

    def moved(model, before):
        return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}

    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(model, x, y, cfg, seed=1, rule=FedRepRule(model, cfg, {}, None, head_steps=3))
    assert moved(model, before) == {"classifier.weight", "classifier.bias"}  # momentum/wd moved nothing else
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(model, x, y, cfg, seed=1, rule=FedRepRule(model, cfg, {}, None, head_steps=0))
    assert moved(model, before) and not moved(model, before) & {"classifier.weight", "classifier.bias"}


def test_federated_evaluation_uses_the_clients_saved_head(tmp_path, task_identity):
    from fedkd.client_app import app, client_model, client_test_split

    cfg = load_config(None, ["clients.num=2", "clients.architectures=mlp", "partition.test-fraction=0.3",
                             "strategy.name=fedper"])  # fmt: skip
    sent = client_model(cfg, 0)
    own = client_model(cfg, 0)
    torch.manual_seed(5)
    own.classifier.reset_parameters()
    DiskState(tmp_path / "0").save(3, {k: v for k, v in own.state_dict().items() if k.startswith("classifier.")})
    conf = ConfigRecord({records.RUN_CONFIG: cfg.to_toml(), "server-round": 3, records.RULE: "fedper",
                         records.STATE_DIR: str(tmp_path)})  # fmt: skip
    msg = Message(RecordDict({records.ARRAYS: records.to_record(sent), records.CONFIG: conf}), dst_node_id=1,
                  message_type="evaluate")  # fmt: skip
    ctx = Context(run_id=1, node_id=1, node_config={records.PARTITION_ID: 0, "num-partitions": 2}, state=RecordDict(),
                  run_config={})  # fmt: skip
    reply = app(msg, ctx)
    assert not reply.has_error(), reply.error
    got = reply.content.metric_records[records.METRICS]["local-accuracy"]
    x, y = client_test_split(cfg, 0)
    personal = client_model(cfg, 0)
    personal.load_state_dict({**sent.state_dict(), "classifier.weight": own.classifier.weight,
                              "classifier.bias": own.classifier.bias})  # fmt: skip
    assert got == pytest.approx(evaluate(personal, x, y, 500, torch.device("cpu"))[1])
    assert got != pytest.approx(evaluate(sent, x, y, 500, torch.device("cpu"))[1])


SETS = ["rounds=3", "clients.num=4", "clients.architectures=cnn-bn", "clients.local-steps=10", "clients.threads=1",
        "partition.name=dirichlet", "partition.test-fraction=0.25", "eval.fraction=1"]  # fmt: skip


@pytest.mark.parametrize("name", ["fedbn", "fedper", "fedrep"])
def test_a_personalized_run_reports_per_client_accuracy(tmp_path, name):
    out = tmp_path / name
    sets = [*SETS, f"strategy.name={name}", *(["strategy.fedrep.head-steps=5"] if name == "fedrep" else [])]
    assert main(["run", "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["client_accuracy"]) == 4 for r in rows)
    assert json.loads((out / "summary.json").read_text())["final_client_accuracy"] > 0.1
    assert not (out / "client-state").exists()


def test_a_client_rebuilds_its_groups_initial_model_from_the_init_seed():
    """The own parts never travel: a client without a saved copy starts them from its group's
    initial model, which it rebuilds exactly as the server built it."""
    from fedkd.client_app import client_model
    from fedkd.data import load_dataset
    from fedkd.server_app import initial_models
    from fedkd.train import group_init_seed

    cfg = load_config(None, ["clients.num=4", "clients.architectures=mlp:2,lenet5:2", "model.feature-dim=16", "seed=3"])
    ds = load_dataset("mnist5k", cfg.str("dataset.root"), False)
    server = initial_models(cfg, ds, ["mlp", "lenet5"])
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    for i, (arch, pid) in enumerate((("mlp", 0), ("lenet5", 2))):
        rebuilt = client_model(cfg, pid, group_init_seed(3, i))
        assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in server[arch].state_dict().items())
    assert torch.equal(torch.rand(3), before)  # the client's global RNG is left as it was


def test_fedper_messages_and_replies_leave_the_head_out(tmp_path, task_identity):
    """FedPer on the wire: the message holds the base and the init seed, the ClientApp trains on
    the rebuilt initial head (its first round), saves it, and replies with the base only."""
    from fedkd.client_app import app, client_model
    from fedkd.train import group_init_seed

    cfg = load_config(None, ["clients.num=2", "clients.architectures=mlp", "strategy.name=fedper",
                             "clients.local-steps=2", "clients.threads=1"])  # fmt: skip
    seed = group_init_seed(cfg.int("seed"), 0)
    initial = client_model(cfg, 0, seed)
    head = [k for k in initial.state_dict() if k.startswith("classifier.")]
    conf = ConfigRecord({records.RUN_CONFIG: cfg.to_toml(), "server-round": 1, records.RULE: "fedper",
                         records.STATE_DIR: str(tmp_path), records.INIT_SEED: seed})  # fmt: skip
    msg = Message(RecordDict({records.ARRAYS: records.without(records.to_record(initial), head), records.CONFIG: conf}),
                  dst_node_id=1, message_type="train")  # fmt: skip
    ctx = Context(run_id=1, node_id=1, node_config={records.PARTITION_ID: 0, "num-partitions": 2}, state=RecordDict(),
                  run_config={})  # fmt: skip
    reply = app(msg, ctx)
    assert not reply.has_error(), reply.error
    sent = reply.content.array_records[records.ARRAYS]
    assert head and not set(head) & set(sent) and set(sent) == set(initial.state_dict()) - set(head)
    assert reply.content.metric_records[records.METRICS][records.STATE_FROM] == 0
    saved = DiskState(tmp_path / "0").load(2)[1]
    assert saved is not None and set(saved) == set(head)
    assert not torch.equal(saved["classifier.weight"], initial.classifier.weight)  # trained from the initial head
    # a message that leaves out entries the rule does not keep is refused, not loaded in part
    bad = Message(RecordDict({records.ARRAYS: records.without(records.to_record(initial), ["body.1.weight"]),
                              records.CONFIG: conf}), dst_node_id=1, message_type="train")  # fmt: skip
    with pytest.raises(RuntimeError, match="does not fit the model"):
        app(bad, ctx)


@pytest.mark.parametrize("name", ["feddf", "fedftg", "fedensemble"])
def test_an_ensemble_teacher_refuses_a_base_whose_clients_keep_parts(name):
    import numpy as np

    from fedkd.errors import ConfigError
    from fedkd.federation import Federation, ServerContext, build_strategy

    fed = Federation({1: 0, 2: 1}, {1: "mlp", 2: "mlp"}, np.full((2, 10), 5), "mlp", seed=0)
    ctx = ServerContext((1, 28, 28), 10, 16, torch.device("cpu"), 0, 3)
    with pytest.raises(ConfigError, match="keep part of theirs"):
        build_strategy(load_config(None, [f"strategy.name={name}", f"strategy.{name}.base=fedper"]), fed, ctx)
    assert build_strategy(load_config(None, [f"strategy.name={name}", f"strategy.{name}.base=fedprox"]), fed, ctx)
