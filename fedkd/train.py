"""Local training and evaluation: pure functions on modules and tensors.

No Flower here: the ClientApp, the tests and the benchmarks call these directly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedkd.registry import Registry
from fedkd.tasks import restricted_ce


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from (seed, partition-id, round, ...)."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1)
    )


def group_init_seed(seed: int, index: int) -> int:
    """The seed of the initial model of the ``index``-th architecture group (in the
    federation's group order): the server builds each group's first model under it, and a
    client whose own parts never travel rebuilds its group's initial parts from it."""
    return derive_seed(seed, 7919, index)


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` → cuda when available, else cpu; otherwise the named device, which must exist.

    Raises :class:`~fedkd.errors.ConfigError` naming ``key`` for a malformed or unavailable device.
    """
    from fedkd.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"{key} = {name!r} is not available: {why} (use auto or cpu)")
    index = int(name[5:]) if name.startswith("cuda:") else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{key} = {name!r} is not available: {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device(name)


@dataclass(frozen=True)
class LocalTrainConfig:
    """Hyper-parameters of one client's local update.

    ``steps > 0`` runs exactly that many SGD steps (cycling over the data);
    otherwise ``epochs`` full passes. ``proximal_mu > 0`` adds FedProx's
    ``(mu / 2) ||w - w_global||²``. In a class-continual run (:mod:`fedkd.tasks`) ``classes``
    are the current task's classes, over whose logits alone the cross-entropy is taken (empty:
    every logit), and ``old_classes`` those of the earlier tasks (for LwF's, EWC's and TARGET's
    terms) and ``seen_classes`` the earlier and the current tasks' together.
    """

    epochs: int = 1
    steps: int = 0
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    classes: tuple[int, ...] = ()
    old_classes: tuple[int, ...] = ()
    seen_classes: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, cfg: Any, proximal_mu: float = 0.0) -> LocalTrainConfig:
        """The ``clients.*`` keys of a run's config (FedProx's μ comes from the strategy)."""
        return cls(
            epochs=cfg.int("clients.local-epochs"),
            steps=cfg.int("clients.local-steps"),
            batch_size=cfg.int("clients.batch-size"),
            lr=cfg.float("clients.lr"),
            momentum=cfg.float("clients.momentum"),
            weight_decay=cfg.float("clients.weight-decay"),
            proximal_mu=proximal_mu,
        )


def batches(n: int, batch_size: int, generator: torch.Generator, steps: int = 0, epochs: int = 1) -> list[Tensor]:
    """Index batches: ``steps`` batches if ``steps > 0`` else ``epochs`` shuffled passes."""
    out: list[Tensor] = []
    if steps > 0:
        while len(out) < steps:
            perm = torch.randperm(n, generator=generator)
            out.extend(perm[i : i + batch_size] for i in range(0, n, batch_size))
        return out[:steps]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        out.extend(perm[i : i + batch_size] for i in range(0, n, batch_size))
    return out


class Regularizer(Protocol):
    """An extra term of the local loss: ``(model, logits, y, step) -> Tensor`` or ``None``."""

    def __call__(self, model: nn.Module, logits: Tensor, y: Tensor, step: int) -> Tensor | None: ...


def train_local(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: LocalTrainConfig,
    seed: int,
    device: torch.device | None = None,
    regularizer: Regularizer | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    rule: LocalRule | None = None,
) -> float:
    """Train ``model`` in place on ``(x, y)``; return the mean training loss.

    ``regularizer`` adds a term to each step's loss (e.g. :class:`FedGenRegularizer`).
    ``rule`` is a strategy's client side (:class:`LocalRule`: SCAFFOLD, FedDyn, MOON,
    FedNova): a loss term, a gradient correction before each optimizer step, and its
    outputs (state, arrays, metrics) computed at the end.
    ``on_epoch(epoch, mean_loss)`` is called after each full pass (``epochs`` mode only, not
    with ``steps``); it sees the model but must not change it.
    """
    device = device or torch.device("cpu")
    model.to(device).train()
    x, y = x.to(device), y.to(device)  # once: no per-step host-to-device copies
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout etc.
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu > 0 else None
    total, count = 0.0, 0
    per_epoch = math.ceil(len(x) / cfg.batch_size) if cfg.steps <= 0 else 0
    epoch_total, epoch_count = 0.0, 0
    steps = 0
    for step, idx in enumerate(batches(len(x), cfg.batch_size, gen, cfg.steps, cfg.epochs)):
        idx = idx.to(device)
        xb, yb = x[idx], y[idx]
        feats = None
        if rule is not None and rule.needs_features:
            feats = model.features(xb)  # type: ignore[operator]
            logits = model.classifier(feats)  # type: ignore[operator]
        else:
            logits = model(xb)
        loss = restricted_ce(logits, yb, cfg.classes) if cfg.classes else F.cross_entropy(logits, yb)
        if rule is not None and rule.ce_weight != 1.0:
            loss = rule.ce_weight * loss
        if regularizer is not None and (extra := regularizer(model, logits, yb, step)) is not None:
            loss = loss + extra
        if rule is not None and (term := rule.loss(model, xb, feats, logits, yb)) is not None:
            loss = loss + term
        if anchor is not None:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
            loss = loss + 0.5 * cfg.proximal_mu * prox
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if rule is not None:
            rule.correct(model)
        opt.step()
        steps += 1
        total += float(loss.detach()) * len(idx)
        count += len(idx)
        if on_epoch is not None and per_epoch:
            epoch_total += float(loss.detach()) * len(idx)
            epoch_count += len(idx)
            if (step + 1) % per_epoch == 0:
                on_epoch((step + 1) // per_epoch, epoch_total / max(epoch_count, 1))
                epoch_total, epoch_count = 0.0, 0
    if rule is not None:
        rule.after(model, x, y)
        rule.end(model, steps)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500, device: torch.device | None = None
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    device = device or torch.device("cpu")
    model.to(device).eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        out = model(xb)
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    n = max(len(x), 1)
    return loss / n, correct / n


class FedGenRegularizer:
    """FedGen's client-side regularizer (Zhu, Hong, Zhou, ICML 2021), applied in the first
    ``steps`` local steps with a frozen feature generator ``G(z | y)``:

    * ``β · KL(p_local(x) ‖ softmax(head(G(z | y))))`` for the batch's own labels, which pulls
      the local predictions toward what the shared generator implies;
    * ``(B_g / B) · α · CE(head(G(z | ŷ)), ŷ)`` with ``ŷ`` drawn from the global label prior,
      which teaches the local head the other clients' classes.

    The server sends α and β already decayed for the round.
    """

    def __init__(
        self,
        generator: nn.Module,
        alpha: float,
        beta: float,
        steps: int,
        gen_batch_size: int,
        label_prior: Tensor,
        seed: int,
    ) -> None:
        self.generator = generator.eval()
        for p in self.generator.parameters():
            p.requires_grad_(False)
        self.alpha, self.beta, self.steps, self.gen_batch_size = alpha, beta, steps, gen_batch_size
        self.prior = label_prior.double() / label_prior.double().sum()
        self.rng = torch.Generator().manual_seed(seed)
        self.latent_dim = int(getattr(generator, "latent_dim"))  # noqa: B009

    def _features(self, y: Tensor) -> Tensor:
        z = torch.randn(len(y), self.latent_dim, generator=self.rng).to(y.device)
        with torch.no_grad():
            return self.generator(z, y)

    def draw(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One step's generator draws, in RNG order: ``G(z | y)`` for the batch's labels, the
        sampled labels ``ŷ`` and ``G(z | ŷ)`` (the batched engine draws them ahead)."""
        f1 = self._features(y)
        ys = torch.multinomial(self.prior, self.gen_batch_size, replacement=True, generator=self.rng).to(y.device)
        return f1, ys, self._features(ys)

    def __call__(self, model: nn.Module, logits: Tensor, y: Tensor, step: int) -> Tensor | None:
        if step >= self.steps:
            return None
        head: nn.Module = getattr(model, "classifier")  # noqa: B009
        f1, ys, f2 = self.draw(y)
        with torch.no_grad():
            target = F.softmax(head(f1), dim=1)
        latent = self.beta * F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")
        teacher = self.alpha * F.cross_entropy(head(f2), ys)
        return latent + (self.gen_batch_size / len(y)) * teacher


# --------------------------------------------------------------------------- local-training rules
State = dict[str, Tensor]


class LocalRule:
    """The client side of a strategy's local update, between the server's message and the reply.

    The ClientApp builds one per train message from the strategy's ``rule`` config key
    (a name in :data:`LOCAL_RULES`), its ``rule.<param>`` keys (constructor keywords), the
    server's arrays for the rule (``rule-arrays``) and, for a :attr:`stateful` rule, the
    state this client saved at its last round (:mod:`fedkd.client_state`). During
    :func:`train_local` the rule adds :meth:`loss` to every step's loss and
    :meth:`correct`\\ s the gradients before every optimizer step; :meth:`end` then fills
    :attr:`state` (kept by the client), :attr:`arrays` (sent in the reply's
    ``rule-arrays``) and :attr:`metrics` (added to the reply's metrics).

    The model arrives holding the server's weights; rules that need them copy them here.
    """

    #: The rule keeps state between the client's rounds.
    stateful: ClassVar[bool] = False
    #: :meth:`loss` needs the batch's features (``model.features``), computed once with the logits.
    needs_features: ClassVar[bool] = False
    #: The weight of each step's cross-entropy (FML's α); :meth:`loss` adds the rest.
    ce_weight: float = 1.0

    def __init__(self, model: nn.Module, cfg: LocalTrainConfig, server: State, state: State | None) -> None:
        self.cfg = cfg
        self.state: State = {}
        self.arrays: State = {}
        self.metrics: dict[str, float] = {}

    def loss(self, model: nn.Module, x: Tensor, features: Tensor | None, logits: Tensor, y: Tensor) -> Tensor | None:
        """An extra term of this step's loss, or None."""
        return None

    def correct(self, model: nn.Module) -> None:
        """Change the gradients after ``backward``, before the optimizer step."""

    def after(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        """After the last step, before :meth:`end`, with the client's training data (e.g. to
        compute class prototypes on it)."""

    def end(self, model: nn.Module, steps: int) -> None:
        """After the last of ``steps`` optimizer steps: set :attr:`state`, :attr:`arrays`, :attr:`metrics`."""


#: Registered local-training rules: ``rule`` names a strategy sends to its clients.
LOCAL_RULES: Registry[type[LocalRule]] = Registry("local-training rule", "fedkd.rules")


def frozen_copy(model: nn.Module, weights: State | None = None) -> nn.Module:
    """A frozen copy of ``model`` (eval mode), holding ``weights`` (its whole state dict) when given."""
    ref = copy.deepcopy(model)
    if weights is not None:
        ref.load_state_dict(weights, strict=True)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def _params(model: nn.Module) -> State:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _like(params: State, given: State | None) -> State:
    """``given`` on the parameters' devices and dtypes, zeros where it has no entry."""
    given = given or {}
    return {n: given[n].to(p) if n in given else torch.zeros_like(p) for n, p in params.items()}


@LOCAL_RULES.register("scaffold")
class ScaffoldRule(LocalRule):
    """SCAFFOLD's client (Karimireddy et al., ICML 2020, Algorithm 1, option II).

    Every step's gradient becomes ``g + c − c_i`` (server control ``c``, from the message;
    client control ``c_i``, the client's state, zero at first). After ``K`` steps of lr
    ``η``: ``c_i⁺ = c_i − c + (x − y) / (K η)``; the client keeps ``c_i⁺`` and sends
    ``Δc_i = c_i⁺ − c_i``.
    """

    stateful = True

    def __init__(self, model: nn.Module, cfg: LocalTrainConfig, server: State, state: State | None) -> None:
        super().__init__(model, cfg, server, state)
        self.x = _params(model)
        self.c, self.ci = _like(self.x, server), _like(self.x, state)
        self.shift = {n: self.c[n] - self.ci[n] for n in self.x}

    def correct(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if p.grad is not None:
                p.grad.add_(self.shift[n])

    def end(self, model: nn.Module, steps: int) -> None:
        scale = 1.0 / (max(steps, 1) * self.cfg.lr)
        y = dict(model.named_parameters())
        new = {n: self.ci[n] - self.c[n] + (self.x[n] - y[n].detach()) * scale for n in self.x}
        self.state = new
        self.arrays = {n: new[n] - self.ci[n] for n in self.x}


@LOCAL_RULES.register("feddyn")
class FedDynRule(LocalRule):
    """FedDyn's client (Acar et al., ICLR 2021, Algorithm 1).

    The local objective is ``L_i(θ) − ⟨g_i, θ⟩ + (α/2) ||θ − x||²`` with ``x`` the server's
    model and ``g_i`` the client's state (zero at first); its gradient terms are added to
    every step's gradient. At the end ``g_i ← g_i − α (θ_i − x)``.
    """

    stateful = True

    def __init__(
        self, model: nn.Module, cfg: LocalTrainConfig, server: State, state: State | None, alpha: float = 0.01
    ) -> None:
        super().__init__(model, cfg, server, state)
        self.alpha = float(alpha)
        self.x = _params(model)
        self.g = _like(self.x, state)

    def correct(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if p.grad is not None:
                p.grad.add_(self.alpha * (p.detach() - self.x[n]) - self.g[n])

    def end(self, model: nn.Module, steps: int) -> None:
        y = dict(model.named_parameters())
        self.state = {n: self.g[n] - self.alpha * (y[n].detach() - self.x[n]) for n in self.x}


@LOCAL_RULES.register("moon")
class MoonRule(LocalRule):
    """MOON's client (Li, He, Song, CVPR 2021): model-contrastive learning.

    Adds ``μ · ℓ_con`` with ``ℓ_con = −log(e^{sim(z, z_glob)/τ} / (e^{sim(z, z_glob)/τ} +
    e^{sim(z, z_prev)/τ}))`` (cosine similarity) of the batch's features under the local
    model ``z``, the received global model ``z_glob`` and this client's model of its last
    round ``z_prev`` (its state). Without a previous model (a client's first round) there
    is no negative and the term is left out. Both reference models are frozen, in eval mode.
    """

    stateful = True
    needs_features = True

    def __init__(
        self,
        model: nn.Module,
        cfg: LocalTrainConfig,
        server: State,
        state: State | None,
        mu: float = 1.0,
        temperature: float = 0.5,
    ) -> None:
        super().__init__(model, cfg, server, state)
        self.mu, self.temperature = float(mu), float(temperature)
        self.glob = frozen_copy(model)
        self.prev = frozen_copy(model, state) if state is not None else None

    def loss(self, model: nn.Module, x: Tensor, features: Tensor | None, logits: Tensor, y: Tensor) -> Tensor | None:
        if self.prev is None or self.mu == 0 or features is None:
            return None
        with torch.no_grad():
            zg = self.glob.features(x)  # type: ignore[operator]
            zp = self.prev.features(x)  # type: ignore[operator]
        pos = F.cosine_similarity(features, zg, dim=1) / self.temperature
        neg = F.cosine_similarity(features, zp, dim=1) / self.temperature
        target = torch.zeros(len(x), dtype=torch.long, device=x.device)
        return self.mu * F.cross_entropy(torch.stack([pos, neg], dim=1), target)

    def end(self, model: nn.Module, steps: int) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}


def nova_normalizer(steps: int, momentum: float) -> float:
    """FedNova's ``a_i = ||a||₁`` of local SGD with momentum ``ρ``: ``τ`` without momentum,
    ``(τ − ρ (1 − ρ^τ) / (1 − ρ)) / (1 − ρ)`` with it (Wang et al., NeurIPS 2020, §4)."""
    if momentum <= 0:
        return float(steps)
    r = momentum
    return (steps - r * (1 - r**steps) / (1 - r)) / (1 - r)


@LOCAL_RULES.register("fednova")
class FedNovaRule(LocalRule):
    """FedNova's client: ordinary local SGD that reports its step count ``τ_i`` and normalizer
    ``a_i`` (:func:`nova_normalizer`) for the server's normalized averaging."""

    def end(self, model: nn.Module, steps: int) -> None:
        self.metrics = {"fednova-steps": float(steps), "fednova-a": nova_normalizer(steps, self.cfg.momentum)}


class PersonalRule(LocalRule):
    """A client that keeps its own copy of part of the model between its rounds.

    :meth:`local_names` says which state-dict entries are the client's own. They never
    travel: the server's messages leave them out and send the group's initial-model seed
    (``init-seed``), from which a client rebuilds them (:func:`fedkd.client_app.received_model`),
    and the replies leave them out too. At construction the client's saved copy replaces them
    (its first round starts from the group's initial values); :meth:`end` saves them.
    Federated evaluation applies the same copy (:meth:`personalize`), so per-client accuracy is
    the personalized model's. The server's model of the group keeps its initial values for
    these entries: judge these methods per client.
    """

    stateful = True

    @classmethod
    def local_names(cls, model: nn.Module) -> list[str]:
        raise NotImplementedError

    @classmethod
    def personalize(cls, model: nn.Module, state: State | None) -> None:
        """Load the client's own entries of ``state`` into ``model``."""
        if not state:
            return
        own = model.state_dict()
        with torch.no_grad():
            for name in cls.local_names(model):
                if name in state:
                    own[name].copy_(state[name].to(own[name]))

    @classmethod
    def evaluation_model(cls, model: nn.Module, server: State) -> nn.Module:
        """The model federated evaluation scores (``server``: the evaluate message's rule
        arrays); the personalized model itself unless the method predicts otherwise."""
        return model

    def __init__(self, model: nn.Module, cfg: LocalTrainConfig, server: State, state: State | None) -> None:
        super().__init__(model, cfg, server, state)
        self.personalize(model, state)

    def end(self, model: nn.Module, steps: int) -> None:
        own = model.state_dict()
        self.state = {n: own[n].detach().clone() for n in self.local_names(model)}


def kept_entries(rule: str, model: nn.Module) -> list[str]:
    """The state-dict entries of ``model`` that the clients of local-training rule ``rule`` keep
    as their own and never send (:meth:`PersonalRule.local_names`); ``[]`` for any other rule
    or none (``""``)."""
    if not rule:
        return []
    cls = LOCAL_RULES.get(rule)
    return list(cls.local_names(model)) if issubclass(cls, PersonalRule) else []


@LOCAL_RULES.register("fedbn")
class FedBNRule(PersonalRule):
    """FedBN's client (Li et al., ICLR 2021): its BatchNorm layers (affine parameters and running
    statistics) stay local; everything else is FedAvg's."""

    @classmethod
    def local_names(cls, model: nn.Module) -> list[str]:
        return [f"{m}.{k}" if m else k for m, mod in model.named_modules()
                if isinstance(mod, nn.modules.batchnorm._BatchNorm) for k in mod.state_dict()]  # fmt: skip


@LOCAL_RULES.register("fedper")
class FedPerRule(PersonalRule):
    """FedPer's client (Arivazhagan et al., 2019): the classifier head stays local, the rest
    (the base) is averaged; the whole model trains together."""

    @classmethod
    def local_names(cls, model: nn.Module) -> list[str]:
        return [n for n in model.state_dict() if n.startswith("classifier.")]


@LOCAL_RULES.register("fedrep")
class FedRepRule(FedPerRule):
    """FedRep's client (Collins et al., ICML 2021): the head stays local; the first ``head_steps``
    optimizer steps train only the head, the rest only the representation (the official
    ``LocalUpdate``: ``local_ep − local_rep_ep`` head epochs, then ``local_rep_ep`` body epochs).
    The frozen part's gradients are dropped (``grad = None``), so momentum and weight decay do
    not move it either."""

    def __init__(
        self, model: nn.Module, cfg: LocalTrainConfig, server: State, state: State | None, head_steps: int = 10
    ) -> None:
        super().__init__(model, cfg, server, state)
        self.head_steps = int(head_steps)
        self.step = 0
        self.head = set(self.local_names(model))

    def correct(self, model: nn.Module) -> None:
        head_phase = self.step < self.head_steps
        for name, p in model.named_parameters():
            if (name in self.head) != head_phase:
                p.grad = None
        self.step += 1


@LOCAL_RULES.register("lgfedavg")
class LGFedAvgRule(PersonalRule):
    """LG-FedAvg's client (Liang et al., 2020, "Think locally, act globally"): everything but the
    classifier head (the local representation) stays local; the head is the global part."""

    @classmethod
    def local_names(cls, model: nn.Module) -> list[str]:
        return [n for n in model.state_dict() if not n.startswith("classifier.")]


@LOCAL_RULES.register("fd")
class FDRule(PersonalRule):
    """Federated distillation's client (FD / FedDistill: Jeong et al., 2018; PFLlib's
    ``clientdistill.py``): the whole model stays local; every step adds
    ``λ · MSE(z', z)``, ``z'`` the batch's logits with each row whose label has a global
    logit replaced by it (a mean over batch × classes, as PFLlib's ``nn.MSELoss``); the logits
    of every training sample are summed per class and their means sent (``logits``, with
    ``counts``) for the server's per-class average."""

    def __init__(
        self, model: nn.Module, cfg: LocalTrainConfig, server: State, state: State | None, lamda: float = 1.0
    ) -> None:
        super().__init__(model, cfg, server, state)
        self.lamda = float(lamda)
        self.global_logits = server.get("logits")
        self.has = server["has"].bool() if "has" in server else None
        self.sums: Tensor | None = None
        self.counts: Tensor | None = None

    @classmethod
    def local_names(cls, model: nn.Module) -> list[str]:
        return list(model.state_dict())

    def loss(self, model: nn.Module, x: Tensor, features: Tensor | None, logits: Tensor, y: Tensor) -> Tensor | None:
        c = logits.shape[1]
        if self.sums is None:
            self.sums = torch.zeros(c, c, dtype=torch.float64, device=logits.device)
            self.counts = torch.zeros(c, dtype=torch.float64, device=logits.device)
        assert self.counts is not None
        self.sums.index_add_(0, y, logits.detach().double())
        self.counts += torch.bincount(y, minlength=c).double()
        if self.global_logits is None or self.has is None or self.lamda == 0:
            return None
        target = logits.detach().clone()
        rows = self.has.to(y.device)[y]
        target[rows] = self.global_logits.to(target)[y[rows]]
        return self.lamda * F.mse_loss(logits, target)

    def end(self, model: nn.Module, steps: int) -> None:
        super().end(model, steps)
        if self.sums is not None and self.counts is not None:
            means = self.sums / self.counts.clamp(min=1).unsqueeze(1)
            self.arrays = {"logits": means.float(), "counts": self.counts.float()}


@torch.no_grad()
def class_prototypes(model: nn.Module, x: Tensor, y: Tensor) -> State:
    """Per-class mean features of ``(x, y)`` in eval mode (``protos``, C × D, zeros for absent
    classes) and the class counts (``counts``): what FedProto and FedGH clients send."""
    was = model.training
    model.eval()
    c = int(getattr(model, "num_classes", int(y.max()) + 1))
    sums: Tensor | None = None
    counts = torch.zeros(c, dtype=torch.float64, device=x.device)
    for i in range(0, len(x), 500):
        h = model.features(x[i : i + 500]).double()  # type: ignore[operator]
        sums = torch.zeros(c, h.shape[1], dtype=torch.float64, device=h.device) if sums is None else sums
        sums.index_add_(0, y[i : i + 500], h)
        counts += torch.bincount(y[i : i + 500], minlength=c).double()
    model.train(was)
    if sums is None:
        return {}
    return {"protos": (sums / counts.clamp(min=1).unsqueeze(1)).float(), "counts": counts.float()}


class _NearestPrototype(nn.Module):
    """Scores ``−‖features(x) − p_c‖²`` per class: argmax is FedProto's nearest-prototype
    prediction (classes without a prototype score −10⁹)."""

    def __init__(self, model: nn.Module, protos: Tensor, has: Tensor) -> None:
        super().__init__()
        self.model, self.protos, self.has = model, protos, has.bool()

    def forward(self, x: Tensor) -> Tensor:
        h = self.model.features(x)  # type: ignore[operator]
        d = ((h[:, None, :] - self.protos.to(h)[None]) ** 2).sum(-1)
        return (-d).masked_fill(~self.has.to(h.device)[None], -1e9)  # (finite: the loss stays a number)


@LOCAL_RULES.register("fedproto")
class FedProtoRule(PersonalRule):
    """FedProto's client (Tan et al., AAAI 2022; PFLlib's ``clientproto.py``): the whole model
    stays local; every step adds ``λ · MSE(h', h)``, ``h`` the batch's features and ``h'``
    them with each row whose label has a global prototype replaced by it (mean over batch ×
    dimensions, as ``nn.MSELoss``). After training, in eval mode, the per-class mean features
    of its training data are its prototypes (``protos``, with ``counts``). Evaluation is by
    the nearest global prototype (the head, before there are any)."""

    needs_features = True

    def __init__(
        self, model: nn.Module, cfg: LocalTrainConfig, server: State, state: State | None, lamda: float = 1.0
    ) -> None:
        super().__init__(model, cfg, server, state)
        self.lamda = float(lamda)
        self.protos = server.get("protos")
        self.has = server["has"].bool() if "has" in server else None

    @classmethod
    def local_names(cls, model: nn.Module) -> list[str]:
        return list(model.state_dict())

    @classmethod
    def evaluation_model(cls, model: nn.Module, server: State) -> nn.Module:
        if "protos" not in server or "has" not in server or not server["has"].any():
            return model
        return _NearestPrototype(model, server["protos"], server["has"])

    def loss(self, model: nn.Module, x: Tensor, features: Tensor | None, logits: Tensor, y: Tensor) -> Tensor | None:
        if features is None or self.protos is None or self.has is None or self.lamda == 0:
            return None
        target = features.detach().clone()
        rows = self.has.to(y.device)[y]
        target[rows] = self.protos.to(target)[y[rows]]
        return self.lamda * F.mse_loss(features, target)

    def after(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        self.arrays = class_prototypes(model, x, y)


@LOCAL_RULES.register("fedgh")
class FedGHRule(LGFedAvgRule):
    """FedGH's client (Yi et al., ACM MM 2023; PFLlib / HtFLlib ``clientgh.py``): the
    representation stays local, the head is the server's generalized global header (it
    arrives in the model); training is plain cross-entropy over the whole model; after it,
    the per-class mean features of the training data (eval mode) are sent for the server to
    train the header on."""

    def after(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        self.arrays = class_prototypes(model, x, y)


# --------------------------------------------------------------------------- a shared second model
SVD_SUFFIXES = ("@u", "@s", "@v")


def compress_svd(state: State, energy: float) -> State:
    """FedKD's update compression: every weight matrix ``W`` (2-D, both sides > 1) becomes the
    factors ``U_r, σ_r, V_r`` of its truncated SVD (keys ``name@u``, ``name@s``, ``name@v``),
    ``r`` the fewest singular values whose squares hold ``energy`` of ``‖W‖²_F``; a matrix stays
    whole when the factors would not be smaller, and so does everything else. ``energy ≥ 1``
    sends everything whole."""
    out: State = {}
    for name, w in state.items():
        if energy < 1 and w.ndim == 2 and min(w.shape) > 1 and w.is_floating_point():
            u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
            cum = (s**2).cumsum(0)
            r = min(int((cum < energy * cum[-1]).sum()) + 1, len(s))
            if r * (w.shape[0] + w.shape[1] + 1) < w.numel():
                out[name + "@u"], out[name + "@s"], out[name + "@v"] = (
                    u[:, :r].to(w.dtype), s[:r].to(w.dtype), vh[:r].to(w.dtype)
                )
                continue
        out[name] = w
    return out


def recover_svd(arrays: State) -> State:
    """The inverse of :func:`compress_svd` (exact for the entries sent whole)."""
    out: State = {}
    for name, v in arrays.items():
        if name.endswith("@u"):
            base = name[:-2]
            out[base] = (v * arrays[base + "@s"][None, :]) @ arrays[base + "@v"]
        elif not name.endswith(SVD_SUFFIXES):
            out[name] = v
    return out


class SharedModelRule(PersonalRule):
    """A client that keeps its whole model and trains a second, *shared* model beside it, one
    architecture for every client, which the server averages (FML's meme model, FedKD's
    mentee). The shared model's weights arrive in the rule's arrays (whole, or as
    :func:`compress_svd` factors) and leave in them after training; its optimizer is the local
    one's recipe (SGD, ``lr``, momentum, weight decay), stepped in :meth:`correct` on the
    gradients that the step's single backward left on it. ``clip > 0`` clips each model's
    gradient norm first (PFLlib / HtFLlib clip both at 10, "to prevent divergence")."""

    def __init__(
        self, model: nn.Module, cfg: LocalTrainConfig, server: State, state: State | None,
        shared: str = "", clip: float = 10.0,
    ) -> None:  # fmt: skip
        from fedkd.models import build_model

        super().__init__(model, cfg, server, state)
        weights = recover_svd(server)
        if "classifier.weight" not in weights:
            raise ValueError(f"{type(self).__name__}: the server sent no shared model")
        ref = next(model.parameters())
        fd = int(weights["classifier.weight"].shape[1])
        self.shared = build_model(shared, model.in_shape, model.num_classes, fd)  # type: ignore[arg-type]
        self.shared.load_state_dict(weights)
        self.shared.to(device=ref.device, dtype=ref.dtype).train()
        self.clip = float(clip)
        self.extra: list[nn.Parameter] = []  # further parameters the shared optimizer steps (FedKD's W_h)

    def _optimizer(self) -> None:
        params = [*self.shared.parameters(), *self.extra]
        self.opt = torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)

    @classmethod
    def local_names(cls, model: nn.Module) -> list[str]:
        return list(model.state_dict())

    def correct(self, model: nn.Module) -> None:
        if self.clip > 0:
            for group in (list(model.parameters()), list(self.shared.parameters()), self.extra):
                if group:
                    nn.utils.clip_grad_norm_(group, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def shared_arrays(self) -> State:
        return {k: v.detach().clone() for k, v in self.shared.state_dict().items()}

    def end(self, model: nn.Module, steps: int) -> None:
        super().end(model, steps)
        self.arrays = self.shared_arrays()


@LOCAL_RULES.register("fml")
class FMLRule(SharedModelRule):
    """FML's client (Shen et al., 2020, "Federated Mutual Learning"): deep mutual learning
    between the local model and the shared meme model, each minimizing its own loss,

    ``L_local = α CE(local) + (1 − α) KL(p_meme ‖ p_local)`` and
    ``L_meme = β CE(meme) + (1 − β) KL(p_local ‖ p_meme)``,

    the other model's prediction a fixed target in each KL (true KL: summed over classes,
    averaged over the batch). One backward of their sum gives each model exactly the gradient
    of its own loss."""

    def __init__(
        self, model: nn.Module, cfg: LocalTrainConfig, server: State, state: State | None,
        shared: str = "", clip: float = 10.0, alpha: float = 0.5, beta: float = 0.5,
    ) -> None:  # fmt: skip
        super().__init__(model, cfg, server, state, shared, clip)
        self.alpha, self.beta = float(alpha), float(beta)
        self.ce_weight = self.alpha
        self._optimizer()

    def loss(self, model: nn.Module, x: Tensor, features: Tensor | None, logits: Tensor, y: Tensor) -> Tensor | None:
        s = self.shared(x)
        kl_local = F.kl_div(F.log_softmax(logits, 1), F.softmax(s.detach(), 1), reduction="batchmean")
        kl_meme = F.kl_div(F.log_softmax(s, 1), F.softmax(logits.detach(), 1), reduction="batchmean")
        return (1 - self.alpha) * kl_local + self.beta * F.cross_entropy(s, y) + (1 - self.beta) * kl_meme


@LOCAL_RULES.register("fedkd")
class FedKDRule(SharedModelRule):
    """FedKD's client (Wu et al., Nature Communications 2022; the official ``model_bert.py`` and
    PFLlib / HtFLlib ``clientkd.py``): the local mentor and the shared mentee learn from each
    other with losses scaled by how well both already do,

    ``CE_t + CE_s + (KL(p_s ‖ p_t) + KL(p_t ‖ p_s) + 2 MSE(h_t, W_h h_s)) / (CE_t + CE_s)``,

    one loss for both models, nothing detached (as the official code), the KL terms as
    ``nn.KLDivLoss()``'s default mean over batch × classes, ``W_h`` (shared features → local
    features, no bias) a local parameter kept between rounds. The mentee leaves as
    :func:`compress_svd` factors at this round's ``energy``."""

    needs_features = True

    def __init__(
        self, model: nn.Module, cfg: LocalTrainConfig, server: State, state: State | None,
        shared: str = "", clip: float = 10.0, energy: float = 1.0,
    ) -> None:  # fmt: skip
        super().__init__(model, cfg, server, state, shared, clip)
        self.energy = float(energy)
        ref = next(model.parameters())
        local_dim, shared_dim = int(model.feature_dim), int(self.shared.feature_dim)  # type: ignore[arg-type]
        w = torch.empty(local_dim, shared_dim, dtype=torch.float64)
        bound = 1.0 / math.sqrt(shared_dim)  # nn.Linear's default initialization, from a fixed seed
        w.uniform_(-bound, bound, generator=torch.Generator().manual_seed(0))
        if state and "W_h" in state and tuple(state["W_h"].shape) == (local_dim, shared_dim):
            w = state["W_h"].double()
        self.w_h = nn.Parameter(w.to(device=ref.device, dtype=ref.dtype))
        self.extra = [self.w_h]
        self._optimizer()

    def loss(self, model: nn.Module, x: Tensor, features: Tensor | None, logits: Tensor, y: Tensor) -> Tensor | None:
        assert features is not None
        h_s = self.shared.features(x)  # type: ignore[operator]
        s = self.shared.classifier(h_s)  # type: ignore[operator]
        ce_t, ce_s = F.cross_entropy(logits, y), F.cross_entropy(s, y)
        c = logits.shape[1]  # nn.KLDivLoss()'s mean over batch × classes: KL / C
        kl_t = F.kl_div(F.log_softmax(logits, 1), F.softmax(s, 1), reduction="batchmean") / c
        kl_s = F.kl_div(F.log_softmax(s, 1), F.softmax(logits, 1), reduction="batchmean") / c
        hidden = F.mse_loss(features, h_s @ self.w_h.T)
        return ce_s + (kl_t + kl_s + 2 * hidden) / (ce_t + ce_s)

    def end(self, model: nn.Module, steps: int) -> None:
        super().end(model, steps)
        self.state["W_h"] = self.w_h.detach().clone()
        self.arrays = compress_svd(self.arrays, self.energy)


# --------------------------------------------------------------------------- class-continual rules
@LOCAL_RULES.register("lwf")
class LwFRule(LocalRule):
    """Learning without Forgetting's client in a class-continual run (Li & Hoiem, 2017; the
    federated form of TARGET's code, ``methods/lwf.py``): from the second task on, each step
    adds ``λ · Σ_c −softmax(t_c / T) log softmax(s_c / T)`` (over the earlier tasks' classes
    ``c``, mean over the batch, no ``T²``) between the local model's logits ``s`` and the old
    global model's ``t`` (the global model at the end of the previous task, from the server's
    ``rule-arrays``; frozen, in eval mode) on the client's own current-task batch.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: LocalTrainConfig,
        server: State,
        state: State | None,
        lamda: float = 3.0,
        temperature: float = 2.0,
    ) -> None:
        super().__init__(model, cfg, server, state)
        self.lamda, self.temperature = float(lamda), float(temperature)
        self.old = frozen_copy(model, server) if server and cfg.old_classes and self.lamda > 0 else None
        self.cols = torch.as_tensor(cfg.old_classes, dtype=torch.long)

    def loss(self, model: nn.Module, x: Tensor, features: Tensor | None, logits: Tensor, y: Tensor) -> Tensor | None:
        if self.old is None:
            return None
        from fedkd.tasks import soft_ce

        cols = self.cols.to(x.device)
        with torch.no_grad():
            teacher = self.old(x)[:, cols]
        return self.lamda * soft_ce(logits[:, cols], teacher, self.temperature)


def fisher_diagonal(
    model: nn.Module, x: Tensor, y: Tensor, classes: tuple[int, ...], batch_size: int, cap: float
) -> State:
    """The empirical Fisher's diagonal as TARGET's code computes it (``methods/ewc.py``
    ``getFisherDiagonal``): the squared gradient of each batch's mean cross-entropy (over the
    logits of ``classes``; every logit when empty), averaged over the batches, clamped at
    ``cap``; on a copy of the model in train mode (the model itself is left as it is)."""
    from fedkd.tasks import restricted_ce

    m = copy.deepcopy(model).train()
    fisher = {n: torch.zeros_like(p) for n, p in m.named_parameters() if p.requires_grad}
    nb = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        out = m(xb)
        loss = restricted_ce(out, yb, classes) if classes else F.cross_entropy(out, yb)
        m.zero_grad(set_to_none=True)
        loss.backward()
        for n, p in m.named_parameters():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2
        nb += 1
    return {n: (f / max(nb, 1)).clamp(max=cap) for n, f in fisher.items()}


@LOCAL_RULES.register("ewc")
class EWCRule(LocalRule):
    """Elastic Weight Consolidation's client in a class-continual run (Kirkpatrick et al., PNAS
    2017; the federated form of TARGET's code, ``methods/ewc.py``, with its λ and Fisher cap).

    From the second task on, each step adds ``λ/2 · Σ F (θ − θ_old)²`` over the parameters:
    ``θ_old`` is the old global model (the global model at the end of the previous task, from
    the server's ``rule-arrays``), ``F`` this client's consolidated Fisher diagonal of the
    earlier tasks (its state). After every local update the client computes the Fisher of its
    current-task data (:func:`fisher_diagonal`, over the seen classes' logits, as the official
    head holds exactly those) and keeps it; when it first trains in a later task it folds that
    Fisher into the consolidated one, weighted by the classes each covers (the official
    ``alpha = known / total``).
    """

    stateful = True

    def __init__(
        self,
        model: nn.Module,
        cfg: LocalTrainConfig,
        server: State,
        state: State | None,
        lamda: float = 1000.0,
        fisher_max: float = 1e-4,
    ) -> None:
        super().__init__(model, cfg, server, state)
        self.lamda, self.fisher_max = float(lamda), float(fisher_max)
        state = dict(state or {})
        old = {k[4:]: v for k, v in state.items() if k.startswith("old.")}
        cur = {k[4:]: v for k, v in state.items() if k.startswith("cur.")}
        # the task of the stored Fisher, marked by how many classes came before it
        marker = int(state["cur-old"]) if "cur-old" in state else -1
        covered = int(state["old-classes"]) if "old-classes" in state else 0
        if cur and marker < len(cfg.old_classes):  # the task it was computed in is over: consolidate it
            k = int(state["cur-classes"])
            old = {n: (covered * old[n] + k * f) / (covered + k) if n in old else f for n, f in cur.items()}
            covered += k
        self.consolidated, self.covered = old, covered
        params = dict(model.named_parameters())
        self.anchor = {n: server[n].to(p) for n, p in params.items() if n in server}
        self.fisher = {n: f.to(params[n]) for n, f in old.items() if n in params and n in self.anchor}
        self.data: tuple[Tensor, Tensor] | None = None

    def loss(self, model: nn.Module, x: Tensor, features: Tensor | None, logits: Tensor, y: Tensor) -> Tensor | None:
        if not self.fisher or not self.cfg.old_classes or self.lamda == 0:
            return None
        params = dict(model.named_parameters())
        pen = sum((f * (params[n] - self.anchor[n]) ** 2).sum() for n, f in self.fisher.items())
        return self.lamda * 0.5 * pen  # type: ignore[operator,return-value]

    def after(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        self.data = (x, y)

    def end(self, model: nn.Module, steps: int) -> None:
        assert self.data is not None
        x, y = self.data
        seen = self.cfg.seen_classes
        cur = fisher_diagonal(model, x, y, seen, self.cfg.batch_size, self.fisher_max)
        self.state = {
            **{f"old.{n}": v.detach().clone() for n, v in self.consolidated.items()},
            **{f"cur.{n}": v for n, v in cur.items()},
            "cur-old": torch.tensor(len(self.cfg.old_classes)),
            "cur-classes": torch.tensor(max(len(seen) - len(self.cfg.old_classes), 1)),
            "old-classes": torch.tensor(self.covered),
        }
