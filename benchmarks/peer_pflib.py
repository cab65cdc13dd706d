"""A peer run against PFLlib (github.com/TsingZ0/PFLlib): the same FedAvg and FedGen work, side by side.

The script takes the path of a PFLlib checkout, writes fedkd's partition of the config into it
in PFLlib's format, then runs, each as a fresh subprocess with one torch thread and
interleaved over ``--reps`` repetitions:

* ``pflib``: PFLlib's ``system/main.py`` (``-algo FedAvg`` / ``-algo FedGen``);
* ``local``: ``fedkd run`` with the clients one by one (``clients.batched=false``);
* ``batched``: ``fedkd run`` with the batched client engine (``clients.batched=true``).

It prints a markdown table of medians (whole-process wall time, time per round as each
framework reports it, peak RSS, accuracy) and the ratios fedkd / PFLlib. Issue 12's goal:
fedkd's batched engine ≤ 0.5× PFLlib's whole-process time. Not run in CI. ::

    python benchmarks/peer_pflib.py /path/to/PFLlib --reps 3 --json /tmp/peer.json  # the full measurement
    python benchmarks/peer_pflib.py /path/to/PFLlib --rounds 2 --reps 1             # smoke test

The setting (S1's, sims/suites/s1/mnist5k-{fedavg,fedgen}-dir0.1.toml): mnist5k, Dirichlet
α = 0.1 over 20 clients, 10 of them sampled per round, batch 32, plain SGD at lr 0.01,
15 rounds, seed 0. What is matched and how:

* data: fedkd's own split of mnist5k (4,000 train / 1,000 test images, normalized with the
  train split's mean and std). Client ``i``'s PFLlib ``train/i.npz`` holds exactly the
  tensors fedkd's ClientApp trains client ``i`` on (``fedkd.client_app.client_partition``),
  in PFLlib's format (``np.savez_compressed(data={'x': float32 (n, 1, 28, 28), 'y': int64})``),
  under ``<checkout>/dataset/<--dataset-dir>/`` (removed afterwards unless ``--keep``).
* test data: PFLlib evaluates on per-client test files and reports Σ correct / Σ samples
  over all clients. ``test/i.npz`` holds every 20th image of fedkd's 1,000-image global test
  set, starting at ``i`` (50 each, disjoint, class-balanced). Since PFLlib's FedAvg and
  FedGen send the global model to every client before evaluating, its accuracy is the
  global model's on the same 1,000 images that fedkd's server evaluates on.
* Dirichlet min-size: ``--min-size`` (default 32 = one batch) instead of S1's 10: PFLlib
  drops the last partial batch (``DataLoader(drop_last=True)``), so a client with fewer than
  32 samples trains no step there, and PFLlib's FedGen client cannot even start (its
  ``__init__`` reads one batch). Both frameworks get the same partition.
* local work: PFLlib's ``-ls`` counts epochs, fedkd's S1 suite fixed steps
  (``clients.local-steps=20``), which PFLlib cannot express. Both run ``--local-epochs``
  epochs (fedkd ``clients.local-epochs``, ``clients.local-steps=0``; PFLlib ``-ls``). PFLlib
  takes ⌊n/32⌋ full batches per epoch, fedkd ⌈n/32⌉ (the last one partial), so fedkd does a
  little more: the header prints both sums for the partition.
* rounds: PFLlib's loop runs ``-gr + 1`` rounds and evaluates *before* the training of
  rounds 0, eg, 2·eg, …; it is run with ``-gr R-1``: R trainings, like fedkd's R rounds.
  Its last evaluation is of the model after round k = ⌊(R-1)/eg⌋·eg, so the accuracy
  compared is each framework's after round k (fedkd's from its per-round JSON); fedkd's
  final accuracy (after round R) is printed too.
* model: ``--model same`` (default) trains PFLlib's ``CNN`` for MNIST (``FedAvgCNN``:
  conv 5×5 ×32, pool, conv 5×5 ×64, pool, fc 1024→512, fc 512→10; 582k parameters) on both
  sides: fedkd gets it as model ``pflib-cnn``, registered in the fedkd process by this script
  (``--fedkd-child``: the same ``fedkd.cli.main`` as the ``fedkd`` command). ``--model own``
  runs fedkd's ``cnn`` (padded convolutions, about 2.6× the multiply-adds) with S1's
  ``model.feature-dim=32``.
* FedGen: fedkd's official recipe where PFLlib has a flag for it: generator noise 32, hidden
  256, 50 server steps per round at batch 32, Adam lr 3e-4 (PFLlib ``-nd -hd -se -lbs -glr``;
  PFLlib's defaults would be 512, 512, 1000, 0.005). fedkd's generator gets PFLlib's shape
  (``activation=none``: no output ReLU), PFLlib's label draw (``label-sampling=prior``) and its
  regularizer on every local step (``reg-steps``). What still differs: fedkd's client loss adds
  β·KL to α·CE (α = β = 10, decayed 0.98 per round; PFLlib: CE of weight 1, so fedkd draws
  the generator twice per step, PFLlib once); fedkd's generator loss is a per-client CE with
  a diversity term and L2 weight decay, PFLlib's the CE of the sample-weighted logits.
* evaluation: fedkd's server evaluates the global model on the test set before round 1 and
  after every round (R + 1 times); PFLlib every ``--eval-gap`` rounds (R times with 1), and
  each of its evaluations also runs a train-loss pass over every client's training data
  (``train_metrics``, with a generator draw per batch for FedGen), which fedkd does not.
* as shipped: fedkd writes its run directory (metrics, a checkpoint per round, plots);
  PFLlib writes its results ``.h5`` and the final model (removed afterwards unless
  ``--keep``) and re-reads each client's ``.npz`` at every ``load_train_data``.
* randomness: fedkd is seeded (``--seed``); PFLlib seeds torch only (``torch.manual_seed(0)``),
  so its client sampling (NumPy) differs from run to run, and from fedkd's.
* torchvision: PFLlib's ``main.py`` imports it for its ResNet/GoogleNet branches. Where it
  does not import (fedkd's venv may hold one built for another torch), the PFLlib process
  replaces it by an empty module after the failed attempt and says so in its log.

Every measured process gets ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``/``OPENBLAS_NUM_THREADS``
= ``--threads`` (default 1) and calls ``torch.set_num_threads`` (fedkd: ``clients.threads``;
PFLlib: the launcher here, before ``main.py``). Wall time is spawn to exit, measured by this
parent; peak RSS is the child's own ``ru_maxrss`` from ``wait4`` (both are single processes).
PFLlib's imports (h5py, scikit-learn, cvxpy, calmsize) must be installed in the running Python.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ALGOS = {"fedavg": "FedAvg", "fedgen": "FedGen"}
WAYS = ("pflib", "local", "batched")
GOAL_WHOLE = 0.5  # batched / pflib, whole process (issue 12)
MARKER = ".fedkd-peer-pflib"  # marks a dataset directory this script wrote (safe to replace)
# fedkd's FedGen recipe (strategies/fedgen.py defaults), given to both frameworks explicitly
FEDGEN = {"latent-dim": 32, "hidden-dim": 256, "gen-steps": 50, "gen-lr": 3e-4}
PFLLIB_FILES = ("system/main.py", "system/utils/data_utils.py", "system/flcore/servers/serverbase.py",
                "system/flcore/servers/serveravg.py", "system/flcore/servers/servergen.py")  # fmt: skip

# Runs PFLlib's main.py in its system/ directory (its paths are relative: ../dataset, ../results).
PFLLIB_LAUNCHER = r"""
import os, runpy, sys, types
import torch
threads = int(os.environ.get("PEER_TORCH_THREADS", "0"))
if threads > 0:
    torch.set_num_threads(threads)
try:
    import torchvision  # noqa: F401
    print("peer-pflib: torchvision imported", flush=True)
except Exception as e:  # only main.py's ResNet/GoogleNet/... branches use it
    why = f"{type(e).__name__}: {e}"
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    stub = types.ModuleType("torchvision")
    def _missing(name):  # AttributeError, so that hasattr() on the module works (inspect does it)
        raise AttributeError(f"torchvision.{name}: torchvision did not import ({why}); stubbed by peer_pflib.py")
    stub.__getattr__ = _missing
    sys.modules["torchvision"] = stub
    print(f"peer-pflib: torchvision stubbed after a failed import ({why})", flush=True)
sys.argv = ["main.py", *sys.argv[1:]]
sys.path.insert(0, os.getcwd())
runpy.run_path("main.py", run_name="__main__")
"""


class BadInput(Exception):
    """Bad command-line input: one ``error:`` line, exit 2."""


# ----------------------------------------------------------------------------- fedkd side
def register_pflib_cnn() -> None:
    """Register PFLlib's MNIST ``CNN`` (``FedAvgCNN(in_features=1, dim=1024)``) as fedkd model
    ``pflib-cnn``: ``features`` is PFLlib's base (the convolutions and fc1 with its ReLU),
    ``classifier`` its head (``fc``), so FedGen's feature space is the same 512 wide."""
    from torch import nn

    from fedkd.models import MODELS, FedkdModel

    if "pflib-cnn" in MODELS:
        return

    @MODELS.register("pflib-cnn")
    class PflibCNN(FedkdModel):
        """PFLlib's FedAvgCNN: conv 5×5 (32) → ReLU → pool 2, conv 5×5 (64) → ReLU → pool 2,
        fc → ``feature_dim`` (512) → ReLU, fc → classes; unpadded convolutions."""

        def __init__(self, in_shape: tuple[int, int, int], num_classes: int = 10, feature_dim: int = 512) -> None:
            super().__init__(in_shape, num_classes, feature_dim)
            self.body = nn.Sequential(
                nn.Conv2d(in_shape[0], 32, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            )  # fmt: skip
            self._finish()


def fedkd_overrides(args: argparse.Namespace, algo: str) -> list[str]:
    """The fedkd config of one algorithm (``clients.batched`` is set per way)."""
    same = args.model == "same"
    out = [
        f"dataset.name={args.dataset}", f"rounds={args.rounds}", f"seed={args.seed}",
        f"clients.num={args.clients}", f"clients.fraction={args.join_ratio}",
        f"clients.architectures={'pflib-cnn' if same else 'cnn'}", f"model.feature-dim={512 if same else 32}",
        "partition.name=dirichlet", "partition.test-fraction=0", f"partition.dirichlet.alpha={args.alpha}",
        f"partition.dirichlet.min-size={args.min_size}",
        f"clients.local-epochs={args.local_epochs}", "clients.local-steps=0",
        f"clients.batch-size={args.batch_size}", f"clients.lr={args.lr}", "clients.momentum=0", "clients.weight-decay=0",
        "device=cpu", "clients.device=cpu", f"clients.threads={max(args.threads, 0)}", "engine=local",
        f"strategy.name={algo}",
    ]  # fmt: skip
    if algo == "fedgen":
        out += [f"strategy.fedgen.{k}={v}" for k, v in FEDGEN.items()]
        out += [f"strategy.fedgen.gen-batch-size={args.batch_size}", "strategy.fedgen.activation=none",
                "strategy.fedgen.label-sampling=prior", f"strategy.fedgen.reg-steps={args.max_local_steps}"]  # fmt: skip
    return out + list(args.set)


def fedkd_partition(cfg: Any) -> list[tuple[Any, Any]]:
    """Every client's ``(x, y)``: exactly what fedkd's ClientApp trains client ``i`` on."""
    from fedkd.client_app import client_partition

    out = []
    for pid in range(cfg.int("clients.num")):
        x, y, _ = client_partition(cfg, pid)
        out.append((x, y))
    return out


# ----------------------------------------------------------------------------- PFLlib side
def check_pflib(path: Path) -> Path:
    """The checkout's root, or :class:`BadInput` when ``path`` is not a PFLlib checkout."""
    if not path.is_dir():
        raise BadInput(f"{path} is not a directory (give the path of a PFLlib checkout)")
    missing = [f for f in PFLLIB_FILES if not (path / f).is_file()]
    if missing:
        raise BadInput(f"{path} is not a PFLlib checkout: it has no {missing[0]}")
    if "-algo" not in (path / "system/main.py").read_text(encoding="utf-8", errors="replace"):
        raise BadInput(f"{path} is not a PFLlib checkout: its system/main.py has no -algo flag")
    return path.resolve()


def write_pflib_dataset(cfg: Any, root: Path, name: str) -> dict[str, Any]:
    """Write fedkd's partition of ``cfg`` as PFLlib dataset ``name`` under ``root/dataset/``.

    ``train/i.npz``: client ``i``'s fedkd training tensors; ``test/i.npz``: every
    ``clients.num``-th image of fedkd's global test set starting at ``i``. Returns the sizes
    and label counts. An existing directory is replaced only if this function wrote it.
    """
    import numpy as np

    from fedkd.data import load_dataset

    n = cfg.int("clients.num")
    ds = load_dataset(cfg.str("dataset.name"), cfg.str("dataset.root"), cfg.bool("dataset.download"))
    base = root / "dataset" / name
    if base.exists():
        if not (base / MARKER).is_file():
            raise BadInput(f"{base} exists and was not written by this script; choose another --dataset-dir")
        shutil.rmtree(base)
    (base / "train").mkdir(parents=True)
    (base / "test").mkdir()
    (base / MARKER).write_text("written by fedkd benchmarks/peer_pflib.py; safe to delete\n", encoding="utf-8")
    train, test = [], []
    xt, yt = ds.x_test.numpy(), ds.y_test.numpy()
    for i, (x, y) in enumerate(fedkd_partition(cfg)):
        xi, yi = x.numpy().astype(np.float32), y.numpy().astype(np.int64)
        with open(base / "train" / f"{i}.npz", "wb") as f:
            np.savez_compressed(f, data={"x": xi, "y": yi})
        xs, ys = xt[i::n].astype(np.float32), yt[i::n].astype(np.int64)
        with open(base / "test" / f"{i}.npz", "wb") as f:
            np.savez_compressed(f, data={"x": xs, "y": ys})
        train.append(np.bincount(yi, minlength=ds.num_classes).tolist())
        test.append(np.bincount(ys, minlength=ds.num_classes).tolist())
    info = {
        "num_clients": n, "num_classes": ds.num_classes, "non_iid": True, "balance": False, "partition": "dir",
        "alpha": cfg.float("partition.dirichlet.alpha"), "batch_size": cfg.int("clients.batch-size"),
        "source": f"fedkd {cfg.str('dataset.name')}, seed {cfg.int('seed')}",
        "train_label_counts": train, "test_label_counts": test,
        "train_sizes": [sum(c) for c in train], "test_sizes": [sum(c) for c in test],
    }  # fmt: skip
    (base / "config.json").write_text(json.dumps(info), encoding="utf-8")
    return info


def pflib_args(args: argparse.Namespace, algo: str) -> list[str]:
    out = [
        "-data", args.dataset_dir, "-m", "CNN", "-algo", ALGOS[algo], "-gr", str(args.rounds - 1),
        "-nc", str(args.clients), "-jr", str(args.join_ratio), "-lbs", str(args.batch_size),
        "-ls", str(args.local_epochs), "-lr", str(args.lr), "-dev", "cpu", "-eg", str(args.eval_gap),
        "-ncl", "10", "-go", "peer", "-t", "1",
    ]  # fmt: skip
    if algo == "fedgen":
        out += ["-nd", str(FEDGEN["latent-dim"]), "-hd", str(FEDGEN["hidden-dim"]), "-se", str(FEDGEN["gen-steps"]),
                "-glr", str(FEDGEN["gen-lr"])]  # fmt: skip
    return out + shlex.split(args.pflib_extra)


def parse_pflib(text: str) -> dict[str, Any]:
    accs = [float(m) for m in re.findall(r"^Averaged Test Accuracy: ([0-9.eE+-]+)", text, re.M)]
    rounds = [float(m) for m in re.findall(r"-+ time cost -+ ([0-9.eE+-]+)", text)]
    if not accs or not rounds:
        raise RuntimeError("no 'Averaged Test Accuracy' or 'time cost' line in PFLlib's output")
    return {"accuracies": accs, "round_seconds": rounds, "torchvision_stub": "torchvision stubbed" in text}


def parse_fedkd(text: str, k: int) -> dict[str, Any]:
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    rounds = {e["round"]: e for e in events if e.get("event") == "round"}
    done = next((e for e in events if e.get("event") == "done"), None)
    if done is None or not rounds:
        raise RuntimeError("no 'round' or 'done' event in fedkd's JSON output")
    acc_k = done["initial_accuracy"] if k == 0 else rounds[k]["accuracy"]
    return {"acc_k": acc_k, "final_accuracy": done["final_accuracy"],
            "round_seconds": [rounds[r]["seconds"] for r in sorted(rounds)]}  # fmt: skip


# ----------------------------------------------------------------------------- measuring
def measure(cmd: list[str], cwd: Path, env: dict[str, str], label: str, logs: Path) -> dict[str, Any]:
    """Run ``cmd`` as a fresh process; wall time from spawn to exit and its own peak RSS."""
    log = logs / f"{label}.log"
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"the {label} run failed (exit {proc.returncode}); its output is in {log}")
    return {"wall": wall, "maxrss_kb": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime, "text": text}


def run_way(way: str, algo: str, args: argparse.Namespace, ctx: dict[str, Any], rep: int) -> dict[str, Any]:
    label = f"{algo}-{way}-rep{rep}"
    if way == "pflib":
        cmd = [sys.executable, "-c", PFLLIB_LAUNCHER, *pflib_args(args, algo)]
        r = measure(cmd, ctx["pflib"] / "system", ctx["env"], label, ctx["logs"])
        try:
            p = parse_pflib(r["text"])
        except RuntimeError as e:
            raise RuntimeError(f"{label}: {e}; see {ctx['logs'] / (label + '.log')}") from None
        r.update(acc_k=p["accuracies"][-1], final_accuracy=None, per_round=statistics.fmean(p["round_seconds"]),
                 torchvision_stub=p["torchvision_stub"])  # fmt: skip
    else:
        sim = ctx["sims"][algo][way]
        out = ctx["logs"] / f"run-{label}"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--fedkd-child", "run", str(sim), "--out", str(out),
               "--json"]  # fmt: skip
        r = measure(cmd, REPO, ctx["env"], label, ctx["logs"])
        try:
            f = parse_fedkd(r["text"], ctx["k"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise RuntimeError(f"{label}: {e}; see {ctx['logs'] / (label + '.log')}") from None
        r.update(acc_k=f["acc_k"], final_accuracy=f["final_accuracy"], per_round=statistics.fmean(f["round_seconds"]))
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    del r["text"]
    return r


def _med(rs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def report(results: dict[str, dict[str, list[dict[str, Any]]]], args: argparse.Namespace, k: int) -> list[str]:
    lines = [f"## medians over {args.reps} interleaved repetition(s)", "",
             f"| algorithm | way | wall (s) | per round (s) | peak RSS (MB) | acc after round {k} | final acc (round {args.rounds}) "
             "| wall / PFLlib | peak RSS / PFLlib |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    goals = []
    for algo, by_way in results.items():
        base = by_way.get("pflib")
        for way, rs in by_way.items():
            final = "n/a" if way == "pflib" else "/".join(f"{a:.4f}" for a in sorted({r["final_accuracy"] for r in rs}))
            acc = "/".join(f"{a:.4f}" for a in sorted({r["acc_k"] for r in rs}))
            if base and way != "pflib":
                w, m = _med(rs, "wall") / _med(base, "wall"), _med(rs, "maxrss_kb") / _med(base, "maxrss_kb")
                ratio, mem = f"**{w:.2f}×**" if way == "batched" else f"{w:.2f}×", f"{m:.2f}×"
                if way == "batched":
                    goals.append(f"{ALGOS[algo]} {w:.2f}× ({'met' if w <= GOAL_WHOLE else 'MISSED'})")
            else:
                ratio = mem = "1" if way == "pflib" else "n/a"
            lines.append(f"| {ALGOS[algo]} | {way} | {_med(rs, 'wall'):.2f} | {_med(rs, 'per_round'):.3f} "
                         f"| {_med(rs, 'maxrss_kb') / 1024:.0f} | {acc} | {final} | {ratio} | {mem} |")  # fmt: skip
    lines.append("")
    if goals:
        lines.append(f"goal (issue 12): fedkd batched ≤ {GOAL_WHOLE}× PFLlib's whole-process time: " + "; ".join(goals))
    lines.append("per round: as each framework reports it (PFLlib: its 'time cost' lines, evaluation included; "
                 "fedkd: the 'seconds' of its round events); several accuracies: the distinct values over the "
                 "repetitions")  # fmt: skip
    return lines


# ----------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("pflib", metavar="PFLLIB_DIR", help="path of a PFLlib checkout (holds system/main.py)")
    p.add_argument("--rounds", type=int, default=15, help="federated rounds (default 15; at least 2)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions per way (default 3)")
    p.add_argument("--algos", default="fedavg,fedgen", help="comma-separated among fedavg,fedgen (default both)")
    p.add_argument("--ways", default=",".join(WAYS), help="comma-separated among pflib,local,batched (default all)")
    p.add_argument("--clients", type=int, default=20, help="number of clients (default 20)")
    p.add_argument("--join-ratio", type=float, default=0.5, help="fraction sampled per round (default 0.5)")
    p.add_argument("--alpha", type=float, default=0.1, help="Dirichlet α (default 0.1)")
    p.add_argument("--min-size", type=int, default=32, help="Dirichlet min samples per client (default 32)")
    p.add_argument("--batch-size", type=int, default=32, help="local batch size (default 32)")
    p.add_argument("--lr", type=float, default=0.01, help="local SGD learning rate (default 0.01)")
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs per round (default 1)")
    p.add_argument("--eval-gap", type=int, default=1, help="PFLlib's -eg: evaluate every N rounds (default 1)")
    p.add_argument("--model", choices=("same", "own"), default="same",
                   help="same: PFLlib's CNN on both sides (default); own: fedkd's cnn against PFLlib's CNN")  # fmt: skip
    p.add_argument("--dataset", default="mnist5k", help="fedkd dataset, 1×28×28 (default mnist5k)")
    p.add_argument("--dataset-dir", default="MNIST_fedkd_peer",
                   help="scratch dataset name under <checkout>/dataset/; must contain 'MNIST' (default MNIST_fedkd_peer)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="fedkd's master seed (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of every measured process (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra fedkd override (repeatable)")
    p.add_argument("--pflib-extra", default="", metavar="ARGS", help="extra PFLlib main.py arguments (one string)")
    p.add_argument("--json", metavar="PATH", help="also write every measurement as JSON")
    p.add_argument("--keep", action="store_true", help="keep the scratch dataset, PFLlib's outputs, logs and run dirs")
    args = p.parse_args(argv)
    args.algo_list = list(dict.fromkeys(a.strip() for a in args.algos.split(",") if a.strip()))
    args.way_list = list(dict.fromkeys(w.strip() for w in args.ways.split(",") if w.strip()))
    bad = [a for a in args.algo_list if a not in ALGOS] or ([] if args.algo_list else ["(empty)"])
    if bad:
        raise BadInput(f"--algos: unknown {', '.join(bad)}; choose among {', '.join(ALGOS)}")
    bad = [w for w in args.way_list if w not in WAYS] or ([] if args.way_list else ["(empty)"])
    if bad:
        raise BadInput(f"--ways: unknown {', '.join(bad)}; choose among {', '.join(WAYS)}")
    if args.rounds < 2:
        raise BadInput(
            "--rounds must be >= 2 (PFLlib runs -gr + 1 rounds and averages the round times after the first)"
        )
    if min(args.reps, args.clients, args.min_size, args.batch_size, args.local_epochs, args.eval_gap) < 1:
        raise BadInput("--reps, --clients, --min-size, --batch-size, --local-epochs and --eval-gap must be >= 1")
    if not 0 < args.join_ratio <= 1 or int(args.clients * args.join_ratio) < 1:
        raise BadInput("--join-ratio must be in (0, 1] and sample at least one client")
    if not (args.alpha > 0 and args.lr > 0):
        raise BadInput("--alpha and --lr must be > 0")
    if "MNIST" not in args.dataset_dir or not re.fullmatch(r"[A-Za-z0-9_.-]+", args.dataset_dir):
        raise BadInput("--dataset-dir must be a plain name containing 'MNIST' (PFLlib picks its CNN's size by it)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--fedkd-child"]:  # a measured fedkd process: `fedkd ARGS` with pflib-cnn registered
        sys.path.insert(0, str(REPO))
        register_pflib_cnn()
        from fedkd.cli import main as fedkd_main

        return fedkd_main(argv[1:])
    try:
        args = parse_args(argv)
        pflib = check_pflib(Path(args.pflib))
        return run(args, pflib)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, pflib: Path) -> int:
    sys.path.insert(0, str(REPO))
    import torch

    from fedkd.config import load_config
    from fedkd.data import load_dataset
    from fedkd.errors import UserError

    torch.set_num_threads(max(args.threads, 1))
    register_pflib_cnn()
    args.max_local_steps = 1
    try:
        cfg = load_config(None, fedkd_overrides(args, "fedavg"))
        ds = load_dataset(cfg.str("dataset.name"), cfg.str("dataset.root"), cfg.bool("dataset.download"))
        if ds.shape != (1, 28, 28):
            raise BadInput(f"--dataset {args.dataset} has {ds.shape} images; PFLlib's MNIST CNN needs 1×28×28")
        info = write_pflib_dataset(cfg, pflib, args.dataset_dir)
    except UserError as e:  # fedkd's ConfigError and friends: a bad --set or partition setting
        raise BadInput(str(e)) from None
    sizes, b, e = info["train_sizes"], args.batch_size, args.local_epochs
    args.max_local_steps = e * max(-(-s // b) for s in sizes)
    if "fedgen" in args.algo_list and "pflib" in args.way_list and min(sizes) < b:
        small = min(range(len(sizes)), key=sizes.__getitem__)
        if not args.keep:
            cleanup(pflib, args)
        raise BadInput(f"PFLlib's FedGen needs every client to hold >= --batch-size={b} samples, client {small} "
                       f"holds {sizes[small]}; raise --min-size")  # fmt: skip
    k = (args.rounds - 1) // args.eval_gap * args.eval_gap
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1",
               MPLBACKEND="Agg")  # fmt: skip
    if args.threads > 0:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   OPENBLAS_NUM_THREADS=str(args.threads), PEER_TORCH_THREADS=str(args.threads))  # fmt: skip
    logs = Path(tempfile.mkdtemp(prefix="fedkd-peer-pflib-"))
    sims: dict[str, dict[str, Path]] = {}
    for algo in args.algo_list:
        sims[algo] = {}
        for way in ("local", "batched"):
            c = load_config(None, [*fedkd_overrides(args, algo), f"clients.batched={str(way == 'batched').lower()}"])
            sims[algo][way] = logs / f"{algo}-{way}.toml"
            sims[algo][way].write_text(c.to_toml(), encoding="utf-8")
    frac = int(args.clients * args.join_ratio) / args.clients
    rev = subprocess.run(["git", "-C", str(pflib), "rev-parse", "HEAD"], capture_output=True, text=True)
    print(f"# fedkd vs PFLlib: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}, torch {torch.__version__}, "
          f"{args.threads} thread(s), reps {args.reps}")  # fmt: skip
    print(f"PFLlib: {pflib} ({rev.stdout.strip()[:12] if rev.returncode == 0 else 'not a git work tree'}); "
          f"dataset {pflib / 'dataset' / args.dataset_dir}")  # fmt: skip
    print(f"partition: {args.clients} clients, train sizes {sizes} (min {min(sizes)}); test sizes "
          f"{min(info['test_sizes'])}-{max(info['test_sizes'])} ({sum(info['test_sizes'])} in all)")  # fmt: skip
    print(f"local steps per round (expected, {frac:.0%} of the clients): PFLlib {e * frac * sum(s // b for s in sizes):.1f} "
          f"full batches ({e * frac * sum(s // b * b for s in sizes):.0f} samples), fedkd "
          f"{e * frac * sum(-(-s // b) for s in sizes):.1f} batches ({e * frac * sum(sizes):.0f} samples)")  # fmt: skip
    for algo in args.algo_list:
        print(f"{ALGOS[algo]}: fedkd {' '.join(fedkd_overrides(args, algo))} clients.batched=false|true")
        print(f"{ALGOS[algo]}: PFLlib main.py {' '.join(pflib_args(args, algo))}")
    print(f"ways: {', '.join(args.way_list)}; interleaved; accuracies compared after round {k}", flush=True)
    ctx = {"pflib": pflib, "env": env, "logs": logs, "sims": sims, "k": k}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {a: {w: [] for w in args.way_list} for a in args.algo_list}
    try:
        for rep in range(1, args.reps + 1):
            for algo in args.algo_list:
                for way in args.way_list:
                    r = run_way(way, algo, args, ctx, rep)
                    results[algo][way].append(r)
                    extra = " (torchvision stubbed)" if r.get("torchvision_stub") else ""
                    print(f"rep {rep}/{args.reps} {ALGOS[algo]:>6} {way:>7}: wall {r['wall']:7.2f}s  per round "
                          f"{r['per_round']:.3f}s  peak RSS {r['maxrss_kb'] / 1024:.0f} MB  acc@{k} {r['acc_k']:.4f}{extra}",
                          flush=True)  # fmt: skip
    finally:
        complete = all(len(rs) == args.reps for by in results.values() for rs in by.values())
        if args.keep:
            print(f"kept: logs and fedkd run dirs in {logs}; dataset in {pflib / 'dataset' / args.dataset_dir}")
        else:
            cleanup(pflib, args)
            if complete:  # a failed run's log stays for the error message that names it
                shutil.rmtree(logs, ignore_errors=True)
    print()
    print("\n".join(report(results, args, k)))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k_: v for k_, v in vars(args).items()}, "partition": info,
                                               "results": results}, indent=1, default=str), encoding="utf-8")  # fmt: skip
    return 0


def cleanup(pflib: Path, args: argparse.Namespace) -> None:
    """Remove what the PFLlib runs and this script wrote into the checkout."""
    shutil.rmtree(pflib / "dataset" / args.dataset_dir, ignore_errors=True)
    shutil.rmtree(pflib / "system" / "models" / args.dataset_dir, ignore_errors=True)
    for algo in ALGOS.values():
        (pflib / "results" / f"{args.dataset_dir}_{algo}_peer_0.h5").unlink(missing_ok=True)
    for d in (pflib / "system" / "models", pflib / "results"):
        try:
            d.rmdir()  # only when empty
        except OSError:
            pass


if __name__ == "__main__":
    raise SystemExit(main())
