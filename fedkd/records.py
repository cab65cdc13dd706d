"""Message keys and record helpers shared by the ServerApp, ClientApp and strategies.

Everything the server and clients exchange travels in Messages under these keys; nothing
is shared in-process. Keys of the server state ArrayRecord are ``<architecture>/<param>``:
one entry per architecture group, so a single ArrayRecord flows through Flower's
``Strategy.start()`` while each client receives only the slice of its own group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

ARRAYS = "arrays"  # ArrayRecord of model weights (Flower's default arrayrecord_key)
CONFIG = "config"  # ConfigRecord sent by the server (Flower's default configrecord_key)
METRICS = "metrics"  # MetricRecord in client replies (must be the only MetricRecord)
INFO = "fedkd"  # ConfigRecord in client replies: label counts, partition id, architecture
GENERATOR = "generator"  # ArrayRecord of a generator sent to clients (FedGen)

RUN_CONFIG = "fedkd.run-config"  # resolved config as TOML, inside CONFIG
NUM_EXAMPLES = "num-examples"  # Flower's weighted_by_key
TRAIN_LOSS = "train-loss"
LABEL_COUNTS = "label-counts"
PARTITION_ID = "partition-id"
ARCHITECTURE = "architecture"
DEVICE = "device"  # the device a client trains on (query reply); a SuperNode's node-config key too
ENGINE = "fedkd-engine"  # node-config key the local engine sets ("local")
RULE = "rule"  # CONFIG key: the local-training rule of the strategy (fedkd.train.LOCAL_RULES); params "rule.<p>"
RULE_ARRAYS = "rule-arrays"  # ArrayRecord of a rule, both ways (SCAFFOLD: c down, Δc_i up)
STATE_DIR = "fedkd.state-dir"  # CONFIG key: where clients keep their state (fedkd.client_state)
INIT_SEED = "init-seed"  # CONFIG key: the seed of the group's initial model; set when a client's own parts stay local
STATE_FROM = "state-from"  # reply metric of a stateful rule: the round its state was saved in (0: fresh)

SEP = "/"


def pack(groups: Mapping[str, ArrayRecord]) -> ArrayRecord:
    """``{arch: ArrayRecord}`` → one ArrayRecord with ``arch/param`` keys."""
    out = ArrayRecord()
    for arch, rec in groups.items():
        for k, v in rec.items():
            out[f"{arch}{SEP}{k}"] = v
    return out


def unpack(state: ArrayRecord, arch: str) -> ArrayRecord:
    """The slice of ``state`` for ``arch``, with plain parameter names."""
    prefix = f"{arch}{SEP}"
    return ArrayRecord({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})


def architectures_in(state: ArrayRecord) -> list[str]:
    """Architecture groups present in a packed state, in order."""
    seen: dict[str, None] = {}
    for k in state:
        seen.setdefault(k.split(SEP, 1)[0], None)
    return list(seen)


def to_record(module: torch.nn.Module) -> ArrayRecord:
    """A module's state dict (parameters and buffers) as an ArrayRecord."""
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in module.state_dict().items()})


def load_record(module: torch.nn.Module, record: ArrayRecord, kept: Iterable[str] = ()) -> None:
    """Load an ArrayRecord into ``module`` (strict: names and shapes must match).

    ``kept``: entries the record may leave out (a client's own parts, which never travel);
    ``module`` keeps its values for those. Any other missing or unexpected name is an error.
    """
    sd = {k: torch.from_numpy(v.numpy()) for k, v in record.items()}
    kept = set(kept)
    if not kept:
        module.load_state_dict(sd, strict=True)
        return
    missing = [k for k in module.state_dict() if k not in sd and k not in kept]
    unexpected = [k for k in sd if k in kept]
    if missing or unexpected:
        raise RuntimeError(f"record does not fit the model: missing {missing[:3]}, unexpected local {unexpected[:3]}")
    module.load_state_dict(sd, strict=False)


def without(record: ArrayRecord, names: Iterable[str]) -> ArrayRecord:
    """``record`` less the entries in ``names`` (a client's own parts), in its order."""
    drop = set(names)
    return ArrayRecord({k: v for k, v in record.items() if k not in drop}) if drop else record


def nbytes(records: Iterable[ArrayRecord]) -> int:
    """Payload bytes of the arrays in ``records``."""
    return sum(len(a.data) for rec in records for a in rec.values())


def message_array_bytes(msg: Message) -> int:
    """Bytes of every array a message carries (model weights, generators, ...)."""
    if not msg.has_content():
        return 0
    return nbytes(msg.content.array_records.values())


def message_extra_bytes(msg: Message) -> int:
    """Bytes of the arrays a message carries beyond the model weights (``arrays``): a
    generator, per-class logits, prototypes, a shared model. For a method whose clients keep
    their own models (FD, FedProto, FML, FedKD) this is its whole traffic."""
    if not msg.has_content():
        return 0
    return nbytes(rec for name, rec in msg.content.array_records.items() if name != ARRAYS)


def run_config_record(toml_text: str) -> ConfigRecord:
    return ConfigRecord({RUN_CONFIG: toml_text})
