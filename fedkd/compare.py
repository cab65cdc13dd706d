"""``fedkd compare``: several sims × several seeds, one table and one plot.

Seed ``s`` of every sim uses the same master seed, hence the same partition, the same model
initialisation and the same client sampling wherever the sims agree on those settings, so
the comparison is paired. Each run is an ordinary run directory under
``OUT/<sim-stem>/seed<s>``; the suite writes ``OUT/comparison.md``, ``OUT/comparison.csv``
and ``OUT/comparison.png``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.config import Config
from fedkd.errors import UserError
from fedkd.results import CONFIG, SUMMARY

log = logging.getLogger(__name__)

COLUMNS = [
    ("final_accuracy", "final acc"),
    ("best_accuracy", "best acc"),
    ("mean_accuracy", "μ over rounds"),
    ("var_accuracy", "σ² over rounds"),
    ("wall_seconds", "wall s"),
    ("bytes_up", "MB up"),
    ("bytes_down", "MB down"),
]


def _stats(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single seed)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per sim: mean and std over seeds of every column."""
    rows = []
    for name, summaries in results.items():
        row: dict[str, Any] = {"sim": name, "seeds": len(summaries)}
        for key, _ in COLUMNS:
            vals = [float(s[key]) for s in summaries if s.get(key) is not None]
            if key.startswith("bytes"):
                vals = [v / 1e6 for v in vals]
            if key == "var_accuracy":  # σ² in percentage points², as the DFKD papers report it
                vals = [v * 1e4 for v in vals]
            elif key.endswith("accuracy"):
                vals = [v * 100 for v in vals]
            row[key], row[f"{key}_std"] = _stats(vals) if vals else (float("nan"), float("nan"))
        rows.append(row)
    return rows


def to_markdown(rows: list[dict[str, Any]], command: str) -> str:
    head = "| sim | seeds | " + " | ".join(label for _, label in COLUMNS) + " |"
    sep = "|---|---|" + "---|" * len(COLUMNS)
    lines = [
        f"Command: `{command}`",
        "",
        "Accuracies in %, mean ± std over seeds (sample std); σ² in %² (variance of the global test",
        "accuracy over rounds, averaged over seeds); bytes are totals per run.",
        "",
        head,
        sep,
    ]
    for r in rows:
        cells = [
            f"{r[k]:.2f} ± {r[k + '_std']:.2f}" if k != "wall_seconds" else f"{r[k]:.1f} ± {r[k + '_std']:.1f}"
            for k, _ in COLUMNS
        ]
        lines.append(f"| {r['sim']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    fields = ["sim", "seeds"] + [x for k, _ in COLUMNS for x in (k, f"{k}_std")]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def plot_curves(curves: dict[str, list[list[float]]], path: Path, title: str = "") -> None:
    """Mean global accuracy per round with a ±1 std band, one line per sim."""
    from fedkd.results import _pyplot, save_axes

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in curves.items():
        n = min(len(r) for r in runs)
        a = np.asarray([r[:n] for r in runs], dtype=float) * 100
        mean, std = a.mean(0), a.std(0, ddof=1) if len(a) > 1 else np.zeros(n)
        x = np.arange(1, n + 1)
        ax.plot(x, mean, lw=2, label=f"{name} (n={len(runs)})")
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("global test accuracy (%)")
    save_axes(fig, ax, path, title)


def reusable(cfg: Config, run_dir: Path) -> str:
    """What ``compare --resume`` does with ``run_dir``: ``"new"``, ``"done"`` or ``"resume"``.

    A directory holding another config is a user error: its results are never overwritten.
    """
    if not (run_dir / CONFIG).is_file():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(f"{run_dir} is not empty and holds no run; move it away or choose another --out")
        return "new"
    try:  # through Config, so keys added to fedkd since (with their defaults) do not count as a change
        old = Config.from_toml((run_dir / CONFIG).read_text(encoding="utf-8")).to_toml()
    except (UserError, ValueError):
        raise UserError(f"{run_dir / CONFIG} is not a valid fedkd config; move the directory away") from None
    if old != cfg.to_toml():
        raise UserError(f"{run_dir} holds a run of a different config; --resume needs the same sims, seeds and --set")
    if (run_dir / SUMMARY).is_file():
        return "done"
    return "resume"


def run_suite(
    sims: Sequence[Path],
    configs: Sequence[Callable[[int], Config]],
    seeds: Sequence[int],
    out: Path,
    command: str,
    prepare: Callable[[Config, Path, Path], Path],
    on_run: Callable[[str, int, dict[str, Any]], None] | None = None,
    on_round: Callable[[int], Callable[[dict[str, Any]], None] | None] | None = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Run every sim for every seed, then write the table and the plot into ``out``.

    ``configs[i](seed)`` resolves sim ``i`` for a seed; ``prepare(cfg, run_dir, sim)``
    checks it and creates its run directory. With ``resume``, a run directory that already
    holds a finished run of the same resolved config is reused as it is, and an unfinished
    one continues from its last checkpoint (see :func:`reusable`).
    """
    from fedkd.engines import execute

    names = [p.stem for p in sims]
    if len(set(names)) != len(names):
        raise UserError(f"two sims share a file name: {', '.join(names)}")
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    curves: dict[str, list[list[float]]] = {n: [] for n in names}
    # resolve and check every (sim, seed) before the first run starts
    plan = [
        (name, sim, seed, make(seed)) for name, sim, make in zip(names, sims, configs, strict=True) for seed in seeds
    ]
    states = [reusable(cfg, out / name / f"seed{seed}") if resume else "new" for name, _, seed, cfg in plan]
    dirs = [
        out / name / f"seed{seed}" if state != "new" else prepare(cfg, out / name / f"seed{seed}", sim)
        for (name, sim, seed, cfg), state in zip(plan, states, strict=True)
    ]
    for (name, _, seed, cfg), run_dir, state in zip(plan, dirs, states, strict=True):
        if state == "done":
            summary = json.loads((run_dir / SUMMARY).read_text(encoding="utf-8"))
            log.warning("%s seed %d: reusing the finished run in %s", name, seed, run_dir)
        else:
            summary = execute(cfg, run_dir, on_round(cfg.int("rounds")) if on_round else None, resume=state == "resume")
        if not summary:
            raise RuntimeError(f"run {name} seed {seed} did not finish; see {run_dir}")
        results[name].append(summary)
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        curves[name].append([m["accuracy"] for m in metrics])
        if on_run:
            on_run(name, seed, summary)
    rows = summarize(results)
    (out / "comparison.md").write_text(to_markdown(rows, command), encoding="utf-8")
    (out / "comparison.csv").write_text(to_csv(rows), encoding="utf-8")
    plot_curves(curves, out / "comparison.png", title=out.name)
    return rows
