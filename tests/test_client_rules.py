"""Stateful clients and the strategies built on them: SCAFFOLD, FedDyn, MOON, FedNova.

The math of each client rule and server update against a hand computation; the client-state
store; the strategies with mocked replies, as Flower tests its own; real runs in which the
state persists between a client's rounds (``state_from`` in metrics.jsonl).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from torch.nn import functional as F

from fedkd import records
from fedkd.cli import main
from fedkd.client_state import ContextState, DiskState, keep_for
from fedkd.models import build_model
from fedkd.train import (
    LOCAL_RULES,
    FedDynRule,
    LocalTrainConfig,
    MoonRule,
    ScaffoldRule,
    nova_normalizer,
    train_local,
)
from strategies import STRATEGIES

SHAPE = (1, 8, 8)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", SHAPE, 4, 6).double()


def _data(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def _rand_like(model: torch.nn.Module, seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}


CFG = LocalTrainConfig(steps=3, batch_size=8, lr=0.1)


def _manual(model, x, y, cfg, seed, grad_fn):
    """Plain SGD over the same batches as train_local, with ``grad_fn(name, p, grad) -> grad``."""
    from fedkd.train import batches

    gen = torch.Generator().manual_seed(seed)
    for idx in batches(len(x), cfg.batch_size, gen, cfg.steps, cfg.epochs):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p -= cfg.lr * grad_fn(n, p, p.grad)


# --------------------------------------------------------------------------- the client rules
def test_the_rules_are_registered():
    assert {"scaffold", "feddyn", "moon", "fednova"} <= set(LOCAL_RULES.names())
    assert {"scaffold", "feddyn", "moon", "fednova"} <= set(STRATEGIES.names())


def test_scaffold_corrects_every_gradient_and_updates_the_client_control():
    x, y = _data()
    model = _model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    c, ci = _rand_like(model, 2), _rand_like(model, 3)
    ref = copy.deepcopy(model)
    rule = ScaffoldRule(model, CFG, c, ci)
    train_local(model, x, y, CFG, seed=5, rule=rule)
    _manual(ref, x, y, CFG, 5, lambda n, p, g: g + c[n] - ci[n])
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-12), n
        want = ci[n] - c[n] + (start[n] - p.detach()) / (CFG.steps * CFG.lr)  # option II
        assert torch.allclose(rule.state[n], want, atol=1e-12)
        assert torch.allclose(rule.arrays[n], want - ci[n], atol=1e-12)  # Δc_i is what is sent


def test_scaffold_with_zero_controls_is_plain_sgd():
    x, y = _data()
    a, b = _model(), _model()
    train_local(a, x, y, CFG, seed=5, rule=ScaffoldRule(a, CFG, {}, None))
    train_local(b, x, y, CFG, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_feddyn_follows_the_gradient_of_its_objective_and_updates_its_state():
    x, y = _data()
    model = _model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = _rand_like(model, 4)
    alpha = 0.3
    ref = copy.deepcopy(model)
    rule = FedDynRule(model, CFG, {}, g, alpha=alpha)
    train_local(model, x, y, CFG, seed=5, rule=rule)

    # the objective L(θ) − <g, θ> + α/2 ||θ − x||², differentiated by autograd
    from fedkd.train import batches

    gen = torch.Generator().manual_seed(5)
    for idx in batches(len(x), CFG.batch_size, gen, CFG.steps, CFG.epochs):
        ref.zero_grad(set_to_none=True)
        obj = F.cross_entropy(ref(x[idx]), y[idx])
        for n, p in ref.named_parameters():
            obj = obj - (g[n] * p).sum() + alpha / 2 * ((p - start[n]) ** 2).sum()
        obj.backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= CFG.lr * p.grad
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-12), n
        assert torch.allclose(rule.state[n], g[n] - alpha * (p.detach() - start[n]), atol=1e-12)


def test_moon_term_is_the_contrastive_loss_and_its_gradient_reaches_the_model():
    x, _ = _data(8)
    model, prev = _model(0), _model(7)
    rule = MoonRule(model, CFG, {}, {k: v.clone() for k, v in prev.state_dict().items()}, mu=2.0, temperature=0.5)
    glob = copy.deepcopy(model)
    with torch.no_grad():  # move the local model away from the global one
        for p in model.parameters():
            p.add_(0.05)
    feats = model.features(x)
    term = rule.loss(model, x, feats, model.classifier(feats), torch.zeros(8, dtype=torch.long))
    z, zg, zp = feats, glob.features(x).detach(), prev.features(x).detach()
    pos = torch.exp(F.cosine_similarity(z, zg) / 0.5)
    neg = torch.exp(F.cosine_similarity(z, zp) / 0.5)
    want = 2.0 * (-torch.log(pos / (pos + neg))).mean()
    assert torch.allclose(term, want, atol=1e-12)
    term.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.body.parameters())
    assert all(p.grad is None for p in rule.glob.parameters()) and all(p.grad is None for p in rule.prev.parameters())


def test_moon_without_a_previous_model_trains_plainly_and_keeps_the_new_model():
    x, y = _data()
    a, b = _model(), _model()
    rule = MoonRule(a, CFG, {}, None)
    train_local(a, x, y, CFG, seed=5, rule=rule)
    train_local(b, x, y, CFG, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert all(torch.equal(rule.state[k], v) for k, v in a.state_dict().items())


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_fednova_normalizer_is_how_far_momentum_sgd_moves_on_a_constant_gradient(rho):
    tau, lr = 7, 0.1
    w = torch.zeros(3, requires_grad=True)
    grad = torch.tensor([1.0, -2.0, 0.5])
    opt = torch.optim.SGD([w], lr=lr, momentum=rho)
    for _ in range(tau):
        opt.zero_grad()
        (w * grad).sum().backward()
        opt.step()
    assert torch.allclose(w.detach(), -lr * nova_normalizer(tau, rho) * grad, rtol=1e-5)


# --------------------------------------------------------------------------- the state store
def test_disk_state_loads_the_newest_state_before_the_round_and_prunes(tmp_path):
    store = DiskState(tmp_path / "3", keep=2)
    assert store.load(1) == (0, None)
    for r in (1, 3, 4):
        store.save(r, {"w": torch.full((2,), float(r))})
    assert sorted(p.name for p in (tmp_path / "3").iterdir()) == ["round-3.pt", "round-4.pt"]  # newest 2
    r, s = store.load(4)
    assert r == 3 and torch.equal(s["w"], torch.full((2,), 3.0))
    assert store.load(9)[0] == 4
    # a resumed run redoes round 4 after a checkpoint of round 3: it must see round 3's state,
    # and saving round 4 again replaces the killed run's
    assert store.load(4)[0] == 3
    store.save(4, {"w": torch.zeros(2)})
    assert torch.equal(store.load(5)[1]["w"], torch.zeros(2))


def test_saving_a_round_drops_states_of_later_rounds(tmp_path):
    store = DiskState(tmp_path, keep=5)
    for r in (2, 5, 6):
        store.save(r, {"w": torch.ones(1)})
    store.save(3, {"w": torch.zeros(1)})  # resumed after round 2; 5 and 6 came from the killed run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-2.pt", "round-3.pt"]


def test_enough_states_are_kept_for_every_checkpoint_a_resume_may_use():
    assert keep_for(every=1, keep=2) == 3 and keep_for(every=5, keep=2) == 11 and keep_for(every=0, keep=2) == 1


def test_context_state_is_flowers_node_state():
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    store = ContextState(ctx)
    assert store.load(1) == (0, None)
    store.save(2, {"w": torch.arange(3.0)})
    assert store.load(2) == (0, None)  # only states saved before the round
    r, s = ContextState(ctx).load(3)
    assert r == 2 and torch.equal(s["w"], torch.arange(3.0))
    assert records.ARRAYS not in ctx.state.array_records and len(ctx.state.array_records) == 1


# --------------------------------------------------------------------------- the server side
def _strategy(name: str, n: int = 4, **kw):
    return STRATEGIES.get(name)(min_available_nodes=n, min_train_nodes=1, fraction_train=1.0, **kw)


def _arrays(d: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in d.items()})


def _replies(reply, weights, examples, extra=None, metrics=None):
    out = []
    for i, (w, n) in enumerate(zip(weights, examples, strict=True)):
        content = RecordDict({records.ARRAYS: _arrays(w)})
        if extra is not None:
            content[records.RULE_ARRAYS] = _arrays(extra[i])
        content[records.METRICS] = MetricRecord({records.NUM_EXAMPLES: n, **(metrics[i] if metrics else {})})
        out.append(reply(i + 1, content))
    return out


X = {"w": np.array([1.0, 2.0], np.float32), "bn.running_mean": np.array([0.5], np.float32)}


def _clients():
    ws = [{"w": np.array([0.0, 1.0], np.float32), "bn.running_mean": np.array([1.0], np.float32)},
          {"w": np.array([3.0, 5.0], np.float32), "bn.running_mean": np.array([3.0], np.float32)}]  # fmt: skip
    return ws, [10, 30]


def _configure(strategy, grid_nodes: int = 4):
    from fedkd.client_app import app
    from fedkd.engines import LocalGrid

    cfg = ConfigRecord({})
    return list(strategy.configure_train(1, _arrays(X), cfg, LocalGrid(app, grid_nodes)))


def test_scaffold_sends_its_control_and_averages_the_clients_deltas(reply, task_identity):
    s = _strategy("scaffold", n=4)
    msgs = _configure(s)
    assert all(m.content[records.CONFIG][records.RULE] == "scaffold" for m in msgs)
    assert all(records.RULE_ARRAYS in m.content.array_records for m in msgs)
    ws, ns = _clients()
    deltas = [{"w": np.array([1.0, -1.0], np.float32)}, {"w": np.array([3.0, 1.0], np.float32)}]
    new, _ = s.aggregate_train(1, _replies(reply, ws, ns, deltas))
    np.testing.assert_allclose(s.control["w"].numpy(), (deltas[0]["w"] + deltas[1]["w"]) / 4)  # (1/N) Σ Δc_i
    np.testing.assert_allclose(new["w"].numpy(), 0.25 * ws[0]["w"] + 0.75 * ws[1]["w"])  # FedAvg, η_g = 1
    msgs = _configure(s)
    np.testing.assert_allclose(msgs[0].content[records.RULE_ARRAYS]["w"].numpy(), s.control["w"].numpy())


def test_scaffold_server_step(reply, task_identity):
    s = _strategy("scaffold", server_learning_rate=0.5)
    _configure(s)
    ws, ns = _clients()
    new, _ = s.aggregate_train(1, _replies(reply, ws, ns, [{"w": np.zeros(2, np.float32)}] * 2))
    avg = 0.25 * ws[0]["w"] + 0.75 * ws[1]["w"]
    np.testing.assert_allclose(new["w"].numpy(), X["w"] + 0.5 * (avg - X["w"]))
    np.testing.assert_allclose(new["bn.running_mean"].numpy(), [2.5])  # statistics: FedAvg's


def test_feddyn_server_keeps_h_and_corrects_the_uniform_average(reply, task_identity):
    s = _strategy("feddyn", n=4, alpha=0.1)
    msgs = _configure(s)
    assert msgs[0].content[records.CONFIG]["rule.alpha"] == pytest.approx(0.1)
    ws, ns = _clients()
    new, _ = s.aggregate_train(1, _replies(reply, ws, ns))
    drift = (ws[0]["w"] - X["w"]) + (ws[1]["w"] - X["w"])
    h = -0.1 * drift / 4
    np.testing.assert_allclose(s.h["w"].numpy(), h, rtol=1e-6)
    np.testing.assert_allclose(new["w"].numpy(), (ws[0]["w"] + ws[1]["w"]) / 2 - h / 0.1, rtol=1e-6)
    np.testing.assert_allclose(new["bn.running_mean"].numpy(), [2.5])
    assert "bn.running_mean" not in s.h


def test_fednova_normalizes_updates_by_local_steps(reply, task_identity):
    s = _strategy("fednova")
    _configure(s)
    ws, ns = _clients()
    a = [2.0, 8.0]
    new, _ = s.aggregate_train(1, _replies(reply, ws, ns, metrics=[{"fednova-a": v} for v in a]))
    p = [0.25, 0.75]
    d = sum(pi * (X["w"] - w["w"]) / ai for pi, ai, w in zip(p, a, ws, strict=True))
    tau = sum(pi * ai for pi, ai in zip(p, a, strict=True))
    np.testing.assert_allclose(new["w"].numpy(), X["w"] - tau * d, rtol=1e-6)
    # equal steps: FedNova is FedAvg
    _configure(s)
    new, _ = s.aggregate_train(2, _replies(reply, ws, ns, metrics=[{"fednova-a": 5.0}] * 2))
    np.testing.assert_allclose(new["w"].numpy(), 0.25 * ws[0]["w"] + 0.75 * ws[1]["w"], rtol=1e-6)


def test_the_server_state_is_checkpointed_with_the_strategy(reply, task_identity):
    from fedkd.checkpoint import from_tree, load_object_arrays, object_arrays, to_tree

    s = _strategy("scaffold")
    _configure(s)
    ws, ns = _clients()
    s.aggregate_train(1, _replies(reply, ws, ns, [{"w": np.ones(2, np.float32)}] * 2))
    fresh = _strategy("scaffold")
    load_object_arrays(fresh, from_tree(to_tree(object_arrays(s))))
    np.testing.assert_array_equal(fresh.control["w"].numpy(), s.control["w"].numpy())


# --------------------------------------------------------------------------- real runs
SETS = ["rounds=3", "clients.num=4", "clients.fraction=0.5", "clients.architectures=mlp", "clients.local-steps=5",
        "partition.name=dirichlet", "clients.threads=1"]  # fmt: skip


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _check_state_from(rows: list[dict]) -> None:
    """Each sampled client's state comes from the last round it was sampled in (0 the first time)."""
    last: dict[str, int] = {}
    for row in rows:
        assert sorted(int(k) for k in row["state_from"]) == row["sampled"]
        for pid, since in row["state_from"].items():
            assert since == last.get(pid, 0), (row["round"], pid)
            last[pid] = row["round"]
    assert any(v > 0 for row in rows for v in row["state_from"].values())


@pytest.mark.parametrize("name", ["scaffold", "feddyn", "moon"])
def test_client_state_persists_between_a_clients_rounds_on_the_local_engine(tmp_path, name):
    out = tmp_path / name
    assert main(["run", "--out", str(out), "--quiet", *[a for s in [*SETS, f"strategy.name={name}"]
                                                        for a in ("--set", s)]]) == 0  # fmt: skip
    _check_state_from(_rows(out))
    assert not (out / "client-state").exists()  # a finished run keeps none


def test_fednova_and_fedavg_agree_with_equal_local_steps(tmp_path):
    runs = {}
    for name in ("fedavg", "fednova"):
        out = tmp_path / name
        assert main(["run", "--out", str(out), "--quiet",
                     *[a for s in [*SETS, f"strategy.name={name}"] for a in ("--set", s)]]) == 0  # fmt: skip
        runs[name] = [r["accuracy"] for r in _rows(out)]
    assert runs["fednova"] == pytest.approx(runs["fedavg"], abs=2e-3)


def test_a_kd_strategy_runs_on_a_stateful_base(tmp_path):
    out = tmp_path / "ftg"
    sets = [*SETS, "strategy.name=fedftg", "strategy.fedftg.base=scaffold", "strategy.fedftg.iterations=1",
            "strategy.fedftg.batch-size=8", "strategy.fedftg.gen-channels=8"]  # fmt: skip
    assert main(["run", "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]) == 0
    _check_state_from(_rows(out))


def test_the_batched_engine_trains_rule_clients_one_by_one_with_the_same_result(tmp_path):
    rows = {}
    for batched in ("false", "true"):
        out = tmp_path / batched
        sets = [*SETS, "strategy.name=scaffold", f"clients.batched={batched}"]
        assert main(["run", "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]) == 0
        rows[batched] = [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in _rows(out)]
    assert rows["true"] == rows["false"]


@pytest.mark.slow
def test_client_state_persists_between_a_clients_rounds_on_the_ray_engine(tmp_path):
    """Flower's Simulation Engine: each SuperNode's Context (and so its SCAFFOLD control) outlives the round."""
    import subprocess
    import sys

    out = tmp_path / "ray-scaffold"
    argv = [sys.executable, "-m", "fedkd.cli", "run", "--engine", "ray", "--out", str(out), "--quiet"]
    proc = subprocess.run(
        [*argv, *[a for s in [*SETS, "strategy.name=scaffold"] for a in ("--set", s)]],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_state_from(_rows(out))
