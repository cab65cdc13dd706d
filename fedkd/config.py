"""Typed, validated configuration: one flat mapping of kebab-case dotted keys.

Every knob is declared once:

* core keys in :data:`CORE_KEYS` below, with their default, type and help;
* plug-in keys ``<kind>.<name>.<param>`` by the plug-in's constructor signature, e.g.
  ``strategy.fedprox.proximal-mu`` ← ``FedProx(proximal_mu=...)``,
  ``partition.dirichlet.alpha`` ← ``dirichlet(alpha=0.5)``.

``pyproject.toml``'s ``[tool.flwr.app.config]`` (needed by ``flwr run``) is generated from
these declarations by ``python -m fedkd.config --pyproject`` and kept in sync by a test.

A sim file (TOML) and ``--set KEY=VALUE`` override defaults; the resolved config is
validated once, here, and every error names the key.
"""

from __future__ import annotations

import builtins
import difflib
import inspect
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedkd.errors import ConfigError
from fedkd.registry import Registry, configurable_params

Value = bool | int | float | str


@dataclass(frozen=True)
class Key:
    """A declared core config key."""

    name: str
    default: Value
    help: str
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], bool] | None = None
    requirement: str = ""


def _pos(v: float) -> bool:
    return v > 0


def _nonneg(v: float) -> bool:
    return v >= 0


CORE_KEYS: tuple[Key, ...] = (
    Key("seed", 0, "Master seed: partitions, model init, sampling and local training derive from it.",
        check=_nonneg, requirement="≥ 0"),  # fmt: skip
    Key("rounds", 10, "Number of federated rounds.", check=_pos, requirement="≥ 1"),
    Key("out", "", "Run directory for `flwr run` (`fedkd run` uses --out); empty: runs/flwr-<time>."),
    Key("engine", "local", "Simulation engine for `fedkd run`.", choices=("local", "ray")),
    Key("device", "auto", "Server device: auto (cuda when available), cpu, cuda, cuda:N.",
        check=lambda v: v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()), requirement="auto, cpu, cuda or cuda:N"),  # fmt: skip
    Key("dataset.name", "mnist5k", "Registered dataset name (`fedkd list`)."),
    Key("dataset.root", "", "Local folder for torchvision-backed datasets."),
    Key("dataset.download", False, "Let torchvision download into dataset.root (needs a network)."),
    Key("partition.name", "dirichlet", "Registered partitioner; its parameters are partition.<name>.<param>."),
    Key("partition.test-fraction", 0.0, "Fraction of each client's partition held out as its own test split "
        "(0: none). Clients train on the rest; federated evaluation (eval.fraction) then scores the received "
        "model on each client's test split (per-client accuracy in metrics.jsonl).",
        check=lambda v: 0 <= v < 1, requirement="in [0, 1)"),  # fmt: skip
    # ---- class-continual learning (fedkd/tasks.py)
    Key("tasks.classes-per-task", 0, "Class-continual run: the classes arrive in tasks of this many (it must divide the "
        "dataset's classes); each client trains on its share of the current task's samples only (0: no tasks).",
        check=_nonneg, requirement="≥ 0"),  # fmt: skip
    Key("tasks.rounds-per-task", 0, "Rounds of each task (rounds = tasks × this); 0: rounds / tasks.",
        check=_nonneg, requirement="≥ 0"),  # fmt: skip
    Key("tasks.class-order", "seed", "Order in which the tasks bring the classes: seed (a permutation drawn from the "
        "run's seed), natural (0, 1, ...) or a comma-separated list of every class."),  # fmt: skip
    Key("tasks.local-classes", "current", "Logits of the clients' cross-entropy in a class-continual run: current "
        "(the current task's classes only, as TARGET's code for every method) or all.",
        choices=("current", "all")),  # fmt: skip
    Key("clients.num", 10, "Number of clients (SuperNodes).", check=_pos, requirement="≥ 1"),
    Key("clients.fraction", 1.0, "Fraction of each architecture group's clients sampled per round.",
        check=lambda v: 0 < v <= 1, requirement="in (0, 1]"),  # fmt: skip
    Key("clients.architectures", "cnn", "Client architectures, e.g. 'cnn:4,lenet5:3,resnet8:3' (counts sum to clients.num) or one name for all."),
    Key("clients.local-epochs", 1, "Local epochs per round (ignored when clients.local-steps > 0).", check=_nonneg, requirement="≥ 0"),
    Key("clients.local-steps", 0, "Local SGD steps per round; 0 means use clients.local-epochs.", check=_nonneg, requirement="≥ 0"),
    Key("clients.batch-size", 32, "Local batch size.", check=_pos, requirement="≥ 1"),
    Key("clients.lr", 0.05, "Local SGD learning rate.", check=_pos, requirement="> 0"),
    Key("clients.momentum", 0.0, "Local SGD momentum.", check=lambda v: 0 <= v < 1, requirement="in [0, 1)"),
    Key("clients.weight-decay", 0.0, "Local SGD weight decay.", check=_nonneg, requirement="≥ 0"),
    Key("clients.device", "auto", "Device the clients train on: auto (the local engine: the server's device; ray: cuda when the actor has a GPU share, ray.num-gpus > 0; a SuperNode: cuda when it has one), cpu, cuda or cuda:N. A SuperNode's node config `device` overrides it.",
        check=lambda v: v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()), requirement="auto, cpu, cuda or cuda:N"),  # fmt: skip
    Key("clients.batched", False, "Local engine: train the sampled clients of each architecture group together, as one vmapped computation per step (fedkd.batched); replies, faults and validation are unchanged."),
    Key("clients.threads", 0, "torch threads per client process/actor (0: leave torch's default).", check=_nonneg, requirement="≥ 0"),
    Key("global.architecture", "", "Architecture of the designated global model; empty: the largest client group's."),
    Key("model.feature-dim", 0, "Feature dimension of every model (0: each model's default).", check=_nonneg, requirement="≥ 0"),
    Key("strategy.name", "fedavg", "Registered strategy; its parameters are strategy.<name>.<param>."),
    Key("eval.batch-size", 500, "Batch size of the server-side evaluation.", check=_pos, requirement="≥ 1"),
    Key("eval.fraction", 0.0, "Fraction of clients doing federated evaluation each round (0: none).",
        check=lambda v: 0 <= v <= 1, requirement="in [0, 1]"),  # fmt: skip
    Key("round-timeout", 3600.0, "Seconds to wait for client replies in a round.", check=_pos, requirement="> 0"),
    Key("checkpoint.every", 1, "Write a checkpoint every N rounds (and after the last); 0: never (no --resume).", check=_nonneg, requirement="≥ 0"),
    Key("log.tensorboard", False, "Also write TensorBoard event files into RUN_DIR/tensorboard: every numeric per-round (per-epoch) metric as a scalar, and `fedkd dfkd`'s sample grid each epoch (needs the tensorboard package: pip install 'fedkd[tensorboard]')."),
    Key("checkpoint.keep-final", 1, "Checkpoints a finished run keeps (0: none; a finished run needs none to be reused by compare --resume).", check=_nonneg, requirement="≥ 0"),
    Key("checkpoint.keep", 2, "Checkpoints kept in the run directory (the older ones are the fallback for a corrupt one).", check=_pos, requirement="≥ 1"),
    # ---- simulated faults (fedkd/faults.py): draws depend on (seed, partition id, round) only
    Key("faults.crash-rate", 0.0, "Probability that a client's train call raises (a crashed ClientApp).", check=lambda v: 0 <= v <= 1, requirement="in [0, 1]"),
    Key("faults.nan-rate", 0.0, "Probability that a client's update holds NaN/Inf.", check=lambda v: 0 <= v <= 1, requirement="in [0, 1]"),
    Key("faults.straggler-rate", 0.0, "Probability that a client sleeps faults.straggler-delay seconds before replying.", check=lambda v: 0 <= v <= 1, requirement="in [0, 1]"),
    Key("faults.straggler-delay", 5.0, "Seconds a straggler sleeps (make it exceed round-timeout to lose the reply).", check=_nonneg, requirement="≥ 0"),
    Key("faults.malicious-fraction", 0.0, "Fraction of clients that are malicious, chosen once from the seed (scale attack, label flip).", check=lambda v: 0 <= v <= 1, requirement="in [0, 1]"),
    Key("faults.scale-attack", 1.0, "Malicious clients send global + factor × (their update); 1: no attack."),
    Key("faults.label-flip", False, "Malicious clients train on flipped labels (y → C − 1 − y)."),
    Key("validation.max-update-norm", 0.0, "Reject a reply whose update ‖w_client − w_global‖₂ exceeds this; 0: no bound.", check=_nonneg, requirement="≥ 0"),
    Key("ray.num-cpus", 1.0, "CPUs per client actor on the ray engine.", check=_pos, requirement="> 0"),
    Key("ray.num-gpus", 0.0, "GPUs (fractional) per client actor on the ray engine.", check=_nonneg, requirement="≥ 0"),
    # ---- data-free KD (`fedkd dfkd`, fedkd/dfkd.py) and the shared synthesis / distillation core
    Key("dfkd.teacher", "lenet5", "Teacher architecture of `fedkd dfkd` (registered model)."),
    Key("dfkd.student", "lenet5-half", "Student architecture of `fedkd dfkd` (registered model)."),
    Key("dfkd.teacher-checkpoint", "", "Teacher checkpoint to load; empty: train it, cached in the run directory's parent."),
    Key("dfkd.teacher-epochs", 20, "Epochs of teacher training on the real training split.", check=_pos, requirement="≥ 1"),
    Key("dfkd.teacher-lr", 0.01, "SGD learning rate of teacher training.", check=_pos, requirement="> 0"),
    Key("dfkd.teacher-momentum", 0.9, "SGD momentum of teacher training.", check=lambda v: 0 <= v < 1, requirement="in [0, 1)"),
    Key("dfkd.teacher-batch-size", 64, "Batch size of teacher training.", check=_pos, requirement="≥ 1"),
    Key("dfkd.epochs", 20, "Distillation epochs (the student is evaluated after each).", check=_pos, requirement="≥ 1"),
    Key("dfkd.iterations", 50, "Generator steps per distillation epoch.", check=_pos, requirement="≥ 1"),
    Key("dfkd.teacher-cache", "", "Directory of the teacher cache, shared by every run that names it; empty: the run directory's parent."),
    Key("dfkd.collapse-entropy", 0.5, "Warn of generator collapse when the teacher's batch-mean prediction on a probe batch has an entropy under this fraction of log C (0: never).",
        check=lambda v: 0 <= v <= 1, requirement="in [0, 1]"),  # fmt: skip
    Key("dfkd.collapse-diversity", 0.1, "Warn of generator collapse when the probe batch's mean pairwise distance falls under this fraction of a real test batch's (0: never).",
        check=_nonneg, requirement="≥ 0"),  # fmt: skip
    Key("dfkd.warmup-epochs", 0, "Epochs at the start of `fedkd dfkd` that synthesize without training the student (Fast-DFKD: 20); the schedule starts after them.", check=_nonneg, requirement="≥ 0"),
    Key("dfkd.bn-auto", True, "A teacher with BatchNorm layers gets DeepInversion's BN-statistics term (bn = 1) when synthesis.preset and synthesis.weights leave it out (without it DFAD collapses on resnet8 / mobilenetv2 teachers: sims/README.md); synthesis.weights=bn=0 or dfkd.bn-auto=false turns it off."),
    Key("dfkd.threads", 0, "torch CPU threads of `fedkd dfkd` (0: torch's default; 1 is fastest on shared cores).", check=_nonneg, requirement="≥ 0"),
    Key("generator.name", "image", "Registered generator; its parameters are generator.<name>.<param>."),
    Key("synthesizer.name", "generator", "How `fedkd dfkd` makes pseudo-samples: generator (one generator trained all run, fresh samples per student step) fast (Fast-DFKD: a meta-learned generator initialization, a few inversion steps per batch, the student trained on a pool of every batch) or cmi (contrastive model inversion: a re-initialized generator per batch, a contrastive term against earlier batches, the same pool).",
        choices=("generator", "fast", "cmi")),  # fmt: skip
    Key("synthesis.preset", "dfad", "Generator objective preset: dafl, dfad, adi, lra (PAPERS.md), lra-official (LRA's code: ie in log10, adv js-lra), fast (Fast-DFKD: bn 10, oh 0.5, adv kl-masked 1.33), none (no term) or one a strategy registers."),
    Key("synthesis.weights", "", "Term weight overrides on top of the preset, e.g. 'adv=1,div=0.5' (terms: oh, ie, act, bn, adv, div, tv)."),
    Key("synthesis.adv-metric", "preset", "Disagreement of the adv term: l1 (DFAD), js (1 − JS in nats, batch mean), js-lra (the official LRA code's 1 − JS: clamped probabilities, KL(m‖·), mean over batch × classes), kl-masked (−KL(t‖s) where s and t agree: Fast-DFKD, CMI) or the preset's.",
        choices=("preset", "l1", "js", "js-lra", "kl-masked")),  # fmt: skip
    Key("synthesis.temperature", 3.0, "Temperature of the JS adv term.", check=_pos, requirement="> 0"),
    Key("synthesis.lr", 1e-3, "Adam learning rate of the generator.", check=_pos, requirement="> 0"),
    Key("synthesis.batch-size", 256, "Pseudo-samples per generator step and per student step.", check=_pos, requirement="≥ 1"),
    Key("distill.rule", "plain", "Student update rule: plain (DFAD), replay (MB-DFKD), lra (retain while acquiring, the meta-gradient intact) or lra-official (the official LRA code's step: replay, its meta-gradient lost).",
        choices=("plain", "replay", "lra", "lra-official")),  # fmt: skip
    Key("distill.lra-order", "second-order", "LRA meta-gradient: through θ' (second-order) or taken at θ' (first-order).",
        choices=("second-order", "first-order")),  # fmt: skip
    Key("distill.lra-alpha", 0.9, "LRA acquisition step size α.", check=_pos, requirement="> 0"),
    Key("distill.lra-beta", 1.0, "LRA retention weight β (the weight of L(θ'; x_mem)); 0: replay.", check=_nonneg, requirement="≥ 0"),
    Key("distill.loss", "l1", "KD loss of the student: l1 (logits), kl (·T²), ce (soft-target cross-entropy, ·T²) or js.",
        choices=("l1", "kl", "ce", "js")),  # fmt: skip
    Key("distill.loss-reduction", "auto", "Reduction of the KD loss: batchmean (sum over classes, mean over the batch), mean (over batch × classes: batchmean / C) or auto (l1: mean; kl, ce, js: batchmean).",
        choices=("auto", "batchmean", "mean")),  # fmt: skip
    Key("distill.temperature", 1.0, "Temperature of the kl / js KD loss.", check=_pos, requirement="> 0"),
    Key("distill.steps", 5, "Student steps per generator step (k).", check=_pos, requirement="≥ 1"),
    Key("distill.lr", 0.01, "SGD learning rate of the student.", check=_pos, requirement="> 0"),
    Key("distill.lr-min", 0.0, "Floor of the cosine schedule (eta_min; Fast-DFKD: 2e-4).", check=_nonneg, requirement="≥ 0"),
    Key("distill.lr-schedule", "constant", "Student learning-rate schedule over the epochs of `fedkd dfkd`: constant or cosine (annealed to 0, stepped per epoch, as LRA's code).",
        choices=("constant", "cosine")),  # fmt: skip
    Key("distill.momentum", 0.9, "SGD momentum of the student.", check=lambda v: 0 <= v < 1, requirement="in [0, 1)"),
    Key("distill.weight-decay", 5e-4, "SGD weight decay of the student.", check=_nonneg, requirement="≥ 0"),
    Key("distill.memory-capacity", 640, "Memory buffer size in samples (replay, lra); 0: no memory.", check=_nonneg, requirement="≥ 0"),
    Key("distill.memory-push-every", 25, "Student steps between two pushes to the memory.", check=_pos, requirement="≥ 1"),
    Key("distill.memory-push-epochs", 0, "Push to the memory at the end of epochs 1, 1 + N, 1 + 2N, … of `fedkd dfkd` instead of every memory-push-every steps (LRA's code: every 5 epochs); 0: by steps.", check=_nonneg, requirement="≥ 0"),
    Key("distill.replay-mode", "samples", "What one replay draws from the memory: samples (replay-fraction of the batch, at random across pushes) or batch (one whole stored push, as LRA's and MB-DFKD's code).",
        choices=("samples", "batch")),  # fmt: skip
    Key("distill.replay-fraction", 0.125, "Fraction of a batch pushed to, and replayed from, the memory.",
        check=lambda v: 0 < v <= 1, requirement="in (0, 1]"),  # fmt: skip
)  # fmt: skip

_CORE = {k.name: k for k in CORE_KEYS}


@dataclass(frozen=True)
class PluginKind:
    """A kind of plug-in whose parameters live under ``<kind>.<name>.<param>``."""

    kind: str
    registry: Callable[[], Registry[Any]]
    exclude: frozenset[str] = frozenset()
    target: Callable[[Any], Callable[..., Any]] = field(default=lambda obj: obj)


def _strategies() -> Registry[Any]:
    from strategies import STRATEGIES

    return STRATEGIES


def _partitioners() -> Registry[Any]:
    from fedkd.data import PARTITIONERS

    return PARTITIONERS


def _strategy_exclude() -> frozenset[str]:
    from fedkd.federation import MANAGED_KWARGS

    return MANAGED_KWARGS


PLUGIN_KINDS: dict[str, PluginKind] = {
    "strategy": PluginKind("strategy", _strategies),
    "partition": PluginKind("partition", _partitioners, frozenset({"labels", "num_partitions", "seed"})),
}


def register_plugin_kind(kind: PluginKind) -> None:
    """Let a core module (e.g. generators) declare ``<kind>.<name>.<param>`` keys."""
    PLUGIN_KINDS[kind.kind] = kind


def _generators() -> Registry[Any]:
    from generators import GENERATORS

    return GENERATORS


# generator.<name>.<param> ← the generator's constructor; fedkd sets the sample shape and labels.
register_plugin_kind(PluginKind("generator", _generators, frozenset({"out_shape", "num_classes"})))


def _synthesizers() -> Registry[Any]:
    import fedkd.inversion  # noqa: F401 - registers the pooled synthesizers
    from fedkd.synthesis import SYNTHESIZERS

    return SYNTHESIZERS


# synthesizer.<name>.<param> ← the synthesizer factory's keywords with defaults.
register_plugin_kind(PluginKind("synthesizer", _synthesizers))


def kebab(name: str) -> str:
    """``proximal_mu`` → ``proximal-mu``."""
    return name.replace("_", "-")


def plugin_params(kind: str, name: str) -> dict[str, inspect.Parameter]:
    """Configurable parameters of plug-in ``name`` of ``kind``, keyed by kebab-case name."""
    pk = PLUGIN_KINDS[kind]
    exclude = set(pk.exclude) | (set(_strategy_exclude()) if kind == "strategy" else set())
    obj = pk.registry().get(name)
    return {kebab(n): p for n, p in configurable_params(pk.target(obj), exclude).items()}


def declared_defaults(builtin_only: bool = True) -> dict[str, Value]:
    """Every declared key with its default: core keys and every plug-in's parameters."""
    out: dict[str, Value] = {k.name: k.default for k in CORE_KEYS}
    for kind in PLUGIN_KINDS:
        for name in PLUGIN_KINDS[kind].registry().names():
            for pname, p in plugin_params(kind, name).items():
                out[f"{kind}.{name}.{pname}"] = p.default
    return out


def _type_ok(default: Value, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str)


def _type_name(default: Value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[type(default)]


def _suggest(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


class Config(Mapping[str, Value]):
    """The resolved, validated configuration (read-only, flat dotted keys)."""

    def __init__(self, values: Mapping[str, Value]) -> None:
        self._values = dict(values)

    def __getitem__(self, key: str) -> Value:
        return self._values[key]

    def __iter__(self) -> Any:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def plugin_kwargs(self, kind: str, name: str) -> dict[str, Value]:
        """Constructor keywords for plug-in ``name``: declared defaults overridden by config."""
        out: dict[str, Value] = {}
        for pname, p in plugin_params(kind, name).items():
            out[p.name] = self._values.get(f"{kind}.{name}.{pname}", p.default)
        return out

    def replace(self, **updates: Value) -> Config:
        """A validated copy with ``updates`` (dotted keys given with ``__`` for ``.``)."""
        vals = dict(self._values)
        vals.update({k.replace("__", "."): v for k, v in updates.items()})
        return Config(validate(vals))

    def resolved(self) -> dict[builtins.str, Value]:
        """Every key this config runs with: the core keys and the parameters of every selected
        plug-in (``<kind>.name``, and a strategy's ``base``), defaults included."""
        out = dict(self._values)
        names: list[tuple[builtins.str, builtins.str]] = []
        for kind in PLUGIN_KINDS:
            sel = out.get(f"{kind}.name")
            if isinstance(sel, builtins.str) and sel in PLUGIN_KINDS[kind].registry():
                names.append((kind, sel))
        strategy = out.get("strategy.name")
        if isinstance(strategy, builtins.str) and strategy in PLUGIN_KINDS["strategy"].registry():
            base = out.get(f"strategy.{strategy}.base", None)
            params = plugin_params("strategy", strategy)
            if base is None and "base" in params:
                base = params["base"].default
            if isinstance(base, builtins.str) and base in PLUGIN_KINDS["strategy"].registry():
                names.append(("strategy", base))
        for kind, name in names:
            for pname, p in plugin_params(kind, name).items():
                out.setdefault(f"{kind}.{name}.{pname}", p.default)
        return out

    def to_toml(self, exclude: Iterable[builtins.str] = ()) -> builtins.str:
        """The resolved config (:meth:`resolved`) as TOML (nested tables), without the keys in ``exclude``."""
        skip = set(exclude)
        return tomli_w.dumps(nest({k: v for k, v in sorted(self.resolved().items()) if k not in skip}))

    @classmethod
    def from_toml(cls, text: str) -> Config:
        return cls(validate(flatten(tomllib.loads(text))))

    # Typed accessors keep call sites honest. They shadow the builtins inside this class,
    # so they come last and annotate with `builtins.*`.
    def int(self, key: builtins.str) -> builtins.int:
        v = self._values[key]
        assert isinstance(v, builtins.int)
        return v

    def float(self, key: builtins.str) -> builtins.float:
        v = self._values[key]
        assert isinstance(v, builtins.int | builtins.float)
        return builtins.float(v)

    def str(self, key: builtins.str) -> builtins.str:
        v = self._values[key]
        assert isinstance(v, builtins.str)
        return v

    def bool(self, key: builtins.str) -> builtins.bool:
        v = self._values[key]
        assert isinstance(v, builtins.bool)
        return v


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables → flat dotted keys."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Flat dotted keys → nested tables (inverse of :func:`flatten`)."""
    out: dict[str, Any] = {}
    for key in sorted(flat):
        node = out
        *path, leaf = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = flat[key]
    return out


def validate(values: Mapping[str, Any]) -> dict[str, Value]:
    """Check every key and value; return the full config with defaults filled in."""
    out: dict[str, Value] = {k.name: k.default for k in CORE_KEYS}
    for key, value in values.items():
        if key in _CORE:
            spec = _CORE[key]
            if not _type_ok(spec.default, value):
                raise ConfigError(f"{key} must be {_type_name(spec.default)}, got {value!r}")
            if isinstance(spec.default, float):
                value = float(value)
                if not math.isfinite(value):
                    raise ConfigError(f"{key} must be finite, got {value!r}")
            if spec.choices and value not in spec.choices:
                raise ConfigError(f"{key} must be one of {', '.join(spec.choices)}; got {value!r}")
            if spec.check and not spec.check(value):
                raise ConfigError(f"{key} must be {spec.requirement}, got {value!r}")
            out[key] = value
            continue
        kind, _, rest = key.partition(".")
        name, _, pname = rest.rpartition(".")
        if kind not in PLUGIN_KINDS or not name:
            raise ConfigError(f"unknown config key {key!r}{_suggest(key, declared_defaults())}")
        registry = PLUGIN_KINDS[kind].registry()
        if name not in registry:
            raise ConfigError(
                f"unknown {registry.kind} {name!r} in config key {key!r}; valid: {', '.join(registry.names())}"
            )
        params = plugin_params(kind, name)
        if pname not in params:
            valid = ", ".join(f"{kind}.{name}.{p}" for p in params) or "none"
            raise ConfigError(f"unknown config key {key!r}; {registry.kind} {name!r} takes: {valid}")
        default = params[pname].default
        if not _type_ok(default, value):
            raise ConfigError(f"{key} must be {_type_name(default)}, got {value!r}")
        if isinstance(default, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be finite, got {float(value)!r}")
        out[key] = float(value) if isinstance(default, float) else value
    if out["clients.local-steps"] == 0 and out["clients.local-epochs"] == 0:
        raise ConfigError("clients.local-steps and clients.local-epochs are both 0: the clients would train nothing")
    for kind in PLUGIN_KINDS:  # the selected plug-ins must exist
        sel = f"{kind}.name"
        if sel in out:
            PLUGIN_KINDS[kind].registry().get(str(out[sel]))
    return out


def parse_override(item: str) -> tuple[str, Value]:
    """``KEY=VALUE`` → (key, TOML-parsed value; bare words are strings)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if isinstance(value, dict | list):
        raise ConfigError(f"--set {key}: only scalar values are allowed, got {raw!r}")
    return key, value


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file as flat dotted keys, with one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        return flatten(tomllib.loads(p.read_text(encoding="utf-8")))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{p}: cannot read: {e}") from None


def load_config(sim: str | Path | None = None, overrides: Iterable[str] = (), seed: int | None = None) -> Config:
    """Defaults ← sim file ← ``--set`` overrides ← ``--seed``; validated once."""
    values: dict[str, Any] = read_toml(sim) if sim is not None else {}
    for item in overrides:
        k, v = parse_override(item)
        values[k] = v
    if seed is not None:
        values["seed"] = seed
    return Config(validate(values))


def from_run_config(run_config: Mapping[str, Any]) -> Config:
    """Config from Flower's ``context.run_config`` (``flwr run``: pyproject defaults + overrides)."""
    return Config(validate(dict(run_config)))


def pyproject_table() -> str:
    """The ``[tool.flwr.app.config]`` section text generated from the declarations."""
    return tomli_w.dumps({"tool": {"flwr": {"app": {"config": nest(declared_defaults())}}}})


PYPROJECT_MARKER = "# ---- generated by `python -m fedkd.config --pyproject`"


def write_pyproject(path: str | Path) -> None:
    """Replace everything after the marker line in ``path`` with :func:`pyproject_table`."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    head, sep, rest = text.partition(PYPROJECT_MARKER)
    if not sep:
        raise ConfigError(f"{p}: marker line not found")
    marker_line = sep + rest.splitlines()[0]
    p.write_text(f"{head}{marker_line}\n{pyproject_table()}", encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover - maintenance helper
    import sys

    if sys.argv[1:2] == ["--pyproject"]:
        write_pyproject(sys.argv[2] if len(sys.argv) > 2 else "pyproject.toml")
