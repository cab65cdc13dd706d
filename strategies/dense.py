"""DENSE: data-free one-shot federated learning (Zhang et al., NeurIPS 2022).

Clients train once (``rounds = 1``) and upload their models. The server trains an
input-space generator against the ensemble of client models with DeepInversion's BN
statistics, the one-hot term and the adversarial term (``bn + oh + adv``), then distills
the ensemble into the global model, which may have its own architecture. Works with
heterogeneous client architectures; the ``bn`` term needs BatchNorm in the client models
(e.g. ``resnet8``, ``mobilenetv2``).

ClientApp: ordinary local training (set ``clients.local-epochs``).
"""

from __future__ import annotations

from typing import Any

from fedkd.errors import ConfigError
from fedkd.server_kd import DistillationStrategy
from strategies import STRATEGIES


@STRATEGIES.register("dense")
class DENSE(DistillationStrategy):
    """DENSE (one-shot): generator ``bn + oh + adv`` against the client ensemble, then KD."""

    def __init__(
        self,
        *args: Any,
        preset: str = "adi",
        iterations: int = 200,
        student_steps: int = 5,
        loss: str = "kl",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, preset=preset, iterations=iterations, student_steps=student_steps, loss=loss, **kwargs)
        assert self.context is not None
        if self.context.rounds != 1:
            raise ConfigError(f"strategy 'dense' is one-shot: set rounds = 1 (got {self.context.rounds})")
