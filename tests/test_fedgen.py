"""FedGen: server-side feature generator in the Message, client-side regularizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from torch.nn import functional as F

from fedkd import records
from fedkd.cli import main
from fedkd.config import load_config
from fedkd.errors import ConfigError
from fedkd.federation import build_strategy
from fedkd.train import FedGenRegularizer
from generators.feature import FeatureGenerator
from tests.test_kd_strategies import CLASSES, DS, _Grid, context, federation

pytestmark = pytest.mark.usefixtures("task_identity")


def fedgen(*sets: str):
    cfg = load_config(None, ["strategy.name=fedgen", "model.feature-dim=32", *sets])
    fed = federation()
    return build_strategy(cfg, fed, ContextWithDim()), fed


def ContextWithDim():  # noqa: N802
    c = context()
    return type(c)(c.in_shape, c.num_classes, 32, c.device, c.seed, c.rounds, c.evaluate)


def _client(node: int, arch: str):
    """A client model with feature dim 32, trained a little on its classes of digits."""
    torch.manual_seed(node)
    m = ContextWithDim().build(arch)
    idx = torch.isin(DS.y_train, torch.tensor(CLASSES[node]))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(20):
        loss = F.cross_entropy(m(DS.x_train[idx]), DS.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    counts = np.bincount(DS.y_train[idx].numpy(), minlength=10)
    return m, counts


CLIENTS = {n: _client(n, a) for n, a in {11: "mlp", 12: "mlp", 21: "lenet5", 22: "lenet5"}.items()}


def replies(reply):
    return [
        reply(
            n,
            RecordDict(
                {
                    records.ARRAYS: records.to_record(m),
                    records.METRICS: MetricRecord({records.NUM_EXAMPLES: int(c.sum()), records.TRAIN_LOSS: 0.1}),
                    records.INFO: ConfigRecord({records.LABEL_COUNTS: [int(v) for v in c]}),
                }
            ),
        )  # fmt: skip
        for n, (m, c) in CLIENTS.items()
    ]


def initial_state(fed):
    torch.manual_seed(0)
    return records.pack({a: records.to_record(ContextWithDim().build(a)) for a in fed.groups})


def test_generator_travels_from_round_two_with_decayed_weights(reply):
    s, fed = fedgen("strategy.fedgen.gen-steps=30", "strategy.fedgen.alpha=2.0", "strategy.fedgen.decay=0.5")
    state = initial_state(fed)
    first = list(s.configure_train(1, state, ConfigRecord(), _Grid()))
    assert all(records.GENERATOR not in m.content.array_records for m in first)
    s.aggregate_train(1, replies(reply))
    assert s.trained and s.round_metrics["g_loss"] > 0
    third = list(s.configure_train(3, state, ConfigRecord(), _Grid()))
    for m in third:
        gen = m.content.array_records[records.GENERATOR]
        assert set(gen) == set(s.synth.generator.state_dict())
        conf = m.content.config_records[records.CONFIG]
        assert conf["fedgen.alpha"] == pytest.approx(2.0 * 0.5**2)  # α · decay^(round − 1), as the official code
        assert conf["fedgen.activation"] == "relu"
        assert len(conf["fedgen.label-prior"]) == 10


def test_generator_learns_to_satisfy_the_heads(reply):
    s, fed = fedgen("strategy.fedgen.gen-steps=1", "strategy.fedgen.gen-lr=0.01")
    state = initial_state(fed)
    s.configure_train(1, state, ConfigRecord(), _Grid())
    s.aggregate_train(1, replies(reply))
    first = s.round_metrics["g_oh"]
    s.gen_steps = 150
    s.aggregate_train(1, replies(reply))
    assert s.round_metrics["g_oh"] < first


def test_feature_dimension_mismatch_is_a_config_error():
    cfg = load_config(None, ["strategy.name=fedgen"])  # mlp: 64, lenet5: 84 by default
    with pytest.raises(ConfigError, match="FedGen needs one feature dimension across client architectures"):
        build_strategy(cfg, federation(), context())


def test_regularizer_matches_hand_computation():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 3)
    model = torch.nn.Module()
    model.classifier = head
    gen = FeatureGenerator((8,), 3, latent_dim=4, hidden_dim=16).eval()
    prior = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    reg = FedGenRegularizer(gen, alpha=2.0, beta=3.0, steps=5, gen_batch_size=6, label_prior=prior, seed=7)
    logits = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 1])
    got = reg(model, logits, y, step=0)
    rng = torch.Generator().manual_seed(7)
    with torch.no_grad():
        target = F.softmax(head(gen(torch.randn(4, 4, generator=rng), y)), 1)
    latent = 3.0 * F.kl_div(F.log_softmax(logits, 1), target, reduction="batchmean")
    ys = torch.multinomial(prior / prior.sum(), 6, replacement=True, generator=rng)
    with torch.no_grad():
        feats = gen(torch.randn(6, 4, generator=rng), ys)
    teacher = 2.0 * F.cross_entropy(head(feats), ys)
    assert torch.allclose(got, latent + (6 / 4) * teacher)
    assert reg(model, logits, y, step=5) is None, "only the first `steps` local steps"
    assert all(not p.requires_grad for p in gen.parameters())


def test_fedgen_end_to_end(tmp_path):
    out = tmp_path / "fg"
    argv = ["run", "--out", str(out), "--set", "strategy.name=fedgen", "--set", "model.feature-dim=32",
            "--set", "rounds=3", "--set", "clients.num=4", "--set", "clients.architectures=cnn:2,mlp:2",
            "--set", "clients.local-steps=20", "--set", "strategy.fedgen.gen-steps=20",
            "--set", "clients.lr=0.01"]  # fmt: skip  (α = β = 10 go with the official local lr 0.01
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["bytes_down"] > rows[0]["bytes_down"], "the generator crosses with the round-2 messages"
    assert all(np.isfinite(r["accuracy"]) for r in rows) and rows[-1]["accuracy"] > 0.2
    assert "g_loss" in rows[0]


def real_features() -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([m.eval().features(DS.x_train) for m, _ in CLIENTS.values()])


def test_generated_features_lie_where_real_ones_do(reply):
    """Sign and scale: fedkd's features follow a ReLU, so must generated ones; after the
    official 50 steps (and more) their norms stay on the real features' scale. Before the
    fix 10% of generated values were negative and their norm was 3.7× the real one."""
    real = real_features()
    assert bool((real >= 0).all())
    s, fed = fedgen("strategy.fedgen.gen-steps=200")
    s.configure_train(1, initial_state(fed), ConfigRecord(), _Grid())
    s.aggregate_train(1, replies(reply))
    with torch.no_grad():
        fake, _, _ = s.synth.sample(512)
    assert bool((fake >= 0).all()), "generated features are negative where no real one is"
    ratio = float(fake.norm(dim=1).mean() / real.norm(dim=1).mean())
    assert 1 / 3 < ratio < 3, f"generated features' norm is {ratio:.2f}× the real ones'"


def test_the_generator_objective_is_the_official_per_client_sum(reply):
    """Σ_k CE(head_k(G(z, y)), y) · mean_b w_{k, y_b} (+ diversity): checked against a direct computation."""
    s, fed = fedgen("strategy.fedgen.diversity=0.0001")
    s.configure_train(1, initial_state(fed), ConfigRecord(), _Grid())
    heads = [m.classifier for m, _ in CLIENTS.values()]
    counts = np.stack([c for _, c in CLIENTS.values()])
    from fedkd.distill import EnsembleTeacher

    teacher = EnsembleTeacher(heads, counts).eval()
    z, y = s.synth.noise(64)
    assert y is not None
    x = s.synth.generator(z, y)
    w = torch.as_tensor(counts / counts.sum(0), dtype=torch.float32)[:, y]  # (K, B)
    expected = sum(F.cross_entropy(h(x), y) * w[k].mean() for k, h in enumerate(heads))
    got = sum(s.synth.loss(h, None, (z, y), w[k], 0.0, x)[1]["oh"] for k, h in enumerate(teacher.members))
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
