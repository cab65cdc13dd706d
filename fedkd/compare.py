"""``fedkd compare``: several sims × several seeds, one table and one plot.

Seed ``s`` of every sim uses the same master seed, hence the same partition, the same model
initialisation and the same client sampling wherever the sims agree on those settings, so
the comparison is paired. Each run is an ordinary run directory under
``OUT/<sim-stem>/seed<s>``; the suite writes ``OUT/comparison.md``, ``OUT/comparison.csv``
and ``OUT/comparison.png``. With a baseline sim, ``OUT/comparison.md`` also holds the paired
per-seed differences of every other sim against it (:func:`paired_differences`), and
``OUT/comparison_paired.csv`` the same numbers.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.config import Config
from fedkd.errors import UserError
from fedkd.results import CONFIG, SUMMARY, last_mean, top_mean

log = logging.getLogger(__name__)

COLUMNS = [
    ("final_accuracy", "final acc"),
    ("best_accuracy", "best acc"),
    ("top5_accuracy", "top-5 mean"),
    ("last5_accuracy", "last-5 mean"),
    ("mean_accuracy", "μ over rounds"),
    ("var_accuracy", "σ² over rounds"),
    # per-client accuracy (federated evaluation on each client's own test split), last round,
    # mean over clients; shown only when some run has it
    ("final_client_accuracy", "client acc (final)"),
    ("wall_seconds", "wall s"),
    ("bytes_up", "MB up"),
    ("bytes_down", "MB down"),
]

# accuracies compared seed by seed against a baseline sim, in percentage points
PAIRED = [
    ("final_accuracy", "final"),
    ("best_accuracy", "best"),
    ("top5_accuracy", "top-5 mean"),
    ("last5_accuracy", "last-5 mean"),
]
PAIRED_SUFFIXES = ("diff", "diff_std", "ci_low", "ci_high", "significant")


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


OPTIONAL_COLUMNS = frozenset({"final_client_accuracy"})


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """COLUMNS without the optional ones that no row has."""
    return [(k, label) for k, label in COLUMNS
            if k not in OPTIONAL_COLUMNS or any(not math.isnan(r.get(k, math.nan)) for r in rows)]  # fmt: skip


def to_markdown(rows: list[dict[str, Any]], command: str) -> str:
    columns = _columns(rows)
    head = "| sim | seeds | " + " | ".join(label for _, label in columns) + " |"
    sep = "|---|---|" + "---|" * len(columns)
    lines = [
        f"Command: `{command}`",
        "",
        "Accuracies in %, mean ± std over seeds (sample std; a single seed has no ±); σ² in %² (variance",
        "of the global test accuracy over rounds, averaged over seeds); bytes are totals per run.",
        "",
        head,
        sep,
    ]
    for r in rows:
        if r["seeds"] == 1:  # no spread to show: a zero std would read as "no variation"
            cells = [f"{r[k]:.2f}" if k != "wall_seconds" else f"{r[k]:.1f}" for k, _ in columns]
        else:
            cells = [
                f"{r[k]:.2f} ± {r[k + '_std']:.2f}" if k != "wall_seconds" else f"{r[k]:.1f} ± {r[k + '_std']:.1f}"
                for k, _ in columns
            ]
        lines.append(f"| {r['sim']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    fields = ["sim", "seeds"] + [x for k, _ in _columns(rows) for x in (k, f"{k}_std")]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def with_curve_metrics(summary: Mapping[str, Any], curve: Sequence[float | None]) -> dict[str, Any]:
    """``summary`` with the metrics of older summaries that lack them computed from ``curve``.

    A run that ``compare --resume`` reuses may predate ``top5_accuracy`` and
    ``last5_accuracy`` in ``summary.json``; they come from its per-round accuracies as
    :meth:`fedkd.results.RunRecorder.finish` computes them. Keys already present are kept.

    Parameters
    ----------
    summary : mapping
        The run's ``summary.json``.
    curve : sequence of float or None
        The global accuracy of every round (``metrics.jsonl``); None for a round without one.

    Returns
    -------
    dict
        A copy of ``summary`` holding both keys.
    """
    out = dict(summary)
    accs = [float(a) for a in curve if a is not None]
    out.setdefault("top5_accuracy", top_mean(accs))
    out.setdefault("last5_accuracy", last_mean(accs))
    return out


def paired_stats(diffs: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, sample std and Student's t confidence interval of paired differences.

    The interval is ``mean ± t.ppf((1 + confidence) / 2, n - 1) * std / sqrt(n)``.

    Parameters
    ----------
    diffs : sequence of float
        One difference per seed.
    confidence : float, default 0.95
        Coverage of the interval.

    Returns
    -------
    tuple of float
        ``(mean, std, ci_low, ci_high)``. With one difference the std and the interval are
        undefined (NaN); with none, or a NaN among them, everything is NaN.
    """
    from scipy import stats

    a = np.asarray(diffs, dtype=float)
    nan = float("nan")
    if a.size == 0 or not np.isfinite(a).all():
        return nan, nan, nan, nan
    mean = float(a.mean())
    if a.size < 2:
        return mean, nan, nan, nan
    std = float(a.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, a.size - 1)) * std / math.sqrt(a.size)
    return mean, std, mean - half, mean + half


def excludes_zero(low: float, high: float) -> bool:
    """Whether the interval ``[low, high]`` excludes 0 (an undefined interval does not)."""
    return bool(low > 0 or high < 0)


def _pp(v: Any) -> float:
    return float("nan") if v is None else float(v) * 100


def paired_differences(
    results: Mapping[str, Mapping[int, Mapping[str, Any]]],
    baseline: str,
    confidence: float = 0.95,
    common_seeds: bool = False,
) -> list[dict[str, Any]]:
    """Per-seed differences of every sim against ``baseline``, for each metric of :data:`PAIRED`.

    Parameters
    ----------
    results : mapping
        ``results[sim][seed]`` is that run's summary (accuracies as fractions).
    baseline : str
        The sim the others are compared against.
    confidence : float, default 0.95
        Coverage of the confidence intervals (see :func:`paired_stats`).
    common_seeds : bool, default False
        Pair each sim on the seeds it shares with the baseline (``fedkd table`` over runs of
        different seed counts) instead of requiring the baseline's seeds exactly.

    Returns
    -------
    list of dict
        One row per sim other than ``baseline``, in the order of ``results``: ``sim``,
        ``baseline``, ``seeds`` and, for every metric, ``<metric>_diff`` (mean of
        sim − baseline over seeds, in percentage points), ``<metric>_diff_std`` (sample std),
        ``<metric>_ci_low``, ``<metric>_ci_high`` and ``<metric>_significant`` (the interval
        excludes 0).

    Raises
    ------
    ValueError
        If ``baseline`` is not in ``results``, or a sim was not run on the baseline's seeds.
    """
    if baseline not in results:
        raise ValueError(f"baseline {baseline!r} is not among the sims: {', '.join(results)}")
    base = results[baseline]
    seeds = sorted(base)
    rows = []
    for name, runs in results.items():
        if name == baseline:
            continue
        shared = [s for s in seeds if s in runs] if common_seeds else seeds
        if (not common_seeds and sorted(runs) != seeds) or not shared:
            raise ValueError(
                f"{name} ran seeds {sorted(runs)}, the baseline {baseline} seeds {seeds}; cannot pair them"
            )
        row: dict[str, Any] = {"sim": name, "baseline": baseline, "seeds": len(shared)}
        for key, _ in PAIRED:
            diffs = [_pp(runs[s].get(key)) - _pp(base[s].get(key)) for s in shared]
            mean, std, low, high = paired_stats(diffs, confidence)
            values = (mean, std, low, high, excludes_zero(low, high))
            row.update({f"{key}_{suffix}": v for suffix, v in zip(PAIRED_SUFFIXES, values, strict=True)})
        rows.append(row)
    return rows


def _paired_cell(row: Mapping[str, Any], key: str) -> str:
    mean, low, high = row[f"{key}_diff"], row[f"{key}_ci_low"], row[f"{key}_ci_high"]
    if math.isnan(mean):
        return "n/a"
    if math.isnan(low):
        return f"{mean:+.2f} [n/a]"
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]" + ("*" if row[f"{key}_significant"] else "")


def paired_to_markdown(rows: list[dict[str, Any]], baseline: str) -> str:
    """The table of :func:`paired_differences`' rows."""
    lines = [
        f"Paired differences vs {baseline}: sim − {baseline} on the same seed, in percentage points;",
        "mean over seeds [95% confidence interval, Student's t with n − 1 degrees of freedom; n/a with",
        "one seed]; * marks an interval that excludes 0.",
        "",
        "| sim | seeds | " + " | ".join(label for _, label in PAIRED) + " |",
        "|---|---|" + "---|" * len(PAIRED),
    ]
    for r in rows:
        lines.append(f"| {r['sim']} | {r['seeds']} | " + " | ".join(_paired_cell(r, k) for k, _ in PAIRED) + " |")
    return "\n".join(lines) + "\n"


def paired_to_csv(rows: list[dict[str, Any]]) -> str:
    """:func:`paired_differences`' rows as CSV (undefined numbers as ``nan``)."""
    buf = io.StringIO()
    fields = ["sim", "baseline", "seeds"] + [f"{k}_{suffix}" for k, _ in PAIRED for suffix in PAIRED_SUFFIXES]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def resolve_baseline(value: str, sims: Sequence[Path]) -> str:
    """The stem of the sim ``value`` names: its stem, or its path (as given or resolved).

    Raises
    ------
    UserError
        If ``value`` names none of ``sims``.
    """
    for sim in sims:
        if value in (sim.stem, str(sim)) or Path(value).resolve() == sim.resolve():
            return sim.stem
    raise UserError(f"--baseline {value!r} is not one of the sims ({', '.join(p.stem for p in sims)})")


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
    from fedkd.checkpoint import checkpoints

    if not checkpoints(run_dir) and {p.name for p in run_dir.iterdir()} <= {CONFIG}:
        (run_dir / CONFIG).unlink()  # killed before its first checkpoint: nothing to keep, start it again
        return "new"
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
    baseline: str | None = None,
) -> list[dict[str, Any]]:
    """Run every sim for every seed, then write the table and the plot into ``out``.

    ``configs[i](seed)`` resolves sim ``i`` for a seed; ``prepare(cfg, run_dir, sim)``
    checks it and creates its run directory. With ``resume``, a run directory that already
    holds a finished run of the same resolved config is reused as it is, and an unfinished
    one continues from its last checkpoint (see :func:`reusable`). With ``baseline`` (a sim's
    stem), ``comparison.md`` also gets the paired differences of the other sims against it
    and ``comparison_paired.csv`` is written (see :func:`paired_differences`).
    """
    from fedkd.engines import execute

    names = [p.stem for p in sims]
    if len(set(names)) != len(names):
        raise UserError(f"two sims share a file name: {', '.join(names)}")
    if baseline is not None and baseline not in names:
        raise UserError(f"--baseline {baseline!r} is not one of the sims ({', '.join(names)})")
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    by_seed: dict[str, dict[int, dict[str, Any]]] = {n: {} for n in names}
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
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        curves[name].append([m.get("accuracy") for m in metrics])
        summary = with_curve_metrics(summary, curves[name][-1])  # a reused older summary may lack some
        results[name].append(summary)
        by_seed[name][seed] = summary
        if on_run:
            on_run(name, seed, summary)
    return write_tables(results, by_seed, curves, out, command, baseline)


def write_tables(
    results: dict[str, list[dict[str, Any]]],
    by_seed: dict[str, dict[int, dict[str, Any]]],
    curves: dict[str, list[list[float]]],
    out: Path,
    command: str,
    baseline: str | None = None,
    stem: str = "comparison",
    title: str | None = None,
    common_seeds: bool = False,
) -> list[dict[str, Any]]:
    """Write ``<stem>.md``, ``<stem>.csv``, ``<stem>.png`` (and ``<stem>_paired.csv`` with a
    baseline) into ``out``; the summary rows. Shared by ``fedkd compare`` and ``fedkd table``."""
    rows = summarize(results)
    table = to_markdown(rows, command)
    if baseline is not None:
        paired = paired_differences(by_seed, baseline, common_seeds=common_seeds)
        table += "\n" + paired_to_markdown(paired, baseline)
        (out / f"{stem}_paired.csv").write_text(paired_to_csv(paired), encoding="utf-8")
    else:  # a resumed suite's earlier --baseline table would no longer match the table
        (out / f"{stem}_paired.csv").unlink(missing_ok=True)
    (out / f"{stem}.md").write_text(table, encoding="utf-8")
    (out / f"{stem}.csv").write_text(to_csv(rows), encoding="utf-8")
    plot_curves(curves, out / f"{stem}.png", title=out.name if title is None else title)
    return rows


def _group_name(run_dir: Path) -> str:
    return run_dir.parent.name if re.fullmatch(r"seed\d+", run_dir.name) else run_dir.name


def collect_runs(paths: Sequence[Path]) -> tuple[dict[str, list[Path]], list[Path]]:
    """Finished run directories under ``paths``, grouped by resolved config without the seed.

    A path is a run directory (it holds ``config.toml``) or a directory searched recursively
    for them. Groups are named after the runs' directory (``<name>/seed<k>`` → ``name``); two
    groups of one name get the config's strategy and an index. Returns the groups (in the order
    first seen) and the unfinished runs (no ``summary.json``), which are left out.
    """
    found: list[Path] = []
    for p in paths:
        if not p.exists():
            raise UserError(f"{str(p)!r} does not exist")
        if (p / CONFIG).is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(c.parent for c in p.rglob(CONFIG)))
        else:
            raise UserError(f"{str(p)!r} is not a run directory or a directory of runs")
    found = list(dict.fromkeys(found))
    if not found:
        raise UserError(f"no run directory (with {CONFIG}) under {', '.join(map(str, paths))}")
    groups: dict[str, tuple[str, list[Path]]] = {}  # config without seed -> (name, runs)
    unfinished: list[Path] = []
    for run in found:
        if not (run / SUMMARY).is_file():
            unfinished.append(run)
            continue
        try:
            cfg = Config.from_toml((run / CONFIG).read_text(encoding="utf-8"))
        except (UserError, ValueError) as e:
            raise UserError(f"{run / CONFIG} is not a valid fedkd config: {e}") from None
        key = cfg.to_toml(exclude=("seed",))
        if key not in groups:
            groups[key] = (_group_name(run), [])
        groups[key][1].append(run)
    named: dict[str, list[Path]] = {}
    for name, runs in groups.values():
        unique, k = name, 2
        while unique in named:
            unique, k = f"{name}-{k}", k + 1
        named[unique] = runs
    return named, unfinished


def table_from_runs(
    paths: Sequence[Path], out: Path | None, command: str, baseline: str | None = None, stem: str = "table"
) -> tuple[str, list[Path]]:
    """``fedkd table``: the comparison table (and plot, with ``out``) of existing runs; the
    Markdown and the unfinished runs left out."""
    groups, unfinished = collect_runs(paths)
    if not groups:
        raise UserError(f"no finished run under {', '.join(map(str, paths))} (none has {SUMMARY})")
    if baseline is not None and baseline not in groups:
        raise UserError(f"--baseline {baseline!r} is not one of the groups ({', '.join(groups)})")
    if baseline is not None and len(groups) < 2:
        raise UserError("--baseline needs at least one other group to compare against it")
    results: dict[str, list[dict[str, Any]]] = {}
    by_seed: dict[str, dict[int, dict[str, Any]]] = {}
    curves: dict[str, list[list[float]]] = {}
    for name, runs in groups.items():
        for run in runs:
            seed = Config.from_toml((run / CONFIG).read_text(encoding="utf-8")).int("seed")
            metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
            curve = [m.get("accuracy") for m in metrics]
            summary = with_curve_metrics(json.loads((run / SUMMARY).read_text(encoding="utf-8")), curve)
            results.setdefault(name, []).append(summary)
            by_seed.setdefault(name, {})[seed] = summary
            curves.setdefault(name, []).append(curve)  # type: ignore[arg-type]
    if out is None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            write_tables(results, by_seed, curves, Path(tmp), command, baseline, stem, common_seeds=True)
            return (Path(tmp) / f"{stem}.md").read_text(encoding="utf-8"), unfinished
    out.mkdir(parents=True, exist_ok=True)
    write_tables(results, by_seed, curves, out, command, baseline, stem, title=stem, common_seeds=True)
    return (out / f"{stem}.md").read_text(encoding="utf-8"), unfinished
