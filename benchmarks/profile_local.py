"""Where the local engine spends its time per round, beyond the hand-written loop's work.

Two views of the same workload as ``benchmarks/overhead.py``:

1. cProfile of one local-engine run (in this process), grouped by component;
2. direct timings, without a profiler, of each conversion one client message goes through.

::

    OMP_NUM_THREADS=1 python benchmarks/profile_local.py            # 10 clients, cnn, iid, 5 rounds
    OMP_NUM_THREADS=1 python benchmarks/profile_local.py --rounds 2 --clients 4
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

# (label, path suffix, function name); rows are cumulative times, and indented rows are
# part of the row above them.
COMPONENTS: tuple[tuple[str, str, str], ...] = (
    ("Strategy.start (all rounds, incl. round-0 eval)", "serverapp/strategy/strategy.py", "start"),
    ("  local training (train_local)", "fedkd/train.py", "train_local"),
    ("  server test evaluation (evaluate)", "fedkd/train.py", "evaluate"),
    ("  LocalGrid._roundtrip (protobuf serde, both ways)", "fedkd/engines.py", "_roundtrip"),
    ("    message_to_proto", "flwr/common/serde.py", "message_to_proto"),
    ("    SerializeToString", "~", "<method 'SerializeToString' of 'google._upb._message.Message' objects>"),
    ("    ParseFromString", "~", "<method 'ParseFromString' of 'google._upb._message.Message' objects>"),
    ("    message_from_proto", "flwr/common/serde.py", "message_from_proto"),
    ("  records.to_record (state dict -> ArrayRecord)", "fedkd/records.py", "to_record"),
    ("  records.load_record (ArrayRecord -> module)", "fedkd/records.py", "load_record"),
    ("  client_model (fresh model per message)", "fedkd/client_app.py", "client_model"),
    ("  FedAvg aggregate_arrayrecords", "serverapp/strategy/strategy_utils.py", "aggregate_arrayrecords"),
    ("  MeteredGrid byte counting", "fedkd/records.py", "message_array_bytes"),
    ("  records.pack + unpack", "fedkd/records.py", "pack|unpack"),
    ("  Array.numpy (npy bytes -> ndarray, everywhere)", "flwr/app/message/array.py", "numpy"),
    ("  Array.from_numpy_ndarray (ndarray -> npy bytes)", "flwr/app/message/array.py", "from_numpy_ndarray"),
    ("  uuid4 message ids", "uuid.py", "uuid4"),
)


def _cumulative(stats: pstats.Stats, suffix: str, names: str) -> tuple[float, int]:
    total, calls = 0.0, 0
    for (path, _line, func), (_cc, nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if func in names.split("|") and path.endswith(suffix):
            total += ct
            calls += nc
    return total, calls


def profile_run(overrides: list[str], rounds: int) -> None:
    from flwr.app import Context, RecordDict

    from fedkd.client_app import app as client_app
    from fedkd.config import load_config
    from fedkd.engines import LocalGrid
    from fedkd.server_app import make_server_app

    cfg = load_config(None, overrides)
    server_app = make_server_app(cfg, None, None, {})
    grid = LocalGrid(client_app, cfg.int("clients.num"))
    prof = cProfile.Profile()
    prof.enable()
    server_app(grid, Context(grid.run.run_id, 1, {}, RecordDict(), {}))
    prof.disable()
    stats = pstats.Stats(prof)
    start, _ = _cumulative(stats, COMPONENTS[0][1], COMPONENTS[0][2])
    print(f"\n## cProfile of one local-engine run ({rounds} rounds); times include cProfile's own overhead\n")
    print("| component | calls | total (s) | per round (ms) | share of Strategy.start |")
    print("|---|---:|---:|---:|---:|")
    for label, suffix, names in COMPONENTS:
        t, n = _cumulative(stats, suffix, names)
        print(f"| {label} | {n} | {t:.3f} | {1000 * t / rounds:.1f} | {100 * t / start:.1f}% |")


def _time(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls."""
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def direct_timings(overrides: list[str], clients: int, reps: int = 30) -> None:
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from fedkd import records
    from fedkd.client_app import client_model, client_partition
    from fedkd.config import load_config
    from fedkd.engines import _roundtrip
    from fedkd.train import LocalTrainConfig, train_local

    cfg = load_config(None, overrides)
    model = client_model(cfg, 0)
    rec = records.to_record(model)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg_rec = ConfigRecord({**records.run_config_record(cfg.to_toml()), "server-round": 1})
    down = Message(RecordDict({records.ARRAYS: rec, records.CONFIG: cfg_rec}), 1000, "train", group_id="1")
    up_content = RecordDict({records.ARRAYS: rec, records.METRICS: MetricRecord({records.NUM_EXAMPLES: 400})})
    mb = records.nbytes([rec]) / 1e6
    x, y, _ = client_partition(cfg, 0)

    def up() -> Message:
        return Message(up_content, reply_to=down)

    rows = [
        ("hand loop: load_state_dict(global state)", lambda: model.load_state_dict(sd)),
        ("hand loop: accumulate w * state into the average", lambda: {k: v * 0.1 + v for k, v in sd.items()}),
        ("client_model (build a fresh model)", lambda: client_model(cfg, 0)),
        ("records.load_record (incl. Array.numpy)", lambda: records.load_record(model, rec)),
        ("records.to_record (incl. np.save into npy bytes)", lambda: records.to_record(model)),
        ("_roundtrip of the train message (server -> client)", lambda: _roundtrip(down)),
        ("_roundtrip of the reply (client -> server)", lambda: _roundtrip(up())),
        ("Array.numpy for every array of the record", lambda: [a.numpy() for a in rec.values()]),
        ("records.message_array_bytes", lambda: records.message_array_bytes(down)),
        (
            "train_local, 1 epoch on one client's data (for scale)",
            lambda: train_local(model, x, y, LocalTrainConfig(), seed=1),
        ),
    ]
    print(f"\n## direct timings per client message ({mb:.2f} MB of arrays), median of {reps}, no profiler\n")
    print(f"| step | ms per call | ms per round ({clients} clients) |")
    print("|---|---:|---:|")
    for label, fn in rows:
        t = _time(fn, reps if "train_local" not in label else 3)
        print(f"| {label} | {1000 * t:.2f} | {1000 * t * clients:.1f} |")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra fedkd config override")
    args = p.parse_args(argv)
    from overhead import _quiet_flower  # benchmarks/overhead.py (this script's directory is on sys.path)

    _quiet_flower()
    overrides = [
        f"rounds={args.rounds}",
        f"clients.num={args.clients}",
        "clients.architectures=cnn",
        "partition.name=iid",
        "device=cpu",
        *args.set,
    ]
    profile_run(overrides, args.rounds)
    direct_timings(overrides, args.clients)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
