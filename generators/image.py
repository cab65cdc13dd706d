"""An input-space DCGAN generator (DAFL / DFAD style), optionally label-conditional."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from fedkd.errors import ConfigError
from generators import GENERATORS


@GENERATORS.register("image")
class ImageGenerator(nn.Module):
    """DCGAN-style generator of images in a classifier's normalized input space.

    ``z (⊕ one-hot y)`` → linear → ``(2·base, ⌈H/4⌉, ⌈W/4⌉)`` → BN → 2× upsample, conv, BN,
    LeakyReLU → upsample to ``(H, W)``, conv, BN, LeakyReLU → conv to ``C`` channels → tanh →
    BatchNorm without affine parameters. The last layer is DAFL's/DFAD's: it standardizes
    every channel of a batch, which is the statistics of normalized (mean/std) inputs, so
    the output lands in the space the teacher was trained on for any ``(C, H, W)``
    (1×8×8, 1×28×28, 3×32×32, ...).

    Parameters
    ----------
    out_shape : tuple of int
        ``(C, H, W)`` of one generated sample (set by fedkd from the dataset).
    num_classes : int
        Number of labels (set by fedkd); used only when ``conditional``.
    latent_dim : int
        Dimension of the noise ``z`` (DFAD: 100).
    base_channels : int
        Width of the last hidden conv (DCGAN's ``ngf``); earlier layers have twice as many.
    conditional : bool
        Concatenate a one-hot label to ``z``; ``forward`` then needs ``y``.
    """

    space: ClassVar[str] = "input"

    def __init__(
        self,
        out_shape: tuple[int, ...],
        num_classes: int,
        latent_dim: int = 100,
        base_channels: int = 64,
        conditional: bool = False,
    ) -> None:
        super().__init__()
        if len(out_shape) != 3 or min(out_shape) < 1:
            raise ConfigError(f"generator 'image' needs an output shape (C, H, W), got {tuple(out_shape)}")
        if latent_dim < 1 or base_channels < 1 or num_classes < 1:
            raise ConfigError(
                "generator 'image' needs latent-dim, base-channels and num_classes ≥ 1, "
                f"got {latent_dim}, {base_channels}, {num_classes}"
            )
        c, h, w = (int(v) for v in out_shape)
        self.out_shape = (c, h, w)
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.conditional = conditional
        self.init_size = (-(-h // 4), -(-w // 4))
        wide = 2 * base_channels
        in_dim = latent_dim + (num_classes if conditional else 0)
        self.fc = nn.Linear(in_dim, wide * self.init_size[0] * self.init_size[1])
        self.bn0 = nn.BatchNorm2d(wide)
        self.up1 = nn.Upsample(scale_factor=2, mode="nearest")
        self.block1 = nn.Sequential(
            nn.Conv2d(wide, wide, 3, padding=1, bias=False), nn.BatchNorm2d(wide), nn.LeakyReLU(0.2)
        )
        self.up2 = nn.Upsample(size=(h, w), mode="nearest")
        self.block2 = nn.Sequential(
            nn.Conv2d(wide, base_channels, 3, padding=1, bias=False), nn.BatchNorm2d(base_channels), nn.LeakyReLU(0.2)
        )
        self.head = nn.Sequential(nn.Conv2d(base_channels, c, 3, padding=1), nn.Tanh(), nn.BatchNorm2d(c, affine=False))

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """Map noise ``(B, latent_dim)`` (and labels ``(B,)`` if conditional) to ``(B, C, H, W)``."""
        if self.conditional:
            if y is None:
                raise ValueError("a conditional generator needs labels y")
            z = torch.cat([z, nn.functional.one_hot(y, self.num_classes).to(z.dtype)], dim=1)
        elif y is not None:
            raise ValueError("this generator is unconditional; pass y=None")
        out = self.fc(z).view(z.shape[0], -1, *self.init_size)
        out = self.block1(self.up1(self.bn0(out)))
        out = self.block2(self.up2(out))
        return self.head(out)
