"""The GPU check: everything that should run on the GPU does, and how much faster it is than the CPU.

One command, prepared for a machine with a CUDA GPU (under 8 minutes there)::

    python benchmarks/gpu.py --json gpu.json
    python benchmarks/gpu.py --smoke --json /tmp/gpu-smoke.json     # CPU only, seconds (CI)

It runs the same work on the device and on the CPU (``--cpu-threads`` torch threads, 1 by
default, as every published fedkd run) and prints each time and ratio:

1. **A FedFTG round** (mnist5k, 20 clients, half per round, CNN, the strategy's official
   recipe, ``fedkd.engines.execute``): the round's wall time and its server-distillation time.
   A global forward pre-hook records the device of every model and generator forward, by phase
   (clients' training, server distillation, the rest: evaluation); the check fails if any of
   them ran elsewhere than the device: the global model, the generator, the teacher ensemble
   and the clients' models.
2. **A ``fedkd dfkd`` epoch** (the shipped LeNet-5 → LeNet-5-half preset; the teacher's
   training timed apart), with the same device check.
3. **The batched client engine at 100 clients** (``benchmarks/batched.py``'s round: cnn, S1's
   local recipe): one by one and batched, on the device and on the CPU.

and the peak GPU memory (``torch.cuda.max_memory_allocated``). ``--smoke`` uses the CPU as
"the device" and the smallest sizes (digits, 4 clients), so the script itself is tested in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import batched as batched_bench  # noqa: E402

from fedkd.config import load_config  # noqa: E402
from fedkd.models import FedkdModel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
S1 = REPO / "sims" / "suites" / "s1" / "mnist5k-fedftg-dir0.1.toml"


class DeviceLog:
    """Which devices each phase's model and generator forwards ran on."""

    def __init__(self) -> None:
        self.phase = "other"
        self.seen: dict[tuple[str, str], set[str]] = {}
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: Any) -> None:
        from generators import GENERATORS

        kind = "model" if isinstance(module, FedkdModel) else None
        if kind is None and any(isinstance(module, c) for c in _generator_classes(GENERATORS)):
            kind = "generator"
        if kind is None:
            return
        p = next(module.parameters(), None)
        if p is not None:
            self.seen.setdefault((self.phase, kind), set()).add(p.device.type)

    @contextlib.contextmanager
    def recording(self) -> Iterator[DeviceLog]:
        self.seen.clear()
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        try:
            yield self
        finally:
            self._handle.remove()

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        old, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = old

    def report(self) -> dict[str, list[str]]:
        return {f"{phase}/{kind}": sorted(devs) for (phase, kind), devs in sorted(self.seen.items())}


def _generator_classes(registry: Any) -> list[type]:
    out = []
    for name in registry.names():
        obj = registry.get(name)
        if isinstance(obj, type):
            out.append(obj)
    return out


LOG = DeviceLog()


def _phase(obj: Any, attr: str, phase: str) -> None:
    """Wrap ``obj.attr`` so that it runs inside ``LOG.during(phase)``."""
    fn = getattr(obj, attr)

    def wrapped(*a: Any, **k: Any) -> Any:
        with LOG.during(phase):
            return fn(*a, **k)

    setattr(obj, attr, wrapped)


def install_phases() -> None:
    import fedkd.batched
    import fedkd.client_app
    import fedkd.dfkd
    import fedkd.server_kd

    _phase(fedkd.client_app, "train_one", "clients")
    _phase(fedkd.batched, "train_one", "clients")
    _phase(fedkd.batched, "train_group", "clients")
    _phase(fedkd.server_kd.ServerDistiller, "run", "server")
    _phase(fedkd.dfkd, "obtain_teacher", "teacher-training")
    _phase(fedkd.dfkd, "distill", "distillation")


def check(log: dict[str, list[str]], device: str, phases: list[str]) -> list[str]:
    """Problems: a phase/kind seen on another device than ``device``, or an expected one not seen."""
    problems = [f"{k} ran on {v}" for k, v in log.items() if v != [device]]
    problems += [f"no {p} forward was seen" for p in phases if p not in log]
    return problems


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fedftg_round(device: str, smoke: bool) -> dict[str, Any]:
    from fedkd.engines import execute

    sets = ["rounds=1", f"device={device}", f"clients.device={device}", "clients.threads=0", "dfkd.threads=0"]
    if smoke:
        sets += ["dataset.name=digits", "clients.num=4", "clients.fraction=1.0", "strategy.fedftg.iterations=1",
                 "clients.local-steps=2"]  # fmt: skip
    cfg = load_config(S1, sets, 0)
    rows: list[dict[str, Any]] = []
    with LOG.recording():
        _sync(device)
        t = time.perf_counter()
        summary = execute(cfg, None, rows.append)
        _sync(device)
        wall = time.perf_counter() - t
    return {"wall_s": wall, "distill_s": rows[-1].get("distill_seconds") if rows else None,
            "final_accuracy": summary.get("final_accuracy"), "devices": LOG.report()}  # fmt: skip


def dfkd_epoch(device: str, smoke: bool, out: Path) -> dict[str, Any]:
    from fedkd import dfkd

    sets = [f"device={device}", "dfkd.epochs=1", "dfkd.teacher-epochs=2", "dfkd.threads=0"]
    if smoke:
        sets += ["dataset.name=digits", "dfkd.iterations=2", "dfkd.teacher-epochs=1"]
    cfg = load_config(None, sets, 0)  # the shipped dfkd defaults
    with LOG.recording():
        plan = dfkd.prepare(cfg)
        _sync(device)
        t = time.perf_counter()
        info = dfkd.obtain_teacher(plan, out / f"teacher-{device.replace(':', '')}")
        _sync(device)
        teacher_s = time.perf_counter() - t
        t = time.perf_counter()
        summary = dfkd.distill(plan, None, info, None, time.perf_counter())
        _sync(device)
        epoch_s = time.perf_counter() - t
    return {"teacher_training_s": teacher_s, "epoch_s": epoch_s,
            "student_accuracy": summary.get("student_final_accuracy"), "devices": LOG.report()}  # fmt: skip


def batched_round(device: str, clients: int, batched: bool, arch: str = "cnn") -> dict[str, Any]:
    sets = [*batched_bench.BASE, f"clients.num={clients}", f"clients.architectures={arch}", f"device={device}",
            f"clients.device={device}"]  # fmt: skip
    cfg = load_config(None, sets)
    batched_bench.one_round(cfg, arch, batched)  # warm-up (caches, kernels)
    with LOG.recording():
        _sync(device)
        t = time.perf_counter()
        batched_bench.one_round(cfg, arch, batched)
        _sync(device)
        wall = time.perf_counter() - t
    return {"wall_s": wall, "devices": LOG.report()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU only, smallest sizes (the CI test)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--cpu-threads", type=int, default=1)
    p.add_argument("--clients", type=int, default=100, help="clients of the batched-engine round")
    p.add_argument("--json", help="write the summary here")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else args.device
    clients = 4 if args.smoke else args.clients
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible (use --smoke for the CPU-only check)", file=sys.stderr)
        return 2
    install_phases()
    result: dict[str, Any] = {
        "machine": platform.node(), "torch": torch.__version__, "device": device, "smoke": args.smoke,
        "cpu_threads": args.cpu_threads,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
    }  # fmt: skip
    problems: list[str] = []
    print(f"# fedkd GPU check: device {device} ({result['gpu'] or 'cpu'}), CPU side {args.cpu_threads} thread(s), "
          f"torch {torch.__version__}", flush=True)  # fmt: skip
    sides = [device] if args.smoke else [device, "cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        for side in sides:
            torch.set_num_threads(args.cpu_threads if side == "cpu" else max(torch.get_num_threads(), 1))
            if side.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            ftg = fedftg_round(side, args.smoke)
            problems += [f"fedftg round on {side}: {x}" for x in check(ftg["devices"], side.split(":")[0],
                         ["clients/model", "server/model", "server/generator", "other/model"])]  # fmt: skip
            print(f"fedftg round on {side}: {ftg['wall_s']:.1f}s (server distillation {ftg['distill_s'] or 0:.1f}s); "
                  f"devices {ftg['devices']}", flush=True)  # fmt: skip
            df = dfkd_epoch(side, args.smoke, Path(tmp))
            problems += [f"dfkd epoch on {side}: {x}" for x in check(df["devices"], side.split(":")[0],
                         ["teacher-training/model", "distillation/model", "distillation/generator"])]  # fmt: skip
            print(f"dfkd on {side}: teacher training {df['teacher_training_s']:.1f}s, one epoch {df['epoch_s']:.1f}s; "
                  f"devices {df['devices']}", flush=True)  # fmt: skip
            rounds = {}
            for mode in (False, True):
                r = batched_round(side, clients, mode)
                problems += [f"{clients} clients ({'batched' if mode else 'one by one'}) on {side}: {x}"
                             for x in check(r["devices"], side.split(":")[0], ["clients/model"])]  # fmt: skip
                rounds["batched" if mode else "one_by_one"] = r
                print(f"{clients} clients {'batched' if mode else 'one by one'} on {side}: {r['wall_s']:.2f}s", flush=True)
            result[side] = {"fedftg_round": ftg, "dfkd": df, "clients_round": rounds}
            if side.startswith("cuda"):
                result[side]["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
                print(f"peak GPU memory: {result[side]['peak_gpu_memory_mb']:.0f} MB", flush=True)
    if not args.smoke:
        d, c = result[device], result["cpu"]
        ratios = {
            "fedftg_round": c["fedftg_round"]["wall_s"] / d["fedftg_round"]["wall_s"],
            "server_distillation": (c["fedftg_round"]["distill_s"] or 0) / max(d["fedftg_round"]["distill_s"] or 1e-9, 1e-9),
            "dfkd_epoch": c["dfkd"]["epoch_s"] / d["dfkd"]["epoch_s"],
            "teacher_training": c["dfkd"]["teacher_training_s"] / d["dfkd"]["teacher_training_s"],
            "clients_batched_vs_cpu_one_by_one": c["clients_round"]["one_by_one"]["wall_s"] / d["clients_round"]["batched"]["wall_s"],
            "clients_one_by_one_vs_cpu_one_by_one": c["clients_round"]["one_by_one"]["wall_s"] / d["clients_round"]["one_by_one"]["wall_s"],
            "clients_batched_vs_one_by_one_on_device": d["clients_round"]["one_by_one"]["wall_s"] / d["clients_round"]["batched"]["wall_s"],
        }  # fmt: skip
        result["speedup_vs_cpu"] = ratios
        print("| what | CPU / device |", "|---|---|", *(f"| {k} | {v:.1f}× |" for k, v in ratios.items()), sep="\n")
    result["problems"] = problems
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    for x in problems:
        print(f"FAIL: {x}", flush=True)
    print("device check: " + ("passed" if not problems else f"{len(problems)} problem(s)"), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
