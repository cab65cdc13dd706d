"""Overhead of fedkd's engines against a hand-written single-process PyTorch FedAvg loop.

The same federated work (clients, model, init, partition, seeds, rounds) runs three ways:

* ``hand``: a plain loop written here: partition, train each client with
  :func:`fedkd.train.train_local`, weighted-average the state dicts by hand, evaluate.
  It imports only fedkd's pure core (``fedkd.data``, ``fedkd.models``, ``fedkd.train``),
  never Flower nor ``fedkd.config``; the parent resolves the config and hands it plain values.
* ``local``: fedkd's ServerApp and ClientApp on :class:`fedkd.engines.LocalGrid`, driven
  as ``fedkd run`` drives it (``cmd_run``), without the run directory.
* ``ray``: the same apps on Flower's Simulation Engine via :func:`fedkd.engines.run_ray`.

Each measurement is a fresh subprocess; repetitions are interleaved (hand, local, ray, hand,
...) and the median over repetitions is reported, because the CPU is shared. ::

    python benchmarks/overhead.py                       # 10 clients, cnn, iid, 5 rounds, 3 reps
    python benchmarks/overhead.py --rounds 1 --clients 2 --reps 1 --engines hand,local

Definitions (the same for every way):

* wall: whole process, measured by the parent from spawn to exit (interpreter start,
  imports, data, init, engine start-up, rounds, shutdown);
* round time: from the end of the previous server-side evaluation (round 0 evaluates the
  initial model) to the end of this round's; "per round" is the mean over the rounds;
* start-up: wall minus the sum of the round times (everything that is not a round);
* peak RSS: ``ru_maxrss`` of the measured process itself; "largest child" is its
  ``RUSAGE_CHILDREN`` ``ru_maxrss`` (the largest waited-for descendant, e.g. one of Ray's
  processes; a maximum, not a sum); "tree" is the peak of the summed
  VmRSS of the process and all its descendants, sampled by the parent every 0.2 s (Ray's
  GCS, raylet and worker processes; shared library pages count once per process there);
* CPU seconds (hand and local only): user + system time of the measured process (from
  ``wait4``), and per round the process CPU time between round ends 1..R over R-1 rounds.
  Less sensitive than wall time to other users of a shared CPU; a cross-check.

Every measured process gets ``OMP_NUM_THREADS=--threads`` (default 1) in its environment, so
torch's thread count is fixed before torch starts: 1 thread keeps a shared 2-core machine
from stalling OpenMP barriers, and all three ways then run identical kernels (a
``torch.set_num_threads`` call after torch has run parallel ops changes the numerics).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ENGINES = ("hand", "local", "ray")
GOAL_PER_ROUND = 1.10  # local / hand, time per round
GOAL_WHOLE = 1.30  # local / hand, whole process
SAMPLE_EVERY_S = 0.2
T_WORKER_START = time.perf_counter()  # before the heavy imports a worker makes


# --------------------------------------------------------------------------------------
# Workers (each runs in its own fresh process)
# --------------------------------------------------------------------------------------
def _usage() -> dict[str, int]:
    return {
        "maxrss_self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "maxrss_children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    }


def worker_hand(spec: dict[str, Any]) -> dict[str, Any]:
    """The hand-written loop: plain PyTorch, FedAvg by hand, fedkd's pure core only."""
    import random

    import torch

    from fedkd.data import load_dataset, partition
    from fedkd.models import build_model
    from fedkd.train import LocalTrainConfig, derive_seed, evaluate, train_local

    h = spec["hand"]
    n, seed, rounds = h["clients"], h["seed"], h["rounds"]
    ds = load_dataset(h["dataset"], h["root"], h["download"])
    parts = partition(h["partition"], ds.y_train.numpy(), n, seed, **h["partition_kwargs"])
    data = [(ds.x_train[idx], ds.y_train[idx]) for idx in (torch.as_tensor(p) for p in parts)]
    local = LocalTrainConfig(**h["local"])

    # Same init as fedkd's server: group 0's model seeded from (seed, 7919, 0).
    torch.manual_seed(derive_seed(seed, 7919, 0))
    model = build_model(h["arch"], ds.shape, ds.num_classes, h["feature_dim"])
    client = build_model(h["arch"], ds.shape, ds.num_classes, h["feature_dim"])  # reused by every client
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    rows: list[dict[str, Any]] = []
    evaluate(model, ds.x_test, ds.y_test, h["eval_batch_size"])  # round 0: the initial model
    t_prev = time.perf_counter()
    for rnd in range(1, rounds + 1):
        # Visit clients in the order fedkd's sampler sends them (Flower's random.sample, seeded
        # per (seed, round, group)), so that the float sums below run in the same order.
        random.seed(derive_seed(seed, rnd, 0, len("configure_train")))
        order = random.sample(range(n), n)
        total = sum(len(data[pid][0]) for pid in order)
        avg: dict[str, torch.Tensor] = {}
        train_loss = 0.0
        for pid in order:
            x, y = data[pid]
            client.load_state_dict(global_state)
            loss = train_local(client, x, y, local, seed=derive_seed(seed, pid, rnd))
            w = len(x) / total
            train_loss += loss * w
            for k, v in client.state_dict().items():  # FedAvg: sum of w_k * state_k
                if k in avg:
                    avg[k] += v * w
                else:
                    avg[k] = v * w
        global_state = avg
        model.load_state_dict(global_state)
        test_loss, acc = evaluate(model, ds.x_test, ds.y_test, h["eval_batch_size"])
        now = time.perf_counter()
        rows.append(
            {
                "round": rnd,
                "accuracy": acc,
                "loss": test_loss,
                "train_loss": train_loss,
                "seconds": now - t_prev,
                "cpu": time.process_time(),
            }
        )
        t_prev = now
    return {"rows": rows}


def _quiet_flower() -> None:
    """Silence Flower's console log as ``fedkd run`` does without ``-v``."""
    import logging

    from flwr.supercore.logger import FLOWER_LOGGER

    logging.basicConfig(level=logging.WARNING)
    FLOWER_LOGGER.setLevel(logging.ERROR)
    FLOWER_LOGGER.propagate = False


def worker_fedkd(spec: dict[str, Any], engine: str) -> dict[str, Any]:
    """fedkd's unchanged ServerApp and ClientApp on the local or ray engine."""
    from flwr.app import Context, RecordDict

    from fedkd.client_app import app as client_app
    from fedkd.config import load_config
    from fedkd.engines import LocalGrid, run_ray
    from fedkd.server_app import make_server_app

    _quiet_flower()
    cfg = load_config(None, spec["overrides"])
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    server_app = make_server_app(cfg, None, lambda row: rows.append({**row, "cpu": time.process_time()}), summary)
    if engine == "local":
        grid = LocalGrid(client_app, cfg.int("clients.num"))
        server_app(grid, Context(grid.run.run_id, 1, {}, RecordDict(), {}))
    else:
        run_ray(server_app, client_app, cfg)
    if not summary:
        raise RuntimeError(f"the {engine} run did not finish")
    if summary["failures"]:  # a ClientApp error does not make the engines raise: check
        raise RuntimeError(f"the {engine} run had {summary['failures']} failed or missing client replies")
    keep = ("round", "accuracy", "loss", "train_loss", "seconds", "cpu")
    return {"rows": [{k: r[k] for k in keep} for r in rows]}


def run_worker(engine: str, spec: dict[str, Any], result: Path) -> None:
    out = worker_hand(spec) if engine == "hand" else worker_fedkd(spec, engine)
    out.update(_usage(), engine=engine, inner_seconds=time.perf_counter() - T_WORKER_START)
    result.write_text(json.dumps(out), encoding="utf-8")


# --------------------------------------------------------------------------------------
# Parent: spawn, sample memory, aggregate
# --------------------------------------------------------------------------------------
def _proc_tree_rss_kb(root: int) -> int:
    """Summed VmRSS (kB) of ``root`` and all its descendants (Linux /proc; 0 elsewhere)."""
    kids: dict[int, list[int]] = defaultdict(list)
    try:
        names = os.listdir("/proc")
    except OSError:
        return 0
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids[ppid].append(int(name))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(kids.get(pid, ()))
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            continue
    return total


class TreeSampler(threading.Thread):
    """Peak summed RSS of a process tree, sampled every :data:`SAMPLE_EVERY_S` seconds."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kb = pid, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(SAMPLE_EVERY_S):
            self.peak_kb = max(self.peak_kb, _proc_tree_rss_kb(self.pid))

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak_kb


class MeasurementError(RuntimeError):
    """A measured run failed; the message names the file holding its output."""


def measure_retrying(engine: str, spec: dict[str, Any], env: dict[str, str], retries: int) -> dict[str, Any]:
    """:func:`measure`, retried up to ``retries`` times (a shared machine has transient failures)."""
    for attempt in range(retries + 1):
        try:
            return measure(engine, spec, env)
        except MeasurementError as e:
            if attempt == retries:
                raise SystemExit(f"error: {e}") from None
            print(f"warning: {e}; retrying", flush=True)
    raise AssertionError("unreachable")


def measure(engine: str, spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Run one way in a fresh subprocess; return its result plus wall time and tree RSS."""
    with tempfile.TemporaryDirectory(prefix="fedkd-overhead-") as d:
        result, log = Path(d) / "result.json", Path(d) / "output.log"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            engine,
            "--spec",
            json.dumps(spec),
            "--result",
            str(result),
        ]
        with open(log, "wb") as out:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=d)
            sampler = TreeSampler(proc.pid)
            sampler.start()
            _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage (CPU seconds)
            wall = time.perf_counter() - t0
            rc = proc.returncode = os.waitstatus_to_exitcode(status)
            tree_kb = sampler.stop()
        if rc != 0 or not result.is_file():
            kept = Path(tempfile.mkstemp(prefix=f"fedkd-overhead-{engine}-", suffix=".log")[1])
            kept.write_bytes(log.read_bytes())
            raise MeasurementError(f"the {engine} run failed (exit {rc}); its output is in {kept}")
        out_json: dict[str, Any] = json.loads(result.read_text(encoding="utf-8"))
    rows = out_json["rows"]
    rounds_s = sum(r["seconds"] for r in rows)
    # CPU seconds: the measured process's own (Ray's actors are not its waited children, so
    # for ray this is the driver's share only and is not compared).
    cpu_rounds = (rows[-1]["cpu"] - rows[0]["cpu"]) / (len(rows) - 1) if len(rows) > 1 else float("nan")
    out_json.update(
        cpu_total=usage.ru_utime + usage.ru_stime,
        cpu_per_round=cpu_rounds,
        wall=wall,
        rounds_seconds=rounds_s,
        per_round=rounds_s / len(rows),
        startup=wall - rounds_s,
        tree_kb=max(tree_kb, out_json["maxrss_self_kb"]),
        final_accuracy=rows[-1]["accuracy"],
    )
    return out_json


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """The fedkd overrides and the equivalent plain values for the hand-written loop."""
    from fedkd.config import load_config

    overrides = [
        f"rounds={args.rounds}",
        f"clients.num={args.clients}",
        "clients.architectures=cnn",
        "partition.name=iid",
        f"clients.local-epochs={args.epochs}",
        f"seed={args.seed}",
        "device=cpu",
        *args.set,
    ]
    cfg = load_config(None, overrides)
    arch = cfg.str("clients.architectures").strip()
    plain = (
        cfg.str("strategy.name") == "fedavg"
        and ":" not in arch
        and "," not in arch
        and cfg.float("clients.fraction") == 1.0
        and cfg.float("eval.fraction") == 0.0
        and cfg.str("global.architecture") in ("", arch)
    )
    if not plain:
        raise SystemExit(
            "error: the hand-written loop covers FedAvg, one architecture, clients.fraction=1, eval.fraction=0"
        )
    method = cfg.str("partition.name")
    hand = {
        "dataset": cfg.str("dataset.name"),
        "root": cfg.str("dataset.root"),
        "download": cfg.bool("dataset.download"),
        "partition": method,
        "partition_kwargs": cfg.plugin_kwargs("partition", method),
        "clients": cfg.int("clients.num"),
        "seed": cfg.int("seed"),
        "rounds": cfg.int("rounds"),
        "arch": arch,
        "feature_dim": cfg.int("model.feature-dim") or None,
        "eval_batch_size": cfg.int("eval.batch-size"),
        "local": {
            "epochs": cfg.int("clients.local-epochs"),
            "steps": cfg.int("clients.local-steps"),
            "batch_size": cfg.int("clients.batch-size"),
            "lr": cfg.float("clients.lr"),
            "momentum": cfg.float("clients.momentum"),
            "weight_decay": cfg.float("clients.weight-decay"),
        },
    }
    return {"overrides": overrides, "hand": hand}


def _med(results: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in results)


def _agreement(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> str:
    """How closely two runs' per-round metrics agree."""
    same = all(x["accuracy"] == y["accuracy"] and x["loss"] == y["loss"] for x, y in zip(a, b, strict=True))
    dl = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=True))
    da = max(abs(x["accuracy"] - y["accuracy"]) for x, y in zip(a, b, strict=True))
    dt = max(
        (
            abs(x["train_loss"] - y["train_loss"])
            for x, y in zip(a, b, strict=True)
            if None not in (x["train_loss"], y["train_loss"])
        ),
        default=float("nan"),
    )
    if same:
        return f"identical to the last bit in every round (test accuracy and test loss); train loss within {dt:.1e}"
    return f"max |Δ| per round: test accuracy {da:.4f}, test loss {dl:.2e}, train loss {dt:.2e}"


def _cpu(rs: list[dict[str, Any]], key: str) -> str:
    return "n/a" if rs[0]["engine"] == "ray" else f"{_med(rs, key):.3f}"


def report(by_engine: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    engines = list(by_engine)
    print(f"\n## medians over {args.reps} interleaved repetition(s)\n")
    print(
        "| way | wall (s) | per round (s) | start-up (s) | peak RSS (MB) | largest child RSS (MB) "
        "| tree peak RSS (MB) | CPU total (s) | CPU per round (s) | final accuracy |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for e in engines:
        rs = by_engine[e]
        acc = "/".join(f"{a:.4f}" for a in sorted({r["final_accuracy"] for r in rs}))
        print(
            f"| {e} | {_med(rs, 'wall'):.2f} | {_med(rs, 'per_round'):.3f} | {_med(rs, 'startup'):.2f} | "
            f"{_med(rs, 'maxrss_self_kb') / 1024:.0f} | {_med(rs, 'maxrss_children_kb') / 1024:.0f} | "
            f"{_med(rs, 'tree_kb') / 1024:.0f} | "
            f"{_cpu(rs, 'cpu_total')} | {_cpu(rs, 'cpu_per_round')} | {acc} |"
        )
    print()
    for e in engines:
        rows = [r["rows"] for r in by_engine[e]]
        same = all(_agreement(rows[0], x).startswith("identical") for x in rows[1:])
        print(f"repeatability {e}: {'every repetition gave identical metrics' if same else 'repetitions differ'}")
    if "hand" not in by_engine:
        print("ratios need the hand engine")
        return
    hand = by_engine["hand"]
    for e in engines:
        if e != "hand":
            print(f"agreement {e} vs hand: {_agreement(hand[0]['rows'], by_engine[e][0]['rows'])}")
    for e in engines:
        if e == "hand":
            continue
        rs = by_engine[e]
        pr = _med(rs, "per_round") / _med(hand, "per_round")
        wh = _med(rs, "wall") / _med(hand, "wall")
        mem = _med(rs, "maxrss_self_kb") / _med(hand, "maxrss_self_kb")
        tree = _med(rs, "tree_kb") / _med(hand, "tree_kb")
        line = f"ratio {e}/hand: per round {pr:.3f}x, whole process {wh:.3f}x, peak RSS {mem:.2f}x, tree peak RSS {tree:.2f}x"
        if e == "local":
            ok_r, ok_w = pr <= GOAL_PER_ROUND, wh <= GOAL_WHOLE
            line += (
                f"; goals: per round <= {GOAL_PER_ROUND:.2f}x {'met' if ok_r else 'MISSED'}, "
                f"whole process <= {GOAL_WHOLE:.2f}x {'met' if ok_w else 'MISSED'}"
            )
            cpr = _med(rs, "cpu_per_round") / _med(hand, "cpu_per_round")
            cwh = _med(rs, "cpu_total") / _med(hand, "cpu_total")
            cpr_s = f"{cpr:.3f}x" if args.rounds > 1 else "n/a (needs 2+ rounds)"
            line += f"\nratio {e}/hand CPU seconds: per round {cpr_s}, whole process {cwh:.3f}x"
        print(line)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    p.add_argument("--clients", type=int, default=10, help="number of clients (default 10)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions per way (default 3)")
    p.add_argument(
        "--engines", default=",".join(ENGINES), help="comma-separated ways among hand,local,ray (default all)"
    )
    p.add_argument("--epochs", type=int, default=1, help="local epochs per round (default 1)")
    p.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS/MKL_NUM_THREADS of every measured process (0: inherit; default 1)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra fedkd config override (repeatable)"
    )
    p.add_argument("--json", metavar="PATH", help="also write every measurement as JSON")
    p.add_argument("--retries", type=int, default=1, help="retries of a failed measurement (default 1)")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        bad = [e for e in engines if e not in ENGINES]
        if bad or not engines:
            p.error(f"--engines: unknown {bad or 'empty list'}; choose among {', '.join(ENGINES)}")
        if min(args.rounds, args.clients, args.reps, args.epochs) < 1:
            p.error("--rounds, --clients, --reps and --epochs must be >= 1")
        args.engine_list = list(dict.fromkeys(engines))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args.worker, json.loads(args.spec), Path(args.result))
        return 0
    spec = resolve(args)
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1")
    if args.threads > 0:  # fixed before torch starts, in every process (Ray's actors inherit it)
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    print(f"workload: {' '.join('--set ' + o for o in spec['overrides'])}")
    print(f"torch threads: OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', '(unset)')} in every measured process")
    print(
        f"ways: {', '.join(args.engine_list)}; {args.reps} interleaved repetition(s), each in a fresh subprocess",
        flush=True,
    )
    by_engine: dict[str, list[dict[str, Any]]] = {e: [] for e in args.engine_list}
    for rep in range(1, args.reps + 1):
        for e in args.engine_list:
            r = measure_retrying(e, spec, env, args.retries)
            by_engine[e].append(r)
            print(
                f"rep {rep}/{args.reps} {e:>5}: wall {r['wall']:6.2f}s  per round {r['per_round']:.3f}s  "
                f"start-up {r['startup']:5.2f}s  peak RSS {r['maxrss_self_kb'] / 1024:.0f} MB  "
                f"tree {r['tree_kb'] / 1024:.0f} MB  final acc {r['final_accuracy']:.4f}",
                flush=True,
            )
    report(by_engine, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec, "results": by_engine}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
