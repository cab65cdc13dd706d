"""Speed options of server distillation (issue 12): same results, less work.

- same-architecture ensemble members as one vmapped call (``ensemble-vmap``) give the loop's
  logits, features and input gradients, rebuild their stacked weights when a member changes,
  and fall back to the loop in training mode;
- ``autocast = bf16`` returns float32 logits close to the float32 ones;
- teacher targets come from ``torch.inference_mode`` yet can enter a loss's backward pass;
- a FedFTG round with the vmapped ensemble equals the round without it (float tolerance).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from fedkd import distill
from fedkd.distill import EnsembleTeacher, kd_loss, targets_of
from fedkd.errors import ConfigError
from fedkd.models import build_model
from tests.test_kd_strategies import _Grid, federation, initial_state, replies, strategy

pytestmark = pytest.mark.usefixtures("task_identity")

SHAPE = (1, 8, 8)


def members() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    out = [build_model(a, SHAPE, 10) for a in ("cnn-bn", "cnn-bn", "cnn-bn", "lenet5", "lenet5", "mlp")]
    for m in out:  # non-trivial BatchNorm statistics, so that eval mode reads them
        for b in m.buffers():
            if b.dtype.is_floating_point:
                b.uniform_(0.5, 1.5)
        m.eval().requires_grad_(False)
    return out


def test_vmapped_members_equal_the_loop_in_logits_features_and_input_gradients(monkeypatch):
    ms = members()
    counts = torch.randint(0, 6, (len(ms), 10))
    loop = EnsembleTeacher(ms, counts, average="probs").eval()
    fast = EnsembleTeacher(ms, counts, average="probs").set_speed(vmap=True).eval()
    calls = [0]
    real = distill._Stack.__call__

    def counting(self, x, features):
        calls[0] += 1
        return real(self, x, features)

    monkeypatch.setattr(distill._Stack, "__call__", counting)
    x = torch.randn(16, *SHAPE, requires_grad=True)
    y = torch.randint(0, 10, (16,))
    a, b = loop(x, y), fast(x, y)
    assert calls[0] == 2, "the cnn-bn and lenet5 groups run vmapped; the lone mlp does not"
    assert torch.allclose(a, b, atol=1e-5)
    ga, gb = torch.autograd.grad(a.sum(), x)[0], torch.autograd.grad(b.sum(), x)[0]
    assert torch.allclose(ga, gb, atol=1e-6), "the generator's gradient through the teacher is the same"
    (la, fa), (lb, fb) = loop.forward_features(x, y), fast.forward_features(x, y)
    assert fa is not None and fb is not None and fa.shape == fb.shape
    assert torch.allclose(la, lb, atol=1e-5) and torch.allclose(fa, fb, atol=1e-5)


def test_vmapped_stacks_follow_member_changes_and_training_mode_falls_back():
    ms = members()
    fast = EnsembleTeacher(ms).set_speed(vmap=True).eval()
    x = torch.randn(8, *SHAPE)
    fast(x)
    first = fast._stacks
    with torch.no_grad():
        next(ms[0].parameters()).add_(0.5)  # a member changed in place: the stack must follow
    assert torch.allclose(fast(x), EnsembleTeacher(ms).eval()(x), atol=1e-5)
    assert fast._stacks is not first
    fast.train()
    assert fast._vmapped_stacks(False) == [], "training-mode BatchNorm runs one member at a time"


def test_bf16_autocast_returns_float32_close_to_float32():
    ms = members()
    ref = EnsembleTeacher(ms).eval()(torch.ones(4, *SHAPE))
    out = EnsembleTeacher(ms).set_speed(autocast=torch.bfloat16).eval()(torch.ones(4, *SHAPE))
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-3
    assert not torch.equal(out, ref), "the members really ran in bf16"


def test_inference_mode_targets_can_enter_a_backward_pass():
    teacher = EnsembleTeacher(members()).eval()
    x = torch.randn(8, *SHAPE)
    t = targets_of(teacher, x)
    assert not t.is_inference() and not t.requires_grad
    student = build_model("mlp", SHAPE, 10)
    for name in ("l1", "kl", "js"):
        kd_loss(name)(student(x), t).backward()  # would raise on an inference tensor saved for backward
    assert all(p.grad is not None for p in student.parameters())


def test_a_fedftg_round_with_the_vmapped_ensemble_equals_the_loop(reply):
    results = {}
    for mode in ("off", "on"):
        s = strategy("fedftg", "strategy.fedftg.iterations=2", "strategy.fedftg.student-steps=2",
                     f"strategy.fedftg.ensemble-vmap={mode}")  # fmt: skip
        state = initial_state(federation())
        s.configure_train(1, state, ConfigRecord(), _Grid())
        arrays, _ = s.aggregate_train(1, replies(reply))
        assert arrays is not None
        results[mode] = {k: v.numpy().copy() for k, v in arrays.items()}
    for k in results["off"]:
        np.testing.assert_allclose(results["on"][k], results["off"][k], atol=1e-4, err_msg=k)


@pytest.mark.parametrize("key,value", [("ensemble-vmap", "sometimes"), ("autocast", "fp8")])
def test_bad_speed_options_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=key):
        strategy("fedftg", f"strategy.fedftg.{key}={value}")
