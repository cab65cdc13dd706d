"""FedGen's label-conditional feature-space generator (Zhu, Hong, Zhou, ICML 2021)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from fedkd.errors import ConfigError
from generators import GENERATORS

ACTIVATIONS = ("relu", "none")


@GENERATORS.register("feature")
class FeatureGenerator(nn.Module):
    """``G(z | y)``: noise ⊕ one-hot label → hidden (BN, ReLU) → linear → a feature vector.

    The output lives in the classifiers' feature space, the input of every fedkd model's
    ``classifier`` head (``model.classifier(G(z, y))`` gives logits). fedkd's models take
    their features after a ReLU, so by default so does the generator (``activation="relu"``):
    without it a generated feature can be negative where no real one ever is, and the heads
    are regularized off the feature manifold. FedGen's official models take the latent
    before any activation, and its generator has none (``activation="none"``).

    Parameters
    ----------
    out_shape : tuple of int
        ``(feature_dim,)`` (set by fedkd from the models' ``feature_dim``).
    num_classes : int
        Number of labels (set by fedkd).
    latent_dim : int
        Dimension of the noise ``z`` (FedGen on MNIST: 32).
    hidden_dim : int
        Width of the hidden layer (FedGen: 256).
    activation : {"relu", "none"}
        Output activation: that of the models' features (fedkd's: ReLU).
    """

    space: ClassVar[str] = "feature"
    conditional: bool = True

    def __init__(
        self,
        out_shape: tuple[int, ...],
        num_classes: int,
        latent_dim: int = 32,
        hidden_dim: int = 256,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"generator 'feature' activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
        if len(out_shape) != 1 or out_shape[0] < 1:
            raise ConfigError(f"generator 'feature' needs an output shape (feature_dim,), got {tuple(out_shape)}")
        if latent_dim < 1 or hidden_dim < 1 or num_classes < 1:
            raise ConfigError(
                "generator 'feature' needs latent-dim, hidden-dim and num_classes ≥ 1, "
                f"got {latent_dim}, {hidden_dim}, {num_classes}"
            )
        self.out_shape = (int(out_shape[0]),)
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.hidden = nn.Sequential(
            nn.Linear(latent_dim + num_classes, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU()
        )
        self.out = nn.Linear(hidden_dim, self.out_shape[0])
        self.activation = activation

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """Map noise ``(B, latent_dim)`` and labels ``(B,)`` to features ``(B, feature_dim)``."""
        if y is None:
            raise ValueError("the feature generator is label-conditional; pass y")
        h = torch.cat([z, nn.functional.one_hot(y, self.num_classes).to(z.dtype)], dim=1)
        out = self.out(self.hidden(h))
        return torch.relu(out) if self.activation == "relu" else out
