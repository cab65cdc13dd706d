"""Model zoo: CPU-friendly classifiers split into ``features`` and ``classifier``.

Every model takes ``in_shape`` (C, H, W), ``num_classes`` and ``feature_dim`` and works
for 1×8×8, 1×28×28 and 3×32×32 inputs. ``features(x)`` returns a ``(B, feature_dim)``
tensor and ``classifier(h)`` maps it to logits, so feature-space methods (FedGen) work
across architectures. BatchNorm layers stay ordinary submodules, reachable with
``model.modules()`` for BN-statistic losses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fedkd.errors import ConfigError
from fedkd.registry import Registry

MODELS: Registry[Callable[..., FedkdModel]] = Registry("model", "fedkd.models")

Shape = tuple[int, int, int]


class FedkdModel(nn.Module):
    """Base class: ``forward(x) = classifier(features(x))``.

    Subclasses build ``self.body`` (input → any tensor); the base flattens it, infers the
    flattened width with one dummy forward, and adds ``self.neck`` (→ ``feature_dim``)
    and ``self.classifier`` (a single ``nn.Linear``).
    """

    body: nn.Module

    def __init__(self, in_shape: Shape, num_classes: int, feature_dim: int) -> None:
        super().__init__()
        if len(in_shape) != 3 or min(in_shape) < 1:
            raise ConfigError(f"model input shape must be (C, H, W), got {in_shape}")
        if feature_dim < 1:
            raise ConfigError(f"model.feature-dim must be ≥ 1, got {feature_dim}")
        self.in_shape = tuple(in_shape)
        self.num_classes = num_classes
        self.feature_dim = feature_dim

    def _finish(self, neck_hidden: int | None = None) -> None:
        """Build neck and classifier once ``self.body`` exists."""
        was_training = self.body.training
        self.body.eval()
        with torch.no_grad():
            flat = self.body(torch.zeros(1, *self.in_shape)).flatten(1).shape[1]
        self.body.train(was_training)
        if neck_hidden:
            self.neck: nn.Module = nn.Sequential(
                nn.Linear(flat, neck_hidden), nn.ReLU(), nn.Linear(neck_hidden, self.feature_dim), nn.ReLU()
            )
        else:
            self.neck = nn.Sequential(nn.Linear(flat, self.feature_dim), nn.ReLU())
        self.classifier = nn.Linear(self.feature_dim, self.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Map inputs ``(B, C, H, W)`` to features ``(B, feature_dim)``."""
        return self.neck(self.body(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@MODELS.register("mlp")
class MLP(FedkdModel):
    """Two hidden layers of 200 units (McMahan et al. 2017's 2NN), then the feature layer."""

    def __init__(self, in_shape: Shape, num_classes: int = 10, feature_dim: int = 64, hidden: int = 200) -> None:
        super().__init__(in_shape, num_classes, feature_dim)
        c, h, w = in_shape
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self._finish()


def _pad_for(size: int, kernel: int) -> int:
    """'valid' padding when the map is large enough, 'same' padding otherwise."""
    return 0 if size >= 2 * kernel else kernel // 2


class _LeNet(FedkdModel):
    def __init__(self, in_shape: Shape, num_classes: int, feature_dim: int, c1: int, c2: int, fc: int) -> None:
        super().__init__(in_shape, num_classes, feature_dim)
        c, h, _ = in_shape
        # LeNet-5 on 28×28: conv5 (pad 2) → pool → conv5 (valid) → pool → 16×5×5.
        # On 8×8 the second conv pads instead, so the same net runs on sklearn digits.
        self.body = nn.Sequential(
            nn.Conv2d(c, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=_pad_for(h // 2, 5)), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self._finish(neck_hidden=fc)


@MODELS.register("lenet5")
class LeNet5(_LeNet):
    """LeNet-5 (6-16 conv, 120 hidden), as the DFAD/DAFL MNIST teacher."""

    def __init__(self, in_shape: Shape, num_classes: int = 10, feature_dim: int = 84) -> None:
        super().__init__(in_shape, num_classes, feature_dim, c1=6, c2=16, fc=120)


@MODELS.register("lenet5-half")
class LeNet5Half(_LeNet):
    """LeNet-5 with half the channels and units (3-8 conv, 60 hidden): the DFAD student."""

    def __init__(self, in_shape: Shape, num_classes: int = 10, feature_dim: int = 42) -> None:
        super().__init__(in_shape, num_classes, feature_dim, c1=3, c2=8, fc=60)


@MODELS.register("cnn")
class CNN(FedkdModel):
    """The conv-conv-fc CNN of FedAvg/FedGen: 5×5 convs (32, 64), max-pool, fc."""

    batch_norm = False

    def __init__(self, in_shape: Shape, num_classes: int = 10, feature_dim: int = 64, hidden: int = 128) -> None:
        super().__init__(in_shape, num_classes, feature_dim)
        c = in_shape[0]
        norm = nn.BatchNorm2d if self.batch_norm else (lambda ch: nn.Identity())
        self.body = nn.Sequential(
            nn.Conv2d(c, 32, 5, padding=2), norm(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), norm(64), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self._finish(neck_hidden=hidden)


@MODELS.register("cnn-bn")
class CNNBN(CNN):
    """The same CNN with BatchNorm after each conv (for BN-statistic losses, e.g. DENSE)."""

    batch_norm = True


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


@MODELS.register("resnet8")
class ResNet8(FedkdModel):
    """ResNet-8: a BN stem and three basic blocks (16, 32, 64 channels), global pooling."""

    def __init__(self, in_shape: Shape, num_classes: int = 10, feature_dim: int = 64, width: int = 16) -> None:
        super().__init__(in_shape, num_classes, feature_dim)
        c = in_shape[0]
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(c, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            _BasicBlock(w, w, 1), _BasicBlock(w, 2 * w, 2), _BasicBlock(2 * w, 4 * w, 2),
            nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self._finish()


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return x + out if self.use_res else out


@MODELS.register("mobilenetv2")
class MobileNetV2Small(FedkdModel):
    """A small MobileNetV2: inverted residuals with depthwise convs (16→24→32→64)."""

    def __init__(self, in_shape: Shape, num_classes: int = 10, feature_dim: int = 64, expand: int = 4) -> None:
        super().__init__(in_shape, num_classes, feature_dim)
        c = in_shape[0]
        self.body = nn.Sequential(
            nn.Conv2d(c, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
            _InvertedResidual(16, 16, 1, expand), _InvertedResidual(16, 24, 2, expand),
            _InvertedResidual(24, 24, 1, expand), _InvertedResidual(24, 32, 2, expand),
            nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6(),
            nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self._finish()


def build_model(name: str, in_shape: Shape, num_classes: int, feature_dim: int | None = None) -> FedkdModel:
    """Build a registered model; ``feature_dim=None`` keeps the model's own default."""
    factory = MODELS.get(name)
    kwargs: dict[str, int] = {"num_classes": num_classes}
    if feature_dim is not None:
        kwargs["feature_dim"] = feature_dim
    return factory(in_shape=in_shape, **kwargs)
