"""The batched client engine (``clients.batched``, :mod:`fedkd.batched`) against the one-by-one path.

Tolerance. In float64 every client's parameters and BatchNorm running statistics match the
one-by-one result to ``1e-9`` after its whole local update (measured: ≤ 1e-15), and
``num_batches_tracked`` exactly: the two paths compute the same thing. In float32 (what runs
use) they match to ``2e-3`` absolute: two float32 implementations of a ResNet step can disagree
on a ReLU whose input lies within rounding (~1e-6) of zero, and BatchNorm's backward spreads
that one element over its channel (measured on resnet8: 1.5e-4; on the other models ≤ 3e-7,
the same as one-by-one float32 against float64).
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from torch import nn

from fedkd import records
from fedkd.batched import Client, train_all, train_group, train_one, unbatchable
from fedkd.cli import main
from fedkd.config import load_config
from fedkd.engines import NODE_ID_OFFSET, LocalGrid
from fedkd.models import build_model
from fedkd.synthesis import build_generator
from fedkd.train import FedGenRegularizer, LocalTrainConfig

F64, F32 = {"atol": 1e-9, "rtol": 0.0}, {"atol": 2e-3, "rtol": 0.0}
ARCHS = ["cnn", "cnn-bn", "lenet5", "mlp", "resnet8"]
SIZES = [37, 50, 23]  # unequal: partial last batches, and unequal step counts by epochs


def clients(arch: str, cfg: LocalTrainConfig, fedgen: bool = False, dtype: torch.dtype = torch.float32) -> list[Client]:
    """Three clients of ``arch`` with the same server weights and their own data (float32 init)."""
    torch.manual_seed(0)
    server = build_model(arch, (1, 28, 28), 10)
    gen = build_generator("feature", (server.feature_dim,), 10, latent_dim=8, hidden_dim=16) if fedgen else None
    out = []
    for i, n in enumerate(SIZES):
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(n, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        reg = None
        if gen is not None:
            prior = torch.rand(10, generator=g, dtype=torch.float64) + 0.1
            reg = FedGenRegularizer(copy.deepcopy(gen).to(dtype), 1.5, 2.0, 3, 12, prior, seed=7 + i)
        model = copy.deepcopy(server).to(dtype)
        out.append(Client(model, x.to(dtype), y, cfg, seed=11 + i, device=torch.device("cpu"), regularizer=reg))
    return out


@pytest.fixture(params=["float64", "float32"])
def precision(request):
    """(dtype, tolerance); the training runs under that default dtype."""
    dtype = getattr(torch, request.param)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    yield dtype, (F64 if dtype == torch.float64 else F32)
    torch.set_default_dtype(old)


def assert_same(a: nn.Module, b: nn.Module, tol: dict = F32) -> None:
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(sb[k], v, **tol, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(sb[k], v), k


RECIPES = {
    "steps": LocalTrainConfig(steps=6, batch_size=16, lr=0.05),
    "epochs+momentum+wd": LocalTrainConfig(epochs=2, batch_size=16, lr=0.03, momentum=0.9, weight_decay=1e-3),
    "fedprox": LocalTrainConfig(steps=5, batch_size=16, lr=0.05, proximal_mu=0.5),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_batched_matches_one_by_one(arch, recipe, precision):
    dtype, tol = precision
    cfg = RECIPES[recipe]
    ref, bat = clients(arch, cfg, dtype=dtype), clients(arch, cfg, dtype=dtype)
    ref_loss = [train_one(c) for c in ref]
    bat_loss = train_group(bat)
    for r, b in zip(ref, bat, strict=True):
        assert_same(r.model, b.model, tol)
    assert bat_loss == pytest.approx(ref_loss, rel=1e-4)
    start = clients(arch, cfg, dtype=dtype)[0].model
    assert any(not torch.equal(p, q) for p, q in zip(bat[0].model.parameters(), start.parameters(), strict=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_matches_one_by_one_with_fedgen_and_fedprox(arch, precision):
    dtype, tol = precision
    cfg = LocalTrainConfig(steps=5, batch_size=16, lr=0.05, proximal_mu=0.1)
    ref, bat = clients(arch, cfg, fedgen=True, dtype=dtype), clients(arch, cfg, fedgen=True, dtype=dtype)
    ref_loss = [train_one(c) for c in ref]
    bat_loss = train_group(bat)
    for r, b in zip(ref, bat, strict=True):
        assert_same(r.model, b.model, tol)
    assert bat_loss == pytest.approx(ref_loss, rel=1e-4)


def test_batchnorm_statistics_are_per_client_and_count_only_real_samples():
    cfg = LocalTrainConfig(epochs=1, batch_size=32, lr=0.0)  # lr 0: only BatchNorm's buffers move
    bat = clients("cnn-bn", cfg)
    train_group(bat)
    bn = [m for m in bat[0].model.modules() if isinstance(m, nn.BatchNorm2d)][0]
    name = next(n for n, m in bat[0].model.named_modules() if m is bn)
    means = [dict(c.model.named_modules())[name].running_mean for c in bat]
    assert not torch.allclose(means[0], means[1]), "clients share running statistics"
    tracked = [int(dict(c.model.named_modules())[name].num_batches_tracked) for c in bat]
    assert tracked == [2, 2, 1], "one count per real step (37 and 50 samples: 2 batches of 32; 23: one)"


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.5)


def test_what_cannot_be_batched_is_named():
    assert unbatchable(build_model("resnet8", (1, 28, 28), 10)) is None
    assert "draws random numbers" in (unbatchable(Noisy()) or "")
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, momentum=None))
    assert "momentum" in (unbatchable(bn) or "")
    assert "regularizer" in (unbatchable(nn.Linear(2, 2), regularizer=object()) or "")


def test_an_unbatchable_group_falls_back_and_says_so_once(caplog, monkeypatch):
    import fedkd.batched as B

    monkeypatch.setattr(B, "_WARNED", set())
    monkeypatch.setattr(B, "unbatchable", lambda *a, **k: "test: no batched form")
    cfg = RECIPES["steps"]
    ref, bat = clients("mlp", cfg), clients("mlp", cfg)
    for c in ref:
        train_one(c)
    with caplog.at_level(logging.WARNING, logger="fedkd.batched"):
        train_all(bat)
        train_all(clients("mlp", cfg))
    assert [r.getMessage() for r in caplog.records].count(
        "batched clients: test: no batched form; this group trains one by one"
    ) == 1
    for r, b in zip(ref, bat, strict=True):
        assert torch.equal(r.model.state_dict()["classifier.weight"], b.model.state_dict()["classifier.weight"])


def test_groups_of_different_architectures_train_apart():
    cfg = RECIPES["steps"]
    ref = clients("mlp", cfg)[:2] + clients("lenet5", cfg)[:2]
    bat = clients("mlp", cfg)[:2] + clients("lenet5", cfg)[:2]
    for c in ref:
        train_one(c)
    losses, seconds = train_all(bat)
    assert len(losses) == 4 and all(s > 0 for s in seconds)
    for r, b in zip(ref, bat, strict=True):
        assert_same(r.model, b.model)


def _train_messages(cfg_text: str, n: int, server_round: int = 1) -> list:
    """Round-1 train messages as FedProx sends them: the same weights to every node."""
    from flwr.app import ConfigRecord, Message, RecordDict

    torch.manual_seed(5)
    arrays = records.to_record(build_model("cnn-bn", (1, 28, 28), 10))
    out = []
    for i in range(n):
        conf = ConfigRecord({records.RUN_CONFIG: cfg_text, "server-round": server_round, "proximal-mu": 0.2})
        out.append(Message(RecordDict({records.ARRAYS: arrays, records.CONFIG: conf}), NODE_ID_OFFSET + i, "train",
                           group_id="1"))  # fmt: skip
    return out


def test_the_local_grid_replies_match_one_by_one_through_the_client_app(tiny, monkeypatch):
    """The real ClientApp path: the same train messages through LocalGrid, batched and not."""
    import fedkd.batched as B
    from fedkd.client_app import app

    monkeypatch.setattr(B, "CPU_CONV_ONE_BY_ONE", False)  # batch the CNN on the CPU too

    sets = [s for s in tiny if not s.startswith("clients.architectures")] + [
        "clients.architectures=cnn-bn", "clients.local-steps=4", "clients.momentum=0.5",
    ]  # fmt: skip
    cfg = load_config(None, sets)
    replies = {}
    for batched in (False, True):
        grid = LocalGrid(app, cfg.int("clients.num"), batched=batched)
        msgs = _train_messages(cfg.to_toml(), cfg.int("clients.num"))
        replies[batched] = {r.metadata.src_node_id: r for r in grid.send_and_receive(msgs)}
    assert sorted(replies[True]) == sorted(replies[False]) and len(replies[True]) == cfg.int("clients.num")
    for node, ref in replies[False].items():
        got = replies[True][node]
        assert not got.has_error(), got.error
        a, b = ref.content.array_records[records.ARRAYS], got.content.array_records[records.ARRAYS]
        for k in a:
            ta, tb = torch.from_numpy(a[k].numpy()), torch.from_numpy(b[k].numpy())
            if ta.is_floating_point():
                torch.testing.assert_close(tb, ta, **F32)
            else:
                assert torch.equal(ta, tb), k
        la = ref.content.metric_records[records.METRICS][records.TRAIN_LOSS]
        lb = got.content.metric_records[records.METRICS][records.TRAIN_LOSS]
        assert lb == pytest.approx(la, rel=1e-4)


def test_a_batched_run_with_faults_end_to_end(tmp_path, tiny, monkeypatch):
    """`fedkd run` with clients.batched: faults, validation and the summary as one by one."""
    import fedkd.batched as B

    monkeypatch.setattr(B, "CPU_CONV_ONE_BY_ONE", False)  # lenet5 batched on the CPU too
    out = {}
    for batched in ("false", "true"):
        d = tmp_path / batched
        sets = [*tiny, "clients.num=6", "clients.architectures=mlp:3,lenet5:3", "faults.crash-rate=0.2",
                "faults.nan-rate=0.2", f"clients.batched={batched}"]  # fmt: skip
        argv = ["run", "--out", str(d)] + [a for s in sets for a in ("--set", s)]
        assert main(argv) == 0
        out[batched] = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(out["false"], out["true"], strict=True):
        assert a["failures"] == b["failures"] and a.get("rejected") == b.get("rejected")
        assert a["bytes_up"] == b["bytes_up"]
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=0.01)


def test_on_a_cpu_convolutional_groups_train_one_by_one_and_say_so(caplog, monkeypatch):
    import fedkd.batched as B

    monkeypatch.setattr(B, "_WARNED", set())
    cfg = RECIPES["steps"]
    calls = []
    monkeypatch.setattr(B, "train_group", lambda cs: calls.append(len(cs)) or [0.0] * len(cs))
    with caplog.at_level(logging.WARNING, logger="fedkd.batched"):
        train_all(clients("lenet5", cfg) + clients("mlp", cfg))
    assert calls == [3], "the mlp group is batched, the lenet5 group is not"
    assert any("LeNet5 has convolutions, which are not faster batched on a CPU" in r.getMessage() for r in caplog.records)
