"""FedFTG: fine-tuning the global model on the server with a data-free generator
(Zhang et al., CVPR 2022).

A plug-in on top of any base strategy (``base``: fedavg, fedprox, fedavgm, fedadam, or any
registered Flower strategy). After the base aggregation the server fine-tunes the global
model for ``iterations`` iterations (official: 10). Each iteration draws one batch of noise
``z`` and labels ``y`` (∝ the summed label counts of the round's clients, customized label
sampling), then

* **generator**: one Adam update *per client* ``k`` (``per-client``), on the loss
  ``CE(t_k(G(z, y)), y) · mean_b w_{k,y_b}`` (fidelity) ``− mean_b w_{k,y_b} · mean_c |s − t_k|``
  (hard-sample mining: raw logits of the global model ``s`` against client ``k``'s, the
  client's side detached) ``+ div / K`` (bounded diversity), with ``w_{k,y}`` client ``k``'s
  share of class ``y``; the students stay in eval mode;
* **global model**: ``student-steps`` (5) SGD steps on the *same* batch (``reuse-batch``),
  made by the generator in eval mode, toward the class-level ensemble
  ``Σ_k w_{k,y} softmax(t_k)`` by soft cross-entropy averaged over batch × classes
  (``loss = "ce"``, ``loss-reduction = "mean"``: the official ``mean(−log_softmax(s) · p)``).

Optimizers follow the official code (``methods/local_fn_gan.py``): the global model's SGD at
lr 0.1 · 0.998^round, no momentum, weight decay 1e-3, re-created every round; the generator's
Adam re-created every round at 0.01 · 0.998^round, while the generator's weights persist.
``sims/papers/mnist5k-fedftg-dir0.1.toml`` lists every deviation.

ClientApp: ordinary local training; replies carry ``label-counts``.
"""

from __future__ import annotations

from typing import Any

from fedkd.server_kd import DistillationStrategy
from fedkd.synthesis import PRESETS, Objective
from strategies import STRATEGIES

PRESETS.add("fedftg", Objective({"oh": 1.0, "adv": 1.0, "div": 1.0}, adv_metric="l1", adv_detach=True))


@STRATEGIES.register("fedftg")
class FedFTG(DistillationStrategy):
    """FedFTG: per-client generator updates with hard-sample mining, class-level ensemble."""

    def __init__(
        self,
        *args: Any,
        ensemble: str = "probs",
        class_level: bool = True,
        iterations: int = 10,
        student_steps: int = 5,
        preset: str = "fedftg",
        conditional: bool = True,
        batch_size: int = 50,
        gen_lr: float = 0.01,
        gen_lr_decay: float = 0.998,
        gen_persist: bool = False,
        per_client: str = "steps",
        reuse_batch: bool = True,
        sample_mode: str = "eval",
        student_lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 1e-3,
        lr_decay: float = 0.998,
        loss: str = "ce",
        loss_reduction: str = "mean",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            *args, ensemble=ensemble, class_level=class_level, iterations=iterations, student_steps=student_steps, preset=preset, conditional=conditional,
            batch_size=batch_size, gen_lr=gen_lr, gen_lr_decay=gen_lr_decay, gen_persist=gen_persist,
            per_client=per_client, reuse_batch=reuse_batch, sample_mode=sample_mode, student_lr=student_lr,
            momentum=momentum, weight_decay=weight_decay, lr_decay=lr_decay, loss=loss,
            loss_reduction=loss_reduction, **kwargs,
        )  # fmt: skip
