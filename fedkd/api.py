"""The public API for fedkd plug-ins: everything a strategy, generator or KD plug-in may import.

Import from here, not from fedkd's modules: these names are kept stable; the modules behind
them may move. ``docs/writing-a-strategy.md`` builds three complete plug-ins from them.

Strategies
    :class:`GroupedStrategy`
        Runs a base Flower strategy within each architecture group; subclass it for server-side
        work across groups (``aggregate_train``: call ``super()``, then change the packed state).
        Its constructor is ``(federation, base_factory, context=None)``; fedkd passes all three.
    :class:`DistillationStrategy`
        A :class:`GroupedStrategy` that, after the base aggregation, distills the round's client
        ensemble into the global model (and every group's, with ``distill_groups = True``) with a
        :class:`ServerDistiller`; every keyword of the distiller is a config key of the subclass.
    :class:`ServerContext`
        What the server knows besides messages: input shape, classes, ``feature_dim``,
        ``device``, ``seed``, ``rounds``, and ``build(arch)`` for a fresh model of an architecture.
    :class:`Federation`
        Nodes, their architectures (``nodes(arch)``, ``groups``) and the global architecture.
    :class:`FedDF`, :class:`FedFTG`
        The built-in distillation strategies, to subclass for a variant (other defaults, another
        preset or KD loss, another distillation source).
    :data:`STRATEGIES`
        The registry (``@STRATEGIES.register("name")``, or the ``fedkd.strategies`` entry point).

Packed state (one ArrayRecord for every group's model, keys ``<arch>/<param>``)
    :func:`pack`, :func:`unpack`, :func:`to_record`, :func:`load_record`.

Models
    :func:`build_model`, :data:`MODELS` (``fedkd.models`` entry point); a fedkd model has
    ``features(x)`` and ``classifier(h)``.

Distillation building blocks (:mod:`fedkd.distill`, :mod:`fedkd.synthesis`, :mod:`fedkd.server_kd`)
    :class:`ServerDistiller`
        One round of data-free (or proxy-data) distillation: generator steps, then student
        steps, its optimizers, schedules and cross-round memory; checkpointed by
        ``state_dict()`` / ``load_state_dict()``.
    :class:`Synthesizer`, :func:`build_generator`, :data:`GENERATORS`, :data:`PRESETS`, :class:`Objective`
        A generator trained against a teacher on named loss terms (``oh``, ``ie``, ``act``,
        ``bn``, ``adv``, ``div``, ``tv``); presets are named weightings (``PRESETS.add``).
    :class:`EnsembleTeacher`
        Client models as one teacher (uniform or class-level weights, logits or probabilities).
    :class:`StudentUpdater`, :data:`UPDATE_RULES`, :class:`UpdateRule`, :class:`MemoryBuffer`, :func:`kd_loss`
        Student steps under a rule (``plain``, ``replay``, ``lra``, ``lra-official`` or one you
        register) with a KD loss (``kl``, ``ce``, ``l1``, ``js``).

Errors and names
    :class:`ConfigError`
        Raise it, naming the config key, for a bad value: fedkd prints one ``error:`` line and
        exits 2 before anything is written (strategies are built during the preflight check).
    :func:`registered_name`
        The name a class was registered under (its config prefix ``strategy.<name>``).

Checkpoints: ``fedkd run --resume`` restores a strategy through its ``state_dict()`` /
``load_state_dict()`` (tensors, numbers, strings, lists and dicts); extend both when a plug-in
keeps state across rounds.
"""

from __future__ import annotations

from fedkd.distill import (
    UPDATE_RULES,
    EnsembleTeacher,
    MemoryBuffer,
    StudentUpdater,
    UpdateRule,
    kd_loss,
)
from fedkd.errors import ConfigError
from fedkd.federation import Federation, GroupedStrategy, ServerContext
from fedkd.models import MODELS, build_model
from fedkd.records import load_record, pack, to_record, unpack
from fedkd.registry import registered_name
from fedkd.server_kd import DistillationStrategy, ServerDistiller
from fedkd.synthesis import PRESETS, Objective, Synthesizer, build_generator
from generators import GENERATORS
from strategies import STRATEGIES
from strategies.feddf import FedDF
from strategies.fedftg import FedFTG

__all__ = [
    "GENERATORS",
    "MODELS",
    "PRESETS",
    "STRATEGIES",
    "UPDATE_RULES",
    "ConfigError",
    "DistillationStrategy",
    "EnsembleTeacher",
    "FedDF",
    "FedFTG",
    "Federation",
    "GroupedStrategy",
    "MemoryBuffer",
    "Objective",
    "ServerContext",
    "ServerDistiller",
    "StudentUpdater",
    "Synthesizer",
    "UpdateRule",
    "build_generator",
    "build_model",
    "kd_loss",
    "load_record",
    "pack",
    "registered_name",
    "to_record",
    "unpack",
]
