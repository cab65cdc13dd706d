"""Class-continual runs (``tasks.*``): the plan, the restricted partitions, the metrics, the
finetune / FedLwF / FedEWC baselines, and resuming across a task boundary after kill -9."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from torch import nn
from torch.nn import functional as F

from fedkd import checkpoint, records, tasks
from fedkd.cli import main
from fedkd.config import load_config
from fedkd.errors import ConfigError
from fedkd.train import EWCRule, LocalTrainConfig, LwFRule, fisher_diagonal, train_local
from strategies import STRATEGIES
from tests.conftest import REPO
from tests.test_resume import kill_after_first_checkpoint

TASKS = ["tasks.classes-per-task=2", "rounds=10"]


def _cfg(*sets: str):
    return load_config(None, [*TASKS, *sets])


# --------------------------------------------------------------------------- the plan
def test_the_plan_splits_the_classes_in_a_seeded_order_and_the_rounds_into_tasks():
    plan = tasks.plan_of(_cfg(), 10)
    assert plan is not None and plan.num_tasks == 5 and plan.rounds_per_task == 2
    assert sorted(plan.order) == list(range(10)) and plan.order != tuple(range(10))
    assert plan.order == tasks.plan_of(_cfg(), 10).order  # the same seed, the same order
    assert plan.order != tasks.plan_of(_cfg("seed=1"), 10).order
    assert [plan.task_of(r) for r in range(0, 11)] == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [r for r in range(1, 11) if plan.is_task_end(r)] == [2, 4, 6, 8, 10]
    assert plan.seen(1) == plan.order[:4] and plan.old(1) == plan.order[:2] and plan.old(0) == ()
    nat = tasks.plan_of(_cfg("tasks.class-order=natural", "tasks.rounds-per-task=2"), 10)
    assert nat.classes(2) == (4, 5)
    given = tasks.plan_of(_cfg("tasks.class-order=9,8,7,6,5,4,3,2,1,0"), 10)
    assert given.classes(0) == (9, 8)
    assert tasks.plan_of(load_config(None, []), 10) is None


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["tasks.classes-per-task=3"], "does not divide the dataset's 10 classes"),
        (["tasks.classes-per-task=10"], "use at least 2 tasks"),
        (["rounds=7"], "rounds = 7 does not divide into 5 tasks"),
        (["tasks.rounds-per-task=3"], "set rounds = 15"),
        (["tasks.class-order=1,2,3"], "must list every class"),
        (["tasks.class-order=shuffled"], "tasks.class-order must be seed, natural or"),
        (["partition.test-fraction=0.2"], "partition.test-fraction cannot go with tasks"),
        (["tasks.rounds-per-task=-1"], "tasks.rounds-per-task must be ≥ 0"),
        (["tasks.local-classes=some"], "tasks.local-classes must be one of"),
        (["strategy.name=fedlwf", "tasks.classes-per-task=0"], "is class-continual"),
        (["strategy.name=fedewc", "strategy.fedewc.fisher-max=0"], "fisher-max must be > 0"),
    ],
)
def test_bad_task_settings_are_one_error_line_and_nothing_is_written(tmp_path, capsys, sets, fragment):
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), *[a for s in [*TASKS, "partition.dirichlet.alpha=1.0", *sets] for a in ("--set", s)]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], err
    assert not out.exists()


def test_each_task_is_split_among_all_clients_and_holds_only_its_classes():
    from fedkd.client_app import client_partition
    from fedkd.data import load_dataset

    cfg = _cfg("clients.num=5", "partition.dirichlet.alpha=0.5")
    plan = tasks.plan_of(cfg, 10)
    y_train = load_dataset("mnist5k").y_train
    for t in range(plan.num_tasks):
        parts = [client_partition(cfg, pid, t) for pid in range(5)]
        for _, y, counts in parts:
            assert len(y) > 0 and set(y.tolist()) <= set(plan.classes(t))
            assert sum(counts) == len(y)
        total = sum(len(y) for _, y, _ in parts)  # disjoint, and every sample of the task is somewhere
        assert total == int(np.isin(y_train.numpy(), plan.classes(t)).sum())
    # the whole run's share is every task's together (what the handshake reports)
    _, y_all, counts_all = client_partition(cfg, 0)
    assert len(y_all) == sum(len(client_partition(cfg, 0, t)[1]) for t in range(plan.num_tasks))
    # the tasks are split with seeds of their own: not the same client skew in every task
    shares = [np.array([len(client_partition(cfg, p, t)[1]) for p in range(5)]) for t in range(2)]
    assert not np.array_equal(np.argsort(shares[0]), np.argsort(shares[1]))


# --------------------------------------------------------------------------- losses and metrics
def test_restricted_ce_is_the_cross_entropy_of_the_tasks_logits_alone():
    torch.manual_seed(0)
    logits = torch.randn(6, 10, requires_grad=True)
    y = torch.tensor([7, 3, 3, 7, 7, 3])
    loss = tasks.restricted_ce(logits, y, (7, 3))
    ref = F.cross_entropy(logits[:, [7, 3]], torch.tensor([0, 1, 1, 0, 0, 1]))
    assert torch.allclose(loss, ref)
    loss.backward()
    others = [c for c in range(10) if c not in (3, 7)]
    assert torch.all(logits.grad[:, others] == 0) and torch.all(logits.grad[:, [3, 7]] != 0)


def test_soft_ce_is_the_official_kd_loss():
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    # teacher uniform: -0.5 (log σ(0.5) + log σ(-0.5)) at T = 2
    want = -0.5 * (math.log(1 / (1 + math.exp(-0.5))) + math.log(1 / (1 + math.exp(0.5))))
    assert abs(float(tasks.soft_ce(s, t, 2.0)) - want) < 1e-6


def test_forgetting_on_a_hand_made_matrix():
    ends = [[0.9], [0.6, 0.8], [0.5, 0.7, 0.9]]
    assert tasks.forgetting([], [0.9]) is None
    assert tasks.forgetting(ends[:1], [0.6, 0.8]) == pytest.approx(0.3)
    # task 0: best 0.9 → 0.5; task 1: best 0.8 → 0.7
    assert tasks.forgetting(ends[:2], ends[2]) == pytest.approx((0.4 + 0.1) / 2)
    # the best of the earlier ends, not the first: 0.4 then 0.7 on task 0
    assert tasks.forgetting([[0.4], [0.7, 0.9]], [0.2, 0.5, 1.0]) == pytest.approx(((0.7 - 0.2) + (0.9 - 0.5)) / 2)


class _Fixed(nn.Module):
    """Logits that depend on the label only (the test passes it as x)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.long().view(-1)]


def test_evaluation_takes_the_prediction_over_the_seen_classes_only():
    plan = tasks.TaskPlan(order=(0, 1, 2, 3), classes_per_task=2, rounds_per_task=1)
    table = torch.zeros(4, 4)
    table[0, 0] = 5.0  # class 0 right
    table[1, 3] = 9.0  # class 1: an unseen class wins overall, but of the seen ones class 1 does
    table[1, 1] = 1.0
    table[2, 0] = 3.0  # class 2 (task 1) mistaken for class 0
    table[3, 3] = 2.0
    model = _Fixed(table)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    ev = tasks.evaluate_tasks(model, y.float(), y, plan, task=0)
    assert ev["accuracy"] == 1.0 and ev["task_accuracy"] == [1.0]  # 4 test samples of classes 0, 1
    ev = tasks.evaluate_tasks(model, y.float(), y, plan, task=1)
    # now class 3 is seen, and its logit wins class 1's samples; class 2 is still taken for class 0
    assert ev["accuracy"] == 0.5 and ev["task_accuracy"] == [0.5, 0.5]


# --------------------------------------------------------------------------- the rules
def _model(seed: int = 0) -> nn.Module:
    from fedkd.models import build_model

    torch.manual_seed(seed)
    return build_model("mlp", (1, 28, 28), 10)


def _data(classes, n: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
    x = torch.randn(n, 1, 28, 28, generator=g) + y.view(-1, 1, 1, 1) * 0.3
    return x, y


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lwf_keeps_the_old_classes_outputs_near_the_old_model():
    old = _model()
    x0, y0 = _data([0, 1], seed=2)
    train_local(old, x0, y0, LocalTrainConfig(steps=40, lr=0.1, classes=(0, 1)), seed=0)
    x1, y1 = _data([2, 3], seed=3)
    cfg = LocalTrainConfig(steps=40, lr=0.1, classes=(2, 3), old_classes=(0, 1), seen_classes=(0, 1, 2, 3))

    def drift(rule_cls, **kw) -> float:
        m = copy.deepcopy(old)
        rule = rule_cls(m, cfg, _state(old), None, **kw) if rule_cls else None
        train_local(m, x1, y1, cfg, seed=0, rule=rule)
        with torch.no_grad():
            p, q = F.log_softmax(old(x1)[:, :2], 1), F.log_softmax(m(x1)[:, :2], 1)
            return float(F.kl_div(q, p, log_target=True, reduction="batchmean"))

    assert drift(LwFRule, lamda=3.0) < 0.5 * drift(None)
    # no old classes (the first task) or no old model: no term
    assert LwFRule(copy.deepcopy(old), LocalTrainConfig(), _state(old), None).old is None
    assert LwFRule(copy.deepcopy(old), cfg, {}, None).old is None


def test_fisher_is_the_mean_squared_batch_gradient_clamped():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x, y = torch.randn(10, 3), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    got = fisher_diagonal(model, x, y, (), batch_size=4, cap=1e9)
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(0, 10, 4):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 4]), y[i : i + 4]).backward()
        for n, p in model.named_parameters():
            want[n] += p.grad**2 / 3
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-7)
    capped = fisher_diagonal(model, x, y, (), batch_size=4, cap=1e-4)
    assert all(float(v.max()) <= 1e-4 for v in capped.values())
    assert model.weight.grad is not None and all(p.requires_grad for p in model.parameters())


def test_ewc_penalty_pulls_toward_the_old_model_with_the_consolidated_fisher():
    model = _model()
    anchor = _state(model)
    x, y = _data([2, 3])
    cfg0 = LocalTrainConfig(steps=5, lr=0.1, classes=(0, 1), seen_classes=(0, 1))
    rule0 = EWCRule(model, cfg0, {}, None)  # task 0: no anchor, no penalty, a Fisher to keep
    x0, y0 = _data([0, 1])
    train_local(model, x0, y0, cfg0, seed=0, rule=rule0)
    assert rule0.loss(model, x0, None, model(x0), y0) is None
    assert int(rule0.state["cur-old"]) == 0 and int(rule0.state["cur-classes"]) == 2
    # the next task: the stored Fisher is folded in and the penalty is λ/2 Σ F (θ − θ_old)²
    cfg1 = LocalTrainConfig(steps=5, lr=0.1, classes=(2, 3), old_classes=(0, 1), seen_classes=(0, 1, 2, 3))
    m1 = copy.deepcopy(model)
    rule1 = EWCRule(m1, cfg1, anchor, rule0.state, lamda=1000.0, fisher_max=1.0)
    fisher = {k[4:]: v for k, v in rule0.state.items() if k.startswith("cur.")}
    assert set(rule1.fisher) == set(fisher) and all(torch.equal(rule1.fisher[n], fisher[n]) for n in fisher)
    pen = rule1.loss(m1, x, None, m1(x), y)
    want = 500.0 * sum((fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in m1.named_parameters())
    assert torch.allclose(pen, want)
    pen.backward()  # its gradient reaches the parameters: λ F (θ − θ_old)
    for n, p in m1.named_parameters():
        assert torch.allclose(p.grad, 1000.0 * fisher[n] * (p.detach() - anchor[n]), atol=1e-6)
    train_local(m1, x, y, cfg1, seed=0, rule=rule1)
    assert int(rule1.state["old-classes"]) == 2
    # a later round of the same task keeps the consolidated Fisher and does not fold it twice
    rule1b = EWCRule(copy.deepcopy(m1), cfg1, anchor, rule1.state, fisher_max=1.0)
    assert all(torch.equal(rule1b.fisher[n], fisher[n]) for n in fisher) and rule1b.covered == 2
    # the third task folds task 1's Fisher in, weighted by classes: (2 F₀ + 2 F₁) / 4
    cfg2 = LocalTrainConfig(classes=(4, 5), old_classes=(0, 1, 2, 3), seen_classes=(0, 1, 2, 3, 4, 5))
    f1 = {k[4:]: v for k, v in rule1.state.items() if k.startswith("cur.")}
    rule2 = EWCRule(copy.deepcopy(m1), cfg2, anchor, rule1.state, fisher_max=1.0)
    for n in fisher:
        assert torch.allclose(rule2.fisher[n], (fisher[n] + f1[n]) / 2)


# --------------------------------------------------------------------------- the server side
def _arrays(d):
    return ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in d.items()})


def test_the_old_global_model_is_kept_at_each_task_end_sent_and_checkpointed(task_identity):
    from fedkd.checkpoint import from_tree, load_object_arrays, object_arrays, to_tree
    from fedkd.client_app import app
    from fedkd.engines import LocalGrid

    plan = tasks.TaskPlan(order=tuple(range(6)), classes_per_task=2, rounds_per_task=2)

    def make():
        return STRATEGIES.get("fedlwf")(min_available_nodes=2, min_train_nodes=1, fraction_train=1.0, tasks=plan)

    s = make()
    grid = LocalGrid(app, 2)
    sent = {}
    for r in range(1, 7):
        msgs = list(s.configure_train(r, _arrays({"w": [float(r)]}), ConfigRecord({}), grid))
        extra = msgs[0].content.array_records.get(records.RULE_ARRAYS)
        sent[r] = None if extra is None else float(extra["w"].numpy()[0])
        assert msgs[0].content[records.CONFIG][records.RULE] == "lwf"
        assert msgs[0].content[records.CONFIG]["rule.lamda"] == 3.0
        if r == 4:
            fresh = make()
            load_object_arrays(fresh, from_tree(to_tree(object_arrays(s))))
            assert float(fresh.old["w"].numpy()[0]) == 3.0
    # task 1: nothing; task 2: the model that ended task 1 (sent in round 3); task 3: round 5's
    assert sent == {1: None, 2: None, 3: 3.0, 4: 3.0, 5: 5.0, 6: 5.0}


# --------------------------------------------------------------------------- real runs
RUN = ["rounds=4", "tasks.classes-per-task=5", "clients.num=4", "clients.architectures=mlp", "clients.local-steps=5",
       "partition.dirichlet.alpha=1.0", "clients.threads=1"]  # fmt: skip


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", ["finetune", "fedlwf", "fedewc"])
def test_class_continual_strategies_run_end_to_end(tmp_path, capsys, strategy):
    out = tmp_path / strategy
    assert main(["run", "--out", str(out), *[a for s in [*RUN, f"strategy.name={strategy}"] for a in ("--set", s)]]) == 0
    assert "forgetting" in capsys.readouterr().out
    rows = _rows(out)
    assert [r["task"] for r in rows] == [1, 1, 2, 2]
    assert [len(r["task_accuracy"]) for r in rows] == [1, 1, 2, 2]
    assert rows[0]["forgetting"] is None and rows[3]["forgetting"] is not None
    assert [bool(r.get("task_end")) for r in rows] == [False, True, False, True]
    # downlink: FedLwF and FedEWC send the old model from the second task on
    double = strategy != "finetune"
    assert (rows[2]["bytes_down"] > 1.9 * rows[1]["bytes_down"]) == double
    data = json.loads((out / "tasks.json").read_text())
    assert data["matrix"] == [rows[1]["task_accuracy"], rows[3]["task_accuracy"]]
    assert data["average_accuracy"] == rows[3]["accuracy"] and (out / "tasks.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"] == 2 and summary["forgetting"] == rows[3]["forgetting"]


def test_kill_9_at_a_task_boundary_then_resume(tmp_path):
    """A FedEWC run (old model on the server, Fisher on the clients) killed with SIGKILL right
    after the checkpoint at the end of its first task, resumed: every row equals the
    uninterrupted run's."""
    sets = [*RUN, "strategy.name=fedewc", "rounds=6", "tasks.rounds-per-task=3", "checkpoint.every=3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    fedkd = [sys.executable, "-m", "fedkd.cli"]

    def argv(out: Path) -> list[str]:
        return ["run", "--out", str(out), *[a for s in sets for a in ("--set", s)]]

    ref = subprocess.run([*fedkd, *argv(full)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    kill_after_first_checkpoint([*fedkd, *argv(cut)], cut)  # during the first round of the second task
    assert [p.name for p in checkpoint.checkpoints(cut)] == ["checkpoint-00003.pt"]
    res = subprocess.run([*fedkd, "run", "--resume", str(cut)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]

    assert strip(_rows(cut)) == strip(_rows(full))
    rows = _rows(cut)
    assert rows[3]["task"] == 2 and rows[3]["forgetting"] is not None
    assert any(v > 0 for v in rows[3]["state_from"].values())  # the Fisher came back from task 1
    assert json.loads((cut / "tasks.json").read_text()) == json.loads((full / "tasks.json").read_text())


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="tasks.classes-per-task must be"):
        load_config(None, ["tasks.classes-per-task=-2"])


@pytest.mark.slow
def test_class_continual_run_on_the_ray_engine(tmp_path):
    """FedEWC over two tasks on Flower's Simulation Engine: the old model crosses to Ray actors in
    Messages and each client's Fisher survives between its rounds in its state."""
    out = tmp_path / "ray"
    sets = [*RUN, "strategy.name=fedewc", "rounds=2"]
    proc = subprocess.run([sys.executable, "-m", "fedkd.cli", "run", "--engine", "ray", "--out", str(out),
                           *[a for s in sets for a in ("--set", s)]],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out)
    assert [r["task"] for r in rows] == [1, 2] and all(r["failures"] == 0 for r in rows)
    assert rows[1]["bytes_down"] > 1.9 * rows[0]["bytes_down"]  # the old global model travels
    assert any(v > 0 for v in rows[1]["state_from"].values())
    assert (out / "tasks.png").is_file()


def test_a_label_flip_stays_within_the_tasks_classes():
    from fedkd.faults import flip_labels

    assert flip_labels(torch.tensor([7, 3, 3, 5]), 10, (7, 5, 3)).tolist() == [3, 7, 7, 5]
    assert flip_labels(torch.tensor([0, 9, 4]), 10).tolist() == [9, 0, 5]
