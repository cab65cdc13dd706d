"""Cost of the federated KD strategies, on the S1 setting (mnist5k, 20 clients, Dir(0.1), CNN).

Two measurements, in one process, each against a baseline measured side by side:

1. **FedGen's client-side overhead per local step.** One client's local update (S1: 20
   steps of batch 32 with the CNN) timed with and without FedGen's regularizer
   (:class:`fedkd.train.FedGenRegularizer`, the generator and prior the server sends),
   interleaved over ``--reps`` repetitions; the ratio of the medians is reported.
2. **Server time per round as a ratio of the clients' training time.** The 10 sampled
   clients of S1's round 1 train for real (their summed time is the clients' time, as a
   sequential simulation spends it); then each strategy's server hook
   (``aggregate_train``: base aggregation plus synthesis and distillation) runs on their
   replies, with the strategy's settings of the S1 runs (``--set`` as published).

    python benchmarks/kd_cost.py --reps 7

Every process-wide setting is fixed first: 1 torch thread (the machine has 2 shared cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

torch.set_num_threads(1)

from flwr.app import ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from fedkd import records  # noqa: E402
from fedkd.client_app import client_model, client_partition  # noqa: E402
from fedkd.config import load_config  # noqa: E402
from fedkd.data import load_dataset  # noqa: E402
from fedkd.federation import Federation, ServerContext, build_strategy  # noqa: E402
from fedkd.synthesis import build_generator  # noqa: E402
from fedkd.train import FedGenRegularizer, LocalTrainConfig, derive_seed, evaluate, train_local  # noqa: E402
from tests.conftest import make_reply  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
S1 = REPO / "sims" / "suites" / "s1" / "mnist5k-fedavg-dir0.1.toml"
SETS = ["rounds=15", "strategy.feddf.iterations=4", "strategy.fedftg.iterations=4"]


def fedgen_overhead(reps: int) -> dict[str, float]:
    cfg = load_config(S1, [*SETS, "strategy.name=fedgen"], 0)
    x, y, counts = client_partition(cfg, 0)
    model0 = client_model(cfg, 0)
    gen = build_generator("feature", (model0.feature_dim,), 10, latent_dim=32, hidden_dim=256)  # FedGen's defaults
    prior = torch.as_tensor(np.full(10, 0.1))
    local = LocalTrainConfig.from_config(cfg)
    plain, reg = [], []
    for r in range(reps):
        for which in ("plain", "fedgen"):
            model = client_model(cfg, 0)
            model.load_state_dict(model0.state_dict())
            regularizer = FedGenRegularizer(gen, 1.0, 1.0, 20, 32, prior, r) if which == "fedgen" else None
            t = time.perf_counter()
            train_local(model, x, y, local, seed=r, regularizer=regularizer)
            (plain if which == "plain" else reg).append((time.perf_counter() - t) / local.steps)
    p, g = statistics.median(plain), statistics.median(reg)
    return {"plain_ms": p * 1e3, "fedgen_ms": g * 1e3, "ratio": g / p}


class NodeList:
    """The only Grid method strategies call in ``configure_train``: the node list."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed

    def get_node_ids(self) -> list[int]:
        return list(self.fed.node_partition)


def train_sampled(cfg, init: torch.nn.Module, sampled: list[int]) -> tuple[list, float]:
    """Round 1 of the ``sampled`` clients, trained for real from ``init``: their reply Messages
    and their summed training time (what a sequential simulation spends)."""
    replies, client_seconds = [], 0.0
    for pid in sampled:
        x, y, c = client_partition(cfg, pid)
        model = client_model(cfg, pid)
        model.load_state_dict(init.state_dict())
        t = time.perf_counter()
        loss = train_local(model, x, y, LocalTrainConfig.from_config(cfg), seed=derive_seed(0, pid, 1))
        client_seconds += time.perf_counter() - t
        content = RecordDict({records.ARRAYS: records.to_record(model),
                              records.METRICS: MetricRecord({records.NUM_EXAMPLES: len(x), records.TRAIN_LOSS: loss}),
                              records.INFO: ConfigRecord({records.LABEL_COUNTS: c})})  # fmt: skip
        replies.append(make_reply(1000 + pid, content))
    return replies, client_seconds


def server_ratio() -> list[tuple[str, float, float, float]]:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    cfg = load_config(S1, SETS, 0)
    n = cfg.int("clients.num")
    ds = load_dataset("mnist5k", "", False)
    counts = np.stack([np.asarray(client_partition(cfg, pid)[2]) for pid in range(n)])
    fed = Federation({1000 + i: i for i in range(n)}, {1000 + i: "cnn" for i in range(n)}, counts, "cnn", seed=0)
    ctx = ServerContext(ds.shape, 10, cfg.int("model.feature-dim"), torch.device("cpu"), 0, cfg.int("rounds"),
                        evaluate=lambda m: evaluate(m, ds.x_test, ds.y_test, 500))  # fmt: skip
    init = client_model(cfg, 0)
    state = records.pack({"cnn": records.to_record(init)})
    sampled = sorted(np.random.default_rng(0).permutation(n)[: n // 2].tolist())  # the S1 fraction
    replies, client_seconds = train_sampled(cfg, init, sampled)
    grid = NodeList(fed)

    out = []
    for label, sets in (("fedavg", ["strategy.name=fedavg"]), ("fedgen", ["strategy.name=fedgen"]),
                        ("feddf (4 iterations)", ["strategy.name=feddf"]),
                        ("fedftg (4 iterations)", ["strategy.name=fedftg"]),
                        ("feddf + lra", ["strategy.name=feddf", "strategy.feddf.retention=lra"])):  # fmt: skip
        s = build_strategy(load_config(S1, [*SETS, *sets], 0), fed, ctx)
        s.configure_train(1, state, ConfigRecord(), grid)
        t = time.perf_counter()
        s.aggregate_train(1, replies)
        server = time.perf_counter() - t
        out.append((label, server, client_seconds, server / client_seconds))
    return out


PAPERS = REPO / "sims" / "papers"


def paper_ratio(sim: Path, sets: list[str], cache: bool) -> tuple[float, float, dict[str, float]]:
    """One round of ``sim`` (a sims/papers recipe) with its own clients: the server's
    ``aggregate_train`` time, the sampled clients' summed training time, and the round's
    server metrics; ``cache``: the teacher's logits computed once per reused batch."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    cfg = load_config(sim, sets, 0)
    n = cfg.int("clients.num")
    arch = cfg.str("clients.architectures")
    ds = load_dataset(cfg.str("dataset.name"), "", False)
    counts = np.stack([np.asarray(client_partition(cfg, pid)[2]) for pid in range(n)])
    fed = Federation({1000 + i: i for i in range(n)}, {1000 + i: arch for i in range(n)}, counts, arch, seed=0)
    ctx = ServerContext(ds.shape, ds.num_classes, cfg.int("model.feature-dim") or None, torch.device("cpu"), 0,
                        cfg.int("rounds"), evaluate=lambda m: evaluate(m, ds.x_test, ds.y_test, 500))  # fmt: skip
    init = client_model(cfg, 0)
    state = records.pack({arch: records.to_record(init)})
    k = max(1, round(n * cfg.float("clients.fraction")))
    sampled = sorted(np.random.default_rng(0).permutation(n)[:k].tolist())
    replies, client_seconds = train_sampled(cfg, init, sampled)
    grid = NodeList(fed)

    s = build_strategy(cfg, fed, ctx)
    s.distiller.updater.cache_teacher = cache
    s.configure_train(1, state, ConfigRecord(), grid)
    t = time.perf_counter()
    s.aggregate_train(1, replies)
    return time.perf_counter() - t, client_seconds, dict(s.round_metrics)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--paper", action="store_true",
                   help="only the server/clients ratio of FedDF, FedFTG and DENSE at their sims/papers recipes, "
                        "with the teacher-logit cache off and on")  # fmt: skip
    p.add_argument("--set", action="append", default=[], help="extra overrides of every --paper run")
    args = p.parse_args()
    if args.paper:
        print("| recipe | cache | server s/round | clients' training s/round | server / clients | distill s |")
        print("|---|---|---|---|---|---|")
        for name in ("mnist5k-feddf-dir0.1", "mnist5k-fedftg-dir0.1", "mnist5k-dense-oneshot"):
            for cache in (False, True):
                server, clients, m = paper_ratio(PAPERS / f"{name}.toml", args.set, cache)
                print(f"| {name} | {'on' if cache else 'off'} | {server:.2f} | {clients:.2f} | {server / clients:.2f}× "
                      f"| {m.get('distill_seconds', float('nan')):.2f} |", flush=True)  # fmt: skip
        return
    o = fedgen_overhead(args.reps)
    print("| FedGen client overhead | plain ms/step | FedGen ms/step | ratio |\n|---|---|---|---|")
    print(f"| S1 client 0, cnn, batch 32, 20 steps, median of {args.reps} | {o['plain_ms']:.2f} | "
          f"{o['fedgen_ms']:.2f} | {o['ratio']:.3f}× |\n")  # fmt: skip
    print("| strategy | server s/round | clients' training s/round | server / clients |\n|---|---|---|---|")
    for label, server, clients, ratio in server_ratio():
        print(f"| {label} | {server:.2f} | {clients:.2f} | {ratio:.2f}× |")


if __name__ == "__main__":
    main()
