"""Flower's DP wrappers as fedkd strategies (strategies/dp.py): the wrapped base, seeded noise,
the adaptive norm in checkpoints, client-side clipping in fedkd's ClientApp, real runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedkd import records
from fedkd.cli import main
from strategies import STRATEGIES

NAMES = ("dp-server-fixed", "dp-client-fixed", "dp-server-adaptive", "dp-client-adaptive")
X = {"w": np.array([1.0, 2.0, 0.0], np.float32)}


def _wrapper(name: str, sampled: int = 2, **kw):
    base = FedAvg(fraction_train=1.0, min_available_nodes=sampled, min_train_nodes=1)
    return STRATEGIES.get(name)(base, sampled, **kw)


def _configure(s, n: int = 2):
    from fedkd.client_app import app
    from fedkd.engines import LocalGrid

    return list(s.configure_train(1, ArrayRecord({k: Array(v) for k, v in X.items()}), ConfigRecord({}), LocalGrid(app, n)))


def _replies(reply, updates, metrics=None):
    out = []
    for i, u in enumerate(updates):
        arrays = ArrayRecord({"w": Array((X["w"] + u).astype(np.float32))})
        m = MetricRecord({records.NUM_EXAMPLES: 10, **(metrics[i] if metrics else {})})
        out.append(reply(i + 1, RecordDict({records.ARRAYS: arrays, records.METRICS: m})))
    return out


def test_the_wrappers_are_registered_with_their_keys():
    from fedkd.config import plugin_params

    for name in NAMES:
        assert name in STRATEGIES
        keys = set(plugin_params("strategy", name))
        assert {"base", "noise-multiplier"} <= keys and "noise-seed" not in keys and "strategy" not in keys
    assert "clipping-norm" in plugin_params("strategy", "dp-server-fixed")
    assert {"initial-clipping-norm", "target-clipped-quantile", "clip-norm-lr"} <= set(
        plugin_params("strategy", "dp-client-adaptive")
    )


def test_server_side_clipping_bounds_each_update_and_adds_no_noise_at_zero(reply, task_identity):
    s = _wrapper("dp-server-fixed", noise_multiplier=0.0, clipping_norm=1.0)
    _configure(s)
    big, small = np.array([3.0, 4.0, 0.0], np.float32), np.array([0.0, 0.3, 0.4], np.float32)  # norms 5, 0.5
    new, _ = s.aggregate_train(1, _replies(reply, [big, small]))
    expected = X["w"] + (big / 5.0 + small) / 2  # the first scaled to norm 1, the second kept
    np.testing.assert_allclose(new["w"].numpy(), expected, rtol=1e-6)


def test_the_noise_has_the_gaussian_mechanisms_std_and_is_seeded_by_round(reply, task_identity):
    s = _wrapper("dp-server-fixed", sampled=2, noise_multiplier=2.0, clipping_norm=0.5, noise_seed=3)
    z = np.array([1e-3, 0.0, 0.0], np.float32)  # (Flower's clipping divides by the update's norm: not 0)
    draws = []
    for rnd in range(1, 401):
        s.configure_train(rnd, ArrayRecord({"w": Array(X["w"])}), ConfigRecord({}), _grid())
        new, _ = s.aggregate_train(rnd, _replies(reply, [z, z]))
        draws.append(new["w"].numpy() - X["w"] - z)
    std = np.std(np.concatenate(draws))
    assert std == pytest.approx(2.0 * 0.5 / 2, rel=0.08)  # noise_multiplier · C / sampled
    state = np.random.get_state()[1].copy()
    again = _wrapper("dp-server-fixed", sampled=2, noise_multiplier=2.0, clipping_norm=0.5, noise_seed=3)
    again.configure_train(7, ArrayRecord({"w": Array(X["w"])}), ConfigRecord({}), _grid())
    new, _ = again.aggregate_train(7, _replies(reply, [z, z]))
    np.testing.assert_array_equal(new["w"].numpy() - X["w"] - z, draws[6])  # same (seed, round): same noise
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # the global generator is put back


def _grid():
    from fedkd.client_app import app
    from fedkd.engines import LocalGrid

    return LocalGrid(app, 2)


def test_the_client_side_wrappers_send_the_clipping_norm(task_identity):
    for name, key in (("dp-client-fixed", "clipping_norm"), ("dp-client-adaptive", "initial_clipping_norm")):
        s = _wrapper(name, **{key: 0.7})
        msgs = _configure(s)
        assert all(m.content.config_records["config"]["clipping_norm"] == pytest.approx(0.7) for m in msgs)


def test_the_adaptive_norm_moves_toward_its_quantile_and_is_checkpointed(reply, task_identity):
    from fedkd.checkpoint import from_tree, load_object_arrays, object_arrays, to_tree

    s = _wrapper("dp-client-adaptive", noise_multiplier=0.0, initial_clipping_norm=1.0, clip_norm_lr=0.2)
    _configure(s)
    z = np.zeros(3, np.float32)
    s.aggregate_train(1, _replies(reply, [z, z], metrics=[{"norm_bit": 1}, {"norm_bit": 1}]))  # all clipped
    assert s.clipping_norm == pytest.approx(np.exp(-0.2 * (1.0 - 0.5)))  # Flower's geometric update, up
    fresh = _wrapper("dp-client-adaptive", noise_multiplier=0.0, initial_clipping_norm=1.0)
    load_object_arrays(fresh, from_tree(to_tree(object_arrays(s))))
    assert fresh.clipping_norm == pytest.approx(s.clipping_norm)


def test_fedkds_client_clips_its_update_as_flowers_mod_would(tmp_path, task_identity):
    """Clipping in the ClientApp's finish step: the sent weights move at most ``clipping_norm``."""
    from flwr.app import Context, Message

    from fedkd.client_app import app
    from fedkd.config import load_config
    from fedkd.models import build_model

    cfg = load_config(None, ["clients.num=2", "clients.architectures=mlp", "clients.local-steps=5", "clients.lr=0.5"])
    model = build_model("mlp", (1, 28, 28), 10, cfg.get("model.feature-dim") or None)
    sent = records.to_record(model)
    out = {}
    for clip in (None, 0.05):
        conf = ConfigRecord({records.RUN_CONFIG: cfg.to_toml(), "server-round": 1})
        if clip is not None:
            conf["clipping_norm"] = clip
        msg = Message(RecordDict({records.ARRAYS: sent, records.CONFIG: conf}), dst_node_id=1, message_type="train")
        ctx = Context(run_id=1, node_id=1, node_config={records.PARTITION_ID: 0, "num-partitions": 2}, state=RecordDict(),
                      run_config={})  # fmt: skip
        reply = app(msg, ctx)
        assert not reply.has_error(), reply.error
        got = reply.content.array_records[records.ARRAYS]
        delta = np.concatenate([(got[k].numpy() - sent[k].numpy()).ravel() for k in sent])
        out[clip] = (np.linalg.norm(delta), reply.content.metric_records[records.METRICS])
    assert out[None][0] > 0.05 and "norm_bit" not in out[None][1]
    assert out[0.05][0] == pytest.approx(0.05, rel=1e-4) and out[0.05][1]["norm_bit"] == 1


SETS = ["rounds=2", "clients.num=4", "clients.fraction=0.5", "clients.architectures=mlp", "clients.local-steps=5",
        "partition.name=dirichlet", "clients.threads=1"]  # fmt: skip


def _run(out: Path, *sets: str) -> list[dict]:
    assert main(["run", "--out", str(out), "--quiet", *[a for s in [*SETS, *sets] for a in ("--set", s)]]) == 0
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_client_and_server_side_fixed_clipping_give_the_same_run(tmp_path):
    """The same clipping (on the client or on the server) and the same seeded noise: the same model."""
    acc = {}
    for name in ("dp-server-fixed", "dp-client-fixed"):
        rows = _run(tmp_path / name, f"strategy.name={name}", f"strategy.{name}.clipping-norm=0.5",
                    f"strategy.{name}.noise-multiplier=0.05")  # fmt: skip
        acc[name] = [x for r in rows for x in (r["accuracy"], r["loss"])]
    assert acc["dp-server-fixed"] == pytest.approx(acc["dp-client-fixed"], abs=1e-6)
    plain = [x for r in _run(tmp_path / "fedavg", "strategy.name=fedavg") for x in (r["accuracy"], r["loss"])]
    assert plain != pytest.approx(acc["dp-client-fixed"], abs=1e-6)  # the clipping and the noise did something


def test_a_kd_strategy_runs_on_a_dp_base(tmp_path):
    rows = _run(tmp_path / "ftg", "strategy.name=fedftg", "strategy.fedftg.base=dp-client-adaptive",
                "strategy.fedftg.iterations=1", "strategy.fedftg.batch-size=8", "strategy.fedftg.gen-channels=8",
                "strategy.dp-client-adaptive.noise-multiplier=0.01")  # fmt: skip
    assert len(rows) == 2 and all(np.isfinite(r["accuracy"]) for r in rows)
