"""Generator objectives: term fixtures, BN hooks, presets, weights, and the Synthesizer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from fedkd.distill import EnsembleTeacher
from fedkd.errors import ConfigError
from fedkd.models import build_model
from fedkd.synthesis import (
    PRESETS,
    BNStatistics,
    Objective,
    Synthesizer,
    act_loss,
    adv_loss,
    build_generator,
    div_loss,
    ie_loss,
    make_objective,
    oh_loss,
    parse_weights,
    tv_loss,
)

# --------------------------------------------------------------------------- term fixtures


def test_oh_toward_label_or_argmax() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    lse = [math.log(math.exp(2) + 1), math.log(1 + math.e)]
    # toward y = (1, 1): −log p(1)
    assert oh_loss(logits, torch.tensor([1, 1])).item() == pytest.approx(((lse[0] - 0) + (lse[1] - 1)) / 2, abs=1e-6)
    # toward the argmax (0, 1)
    assert oh_loss(logits).item() == pytest.approx(((lse[0] - 2) + (lse[1] - 1)) / 2, abs=1e-6)


def test_ie_is_zero_when_balanced_and_log_c_when_collapsed() -> None:
    balanced = torch.eye(4) * 50
    assert ie_loss(balanced).item() == pytest.approx(0.0, abs=1e-6)
    collapsed = torch.tensor([[50.0, 0.0, 0.0, 0.0]] * 3)
    assert ie_loss(collapsed).item() == pytest.approx(math.log(4), abs=1e-5)
    # p̄ = (3/4, 1/4, 0, 0): log 4 − H
    half = torch.tensor([[50.0, 0, 0, 0]] * 3 + [[0, 50.0, 0, 0]])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert ie_loss(half).item() == pytest.approx(math.log(4) - h, abs=1e-5)


def test_act_and_adv_fixtures() -> None:
    assert act_loss(torch.tensor([[1.0, -3.0], [0.0, 2.0]])).item() == pytest.approx(-1.5)
    s, t = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 2.0]])
    assert adv_loss(s, t, "l1").item() == pytest.approx(-1.0)
    # JS at T = 3 of logits (3 ln 3, 0) and (0, 0): see the fixture in test_distill
    s3, t3 = torch.tensor([[3 * math.log(3.0), 0.0]]), torch.zeros(1, 2)
    assert adv_loss(s3, t3, "js", 3.0).item() == pytest.approx(1 - 0.0338220, abs=1e-6)
    with pytest.raises(ConfigError):
        adv_loss(s, t, "l2")


def test_div_is_the_official_bounded_form() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 3.0]])  # pairwise mean |Δx|: 2 off the diagonal
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # pairwise mean (Δz)²: 1
    # exp(−mean over the 2×2 pairs of d_z · d_x) = exp(−(2 + 2) / 4)
    assert div_loss(x, z).item() == pytest.approx(math.exp(-1.0))
    assert div_loss(x[:1], z[:1]).item() == pytest.approx(1.0)
    assert div_loss(2 * x, z).item() < div_loss(x, z).item()  # more spread, lower loss


def test_div_is_bounded_on_a_collapsing_generator() -> None:
    """The old 1/(ratio + ε) form reached ~1e5 when samples collapse; this one stays in (0, 1]."""
    torch.manual_seed(0)
    z = torch.randn(64, 100)
    for spread in (0.0, 1e-8, 1e-3, 1.0, 1e3):
        x = spread * torch.randn(64, 1, 8, 8)
        v = div_loss(x, z).item()
        assert 0.0 <= v <= 1.0
    assert div_loss(torch.zeros(64, 1, 8, 8), z).item() == pytest.approx(1.0)


def test_tv_is_deepinversions_l2_prior_over_the_batch() -> None:
    x = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])  # right: √2, down: 0, the two diagonals: 1 each
    assert tv_loss(x).item() == pytest.approx(math.sqrt(2) + 2, abs=1e-6)
    # one norm over the whole batch (the official reduction): 4 copies give 2x, not 4x or 1x
    assert tv_loss(x.repeat(4, 1, 1, 1)).item() == pytest.approx(2 * (math.sqrt(2) + 2), abs=1e-5)
    assert tv_loss(torch.full((3, 2, 5, 5), 0.7)).item() == pytest.approx(0.0, abs=1e-6)
    # each direction counts: the transpose has the same value, a checkerboard is the worst
    assert tv_loss(x.transpose(2, 3)).item() == pytest.approx(tv_loss(x).item(), abs=1e-6)
    board = (torch.arange(16).view(4, 4) % 2 + torch.arange(16).view(4, 4) // 4 % 2) % 2
    smooth = torch.linspace(0, 1, 16).view(1, 1, 4, 4)
    assert tv_loss(board.float().view(1, 1, 4, 4)).item() > tv_loss(smooth).item()
    with pytest.raises(ConfigError, match="'tv' needs image samples"):
        tv_loss(torch.zeros(4, 16))


def test_tv_steps_smooth_the_generators_samples() -> None:
    torch.manual_seed(0)
    gen = build_generator("image", (1, 8, 8), 10, latent_dim=8, base_channels=4)
    synth = Synthesizer(gen, make_objective("none", "tv=1"), batch_size=16, lr=1e-2, seed=0)
    teacher = build_model("lenet5", (1, 8, 8), 10).eval()
    synth.check(teacher)
    first = synth.step(teacher)["g_tv"]
    for _ in range(30):
        last = synth.step(teacher)["g_tv"]
    assert last < 0.5 * first


def test_bn_statistics_fixture_and_hooks_are_removed() -> None:
    bn = nn.BatchNorm1d(2).eval()
    bn.running_mean.copy_(torch.tensor([1.0, 0.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0]))
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # batch mean (1, 2), biased var (1, 1)
    model = nn.Sequential(bn)
    with BNStatistics(model) as stats:
        assert len(bn._forward_hooks) == 1
        model(x)
        expected = math.hypot(0.0, 2.0) + math.hypot(0.0, -3.0)
        assert stats.loss.item() == pytest.approx(expected)
    assert len(bn._forward_hooks) == 0
    with pytest.raises(RuntimeError), BNStatistics(model):
        model(torch.zeros(2, 5))  # wrong width: the forward raises inside the context
    assert len(bn._forward_hooks) == 0


# --------------------------------------------------------------------------- presets and weights


def test_presets_are_the_papers() -> None:
    assert {"adi", "dafl", "dfad", "lra", "none"} <= set(PRESETS.names())  # strategies may add their own
    assert PRESETS.get("dafl").active == {"oh": 1.0, "ie": 5.0, "act": 0.1}
    dfad = PRESETS.get("dfad")
    assert dfad.active == {"adv": 1.0} and dfad.adv_metric == "l1"
    adi = PRESETS.get("adi")
    assert adi.active == {"oh": 1.0, "bn": 1.0, "adv": 1.0}
    lra = PRESETS.get("lra")
    assert lra.active == {"oh": 1.0, "ie": 5.0, "act": 0.1, "adv": 1.0}
    assert lra.adv_metric == "js" and lra.temperature == 3.0


def test_weights_parse_override_and_reject() -> None:
    assert parse_weights(" oh=1, adv = 0.5 ,") == {"oh": 1.0, "adv": 0.5}
    obj = make_objective("dfad", "div=0.5,adv=0")
    assert obj.active == {"div": 0.5}
    assert make_objective("lra", adv_metric="l1", temperature=2.0).adv_metric == "l1"
    with pytest.raises(ConfigError, match="synthesis.weights: unknown term 'foo'; valid: oh, ie, act, bn, adv, div"):
        parse_weights("foo=1")
    with pytest.raises(ConfigError, match="synthesis.weights: the weight of 'oh' must be ≥ 0, got -1"):
        parse_weights("oh=-1")
    with pytest.raises(ConfigError, match="TERM=WEIGHT"):
        parse_weights("oh")
    with pytest.raises(ConfigError, match="unknown synthesis preset 'dfkd'"):
        make_objective("dfkd")
    with pytest.raises(ConfigError, match="no term"):
        make_objective("none")
    with pytest.raises(ConfigError):
        Objective({"oh": -1.0})
    with pytest.raises(ConfigError):
        Objective({"xx": 1.0})


# --------------------------------------------------------------------------- the synthesizer


class _Forbidden(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise AssertionError("the student must not run when adv has no weight")


def _setup(
    preset: str, teacher_name: str = "lenet5", weights: str = "", conditional: bool = False
) -> tuple[Synthesizer, nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = build_model(teacher_name, (1, 8, 8), 10).eval()
    student = build_model("lenet5-half", (1, 8, 8), 10)
    gen = build_generator("image", (1, 8, 8), 10, latent_dim=8, base_channels=4, conditional=conditional)
    return Synthesizer(gen, make_objective(preset, weights), batch_size=16, lr=1e-2, seed=0), teacher, student


@pytest.mark.parametrize("preset", ["dafl", "dfad", "lra"])
def test_step_logs_every_active_term_and_only_moves_the_generator(preset: str) -> None:
    synth, teacher, student = _setup(preset, weights="div=0.1")
    synth.check(teacher, student)
    before = [p.detach().clone() for p in synth.generator.parameters()]
    t_before = [p.detach().clone() for p in teacher.parameters()]
    stats = synth.step(teacher, student)
    assert set(stats) == {"g_loss"} | {f"g_{t}" for t in synth.objective.active}
    weighted = sum(w * stats[f"g_{t}"] for t, w in synth.objective.active.items())
    assert stats["g_loss"] == pytest.approx(weighted, rel=1e-5, abs=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(before, synth.generator.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(t_before, teacher.parameters()))
    assert all(p.grad is None for p in (*teacher.parameters(), *student.parameters()))


def test_tv_joins_a_preset_and_is_logged() -> None:
    synth, teacher, student = _setup("dfad", weights="tv=1e-3")
    synth.check(teacher, student)
    stats = synth.step(teacher, student)
    assert set(stats) == {"g_loss", "g_adv", "g_tv"} and stats["g_tv"] > 0
    assert stats["g_loss"] == pytest.approx(stats["g_adv"] + 1e-3 * stats["g_tv"], rel=1e-5, abs=1e-6)


def test_zero_weight_skips_the_term() -> None:
    synth, teacher, _ = _setup("lra", weights="adv=0")
    stats = synth.step(teacher, _Forbidden())
    assert "g_adv" not in stats and set(stats) == {"g_loss", "g_oh", "g_ie", "g_act"}


def test_bn_term_uses_the_teachers_bn_layers_and_removes_hooks() -> None:
    synth, teacher, student = _setup("adi", teacher_name="resnet8")
    synth.check(teacher, student)
    stats = synth.step(teacher, student)
    assert stats["g_bn"] > 0
    assert all(len(m._forward_hooks) == 0 for m in teacher.modules())
    teacher.train()
    with pytest.raises(ValueError, match="eval mode"):
        synth.step(teacher, student)
    assert all(len(m._forward_hooks) == 0 for m in teacher.modules())


def test_check_rejects_terms_the_models_cannot_serve() -> None:
    synth, teacher, student = _setup("adi")
    with pytest.raises(ConfigError, match="'bn' needs a teacher with BatchNorm"):
        synth.check(teacher, student)
    synth, teacher, _ = _setup("dfad")
    with pytest.raises(ConfigError, match="'adv' needs a student"):
        synth.check(teacher)


def test_feature_space_synthesis_with_an_ensemble_of_heads_fedgen_style() -> None:
    """FedGen: G(z | y) in feature space, teacher = class-weighted ensemble of client heads."""
    torch.manual_seed(0)
    heads = [nn.Linear(16, 4) for _ in range(3)]
    counts = torch.tensor([[50, 50, 0, 0], [0, 50, 50, 0], [0, 0, 50, 50]])
    teacher = EnsembleTeacher(heads, counts).eval().requires_grad_(False)
    gen = build_generator("feature", (16,), 4, latent_dim=8, hidden_dim=32)
    prior = counts.sum(0).float()
    synth = Synthesizer(gen, make_objective("none", "oh=1,div=1"), batch_size=64, lr=1e-2, label_prior=prior, seed=1)
    synth.check(teacher)
    first = synth.step(teacher)
    for _ in range(40):
        last = synth.step(teacher)
    assert last["g_oh"] < 0.5 * first["g_oh"]
    x, y = synth.source()()
    assert x.shape == (64, 16) and y is not None and set(y.tolist()) <= {0, 1, 2, 3}
    with pytest.raises(ConfigError, match="'act' needs a teacher with features"):
        Synthesizer(gen, make_objective("dafl"), batch_size=4).check(teacher)
    with pytest.raises(ConfigError, match="'tv' needs a generator of images"):
        Synthesizer(gen, make_objective("none", "oh=1,tv=1"), batch_size=4).check(teacher)


def test_label_prior_and_seeded_sampling() -> None:
    gen = build_generator("image", (1, 8, 8), 10, latent_dim=4, base_channels=2, conditional=True)
    prior = torch.zeros(10)
    prior[3] = 1.0
    synth = Synthesizer(gen, make_objective("dafl"), batch_size=8, label_prior=prior, seed=5)
    with torch.no_grad():
        _, y, z = synth.sample()
    assert y is not None and set(y.tolist()) == {3}
    again = Synthesizer(gen, make_objective("dafl"), batch_size=8, label_prior=prior, seed=5)
    with torch.no_grad():
        _, _, z2 = again.sample()
    assert torch.equal(z, z2)
    with pytest.raises(ConfigError, match="label prior"):
        Synthesizer(gen, make_objective("dafl"), batch_size=8, label_prior=torch.zeros(10))
    with pytest.raises(ConfigError):
        Synthesizer(gen, make_objective("dafl"), batch_size=0)
