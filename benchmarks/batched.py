"""The batched client engine against one-by-one clients: one round's local training, side by side.

For each architecture and number of clients, every client of a fresh federation gets the same
round-1 train message (the S1 recipe by default: mnist5k, Dirichlet α = 0.1, 20 local steps of
batch 32 at lr 0.01) and the local engine's ``send_and_receive`` runs them, once one by one
(``clients.batched = false``) and once batched (``true``), interleaved over ``--reps``
repetitions. The whole ClientApp path is timed (config, partition, model, training, reply,
Flower's serde both ways); the ratio of the medians is the speed-up. The largest weight
difference between the two replies of each client is printed too (float32; see
``tests/test_batched.py`` for what it means). On a CPU, convolutional models train one by one
even when batched (``fedkd.batched.CPU_CONV_ONE_BY_ONE``); the "forced" columns batch them anyway.

    python benchmarks/batched.py --reps 3
    python benchmarks/batched.py --archs mlp --clients 4 --reps 1 --set dataset.name=digits   # smoke test

One torch thread (``--threads``), as every published fedkd run here; on a GPU machine add
``--device cuda`` (server and clients).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import ConfigRecord, Message, RecordDict  # noqa: E402

from fedkd import records  # noqa: E402
from fedkd.client_app import app  # noqa: E402
from fedkd.config import load_config  # noqa: E402
from fedkd.data import load_dataset  # noqa: E402
from fedkd.engines import NODE_ID_OFFSET, LocalGrid  # noqa: E402
from fedkd.models import build_model  # noqa: E402

# S1's recipe; min-size 2 so that Dirichlet(0.1) can split mnist5k's 4,000 images over 100 clients
BASE = ["partition.name=dirichlet", "partition.dirichlet.alpha=0.1", "partition.dirichlet.min-size=2",
        "clients.local-steps=20", "clients.batch-size=32", "clients.lr=0.01", "dataset.name=mnist5k"]  # fmt: skip


def messages(cfg, arch: str) -> list[Message]:
    ds = load_dataset(cfg.str("dataset.name"), cfg.str("dataset.root"), cfg.bool("dataset.download"))
    torch.manual_seed(0)
    arrays = records.to_record(build_model(arch, ds.shape, ds.num_classes))
    text = cfg.to_toml()
    out = []
    for i in range(cfg.int("clients.num")):
        conf = ConfigRecord({records.RUN_CONFIG: text, "server-round": 1})
        out.append(Message(RecordDict({records.ARRAYS: arrays, records.CONFIG: conf}), NODE_ID_OFFSET + i, "train",
                           group_id="1"))  # fmt: skip
    return out


def one_round(cfg, arch: str, batched: bool, force: bool = False) -> tuple[float, dict[int, Message]]:
    """One round's train messages through the local engine; ``force``: batch convolutional
    models on the CPU too (``fedkd.batched.CPU_CONV_ONE_BY_ONE = False``)."""
    import fedkd.batched

    fedkd.batched.CPU_CONV_ONE_BY_ONE = not force
    try:
        grid = LocalGrid(app, cfg.int("clients.num"), batched=batched)
        msgs = messages(cfg, arch)
        t = time.perf_counter()
        replies = grid.send_and_receive(msgs)
        seconds = time.perf_counter() - t
    finally:
        fedkd.batched.CPU_CONV_ONE_BY_ONE = True
    failed = [r for r in replies if r.has_error()]
    if failed or len(replies) != len(msgs):
        why = failed[0].error.reason if failed else "replies lost"
        raise SystemExit(f"error: {len(failed)} of {len(msgs)} clients failed: {why}")
    return seconds, {r.metadata.src_node_id: r for r in replies}


def max_diff(a: dict[int, Message], b: dict[int, Message]) -> float:
    worst = 0.0
    for node, ra in a.items():
        xa, xb = ra.content.array_records[records.ARRAYS], b[node].content.array_records[records.ARRAYS]
        for k in xa:
            ta, tb = torch.from_numpy(xa[k].numpy()), torch.from_numpy(xb[k].numpy())
            if ta.is_floating_point():
                worst = max(worst, float((ta - tb).abs().max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="cnn,mlp")
    p.add_argument("--clients", default="10,50,100")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[], help="extra config overrides")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print(f"# batched vs one-by-one clients: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), device {args.device}, reps {args.reps}")  # fmt: skip
    print("| arch | clients | one by one s | batched s (as shipped) | speed-up | batched s (forced) | speed-up (forced) "
          "| max weight diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    modes = {"one_by_one": (False, False), "batched": (True, False), "forced": (True, True)}
    for arch in args.archs.split(","):
        for n in (int(c) for c in args.clients.split(",")):
            sets = [*BASE, f"clients.num={n}", f"clients.architectures={arch}", f"device={args.device}",
                    f"clients.device={args.device}", *args.set]  # fmt: skip
            cfg = load_config(None, sets)
            times: dict[str, list[float]] = {m: [] for m in modes}
            replies: dict[str, dict[int, Message]] = {}
            one_round(cfg, arch, True, True)  # warm-up: dataset, partition and caches
            for _ in range(args.reps):
                for mode, (batched, force) in modes.items():
                    s, replies[mode] = one_round(cfg, arch, batched, force)
                    times[mode].append(s)
            med = {m: statistics.median(v) for m, v in times.items()}
            row = {"arch": arch, "clients": n, **{f"{m}_s": v for m, v in med.items()},
                   "speedup": med["one_by_one"] / med["batched"], "speedup_forced": med["one_by_one"] / med["forced"],
                   "max_weight_diff": max_diff(replies["one_by_one"], replies["forced"]), "times": times}  # fmt: skip
            rows.append(row)
            print(f"| {arch} | {n} | {med['one_by_one']:.2f} | {med['batched']:.2f} | {row['speedup']:.2f}× "
                  f"| {med['forced']:.2f} | {row['speedup_forced']:.2f}× | {row['max_weight_diff']:.1e} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
