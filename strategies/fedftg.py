"""FedFTG: fine-tuning the global model on the server with a data-free generator
(Zhang et al., CVPR 2022).

A plug-in on top of any base strategy (``base``: fedavg, fedprox, fedavgm, fedadam, or any
registered Flower strategy). After the base aggregation, the server fine-tunes the global
model for ``iterations`` iterations, each one generator step then ``student-steps``
global-model steps:

* generator: conditional, in input space (noise 100, Adam lr 0.01); its loss is
  fidelity (CE of the class-level ensemble toward the sampled label) + hard-sample mining
  (maximize the L1 gap between the global model and the clients) + diversity;
* labels are drawn ∝ the summed label counts of the round's clients (customized sampling);
* teacher: the class-level ensemble Σ_k w_{k,y} softmax(t_k), w_{k,y} = client k's share
  of class y; the global model learns it by KL;
* global SGD with lr decaying by ``lr-decay`` per round.

ClientApp: ordinary local training; replies carry ``label-counts``.
"""

from __future__ import annotations

from typing import Any

from fedkd.server_kd import DistillationStrategy
from fedkd.synthesis import PRESETS, Objective
from strategies import STRATEGIES

PRESETS.add("fedftg", Objective({"oh": 1.0, "adv": 1.0, "div": 1.0}, adv_metric="l1"))


@STRATEGIES.register("fedftg")
class FedFTG(DistillationStrategy):
    """FedFTG: class-level ensemble, hard-sample mining, label sampling from counts."""

    ensemble_average = "probs"
    class_level = True

    def __init__(
        self,
        *args: Any,
        preset: str = "fedftg",
        conditional: bool = True,
        gen_lr: float = 0.01,
        student_lr: float = 0.01,
        lr_decay: float = 0.998,
        iterations: int = 10,
        student_steps: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            *args, preset=preset, conditional=conditional, gen_lr=gen_lr, student_lr=student_lr, lr_decay=lr_decay,
            iterations=iterations, student_steps=student_steps, **kwargs,
        )  # fmt: skip
