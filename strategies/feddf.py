"""FedDF: ensemble distillation for model fusion (Lin et al., NeurIPS 2020).

Within each architecture group the base strategy aggregates (FedAvg by default); then the
averaged logits of all the round's client models teach every group's model and the global
model. The distillation data are unlabelled proxy samples (``proxy`` names a dataset;
its training split is used, without labels) or, data-free, samples of a generator trained
against the ensemble (DAFL terms plus the adversarial term).

ClientApp: ordinary local training; replies carry weights, ``num-examples`` and
``label-counts``.
"""

from __future__ import annotations

from typing import Any

import torch

from fedkd.data import load_dataset
from fedkd.errors import ConfigError, UserError
from fedkd.server_kd import BatchSource, DistillationStrategy, proxy_source
from strategies import STRATEGIES


@STRATEGIES.register("feddf")
class FedDF(DistillationStrategy):
    """FedDF; ``proxy = ""`` is the data-free variant.

    Parameters
    ----------
    proxy : str
        A registered dataset whose training inputs serve as unlabelled distillation data;
        empty for generator samples.
    proxy_root : str
        ``dataset.root`` of the proxy dataset, for torchvision-backed ones.
    """

    distill_groups = True

    def __init__(
        self,
        *args: Any,
        proxy: str = "",
        proxy_root: str = "",
        preset: str = "dafl",
        weights: str = "adv=1",
        iterations: int = 20,
        student_steps: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            *args, preset=preset, weights=weights, iterations=iterations, student_steps=student_steps, **kwargs
        )
        self._proxy: BatchSource | None = None
        self._proxy_rng = torch.Generator()
        if proxy:
            assert self.context is not None
            try:
                ds = load_dataset(proxy, proxy_root)
            except UserError as e:  # its messages name dataset.root; here the key is proxy-root
                raise ConfigError(
                    f"strategy.feddf.proxy {proxy!r}: {str(e).replace('dataset.root', 'strategy.feddf.proxy-root')}"
                ) from None
            if ds.shape != self.context.in_shape:
                raise ConfigError(
                    f"strategy.feddf.proxy {proxy!r} has inputs of shape {ds.shape}, but the federation's are "
                    f"{self.context.in_shape}"
                )
            self._proxy_rng.manual_seed(self.context.seed)
            self._proxy = proxy_source(
                ds.x_train, self.distiller.synth.batch_size, self.context.device, self._proxy_rng
            )

    def source(self) -> BatchSource | None:
        return self._proxy

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "proxy_rng": self._proxy_rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._proxy_rng.set_state(state["proxy_rng"])
