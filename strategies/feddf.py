"""FedDF: ensemble distillation for model fusion (Lin et al., NeurIPS 2020).

Within each architecture group the base strategy aggregates (FedAvg by default); then the
ensemble of all the round's client models teaches every group's model and the global model.
The distillation data are unlabelled proxy samples (``proxy`` names a dataset; its training
split is used, without labels) or, data-free, samples of a generator trained against the
ensemble.

The defaults are the data-free FedDF of the FedFTG repository (``methods/local_fn_gan.py``,
``train_global_model_feddf``), the only official data-free FedDF (the paper's own code
distills on proxy data): per round, 50 Adam steps of a conditional generator (lr 0.01 ·
0.998^round, weight decay 1e-3, fresh Adam each round) on the mean over clients of CE toward
the sampled label plus diversity; then 20 SGD steps of each student (lr 0.1 · 0.998^round,
no momentum, weight decay 1e-3) on fresh samples, by KL to the mean of the clients' softmax.
``sims/papers/mnist5k-feddf-dir0.1.toml`` lists the deviations.

ClientApp: ordinary local training; replies carry weights, ``num-examples`` and
``label-counts``.
"""

from __future__ import annotations

from typing import Any

import torch

from fedkd.data import load_dataset
from fedkd.errors import ConfigError, UserError
from fedkd.server_kd import BatchSource, DistillationStrategy, proxy_source
from fedkd.synthesis import PRESETS, Objective
from strategies import STRATEGIES

#: The data-free FedDF baseline of the FedFTG repository: mean CE over the clients + diversity.
PRESETS.add("feddf", Objective({"oh": 1.0, "div": 1.0}))


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
        ensemble: str = "probs",
        preset: str = "feddf",
        conditional: bool = True,
        batch_size: int = 50,
        iterations: int = 1,
        gen_steps: int = 50,
        per_client: str = "mean",
        student_steps: int = 20,
        gen_lr: float = 0.01,
        gen_lr_decay: float = 0.998,
        gen_weight_decay: float = 1e-3,
        gen_persist: bool = False,
        sample_mode: str = "eval",
        student_lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 1e-3,
        lr_decay: float = 0.998,
        loss: str = "kl",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            *args, ensemble=ensemble, preset=preset, conditional=conditional, batch_size=batch_size,
            iterations=iterations, gen_steps=gen_steps, per_client=per_client, student_steps=student_steps,
            gen_lr=gen_lr, gen_lr_decay=gen_lr_decay, gen_weight_decay=gen_weight_decay, gen_persist=gen_persist,
            sample_mode=sample_mode, student_lr=student_lr, momentum=momentum, weight_decay=weight_decay,
            lr_decay=lr_decay, loss=loss, **kwargs,
        )  # fmt: skip
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
