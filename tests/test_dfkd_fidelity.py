"""The official LRA recipe's pieces (issue 10): the lra-official rule, LRA's memory, its generator
terms, the cosine schedule, the retention weight β, and the collapse probe."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from fedkd.config import load_config
from fedkd.dfkd import CollapseProbe, collapsed, mean_pairwise_distance, student_lr
from fedkd.distill import (
    UPDATE_RULES,
    Batch,
    LRAOfficialRule,
    LRARule,
    MemoryBuffer,
    ReplayRule,
    StudentUpdater,
    build_rule,
    kd_loss,
)
from fedkd.errors import ConfigError
from fedkd.synthesis import PRESETS, Synthesizer, adv_loss, ie_loss, js_lra
from tests.test_distill import _step_delta, _tiny_problem

# --------------------------------------------------------------------------- the lra-official rule


@pytest.mark.parametrize("bn", [False, True])
def test_lra_official_moves_the_student_exactly_as_replay(bn: bool) -> None:
    """The official code's retention gradient is lost (higher's copy_initial_weights): its step is replay's."""
    student, teacher, x, xm = _tiny_problem(bn=bn)
    official = _step_delta(LRAOfficialRule(alpha=0.9), student, teacher, x, xm)
    replay = _step_delta(ReplayRule(), student, teacher, x, xm)
    lra = _step_delta(LRARule("second-order", alpha=0.9), student, teacher, x, xm)
    assert torch.allclose(official, replay, atol=1e-7)
    assert (lra - official).norm() > 1e-3 * official.norm(), "the real meta-gradient differs"


def test_lra_official_reports_the_retention_loss_at_the_adapted_weights() -> None:
    student, teacher, x, xm = _tiny_problem()
    loss = kd_loss("l1")
    with torch.no_grad():
        new, mem = Batch(x, teacher(x)), Batch(xm, teacher(xm))
    params = {n: p for n, p in student.named_parameters()}
    _, stats = LRAOfficialRule(alpha=0.5).gradients(student, params, loss, new, mem)
    g = torch.autograd.grad(loss(functional_call(student, params, (x,)), new.target), list(params.values()))
    adapted = {n: p.detach() - 0.5 * gi for (n, p), gi in zip(params.items(), g, strict=True)}
    want = float(loss(functional_call(student, adapted, (xm,)), mem.target))
    assert stats["ret_loss"] == pytest.approx(want, rel=1e-5)
    _, empty = LRAOfficialRule().gradients(student, params, loss, new, None)
    assert math.isnan(empty["ret_loss"]) and set(empty) == set(stats)
    assert "lra-official" in UPDATE_RULES.names()
    with pytest.raises(ConfigError, match="alpha"):
        LRAOfficialRule(alpha=0.0)


def test_lra_beta_reaches_the_rule_and_zero_is_replay() -> None:
    rule = build_rule("lra", order="first-order", alpha=0.3, retention_weight=0.25)
    assert isinstance(rule, LRARule) and rule.retention_weight == 0.25 and rule.alpha == 0.3
    student, teacher, x, xm = _tiny_problem()
    cut = _step_delta(build_rule("lra", retention_weight=0.0), student, teacher, x, xm)
    assert torch.allclose(cut, _step_delta(ReplayRule(), student, teacher, x, xm), atol=1e-7)
    half = _step_delta(build_rule("lra", alpha=0.1, retention_weight=0.5), student, teacher, x, xm)
    full = _step_delta(build_rule("lra", alpha=0.1, retention_weight=1.0), student, teacher, x, xm)
    replay = _step_delta(ReplayRule(), student, teacher, x, xm)
    # the retention gradient is linear in β: the half-weight step lies halfway
    assert torch.allclose(half - replay, 0.5 * (full - replay), atol=1e-6)


# --------------------------------------------------------------------------- LRA's memory


def test_batch_mode_replays_one_whole_stored_push() -> None:
    """LRA's ReplayMemory: a cyclic list of pushed batches, one chosen at random per replay."""
    mem = MemoryBuffer(capacity=12, push_every=0, fraction=0.25, seed=1, mode="batch")
    for k in range(5):  # pushes of 4 samples valued k; capacity 12 keeps the last three pushes
        mem.push(torch.full((4, 2), float(k)))
    assert len(mem) == 12 and mem.batches == 3
    seen = set()
    for _ in range(60):
        out = mem.sample(64)  # the batch size does not matter in batch mode
        assert out is not None
        x, _ = out
        assert x.shape == (4, 2) and bool((x == x[0, 0]).all()), "one push, whole"
        seen.add(int(x[0, 0]))
    assert seen == {2, 3, 4}, "the two oldest pushes were evicted; every stored one is drawn"
    state = mem.state_dict()
    again = MemoryBuffer(capacity=12, push_every=0, fraction=0.25, mode="batch")
    again.load_state_dict(state)
    assert torch.equal(again.sample(8)[0], mem.sample(8)[0])  # type: ignore[index]
    with pytest.raises(ConfigError, match="replay mode"):
        MemoryBuffer(4, mode="epoch")


def test_push_last_pushes_off_schedule() -> None:
    student, teacher, x, _ = _tiny_problem()
    mem = MemoryBuffer(capacity=64, push_every=0, fraction=0.125)
    up = StudentUpdater(ReplayRule(), kd_loss("l1"), mem)
    assert not up.push_last(), "nothing stepped on yet"
    up.step(student, teacher, torch.optim.SGD(student.parameters(), lr=0.01), x)
    assert len(mem) == 0, "push_every = 0: the step schedule pushes nothing"
    assert up.push_last() and len(mem) == 2  # ⌈16 / 8⌉ samples of the last batch
    assert any(torch.equal(mem.sample(16)[0][0], row) for row in x)  # type: ignore[index]


# --------------------------------------------------------------------------- LRA's generator terms


def _official_js(outputs: Tensor, outputs_student: Tensor) -> Tensor:
    """gaurav104/LRA src/graphs/losses/kd_losses.py JS_divergence, transcribed."""
    t = 3.0
    p = F.softmax(outputs_student / t, dim=1)
    q = F.softmax(outputs / t, dim=1)
    m = 0.5 * (p + q)
    p, q, m = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99), m.clamp(0.01, 0.99)
    js = 0.5 * nn.KLDivLoss()(torch.log(p), m) + 0.5 * nn.KLDivLoss()(torch.log(q), m)
    return 1.0 - js.clamp(0.0, 1.0)


@pytest.mark.filterwarnings("ignore:reduction")  # nn.KLDivLoss's default "mean", which the official code uses
def test_js_lra_is_the_official_formula_and_about_js_over_c() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(32, 10) * 3, torch.randn(32, 10) * 3
    assert float(adv_loss(s, t, "js-lra", 3.0)) == pytest.approx(float(_official_js(s, t)), rel=1e-6)
    assert float(js_lra(s, t)) == pytest.approx(float(js_lra(t, s)), rel=1e-6), "symmetric"
    from fedkd.distill import js_divergence

    ratio = float(js_lra(s, t)) / float(js_divergence(s, t, 3.0))
    assert 0.05 < ratio < 0.2, f"about 1/C, got {ratio}"


def test_lra_official_preset_scales_the_entropy_term_to_log10() -> None:
    """The official term 5 · Σ p̄ log10 p̄ and the preset's ie weight on fedkd's ie (nats) have equal gradients."""
    preset = PRESETS.get("lra-official")
    assert preset.adv_metric == "js-lra" and preset.temperature == 3.0
    assert preset.weights["oh"] == 1.0 and preset.weights["act"] == 0.1 and preset.weights["adv"] == 1.0
    logits = torch.randn(16, 10, requires_grad=True)
    p = F.softmax(logits, 1).mean(0)
    (g_official,) = torch.autograd.grad(5 * (p * torch.log10(p)).sum(), logits)
    (g_ours,) = torch.autograd.grad(preset.weights["ie"] * ie_loss(logits), logits)
    assert torch.allclose(g_official, g_ours, atol=1e-7)


# --------------------------------------------------------------------------- the student's schedule


def test_cosine_schedule_is_torchs_cosine_annealing_stepped_per_epoch() -> None:
    cfg = load_config(None, ["distill.lr=0.1", "distill.lr-schedule=cosine", "dfkd.epochs=8"])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    for epoch in range(1, 9):
        assert student_lr(cfg, epoch) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        opt.step()
        sched.step()
    const = load_config(None, ["distill.lr=0.1"])
    assert {student_lr(const, e) for e in (1, 5, 20)} == {0.1}


# --------------------------------------------------------------------------- the collapse probe


class _Gen(nn.Module):
    """A 'generator' of 8×8 images: constant (collapsed) or the noise itself reshaped."""

    latent_dim, num_classes, conditional = 64, 10, False

    def __init__(self, constant: bool) -> None:
        super().__init__()
        self.constant = constant
        self.bn = nn.BatchNorm1d(64)
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.bn(z) * self.w
        return (torch.zeros_like(h) if self.constant else h).view(-1, 1, 8, 8)


class _Teacher(nn.Module):
    """Predicts class 3 for everything (constant) or the sign pattern of the first pixels."""

    def __init__(self, constant: bool) -> None:
        super().__init__()
        self.constant = constant

    def forward(self, x: Tensor) -> Tensor:
        if self.constant:
            return torch.zeros(len(x), 10).index_fill_(1, torch.tensor([3]), 10.0)
        return x.flatten(1)[:, :10] * 10


def test_the_probe_flags_a_collapsed_generator_and_touches_nothing() -> None:
    cfg = load_config(None, [])
    real = torch.randn(64, 1, 8, 8)
    for constant in (False, True):
        gen = _Gen(constant)
        synth = Synthesizer(gen, PRESETS.get("dfad"), 16, seed=3)
        probe = CollapseProbe(synth, real, seed=0)
        rng_before, bn_before = synth._rng.get_state(), gen.bn.running_mean.clone()
        stats = probe.measure(_Teacher(constant))
        assert torch.equal(synth._rng.get_state(), rng_before), "no noise drawn from the synthesizer's stream"
        assert torch.equal(gen.bn.running_mean, bn_before), "no BatchNorm statistics updated"
        assert collapsed(stats, cfg) == constant
        if constant:
            assert stats["diversity"] == 0.0 and stats["class_entropy"] < 0.01
        else:
            assert 0.5 < stats["diversity"] < 2.0 and stats["class_entropy"] > 0.9
    assert mean_pairwise_distance(torch.ones(5, 3)) == 0.0
    off = load_config(None, ["dfkd.collapse-entropy=0", "dfkd.collapse-diversity=0"])
    assert not collapsed({"class_entropy": 0.0, "diversity": 0.0}, off)
