"""The teacher/student pair matrix of data-free KD: does `fedkd dfkd` work for every registered pair?

Teachers {lenet5, cnn, resnet8, mobilenetv2} × students {lenet5-half, mlp, cnn} on mnist5k, and
three pairs on 8×8 digits, each run with one recipe (default: the shipped DFAD config,
``sims/dfkd-mnist5k-dfad.toml``, i.e. the default ``dfad`` preset). Every run is a real
``fedkd dfkd`` run directory under ``OUT/<method>/<dataset>-<teacher>-<student>/seed<k>``;
a finished one is reused (rerun the command to continue an interrupted matrix). Teachers are
cached in ``OUT/teachers`` and shared by every method. ::

    python benchmarks/dfkd_pairs.py --out runs/dfkd-pairs                      # the whole matrix, seed 0
    python benchmarks/dfkd_pairs.py --out runs/dfkd-pairs --seeds 3 --pairs mnist5k:lenet5:lenet5-half
    python benchmarks/dfkd_pairs.py --out runs/dfkd-pairs --method fast        # Fast-DFKD (BN teachers)

    python benchmarks/dfkd_pairs.py --out runs/dfkd-pairs --speed mnist5k:resnet8:lenet5-half --methods adi,fast

``--speed`` runs (or reuses) each method on one pair and compares accuracy against wall time:
``OUT/speed-<pair>.md`` (seconds to reach 50 / 80 / 90 % of the teacher, and the ratio of each
method's time to the first method's) and ``OUT/speed-<pair>.png`` (accuracy vs elapsed seconds).
Without ``--speed`` it teacher accuracy, student final and best,
final / teacher, the goal (≥ 0.90 of the teacher, ≥ 0.95 for a pair of one family), epochs
flagged as generator collapse, and wall time; mean ± std over seeds where there are several.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedkd.config import load_config  # noqa: E402
from fedkd.errors import UserError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEACHERS = ("lenet5", "cnn", "resnet8", "mobilenetv2")
STUDENTS = ("lenet5-half", "mlp", "cnn")
DIGITS = (("lenet5", "lenet5-half"), ("lenet5", "mlp"), ("resnet8", "mlp"))
FAMILY = {"lenet5": "lenet", "lenet5-half": "lenet", "cnn": "cnn", "cnn-bn": "cnn", "mlp": "mlp",
          "resnet8": "resnet", "mobilenetv2": "mobilenet"}  # fmt: skip
BN_TEACHERS = ("resnet8", "mobilenetv2", "cnn-bn")
# method -> (base sim, extra --set items, needs a BatchNorm teacher)
METHODS: dict[str, tuple[str, list[str], bool]] = {
    # DFAD as published (no BN term even for a BatchNorm teacher): the matrix's first table
    "dfad": ("sims/dfkd-mnist5k-dfad.toml", ["dfkd.bn-auto=false"], False),
    "adi": ("sims/dfkd-mnist5k-dfad.toml", ["synthesis.preset=adi"], True),
    # DFAD plus DeepInversion's BN-statistics term: what the shipped config does for a BatchNorm teacher
    # (dfkd.bn-auto); for a teacher without BatchNorm the shipped config is "dfad"
    "dfad-bn": ("sims/dfkd-mnist5k-dfad.toml", ["synthesis.weights=bn=1"], True),
    # the same with a 10x generator step (1e-2): the lever the one-factor diagnosis found
    "dfad-bn-glr": ("sims/dfkd-mnist5k-dfad.toml", ["synthesis.weights=bn=1", "synthesis.lr=1e-2"], True),
    # ... and twice the epochs (80): the shipped recipe for BatchNorm teachers (the same config as dfad-bn-glr
    # with dfkd.epochs=80)
    "dfad-bn-glr-80": ("sims/dfkd-mnist5k-bn-teacher.toml", [], True),
    # Fast's official student lr is 0.2 (BatchNorm students); for LeNet-5-half without BN, KL at T = 20 times T²,
    # 0.1 left the student at 10% and 0.01 learns (benchmarks/fast_official_check.py: the synthesis step matches
    # the official one bit for bit; the student lr was the cause)
    "fast": (
        "sims/dfkd-mnist5k-dfad.toml",
        ["synthesizer.name=fast", "synthesis.preset=fast", "synthesis.lr=5e-3", "synthesizer.fast.iterations=2",
         "generator.image.latent-dim=256", "dfkd.iterations=1", "distill.steps=50", "dfkd.warmup-epochs=2",
         "distill.loss=kl", "distill.temperature=20", "distill.lr=0.01", "distill.lr-schedule=cosine",
         "distill.weight-decay=1e-4", "synthesizer.fast.crop-padding=2"],
        True,
    ),
    # CMI's official student lr is 0.1 (BatchNorm students); at 0.1 the BN-free LeNet-5-half stayed at 10% for the
    # first 17 epochs on mnist5k (as Fast's did), so 0.01, as for fast
    "cmi": (
        "sims/dfkd-mnist5k-dfad.toml",
        ["synthesizer.name=cmi", "synthesis.preset=cmi", "synthesizer.cmi.iterations=20",
         "generator.image.latent-dim=256", "dfkd.iterations=1", "distill.steps=50", "distill.loss=kl",
         "distill.temperature=20", "distill.lr=0.01", "distill.lr-schedule=cosine", "distill.weight-decay=1e-4",
         "synthesizer.cmi.crop-padding=2"],
        True,
    ),
}  # fmt: skip


def all_pairs() -> list[tuple[str, str, str]]:
    return [("mnist5k", t, s) for t in TEACHERS for s in STUDENTS] + [("digits", t, s) for t, s in DIGITS]


def parse_pairs(text: str) -> list[tuple[str, str, str]]:
    out = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3:
            raise UserError(f"--pairs: {item!r} is not DATASET:TEACHER:STUDENT")
        out.append((parts[0], parts[1], parts[2]))
    return out


def run_one(method: str, ds: str, teacher: str, student: str, seed: int, out: Path, sets: list[str]) -> dict[str, Any]:
    """One `fedkd dfkd` run (reused when finished); its summary."""
    from fedkd import dfkd

    run_dir = out / method / f"{ds}-{teacher}-{student}" / f"seed{seed}"
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text(encoding="utf-8"))
    sim, extra, _ = METHODS[method]
    items = [f"dataset.name={ds}", f"dfkd.teacher={teacher}", f"dfkd.student={student}",
             f"dfkd.teacher-cache={out / 'teachers'}", *extra, *sets]  # fmt: skip
    cfg = load_config(REPO / sim, items, seed)
    if run_dir.exists():  # an interrupted run: start it again
        for f in run_dir.iterdir():
            f.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    t = time.perf_counter()

    def line(row: dict[str, Any]) -> None:
        print(f"  {method} {ds} {teacher}->{student} s{seed} " + dfkd.format_epoch(row, cfg.int("dfkd.epochs")),
              flush=True)  # fmt: skip

    summary = dfkd.run(cfg, run_dir, line)
    print(f"{method} {ds} {teacher} -> {student} seed {seed}: teacher {summary['teacher_accuracy']:.4f} "
          f"student {summary['student_final_accuracy']:.4f} ({time.perf_counter() - t:.0f}s)", flush=True)  # fmt: skip
    return summary


def finished(out: Path, method: str) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Every finished run of ``method`` under ``out``, by pair (the matrix's order, then any other pair), by seed."""
    found: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
    for summary in sorted((out / method).glob("*/seed*/summary.json")):
        cfg = tomllib.loads((summary.parent / "config.toml").read_text(encoding="utf-8"))
        pair = (cfg["dataset"]["name"], cfg["dfkd"]["teacher"], cfg["dfkd"]["student"])
        seed = int(summary.parent.name.removeprefix("seed"))
        found.setdefault(pair, {})[seed] = json.loads(summary.read_text(encoding="utf-8"))
    order = {pair: i for i, pair in enumerate(all_pairs())}
    keys = sorted(found, key=lambda pair: (order.get(pair, len(order)), pair))
    return {pair: [found[pair][k] for k in sorted(found[pair])] for pair in keys}


def _cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    v = np.asarray(values, dtype=float) * scale
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def table(method: str, results: dict[tuple[str, str, str], list[dict[str, Any]]]) -> tuple[str, str]:
    """Markdown and CSV of the matrix."""
    head = ["dataset", "teacher", "student", "seeds", "teacher %", "student final %", "best %", "final / teacher %",
            "goal", "met", "collapse epochs", "wall s"]  # fmt: skip
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([h.replace(" %", "_pct").replace(" / ", "_over_").replace(" ", "_") for h in head])
    for (ds, t, s), runs in results.items():
        ratio = [r["student_final_accuracy"] / r["teacher_accuracy"] for r in runs]
        goal = 0.95 if FAMILY.get(t) == FAMILY.get(s) else 0.90
        met = float(np.mean(ratio)) >= goal
        row = [ds, t, s, str(len(runs)), _cell([r["teacher_accuracy"] for r in runs]),
               _cell([r["student_final_accuracy"] for r in runs]), _cell([r["student_best_accuracy"] for r in runs]),
               _cell(ratio), f"≥ {goal * 100:.0f}", "yes" if met else "**no**",
               _cell([r.get("collapse_epochs", 0) for r in runs], 1.0, 0), _cell([r["wall_seconds"] for r in runs], 1.0, 0)]  # fmt: skip
        md.append("| " + " | ".join(row) + " |")
        w.writerow([*row[:9], "yes" if met else "no", *row[10:]])
    return "\n".join(md) + "\n", buf.getvalue()


def time_to(run_dir: Path, fraction: float, teacher: float) -> float | None:
    """Elapsed seconds (teacher included) at the first epoch whose accuracy reaches ``fraction · teacher``."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return next((float(r["elapsed"]) for r in rows if r["accuracy"] >= fraction * teacher), None)


def speed(out: Path, pair: tuple[str, str, str], methods: list[str], sets: list[str]) -> str:
    """Accuracy against wall time for several methods on one pair (seed 0); the Markdown table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = "-".join(pair)
    fig, ax = plt.subplots(figsize=(6, 4))
    lines = ["| method | teacher % | final % | best % | s to 50% | s to 80% | s to 90% | × first method (90%) | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    base: float | None = None
    for m in methods:
        summary = run_one(m, *pair, 0, out, sets)
        run_dir = out / m / name / "seed0"
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        ax.plot([r["elapsed"] for r in rows], [r["accuracy"] for r in rows], marker="o", ms=2, label=m)
        t = summary["teacher_accuracy"]
        marks = [time_to(run_dir, f, t) for f in (0.5, 0.8, 0.9)]
        base = marks[2] if base is None else base
        ratio = f"{marks[2] / base:.2f}" if marks[2] is not None and base else "n/a"
        cells = ["never" if v is None else f"{v:.0f}" for v in marks]
        lines.append(f"| {m} | {t * 100:.1f} | {summary['student_final_accuracy'] * 100:.1f} | "
                     f"{summary['student_best_accuracy'] * 100:.1f} | {' | '.join(cells)} | {ratio} | "
                     f"{summary['wall_seconds']:.0f} |")  # fmt: skip
        ax.axhline(t, color="k", ls="--", lw=0.8)
    ax.set_xlabel("wall seconds (teacher included)")
    ax.set_ylabel("student test accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"{pair[1]} -> {pair[2]} on {pair[0]}: accuracy vs wall time")
    fig.tight_layout()
    fig.savefig(out / f"speed-{name}.png", dpi=110)
    plt.close(fig)
    md = "\n".join(lines) + "\n"
    (out / f"speed-{name}.md").write_text(md, encoding="utf-8")
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (reused: finished runs are kept)")
    p.add_argument("--method", default="dfad", choices=sorted(METHODS), help="recipe (default dfad)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per pair (0, 1, ...)")
    p.add_argument("--pairs", help="comma-separated DATASET:TEACHER:STUDENT (default: the whole matrix)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key in every run")
    p.add_argument("--no-run", action="store_true", help="only tabulate the finished runs already in --out")
    p.add_argument("--speed", metavar="DATASET:TEACHER:STUDENT", help="compare --methods on one pair against wall time")
    p.add_argument("--methods", default="adi,fast", help="methods of --speed, comma-separated (default adi,fast)")
    args = p.parse_args(argv)
    try:
        if args.speed:
            methods = [m.strip() for m in args.methods.split(",")]
            unknown = [m for m in methods if m not in METHODS]
            if unknown:
                raise UserError(f"--methods: unknown {', '.join(unknown)}; valid: {', '.join(sorted(METHODS))}")
            (pair,) = parse_pairs(args.speed)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            print(speed(Path(args.out), pair, methods, args.set), end="")
            return 0
        pairs = parse_pairs(args.pairs) if args.pairs else all_pairs()
        needs_bn = METHODS[args.method][2]
        skipped = [x for x in pairs if needs_bn and x[1] not in BN_TEACHERS]
        pairs = [x for x in pairs if x not in skipped]
        if skipped:
            print(f"{args.method} needs a BatchNorm teacher; skipping {', '.join(':'.join(x) for x in skipped)}")
        out = Path(args.out)
        md = ""
        for pair in pairs:
            for seed in range(args.seeds):
                done = out / args.method / "-".join(pair) / f"seed{seed}" / "summary.json"
                if args.no_run and not done.is_file():
                    continue
                run_one(args.method, *pair, seed, out, args.set)
                # rewritten after every run (partial tables survive), over every finished run of the method in
                # --out, so a run on a few pairs or seeds does not drop the other rows
                md, text = table(args.method, finished(out, args.method))
                (out / f"{args.method}.md").write_text(md, encoding="utf-8")
                (out / f"{args.method}.csv").write_text(text, encoding="utf-8")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(md, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
