"""Knowledge-distillation core: KD losses, ensemble teachers, a memory buffer, student updates.

Everything here is pure (modules and tensors in, tensors and floats out): the centralized
study (:mod:`fedkd.dfkd`) and the federated strategies call the same code.

The one student-update API is :class:`StudentUpdater`: given a student, a teacher, an
optimizer and a batch source (a callable returning fresh pseudo-inputs), ``run`` does ``k``
steps under an :class:`UpdateRule`:

* ``plain`` (DFAD): the KD loss on the fresh batch;
* ``replay`` (MB-DFKD): the KD loss on the fresh batch ∪ a replayed memory batch;
* ``lra`` ("Learning to Retain while Acquiring", Patel et al. CVPR 2023): acquisition
  ``θ' = θ − α ∇L(θ; x_new)``, retention ``L(θ'; x_mem)``, outer step on
  ``∇θ [β L(θ'; x_mem) + L(θ; x_new ∪ x_mem)]``; ``second-order`` differentiates through
  ``θ'`` (``create_graph``), ``first-order`` applies the gradient taken at ``θ'`` to ``θ``;
* ``lra-official``: what the official LRA code's student step computes. Its retention loss
  is taken through ``higher.innerloop_ctx`` with the default ``copy_initial_weights=True``,
  so that gradient reaches a detached copy and never the student: the step is replay's,
  ``∇θ L(θ; x_new ∪ x_mem)``. Use it with LRA's memory schedule (one stored batch replayed
  per step, ``MemoryBuffer(mode="batch")``) to reproduce the paper's runs.

Rules work on functional parameters (:func:`torch.func.functional_call`), so they apply to
any registered model, BatchNorm included, and the retention gradient really reaches the
student (the official LRA code loses it through ``higher``'s ``copy_initial_weights``).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap
from torch.nn import functional as F

from fedkd.errors import ConfigError
from fedkd.registry import Registry

log = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``(student_logits, teacher_logits) -> scalar`` loss."""

BatchSource = Callable[[], tuple[Tensor, Tensor | None]]
"""A callable returning a fresh batch of pseudo-inputs and their labels (or ``None``)."""


# --------------------------------------------------------------------------- KD losses


def kd_kl(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Hinton's KD loss ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over the batch.

    Parameters
    ----------
    student, teacher : Tensor
        Logits ``(B, C)``.
    temperature : float
        Softening temperature ``T``.
    """
    t = temperature
    return F.kl_div(
        F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True
    ) * (t * t)


def kd_l1(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean absolute difference of logits (DFAD, LRA); ``temperature`` is ignored."""
    return F.l1_loss(student, teacher)


def js_divergence(student: Tensor, teacher: Tensor, temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """Jensen–Shannon divergence of ``softmax(s/T)`` and ``softmax(t/T)`` in nats, batch mean
    (``reduction="none"``: one value per sample).

    ``JS = ½ KL(p ‖ m) + ½ KL(q ‖ m)`` with ``m = (p + q) / 2``; it lies in ``[0, ln 2]``.
    """
    lp = F.log_softmax(student / temperature, 1)
    lq = F.log_softmax(teacher / temperature, 1)
    lm = torch.logsumexp(torch.stack([lp, lq]), 0) - math.log(2.0)
    kl_pm = (lp.exp() * (lp - lm)).sum(1)
    kl_qm = (lq.exp() * (lq - lm)).sum(1)
    per = 0.5 * (kl_pm + kl_qm)
    return per if reduction == "none" else per.mean()


def kd_ce(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Soft-target cross-entropy ``−T² Σ_c softmax(t/T)_c log softmax(s/T)_c``, batch mean.

    Its gradient in the student equals :func:`kd_kl`'s (they differ by the teacher's
    entropy); FedFTG's official loss is this one reduced over batch × classes, i.e. ``/ C``.
    """
    t = temperature
    return -(F.softmax(teacher / t, 1) * F.log_softmax(student / t, 1)).sum(1).mean() * (t * t)


KD_LOSSES: Registry[Callable[[Tensor, Tensor, float], Tensor]] = Registry("KD loss")
KD_LOSSES.add("kl", kd_kl)
KD_LOSSES.add("ce", kd_ce)
KD_LOSSES.add("l1", kd_l1)
KD_LOSSES.add("js", js_divergence)

#: How a KD loss is reduced: ``batchmean`` sums over classes and averages over the batch;
#: ``mean`` averages over batch × classes (torch's default ``reduction="mean"``, i.e.
#: ``batchmean / C``); ``auto`` keeps each loss's own (``l1``: mean, the others: batchmean).
REDUCTIONS: tuple[str, ...] = ("auto", "batchmean", "mean")
_NATIVE = {"l1": "mean"}


def kd_loss(name: str, temperature: float = 1.0, reduction: str = "auto") -> LossFn:
    """The registered KD loss ``name`` as a two-argument function ``(student, teacher)``.

    ``reduction`` (see :data:`REDUCTIONS`) rescales the loss by the number of classes when it
    differs from the loss's own reduction, so that a recipe's "mean over batch × classes"
    (a 1/C smaller step) is reproduced exactly.
    """
    fn = KD_LOSSES.get(name)
    if temperature <= 0:
        raise ConfigError(f"KD temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ConfigError(f"KD loss reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    native = _NATIVE.get(name, "batchmean")
    want = native if reduction == "auto" else reduction

    def loss(student: Tensor, teacher: Tensor) -> Tensor:
        value = fn(student, teacher, temperature)
        if want == native:
            return value
        classes = student.shape[1]
        return value / classes if want == "mean" else value * classes

    loss.__name__ = f"kd_{name}"
    return loss


# --------------------------------------------------------------------------- teachers


class _LogitsAndFeatures(nn.Module):
    """``x → (classifier(features(x)), features(x))`` of a fedkd model, as one module."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.inner.features(x)  # type: ignore[operator]
        return self.inner.classifier(h), h  # type: ignore[operator]


class _Stack:
    """Members of one architecture as one vmapped ``functional_call`` over stacked weights."""

    def __init__(self, members: Sequence[nn.Module], index: Sequence[int]) -> None:
        self.index = list(index)
        params, buffers = stack_module_state(list(members))  # copies: the members stay as they are
        self.state = {n: v.detach() for n, v in {**params, **buffers}.items()}
        self.template = copy.deepcopy(members[0]).to("meta")
        first = members[0]
        self.features = None
        if callable(getattr(first, "features", None)) and isinstance(getattr(first, "classifier", None), nn.Module):
            self.features = _LogitsAndFeatures(self.template)

    def __call__(self, x: Tensor, features: bool) -> tuple[Tensor, Tensor | None]:
        """Logits ``(G, B, C)`` of the group's members and, with ``features`` (when they have
        them), their features ``(G, B, D)``."""
        if features and self.features is not None:
            wrapped = self.features
            state = {f"inner.{n}": v for n, v in self.state.items()}

            def both(s: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
                out: tuple[Tensor, Tensor] = functional_call(wrapped, s, (x,))
                return out

            lg, h = vmap(both, in_dims=(0, None))(state, x)
            return lg, h
        template = self.template

        def plain(s: dict[str, Tensor], x: Tensor) -> Tensor:
            out: Tensor = functional_call(template, s, (x,))
            return out

        return vmap(plain, in_dims=(0, None))(self.state, x), None


class EnsembleTeacher(nn.Module):
    """An ensemble of classifiers acting as one teacher.

    Uniform (``label_counts=None``): every member weighs ``1/K``. Class-level (FedFTG,
    DENSE, FedGen): for a sample of label ``y`` member ``k`` weighs
    ``w[k, y] = counts[k, y] / Σ_j counts[j, y]``, its share of class ``y``; a class that no
    member holds falls back to uniform weights. The weighted combination is taken over
    logits (``average="logits"``, FedDF) or over softmax probabilities
    (``average="probs"``, FedFTG), whose log is returned as logits.

    Members can be whole models (``x → logits``) or classifier heads (feature-space
    teachers for FedGen). The ensemble is put in eval mode and left there by the caller.

    Parameters
    ----------
    members : sequence of nn.Module
        Classifiers mapping the same inputs to logits over the same classes.
    label_counts : array-like of shape (K, C), optional
        Per-member label counts for class-level weights.
    average : {"logits", "probs"}
        The space in which members are combined.
    """

    def __init__(
        self, members: Sequence[nn.Module], label_counts: Tensor | np.ndarray | None = None, average: str = "logits"
    ) -> None:
        super().__init__()
        if not members:
            raise ConfigError("an ensemble teacher needs at least one member")
        if average not in ("logits", "probs"):
            raise ConfigError(f"ensemble average must be 'logits' or 'probs', got {average!r}")
        self.members = nn.ModuleList(members)
        self.average = average
        self.class_weights: Tensor | None
        if label_counts is None:
            self.class_weights = None
        else:
            counts = torch.as_tensor(np.asarray(label_counts), dtype=torch.float32)
            if counts.ndim != 2 or counts.shape[0] != len(members) or bool((counts < 0).any()):
                raise ConfigError(
                    f"label_counts must be a non-negative ({len(members)}, C) matrix, got shape {tuple(counts.shape)}"
                )
            total = counts.sum(0, keepdim=True)
            w = torch.where(total > 0, counts / total.clamp_min(1e-12), torch.full_like(counts, 1.0 / len(members)))
            self.register_buffer("class_weights", w)
        #: evaluate same-architecture members as one vmapped call (see :meth:`set_speed`)
        self.vmap = False
        #: autocast dtype of the members' forward passes (``None``: the members' own dtype)
        self.autocast: torch.dtype | None = None
        self._stacks: list[_Stack] | None = None
        self._stack_key: tuple[Any, ...] | None = None

    def set_speed(self, vmap: bool = False, autocast: torch.dtype | None = None) -> EnsembleTeacher:
        """Speed options of the forward passes (same results, up to float tolerance).

        ``vmap``: members of one architecture (same module type and state shapes) run as one
        :func:`torch.func.vmap`-ed :func:`~torch.func.functional_call` over their stacked
        weights, in eval mode only (training-mode BatchNorm writes its statistics in place;
        it then falls back to one member at a time). The stacks are rebuilt whenever a
        member's tensors change. ``autocast``: run the members under
        :func:`torch.autocast` with this dtype (e.g. ``torch.bfloat16``); the combined
        logits come back in float32.
        """
        self.vmap, self.autocast = vmap, autocast
        self._stacks, self._stack_key = None, None
        return self

    def member_weights(self, batch: int, y: Tensor | None, logits: Tensor) -> Tensor:
        """Weights ``(B, K)`` of the members for each sample.

        Class-level weights need the sample labels ``y``; without them each sample's label
        is taken as the uniform ensemble's prediction.
        """
        k = len(self.members)
        if self.class_weights is None:
            return logits.new_full((batch, k), 1.0 / k)
        if y is None:
            y = logits.mean(0).argmax(1)
        return self.class_weights[:, y].T.to(logits.dtype)

    def sample_weights(self, batch: int, y: Tensor | None, device: torch.device) -> Tensor:
        """Weights ``(B, K)`` of the members for samples of labels ``y``, without running them:
        class shares ``w[k, y_b]`` for a class-level ensemble, else (or when ``y`` is ``None``)
        ``1/K``. Each row sums to 1."""
        k = len(self.members)
        if self.class_weights is None or y is None:
            return torch.full((batch, k), 1.0 / k, device=device)
        return self.class_weights[:, y].T.to(device)

    def _combine(self, logits: Tensor, y: Tensor | None) -> Tensor:
        w = self.member_weights(logits.shape[1], y, logits)  # logits: (K, B, C)
        if self.average == "logits":
            return torch.einsum("bk,kbc->bc", w, logits)
        logw = torch.log(w.clamp_min(1e-30)).T.unsqueeze(-1)  # (K, B, 1)
        return torch.logsumexp(logw + F.log_softmax(logits, -1), 0)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Ensemble logits ``(B, C)`` for inputs ``x`` (and labels ``y`` for class weights)."""
        with self._autocast(x):
            logits = self._member_outputs(x, features=False)[0]
        return self._combine(logits.float(), y)

    def forward_features(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Ensemble logits and the members' features concatenated (``None`` for heads)."""
        with self._autocast(x):
            logits, feats = self._member_outputs(x, features=True)
        return self._combine(logits.float(), y), None if feats is None else feats.float()

    def _autocast(self, x: Tensor) -> Any:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=self.autocast)

    def _member_outputs(self, x: Tensor, features: bool) -> tuple[Tensor, Tensor | None]:
        """Stacked member logits ``(K, B, C)`` and, with ``features``, their features
        concatenated ``(B, ΣD)`` (``None`` when a member has none), in member order."""
        k = len(self.members)
        logits: list[Tensor | None] = [None] * k
        feats: list[Tensor | None] = [None] * k
        done = [False] * k
        for stack in self._vmapped_stacks(features):
            lg, ft = stack(x, features)
            for j, i in enumerate(stack.index):
                logits[i], feats[i], done[i] = lg[j], None if ft is None else ft[j], True
        for i, m in enumerate(self.members):
            if not done[i]:
                if features:
                    logits[i], feats[i] = logits_and_features(m, x)
                else:
                    logits[i] = m(x)
        out = torch.stack([t for t in logits if t is not None])
        if not features or any(f is None for f in feats):
            return out, None
        return out, torch.cat([f for f in feats if f is not None], 1)

    def _vmapped_stacks(self, features: bool) -> list[_Stack]:
        """The groups of ≥ 2 same-architecture members, stacked (rebuilt when a member's tensors
        changed); none unless ``vmap`` is on and every member is in eval mode."""
        if not self.vmap or any(m.training for m in self.members.modules()):
            return []
        key = tuple((id(t), t._version) for m in self.members for t in (*m.parameters(), *m.buffers()))
        if self._stacks is None or key != self._stack_key:
            groups: dict[tuple[Any, ...], list[int]] = {}
            for i, m in enumerate(self.members):
                sig = (type(m), tuple((n, tuple(v.shape), v.dtype) for n, v in m.state_dict().items()))
                groups.setdefault(sig, []).append(i)
            self._stacks = [_Stack([self.members[i] for i in idx], idx) for idx in groups.values() if len(idx) > 1]
            self._stack_key = key
        return self._stacks


def logits_and_features(model: nn.Module, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Logits of ``model`` on ``x`` and the features feeding its classifier, if it has them.

    Works for fedkd models (``features`` + ``classifier``), :class:`EnsembleTeacher` and any
    plain ``x → logits`` module (features ``None``).
    """
    if isinstance(model, EnsembleTeacher):
        return model.forward_features(x, y)
    features = getattr(model, "features", None)
    classifier = getattr(model, "classifier", None)
    if callable(features) and isinstance(classifier, nn.Module):
        h = features(x)
        return classifier(h), h
    return model(x), None


def teacher_logits(teacher: nn.Module, x: Tensor, y: Tensor | None = None) -> Tensor:
    """Teacher logits; labels reach an :class:`EnsembleTeacher` (class-level weights)."""
    if isinstance(teacher, EnsembleTeacher):
        return teacher(x, y)
    return teacher(x)


def targets_of(teacher: nn.Module, x: Tensor, y: Tensor | None = None) -> Tensor:
    """The teacher's logits as KD targets: computed under :func:`torch.inference_mode` (no
    autograd bookkeeping at all), then copied out of it so that a loss may save them for its
    backward pass."""
    with torch.inference_mode():
        out = teacher_logits(teacher, x, y)
    return out.clone()


# --------------------------------------------------------------------------- memory


REPLAY_MODES: tuple[str, ...] = ("samples", "batch")


class MemoryBuffer:
    """A FIFO memory of past pseudo-samples (MB-DFKD, LRA), optionally with the targets the
    teacher of their time gave them.

    Every ``push_every``-th call of :meth:`observe` stores ``⌈fraction · B⌉`` random
    samples of the observed batch (``push_every = 0``: only explicit :meth:`push` calls,
    e.g. once per federated round); :meth:`sample` replays ``⌈fraction · B⌉`` stored samples
    for a new batch of ``B``. The oldest samples leave first once ``capacity`` is reached.
    LRA's code keeps 10 batches of ``bs/8``, pushing every 5 epochs: ``capacity = 10·bs/8``,
    ``fraction = 1/8``.

    Each stored sample keeps its label (or none), its teacher ``targets`` (logits, when
    pushed with them) and a ``tag`` (e.g. the round it was pushed in).

    Replay ``mode``: ``"samples"`` draws ``⌈fraction · B⌉`` stored samples at random, across
    pushes; ``"batch"`` replays one whole stored push, chosen at random (LRA's and MB-DFKD's
    ``ReplayMemory.sample_batch``: a list of pushed batches and ``random.choice``).

    Parameters
    ----------
    capacity : int
        Maximum number of stored samples (≥ 1).
    push_every : int
        Observed batches between two pushes (≥ 1); 0 disables pushes by :meth:`observe`.
    fraction : float
        Fraction of a batch pushed, and replayed per step, in ``(0, 1]``.
    seed : int
        Seed of the buffer's own random stream (which samples are pushed and replayed).
    mode : {"samples", "batch"}
        What one replay draws (see above).
    """

    def __init__(
        self, capacity: int, push_every: int = 1, fraction: float = 0.125, seed: int = 0, mode: str = "samples"
    ) -> None:
        if capacity < 1:
            raise ConfigError(f"memory capacity must be ≥ 1, got {capacity}")
        if push_every < 0:
            raise ConfigError(f"memory push period must be ≥ 0, got {push_every}")
        if not 0 < fraction <= 1:
            raise ConfigError(f"memory replay fraction must be in (0, 1], got {fraction}")
        if mode not in REPLAY_MODES:
            raise ConfigError(f"memory replay mode must be one of {', '.join(REPLAY_MODES)}; got {mode!r}")
        self.mode = mode
        self.capacity = capacity
        self.push_every = push_every
        self.fraction = fraction
        self._rng = torch.Generator().manual_seed(seed)
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self._t: Tensor | None = None
        self._tag: Tensor | None = None
        self._push: Tensor | None = None  # the index of the push each sample came with
        self._pushes = 0
        self._seen = 0

    def __len__(self) -> int:
        return 0 if self._x is None else len(self._x)

    @property
    def tags(self) -> Tensor:
        """The tag of every stored sample, oldest first (empty while the memory is)."""
        return torch.zeros(0, dtype=torch.long) if self._tag is None else self._tag.clone()

    def state_dict(self) -> dict[str, Any]:
        """Stored samples, targets, tags, push counter and random stream (for checkpoints)."""
        return {"x": self._x, "y": self._y, "t": self._t, "tag": self._tag, "seen": self._seen,
                "push": self._push, "pushes": self._pushes, "rng": self._rng.get_state()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._x, self._y, self._seen = state["x"], state["y"], int(state["seen"])
        self._t, self._tag = state.get("t"), state.get("tag")
        self._push, self._pushes = state.get("push"), int(state.get("pushes", 0))
        if self._x is not None and self._push is None:  # a checkpoint from before push indices
            self._push = torch.zeros(len(self._x), dtype=torch.long)
        self._rng.set_state(state["rng"])

    @property
    def batches(self) -> int:
        """Pushes (whole or in part) still held."""
        return 0 if self._push is None else int(self._push.unique().numel())

    def chunk(self, batch_size: int) -> int:
        """Samples pushed or replayed for a batch of ``batch_size``."""
        return max(1, math.ceil(self.fraction * batch_size))

    def _pick(self, n: int, k: int) -> Tensor:
        return torch.randperm(n, generator=self._rng)[:k]

    def push(self, x: Tensor, y: Tensor | None = None, targets: Tensor | None = None, tag: int = 0) -> None:
        """Store ``x`` (with labels ``y`` and teacher ``targets``, if given), detached, evicting
        the oldest beyond capacity. A memory holds labels (targets) for all samples or none."""
        if self._x is not None:
            if (self._y is None) != (y is None):
                raise ValueError("a memory buffer holds either labelled or unlabelled samples, not both")
            if (self._t is None) != (targets is None):
                raise ValueError("a memory buffer holds targets for all its samples or for none")
        tags = torch.full((len(x),), int(tag), dtype=torch.long)
        self._push = self._keep(self._push, torch.full((len(x),), self._pushes, dtype=torch.long))
        self._pushes += 1
        self._x = self._keep(self._x, x)
        self._y = None if y is None else self._keep(self._y, y)
        self._t = None if targets is None else self._keep(self._t, targets)
        self._tag = self._keep(self._tag, tags)

    def _keep(self, old: Tensor | None, new: Tensor) -> Tensor:
        both = new.detach() if old is None else torch.cat([old, new.detach().to(old.device)])
        return both[-self.capacity :]

    def observe(self, x: Tensor, y: Tensor | None = None, targets: Tensor | None = None, tag: int = 0) -> bool:
        """Count a batch; on every ``push_every``-th one push a random chunk. Returns whether it pushed."""
        self._seen += 1
        if self.push_every == 0 or self._seen % self.push_every:
            return False
        idx = self._pick(len(x), self.chunk(len(x))).to(x.device)
        self.push(x[idx], None if y is None else y[idx], None if targets is None else targets[idx], tag)
        return True

    def sample(self, batch_size: int) -> tuple[Tensor, Tensor | None] | None:
        """A replay batch ``(x, y)`` for a new batch of ``batch_size`` (``None`` while empty)."""
        out = self.sample_with_targets(batch_size)
        return None if out is None else (out[0], out[1])

    def sample_with_targets(self, batch_size: int) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
        """``(x, y, targets)`` to replay for a new batch of ``batch_size`` (``None`` while empty);
        ``targets`` is ``None`` when the samples were pushed without them."""
        if self._x is None:
            return None
        if self.mode == "batch":
            assert self._push is not None
            ids = self._push.unique()
            chosen = ids[int(torch.randint(len(ids), (1,), generator=self._rng))]
            idx = torch.nonzero(self._push == chosen).flatten().to(self._x.device)
        else:
            idx = self._pick(len(self._x), min(self.chunk(batch_size), len(self._x))).to(self._x.device)
        y = None if self._y is None else self._y[idx]
        return self._x[idx], y, None if self._t is None else self._t[idx]


# --------------------------------------------------------------------------- update rules


@dataclass(frozen=True)
class Batch:
    """Pseudo-inputs and their teacher logits."""

    x: Tensor
    target: Tensor


def union(a: Batch, b: Batch | None) -> Batch:
    """``a ∪ b`` (``a`` when ``b`` is ``None``)."""
    if b is None:
        return a
    return Batch(torch.cat([a.x, b.x]), torch.cat([a.target, b.target]))


Params = dict[str, Tensor]


def functional_loss(student: nn.Module, params: Params, loss_fn: LossFn, batch: Batch) -> Tensor:
    """``L(params; batch)``: the KD loss of ``student`` evaluated with ``params``."""
    return loss_fn(functional_call(student, params, (batch.x,)), batch.target)


def param_grads(loss: Tensor, params: Sequence[Tensor], create_graph: bool = False) -> list[Tensor]:
    """``∇ loss`` w.r.t. ``params``; parameters the loss does not use get zeros."""
    grads = torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


class UpdateRule(ABC):
    """How one student step turns a fresh batch (and a memory batch) into parameter gradients."""

    uses_memory: ClassVar[bool] = False

    @abstractmethod
    def gradients(
        self, student: nn.Module, params: Params, loss_fn: LossFn, new: Batch, mem: Batch | None
    ) -> tuple[list[Tensor], dict[str, float]]:
        """Gradients for ``params`` (in order) and the step's scalar statistics.

        Parameters
        ----------
        student : nn.Module
            The student; evaluated functionally with ``params``.
        params : dict of str to Tensor
            The student's trainable parameters (leaves requiring grad).
        loss_fn : LossFn
            KD loss ``(student_logits, teacher_logits) -> scalar``.
        new : Batch
            The fresh pseudo-batch with teacher logits.
        mem : Batch or None
            A replayed memory batch, or ``None`` (no memory yet, or a rule without one).

        Returns
        -------
        grads : list of Tensor
            One gradient per entry of ``params``.
        stats : dict of str to float
            Always the same keys for a given rule; ``kd_loss`` is the loss on the fresh batch.
        """


UPDATE_RULES: Registry[Callable[..., UpdateRule]] = Registry("update rule")


@UPDATE_RULES.register("plain")
class PlainRule(UpdateRule):
    """DFAD: a step on ``L(θ; x_new)``; memory is not used."""

    def gradients(
        self, student: nn.Module, params: Params, loss_fn: LossFn, new: Batch, mem: Batch | None
    ) -> tuple[list[Tensor], dict[str, float]]:
        loss = functional_loss(student, params, loss_fn, new)
        return param_grads(loss, list(params.values())), {"kd_loss": float(loss.detach())}


@UPDATE_RULES.register("replay")
class ReplayRule(UpdateRule):
    """MB-DFKD: a step on ``L(θ; x_new ∪ x_mem)``."""

    uses_memory = True

    def gradients(
        self, student: nn.Module, params: Params, loss_fn: LossFn, new: Batch, mem: Batch | None
    ) -> tuple[list[Tensor], dict[str, float]]:
        both = union(new, mem)
        out = functional_call(student, params, (both.x,))
        loss = loss_fn(out, both.target)
        with torch.no_grad():  # the fresh part of the same forward, for the statistics
            kd = loss_fn(out[: len(new.x)], new.target)
        return param_grads(loss, list(params.values())), {"kd_loss": float(kd)}


LRA_ORDERS = ("second-order", "first-order")


@UPDATE_RULES.register("lra")
class LRARule(UpdateRule):
    """Learning to Retain while Acquiring: a meta-update with acquisition and retention.

    With ``g_new = ∇L(θ; x_new)`` and ``θ' = θ − α g_new``, the step's gradient is
    ``β ∇θ L(θ'; x_mem) + ∇θ L(θ; x_new ∪ x_mem)``. Second order,
    ``∇θ L(θ'; x_mem) = (I − α H_new) g_mem(θ')`` (``H_new`` the Hessian of
    ``L(·; x_new)`` at θ), whose Taylor expansion carries the alignment term
    ``−α ∇(g_new · g_mem)``. First order drops ``H_new``: ``g_mem(θ')`` is applied to θ.
    While the memory is empty the step is ``∇L(θ; x_new)``.

    Parameters
    ----------
    order : {"second-order", "first-order"}
    alpha : float
        Acquisition (inner) step size α (0.9 in the official code).
    retention_weight : float
        β, the weight of the retention loss; 0 cuts retention off (then this is replay).
    """

    uses_memory = True

    def __init__(self, order: str = "second-order", alpha: float = 0.9, retention_weight: float = 1.0) -> None:
        if order not in LRA_ORDERS:
            raise ConfigError(f"LRA order must be one of {', '.join(LRA_ORDERS)}; got {order!r}")
        if alpha <= 0 or not math.isfinite(alpha):
            raise ConfigError(f"LRA alpha must be > 0, got {alpha}")
        if retention_weight < 0:
            raise ConfigError(f"LRA retention weight must be ≥ 0, got {retention_weight}")
        self.order = order
        self.alpha = alpha
        self.retention_weight = retention_weight

    def gradients(
        self, student: nn.Module, params: Params, loss_fn: LossFn, new: Batch, mem: Batch | None
    ) -> tuple[list[Tensor], dict[str, float]]:
        names, leaves = list(params), list(params.values())
        acq = functional_loss(student, params, loss_fn, new)
        if mem is None or self.retention_weight == 0:
            cur = acq if mem is None else functional_loss(student, params, loss_fn, union(new, mem))
            return param_grads(cur, leaves), {"kd_loss": float(acq.detach()), "ret_loss": math.nan}
        second = self.order == "second-order"
        g_new = param_grads(acq, leaves, create_graph=second)
        if second:
            adapted = {n: p - self.alpha * g for n, p, g in zip(names, leaves, g_new, strict=True)}
        else:
            adapted = {
                n: (p - self.alpha * g).detach().requires_grad_(True)
                for n, p, g in zip(names, leaves, g_new, strict=True)
            }
        ret = functional_loss(student, adapted, loss_fn, mem)
        cur = functional_loss(student, params, loss_fn, union(new, mem))
        if second:
            grads = param_grads(self.retention_weight * ret + cur, leaves)
        else:
            g_ret = param_grads(ret, list(adapted.values()))
            g_cur = param_grads(cur, leaves)
            grads = [gc + self.retention_weight * gr for gc, gr in zip(g_cur, g_ret, strict=True)]
        return grads, {"kd_loss": float(acq.detach()), "ret_loss": float(ret.detach())}


@UPDATE_RULES.register("lra-official")
class LRAOfficialRule(ReplayRule):
    """The student step of the official LRA code (gaurav104/LRA, ``predfkd_meta_memory.py``,
    ``distill_knowledge_meta7``), gradient for gradient.

    The code adapts a functional copy ``θ' = θ − α ∇L(θ; x_new)`` (``higher.innerloop_ctx``),
    evaluates the retention loss ``L(θ'; x_mem)`` and back-propagates it together with
    ``L(θ; x_new ∪ x_mem)``. With ``higher``'s default ``copy_initial_weights=True`` the copy's
    initial weights are detached from the student, so only the second loss reaches θ: the
    update is :class:`ReplayRule`'s. This rule computes that update and reports the retention
    loss the official code logs (``ret_loss``, at ``θ'`` by a plain SGD step of size ``alpha``;
    the official inner optimizer also has momentum 0.9 and weight decay 5e-4, which on a
    fresh ``innerloop_ctx`` only add ``α · 5e-4 · θ`` to the step). Nothing of ``ret_loss``
    reaches the parameters, exactly as in the paper's code.

    What distinguishes the paper's runs from MB-DFKD's replay is therefore the memory
    schedule (one batch of ``B/8`` pushed every 5 epochs, 10 kept, one whole stored batch
    replayed per step): build the memory with ``mode="batch"``.
    """

    def __init__(self, alpha: float = 0.9) -> None:
        if alpha <= 0 or not math.isfinite(alpha):
            raise ConfigError(f"LRA alpha must be > 0, got {alpha}")
        self.alpha = alpha

    def gradients(
        self, student: nn.Module, params: Params, loss_fn: LossFn, new: Batch, mem: Batch | None
    ) -> tuple[list[Tensor], dict[str, float]]:
        grads, stats = super().gradients(student, params, loss_fn, new, mem)
        if mem is None:
            return grads, {**stats, "ret_loss": math.nan}
        leaves = list(params.values())
        g_new = param_grads(functional_loss(student, params, loss_fn, new), leaves)
        with torch.no_grad():
            adapted = {n: p - self.alpha * g for (n, p), g in zip(params.items(), g_new, strict=True)}
            ret = functional_loss(student, adapted, loss_fn, mem)
        return grads, {**stats, "ret_loss": float(ret)}


# --------------------------------------------------------------------------- the student update API


class StudentUpdater:
    """``k`` distillation steps of a student on pseudo-samples: the one student-update API.

    Parameters
    ----------
    rule : UpdateRule
        ``plain``, ``replay``, ``lra`` or any registered rule.
    loss_fn : LossFn
        KD loss ``(student_logits, teacher_logits) -> scalar``, e.g. ``kd_loss("l1")``.
    memory : MemoryBuffer, optional
        Needed by rules with ``uses_memory``; every step pushes to it on its schedule, so
        keep the same updater (and buffer) across rounds to keep the memory.

    Examples
    --------
    On a federated server, after aggregation (teacher: an :class:`EnsembleTeacher` of client
    models, source: a :class:`~fedkd.synthesis.Synthesizer`'s ``source()``)::

        updater = StudentUpdater(UPDATE_RULES.build("lra"), kd_loss("l1"), MemoryBuffer(640, 25))
        stats = updater.run(global_model, teacher, optimizer, synthesizer.source(), steps=5)
    """

    def __init__(
        self, rule: UpdateRule, loss_fn: LossFn, memory: MemoryBuffer | None = None, stored_targets: bool = False
    ) -> None:
        if rule.uses_memory and memory is None:
            raise ConfigError(f"update rule {type(rule).__name__} needs a memory buffer (capacity ≥ 1)")
        self.rule = rule
        self.loss_fn = loss_fn
        self.memory = memory if rule.uses_memory else None
        self.stored_targets = stored_targets
        #: a tag for the samples this updater pushes to the memory (e.g. the current round)
        self.tag = 0
        #: the last fresh batch stepped on: ``(x, y, teacher logits)`` (see :meth:`push_last`)
        self.last: tuple[Tensor, Tensor | None, Tensor] | None = None
        #: reuse the teacher's logits for a batch stepped on again (exact: see :meth:`_teacher_on`)
        self.cache_teacher = True
        self._memo: tuple[nn.Module, Tensor, Tensor | None, tuple[Any, ...], Tensor] | None = None

    def batches(self, teacher: nn.Module, x: Tensor, y: Tensor | None = None) -> tuple[Batch, Batch | None]:
        """The fresh batch with the teacher's logits, and a replayed memory batch (or ``None``).

        Replayed samples keep the targets stored with them when ``stored_targets`` is set
        (what the teacher of their time taught); otherwise the current teacher relabels them.
        """
        new = Batch(x, self._teacher_on(teacher, x, y))
        replay = self.memory.sample_with_targets(len(x)) if self.memory is not None else None
        if replay is None:
            return new, None
        mx, my, mt = replay
        if not self.stored_targets or mt is None:
            mt = targets_of(teacher, mx, my)
        return new, Batch(mx, mt)

    def _teacher_on(self, teacher: nn.Module, x: Tensor, y: Tensor | None) -> Tensor:
        """The teacher's logits on the fresh batch; computed once for a batch that is stepped on
        again (FedFTG's and DENSE's reused generator batch) while the teacher is in eval mode and
        neither it nor the batch changed: the same logits, without re-running the ensemble."""
        versions = (x._version, None if y is None else y._version)
        memo = self._memo
        if (self.cache_teacher and not teacher.training and memo is not None and memo[0] is teacher and memo[1] is x
                and memo[2] is y and memo[3] == versions):  # fmt: skip
            return memo[4]
        out = targets_of(teacher, x, y)
        # the memo holds the objects themselves, so none of them can be freed and its id reused
        self._memo = (teacher, x, y, versions, out) if self.cache_teacher and not teacher.training else None
        return out

    def forget_teacher(self) -> None:
        """Drop the cached teacher logits (and the references to the teacher and batch)."""
        self._memo = None

    def gradients(
        self, student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor | None = None
    ) -> tuple[list[Tensor], dict[str, float]]:
        """Gradients of one step for the student's trainable parameters (nothing is changed)."""
        new, mem = self.batches(teacher, x, y)
        return self._gradients(student, new, mem)

    def _gradients(self, student: nn.Module, new: Batch, mem: Batch | None) -> tuple[list[Tensor], dict[str, float]]:
        params: Params = {n: p for n, p in student.named_parameters() if p.requires_grad}
        return self.rule.gradients(student, params, self.loss_fn, new, mem)

    def step(
        self,
        student: nn.Module,
        teacher: nn.Module,
        optimizer: torch.optim.Optimizer,
        x: Tensor,
        y: Tensor | None = None,
    ) -> dict[str, float]:
        """One step on the fresh batch ``x`` (labels ``y`` optional); returns its statistics.

        The teacher runs under ``no_grad``; the student is updated by ``optimizer`` and its
        mode (train/eval) is left as the caller set it. The batch (with its teacher logits)
        is then offered to the memory.
        """
        new, mem = self.batches(teacher, x, y)
        grads, stats = self._gradients(student, new, mem)
        params = [p for p in student.parameters() if p.requires_grad]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.memory is not None:
            self.last = (x, y, new.target)
            self.memory.observe(x, y, new.target if self.stored_targets else None, self.tag)
        return stats

    def push_last(self) -> bool:
        """Push a chunk of the last fresh batch to the memory, off the step schedule (e.g. once
        every few epochs, as LRA's code does); returns whether anything was pushed."""
        if self.memory is None or self.last is None:
            return False
        x, y, t = self.last
        idx = self.memory._pick(len(x), self.memory.chunk(len(x))).to(x.device)
        self.memory.push(x[idx], None if y is None else y[idx], t[idx] if self.stored_targets else None, self.tag)
        return True

    def run(
        self, student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, source: BatchSource, steps: int
    ) -> dict[str, float]:
        """``steps`` steps, each on a fresh batch from ``source``; mean statistics (NaNs skipped)."""
        acc: dict[str, list[float]] = {}
        for _ in range(steps):
            x, y = source()
            for k, v in self.step(student, teacher, optimizer, x, y).items():
                acc.setdefault(k, []).append(v)
        return {k: _nanmean(v) for k, v in acc.items()}


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def build_rule(name: str, **options: object) -> UpdateRule:
    """Build the registered rule ``name`` with the ``options`` its constructor takes.

    Options a rule does not accept are ignored, so one call site can pass every knob
    (``order``, ``alpha``, ...) whatever rule is chosen.
    """
    factory = UPDATE_RULES.get(name)
    accepted = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in options.items() if k in accepted})
