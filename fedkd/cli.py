"""``fedkd``: run, list and plot federated (and data-free KD) simulations.

Exit codes: 0 ok, 2 bad input (one line on stderr), 1 failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from fedkd.errors import UserError

log = logging.getLogger("fedkd")

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
            raise UserError(f"sim file {name!r} does not exist")
        return p
    for base in (Path.cwd(), _repo_root()):
        p = base / "sims" / "quickstart.toml"
        if p.is_file():
            return p
    raise UserError("no SIM given and sims/quickstart.toml not found; pass a sim file")


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}MB"


def round_printer(total: int) -> Callable[[dict[str, Any]], None]:
    """One line per round on stdout."""

    def show(row: dict[str, Any]) -> None:
        groups = row.get("group_accuracy") or {}
        extra = "  " + " ".join(f"{g}={a:.3f}" for g, a in groups.items()) if len(groups) > 1 else ""
        tl = row.get("train_loss")
        print(
            f"round {row['round']:>3}/{total}  acc {row['accuracy']:.4f}  loss {row['loss']:.4f}  "
            f"train_loss {tl if tl is None else f'{tl:.4f}'}  up {_mb(row['bytes_up'])}  down {_mb(row['bytes_down'])}  "
            f"fail {row['failures']}  {row['seconds']:.1f}s{extra}",
            flush=True,
        )

    return show


def _preflight(cfg: Any) -> None:
    """Check everything a user can get wrong before any run directory is created."""
    from fedkd.client_app import client_partition
    from fedkd.data import load_dataset
    from fedkd.federation import parse_architectures
    from fedkd.server_app import global_architecture, initial_models

    ds = load_dataset(cfg.str("dataset.name"), cfg.str("dataset.root"), cfg.bool("dataset.download"))
    archs = parse_architectures(cfg.str("clients.architectures"), cfg.int("clients.num"))
    initial_models(cfg, ds, list(dict.fromkeys([*archs, global_architecture(cfg)])))
    client_partition(cfg, 0)  # runs the partitioner: α, sizes, empty clients
    import numpy as np

    from fedkd.federation import Federation, build_strategy

    fake = Federation({i: i for i in range(len(archs))}, dict(enumerate(archs)), np.zeros((len(archs), ds.num_classes), int),
                      global_architecture(cfg), cfg.int("seed"))  # fmt: skip
    build_strategy(cfg, fake)  # strategy keywords and base


def cmd_run(args: argparse.Namespace) -> int:
    from fedkd.client_app import app as client_app
    from fedkd.config import load_config
    from fedkd.engines import LocalGrid, default_out, run_ray
    from fedkd.results import create_run_dir, write_atomic
    from fedkd.server_app import make_server_app

    sim = find_sim(args.sim)
    sets = list(args.set or [])
    if args.engine:
        sets.append(f"engine={args.engine}")
    cfg = load_config(sim, sets, args.seed)
    _preflight(cfg)
    run_dir = create_run_dir(args.out or default_out(sim))
    write_atomic(run_dir / "config.toml", cfg.to_toml())
    engine = cfg.str("engine")
    print(f"fedkd run: {sim} on the {engine} engine -> {run_dir}", flush=True)
    summary: dict[str, Any] = {}
    server_app = make_server_app(cfg, run_dir, round_printer(cfg.int("rounds")), summary)
    t = time.perf_counter()
    if engine == "local":
        from flwr.app import Context, RecordDict

        grid = LocalGrid(client_app, cfg.int("clients.num"))
        server_app(grid, Context(grid.run.run_id, 1, {}, RecordDict(), {}))
    else:
        run_ray(server_app, client_app, cfg)
    if not summary:
        print(f"error: the run did not finish (see the log above); partial results in {run_dir}", file=sys.stderr)
        return EXIT_FAILURE
    print(
        f"done in {time.perf_counter() - t:.1f}s: final accuracy {summary['final_accuracy']:.4f}, "
        f"best {summary['best_accuracy']:.4f}; results in {run_dir}",
        flush=True,
    )
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
    r.set_defaults(func=cmd_run)

    li = sub.add_parser("list", help="list registered plug-ins")
    li.add_argument("--keys", action="store_true", help="list every config key with its default")
    li.set_defaults(func=cmd_list)

    pl = sub.add_parser("plot", help="redraw a run directory's plots")
    pl.add_argument("run_dir")
    pl.set_defaults(func=cmd_plot)
    return p


def _setup_logging(verbose: bool) -> None:
    """fedkd logs at WARNING (INFO with -v); Flower's own console log only with -v."""
    from flwr.supercore.logger import FLOWER_LOGGER  # importing flwr resets its level

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    FLOWER_LOGGER.setLevel(logging.INFO if verbose else logging.ERROR)
    FLOWER_LOGGER.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _setup_logging(args.verbose)
        return int(args.func(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        return EXIT_FAILURE


def entry() -> NoReturn:
    sys.exit(main())
