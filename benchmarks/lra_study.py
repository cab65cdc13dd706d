"""The LRA study of issue 10: plain, replay, lra-official and lra on LRA's official recipe, then a sweep.

Every run is ``fedkd dfkd sims/papers/mnist5k-lra-dfkd.toml`` (LeNet-5 → LeNet-5-half on mnist5k,
LRA's official values: lr 0.1 cosine, 10 student steps, memory of 10 × batch/8 pushed every 5
epochs, one stored batch replayed per step) with a few keys changed. A finished run directory is
reused, so rerunning a command continues it. ::

    python benchmarks/lra_study.py --out runs/lra --stage rules --seeds 3   # the four rules, 3 seeds
    python benchmarks/lra_study.py --out runs/lra --stage sweep             # lra: α, β, order, memory (seed 0)
    python benchmarks/lra_study.py --out runs/lra --stage best --best "lra-a0.1-b0.5-so-m160" --seeds 3

writes ``OUT/<stage>.md``: per variant, the student's final and best accuracy, μ and σ² of the
per-epoch accuracy over the whole run and over its second half (σ² in %²), and wall time; mean ±
std over seeds. The paper's goal is σ² ≤ 0.7 × plain's with μ not lower.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedkd.config import load_config  # noqa: E402
from fedkd.errors import UserError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "sims" / "papers" / "mnist5k-lra-dfkd.toml"
RULES: dict[str, list[str]] = {
    "plain": ["distill.rule=plain"],
    "replay": ["distill.rule=replay"],
    "lra-official": ["distill.rule=lra-official"],
    "lra": ["distill.rule=lra"],
}
ORDERS = {"so": "second-order", "fo": "first-order"}


def variant(alpha: float, beta: float, order: str, memory: int) -> tuple[str, list[str]]:
    """Name and keys of one lra setting (α is the inner step; the outer lr is the recipe's 0.1)."""
    name = f"lra-a{alpha:g}-b{beta:g}-{order}-m{memory}"
    return name, ["distill.rule=lra", f"distill.lra-alpha={alpha}", f"distill.lra-beta={beta}",
                  f"distill.lra-order={ORDERS[order]}", f"distill.memory-capacity={memory}"]  # fmt: skip


def sweep() -> dict[str, list[str]]:
    """One factor at a time around the official lra (α 0.9, β 1, second order, memory 160)."""
    out = {"lra": RULES["lra"]}  # the official setting = the rules stage's lra run (reused)
    for a in (0.1, 0.01):
        out.update([variant(a, 1.0, "so", 160)])
    for b in (0.5, 0.1):
        out.update([variant(0.1, b, "so", 160)])
    out.update([variant(0.1, 1.0, "fo", 160), variant(0.1, 1.0, "so", 640)])
    return out


def parse_variant(name: str) -> tuple[str, list[str]]:
    if name in RULES:
        return name, RULES[name]
    try:
        _, a, b, order, m = name.split("-")
        return variant(float(a[1:]), float(b[1:]), order, int(m[1:]))
    except (ValueError, KeyError):
        raise UserError(f"--best: {name!r} is neither a rule nor a sweep name like lra-a0.1-b0.5-so-m160") from None


def run(out: Path, name: str, sets: list[str], seed: int, extra: list[str]) -> dict[str, Any]:
    from fedkd import dfkd

    run_dir = out / name / f"seed{seed}"
    if (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    cfg = load_config(RECIPE, [*sets, f"dfkd.teacher-cache={out / 'teachers'}", *extra], seed)
    if run_dir.exists():
        for f in run_dir.iterdir():
            f.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    t = time.perf_counter()
    summary = dfkd.run(cfg, run_dir, lambda row: print(f"  {name} s{seed} " + dfkd.format_epoch(row, cfg.int("dfkd.epochs")), flush=True))
    print(f"{name} seed {seed}: final {summary['student_final_accuracy']:.4f} ({time.perf_counter() - t:.0f}s)", flush=True)
    return summary


def _cell(values: list[float], scale: float) -> str:
    v = np.asarray(values, dtype=float) * scale
    return f"{v[0]:.2f}" if len(v) == 1 else f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    cols = [("student_final_accuracy", "final %", 100), ("student_best_accuracy", "best %", 100),
            ("mean_accuracy", "μ all %", 100), ("var_accuracy", "σ² all", 1e4),
            ("mean_accuracy_second_half", "μ 2nd half %", 100), ("var_accuracy_second_half", "σ² 2nd half", 1e4),
            ("wall_seconds", "wall s", 1)]  # fmt: skip
    lines = ["| variant | seeds | " + " | ".join(c[1] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, runs in results.items():
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(_cell([r[k] for r in runs], sc) for k, _, sc in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--stage", choices=("rules", "sweep", "best"), default="rules")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--best", default="", help="stage best: comma-separated variant names")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key in every run")
    args = p.parse_args(argv)
    try:
        if args.stage == "rules":
            variants = RULES
        elif args.stage == "sweep":
            variants = sweep()
        else:
            if not args.best:
                raise UserError("--stage best needs --best NAME[,NAME...]")
            variants = dict(parse_variant(n.strip()) for n in args.best.split(","))
        out = Path(args.out)
        results: dict[str, list[dict[str, Any]]] = {}
        for name, sets in variants.items():
            for seed in range(args.seeds):
                results.setdefault(name, []).append(run(out, name, sets, seed, args.set))
                (out / f"{args.stage}.md").write_text(table(results), encoding="utf-8")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(results), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
