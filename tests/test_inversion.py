"""Fast-DFKD (`synthesizer.name = "fast"`): the properties the method relies on, and `fedkd dfkd` with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedkd.cli import main
from fedkd.config import CORE_KEYS
from fedkd.inversion import FastSynthesizer, MomentumBNStatistics, random_crop_flip
from fedkd.models import build_model
from fedkd.synthesis import PRESETS, SYNTHESIZERS, BNStatistics, adv_loss, build_generator, oh_loss

SHAPE = (1, 8, 8)


def _fast(seed: int = 0, **kw: object) -> tuple[FastSynthesizer, nn.Module, nn.Module]:
    torch.manual_seed(seed)
    teacher = build_model("resnet8", SHAPE, 10).eval().requires_grad_(False)
    student = build_model("lenet5-half", SHAPE, 10)
    gen = build_generator("image", SHAPE, 10, latent_dim=8, base_channels=4)
    opts = {"iterations": 2, "crop_padding": 0, **kw}
    warmup = int(opts.pop("warmup", 0))  # type: ignore[call-overload]
    return FastSynthesizer(gen, PRESETS.get("fast"), 16, 5e-3, seed, warmup, **opts), teacher, student  # type: ignore[arg-type]


def test_registry_and_config_agree() -> None:
    choices = {k.name: k.choices for k in CORE_KEYS}
    assert set(choices["synthesizer.name"] or ()) == set(SYNTHESIZERS.names()) == {"generator", "fast", "cmi"}


def test_the_meta_gradient_is_the_clones_gradient_fomaml() -> None:
    """One inner iteration: the clone starts at the meta weights, so the meta step's gradient is
    ∇θ (bn · L_bn + oh · CE) at the meta generator, for the call's noise and labels."""
    synth, teacher, _ = _fast(iterations=1, warmup=10)
    seen: dict[str, torch.Tensor] = {}
    meta_step = synth.meta_optimizer.step

    def capture(*a: object, **k: object) -> None:
        seen.update({n: p.grad.clone() for n, p in synth.generator.named_parameters() if p.grad is not None})
        meta_step()

    synth.meta_optimizer.step = capture  # type: ignore[method-assign]
    ref = build_generator("image", SHAPE, 10, latent_dim=8, base_channels=4)
    ref.load_state_dict(synth.generator.state_dict())
    rng = torch.Generator().manual_seed(0)  # the synthesizer's stream: z, then y
    z, y = torch.randn(16, 8, generator=rng), torch.randint(10, (16,), generator=rng)
    before = {n: p.detach().clone() for n, p in synth.generator.named_parameters()}
    synth.step(teacher)
    with BNStatistics(teacher) as stats:
        t = teacher(ref.train()(z))
    loss = 10.0 * stats.loss + 0.5 * oh_loss(t, y)
    grads = dict(zip([n for n, _ in ref.named_parameters()], torch.autograd.grad(loss, list(ref.parameters()))))
    assert seen and set(seen) == set(grads)
    for n in grads:
        assert torch.allclose(seen[n], grads[n], rtol=1e-4, atol=1e-6), n
    assert any(not torch.equal(before[n], p) for n, p in synth.generator.named_parameters()), "the meta step ran"


def test_meta_off_never_moves_the_initialization() -> None:
    synth, teacher, student = _fast(meta="off")
    before = [p.detach().clone() for p in synth.generator.parameters()]
    synth.step(teacher, student)
    assert all(torch.equal(a, b) for a, b in zip(before, synth.generator.parameters(), strict=True))


def test_the_pool_keeps_every_batch_and_the_student_draws_from_all() -> None:
    synth, teacher, student = _fast()
    with pytest.raises(RuntimeError, match="pool is empty"):
        synth.source()()
    for k in range(1, 5):
        stats = synth.step(teacher, student)
        assert len(synth) == 16 * k and stats["pool"] == 16 * k
    first = synth._pool[0]
    draws = torch.cat([synth.source()()[0] for _ in range(30)])
    from_first = sum(bool((row == first).flatten(1).all(1).any()) for row in draws[:, None])
    assert from_first > 0, "the first call's batch is still replayed after three more"
    capped, t2, s2 = _fast(pool_size=2)
    for _ in range(4):
        capped.step(t2, s2)
    assert len(capped) == 32 and len(capped._pool) == 2


def test_momentum_bn_mixes_the_average_of_earlier_calls() -> None:
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.uniform_()
    bn.running_var.uniform_(0.5, 1.5)
    model = nn.Sequential(bn)
    x = torch.randn(8, 3, 4, 4)
    avg = [(torch.full((3,), 0.3), torch.full((3,), 2.0))]
    with MomentumBNStatistics(model, 0.9, avg) as stats:
        model(x)
    mean, var = x.mean([0, 2, 3]), x.var([0, 2, 3], unbiased=False)
    mix_m, mix_v = 0.1 * mean + 0.9 * 0.3, 0.1 * var + 0.9 * 2.0
    want = (bn.running_var - mix_v).norm() + (bn.running_mean - mix_m).norm()
    assert float(stats.loss) == pytest.approx(float(want), rel=1e-6)
    assert torch.allclose(stats.last[0][0], mean) and torch.allclose(stats.last[0][1], var)
    with MomentumBNStatistics(model, 0.9, None) as plain:  # no average yet: DeepInversion's
        model(x)
    with BNStatistics(model) as di:
        model(x)
    assert float(plain.loss) == pytest.approx(float(di.loss), rel=1e-6)


def test_the_bn_average_is_updated_after_each_call() -> None:
    synth, teacher, student = _fast()
    assert synth._bn_average is None
    synth.step(teacher, student)
    first = [m.clone() for m, _ in synth._bn_average]  # type: ignore[union-attr]
    synth.step(teacher, student)
    assert any(not torch.equal(a, m) for a, (m, _) in zip(first, synth._bn_average, strict=True))  # type: ignore[arg-type]


def test_masked_kl_counts_only_the_samples_where_student_and_teacher_agree() -> None:
    t = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    s = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # agrees on sample 0 only
    kl0 = F.kl_div(F.log_softmax(s[:1], 1), F.softmax(t[:1], 1), reduction="sum")
    assert float(adv_loss(s, t, "kl-masked")) == pytest.approx(-float(kl0) / 2, rel=1e-6)
    assert PRESETS.get("fast").adv_metric == "kl-masked"


def test_random_crop_is_a_shifted_window_of_the_padded_batch() -> None:
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    rng = torch.Generator().manual_seed(0)
    assert torch.equal(random_crop_flip(x, 0, False, rng), x)
    out = random_crop_flip(x, 2, False, rng)
    padded = F.pad(x, (2, 2, 2, 2))
    assert out.shape == x.shape
    for b in range(2):
        windows = [padded[b, :, i : i + 5, j : j + 5] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)
    flipped = random_crop_flip(x, 0, True, torch.Generator().manual_seed(3))
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(2)) for f, o in zip(flipped, x, strict=True))


def test_warmup_calls_leave_the_adversarial_term_out() -> None:
    synth, teacher, student = _fast(warmup=1)
    assert "g_adv" not in synth.step(teacher, student)
    assert "g_adv" in synth.step(teacher, student)


FAST = [
    "dataset.name=digits", "dfkd.threads=1", "dfkd.teacher=resnet8", "dfkd.student=lenet5-half",
    "dfkd.teacher-epochs=3", "dfkd.teacher-lr=0.05", "dfkd.epochs=4", "dfkd.iterations=1", "distill.steps=3",
    "dfkd.warmup-epochs=1", "synthesizer.name=fast", "synthesis.preset=fast", "synthesis.batch-size=16",
    "generator.image.base-channels=4", "generator.image.latent-dim=8", "distill.loss=kl",
    "distill.lr-schedule=cosine", "synthesizer.fast.iterations=2",
]  # fmt: skip


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _strip(run_dir: Path) -> list[dict[str, object]]:
    """metrics.jsonl without its wall-clock fields."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "elapsed")} for r in rows]


def _resumed_rows(tmp_path: Path, sets: list[str]) -> list[dict[str, object]]:
    """Run ``sets`` into ``tmp_path/b``, drop its newest checkpoint and summary (as if interrupted after
    epoch 3), resume it; its metrics."""
    assert main(["dfkd", "--out", str(tmp_path / "b"), *sets]) == 0
    (tmp_path / "b" / "checkpoint-00004.pt").unlink()
    (tmp_path / "b" / "summary.json").unlink()
    assert main(["dfkd", "--resume", str(tmp_path / "b")]) == 0
    return _strip(tmp_path / "b")


def test_fedkd_dfkd_with_fast_warms_up_pools_and_resumes(tmp_path: Path) -> None:
    sets = [*_sets(FAST), "--set", f"dfkd.teacher-cache={tmp_path}", "--set", "checkpoint.keep-final=2"]
    assert main(["dfkd", "--out", str(tmp_path / "a"), *sets]) == 0
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["pool"] for r in rows] == [16, 32, 48, 64]
    assert "s_kd_loss" not in rows[0] and all("s_kd_loss" in r for r in rows[1:]), "epoch 1 is warm-up"
    assert "g_adv" not in rows[0] and "g_adv" in rows[1]
    assert rows[1]["lr"] == pytest.approx(0.01) and rows[-1]["lr"] < rows[1]["lr"], "cosine after the warm-up"
    assert _resumed_rows(tmp_path, sets) == _strip(tmp_path / "a"), "the pool, the meta generator and its Adam state were restored"


BAD = [
    (["synthesizer.name=dfq"], "synthesizer.name must be one of generator, fast, cmi"),
    (["synthesizer.name=cmi", "synthesis.preset=cmi", "dfkd.teacher=resnet8", "synthesizer.cmi.local-scale=0"],
     "synthesizer.cmi.local-scale must be in (0, 1]"),
    (["synthesizer.name=fast", "synthesis.preset=fast", "dfkd.teacher=resnet8", "synthesizer.fast.iterations=0"],
     "synthesizer.fast.iterations must be ≥ 1"),
    (["synthesizer.name=fast", "synthesis.preset=dafl"], "synthesizer 'fast' takes the terms bn, oh, adv; got act, ie"),
    (["synthesizer.name=fast", "synthesis.preset=fast"], "'bn' needs a teacher with BatchNorm"),
    (["synthesizer.fast.meta=reptile", "synthesizer.name=fast"], "synthesizer.fast.meta must be one of fomaml, off"),
    (["synthesizer.fast.speed=2"], "unknown config key 'synthesizer.fast.speed'"),
    (["dfkd.warmup-epochs=-1"], "dfkd.warmup-epochs must be ≥ 0"),
]  # fmt: skip


@pytest.mark.parametrize(("sets", "message"), BAD, ids=[b[1][:40] for b in BAD])
def test_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], sets: list[str], message: str) -> None:
    out = tmp_path / "run"
    assert main(["dfkd", "--out", str(out), "--set", "dataset.name=digits", *_sets(sets)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


# --------------------------------------------------------------------------- CMI

from fedkd.inversion import CMISynthesizer, InstanceMeans, random_resized_crop  # noqa: E402


def _cmi(seed: int = 0, **kw: object) -> tuple[CMISynthesizer, nn.Module, nn.Module]:
    torch.manual_seed(seed)
    teacher = build_model("resnet8", SHAPE, 10).eval().requires_grad_(False)
    student = build_model("lenet5-half", SHAPE, 10)
    gen = build_generator("image", SHAPE, 10, latent_dim=8, base_channels=4)
    opts = {"iterations": 3, "crop_padding": 1, "head_dim": 8, "negatives": 20, **kw}
    return CMISynthesizer(gen, PRESETS.get("cmi"), 16, 1e-3, seed, 0, **opts), teacher, student  # type: ignore[arg-type]


def test_cmi_instance_means_are_the_bn_inputs_channel_means() -> None:
    teacher = build_model("resnet8", SHAPE, 10).eval()
    x = torch.randn(4, *SHAPE)
    seen: list[torch.Tensor] = []
    bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    handles = [m.register_forward_hook(lambda m, i, o: seen.append(i[0].mean((2, 3)))) for m in bns]
    with InstanceMeans(teacher) as means:
        teacher(x)
        feats = means.take()
    for h in handles:
        h.remove()
    assert feats.shape == (4, sum(m.num_features for m in bns))
    assert torch.allclose(feats, torch.cat(seen, 1))


@torch.no_grad()
def test_cmi_contrastive_loss_is_infonce_over_the_batch_and_the_bank() -> None:
    synth, _, _ = _cmi()
    synth._build_head(6)
    torch.manual_seed(0)
    local, glob = torch.randn(5, 6), torch.randn(5, 6)
    head = synth.head
    assert head is not None
    p = F.normalize(head(torch.cat([local, glob])), dim=1)
    want = F.cross_entropy(p[:5] @ p[5:].T / 0.2, torch.arange(5))
    assert float(synth.contrastive_loss(local, glob)) == pytest.approx(float(want), rel=1e-5)
    # with a bank: its pairs are extra rows and columns, the two parts averaged separately
    synth._bank = torch.randn(3, 12)
    synth.negatives = 3
    bank_l, bank_g = synth._bank.chunk(2, dim=1)
    rng_state = synth._rng.get_state()
    idx = torch.randperm(3, generator=synth._rng)
    synth._rng.set_state(rng_state)
    q = F.normalize(head(torch.cat([local, bank_l[idx], glob, bank_g[idx]])), dim=1)
    per = F.cross_entropy(q[:8] @ q[8:].T / 0.2, torch.arange(8), reduction="none")
    assert float(synth.contrastive_loss(local, glob)) == pytest.approx(float(per[:5].mean() + per[5:].mean()), rel=1e-5)


def test_cmi_reinitializes_the_generator_banks_features_and_pools_every_batch() -> None:
    synth, teacher, student = _cmi()
    trained = []
    for k in range(1, 4):
        stats = synth.step(teacher, student)
        assert {"g_bn", "g_oh", "g_adv", "g_cr"} <= set(stats)
        assert len(synth) == 16 * k and synth._bank is not None and len(synth._bank) == 16 * k
        trained.append([p.detach().clone() for p in synth.generator.parameters()])
    lin = next(m for m in synth.generator.modules() if isinstance(m, nn.Linear))
    from fedkd.inversion import reinit_generator

    reinit_generator(synth.generator, torch.Generator().manual_seed(5))
    assert abs(float(lin.weight.detach().std()) - 0.02) < 0.005 and float(lin.bias.detach().abs().max()) == 0.0
    capped, t2, s2 = _cmi(bank_size=20)
    for _ in range(3):
        capped.step(t2, s2)
    assert capped._bank is not None and len(capped._bank) == 20, "FIFO bank"
    off, t3, s3 = _cmi(contrastive=0.0)
    assert "g_cr" not in off.step(t3, s3) and off._bank is None and off.head is None


def test_random_resized_crop_keeps_the_shape_and_the_gradient() -> None:
    x = torch.randn(6, 1, 8, 8, requires_grad=True)
    out = random_resized_crop(x, (0.25, 1.0), True, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_fedkd_dfkd_with_cmi_runs_and_resumes(tmp_path: Path) -> None:
    cmi = [s.replace("fast", "cmi") for s in FAST] + ["synthesizer.cmi.head-dim=8", "synthesizer.cmi.negatives=16"]
    sets = [*_sets(cmi), "--set", f"dfkd.teacher-cache={tmp_path}", "--set", "checkpoint.keep-final=2"]
    assert main(["dfkd", "--out", str(tmp_path / "a"), *sets]) == 0
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["pool"] for r in rows] == [16, 32, 48, 64] and all("g_cr" in r for r in rows)
    assert _resumed_rows(tmp_path, sets) == _strip(tmp_path / "a"), "the pool, the bank and the head were restored"
