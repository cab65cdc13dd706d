"""Contract tests over every registered generator, plus the built-ins' specifics."""

from __future__ import annotations

import inspect

import pytest
import torch

from fedkd.config import declared_defaults, load_config, plugin_params
from fedkd.errors import ConfigError
from fedkd.synthesis import build_generator
from generators import GENERATORS

IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


def _shapes(name: str) -> list[tuple[int, ...]]:
    space = getattr(GENERATORS.get(name), "space", None)
    assert space in ("input", "feature"), f"generator {name!r} must declare space = 'input' or 'feature'"
    return IMAGE_SHAPES if space == "input" else [(32,), (84,)]


@pytest.mark.parametrize("name", GENERATORS.names())
def test_contract(name: str) -> None:
    cls = GENERATORS.get(name)
    sig = inspect.signature(cls)
    assert {"out_shape", "num_classes"} <= set(sig.parameters), "runtime arguments are out_shape and num_classes"
    assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values()), "typed constructor"
    fwd = inspect.signature(cls.forward)
    assert list(fwd.parameters)[1:] == ["z", "y"] and fwd.parameters["y"].default is None
    for shape in _shapes(name):
        torch.manual_seed(0)
        gen = build_generator(name, shape, 10)
        assert isinstance(gen, torch.nn.Module)
        assert gen.latent_dim >= 1 and gen.num_classes == 10 and isinstance(gen.conditional, bool)
        z = torch.randn(6, gen.latent_dim)
        y = torch.randint(0, 10, (6,)) if gen.conditional else None
        out = gen(z, y)
        assert out.shape == (6, *shape) and out.dtype == torch.float32 and torch.isfinite(out).all()
        grads = torch.autograd.grad(
            out.square().mean(), [p for p in gen.parameters() if p.requires_grad], allow_unused=True
        )
        assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) >= len(grads) - 1
        torch.manual_seed(0)
        assert torch.equal(build_generator(name, shape, 10)(z, y), out), "seeded construction is deterministic"
    # every configurable parameter becomes a generator.<name>.<param> key; runtime ones do not
    keys = plugin_params("generator", name)
    assert "out-shape" not in keys and "num-classes" not in keys
    defaults = declared_defaults()
    assert all(f"generator.{name}.{k}" in defaults for k in keys)
    cfg = load_config(None, [f"generator.name={name}"])
    assert build_generator(name, _shapes(name)[0], 10, **cfg.plugin_kwargs("generator", name)) is not None


def test_image_generator_outputs_standardized_normalized_inputs() -> None:
    torch.manual_seed(0)
    gen = build_generator("image", (3, 32, 32), 10, latent_dim=16, base_channels=8).train()
    x = gen(torch.randn(64, 16))
    per_channel_mean = x.mean(dim=(0, 2, 3))
    per_channel_std = x.std(dim=(0, 2, 3))
    assert torch.allclose(per_channel_mean, torch.zeros(3), atol=1e-4)
    assert torch.allclose(per_channel_std, torch.ones(3), atol=1e-2)


def test_image_generator_conditioning() -> None:
    torch.manual_seed(0)
    cond = build_generator("image", (1, 28, 28), 10, latent_dim=8, base_channels=4, conditional=True).eval()
    z = torch.randn(4, 8)
    a, b = cond(z, torch.zeros(4, dtype=torch.long)), cond(z, torch.ones(4, dtype=torch.long))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="needs labels"):
        cond(z)
    plain = build_generator("image", (1, 28, 28), 10, latent_dim=8, base_channels=4)
    with pytest.raises(ValueError, match="unconditional"):
        plain(z, torch.zeros(4, dtype=torch.long))
    assert build_generator("image", (1, 7, 9), 10, latent_dim=8, base_channels=4)(z).shape == (4, 1, 7, 9)


def test_feature_generator_is_fedgens_mlp() -> None:
    gen = build_generator("feature", (32,), 10)
    assert gen.latent_dim == 32 and gen.conditional
    first = gen.hidden[0]
    assert isinstance(first, torch.nn.Linear) and first.in_features == 32 + 10 and first.out_features == 256
    assert gen.out.out_features == 32
    with pytest.raises(ValueError, match="label-conditional"):
        gen(torch.randn(2, 32))


@pytest.mark.parametrize(
    ("name", "shape", "kwargs"),
    [
        ("image", (28, 28), {}),
        ("image", (1, 8, 8), {"latent_dim": 0}),
        ("feature", (1, 8, 8), {}),
        ("feature", (8,), {"hidden_dim": 0}),
    ],
)
def test_bad_construction_is_a_config_error(name: str, shape: tuple[int, ...], kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        build_generator(name, shape, 10, **kwargs)


def test_unknown_generator_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="unknown generator 'gan'; valid: feature, image"):
        load_config(None, ["generator.name=gan"])
    with pytest.raises(ConfigError, match="generator 'image' takes"):
        load_config(None, ["generator.image.out-shape=3"])
