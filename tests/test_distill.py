"""KD losses (numeric fixtures), ensembles, the memory buffer and the student update rules.

The LRA tests are the point of this file: (a) the retention term really moves the student
(the official code's ``higher`` default loses it), and (b) the second-order update equals
replay plus the gradient-alignment correction, checked against closed forms.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedkd.config import CORE_KEYS
from fedkd.distill import (
    KD_LOSSES,
    UPDATE_RULES,
    Batch,
    EnsembleTeacher,
    LRARule,
    MemoryBuffer,
    PlainRule,
    ReplayRule,
    StudentUpdater,
    build_rule,
    js_divergence,
    kd_kl,
    kd_l1,
    kd_loss,
    logits_and_features,
    teacher_logits,
)
from fedkd.errors import ConfigError
from fedkd.models import build_model

torch.set_default_dtype(torch.float32)


# --------------------------------------------------------------------------- (c) KD loss fixtures


def test_l1_fixture() -> None:
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 2.0, 5.0], [1.0, -1.0, 1.0]])
    # (1 + 0 + 2 + 1 + 1 + 1) / 6
    assert kd_l1(s, t).item() == pytest.approx(1.0)
    assert kd_l1(s, t, temperature=7.0).item() == pytest.approx(1.0)  # T is ignored


def test_kl_fixture_with_temperature() -> None:
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    # T = 1: p_t = (3/4, 1/4), p_s = (1/2, 1/2)
    kl1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_kl(s, t, 1.0).item() == pytest.approx(kl1, abs=1e-6)
    assert kl1 == pytest.approx(0.1308120, abs=1e-6)
    # T = 2: p_t = (√3, 1) / (√3 + 1), and the loss is multiplied by T² = 4
    a, b = math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)
    kl2 = a * math.log(a / 0.5) + b * math.log(b / 0.5)
    assert kd_kl(s, t, 2.0).item() == pytest.approx(4 * kl2, abs=1e-6)
    assert 4 * kl2 == pytest.approx(0.1453631, abs=1e-6)


def test_kl_is_batch_mean() -> None:
    s = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    assert kd_kl(s, t).item() == pytest.approx(0.1308120 / 2, abs=1e-6)


def test_js_fixture() -> None:
    s = torch.tensor([[math.log(3.0), 0.0]])  # p = (3/4, 1/4)
    t = torch.tensor([[0.0, 0.0]])  # q = (1/2, 1/2); m = (5/8, 3/8)
    kl_pm = 0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)
    kl_qm = 0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)
    expected = 0.5 * (kl_pm + kl_qm)
    assert expected == pytest.approx(0.0338220, abs=1e-6)
    assert js_divergence(s, t).item() == pytest.approx(expected, abs=1e-6)
    assert js_divergence(t, s).item() == pytest.approx(expected, abs=1e-6)  # symmetric
    # temperature 3 on logits (3 ln 3, 0) gives the same distributions
    assert js_divergence(3 * s, 3 * t, 3.0).item() == pytest.approx(expected, abs=1e-6)


def test_js_bounds() -> None:
    x = torch.randn(5, 4)
    assert js_divergence(x, x).item() == pytest.approx(0.0, abs=1e-7)
    far = torch.tensor([[60.0, -60.0]])
    assert js_divergence(far, -far).item() == pytest.approx(math.log(2), abs=1e-6)


def test_kd_loss_registry_and_config_agree() -> None:
    assert set(KD_LOSSES.names()) == {"kl", "ce", "l1", "js"}
    choices = {k.name: k.choices for k in CORE_KEYS}
    assert set(choices["distill.loss"] or ()) == set(KD_LOSSES.names())
    assert set(choices["distill.rule"] or ()) == set(UPDATE_RULES.names())
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    assert kd_loss("kl", 2.0)(s, t).item() == pytest.approx(kd_kl(s, t, 2.0).item())
    with pytest.raises(ConfigError, match="unknown KD loss 'mse'; valid: ce, js, kl, l1"):
        kd_loss("mse")
    with pytest.raises(ConfigError, match="temperature"):
        kd_loss("kl", 0.0)


# --------------------------------------------------------------------------- ensembles


class _Const(nn.Module):
    """A 'model' returning fixed logits: features are those logits, the classifier is the identity."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("out", torch.tensor(logits))
        self.classifier = nn.Identity()

    def features(self, x: Tensor) -> Tensor:
        return self.out.expand(x.shape[0], -1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def test_uniform_ensemble_averages_logits() -> None:
    a, b = _Const([2.0, 0.0, 0.0]), _Const([0.0, 4.0, 0.0])
    ens = EnsembleTeacher([a, b])
    out = ens(torch.zeros(2, 1))
    assert torch.allclose(out, torch.tensor([[1.0, 2.0, 0.0]] * 2))
    logits, feats = ens.forward_features(torch.zeros(2, 1))
    assert torch.allclose(logits, out) and feats is not None and feats.shape == (2, 6)


def test_class_level_ensemble_weights_by_label_share() -> None:
    a, b = _Const([2.0, 0.0]), _Const([0.0, 4.0])
    counts = torch.tensor([[30, 10], [10, 0]])  # class 0: 3/4 vs 1/4; class 1: all from a
    ens = EnsembleTeacher([a, b], counts)
    y = torch.tensor([0, 1])
    out = ens(torch.zeros(2, 1), y)
    assert torch.allclose(out[0], 0.75 * torch.tensor([2.0, 0.0]) + 0.25 * torch.tensor([0.0, 4.0]))
    assert torch.allclose(out[1], torch.tensor([2.0, 0.0]))
    # probability averaging: log Σ_k w_k softmax(t_k)
    ensp = EnsembleTeacher([a, b], counts, average="probs")
    p = 0.75 * torch.softmax(torch.tensor([2.0, 0.0]), 0) + 0.25 * torch.softmax(torch.tensor([0.0, 4.0]), 0)
    assert torch.allclose(ensp(torch.zeros(2, 1), y)[0], p.log(), atol=1e-6)
    # no label: each sample takes the uniform ensemble's prediction (class 1 here: logits (1, 2))
    assert torch.allclose(ens(torch.zeros(1, 1)), torch.tensor([[2.0, 0.0]]))
    # teacher_logits routes labels to ensembles only
    assert torch.allclose(teacher_logits(ens, torch.zeros(2, 1), y), out)


def test_class_nobody_holds_falls_back_to_uniform_and_bad_counts_fail() -> None:
    a, b = _Const([2.0, 0.0, 0.0]), _Const([0.0, 4.0, 0.0])
    ens = EnsembleTeacher([a, b], torch.tensor([[1, 0, 0], [0, 1, 0]]))
    assert ens.class_weights is not None
    assert torch.allclose(ens.class_weights[:, 2], torch.tensor([0.5, 0.5]))
    with pytest.raises(ConfigError):
        EnsembleTeacher([a, b], torch.tensor([[1, 0, 0]]))
    with pytest.raises(ConfigError):
        EnsembleTeacher([])


def test_ensemble_of_real_models_and_heads() -> None:
    torch.manual_seed(0)
    models = [build_model("mlp", (1, 8, 8), 10), build_model("lenet5", (1, 8, 8), 10)]
    ens = EnsembleTeacher(models, torch.randint(0, 5, (2, 10)))
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    logits, feats = logits_and_features(ens, x, y)
    assert logits.shape == (4, 10) and feats is not None and feats.shape == (4, 64 + 84)
    heads = EnsembleTeacher(
        [m.classifier for m in (build_model("mlp", (1, 8, 8), 10, 16), build_model("cnn", (1, 8, 8), 10, 16))]
    )
    hl, hf = logits_and_features(heads, torch.randn(4, 16))
    assert hl.shape == (4, 10) and hf is None


# --------------------------------------------------------------------------- memory


def test_memory_push_period_fraction_and_fifo() -> None:
    mem = MemoryBuffer(capacity=10, push_every=2, fraction=0.25, seed=0)
    assert len(mem) == 0 and mem.sample(8) is None
    batches = [torch.full((8, 3), float(i)) for i in range(1, 7)]
    pushed = [mem.observe(b) for b in batches]
    assert pushed == [False, True, False, True, False, True]
    assert len(mem) == 6  # 3 pushes of ⌈0.25 · 8⌉ = 2 samples
    x, y = mem.sample(8)  # type: ignore[misc]
    assert x.shape == (2, 3) and y is None
    for i in range(10):
        mem.push(torch.full((2, 3), 100.0 + i))
    assert len(mem) == 10
    assert mem._x is not None and float(mem._x.min()) == 105.0  # the oldest left first


def test_memory_keeps_labels_and_checks_settings() -> None:
    mem = MemoryBuffer(capacity=4, fraction=1.0)
    mem.push(torch.arange(6.0).view(6, 1), torch.arange(6))
    x, y = mem.sample(4)  # type: ignore[misc]
    assert y is not None and torch.equal(x.view(-1).long(), y)
    with pytest.raises(ValueError):
        mem.push(torch.zeros(1, 1))
    for bad in ({"capacity": 0}, {"capacity": 4, "push_every": -1}, {"capacity": 4, "fraction": 0.0}):
        with pytest.raises(ConfigError):
            MemoryBuffer(**bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- update rules


def _tiny_problem(seed: int = 0, bn: bool = False) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    name = "resnet8" if bn else "mlp"
    student = build_model(name, (1, 8, 8), 10, 16)
    teacher = build_model("lenet5", (1, 8, 8), 10).eval()
    return student, teacher, torch.randn(16, 1, 8, 8), torch.randn(4, 1, 8, 8)


def _step_delta(rule: object, student: nn.Module, teacher: nn.Module, x: Tensor, xm: Tensor, lr: float = 0.1) -> Tensor:
    """Parameter change of one SGD step with a memory holding exactly ``xm``."""
    s = copy.deepcopy(student)
    mem = MemoryBuffer(capacity=len(xm), fraction=len(xm) / len(x))
    mem.push(xm)
    up = StudentUpdater(rule, kd_loss("l1"), mem)  # type: ignore[arg-type]
    before = torch.cat([p.detach().flatten() for p in s.parameters()])
    up.step(s, teacher, torch.optim.SGD(s.parameters(), lr=lr), x)
    return torch.cat([p.detach().flatten() for p in s.parameters()]) - before


@pytest.mark.parametrize("order", ["second-order", "first-order"])
@pytest.mark.parametrize("bn", [False, True])
def test_a_retention_term_changes_the_student(order: str, bn: bool) -> None:
    student, teacher, x, xm = _tiny_problem(bn=bn)
    lra = _step_delta(LRARule(order), student, teacher, x, xm)
    cut = _step_delta(LRARule(order, retention_weight=0.0), student, teacher, x, xm)
    replay = _step_delta(ReplayRule(), student, teacher, x, xm)
    assert torch.allclose(cut, replay, atol=1e-6)  # cut off, LRA is replay
    assert (lra - replay).norm() > 1e-3 * replay.norm()  # the retention term moved θ
    assert lra.norm() > 0


def test_a_the_higher_pitfall_loses_the_retention_gradient() -> None:
    """Emulate ``higher.innerloop_ctx(copy_initial_weights=True)``: θ' starts from a detached copy.

    The retention loss then has no path to the student's θ (gradient None), so the update
    is exactly replay; fedkd's θ' is a function of θ, and its retention gradient is not zero.
    """
    student, teacher, x, xm = _tiny_problem()
    params = dict(student.named_parameters())
    loss = kd_loss("l1")
    with torch.no_grad():
        new, mem = Batch(x, teacher(x)), Batch(xm, teacher(xm))
    copied = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    g = torch.autograd.grad(
        loss(functional_call(student, copied, (x,)), new.target), list(copied.values()), create_graph=True
    )
    adapted_copy = {n: p - 0.9 * gi for (n, p), gi in zip(copied.items(), g)}
    ret_copy = loss(functional_call(student, adapted_copy, (xm,)), mem.target)
    assert all(gr is None for gr in torch.autograd.grad(ret_copy, list(params.values()), allow_unused=True))

    g = torch.autograd.grad(
        loss(functional_call(student, params, (x,)), new.target), list(params.values()), create_graph=True
    )
    adapted = {n: p - 0.9 * gi for (n, p), gi in zip(params.items(), g)}
    ret = loss(functional_call(student, adapted, (xm,)), mem.target)
    grads = torch.autograd.grad(ret, list(params.values()))
    assert sum(float(gr.norm()) for gr in grads) > 1e-3


class _Linear(nn.Module):
    """``logits = x Wᵀ + b`` in float64: small enough to differentiate by hand."""

    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, d, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(c, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T + self.bias


def _mse(s: Tensor, t: Tensor) -> Tensor:
    return ((s - t) ** 2).mean()


def _grad_by_hand(w: Tensor, b: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """∇ of mean((x Wᵀ + b − t)²): with residual R, (2/nc) Rᵀ x and (2/nc) Σ_rows R."""
    r = x @ w.T + b - t
    k = 2.0 / r.numel()
    return k * r.T @ x, k * r.sum(0)


def _hvp_by_hand(x: Tensor, vw: Tensor, vb: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """H v for the same loss: L is quadratic, so H v is the gradient formula at residual δR = x Vᵀ + v_b."""
    dr = x @ vw.T + vb
    k = 2.0 / (x.shape[0] * c)
    return k * dr.T @ x, k * dr.sum(0)


@pytest.mark.parametrize("alpha", [0.9, 0.3])
def test_b_second_order_is_replay_plus_the_alignment_correction(alpha: float) -> None:
    """∇θ[L(θ'; mem) + L(θ; new ∪ mem)] = g_cur + (I − α H_new) g_mem(θ'), by hand.

    First order is g_cur + g_mem(θ'); replay is g_cur. The test fails if the acquisition
    gradient is built without ``create_graph`` (then the −α H_new g_mem(θ') term vanishes).
    """
    torch.manual_seed(1)
    d, c = 5, 3
    model, teacher = _Linear(d, c), _Linear(d, c).requires_grad_(False)
    xn, xm = torch.randn(8, d, dtype=torch.float64), torch.randn(4, d, dtype=torch.float64)
    tn, tm = teacher(xn), teacher(xm)
    new, mem = Batch(xn, tn), Batch(xm, tm)
    w, b = model.weight.detach(), model.bias.detach()

    gw_new, gb_new = _grad_by_hand(w, b, xn, tn)
    w1, b1 = w - alpha * gw_new, b - alpha * gb_new  # θ'
    gw_mem, gb_mem = _grad_by_hand(w1, b1, xm, tm)  # g_mem(θ')
    hw, hb = _hvp_by_hand(xn, gw_mem, gb_mem, c)  # H_new g_mem(θ')
    gw_cur, gb_cur = _grad_by_hand(w, b, torch.cat([xn, xm]), torch.cat([tn, tm]))  # replay

    correction = torch.cat([(gw_mem - alpha * hw).flatten(), gb_mem - alpha * hb])
    replay = torch.cat([gw_cur.flatten(), gb_cur])
    assert float((alpha * torch.cat([hw.flatten(), hb])).norm()) > 0.05  # the Hessian term is not negligible

    params = dict(model.named_parameters())
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    g_replay, _ = ReplayRule().gradients(model, params, _mse, new, mem)
    g_second, stats = LRARule("second-order", alpha).gradients(model, params, _mse, new, mem)
    g_first, _ = LRARule("first-order", alpha).gradients(model, params, _mse, new, mem)
    assert torch.allclose(flat(g_replay), replay, atol=1e-10)
    assert torch.allclose(flat(g_second), replay + correction, atol=1e-10)
    assert torch.allclose(flat(g_first), replay + torch.cat([gw_mem.flatten(), gb_mem]), atol=1e-10)
    assert not torch.allclose(flat(g_second), flat(g_first), atol=1e-3)
    assert stats["ret_loss"] == pytest.approx(float(_mse(xm @ w1.T + b1, tm)))

    # through the public API: one SGD step differs from replay's by −lr · correction
    lr = 0.05
    deltas = {}
    for name, rule in (("replay", ReplayRule()), ("lra", LRARule("second-order", alpha))):
        m = copy.deepcopy(model)
        memory = MemoryBuffer(capacity=4, fraction=0.5)  # replays ⌈0.5 · 8⌉ = all 4 samples
        memory.push(xm)
        StudentUpdater(rule, _mse, memory).step(m, teacher, torch.optim.SGD(m.parameters(), lr=lr), xn)
        deltas[name] = torch.cat([(p - q).detach().flatten() for p, q in zip(m.parameters(), model.parameters())])
    assert torch.allclose(deltas["lra"] - deltas["replay"], -lr * correction, atol=1e-10)


@pytest.mark.parametrize("model_name", ["lenet5-half", "resnet8"])
def test_b_second_minus_first_order_is_the_hessian_term_on_real_models(model_name: str) -> None:
    """On registered models (BN included) the two orders differ by −α H_new g_mem(θ'),
    with H_new g_mem computed independently by torch.autograd.functional.hvp."""
    torch.manual_seed(0)
    student = build_model(model_name, (1, 8, 8), 10).double()
    teacher = build_model("lenet5", (1, 8, 8), 10).double().eval()
    x, xm = torch.randn(12, 1, 8, 8, dtype=torch.float64), torch.randn(4, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        new, mem = Batch(x, teacher(x)), Batch(xm, teacher(xm))
    loss = kd_loss("kl", 2.0)
    alpha = 0.5
    params = {n: p for n, p in student.named_parameters()}
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def unflat(v: Tensor) -> dict[str, Tensor]:
        return {n: t.view(s) for n, t, s in zip(names, v.split(sizes), shapes)}

    theta = torch.cat([p.detach().flatten() for p in params.values()])
    l_new = lambda v: loss(functional_call(student, unflat(v), (x,)), new.target)  # noqa: E731
    l_mem = lambda v: loss(functional_call(student, unflat(v), (xm,)), mem.target)  # noqa: E731
    g_new = torch.autograd.functional.jacobian(l_new, theta)
    g_mem_adapted = torch.autograd.functional.jacobian(l_mem, theta - alpha * g_new)
    _, h_g = torch.autograd.functional.hvp(l_new, theta, g_mem_adapted)

    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    second, _ = LRARule("second-order", alpha).gradients(student, params, loss, new, mem)
    first, _ = LRARule("first-order", alpha).gradients(student, params, loss, new, mem)
    assert float(h_g.norm()) > 1e-3
    assert torch.allclose(flat(second) - flat(first), -alpha * h_g, atol=1e-8, rtol=1e-6)


def test_lra_without_memory_is_a_plain_step_and_stats_keys_are_stable() -> None:
    student, teacher, x, _ = _tiny_problem()
    params = dict(student.named_parameters())
    with torch.no_grad():
        new = Batch(x, teacher(x))
    loss = kd_loss("l1")
    g_plain, s_plain = PlainRule().gradients(student, params, loss, new, None)
    g_lra, s_lra = LRARule().gradients(student, params, loss, new, None)
    assert all(torch.allclose(a, b) for a, b in zip(g_plain, g_lra))
    assert set(s_lra) == {"kd_loss", "ret_loss"} and math.isnan(s_lra["ret_loss"])
    assert s_plain["kd_loss"] == pytest.approx(s_lra["kd_loss"])


def test_updater_needs_memory_runs_k_steps_and_learns() -> None:
    torch.manual_seed(0)
    student, teacher, x, _ = _tiny_problem()
    with pytest.raises(ConfigError, match="memory"):
        StudentUpdater(ReplayRule(), kd_loss("l1"))
    mem = MemoryBuffer(capacity=32, push_every=2, fraction=0.25)
    up = StudentUpdater(build_rule("lra", order="first-order", alpha=0.1), kd_loss("l1"), mem)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    source = lambda: (x, None)  # noqa: E731
    first = up.run(student, teacher, opt, source, steps=4)
    assert len(mem) == 2 * 4  # 2 pushes of ⌈0.25 · 16⌉
    last = up.run(student, teacher, opt, source, steps=20)
    assert set(first) == set(last) == {"kd_loss", "ret_loss"}
    assert last["kd_loss"] < 0.5 * first["kd_loss"]
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_build_rule_passes_only_accepted_options_and_rejects_bad_ones() -> None:
    assert isinstance(build_rule("plain", order="first-order", alpha=0.5), PlainRule)
    rule = build_rule("lra", order="first-order", alpha=0.5)
    assert isinstance(rule, LRARule) and rule.order == "first-order" and rule.alpha == 0.5
    with pytest.raises(ConfigError, match="unknown update rule 'sgd'; valid: lra, lra-official, plain, replay"):
        build_rule("sgd")
    with pytest.raises(ConfigError, match="order"):
        LRARule("third-order")
    with pytest.raises(ConfigError):
        LRARule(alpha=-1.0)
