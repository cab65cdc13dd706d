"""Flower's central differential-privacy wrappers, registered as strategies that wrap a base.

``dp-server-fixed``, ``dp-server-adaptive``, ``dp-client-fixed`` and ``dp-client-adaptive`` are
Flower's ``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping`` (McMahan et al.
2018; adaptive clipping: Andrew et al. 2021), unchanged but for three things fedkd needs:

* They wrap the plain strategy named by ``strategy.<name>.base`` (default ``fedavg``), built as
  every base is (:func:`fedkd.federation.base_factory`), one per architecture group; Flower's
  ``num_sampled_clients`` is the number of clients that group samples per round. A wrapper is
  itself a plain strategy, so a distillation strategy can run on it
  (``strategy.fedftg.base = "dp-server-fixed"``).
* The noise (Gaussian noise on the aggregate; the adaptive wrappers' noise on the clipped count)
  is drawn from NumPy's global generator, as in Flower, but seeded by ``seed`` and the round
  for the call and then restored, so a run repeats and resumes exactly.
* The adaptive wrappers' ``clipped_count_stddev`` is a number, 0 for Flower's default
  (sampled / 20); Flower requires ``noise_multiplier < 2 · clipped_count_stddev`` when it is
  not 0 (its split of the noise between the count and the update), checked before the run.
* The adaptive wrappers' clipping norm is learned state: it is kept as an array, so a
  checkpoint saves it and ``--resume`` continues from it.

The client-side wrappers send ``clipping_norm`` with each train message; fedkd's ClientApp
clips its update to it with Flower's ``compute_adaptive_clip_model_update`` (the function
Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod`` apply) in its finish step, so the
clipping happens on every engine, batched clients included, and reports Flower's ``norm_bit``.
As in Flower, the norm is over every array of the model, BatchNorm's running statistics and
counters included.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from strategies import STRATEGIES


class DPWrapper:
    """Mixin: a DP wrapper of the base ``base``, with seeded, per-round noise."""

    #: fedkd builds the wrapped strategy from ``base`` (:func:`fedkd.federation.base_factory`).
    wraps_base: ClassVar[bool] = True
    noise_seed: int

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Flower draws the update noise and the adaptive wrappers' clipped-count noise from NumPy's
        # global generator: here it is seeded by (seed, round) for the call, then put back.
        state = np.random.get_state()
        np.random.seed(np.random.SeedSequence([self.noise_seed, server_round]).generate_state(1)[0])
        try:
            return super().aggregate_train(server_round, list(replies))  # type: ignore[misc,no-any-return]
        finally:
            np.random.set_state(state)


class _AdaptiveNorm:
    """The adaptive wrappers' clipping norm, held in an array so that checkpoints carry it."""

    clipping_norm_state: np.ndarray

    @property
    def clipping_norm(self) -> float:
        return float(self.clipping_norm_state[0])

    @clipping_norm.setter
    def clipping_norm(self, value: float) -> None:
        self.clipping_norm_state = np.array([float(value)], dtype=np.float64)


class _Fixed(DPWrapper):
    """The fixed-clipping wrappers' keywords (one ``__init__`` for both sides)."""

    def __init__(
        self,
        strategy: Strategy,
        num_sampled_clients: int,
        *,
        base: str = "fedavg",
        noise_multiplier: float = 1.0,
        clipping_norm: float = 1.0,
        noise_seed: int = 0,
    ) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)  # type: ignore[call-arg]
        self.base, self.noise_seed = base, noise_seed


class _Adaptive(_AdaptiveNorm, DPWrapper):
    """The adaptive-clipping wrappers' keywords (one ``__init__`` for both sides)."""

    def __init__(
        self,
        strategy: Strategy,
        num_sampled_clients: int,
        *,
        base: str = "fedavg",
        noise_multiplier: float = 0.1,
        initial_clipping_norm: float = 0.1,
        target_clipped_quantile: float = 0.5,
        clip_norm_lr: float = 0.2,
        clipped_count_stddev: float = 0.0,
        noise_seed: int = 0,
    ) -> None:
        super().__init__(  # type: ignore[call-arg]
            strategy, noise_multiplier, num_sampled_clients, initial_clipping_norm, target_clipped_quantile,
            clip_norm_lr, clipped_count_stddev or None,
        )  # fmt: skip
        self.base, self.noise_seed = base, noise_seed


@STRATEGIES.register("dp-server-fixed")
class DPServerFixed(_Fixed, DifferentialPrivacyServerSideFixedClipping):
    """Central DP, the server clips each update to ``clipping_norm`` and adds noise of std
    ``noise_multiplier · clipping_norm / sampled``."""


@STRATEGIES.register("dp-client-fixed")
class DPClientFixed(_Fixed, DifferentialPrivacyClientSideFixedClipping):
    """Central DP, each client clips its own update to ``clipping_norm``; the server adds noise."""


@STRATEGIES.register("dp-server-adaptive")
class DPServerAdaptive(_Adaptive, DifferentialPrivacyServerSideAdaptiveClipping):
    """Central DP with a clipping norm that tracks the ``target_clipped_quantile`` of the update
    norms (geometric steps of ``clip_norm_lr``), clipped on the server."""


@STRATEGIES.register("dp-client-adaptive")
class DPClientAdaptive(_Adaptive, DifferentialPrivacyClientSideAdaptiveClipping):
    """Central DP with an adaptive clipping norm; each client clips and reports its ``norm_bit``."""
