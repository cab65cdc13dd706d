"""Scale: many registered clients, a fixed number sampled per round (issue 5, item 5).

Each configuration (engine × registered clients) runs ``fedkd run`` in a fresh subprocess with
a generated sim file: one ``mlp`` group, the lazy ``lazy-dirichlet`` partitioner (each client's
samples computed from ``(seed, partition id)`` alone, so any number of clients fits mnist5k),
``clients.fraction`` chosen so that ``--sampled`` clients train per round, a few local steps,
no federated evaluation and no checkpoints. ::

    python benchmarks/scale.py --out /tmp/scale.md                  # local and ray × 100, 1000, 5000
    python benchmarks/scale.py --quick --out /tmp/scale-quick.md    # smoke run: local, 100 and 300
    python benchmarks/scale.py --skip-partition-plot                # diagnostic: without partition.png

What is measured, per configuration:

* wall: the subprocess from spawn to exit, measured by the parent;
* start-up: spawn to the start of the opening handshake (interpreter, imports, preflight,
  data, run directory; on ray also Ray's start and Flower's node registration);
* handshake: :func:`fedkd.server_app.handshake`, one ``query`` message per registered node
  (timed by wrapping the function inside the subprocess; on ray it includes the actors'
  start-up and their first dataset load, which overlap it);
* round 1 and rounds 2..R: the ``seconds`` of ``metrics.jsonl`` (from the end of the previous
  server evaluation to the end of this one's). Round 1 carries the warm-up (first training
  steps in each process, on ray each actor's first model build), so it is reported apart and
  "per round" is the mean over rounds 2..R;
* driver peak RSS: ``ru_maxrss`` of the ``fedkd run`` process itself (exact, from the kernel);
* tree peak RSS: peak over time of the summed VmRSS of the driver and every process it
  started, sampled every 0.2 s from ``/proc``: its descendants (by ppid) and any process
  carrying this run's marker environment variable (Ray's GCS, raylet and workers inherit the
  environment). Pages shared between processes (libraries, torch) count once per process;
  tree peak PSS (from ``/proc/PID/smaps_rollup``) splits shared pages between the processes
  that map them and so does not double count them.

Every measured process gets ``OMP_NUM_THREADS=1`` (see benchmarks/overhead.py). The CPU may
be shared with other users: report the load average (printed with the table) alongside.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

SAMPLE_EVERY_S = 0.2
MARKER = "FEDKD_SCALE_MARKER"
DEFAULT_CLIENTS = (100, 1000, 5000)
DEFAULT_ENGINES = ("local", "ray")


# --------------------------------------------------------------------------------------
# Worker: one `fedkd run` in this process, with the handshake timed
# --------------------------------------------------------------------------------------
def run_worker(argv: list[str], marks_path: Path, skip_partition_plot: bool = False) -> int:
    """Run ``fedkd <argv>``; write handshake timestamps and ``ru_maxrss`` to ``marks_path``.

    ``skip_partition_plot`` (diagnostic): replace ``fedkd.results.plot_partition`` with a no-op,
    to measure the run without the clients × classes heat-map (see benchmarks/RESULTS.md).
    """
    import fedkd.results as results
    import fedkd.server_app as server_app
    from fedkd.cli import main

    if skip_partition_plot:
        results.plot_partition = lambda counts, path: None  # RunRecorder looks it up in the module

    marks: dict[str, float] = {"imported": time.time()}
    original = server_app.handshake

    def timed_handshake(*args: Any, **kwargs: Any) -> Any:
        marks["handshake_start"] = time.time()
        fed = original(*args, **kwargs)
        marks["handshake_end"] = time.time()
        return fed

    server_app.handshake = timed_handshake  # run_federation looks it up in the module
    rc = main(argv)
    marks["maxrss_self_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    marks["exit"] = time.time()
    marks_path.write_text(json.dumps(marks), encoding="utf-8")
    return rc


# --------------------------------------------------------------------------------------
# Parent: /proc sampling of the whole process tree
# --------------------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _kb(text: str | None, field: str) -> int:
    for line in (text or "").splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


class TreeSampler(threading.Thread):
    """Peak summed RSS and PSS of ``root``, its descendants and every process whose
    environment holds ``MARKER=marker``, sampled every :data:`SAMPLE_EVERY_S` seconds."""

    def __init__(self, root: int, marker: str) -> None:
        super().__init__(daemon=True)
        self.root, self.marker = root, f"{MARKER}={marker}".encode()
        self.peak_rss_kb = self.peak_pss_kb = self.peak_root_kb = self.peak_procs = self.samples = 0
        self.members: set[int] = set()
        self._marked: dict[tuple[int, str], bool] = {}  # (pid, start time) → carries the marker
        self._stop_event = threading.Event()

    def _has_marker(self, pid: int, start: str) -> bool:
        key = (pid, start)
        if key not in self._marked:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    self._marked[key] = self.marker in f.read().split(b"\0")
            except OSError:
                self._marked[key] = False
        return self._marked[key]

    def tree(self) -> set[int]:
        """The pids of the tree now."""
        kids: dict[int, list[int]] = {}
        marked: set[int] = set()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            stat = _read(f"/proc/{name}/stat")
            if stat is None:
                continue
            try:
                fields = stat.rsplit(")", 1)[1].split()
                ppid, start = int(fields[1]), fields[19]
            except (IndexError, ValueError):
                continue
            pid = int(name)
            kids.setdefault(ppid, []).append(pid)
            if self._has_marker(pid, start):
                marked.add(pid)
        out, stack = set(), [self.root, *marked]
        while stack:
            pid = stack.pop()
            if pid not in out:
                out.add(pid)
                stack.extend(kids.get(pid, ()))
        return out

    def sample(self) -> None:
        rss = pss = procs = 0
        for pid in self.tree():
            status = _read(f"/proc/{pid}/status")
            if status is None:
                continue
            r = _kb(status, "VmRSS:")
            if r == 0:  # a zombie or a kernel thread
                continue
            procs += 1
            self.members.add(pid)
            rss += r
            pss += _kb(_read(f"/proc/{pid}/smaps_rollup"), "Pss:") or r
            if pid == self.root:
                self.peak_root_kb = max(self.peak_root_kb, r)
        self.peak_rss_kb, self.peak_pss_kb = max(self.peak_rss_kb, rss), max(self.peak_pss_kb, pss)
        self.peak_procs, self.samples = max(self.peak_procs, procs), self.samples + 1

    def run(self) -> None:
        while not self._stop_event.wait(SAMPLE_EVERY_S):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _alive(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    return stat is not None and stat.rsplit(")", 1)[1].split()[0] != "Z"


def reap(sampler: TreeSampler, grace_s: float = 15.0) -> list[int]:
    """Wait for the processes this run started to exit; end the stragglers by pid."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        left = [p for p in sampler.tree() if p != sampler.root and _alive(p)]
        if not left:
            return []
        time.sleep(0.5)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in left:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        time.sleep(2.0)
        left = [p for p in left if _alive(p)]
    return left


# --------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------
def sim_text(args: argparse.Namespace, engine: str, clients: int) -> str:
    """The sim file of one configuration."""
    fraction = 1.0 if args.sampled >= clients else (args.sampled + 0.5) / clients  # Flower floors n × fraction
    lines = [
        f"rounds = {args.rounds}",
        f"seed = {args.seed}",
        f'engine = "{engine}"',
        'device = "cpu"',
        "[dataset]",
        f'name = "{args.dataset}"',
        "[clients]",
        f"num = {clients}",
        'architectures = "mlp"',
        f"fraction = {fraction!r}",
        f"local-steps = {args.local_steps}",
        "[eval]",
        "fraction = 0.0",
        "[checkpoint]",
        "every = 0",
        "[partition]",
        'name = "lazy-dirichlet"',
        "[partition.lazy-dirichlet]",
        f"alpha = {args.alpha!r}",
        f"size = {args.size}",
    ]
    return "\n".join(lines) + "\n"


def measure(args: argparse.Namespace, engine: str, clients: int, workdir: Path) -> dict[str, Any]:
    """Run one configuration in a fresh subprocess; return its row."""
    d = workdir / f"{engine}-{clients}"
    d.mkdir(parents=True)
    sim, run_dir, marks_path, log = d / "scale.toml", d / "run", d / "marks.json", d / "output.log"
    sim.write_text(sim_text(args, engine, clients), encoding="utf-8")
    marker = uuid.uuid4().hex
    env = {**os.environ, MARKER: marker, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    plot = "skip-plot" if args.skip_partition_plot else "plot"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(marks_path), plot, "--",
           "run", str(sim), "--out", str(run_dir), *[a for s in args.set for a in ("--set", s)]]  # fmt: skip
    row: dict[str, Any] = {"engine": engine, "clients": clients, "sampled": min(args.sampled, clients),
                           "rounds": args.rounds, "status": "ok", "partition_png": not args.skip_partition_plot}  # fmt: skip
    with open(log, "wb") as out:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=d, start_new_session=True)
        sampler = TreeSampler(proc.pid, marker)
        sampler.start()
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            rc = proc.wait()
            row["status"] = f"timed out after {args.timeout:.0f}s"
        row["wall"] = time.time() - t0
        sampler.stop()
    row["leftover"] = len(reap(sampler))
    marks = json.loads(marks_path.read_text(encoding="utf-8")) if marks_path.is_file() else {}
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text(encoding="utf-8").splitlines() if x.strip()] if metrics.is_file() else []  # fmt: skip
    if rc != 0 and row["status"] == "ok":
        row["status"] = f"exit {rc}"
    if row["status"] == "ok" and len(rows) != args.rounds:
        row["status"] = f"{len(rows)} of {args.rounds} rounds"
    if row["status"] != "ok":
        row["log_tail"] = log.read_text(encoding="utf-8", errors="replace")[-3000:]
    secs = [r["seconds"] for r in rows]
    row.update(
        startup=marks["handshake_start"] - t0 if "handshake_start" in marks else None,
        handshake=marks["handshake_end"] - marks["handshake_start"] if "handshake_end" in marks else None,
        round1=secs[0] if secs else None,
        per_round=sum(secs[1:]) / len(secs[1:]) if len(secs) > 1 else None,
        failures=sum(r.get("failures", 0) for r in rows),
        bytes_down_round=rows[-1]["bytes_down"] if rows else None,
        final_accuracy=rows[-1]["accuracy"] if rows else None,
        driver_kb=marks.get("maxrss_self_kb") or sampler.peak_root_kb,
        tree_rss_kb=max(sampler.peak_rss_kb, marks.get("maxrss_self_kb", 0)),
        tree_pss_kb=sampler.peak_pss_kb,
        procs=sampler.peak_procs,
        samples=sampler.samples,
        log=str(log),
    )
    return row


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------
def _f(v: Any, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _mib(kb: Any) -> str:
    return "–" if not kb else f"{kb / 1024:,.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| engine | registered | sampled / round | start-up (s) | handshake (s) | round 1 (s) "
            "| per round, rounds 2–R (s) | wall (s) | driver peak RSS (MiB) | tree peak RSS (MiB) "
            "| tree peak PSS (MiB) | processes | final acc | status |")  # fmt: skip
    out = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        status = r["status"] + (f", {r['failures']} failed replies" if r.get("failures") else "")
        status += "" if r.get("partition_png", True) else ", partition.png skipped"
        status += f", {r['leftover']} processes left behind" if r.get("leftover") else ""
        out.append(
            f"| {r['engine']} | {r['clients']:,} | {r['sampled']} | {_f(r['startup'], '.1f')} | "
            f"{_f(r['handshake'], '.1f')} | {_f(r['round1'], '.2f')} | {_f(r['per_round'], '.2f')} | "
            f"{r['wall']:.1f} | {_mib(r['driver_kb'])} | {_mib(r['tree_rss_kb'])} | {_mib(r['tree_pss_kb'])} | "
            f"{r['procs']} | {_f(r['final_accuracy'], '.4f')} | {status} |"
        )
    return "\n".join(out) + "\n"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", default=",".join(map(str, DEFAULT_CLIENTS)), help="registered clients (default 100,1000,5000)")  # fmt: skip
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help="engines (default local,ray)")
    p.add_argument("--sampled", type=int, default=100, help="clients sampled per round (default 100)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    p.add_argument("--local-steps", type=int, default=5, help="local SGD steps per client (default 5)")
    p.add_argument("--dataset", default="mnist5k", help="dataset (default mnist5k)")
    p.add_argument("--alpha", type=float, default=0.5, help="partition.lazy-dirichlet.alpha (default 0.5)")
    p.add_argument("--size", type=int, default=50, help="partition.lazy-dirichlet.size (default 50)")
    p.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra fedkd override")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration (default 600)")
    p.add_argument(
        "--skip-partition-plot",
        action="store_true",
        help="diagnostic: do not draw partition.png (a no-op stands in for fedkd.results.plot_partition)",
    )
    p.add_argument("--quick", action="store_true",
                   help="smoke run: local, 100 and 300 clients, 10 sampled, 2 rounds, 2 local steps, digits")  # fmt: skip
    p.add_argument("--out", metavar="PATH", help="also write the Markdown table here")
    p.add_argument("--json", metavar="PATH", help="also write every row as JSON")
    p.add_argument("--keep", metavar="DIR", help="keep the run directories and logs under DIR")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.engines, args.sampled, args.rounds, args.local_steps = "100,300", "local", 10, 2, 2
        args.dataset = "digits"
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # --worker MARKS {plot,skip-plot} -- FEDKD_ARGS...
        return run_worker(argv[4:], Path(argv[1]), argv[2] == "skip-plot")
    args = parse_args(argv)
    if not Path("/proc/self/status").is_file():
        raise SystemExit("error: this benchmark reads /proc (Linux only)")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    keep = Path(args.keep) if args.keep else None
    if keep is not None and keep.exists() and any(keep.iterdir()):
        raise SystemExit(f"error: --keep {keep} is not empty")
    rows: list[dict[str, Any]] = []
    loads = [load_average()]
    with tempfile.TemporaryDirectory(prefix="fedkd-scale-") as tmp:
        workdir = keep or Path(tmp)
        for engine in engines:
            for n in clients:
                print(f"{engine} × {n:,} clients ... (load average {load_average()})", flush=True)
                row = measure(args, engine, n, workdir)
                loads.append(load_average())
                rows.append(row)
                print(f"  {row['status']}: wall {row['wall']:.1f}s, handshake {_f(row['handshake'], '.1f')}s, "
                      f"per round {_f(row['per_round'], '.2f')}s, tree peak RSS {_mib(row['tree_rss_kb'])} MiB",
                      flush=True)  # fmt: skip
                if row["status"] != "ok":
                    print(row.get("log_tail", ""), flush=True)
    text = table(rows)
    text += (
        f"\n{args.sampled} sampled per round, {args.rounds} rounds, mlp, lazy-dirichlet α={args.alpha} "
        f"size={args.size}, {args.local_steps} local steps, {args.dataset}, seed {args.seed}. "
        f"Load average (1, 5, 15 min) before each configuration and at the end: {' | '.join(loads)}.\n"
    )
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
