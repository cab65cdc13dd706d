"""FML and FedKD: a shared model trained beside each client's own. The client losses
(each model gets the gradient it should), FedKD's SVD compression and energy schedule, the
server's example-weighted average of the shared model over accepted replies (mocked
replies), checkpointing, and real runs with 3 architectures judged per client."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch.nn import functional as F

from fedkd import records
from fedkd.cli import main
from fedkd.config import load_config
from fedkd.federation import Federation, ServerContext, build_strategy
from fedkd.models import build_model
from fedkd.train import FedKDRule, FMLRule, LocalTrainConfig, compress_svd, recover_svd, train_local

C = 4


def _model(arch: str = "mlp", seed: int = 0, fd: int = 6):
    torch.manual_seed(seed)
    return build_model(arch, (1, 8, 8), C, fd).double()


def _data(n: int = 20):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3] * 5)


def _server(arch: str = "lenet5", fd: int = 5) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _model(arch, 7, fd).state_dict().items()}


def _grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def test_fml_gives_each_model_the_gradient_of_its_own_loss():
    model, (x, y) = _model(), _data()
    rule = FMLRule(model, LocalTrainConfig(steps=1), _server(), None, shared="lenet5", clip=0.0, alpha=0.3, beta=0.6)
    assert rule.ce_weight == 0.3
    logits = model(x)
    (rule.ce_weight * F.cross_entropy(logits, y) + rule.loss(model, x, None, logits, y)).backward()
    got_local, got_meme = _grads(model), _grads(rule.shared)
    # each model's own loss, the other's prediction a constant
    ref, meme = _model(), _model("lenet5", 7, 5)
    meme.load_state_dict(rule.shared.state_dict())
    zl, zm = ref(x), meme(x)
    l_local = 0.3 * F.cross_entropy(zl, y) + 0.7 * (F.softmax(zm.detach(), 1) * (F.log_softmax(zm.detach(), 1) - F.log_softmax(zl, 1))).sum(1).mean()
    l_meme = 0.6 * F.cross_entropy(zm, y) + 0.4 * (F.softmax(zl.detach(), 1) * (F.log_softmax(zl.detach(), 1) - F.log_softmax(zm, 1))).sum(1).mean()
    l_local.backward()
    l_meme.backward()
    for a, b in zip(got_local, _grads(ref), strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    for a, b in zip(got_meme, _grads(meme), strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_fml_trains_both_models_keeps_the_local_one_and_sends_the_meme():
    model, (x, y) = _model(), _data()
    cfg = LocalTrainConfig(steps=4, batch_size=8, lr=0.1)
    server = _server()
    rule = FMLRule(model, cfg, server, None, shared="lenet5")
    train_local(model, x, y, cfg, seed=0, rule=rule)
    assert set(rule.state) == set(model.state_dict())  # the whole local model stays
    assert set(rule.arrays) == set(server)
    assert any(not torch.equal(rule.arrays[k], server[k]) for k in server)  # the meme trained
    assert all(torch.equal(rule.state[k], v) for k, v in model.state_dict().items())
    # alpha = beta = 1: the local model trains on cross-entropy alone, as without the rule
    a, b = _model(), _model()
    train_local(a, x, y, cfg, seed=3, rule=FMLRule(a, cfg, server, None, shared="lenet5", clip=0.0, alpha=1.0, beta=1.0))
    train_local(b, x, y, cfg, seed=3)
    assert all(torch.allclose(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_svd_compression_keeps_the_asked_energy_and_recovers_low_rank_matrices_exactly():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 30, generator=g, dtype=torch.float64)
    full = torch.randn(40, 30, generator=g, dtype=torch.float64)
    state = {"low": low, "full": full, "bias": torch.randn(30, dtype=torch.float64)}
    out = compress_svd(state, 0.999999)
    assert out["low@u"].shape == (40, 3) and out["low@s"].shape == (3,) and out["low@v"].shape == (3, 30)
    assert "full" in out and "full@u" not in out  # a flat spectrum: the factors would not be smaller
    back = recover_svd(out)
    assert set(back) == set(state)
    assert torch.allclose(back["low"], low, atol=1e-9) and torch.equal(back["full"], full)
    for energy in (0.5, 0.9):
        kept = recover_svd(compress_svd({"w": full}, energy))["w"]
        s = torch.linalg.svdvals(full)
        r = int(((s**2).cumsum(0) < energy * (s**2).sum()).sum()) + 1
        if r * 71 < 1200:
            assert (kept**2).sum() >= energy * (full**2).sum() - 1e-9  # the asked energy, with the fewest values
            assert torch.linalg.matrix_rank(kept) == r
    assert compress_svd(state, 1.0) == state


def test_fedkd_loss_is_the_official_one_and_reaches_mentor_mentee_and_w_h():
    model, (x, y) = _model(fd=6), _data()
    rule = FedKDRule(model, LocalTrainConfig(steps=1), _server(fd=5), None, shared="lenet5", clip=0.0)
    assert rule.w_h.shape == (6, 5)
    h = model.features(x)
    logits = model.classifier(h)
    got = rule.loss(model, x, h, logits, y)
    hs = rule.shared.features(x)
    s = rule.shared.classifier(hs)
    ce_t, ce_s = F.cross_entropy(logits, y), F.cross_entropy(s, y)
    def kl(log_q, p):  # nn.KLDivLoss()'s default, the official reduction: mean over batch × classes
        return (p * (p.log() - log_q)).mean()

    want = ce_s + (kl(F.log_softmax(logits, 1), F.softmax(s, 1)) + kl(F.log_softmax(s, 1), F.softmax(logits, 1))
                   + 2 * F.mse_loss(h, hs @ rule.w_h.T)) / (ce_t + ce_s)  # fmt: skip
    assert torch.allclose(got, want)
    (ce_t + got).backward()
    assert rule.w_h.grad is not None and rule.w_h.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rule.shared.parameters())
    assert all(p.grad is not None for p in model.parameters())


def test_fedkd_keeps_w_h_between_rounds_and_sends_the_mentee_compressed():
    model, (x, y) = _model(fd=6), _data()
    cfg = LocalTrainConfig(steps=3, batch_size=8, lr=0.05)
    rule = FedKDRule(model, cfg, _server(fd=5), None, shared="lenet5", energy=0.5)
    w0 = rule.w_h.detach().clone()
    train_local(model, x, y, cfg, seed=0, rule=rule)
    assert not torch.equal(rule.state["W_h"], w0)  # trained, and kept by the client
    assert any(k.endswith("@u") for k in rule.arrays)  # compressed at energy 0.5
    again = FedKDRule(model, cfg, _server(fd=5), rule.state, shared="lenet5")
    assert torch.equal(again.w_h.detach(), rule.state["W_h"])
    fresh = FedKDRule(_model(fd=6), cfg, _server(fd=5), None, shared="lenet5")
    assert torch.equal(fresh.w_h.detach(), w0)  # a fixed initialization: runs are deterministic


def _fed() -> tuple[Federation, ServerContext]:
    archs = {11: "mlp", 21: "lenet5"}
    fed = Federation({11: 0, 21: 1}, archs, np.full((2, C), 5), "mlp", seed=0)
    return fed, ServerContext((1, 8, 8), C, 8, torch.device("cpu"), 0, 4, evaluate=lambda m: (1.0, 0.5))


class _Grid:
    def get_node_ids(self):
        return [11, 21]


def _replies(reply, fed, ctx, shared, examples):
    out = []
    for n, rec in shared.items():
        torch.manual_seed(n)
        content = RecordDict({
            records.ARRAYS: ArrayRecord(),  # a client's own model stays local: only the shared one travels
            records.RULE_ARRAYS: rec,
            records.METRICS: MetricRecord({records.NUM_EXAMPLES: examples[n]}),
            records.INFO: ConfigRecord({records.LABEL_COUNTS: [examples[n], 0, 0, 0]}),
        })  # fmt: skip
        out.append(reply(n, content))
    return out


@pytest.mark.parametrize("name", ["fml", "fedkd"])
def test_the_server_averages_the_shared_model_by_examples_and_sends_it(name, reply, task_identity):
    fed, ctx = _fed()
    s = build_strategy(load_config(None, [f"strategy.name={name}", f"strategy.{name}.shared=lenet5"]), fed, ctx)
    state = records.pack({a: records.to_record(ctx.build(a)) for a in fed.groups})
    msgs = list(s.configure_train(1, state, ConfigRecord(), _Grid()))
    assert all(m.content[records.CONFIG][records.RULE] == name for m in msgs)
    assert all(m.content[records.CONFIG]["rule.shared"] == "lenet5" for m in msgs)
    first = {k: v.numpy() for k, v in msgs[0].content[records.RULE_ARRAYS].items()}
    assert set(first) == set(ctx.build("lenet5").state_dict())  # round 1: the initial shared model, whole
    a = {k: np.full_like(v, 1.0) for k, v in first.items()}
    b = {k: np.full_like(v, 4.0) for k, v in first.items()}
    bad = {k: v for k, v in a.items() if k != "classifier.bias"}  # does not fit: ignored
    shared = {11: ArrayRecord({k: Array(v) for k, v in a.items()}), 21: ArrayRecord({k: Array(v) for k, v in b.items()})}
    new, _ = s.aggregate_train(1, _replies(reply, fed, ctx, shared, {11: 1, 21: 2}))
    assert new is not None
    for v in s.shared.values():
        np.testing.assert_allclose(v.numpy(), 3.0)  # (1·1 + 2·4) / 3
    assert s.round_metrics["shared_accuracy"] == 0.5
    s.configure_train(2, new, ConfigRecord(), _Grid())
    shared[11] = ArrayRecord({k: Array(v) for k, v in bad.items()})
    s.aggregate_train(2, _replies(reply, fed, ctx, shared, {11: 1, 21: 2}))
    np.testing.assert_allclose(s.shared["classifier.weight"].numpy(), 4.0)  # only the fitting reply
    fresh = build_strategy(load_config(None, [f"strategy.name={name}", f"strategy.{name}.shared=lenet5"]), fed, ctx)
    fresh.load_state_dict(s.state_dict())  # checkpointed with the run
    np.testing.assert_array_equal(fresh.shared["classifier.weight"].numpy(), 4.0)


def test_fedkd_energy_rises_from_t_start_to_t_end_and_compresses_what_it_sends(task_identity):
    fed, ctx = _fed()
    s = build_strategy(load_config(None, ["strategy.name=fedkd", "strategy.fedkd.t-start=0.5", "strategy.fedkd.t-end=0.9"]), fed, ctx)
    assert s.energy(1) == pytest.approx(0.5) and s.energy(4) == pytest.approx(0.5 + 3 / 4 * 0.4)
    g = torch.Generator().manual_seed(0)
    low = {k: (torch.randn(v.shape[0], 1, generator=g) @ torch.randn(1, v.shape[1], generator=g)).numpy()
           if v.numpy().ndim == 2 else v.numpy() for k, v in s.shared.items()}  # fmt: skip
    s.shared = ArrayRecord({k: Array(v.astype(np.float32)) for k, v in low.items()})
    state = records.pack({a: records.to_record(ctx.build(a)) for a in fed.groups})
    msgs = list(s.configure_train(2, state, ConfigRecord(), _Grid()))
    sent = msgs[0].content[records.RULE_ARRAYS]
    assert any(k.endswith("@u") for k in sent) and msgs[0].content[records.CONFIG]["rule.energy"] == pytest.approx(0.6)
    back = recover_svd({k: torch.from_numpy(v.numpy()) for k, v in sent.items()})
    for k, v in low.items():
        np.testing.assert_allclose(back[k].numpy(), v, atol=1e-4)
    sent_bytes = sum(v.numpy().nbytes for v in sent.values())
    assert sent_bytes < sum(v.nbytes for v in low.values()) / 5
    model_bytes = sum(v.numpy().nbytes for v in msgs[0].content[records.ARRAYS].values())
    # what the byte counters see: the model and the compressed mentee
    assert model_bytes + sent_bytes <= records.message_array_bytes(msgs[0]) < model_bytes + sum(v.nbytes for v in low.values()) / 4


@pytest.mark.parametrize("name", ["fml", "fedkd"])
def test_runs_with_three_architectures_and_reports_per_client_and_shared_accuracy(name, tmp_path):
    out = tmp_path / name
    sets = ["rounds=2", "clients.num=6", "clients.architectures=mlp:2,lenet5:2,cnn:2", "clients.local-steps=5",
            "clients.threads=1", f"strategy.name={name}", "partition.name=dirichlet", "partition.test-fraction=0.25",
            "eval.fraction=1", "model.feature-dim=16"]  # fmt: skip
    assert main(["run", "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["client_accuracy"]) == 6 and 0 <= r["shared_accuracy"] <= 1 for r in rows)
    assert rows[-1][f"{name}_shared_clients"] == 6 and rows[-1]["rejected"] == 0
    assert rows[-1]["state_from"] == {str(i): 1 for i in range(6)}  # the local models came back
    # the shared model's traffic, counted apart from the clients' own models: once per client each way
    shared = sum(v.nbytes for v in build_model("mlp", (1, 28, 28), 10, 16).state_dict().values())
    assert all(0.9 * 6 * shared < r["bytes_up_extra"] <= 6 * shared * 1.01 + 6 * 4096 for r in rows[:1])
    # the clients' own models never travel: the shared model (and FedKD's factors) is the whole traffic
    assert all(0 < r["bytes_down_extra"] == r["bytes_down"] and r["bytes_up_extra"] == r["bytes_up"] for r in rows)
