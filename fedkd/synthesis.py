"""Generator objectives for data-free distillation, and the :class:`Synthesizer` that trains a generator.

The generator's loss is a weighted sum of named terms (a zero weight skips a term):

* ``oh``: cross-entropy of the teacher on ``G(z)``, toward the sampled label for a
  conditional generator, else toward the teacher's own argmax (DAFL);
* ``ie``: ``log C − H(mean softmax)``, i.e. the information entropy of the batch-mean
  teacher prediction, maximized so classes stay balanced (DAFL);
* ``act``: ``−mean |features|`` of the teacher (DAFL's activation term);
* ``bn``: DeepInversion's ``Σ_layers ‖μ_batch − μ_run‖₂ + ‖σ²_batch − σ²_run‖₂`` over the
  teacher's BatchNorm layers, collected by forward hooks that are always removed;
* ``adv``: student–teacher disagreement, maximized: ``−L1(logits)`` (DFAD, ZSKT) or
  ``1 − JS`` at temperature T (LRA, ADI), or ``1 − js_lra`` (the LRA code's scaling);
* ``div``: diversity, bounded in ``(0, 1]``: ``exp(−mean_{i,j} d_z(i, j) · d_x(i, j))`` over all
  pairs of the batch, ``d_x`` the mean absolute difference of the samples and ``d_z`` the
  mean squared difference of their noise (the form of the official FedGen and FedFTG code);
  it is 1 for a collapsed generator and falls as samples spread with their noise;
* ``tv``: DeepInversion's total-variation image prior (``get_image_prior_losses``'s
  ``loss_var_l2``): ``Σ_d ‖x − shift_d(x)‖₂`` over the 4 neighbour directions (right, down
  and both diagonals), each norm taken over the whole batch tensor, as the official code does
  (so it grows as ``√B``); images ``(B, C, H, W)`` only. Minimized: smoother samples.

Presets (``PRESETS``): ``dafl`` = oh 1 + ie 5 + act 0.1; ``dfad`` = adv (L1) 1;
``adi`` = bn 1 + oh 1 + adv (JS) 1; ``lra`` = oh 1 + ie 5 + act 0.1 + adv (1 − JS, T = 3) 1;
``lra-official`` = the same terms scaled as LRA's code computes them (ie in log10: 5 / ln 10;
adv ``js-lra``, about JS / C); ``none`` has no term (give them with ``synthesis.weights``).

A teacher is any classifier: one model, or an :class:`~fedkd.distill.EnsembleTeacher`;
for a feature-space generator (FedGen) it is a classifier head or an ensemble of heads.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedkd.distill import BatchSource, EnsembleTeacher, js_divergence, logits_and_features
from fedkd.errors import ConfigError
from fedkd.registry import Registry

log = logging.getLogger(__name__)

TERMS: tuple[str, ...] = ("oh", "ie", "act", "bn", "adv", "div", "tv")
Noise = tuple[Tensor, Tensor | None]
"""``(z, y)``: a batch of generator noise and its labels (``None`` for an unconditional generator)."""
ADV_METRICS: tuple[str, ...] = ("l1", "js", "js-lra", "kl-masked")


# --------------------------------------------------------------------------- the terms


def oh_loss(logits: Tensor, y: Tensor | None = None) -> Tensor:
    """Cross-entropy toward ``y``, or toward the argmax of ``logits`` when ``y`` is ``None``."""
    target = logits.detach().argmax(1) if y is None else y
    return F.cross_entropy(logits, target)


def ie_loss(logits: Tensor) -> Tensor:
    """``log C − H(p̄)``, with ``p̄`` the batch-mean softmax: 0 when classes are balanced."""
    mean = F.softmax(logits, 1).mean(0)
    entropy = -(mean * torch.log(mean.clamp_min(1e-12))).sum()
    return math.log(logits.shape[1]) - entropy


def act_loss(features: Tensor) -> Tensor:
    """``−mean |features|``: DAFL's activation term (strong activations look like real data)."""
    return -features.abs().mean()


def adv_loss(
    student: Tensor, teacher: Tensor, metric: str = "l1", temperature: float = 3.0, weight: Tensor | None = None
) -> Tensor:
    """Disagreement to *maximize*, as a loss to minimize; both sides are logits ``(B, C)``.

    ``l1``: ``−mean_b w_b · mean_c |s − t|`` (DFAD; FedFTG's hard-sample mining, with ``w``
    the teacher's share of each sample's class). ``js``: ``1 − mean_b w_b · JS_b`` with
    ``JS_b = JS(softmax(s/T) ‖ softmax(t/T))`` (in nats). ``js-lra``: the official LRA code's
    form (:func:`js_lra`), about ``JS / C``. ``weight=None``: every ``w_b = 1``.
    """
    if metric == "l1":
        per = (student - teacher).abs().mean(1)
        return -(per.mean() if weight is None else (weight * per).mean())
    if metric == "js":
        if weight is None:
            return 1.0 - js_divergence(student, teacher, temperature)
        return 1.0 - (weight * js_divergence(student, teacher, temperature, reduction="none")).mean()
    if metric == "js-lra":
        return 1.0 - js_lra(student, teacher, temperature, weight)
    if metric == "kl-masked":  # Fast-DFKD / CMI: KL(t ‖ s) on the samples where s and t still agree
        agree = (student.argmax(1) == teacher.argmax(1)).float()
        per = F.kl_div(F.log_softmax(student, 1), F.softmax(teacher, 1), reduction="none").sum(1) * agree
        return -(per.mean() if weight is None else (weight * per).mean())
    raise ConfigError(f"unknown adversarial metric {metric!r}; valid: {', '.join(ADV_METRICS)}")


def js_lra(student: Tensor, teacher: Tensor, temperature: float = 3.0, weight: Tensor | None = None) -> Tensor:
    """The official LRA code's ``JS_divergence`` (``src/graphs/losses/kd_losses.py``), clamped to ``[0, 1]``.

    With ``p, q`` the softmaxes at temperature ``T`` and ``m = (p + q) / 2``, all three clamped
    to ``[0.01, 0.99]``: ``½ KL(m ‖ p) + ½ KL(m ‖ q)``, each reduced by ``nn.KLDivLoss()``'s
    default mean over batch × classes, i.e. about ``JS / C`` with the divergence taken from
    ``m``. ``weight`` (per sample) weighs the batch mean. Symmetric in ``student`` and ``teacher``.
    """
    p = F.softmax(student / temperature, 1)
    q = F.softmax(teacher / temperature, 1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    per = 0.5 * (m * (m.log() - p.log())).mean(1) + 0.5 * (m * (m.log() - q.log())).mean(1)
    value = per.mean() if weight is None else (weight * per).mean()
    return value.clamp(0.0, 1.0)


def div_loss(x: Tensor, z: Tensor) -> Tensor:
    """Diversity in ``(0, 1]``: ``exp(−mean_{i,j} d_z(i, j) · d_x(i, j))`` over all pairs.

    ``d_x(i, j) = mean |x_i − x_j|`` over the sample's elements and ``d_z(i, j) =
    mean (z_i − z_j)²`` over the noise's (FedGen's and FedFTG's ``DiversityLoss``). Bounded:
    1 when every sample is the same, never below 0; a batch of one sample gives 1.
    """
    fx, fz = x.flatten(1), z.flatten(1)
    dx = (fx.unsqueeze(0) - fx.unsqueeze(1)).abs().mean(2)
    dz = (fz.unsqueeze(0) - fz.unsqueeze(1)).pow(2).mean(2)
    return torch.exp(-(dx * dz).mean())


def tv_loss(x: Tensor) -> Tensor:
    """DeepInversion's L2 total variation of a batch of images ``(B, C, H, W)``.

    ``‖x[:, :, :, :-1] − x[:, :, :, 1:]‖ + ‖x[:, :, :-1, :] − x[:, :, 1:, :]‖ +
    ‖x[:, :, 1:, :-1] − x[:, :, :-1, 1:]‖ + ‖x[:, :, :-1, :-1] − x[:, :, 1:, 1:]‖``, each a
    Frobenius norm over the whole batch (NVlabs/DeepInversion ``get_image_prior_losses``,
    ``loss_var_l2``; its CIFAR-10 script, batch 256 of 32×32×3 with the BN term at 10, weighs
    it 2.5e-5 by default and 1e-3 for its "better" images). 0 for a constant image.
    """
    if x.dim() != 4:
        raise ConfigError(f"generator loss term 'tv' needs image samples (B, C, H, W), got shape {tuple(x.shape)}")
    return (
        torch.linalg.vector_norm(x[:, :, :, :-1] - x[:, :, :, 1:])
        + torch.linalg.vector_norm(x[:, :, :-1, :] - x[:, :, 1:, :])
        + torch.linalg.vector_norm(x[:, :, 1:, :-1] - x[:, :, :-1, 1:])
        + torch.linalg.vector_norm(x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    )


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that track running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


class ForwardHooks:
    """Forward hooks on ``layers`` for the length of a ``with`` block: registered on enter
    (after :meth:`reset`), removed on exit even when the forward raises. Subclasses define
    ``_hook(module, inputs, output)`` and what :meth:`reset` clears."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Clear what the hooks collected (called on enter)."""

    def __enter__(self) -> Any:
        self.reset()
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class BNStatistics(ForwardHooks):
    """DeepInversion's BN-statistics loss, gathered by forward hooks on ``model``'s BN layers.

    Use as a context manager: hooks are registered on enter and removed on exit, even when
    the forward raises. Inside, every forward of ``model`` adds to :attr:`loss`.
    """

    layers: list[nn.modules.batchnorm._BatchNorm]  # type: ignore[assignment]

    def __init__(self, model: nn.Module) -> None:
        super().__init__(list(bn_layers(model)))
        self.terms: list[Tensor] = []

    def reset(self) -> None:
        self.terms = []

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        x = inputs[0]
        dims = [d for d in range(x.ndim) if d != 1]
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        assert module.running_mean is not None and module.running_var is not None
        self.terms.append(
            torch.linalg.vector_norm(mean - module.running_mean) + torch.linalg.vector_norm(var - module.running_var)
        )

    @property
    def loss(self) -> Tensor:
        """Sum over the hooked layers (and forwards) so far."""
        if not self.terms:
            raise RuntimeError("no BatchNorm statistics were collected")
        return torch.stack(self.terms).sum()


# --------------------------------------------------------------------------- objectives


@dataclass(frozen=True)
class Objective:
    """A generator objective: term weights, the adversarial metric and its temperature.

    Attributes
    ----------
    weights : mapping of str to float
        Weight per term of :data:`TERMS`; terms absent or at 0 are skipped.
    adv_metric : {"l1", "js", "js-lra", "kl-masked"}
    temperature : float
        Temperature of the JS adversarial term (LRA: 3).
    adv_detach : bool
        Detach the teacher's side of the adversarial term, so that its gradient reaches the
        generator through the student only (FedFTG's ``t_logit.detach()``); DFAD keeps both.
    """

    weights: Mapping[str, float] = field(default_factory=dict)
    adv_metric: str = "l1"
    temperature: float = 3.0
    adv_detach: bool = False

    def __post_init__(self) -> None:
        for term, w in self.weights.items():
            if term not in TERMS:
                raise ConfigError(f"unknown generator loss term {term!r}; valid: {', '.join(TERMS)}")
            if not (w >= 0 and math.isfinite(w)):
                raise ConfigError(f"the weight of generator loss term {term!r} must be ≥ 0, got {w}")
        if self.adv_metric not in ADV_METRICS:
            raise ConfigError(f"unknown adversarial metric {self.adv_metric!r}; valid: {', '.join(ADV_METRICS)}")
        if not self.temperature > 0:
            raise ConfigError(f"synthesis temperature must be > 0, got {self.temperature}")

    @property
    def active(self) -> dict[str, float]:
        """The terms with a positive weight, in :data:`TERMS` order."""
        return {t: float(self.weights[t]) for t in TERMS if self.weights.get(t, 0.0) > 0}

    def with_weights(self, overrides: Mapping[str, float]) -> Objective:
        """A copy with some weights replaced (or added)."""
        return Objective({**self.weights, **overrides}, self.adv_metric, self.temperature, self.adv_detach)


PRESETS: Registry[Objective] = Registry("synthesis preset")
PRESETS.add("dafl", Objective({"oh": 1.0, "ie": 5.0, "act": 0.1}))
PRESETS.add("dfad", Objective({"adv": 1.0}, adv_metric="l1"))
PRESETS.add("adi", Objective({"bn": 1.0, "oh": 1.0, "adv": 1.0}, adv_metric="js"))
PRESETS.add("lra", Objective({"oh": 1.0, "ie": 5.0, "act": 0.1, "adv": 1.0}, adv_metric="js", temperature=3.0))
# LRA's code, term for term: its entropy term is Σ p̄ log10 p̄ = −H / ln 10 (ie 5 in log10 is ie 5 / ln 10 in
# nats; the constant log C of ``ie_loss`` has no gradient) and its JS is :func:`js_lra` (about JS / C).
PRESETS.add(
    "lra-official",
    Objective({"oh": 1.0, "ie": 5.0 / math.log(10.0), "act": 0.1, "adv": 1.0}, adv_metric="js-lra", temperature=3.0),
)
# CMI's CIFAR script (scripts/cmi_cifar.sh): bn 1, oh 1, adv 0.5 (its contrastive weight is synthesizer.cmi.contrastive).
PRESETS.add("cmi", Objective({"bn": 1.0, "oh": 1.0, "adv": 0.5}, adv_metric="kl-masked"))
# Fast-DFKD's CIFAR-100 ResNet-34 script (scripts/fast_cifar.sh): bn 10, oh 0.5, adv 1.33 on the masked KL.
PRESETS.add("fast", Objective({"bn": 10.0, "oh": 0.5, "adv": 1.33}, adv_metric="kl-masked"))
PRESETS.add("none", Objective({}))


def parse_weights(text: str, key: str = "synthesis.weights") -> dict[str, float]:
    """``"oh=1, adv=0.5"`` → ``{"oh": 1.0, "adv": 0.5}``; unknown terms and negative weights are errors."""
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        term, sep, raw = item.partition("=")
        term = term.strip()
        if not sep:
            raise ConfigError(f"{key}: expected TERM=WEIGHT, got {item!r}")
        if term not in TERMS:
            raise ConfigError(f"{key}: unknown term {term!r}; valid: {', '.join(TERMS)}")
        try:
            w = float(raw)
        except ValueError:
            raise ConfigError(f"{key}: the weight of {term!r} must be a number, got {raw.strip()!r}") from None
        if not (w >= 0 and math.isfinite(w)):
            raise ConfigError(f"{key}: the weight of {term!r} must be ≥ 0, got {raw.strip()}")
        out[term] = w
    return out


def make_objective(
    preset: str, weights: str = "", adv_metric: str = "preset", temperature: float | None = None
) -> Objective:
    """A preset, with weight overrides (``"term=w,..."``), metric and temperature overrides."""
    base = PRESETS.get(preset)
    obj = base.with_weights(parse_weights(weights))
    metric = obj.adv_metric if adv_metric == "preset" else adv_metric
    obj = Objective(obj.weights, metric, obj.temperature if temperature is None else temperature, obj.adv_detach)
    if not obj.active:
        raise ConfigError(
            f"synthesis preset {preset!r} with weights {weights!r} leaves the generator loss with no term"
        )
    return obj


# --------------------------------------------------------------------------- the synthesizer


class Synthesizer:
    """Trains a generator against a teacher (and a student) and serves its pseudo-samples.

    Parameters
    ----------
    generator : nn.Module
        A registered generator (``forward(z, y=None)``, ``latent_dim``, ``conditional``),
        already on the device to use.
    objective : Objective
        Term weights; see :data:`PRESETS` and :func:`make_objective`.
    batch_size : int
        Samples per generator step and per :meth:`source` batch.
    lr : float
        Adam learning rate of the generator (DFAD: 1e-3).
    label_prior : Tensor, optional
        Probabilities ``(C,)`` of the sampled labels (FedFTG / FedGen: the clients' summed
        label counts, normalized); uniform by default.
    seed : int
        Seed of the noise and label stream.
    weight_decay : float
        Adam weight decay of the generator (FedGen's official code: 1e-2).

    Notes
    -----
    The teacher is used as given: put it in eval mode (the ``bn`` term requires it). No
    gradient is accumulated in the teacher or the student: a step differentiates w.r.t.
    the generator's parameters only.
    """

    def __init__(
        self,
        generator: nn.Module,
        objective: Objective,
        batch_size: int,
        lr: float = 1e-3,
        label_prior: Tensor | None = None,
        seed: int = 0,
        weight_decay: float = 0.0,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"synthesis batch size must be ≥ 1, got {batch_size}")
        if not lr > 0:
            raise ConfigError(f"generator learning rate must be > 0, got {lr}")
        if not weight_decay >= 0:
            raise ConfigError(f"generator weight decay must be ≥ 0, got {weight_decay}")
        self.generator = generator
        self.objective = objective
        self.batch_size = batch_size
        # the generator contract (see generators/): plain attributes, not submodules or tensors
        self.num_classes: int = getattr(generator, "num_classes")  # noqa: B009
        self.latent_dim: int = getattr(generator, "latent_dim")  # noqa: B009
        self.conditional: bool = bool(getattr(generator, "conditional"))  # noqa: B009
        if label_prior is not None:
            label_prior = torch.as_tensor(label_prior, dtype=torch.float64).flatten()
            if (
                label_prior.numel() != self.num_classes
                or bool((label_prior < 0).any())
                or float(label_prior.sum()) <= 0
            ):
                raise ConfigError(f"label prior must be {self.num_classes} non-negative numbers with a positive sum")
            label_prior = label_prior / label_prior.sum()
        self.label_prior = label_prior
        self.weight_decay = weight_decay
        self.optimizer = self._adam(lr)
        self._rng = torch.Generator().manual_seed(seed)

    def _adam(self, lr: float) -> torch.optim.Adam:
        return torch.optim.Adam(self.generator.parameters(), lr=lr, weight_decay=self.weight_decay)

    def reset_optimizer(self, lr: float) -> None:
        """A fresh Adam at ``lr`` (FedFTG re-creates the generator's optimizer every round)."""
        self.optimizer = self._adam(lr)

    def set_lr(self, lr: float) -> None:
        """Keep Adam's moments, change its learning rate (a per-round decay)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        """Generator, optimizer, noise stream and label prior (for checkpoints)."""
        return {
            "generator": self.generator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": self._rng.get_state(),
            "label_prior": self.label_prior,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._rng.set_state(state["rng"])
        self.label_prior = state["label_prior"]

    @property
    def device(self) -> torch.device:
        """The generator's device."""
        return next(self.generator.parameters()).device

    def check(self, teacher: nn.Module, student: nn.Module | None = None) -> None:
        """Raise :class:`ConfigError` if the objective cannot be computed with these models."""
        active = self.objective.active
        if "bn" in active and not bn_layers(teacher):
            raise ConfigError(
                "generator loss term 'bn' needs a teacher with BatchNorm layers (e.g. resnet8, mobilenetv2)"
            )
        if "adv" in active and student is None:
            raise ConfigError("generator loss term 'adv' needs a student")
        if "tv" in active or "act" in active:
            # one side-effect-free probe: no noise drawn, no BN statistics updated
            with torch.no_grad(), eval_mode(self.generator, teacher):
                z = torch.zeros(2, self.latent_dim, device=self.device)
                y = torch.zeros(2, dtype=torch.long, device=self.device) if self.conditional else None
                x = self.generator(z, y)
                feats = logits_and_features(teacher, x, y)[1] if "act" in active else None
            if "tv" in active and x.dim() != 4:
                raise ConfigError(
                    f"generator loss term 'tv' needs a generator of images (B, C, H, W); this one makes {tuple(x.shape[1:])}"
                )
            if "act" in active and feats is None:
                raise ConfigError("generator loss term 'act' needs a teacher with features")

    def noise(self, n: int | None = None) -> Noise:
        """``(z, y)`` for ``n`` samples (default: the batch size); ``y`` is ``None`` if unconditional."""
        n = n or self.batch_size
        z = torch.randn(n, self.latent_dim, generator=self._rng)
        y: Tensor | None = None
        if self.conditional:
            if self.label_prior is None:
                y = torch.randint(self.num_classes, (n,), generator=self._rng)
            else:
                y = torch.multinomial(self.label_prior, n, replacement=True, generator=self._rng)
        dev = self.device
        return z.to(dev), None if y is None else y.to(dev)

    def sample(self, n: int | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(x, y, z)``: ``n`` samples (default: the batch size); ``y`` is ``None`` if unconditional.

        Gradients flow to the generator unless called under ``torch.no_grad()``.
        """
        z, y = self.noise(n)
        return self.generator(z, y), y, z

    def loss(
        self,
        teacher: nn.Module,
        student: nn.Module | None = None,
        noise: Noise | None = None,
        weight: Tensor | None = None,
        div_scale: float = 1.0,
        x: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The generator loss and each active term (unweighted by the objective).

        Parameters
        ----------
        teacher, student : nn.Module
            The classifier(s) the objective is computed with.
        noise : (Tensor, Tensor or None), optional
            ``(z, y)`` to generate from; a fresh draw by default.
        weight : Tensor, optional
            Per-sample weights ``(B,)`` of this teacher: a client's share ``w_{k, y_b}`` of
            each sample's class. They weigh the adversarial term per sample and scale the
            fidelity term by their mean (the official FedFTG and FedGen reduction).
        div_scale : float
            Factor on the diversity term (FedFTG divides it by the number of clients); 0
            leaves it out.
        x : Tensor, optional
            ``G(z, y)`` already computed (with its graph), to share it between teachers.
        """
        active = self.objective.active
        terms: dict[str, Tensor] = {}
        z, y = noise if noise is not None else self.noise()
        x = self.generator(z, y) if x is None else x
        stats = BNStatistics(teacher) if "bn" in active else None
        if stats is not None:
            if any(m.training for m in stats.layers):
                raise ValueError("generator loss term 'bn' needs the teacher in eval mode")
            with stats:
                t_logits, feats = logits_and_features(teacher, x, y)
            terms["bn"] = stats.loss
        else:
            t_logits, feats = logits_and_features(teacher, x, y)
        if "oh" in active:
            terms["oh"] = oh_loss(t_logits, y) * (1.0 if weight is None else weight.mean())
        if "ie" in active:
            terms["ie"] = ie_loss(t_logits)
        if "act" in active:
            if feats is None:
                raise ConfigError("generator loss term 'act' needs a teacher with features")
            terms["act"] = act_loss(feats)
        if "adv" in active:
            if student is None:
                raise ConfigError("generator loss term 'adv' needs a student")
            t_side = t_logits.detach() if self.objective.adv_detach else t_logits
            terms["adv"] = adv_loss(
                student(x), t_side, self.objective.adv_metric, self.objective.temperature, weight
            )
        if "div" in active and div_scale > 0:
            terms["div"] = div_scale * div_loss(x, z)
        if "tv" in active:
            terms["tv"] = tv_loss(x)
        total = torch.stack([active[t] * terms[t] for t in TERMS if t in terms]).sum()
        return total, terms

    def _update(self, total: Tensor) -> None:
        params = [p for p in self.generator.parameters() if p.requires_grad]
        grads = torch.autograd.grad(total, params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(
        self,
        teacher: nn.Module,
        student: nn.Module | None = None,
        noise: Noise | None = None,
        per_member: str = "off",
    ) -> dict[str, float]:
        """Generator update(s) on one batch; returns ``g_loss`` and ``g_<term>`` per active term.

        ``per_member`` (see :data:`PER_MEMBER`), with an
        :class:`~fedkd.distill.EnsembleTeacher` of ``K`` members:

        * ``off``: one update against the ensemble as one teacher;
        * ``mean``: one update on ``Σ_k L_k + div``, where ``L_k`` is the objective with member
          ``k``'s logits weighted by its per-sample class shares ``w_{k, y_b}`` (they sum to
          1 over members): FedGen's generator loss, and the FedFTG repository's FedDF baseline;
        * ``steps``: one update per member on ``L_k + div / K`` (FedFTG).

        The statistics are summed over members, as one objective. ``noise`` (default: a fresh
        draw) is shared by all the updates.
        """
        check_choice("per-member generator updates", per_member, PER_MEMBER)
        self.generator.train()
        noise = noise if noise is not None else self.noise()
        out: dict[str, float] = {}

        def record(total: Tensor, terms: dict[str, Tensor]) -> None:
            out["g_loss"] = out.get("g_loss", 0.0) + float(total.detach())
            for t, v in terms.items():
                out[f"g_{t}"] = out.get(f"g_{t}", 0.0) + float(v.detach())

        if per_member == "off" or not isinstance(teacher, EnsembleTeacher):
            total, terms = self.loss(teacher, student, noise)
            self._update(total)
            record(total, terms)
            return out
        z, y = noise
        weights = teacher.sample_weights(z.shape[0], y, z.device)
        members = list(teacher.members)
        if per_member == "steps":
            for k, member in enumerate(members):
                total, terms = self.loss(member, student, noise, weights[:, k], 1.0 / len(members))
                self._update(total)
                record(total, terms)
            return out
        x = self.generator(z, y)
        parts = [self.loss(m, student, noise, weights[:, k], 0.0, x) for k, m in enumerate(members)]
        total = torch.stack([p[0] for p in parts]).sum()
        for _, terms in parts:
            record(torch.zeros(()), terms)
        if "div" in self.objective.active:
            div = div_loss(x, z)
            total = total + self.objective.active["div"] * div
            out["g_div"] = float(div.detach())
        self._update(total)
        out["g_loss"] = float(total.detach())
        log.debug("generator step: %s", out)
        return out

    @torch.no_grad()
    def generate(self, noise: Noise, mode: str = "train") -> tuple[Tensor, Tensor | None]:
        """Samples ``(x, y)`` of ``noise`` without gradient, the generator in ``mode``
        (``"eval"``: BatchNorm's running statistics, FedFTG's student steps)."""
        check_choice("sample mode", mode, SAMPLE_MODES)
        z, y = noise
        was = self.generator.training
        self.generator.train(mode == "train")
        try:
            return self.generator(z, y), y
        finally:
            self.generator.train(was)

    @torch.no_grad()
    def probe(self, z: Tensor, y: Tensor | None) -> Tensor:
        """``G(z, y)`` in train mode, as the student's batches are made, without side effects:
        BatchNorm updates its running statistics on copies, and no noise is drawn."""
        state = {k: v.clone() for k, v in self.generator.state_dict().items()}
        return torch.func.functional_call(self.generator, state, (z, y))

    def source(self, mode: str = "train") -> BatchSource:
        """A batch source for :class:`~fedkd.distill.StudentUpdater`: fresh ``(x, y)``, no gradient."""

        def draw() -> tuple[Tensor, Tensor | None]:
            return self.generate(self.noise(), mode)

        return draw


SAMPLE_MODES: tuple[str, ...] = ("train", "eval")

#: How ``fedkd dfkd`` makes pseudo-samples (config ``synthesizer.name``; the parameters of the
#: registered factory's keyword arguments with defaults are ``synthesizer.<name>.<param>``). A
#: factory is called as ``factory(generator, objective, batch_size, lr, seed, warmup, **params)``.
#: ``generator``: this module's continual :class:`Synthesizer`; ``fast`` and ``cmi``: :mod:`fedkd.inversion`.
SYNTHESIZERS: Registry[Any] = Registry("synthesizer")


@SYNTHESIZERS.register("generator")
def continual(generator: nn.Module, objective: Objective, batch_size: int, lr: float, seed: int, warmup: int) -> Synthesizer:
    """One generator trained for the whole run; every student step gets a fresh batch (DAFL, DFAD,
    LRA). ``warmup`` is handled by the caller (no student steps)."""
    return Synthesizer(generator, objective, batch_size, lr, seed=seed)
PER_MEMBER: tuple[str, ...] = ("off", "mean", "steps")


def check_choice(key: str, value: str, choices: Any) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def build_generator(name: str, out_shape: tuple[int, ...], num_classes: int, **params: Any) -> nn.Module:
    """Build the registered generator ``name`` for samples of ``out_shape`` and ``num_classes`` labels."""
    from generators import GENERATORS

    return GENERATORS.build(name, out_shape=tuple(out_shape), num_classes=num_classes, **params)


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Temporarily put ``modules`` in eval mode, restoring each one's mode afterwards."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
