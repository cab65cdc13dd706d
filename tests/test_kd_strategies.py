"""Distillation strategies in Flower's test shape: real replies, aggregate_train, asserts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedkd import records
from fedkd.config import load_config
from fedkd.data import load_dataset
from fedkd.distill import EnsembleTeacher
from fedkd.errors import ConfigError
from fedkd.federation import Federation, ServerContext, build_strategy
from fedkd.server_kd import DistillationStrategy
from fedkd.train import evaluate
from strategies import STRATEGIES

KD = [
    n
    for n in STRATEGIES.names()
    if isinstance(STRATEGIES.get(n), type) and issubclass(STRATEGIES.get(n), DistillationStrategy)
]
DS = load_dataset("digits")
ARCHS = {11: "mlp", 12: "mlp", 21: "lenet5", 22: "lenet5"}
PIDS = {11: 0, 12: 1, 21: 2, 22: 3}


pytestmark = pytest.mark.usefixtures("task_identity")


def context(rounds: int = 3) -> ServerContext:
    return ServerContext(
        DS.shape, 10, None, torch.device("cpu"), 0, rounds,
        evaluate=lambda m: evaluate(m, DS.x_test, DS.y_test, 500),
    )  # fmt: skip


def federation(global_arch: str = "mlp", archs: dict[int, str] = ARCHS) -> Federation:
    counts = np.full((len(archs), 10), 5)
    return Federation({n: i for i, n in enumerate(archs)}, archs, counts, global_arch, seed=0)


def strategy(name: str, *sets: str, fed: Federation | None = None, rounds: int = 3):
    cfg = load_config(None, [f"strategy.name={name}", *sets])
    return build_strategy(cfg, fed or federation(), context(rounds))


def trained(arch: str, seed: int, classes: list[int]):
    """A client model trained a little on some classes of digits (a real, skewed teacher)."""
    torch.manual_seed(seed)
    m = context().build(arch)
    idx = torch.isin(DS.y_train, torch.tensor(classes))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(m(DS.x_train[idx]), DS.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


CLASSES = {11: [0, 1, 2, 3, 4], 12: [5, 6, 7, 8, 9], 21: [0, 2, 4, 6, 8], 22: [1, 3, 5, 7, 9]}
MODELS = {n: trained(a, n, CLASSES[n]) for n, a in ARCHS.items()}


def replies(reply, nodes=ARCHS, counts: bool = True):
    out = []
    for n in nodes:
        c = np.bincount(DS.y_train[torch.isin(DS.y_train, torch.tensor(CLASSES[n]))].numpy(), minlength=10)
        content = RecordDict(
            {
                records.ARRAYS: records.to_record(MODELS[n]),
                records.METRICS: MetricRecord({records.NUM_EXAMPLES: int(c.sum()), records.TRAIN_LOSS: 0.5}),
            }
        )
        if counts:
            content[records.INFO] = ConfigRecord({records.LABEL_COUNTS: [int(v) for v in c]})
        out.append(reply(n, content))
    return out


def initial_state(fed: Federation):
    ctx = context()
    torch.manual_seed(0)
    return records.pack({a: records.to_record(ctx.build(a)) for a in fed.groups})


def test_all_kd_strategies_registered():
    assert {"feddf", "fedftg", "dense"} <= set(KD)


@pytest.mark.parametrize("name", ["feddf", "fedftg"])
def test_distillation_moves_global_toward_the_ensemble(reply, name):
    fed = federation()
    s = strategy(name, f"strategy.{name}.iterations=15")
    state = initial_state(fed)
    s.configure_train(1, state, ConfigRecord(), _Grid())
    base = build_strategy(load_config(), fed, context())  # plain FedAvg on the same replies
    base.configure_train(1, state, ConfigRecord(), _Grid())
    fedavg_state, _ = base.aggregate_train(1, replies(reply))
    new, metrics = s.aggregate_train(1, replies(reply))
    assert list(new) == list(state), "same packed keys, same order"
    assert metrics is not None and "kd_loss" in s.round_metrics and s.round_metrics["distill_seconds"] > 0
    # the strategy's own teacher, on the generator's samples: what it distills on
    counts = np.stack(
        [np.asarray(r.content.config_records[records.INFO][records.LABEL_COUNTS]) for r in replies(reply)]
    )
    ens = EnsembleTeacher(list(MODELS.values()), counts if s.class_level else None, average=s.ensemble_average)
    with torch.no_grad():
        x, y, _ = s.distiller.synth.sample(256)

    def disagreement(st) -> float:
        m = context().build("mlp")
        records.load_record(m, records.unpack(st, "mlp"))
        m.eval()
        with torch.no_grad():
            return float((m(x).softmax(1) - ens(x, y).softmax(1)).abs().sum(1).mean())

    assert disagreement(new) < disagreement(fedavg_state)


def test_feddf_distills_into_every_group_and_a_clientless_global(reply):
    fed = federation("resnet8")
    s = strategy("feddf", "strategy.feddf.iterations=2", fed=fed)
    state = initial_state(fed)
    s.configure_train(1, state, ConfigRecord(), _Grid())
    new, _ = s.aggregate_train(1, replies(reply))
    for arch in ("mlp", "lenet5", "resnet8"):
        before, after = records.unpack(state, arch), records.unpack(new, arch)
        assert any(not np.array_equal(before[k].numpy(), after[k].numpy()) for k in before), arch


def test_reply_without_label_counts_is_rejected_not_a_crash(reply):
    s = strategy("fedftg", "strategy.fedftg.iterations=1")
    state = initial_state(federation())
    s.configure_train(1, state, ConfigRecord(), _Grid())
    good = replies(reply, [11, 21])
    bad = replies(reply, [12, 22], counts=False)
    new, _ = s.aggregate_train(1, good + bad)
    assert new is not None and s.round_metrics["rejected"] == 2


@pytest.mark.parametrize("retention", ["replay", "lra"])
def test_retention_memory_persists_across_rounds(reply, retention):
    s = strategy("feddf", "strategy.feddf.iterations=2", f"strategy.feddf.retention={retention}")
    state = initial_state(federation())
    memory = s.distiller.updater.memory
    assert memory is not None and len(memory) == 0
    for rnd in (1, 2):
        s.configure_train(rnd, state, ConfigRecord(), _Grid())
        state, _ = s.aggregate_train(rnd, replies(reply))
        sizes = len(memory)
        assert sizes > 0
    assert s.distiller.updater.rule.__class__.__name__.lower().startswith(retention[:3])


def test_retention_off_has_no_memory():
    assert strategy("feddf").distiller.updater.memory is None


def test_fedensemble_reports_the_ensemble(reply):
    s = strategy("fedensemble")
    state = initial_state(federation())
    s.configure_train(1, state, ConfigRecord(), _Grid())
    s.aggregate_train(1, replies(reply))
    _, acc = evaluate(EnsembleTeacher(list(MODELS.values())), DS.x_test, DS.y_test)
    assert s.round_metrics["accuracy"] == pytest.approx(acc) and s.round_metrics["ensemble_size"] == 4


def test_fedensemble_can_report_the_probability_average(reply):
    """``ensemble = probs`` evaluates the teacher FedDF/FedFTG distil, not the logit average."""
    members = list(MODELS.values())
    _, by_logits = evaluate(EnsembleTeacher(members), DS.x_test, DS.y_test)
    _, by_probs = evaluate(EnsembleTeacher(members, average="probs"), DS.x_test, DS.y_test)
    assert by_probs != pytest.approx(by_logits)  # the two combinations differ on these skewed members
    s = strategy("fedensemble", "strategy.fedensemble.ensemble=probs")
    state = initial_state(federation())
    s.configure_train(1, state, ConfigRecord(), _Grid())
    s.aggregate_train(1, replies(reply))
    assert s.round_metrics["accuracy"] == pytest.approx(by_probs)
    with pytest.raises(ConfigError, match="strategy.fedensemble.ensemble must be one of"):
        strategy("fedensemble", "strategy.fedensemble.ensemble=median")


def test_fedftg_runs_on_any_base(reply):
    for base in ("fedprox", "fedavgm", "fedadam"):
        s = strategy("fedftg", f"strategy.fedftg.base={base}", "strategy.fedftg.iterations=1")
        assert type(next(iter(s.delegates.values()))).__name__.lower() == base
        state = initial_state(federation())
        s.configure_train(1, state, ConfigRecord(), _Grid())
        new, _ = s.aggregate_train(1, replies(reply))
        assert all(np.isfinite(v.numpy()).all() for v in new.values())


@pytest.mark.parametrize(
    ("name", "sets", "fed_archs", "rounds", "message"),
    [
        ("dense", [], {1: "mlp", 2: "mlp"}, 1, "generator loss term 'bn' needs a teacher with BatchNorm"),
        ("dense", [], {1: "resnet8", 2: "resnet8"}, 3, "strategy 'dense' is one-shot: set rounds = 1"),
        ("feddf", ["strategy.feddf.proxy=mnist5k"], ARCHS, 3, "has inputs of shape (1, 28, 28)"),
        ("feddf", ["strategy.feddf.retention=forever"], ARCHS, 3, "strategy.feddf.retention must be one of"),
        ("fedftg", ["strategy.fedftg.base=feddf"], ARCHS, 3, "cannot be a base strategy"),
        ("feddf", ["strategy.feddf.generator=feature"], ARCHS, 3, "not an input-space generator"),
        (
            "feddf",
            ["strategy.feddf.preset=none", "strategy.feddf.weights="],
            ARCHS,
            3,
            "leaves the generator loss with no term",
        ),
    ],
)
def test_bad_configuration(name, sets, fed_archs, rounds, message):
    fed = federation(next(iter(fed_archs.values())), fed_archs)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        strategy(name, *sets, fed=fed, rounds=rounds)


def test_feddf_with_a_proxy_dataset(reply):
    s = strategy("feddf", "strategy.feddf.proxy=digits", "strategy.feddf.iterations=2")
    state = initial_state(federation())
    s.configure_train(1, state, ConfigRecord(), _Grid())
    s.aggregate_train(1, replies(reply))
    assert "g_loss" not in s.round_metrics and s.round_metrics["kd_loss"] >= 0


class _Grid:
    def get_node_ids(self):
        return list(ARCHS)
