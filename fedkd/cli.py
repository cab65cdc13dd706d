"""``fedkd``: run, list and plot federated (and data-free KD) simulations.

Exit codes: 0 ok, 2 bad input (one line on stderr), 1 failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from fedkd.errors import UserError

log = logging.getLogger("fedkd")


class Output:
    """Where a command's progress goes: human lines (default), JSON lines (``--json``: one object
    per line, each with an ``event``), or only the final line (``--quiet``). Errors always go to
    stderr as one ``error:`` line, whatever the mode."""

    def __init__(self, mode: str = "human") -> None:
        self.mode = mode

    def say(self, text: str, event: dict[str, Any] | None = None, final: bool = False) -> None:
        if self.mode == "json":
            if event is not None:
                from fedkd.results import _clean

                print(json.dumps(_clean(event), default=str), flush=True)
        elif self.mode == "human" or final:
            print(text, flush=True)


OUT = Output()

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message}")


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def find_sim(name: str | None) -> Path:
    """A sim path; with no name, ``sims/quickstart.toml`` (cwd first, then the checkout)."""
    if name is not None:
        p = Path(name)
        if not p.is_file():
            raise UserError(f"sim file {name!r} {'is not a file' if p.exists() else 'does not exist'}")
        return p
    for base in (Path.cwd(), _repo_root()):
        p = base / "sims" / "quickstart.toml"
        if p.is_file():
            return p
    raise UserError("no SIM given and sims/quickstart.toml not found; pass a sim file")


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}MB"


def _num(v: Any, fmt: str = ".4f") -> str:
    return "nan" if v is None else format(v, fmt)


def round_printer(total: int) -> Callable[[dict[str, Any]], None]:
    """One line per round on stdout (a diverged model prints nan)."""

    def show(row: dict[str, Any]) -> None:
        groups = row.get("group_accuracy") or {}
        extra = "  " + " ".join(f"{g}={_num(a, '.3f')}" for g, a in groups.items()) if len(groups) > 1 else ""
        OUT.say(
            f"round {row['round']:>3}/{total}  acc {_num(row['accuracy'])}  loss {_num(row['loss'])}  "
            f"train_loss {_num(row.get('train_loss'))}  up {_mb(row['bytes_up'])}  down {_mb(row['bytes_down'])}  "
            f"fail {row['failures']}"
            + (f" rej {row['rejected']}" if row.get("rejected") else "")
            + (f"  clients {_num(row['client_accuracy_mean'])} (p10 {_num(row['client_accuracy_p10'])})"
               if row.get("client_accuracy_mean") is not None else "")
            + (f"  task {row['task']} acc {_num(row['current_task_accuracy'], '.3f')}" if row.get("task") is not None
               else "")
            + (f" forgetting {_num(row['forgetting'], '.3f')}" if row.get("forgetting") is not None else "")
            + f"  {row['seconds']:.1f}s{extra}",
            {"event": "round", "of": total, **row},
        )

    return show


def _check_client_device(cfg: Any) -> None:
    """``clients.device`` against this machine and the engine (``fedkd run``'s engines run their
    clients here; a deployment's SuperNodes resolve their own device when they train)."""
    import torch

    from fedkd.errors import ConfigError
    from fedkd.train import resolve_device

    name, engine, gpus = cfg.str("clients.device"), cfg.str("engine"), cfg.float("ray.num-gpus")
    if cfg.bool("clients.batched") and engine != "local":
        raise ConfigError(f"clients.batched = true needs the local engine (engine = {engine!r} runs each client "
                          "in its own actor); set engine = local or clients.batched = false")  # fmt: skip
    if engine == "ray" and gpus > 0 and not torch.cuda.is_available():
        raise ConfigError(f"ray.num-gpus = {gpus:g} reserves a GPU share per client actor, but no CUDA GPU is visible "
                          "(set ray.num-gpus = 0)")  # fmt: skip
    if name == "auto":
        return
    if engine == "ray" and name != "cpu" and gpus <= 0:
        raise ConfigError(f"clients.device = {name!r} on the ray engine needs a GPU share per actor: "
                          "set ray.num-gpus > 0 (e.g. 0.25) or clients.device = auto")  # fmt: skip
    resolve_device(name, "clients.device")


def device_plan(cfg: Any) -> str:
    """Where the server and the clients of ``fedkd run`` will compute, in words, e.g.
    ``server cpu, clients cpu (auto: no CUDA GPU)``."""
    import torch

    from fedkd.train import resolve_device

    server = resolve_device(cfg.str("device"))
    name, engine = cfg.str("clients.device"), cfg.str("engine")
    if name != "auto":
        clients = str(resolve_device(name, "clients.device"))
    elif engine == "local":
        clients = str(server)
    else:
        clients = "cuda (a GPU share per actor)" if cfg.float("ray.num-gpus") > 0 else "cpu (ray.num-gpus = 0)"
    auto = "auto" in (cfg.str("device"), name) and not torch.cuda.is_available()
    return f"server {server}, clients {clients}" + (" (auto: no CUDA GPU)" if auto else "")


def _preflight(cfg: Any) -> None:
    """Check everything a user can get wrong before any run directory is created."""
    import numpy as np
    import torch

    from fedkd.client_app import client_partition
    from fedkd.data import load_dataset
    from fedkd.federation import Federation, ServerContext, build_strategy, parse_architectures
    from fedkd.results import check_tensorboard
    from fedkd.server_app import global_architecture, initial_models
    from fedkd.train import resolve_device

    resolve_device(cfg.str("device"))  # malformed or unavailable: one line, before anything exists
    _check_client_device(cfg)
    check_tensorboard(cfg)
    ds = load_dataset(cfg.str("dataset.name"), cfg.str("dataset.root"), cfg.bool("dataset.download"))
    archs = parse_architectures(cfg.str("clients.architectures"), cfg.int("clients.num"))
    global_arch = global_architecture(cfg)
    initial_models(cfg, ds, list(dict.fromkeys([*archs, global_arch])))
    from fedkd.tasks import plan_of

    plan_of(cfg, ds.num_classes)  # tasks.*: classes and rounds divide into tasks
    client_partition(cfg, 0)  # runs the partitioner (every task's): α, sizes, empty clients
    # the strategy with its keywords and base, over a federation shaped like the real one
    n = len(archs)
    fake = Federation({i: i for i in range(n)}, dict(enumerate(archs)),
                      np.zeros((n, ds.num_classes), np.int64), global_arch, cfg.int("seed"))  # fmt: skip
    context = ServerContext(ds.shape, ds.num_classes, cfg.int("model.feature-dim") or None, torch.device("cpu"),
                            cfg.int("seed"), cfg.int("rounds"))  # fmt: skip
    build_strategy(cfg, fake, context)


def prepare_run(cfg: Any, out: str | Path | None, sim: Path | None, preflight: bool = True) -> Path:
    """Preflight checks (unless done already), then a fresh run directory holding the resolved config."""
    from fedkd.engines import default_out
    from fedkd.results import create_run_dir, write_atomic

    if preflight:
        _preflight(cfg)
    run_dir = create_run_dir(out or default_out(sim))
    write_atomic(run_dir / "config.toml", cfg.to_toml())
    return run_dir


def cmd_run(args: argparse.Namespace) -> int:
    from fedkd.config import load_config
    from fedkd.engines import execute

    if args.resume is not None:
        cfg, run_dir = resumable_run(args)
        OUT.say(f"fedkd run: resuming {run_dir} on the {cfg.str('engine')} engine",
                {"event": "start", "run_dir": str(run_dir), "resume": True})  # fmt: skip
    else:
        sim = find_sim(args.sim)
        sets = list(args.set or [])
        if args.engine:
            sets.append(f"engine={args.engine}")
        cfg = load_config(sim, sets, args.seed)
        run_dir = prepare_run(cfg, args.out, sim)
        plan = device_plan(cfg)
        OUT.say(f"fedkd run: {sim} on the {cfg.str('engine')} engine, {plan} -> {run_dir}",
                {"event": "start", "sim": str(sim), "run_dir": str(run_dir), "devices": plan})  # fmt: skip
    t = time.perf_counter()
    summary = execute(cfg, run_dir, round_printer(cfg.int("rounds")), resume=args.resume is not None)
    if not summary:
        print(f"error: the run did not finish (see the log above); partial results in {run_dir}", file=sys.stderr)
        return EXIT_FAILURE
    OUT.say(
        f"done in {time.perf_counter() - t:.1f}s: final accuracy {_num(summary['final_accuracy'])}, "
        f"best {_num(summary['best_accuracy'])}"
        + (f", per client {_num(summary['final_client_accuracy'])}" if summary.get("final_client_accuracy") is not None
           else "")
        + (f", average forgetting {_num(summary.get('forgetting'))} over {summary['tasks']} tasks (tasks.png)"
           if summary.get("tasks") else "")
        + f"; results in {run_dir}",
        {"event": "done", "run_dir": str(run_dir), **summary},
        final=True,
    )
    return EXIT_OK


def resumable_run(args: argparse.Namespace) -> tuple[Any, Path]:
    """The config and directory of an unfinished run named by ``--resume``."""
    from fedkd.config import Config
    from fedkd.results import CONFIG, SUMMARY

    given = [f for f, v in (("SIM", args.sim), ("--set", args.set), ("--out", args.out), ("--seed", args.seed),
                            ("--engine", getattr(args, "engine", None))) if v]  # fmt: skip
    if given:
        raise UserError(f"--resume takes the run's own config; drop {', '.join(given)}")
    run_dir = Path(args.resume)
    if not run_dir.is_dir():
        raise UserError(f"--resume: {args.resume!r} is not a directory")
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"--resume: {args.resume!r} is not a run directory (no {CONFIG})")
    if (run_dir / SUMMARY).is_file():
        raise UserError(f"--resume: {args.resume!r} already finished (it has {SUMMARY})")
    try:
        cfg = Config.from_toml((run_dir / CONFIG).read_text(encoding="utf-8"))
    except UserError as e:
        raise UserError(f"--resume: {run_dir / CONFIG}: {e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--resume: {run_dir / CONFIG} is not valid TOML: {e}") from None
    return cfg, run_dir


def cmd_compare(args: argparse.Namespace) -> int:
    from fedkd.compare import resolve_baseline, run_suite
    from fedkd.config import load_config
    from fedkd.engines import default_out
    from fedkd.results import create_run_dir

    sims = [find_sim(s) for s in args.sims]
    if args.seeds < 1:
        raise UserError(f"--seeds must be ≥ 1, got {args.seeds}")
    sets = list(args.set or []) + ([f"engine={args.engine}"] if args.engine else [])
    base = args.seed or 0
    seeds = list(range(base, base + args.seeds))
    names = [s.stem for s in sims]
    if len(set(names)) != len(names):
        raise UserError(f"two sims share a file name: {', '.join(names)}")
    baseline = resolve_baseline(args.baseline, sims) if args.baseline is not None else None
    if baseline is not None and len(sims) < 2:
        raise UserError("--baseline needs at least one other sim to compare against it")
    if args.resume and not args.out:
        raise UserError("compare --resume needs --out DIR (the suite to continue)")
    if args.resume and not Path(args.out).is_dir():
        raise UserError(f"compare --resume: {args.out!r} is not a directory")
    for sim in sims:  # fail fast on a bad sim before creating anything
        load_config(sim, sets, base)
    for sim in sims:  # every run's preflight too: a bad dataset root must not leave a half-made suite
        for seed in seeds:
            _preflight(load_config(sim, sets, seed))
    if args.resume:
        out = Path(args.out)
    else:
        out = create_run_dir(args.out or default_out(Path("compare")))
    command = "fedkd compare " + " ".join(str(s) for s in args.sims) + f" --seeds {args.seeds}"
    command += f" --seed {args.seed}" if args.seed is not None else ""
    command += "".join(f" --set {s}" for s in args.set or []) + (f" --engine {args.engine}" if args.engine else "")
    command += f" --baseline {args.baseline}" if args.baseline is not None else ""
    OUT.say(f"fedkd compare: {len(sims)} sims × {len(seeds)} seeds -> {out}",
            {"event": "start", "sims": [str(x) for x in sims], "seeds": seeds, "out": str(out)})  # fmt: skip
    total, count = len(sims) * len(seeds), [0]

    def made(sim: Path) -> Any:
        return lambda seed: load_config(sim, sets, seed)

    def done(name: str, seed: int, summary: dict[str, Any]) -> None:
        count[0] += 1
        OUT.say(f"[{count[0]}/{total}] {name} seed {seed}: final {summary['final_accuracy']:.4f} "
                f"best {summary['best_accuracy']:.4f} ({summary['wall_seconds']:.1f}s)",
                {"event": "run", "index": count[0], "of": total, "sim": name, "seed": seed, **summary})  # fmt: skip

    rows = run_suite(sims, [made(s) for s in sims], seeds, out, command,
                     lambda cfg, d, sim: prepare_run(cfg, d, sim, preflight=False), done,
                     (lambda total: round_printer(total)) if args.verbose_rounds else None,
                     resume=args.resume, baseline=baseline)  # fmt: skip
    if OUT.mode == "human":
        print((out / "comparison.md").read_text(), end="")
    tables = [out / "comparison.md", out / "comparison.csv"] + ([out / "comparison_paired.csv"] if baseline else [])
    OUT.say(f"table: {', '.join(map(str, tables[:-1]))} and {tables[-1]}; plot: {out / 'comparison.png'}",
            {"event": "done", "tables": [str(x) for x in tables], "plot": str(out / "comparison.png"), "rows": rows},
            final=True)  # fmt: skip
    return EXIT_OK if rows else EXIT_FAILURE


def cmd_table(args: argparse.Namespace) -> int:
    from fedkd.compare import table_from_runs

    command = "fedkd table " + " ".join(args.runs) + (f" --baseline {args.baseline}" if args.baseline else "")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out!r} exists and is not a directory")
    if not args.name or "/" in args.name or args.name.startswith("."):
        raise UserError(f"--name {args.name!r} must be a plain file stem")
    md, unfinished = table_from_runs([Path(p) for p in args.runs], out, command, args.baseline, args.name)
    for run in unfinished:
        print(f"note: {run} has not finished (no summary.json); left out", file=sys.stderr)
    print(md, end="")
    if out is not None:
        print(f"table: {out / (args.name + '.md')} and {out / (args.name + '.csv')}; plot: {out / (args.name + '.png')}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from fedkd.config import CORE_KEYS, declared_defaults
    from fedkd.data import DATASETS, PARTITIONERS
    from fedkd.models import MODELS
    from generators import GENERATORS
    from strategies import STRATEGIES

    if args.keys:
        helps = {k.name: k.help for k in CORE_KEYS}
        for key, default in declared_defaults().items():
            print(f"{key} = {default!r}" + (f"  # {helps[key]}" if key in helps else ""))
        return EXIT_OK
    for title, reg in (("strategies", STRATEGIES), ("generators", GENERATORS), ("models", MODELS),
                       ("datasets", DATASETS), ("partitioners", PARTITIONERS)):  # fmt: skip
        print(f"{title}: {', '.join(reg.names()) or '(none)'}")
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    from fedkd.results import plot_run

    for p in plot_run(args.run_dir):
        print(p)
    return EXIT_OK


def cmd_dfkd(args: argparse.Namespace) -> int:
    from fedkd import checkpoint as ckpt
    from fedkd import dfkd
    from fedkd.config import load_config
    from fedkd.engines import default_out
    from fedkd.results import create_run_dir, write_atomic

    started = time.perf_counter()
    resume = None
    if args.resume is not None:
        cfg, run_dir = resumable_run(args)
        plan = dfkd.prepare(cfg)
        if not cfg.int("checkpoint.every"):
            raise UserError(f"--resume: {run_dir} was run with checkpoint.every = 0; it cannot be resumed")
        if ckpt.checkpoints(run_dir):
            resume = ckpt.latest(run_dir)
            OUT.say(f"fedkd dfkd: resuming {run_dir} after epoch {resume.round}",
                    {"event": "start", "run_dir": str(run_dir), "resume": resume.round})  # fmt: skip
        else:  # interrupted before its first epoch ended: start it again, in place
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            OUT.say(f"fedkd dfkd: {run_dir} has no checkpoint yet; starting it again",
                    {"event": "start", "run_dir": str(run_dir), "resume": 0})  # fmt: skip
    else:
        sim = find_sim(args.sim) if args.sim else None
        cfg = load_config(sim, list(args.set or []), args.seed)
        plan = dfkd.prepare(cfg)  # every check runs before the run directory exists
        run_dir = create_run_dir(args.out or default_out(sim or "dfkd"))
        write_atomic(run_dir / "config.toml", cfg.to_toml())
    epochs, teacher_epochs = cfg.int("dfkd.epochs"), cfg.int("dfkd.teacher-epochs")
    bn = " + bn (BatchNorm teacher, dfkd.bn-auto)" if plan.bn_auto else ""
    OUT.say(f"fedkd dfkd: {cfg.str('dfkd.teacher')} -> {cfg.str('dfkd.student')} on {cfg.str('dataset.name')}, "
            f"preset {cfg.str('synthesis.preset')}{bn}, rule {cfg.str('distill.rule')}, {plan.device} -> {run_dir}",
            {"event": "start", "run_dir": str(run_dir), "device": str(plan.device)})  # fmt: skip
    t_teacher = time.perf_counter()

    def teacher_line(epoch: int, loss: float) -> None:
        OUT.say(f"teacher epoch {epoch:>3}/{teacher_epochs}  train loss {loss:.4f}  "
                f"{time.perf_counter() - t_teacher:.1f}s",
                {"event": "teacher-epoch", "epoch": epoch, "of": teacher_epochs, "train_loss": loss})  # fmt: skip

    teacher = dfkd.obtain_teacher(plan, dfkd.cache_dir(cfg, run_dir), teacher_line)
    OUT.say(
        f"teacher accuracy {teacher.accuracy:.4f} ({teacher.source}: {teacher.path}, {teacher.seconds:.1f}s)",
        {"event": "teacher", "accuracy": teacher.accuracy, "source": teacher.source, "path": str(teacher.path)},
    )

    def epoch_line(row: dict[str, Any]) -> None:
        OUT.say(dfkd.format_epoch(row, epochs), {"event": "epoch", "of": epochs, **row})

    summary = dfkd.distill(plan, run_dir, teacher, epoch_line, started, resume)
    warn = f"; WARNING: {summary['collapse_epochs']} epochs looked collapsed" if summary["collapse_epochs"] else ""
    OUT.say(
        f"done in {summary['wall_seconds']:.1f}s: student final {summary['student_final_accuracy']:.4f}, "
        f"best {summary['student_best_accuracy']:.4f}, teacher {summary['teacher_accuracy']:.4f}{warn}; "
        f"results in {run_dir}",
        {"event": "done", "run_dir": str(run_dir), **summary},
        final=True,
    )
    return EXIT_OK


def _output_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quiet", action="store_true", help="print only the final line (and errors)")
    g.add_argument("--json", action="store_true",
                   help="print JSON lines (one object per line with an 'event': start, round/epoch, progress, done)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fedkd", description="Federated and data-free knowledge-distillation simulator on Flower.")
    p.add_argument("-v", "--verbose", action="store_true", help="log INFO from fedkd and Flower")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run a federated simulation")
    r.add_argument("sim", nargs="?", help="sim TOML (default: sims/quickstart.toml)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    r.add_argument("--engine", choices=("local", "ray"), help="simulation engine (default: the config's engine)")
    r.add_argument("--out", help="run directory (must not hold a run; default: runs/<sim>-<time>)")
    r.add_argument("--seed", type=int, help="master seed")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last good checkpoint")
    _output_flags(r)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="run sims over several seeds; write a table and a plot")
    c.add_argument("sims", nargs="+", help="sim TOML files")
    c.add_argument("--seeds", type=int, default=3, help="seeds per sim (default 3: seeds 0, 1, 2)")
    c.add_argument("--seed", type=int, help="first seed (default 0)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key in every sim (repeatable)")
    c.add_argument("--engine", choices=("local", "ray"), help="simulation engine")
    c.add_argument("--out", help="output directory (must be new; default: runs/compare-<time>)")
    c.add_argument("--resume", action="store_true",
                   help="continue the suite in --out: reuse finished runs, resume unfinished ones")  # fmt: skip
    c.add_argument("--rounds-log", dest="verbose_rounds", action="store_true", help="print one line per round too")
    c.add_argument("--baseline", metavar="SIM",
                   help="also tabulate every other sim's paired per-seed difference against SIM (stem or path), "
                        "with 95%% t confidence intervals")  # fmt: skip
    _output_flags(c)
    c.set_defaults(func=cmd_compare)

    t = sub.add_parser("table", help="tabulate and plot existing run directories (runs differing only in seed are grouped)")
    t.add_argument("runs", nargs="+", help="run directories, or directories holding them (searched recursively)")
    t.add_argument("--baseline", metavar="GROUP",
                   help="also tabulate every other group's paired per-seed difference against GROUP, with 95%% t intervals")  # fmt: skip
    t.add_argument("--out", help="write NAME.md, NAME.csv, NAME.png (and NAME_paired.csv) into this directory")
    t.add_argument("--name", default="table", help="file stem of the outputs (default: table)")
    t.set_defaults(func=cmd_table)

    li = sub.add_parser("list", help="list registered plug-ins")
    li.add_argument("--keys", action="store_true", help="list every config key with its default")
    li.set_defaults(func=cmd_list)

    pl = sub.add_parser("plot", help="redraw a run directory's plots")
    pl.add_argument("run_dir")
    pl.set_defaults(func=cmd_plot)

    d = sub.add_parser("dfkd", help="data-free KD: train a teacher, distill a student from generator samples")
    d.add_argument("sim", nargs="?", help="sim TOML (default: the declared defaults)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    d.add_argument("--out", help="run directory (must not hold a run; default: runs/<sim>-<time>)")
    d.add_argument("--seed", type=int, help="master seed")
    d.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last good checkpoint")
    _output_flags(d)
    d.set_defaults(func=cmd_dfkd)
    return p


def _setup_logging(verbose: bool) -> None:
    """fedkd logs at WARNING (INFO with -v); Flower's own console log only with -v."""
    from flwr.supercore.logger import FLOWER_LOGGER  # importing flwr resets its level

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    FLOWER_LOGGER.setLevel(logging.INFO if verbose else logging.ERROR)
    FLOWER_LOGGER.propagate = False


def _harden_environment() -> None:
    """What the environment can break before fedkd does anything: an output stream that cannot
    encode the messages (non-UTF-8 locale) writes escapes instead of raising, and an invalid
    ``MPLBACKEND`` does not matter, because fedkd only ever writes files with Agg."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    os.environ["MPLBACKEND"] = "Agg"


def main(argv: Sequence[str] | None = None) -> int:
    _harden_environment()
    try:
        args = build_parser().parse_args(argv)
        _setup_logging(args.verbose)
        from fedkd import progress

        OUT.mode = "json" if getattr(args, "json", False) else "quiet" if getattr(args, "quiet", False) else "human"
        progress.set_reporter(None if OUT.mode == "quiet" else lambda ev: OUT.say(progress.human(ev), {"event": "progress", **ev}))
        for opt in ("out", "resume"):
            value = getattr(args, opt, None)
            if isinstance(value, str) and not value.strip():
                raise UserError(f"--{opt} must not be empty")
        return int(args.func(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`fedkd list --keys | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception:
        traceback.print_exc()
        return EXIT_FAILURE


def entry() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    entry()
