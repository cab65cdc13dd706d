"""Faulty and malicious clients: deterministic draws, reply validation, and real runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedkd import faults as F
from fedkd import records
from fedkd.federation import Federation, GroupedStrategy
from fedkd.validation import check_reply
from tests.test_e2e import rows, run

pytestmark = pytest.mark.usefixtures("task_identity")

EXPECTED = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)), "n": Array(np.zeros(1, np.int64))})


def content(w=None, n=6, counts=(1, 2, 3), loss=0.5, names=("w", "n"), **drop):
    w = np.ones((2, 3), np.float32) if w is None else w
    arrays = {"w": Array(w), "n": Array(np.zeros(1, np.int64))}
    rd = RecordDict(
        {
            records.ARRAYS: ArrayRecord({k: arrays.get(k, Array(np.zeros(1, np.float32))) for k in names}),
            records.METRICS: MetricRecord({records.NUM_EXAMPLES: n, records.TRAIN_LOSS: loss}),
            records.INFO: ConfigRecord({records.LABEL_COUNTS: list(counts)}),
        }
    )
    for key in drop:
        del rd[key]
    return rd


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({}, None),
        ({"w": np.full((2, 3), np.nan, np.float32)}, "NaN or Inf"),
        ({"w": np.array([[1, np.inf, 0], [0, 0, 0]], np.float32)}, "NaN or Inf"),
        ({"w": np.ones((3, 2), np.float32)}, "expected float32[2, 3]"),
        ({"w": np.array([["a"] * 3] * 2)}, "expected float32[2, 3]"),
        ({"w": np.ones((2, 3), np.float64)}, "expected float32[2, 3]"),
        ({"names": ("w",)}, "missing ['n']"),
        ({"names": ("w", "n", "x")}, "unexpected ['x']"),
        ({"n": 0, "counts": (0, 0, 0)}, "not a positive number"),
        ({"n": float("nan")}, "not a positive number"),
        ({"loss": float("inf")}, "not finite"),
        ({"counts": (1, 2)}, "label counts are missing or malformed"),
        ({"counts": (1, -2, 7)}, "label counts are missing or malformed"),
        ({"counts": (1, 2, 4)}, "sum to 7 but num-examples is 6"),
        ({"fedkd": True}, "label counts are missing or malformed"),
        ({"arrays": True}, "no 'arrays' ArrayRecord"),
        ({"metrics": True}, "not a positive number"),
    ],
)
def test_check_reply_rejects_every_malformed_update(reply, kwargs, fragment):
    why = check_reply(reply(11, content(**kwargs)), EXPECTED, num_classes=3, spec=EXPECTED)
    assert (why is None) if fragment is None else (fragment in why), why


def test_averaged_integer_buffers_do_not_reject_honest_replies(reply):
    """FedAvg turns BatchNorm's int64 counter into float64 on the server; clients send int64 back."""
    averaged = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32)), "n": Array(np.zeros(1, np.float64))})
    assert check_reply(reply(11, content()), averaged, 3, spec=EXPECTED) is None
    assert check_reply(reply(11, content()), averaged, 3) is None  # no spec: any numeric dtype


def test_batchnorm_models_are_accepted_after_the_first_average(tmp_path):
    run(tmp_path / "r", *FAULTY[:2], "clients.architectures=cnn-bn", "clients.local-steps=3", "partition.name=iid",
        "rounds=2")  # fmt: skip
    assert [r["rejected"] for r in rows(tmp_path / "r")] == [0, 0]


def test_norm_bound(reply):
    msg = reply(11, content(w=np.full((2, 3), 2.0, np.float32)))  # ‖Δ‖ = 2·√6 ≈ 4.9
    assert check_reply(msg, EXPECTED, 3, max_update_norm=5.0) is None
    assert "exceeds validation.max-update-norm = 4" in check_reply(msg, EXPECTED, 3, max_update_norm=4.0)


def test_fault_draws_are_deterministic_and_match_the_rates():
    f = F.Faults(crash_rate=0.3, nan_rate=0.1)
    draws = [F.draw(f, 7, pid, rnd, 100) for pid in range(100) for rnd in range(1, 21)]
    assert draws == [F.draw(f, 7, pid, rnd, 100) for pid in range(100) for rnd in range(1, 21)]
    assert abs(np.mean([d.crash for d in draws]) - 0.3) < 0.03
    assert abs(np.mean([d.nan for d in draws]) - 0.1) < 0.03
    assert [d.crash for d in draws] != [
        d.crash for d in (F.draw(f, 8, p, r, 100) for p in range(100) for r in range(1, 21))
    ]
    assert not any(d.straggle or d.malicious for d in draws)
    bad = F.malicious_partitions(20, 0.25, seed=3)
    assert len(bad) == 5 and bad == F.malicious_partitions(20, 0.25, seed=3)
    assert all(F.draw(F.Faults(malicious_fraction=0.25), 3, p, 1, 20).malicious == (p in bad) for p in range(20))


def test_scale_update_and_label_flip_math():
    m = torch.nn.Linear(2, 1)
    start = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m.weight += 1.0
    F.scale_update(m, start, -4.0)
    assert torch.allclose(m.weight, start["weight"] - 4.0) and torch.equal(m.bias, start["bias"])
    assert F.flip_labels(torch.tensor([0, 3, 9]), 10).tolist() == [9, 6, 0]
    F.poison_nan(m)
    assert not torch.isfinite(m.weight).all()


def test_a_nan_update_never_reaches_the_global_model(reply):
    fed = Federation({11: 0, 12: 1, 13: 2}, {11: "a", 12: "a", 13: "a"}, np.ones((3, 3), int), "a")
    s = GroupedStrategy(fed, lambda n: FedAvg(fraction_evaluate=0.0, min_available_nodes=n))
    state = records.pack({"a": EXPECTED})

    class Grid:
        def get_node_ids(self):
            return [11, 12, 13]

    s.configure_train(1, state, ConfigRecord(), Grid())
    good = [reply(11, content()), reply(12, content(w=np.full((2, 3), 3.0, np.float32)))]
    poisoned = reply(13, content(w=np.full((2, 3), np.nan, np.float32)))
    new, _ = s.aggregate_train(1, [*good, poisoned])
    w = records.unpack(new, "a")["w"].numpy()
    assert np.isfinite(w).all() and np.allclose(w, 2.0)  # the mean of the two good ones
    assert s.round_metrics["rejected"] == 1 and [m.metadata.src_node_id for m in s.accepted] == [11, 12]


FAULTY = ["rounds=3", "clients.num=10", "clients.architectures=mlp", "clients.local-steps=10", "partition.name=iid",
          "strategy.name=fedavg"]


def test_run_completes_with_30_percent_crashing_clients(tmp_path):
    summary = run(tmp_path / "r", *FAULTY, "faults.crash-rate=0.3")
    per_round = [r["failures"] for r in rows(tmp_path / "r")]
    expected = [sum(F.draw(F.Faults(crash_rate=0.3), 0, p, r, 10).crash for p in range(10)) for r in (1, 2, 3)]
    assert per_round == expected and sum(expected) > 0
    assert summary["rounds"] == 3 and summary["final_accuracy"] > 0.2  # learning (chance: 0.1)


def test_nan_updates_are_rejected_and_the_model_stays_finite(tmp_path):
    summary = run(tmp_path / "r", *FAULTY, "faults.nan-rate=0.4")
    r = rows(tmp_path / "r")
    expected = [sum(F.draw(F.Faults(nan_rate=0.4), 0, p, k, 10).nan for p in range(10)) for k in (1, 2, 3)]
    assert [x["rejected"] for x in r] == expected and sum(expected) > 0
    assert all(math.isfinite(x["loss"]) for x in r) and summary["final_accuracy"] > 0.2


def test_a_straggler_past_the_round_timeout_is_a_failure(tmp_path):
    # margins wide enough for a loaded machine: a normal client trains in well under 1 s, but the
    # round's first one also warms up torch (about 2 s with three processes on two cores)
    run(tmp_path / "r", *FAULTY[1:], "rounds=1", "faults.straggler-rate=0.2", "faults.straggler-delay=6.0",
        "round-timeout=4.0")  # fmt: skip
    expected = sum(F.draw(F.Faults(straggler_rate=0.2), 0, p, 1, 10).straggle for p in range(10))
    assert expected > 0 and rows(tmp_path / "r")[0]["failures"] == expected


CLEAN = ["strategy.name=fedavg", "rounds=5", "clients.num=10", "clients.architectures=mlp", "clients.local-steps=20",
         "partition.name=iid"]  # fmt: skip
ATTACK = [*CLEAN, "faults.malicious-fraction=0.2", "faults.scale-attack=-10"]


def test_scale_attack_robust_base_keeps_accuracy_plain_fedavg_does_not(tmp_path):
    clean = run(tmp_path / "clean", *CLEAN)["final_accuracy"]
    attacked = run(tmp_path / "avg", *ATTACK)["final_accuracy"]
    median = run(tmp_path / "med", *ATTACK, "strategy.name=fedmedian")["final_accuracy"]
    assert attacked < clean - 0.2, (clean, attacked)
    assert median > clean - 0.05, (clean, median)


def test_norm_bound_rejects_the_scaled_updates(tmp_path):
    run(tmp_path / "r", *ATTACK[:-1], "faults.scale-attack=1000", "validation.max-update-norm=20", "rounds=1")
    assert rows(tmp_path / "r")[0]["rejected"] == 2


def _kd_strategies() -> list[str]:
    from fedkd.config import plugin_params
    from strategies import STRATEGIES

    return [n for n in STRATEGIES.names() if "base" in plugin_params("strategy", n)]


@pytest.mark.parametrize("base", ["fedmedian", "fedtrimmedavg", "krum"])
@pytest.mark.parametrize("name", _kd_strategies())  # fedgen, fedensemble, feddf, dense, fedftg
def test_every_strategy_takes_a_robust_aggregator_as_base(name, base):
    from fedkd.cli import _preflight
    from fedkd.config import load_config

    arch = "cnn" if name.startswith("dp-") else "cnn-bn"  # Flower's DP clipping refuses BatchNorm (a test of its own)
    sets = ["clients.num=4", f"clients.architectures={arch}", f"strategy.name={name}", f"strategy.{name}.base={base}",
            "model.feature-dim=16"] + (["rounds=1"] if name == "dense" else [])  # fmt: skip
    _preflight(load_config(None, sets, 0))
