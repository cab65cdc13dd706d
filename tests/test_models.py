"""Contract tests over every registered model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedkd import records
from fedkd.models import MODELS, FedkdModel, build_model

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_features_classifier(name, shape):
    torch.manual_seed(0)
    m = build_model(name, shape, 7)
    assert isinstance(m, FedkdModel)
    assert isinstance(m.classifier, nn.Linear)
    x = torch.randn(3, *shape)
    h = m.features(x)
    assert h.shape == (3, m.feature_dim)
    out = m(x)
    assert out.shape == (3, 7)
    assert torch.allclose(out, m.classifier(h))
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("name", MODELS.names())
def test_feature_dim_is_configurable(name):
    m = build_model(name, (1, 28, 28), 10, feature_dim=32)
    assert m.features(torch.randn(2, 1, 28, 28)).shape == (2, 32)
    assert m.classifier.in_features == 32


@pytest.mark.parametrize("name", MODELS.names())
def test_arrayrecord_roundtrip_is_exact(name):
    torch.manual_seed(1)
    a = build_model(name, (1, 28, 28), 10)
    a.train()(torch.randn(4, 1, 28, 28))  # moves BN running stats
    torch.manual_seed(2)
    b = build_model(name, (1, 28, 28), 10)
    records.load_record(b, records.to_record(a))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_bn_layers_are_reachable():
    for name in ("resnet8", "mobilenetv2"):
        m = build_model(name, (3, 32, 32), 10)
        assert any(isinstance(x, nn.BatchNorm2d) for x in m.modules())


def test_lenet5_half_is_half():
    full = sum(p.numel() for p in build_model("lenet5", (1, 28, 28), 10).parameters())
    half = sum(p.numel() for p in build_model("lenet5-half", (1, 28, 28), 10).parameters())
    assert half < full / 3
