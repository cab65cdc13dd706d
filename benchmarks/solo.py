"""Clients trained alone: the baseline of S3 ("the global model beats every client trained alone").

For a sim and a seed, every client trains its own model on its own partition only, for as
many local steps as it gets in the federated run (``rounds × clients.local-steps``, or
``rounds × clients.local-epochs`` epochs), from the same initialisation as its
architecture group in that run, with the same optimiser settings, and is evaluated on the
same held-out test set. No federation, no communication. ::

    python benchmarks/solo.py sims/suites/s3/mnist5k-fedavg-dir0.1.toml --seeds 3

prints, per seed, every client's accuracy and the best one, and a Markdown table of the
best and mean client accuracy over seeds (mean ± sample std).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedkd.client_app import client_partition  # noqa: E402
from fedkd.config import load_config  # noqa: E402
from fedkd.data import load_dataset  # noqa: E402
from fedkd.federation import parse_architectures  # noqa: E402
from fedkd.server_app import global_architecture, initial_models  # noqa: E402
from fedkd.train import LocalTrainConfig, derive_seed, evaluate, train_local  # noqa: E402


def solo(sim: Path, seed: int, sets: list[str]) -> list[tuple[int, str, float]]:
    """``(partition id, architecture, test accuracy)`` of every client trained alone."""
    cfg = load_config(sim, sets, seed)
    ds = load_dataset(cfg.str("dataset.name"), cfg.str("dataset.root"), cfg.bool("dataset.download"))
    archs = parse_architectures(cfg.str("clients.architectures"), cfg.int("clients.num"))
    groups = list(dict.fromkeys([*archs, global_architecture(cfg)]))
    rounds = cfg.int("rounds")
    per_round = LocalTrainConfig.from_config(cfg)
    local = dataclasses.replace(per_round, epochs=per_round.epochs * rounds, steps=per_round.steps * rounds)
    out = []
    for pid, arch in enumerate(archs):
        model = initial_models(cfg, ds, groups)[arch]  # the run's initialisation of this group
        x, y, _ = client_partition(cfg, pid)
        train_local(model, x, y, local, seed=derive_seed(seed, pid, 1))
        _, acc = evaluate(model, ds.x_test, ds.y_test, cfg.int("eval.batch-size"))
        out.append((pid, arch, acc))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sim", type=Path)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    best, mean = [], []
    for seed in range(args.seeds):
        t = time.perf_counter()
        res = solo(args.sim, seed, args.set)
        accs = [a for _, _, a in res]
        best.append(max(accs))
        mean.append(float(np.mean(accs)))
        detail = ", ".join(f"{pid}:{arch}={acc * 100:.1f}" for pid, arch, acc in res)
        print(f"seed {seed}: best {best[-1] * 100:.1f}%, mean {mean[-1] * 100:.1f}% ({time.perf_counter() - t:.0f}s): {detail}",
              flush=True)  # fmt: skip

    def fmt(v: list[float]) -> str:
        a = np.asarray(v) * 100
        return f"{a.mean():.2f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.2f}"

    print("\n| baseline | seeds | best client acc | mean client acc |\n|---|---|---|---|")
    print(f"| clients trained alone ({args.sim.stem}) | {args.seeds} | {fmt(best)} | {fmt(mean)} |")


if __name__ == "__main__":
    main()
