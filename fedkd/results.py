"""Run directories: resolved config, per-round metrics, summary and plots.

A run directory holds ``config.toml`` (the resolved config), ``metrics.jsonl`` (one JSON
object per round), ``label_counts.csv`` (clients × classes), ``summary.json`` and the PNGs
``accuracy.png`` and ``partition.png``. ``fedkd plot RUN_DIR`` redraws the PNGs.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedkd.errors import UserError

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.toml"
LABELS = "label_counts.csv"


def create_run_dir(path: str | Path) -> Path:
    """Create a fresh run directory; an existing non-empty one is never reused."""
    p = Path(path)
    try:
        if p.exists() and not p.is_dir():
            raise UserError(f"output path {str(p)!r} exists and is not a directory")
        for parent in p.resolve().parents:  # a run inside a run would be mixed into its files
            if (parent / CONFIG).is_file():
                raise UserError(
                    f"output directory {str(p)!r} is inside the run directory {str(parent)!r}; choose another --out"
                )
        if p.is_dir() and any(p.iterdir()):
            what = "holds a run" if (p / CONFIG).exists() or (p / METRICS).exists() else "is not empty"
            raise UserError(f"output directory {str(p)!r} already {what}; choose another --out")
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a name too long, a permission, a file in the way ...
        raise UserError(f"cannot create output directory {str(p)!r}: {e.strerror or e}") from None
    return p


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def top_mean(accuracies: Sequence[float], k: int = 5) -> float | None:
    """Mean of the ``k`` highest round accuracies (FedGen's metric, per seed).

    Parameters
    ----------
    accuracies : sequence of float
        One accuracy per round, in round order; rounds without an accuracy are left out.
    k : int, default 5
        How many of the highest rounds to average; with fewer rounds, all of them.

    Returns
    -------
    float or None
        The mean, or None for an empty sequence.
    """
    if not accuracies:
        return None
    return float(np.mean(sorted(accuracies, reverse=True)[:k]))


def last_mean(accuracies: Sequence[float], k: int = 5) -> float | None:
    """Mean of the last ``k`` round accuracies.

    Parameters
    ----------
    accuracies : sequence of float
        One accuracy per round, in round order; rounds without an accuracy are left out.
    k : int, default 5
        How many of the last rounds to average; with fewer rounds, all of them.

    Returns
    -------
    float or None
        The mean, or None for an empty sequence.
    """
    if not accuracies:
        return None
    return float(np.mean(accuracies[-k:]))


def _final_client_accuracy(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The per-client accuracy of the last round that has one: mean, std and 10th percentile
    over clients (federated evaluation; empty without it)."""
    for r in reversed(rows):
        if r.get("client_accuracy_mean") is not None:
            return {
                "final_client_accuracy": r["client_accuracy_mean"],
                "final_client_accuracy_std": r.get("client_accuracy_std"),
                "final_client_accuracy_p10": r.get("client_accuracy_p10"),
            }
    return {}


class RunRecorder:
    """Append per-round rows and write the summary; ``run_dir=None`` records in memory only."""

    def __init__(
        self, run_dir: Path | None, on_round: Callable[[dict[str, Any]], None] | None = None, title: str = ""
    ) -> None:
        self.run_dir = run_dir
        self.on_round = on_round
        self.title = title  # of accuracy.png (see run_title)
        self.rows: list[dict[str, Any]] = []
        self.tensorboard: Any = None  # a torch SummaryWriter (see open_tensorboard)

    def open_tensorboard(self) -> None:
        """Also write every numeric metric of each row as a TensorBoard scalar (``RUN_DIR/tensorboard``)."""
        if self.run_dir is not None and self.tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _log_scalars(self, row: Mapping[str, Any]) -> None:
        step = int(row.get("round", len(self.rows)))
        for key, value in row.items():
            if key in ("round", "epoch"):
                continue
            if isinstance(value, dict):
                for sub, v in value.items():
                    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                        self.tensorboard.add_scalar(f"{key}/{sub}", v, step)
            elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()

    def write_label_counts(self, counts: np.ndarray) -> None:
        if self.run_dir is None:
            return
        header = ",".join(f"class_{c}" for c in range(counts.shape[1]))
        np.savetxt(self.run_dir / LABELS, counts, fmt="%d", delimiter=",", header=header, comments="")
        plot_partition(counts, self.run_dir / "partition.png")

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Continue after ``rows`` (a checkpoint's): the metrics file is rewritten to exactly them."""
        self.rows = [dict(r) for r in rows]
        if self.run_dir is not None:
            write_atomic(self.run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in self.rows))

    def record(self, row: dict[str, Any]) -> None:
        row = _clean(row)
        self.rows.append(row)
        if self.run_dir is not None:
            with open(self.run_dir / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            self._log_scalars(row)
        if self.on_round is not None:
            self.on_round(row)

    def finish(self, extra: dict[str, Any]) -> dict[str, Any]:
        accs = [r["accuracy"] for r in self.rows if r.get("accuracy") is not None]
        summary = {
            "rounds": len(self.rows),
            "final_accuracy": accs[-1] if accs else None,
            "best_accuracy": max(accs) if accs else None,
            "top5_accuracy": top_mean(accs),
            "last5_accuracy": last_mean(accs),
            "mean_accuracy": float(np.mean(accs)) if accs else None,
            "var_accuracy": float(np.var(accs)) if accs else None,
            "bytes_up": sum(r.get("bytes_up", 0) for r in self.rows),
            "bytes_down": sum(r.get("bytes_down", 0) for r in self.rows),
            "bytes_up_extra": sum(r.get("bytes_up_extra", 0) for r in self.rows),
            "bytes_down_extra": sum(r.get("bytes_down_extra", 0) for r in self.rows),
            "failures": sum(r.get("failures", 0) for r in self.rows),
            **_final_client_accuracy(self.rows),
            **extra,
        }
        summary = _clean(summary)
        if self.run_dir is not None:
            write_atomic(self.run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
            plot_accuracy(self.rows, self.run_dir / "accuracy.png", self.title or self.run_dir.name)
        if self.tensorboard is not None:
            self.tensorboard.close()
        return summary


def check_tensorboard(cfg: Any) -> None:
    """``log.tensorboard = true`` needs the tensorboard package: one error line, before anything is written."""
    if cfg.bool("log.tensorboard"):
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise UserError("log.tensorboard = true needs the tensorboard package: pip install 'fedkd[tensorboard]'") from None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl`` (one-line errors for a missing or corrupt file)."""
    p = run_dir / METRICS
    if not p.is_file():
        raise UserError(f"{str(run_dir)!r} is not a run directory (no {METRICS})")
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"{p}: cannot read: {e}") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{p}:{i}: not valid JSON") from None
            if not _is_metrics_row(row):
                raise UserError(
                    f"{p}:{i}: not a metrics record (an object with an integer 'round' and numeric accuracies)"
                )
            rows.append(row)
    return rows


def _is_number_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool))


def _is_metrics_row(row: Any) -> bool:
    """What :func:`plot_accuracy` reads: an integer ``round``, numeric (or null) accuracies."""
    if not isinstance(row, dict) or not isinstance(row.get("round"), int) or isinstance(row["round"], bool):
        return False
    groups = row.get("group_accuracy") or {}
    return (
        _is_number_or_none(row.get("accuracy"))
        and isinstance(groups, dict)
        and all(_is_number_or_none(v) for v in groups.values())
    )


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_axes(fig: Any, ax: Any, path: Path, title: str = "") -> None:
    """Grid, legend and title on ``ax``; write ``fig`` to ``path`` and close it."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def run_title(values: Mapping[str, Any], name: str = "") -> str:
    """``name``, then strategy (and its base), dataset and partition of a resolved config."""
    strategy = str(values.get("strategy.name", "?"))
    base = values.get(f"strategy.{strategy}.base")
    part = str(values.get("partition.name", "?"))
    alpha = values.get(f"partition.{part}.alpha")
    what = (f"{strategy}" + (f" on {base}" if base else "") + f" · {values.get('dataset.name', '?')} · {part}"
            + (f" α={alpha}" if alpha is not None else "") + f" · {values.get('clients.num', '?')} clients")  # fmt: skip
    return f"{name}\n{what}" if name else what


def plot_accuracy(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """Global and per-group test accuracy against rounds. Groups are drawn first and solid; the
    global model (one of them, or a distilled one) on top, dashed and thinner, so that the line of
    the group it equals stays visible."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rounds = [r["round"] for r in rows]
    groups = sorted({g for r in rows for g in (r.get("group_accuracy") or {})})
    if len(groups) > 1:
        for g in groups:
            ax.plot(rounds, [(r.get("group_accuracy") or {}).get(g) for r in rows], lw=2.2, alpha=0.75, label=f"group {g}")
    ax.plot(rounds, [r.get("accuracy") for r in rows], "k--", marker="o", ms=3, lw=1.3, label="global model", zorder=5)
    client = [(r["round"], r) for r in rows if r.get("client_accuracy_mean") is not None]
    if client:  # federated evaluation: mean over clients, the band from the 10th percentile to the best client
        xs = [x for x, _ in client]
        ax.fill_between(xs, [r["client_accuracy_p10"] for _, r in client],
                        [max(r["client_accuracy"].values()) for _, r in client], color="tab:green", alpha=0.15,
                        label="clients: 10th pct – best")  # fmt: skip
        ax.plot(xs, [r["client_accuracy_mean"] for _, r in client], color="tab:green", lw=1.6, label="clients: mean")
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    save_axes(fig, ax, path, title)


def plot_partition(counts: np.ndarray, path: Path) -> None:
    """Heat-map of per-client label counts."""
    plt = _pyplot()
    n, k = counts.shape
    # capped: thousands of clients become thin rows, not a figure of 100,000 pixels
    fig, ax = plt.subplots(figsize=(min(max(4, 0.45 * k + 2), 16), min(max(3, 0.3 * n + 1.5), 12)))
    im = ax.imshow(counts, aspect="auto", cmap="viridis")
    ax.set_xlabel("class")
    ax.set_ylabel("client (partition id)")
    ax.set_xticks(range(k)) if k <= 26 else None
    ax.set_yticks(range(n)) if n <= 40 else None
    if n * k <= 400:
        for i in range(n):
            for j in range(k):
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if counts[i, j] < counts.max() / 2 else "black")  # fmt: skip
    fig.colorbar(im, ax=ax, label="samples")
    ax.set_title("label counts per client")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Redraw a run directory's PNGs from its files; returns the paths written."""
    d = Path(run_dir)
    if not d.is_dir():
        raise UserError(f"run directory {str(d)!r} {'is not a directory' if d.exists() else 'does not exist'}")
    rows = read_metrics(d)
    counts = None
    if (d / LABELS).is_file():  # read (and check) everything before writing anything
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy warns on a file with no data rows
                counts = np.loadtxt(d / LABELS, delimiter=",", skiprows=1, ndmin=2)
        except (ValueError, OSError):  # UnicodeDecodeError is a ValueError
            raise UserError(f"{d / LABELS}: not a label-count matrix") from None
        if counts.size == 0 or not np.isfinite(counts).all() or (counts < 0).any():
            raise UserError(f"{d / LABELS}: not a label-count matrix")
    out = [d / "accuracy.png"]
    title = d.name
    if (d / CONFIG).is_file():
        try:
            from fedkd.config import Config

            title = run_title(Config.from_toml((d / CONFIG).read_text(encoding="utf-8")).resolved(), d.name)
        except (UserError, ValueError):
            pass  # the plot does not need the config; keep the directory name
    plot_accuracy(rows, out[0], title=title)
    if counts is not None:
        plot_partition(counts.astype(int), d / "partition.png")
        out.append(d / "partition.png")
    return out
