from __future__ import annotations

import pytest

from fedkd.errors import ConfigError
from fedkd.registry import Registry, configurable_params


def test_register_get_build_names():
    reg: Registry = Registry("widget")

    @reg.register("b")
    def make_b(x: int = 1) -> int:
        return x * 2

    reg.add("a", lambda: "a")
    assert reg.names() == ["a", "b"]
    assert reg.get("b") is make_b
    assert reg.build("b", x=4) == 8
    assert "a" in reg and "zzz" not in reg


def test_unknown_name_lists_valid_ones():
    reg: Registry = Registry("widget")
    reg.add("alpha", object)
    reg.add("beta", object)
    with pytest.raises(ConfigError, match=r"unknown widget 'gamma'; valid: alpha, beta"):
        reg.get("gamma")


def test_duplicate_name_is_an_error_listing_names():
    reg: Registry = Registry("widget")
    reg.add("alpha", object)
    with pytest.raises(ValueError, match="duplicate widget name 'alpha'.*alpha"):
        reg.add("alpha", int)


def test_configurable_params_keeps_plain_defaults_only():
    def f(a, b: int = 1, c: str = "x", d=None, e: float = 0.5, *args, g: bool = True, **kw):  # noqa: ANN001
        return None

    assert list(configurable_params(f, exclude={"e"})) == ["b", "c", "g"]


def test_every_builtin_registry_is_populated():
    from fedkd.data import DATASETS, PARTITIONERS
    from fedkd.models import MODELS
    from strategies import STRATEGIES

    assert {"mnist5k", "digits", "mnist", "fashion-mnist", "emnist", "cifar10", "cifar100", "svhn"} <= set(
        DATASETS.names()
    )
    assert {"iid", "dirichlet", "pathological", "shards", "quantity-skew"} <= set(PARTITIONERS.names())
    assert {"mlp", "lenet5", "lenet5-half", "cnn", "resnet8", "mobilenetv2"} <= set(MODELS.names())
    assert {"fedavg", "fedprox", "fedavgm", "fedadam"} <= set(STRATEGIES.names())
