"""`fedkd compare`: sims × seeds, paired partitions, table and plot."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path

import pytest

from fedkd.cli import main
from fedkd.compare import (
    paired_differences,
    paired_stats,
    paired_to_csv,
    paired_to_markdown,
    summarize,
    to_markdown,
    with_curve_metrics,
)
from fedkd.results import RunRecorder, last_mean, top_mean

T975_2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2)
T975_1 = 12.706204736174705  # scipy.stats.t.ppf(0.975, 1)


def write_sim(path, strategy: str = "fedavg"):
    path.write_text(
        'rounds = 2\n[clients]\nnum = 4\narchitectures = "mlp"\nlocal-steps = 20\n'
        f'[partition]\nname = "dirichlet"\n[strategy]\nname = "{strategy}"\n'
    )
    return path


def test_compare_two_sims_three_seeds(tmp_path, capsys):
    a = write_sim(tmp_path / "a.toml")
    b = write_sim(tmp_path / "b.toml", "fedprox")
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--seeds", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| a | 3 |" in printed and "| b | 3 |" in printed
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["sim"] for r in rows] == ["a", "b"]
    assert all(0 <= float(r["final_accuracy"]) <= 100 and float(r["final_accuracy_std"]) >= 0 for r in rows)
    assert (out / "comparison.png").stat().st_size > 1000
    for seed in range(3):
        # paired: the same seed gives the same partition in every sim
        assert (out / "a" / f"seed{seed}" / "label_counts.csv").read_text() == (
            out / "b" / f"seed{seed}" / "label_counts.csv"
        ).read_text()
    assert (out / "a" / "seed0" / "label_counts.csv").read_text() != (
        out / "a" / "seed1" / "label_counts.csv"
    ).read_text()


def test_summary_statistics_are_sample_mean_and_std():
    res = {"x": [{"final_accuracy": 0.5, "best_accuracy": 0.6, "mean_accuracy": 0.4, "var_accuracy": 0.01,
                  "wall_seconds": 1.0, "bytes_up": 2e6, "bytes_down": 1e6},
                 {"final_accuracy": 0.7, "best_accuracy": 0.8, "mean_accuracy": 0.6, "var_accuracy": 0.03,
                  "wall_seconds": 3.0, "bytes_up": 2e6, "bytes_down": 1e6}]}  # fmt: skip
    (row,) = summarize(res)
    assert row["final_accuracy"] == pytest.approx(60.0) and row["final_accuracy_std"] == pytest.approx(14.1421356)
    assert row["var_accuracy"] == pytest.approx(200.0)  # in %²
    assert row["bytes_up"] == pytest.approx(2.0) and row["bytes_up_std"] == 0.0
    assert "| x | 2 | 60.00 ± 14.14 |" in to_markdown([row], "cmd")


def test_compare_baseline_writes_the_paired_table_and_csv(tmp_path, capsys):
    a = write_sim(tmp_path / "a.toml")
    b = write_sim(tmp_path / "b.toml", "fedprox")
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--seeds", "2", "--out", str(out), "--baseline", "a"]) == 0
    printed = capsys.readouterr().out
    assert "Paired differences vs a" in printed and "| b | 2 | " in printed
    md = (out / "comparison.md").read_text()
    assert md.startswith(f"Command: `fedkd compare {a} {b} --seeds 2 --baseline a`")
    assert "Paired differences vs a" in md and "| a | 2 | " not in md.split("Paired differences")[1]
    (row,) = csv.DictReader((out / "comparison_paired.csv").open())
    assert (row["sim"], row["baseline"], row["seeds"]) == ("b", "a", "2")
    for key in ("final_accuracy", "best_accuracy", "top5_accuracy", "last5_accuracy"):
        diffs = [
            100 * (json.loads((out / sim / f"seed{s}" / "summary.json").read_text())[key])
            for s in range(2)
            for sim in ("b", "a")
        ]
        per_seed = [diffs[0] - diffs[1], diffs[2] - diffs[3]]
        assert float(row[f"{key}_diff"]) == pytest.approx(sum(per_seed) / 2)
        half = T975_1 * abs(per_seed[0] - per_seed[1]) / math.sqrt(2) / math.sqrt(2)  # std of 2 = |d0-d1|/√2
        assert float(row[f"{key}_ci_high"]) - float(row[f"{key}_diff"]) == pytest.approx(half, abs=1e-9)
        assert row[f"{key}_significant"] in ("True", "False")
    main_rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert all(0 <= float(r["top5_accuracy"]) <= 100 and 0 <= float(r["last5_accuracy"]) <= 100 for r in main_rows)


def test_compare_baseline_by_path_and_no_paired_files_without_it(tmp_path, capsys):
    a = write_sim(tmp_path / "a.toml")
    b = write_sim(tmp_path / "b.toml", "fedprox")
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--seeds", "1", "--out", str(out), "--baseline", str(b)]) == 0
    printed = capsys.readouterr().out
    assert "Paired differences vs b" in printed and "[n/a]" in printed  # one seed: no interval
    (row,) = csv.DictReader((out / "comparison_paired.csv").open())
    assert row["sim"] == "a" and row["final_accuracy_ci_low"] == "nan" and row["final_accuracy_significant"] == "False"
    # the same suite, resumed without --baseline: no paired table in the new comparison.md
    assert main(["compare", str(a), str(b), "--seeds", "1", "--out", str(out), "--resume"]) == 0
    assert "Paired differences" not in capsys.readouterr().out
    assert not (out / "comparison_paired.csv").exists()  # not left over from the first table


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["compare", "sims/quickstart.toml", "sims/dfkd-mnist5k-dfad.toml", "--baseline", "nope"],
         "--baseline 'nope' is not one of the sims (quickstart, dfkd-mnist5k-dfad)"),
        (["compare", "sims/quickstart.toml", "--baseline", "quickstart"], "--baseline needs at least one other sim"),
        (["compare", "nope.toml"], "sim file 'nope.toml' does not exist"),
        (["compare", "sims/quickstart.toml", "--seeds", "0"], "--seeds must be ≥ 1"),
        (["compare", "sims/quickstart.toml", "--set", "rounds=0"], "rounds must be ≥ 1"),
        (["compare"], "the following arguments are required: sims"),
    ],
)  # fmt: skip
def test_compare_bad_input(capsys, argv, fragment, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]
    assert not (tmp_path / "o").exists()


def test_compare_resume_reuses_finished_runs_and_refuses_another_config(tmp_path, capsys):
    a = write_sim(tmp_path / "a.toml")
    out = tmp_path / "cmp"
    assert main(["compare", str(a), "--seeds", "1", "--out", str(out)]) == 0
    metrics = (out / "a" / "seed0" / "metrics.jsonl").read_bytes()
    b = write_sim(tmp_path / "b.toml", "fedprox")
    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--seeds", "1", "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr()
    assert "| a | 1 |" in printed.out and "| b | 1 |" in printed.out
    assert (out / "a" / "seed0" / "metrics.jsonl").read_bytes() == metrics  # reused, not rerun
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["compare", str(a), "--seeds", "1", "--out", str(out), "--resume", "--set", "rounds=3"]) == 2
    assert "holds a run of a different config" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(["compare", str(a), "--resume"]) == 2


def test_compare_resume_restarts_a_run_killed_before_its_first_checkpoint(tmp_path):
    a = write_sim(tmp_path / "a.toml")
    out = tmp_path / "cmp"
    assert main(["compare", str(a), "--seeds", "2", "--out", str(out)]) == 0
    seed1 = out / "a" / "seed1"
    def accs() -> list[float]:
        return [json.loads(x)["accuracy"] for x in (seed1 / "metrics.jsonl").read_text().splitlines()]

    done = accs()
    for p in list(seed1.iterdir()):  # what a kill right after the start leaves: the config alone
        if p.name != "config.toml":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert main(["compare", str(a), "--seeds", "2", "--out", str(out), "--resume"]) == 0
    assert accs() == done  # run again from the start: the same run


def test_top5_and_last5_of_a_curve():
    curve = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6]
    assert top_mean(curve) == pytest.approx((0.9 + 0.8 + 0.7 + 0.6 + 0.4) / 5)
    assert last_mean(curve) == pytest.approx((0.8 + 0.3 + 0.7 + 0.4 + 0.6) / 5)
    assert top_mean([0.5, 0.7]) == pytest.approx(0.6) and last_mean([0.5, 0.7]) == pytest.approx(0.6)  # < 5 rounds
    assert top_mean([]) is None and last_mean([]) is None
    rec = RunRecorder(None)
    for i, acc in enumerate([*curve, None], 1):  # a round without an accuracy is left out
        rec.record({"round": i, "accuracy": acc})
    summary = rec.finish({})
    assert summary["top5_accuracy"] == pytest.approx(top_mean(curve))
    assert summary["last5_accuracy"] == pytest.approx(last_mean(curve))
    assert summary["final_accuracy"] == 0.6 and summary["best_accuracy"] == 0.9  # the old keys stay


def test_old_summaries_get_top5_and_last5_from_the_curve():
    old = {"final_accuracy": 0.6, "best_accuracy": 0.9}
    filled = with_curve_metrics(old, [0.1, 0.9, None, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6])
    assert filled["top5_accuracy"] == pytest.approx(0.68) and filled["last5_accuracy"] == pytest.approx(0.56)
    assert "top5_accuracy" not in old  # a copy
    assert with_curve_metrics({"top5_accuracy": 0.5}, [0.9])["top5_accuracy"] == 0.5  # present keys are kept


def test_paired_stats_by_hand():
    mean, std, low, high = paired_stats([1.0, 2.0, 3.0])
    assert (mean, std) == (pytest.approx(2.0), pytest.approx(1.0))
    assert (low, high) == (pytest.approx(2 - T975_2 / math.sqrt(3)), pytest.approx(2 + T975_2 / math.sqrt(3)))
    mean, std, low, high = paired_stats([-1.0, 0.5, 2.0])  # the interval includes 0
    assert mean == pytest.approx(0.5) and std == pytest.approx(1.5) and low < 0 < high
    assert low == pytest.approx(0.5 - T975_2 * 1.5 / math.sqrt(3))
    mean, std, low, high = paired_stats([2.5])  # one seed: no std, no interval
    assert mean == 2.5 and math.isnan(std) and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(v) for v in paired_stats([1.0, float("nan")]))


def _runs(accs):
    """``{seed: summary}`` from one accuracy (a fraction) per seed: final = best = top-5 = last-5."""
    keys = ("final_accuracy", "best_accuracy", "top5_accuracy", "last5_accuracy")
    return {s: dict.fromkeys(keys, a) for s, a in enumerate(accs)}


def test_paired_differences_pairs_by_seed():
    up = _runs([0.51, 0.62, 0.73])  # +1, +2, +3 pp
    res = {
        "base": _runs([0.50, 0.60, 0.70]),
        "up": {2: up[2], 0: up[0], 1: up[1]},  # in another order: pairs by seed, not by position
        "noise": _runs([0.49, 0.605, 0.72]),  # -1, +0.5, +2 pp
    }
    up, noise = paired_differences(res, "base")
    assert (up["sim"], up["baseline"], up["seeds"]) == ("up", "base", 3)
    for key in ("final_accuracy", "best_accuracy", "top5_accuracy", "last5_accuracy"):
        assert up[f"{key}_diff"] == pytest.approx(2.0) and up[f"{key}_diff_std"] == pytest.approx(1.0)
        assert up[f"{key}_ci_low"] == pytest.approx(2 - T975_2 / math.sqrt(3))  # 2 ± 4.303/√3: includes 0
        assert up[f"{key}_ci_high"] == pytest.approx(2 + T975_2 / math.sqrt(3))
        assert up[f"{key}_significant"] is False
        assert noise[f"{key}_diff"] == pytest.approx(0.5) and noise[f"{key}_diff_std"] == pytest.approx(1.5)
        assert noise[f"{key}_significant"] is False
    md = paired_to_markdown([up, noise], "base")
    assert "Paired differences vs base" in md
    assert "| up | 3 | +2.00 [-0.48, +4.48] |" in md
    assert "| noise | 3 | +0.50 [-3.23, +4.23] |" in md
    fields = next(csv.reader(paired_to_csv([up]).splitlines()))
    assert fields[:3] == ["sim", "baseline", "seeds"]
    assert fields[3:8] == ["final_accuracy_diff", "final_accuracy_diff_std", "final_accuracy_ci_low",
                           "final_accuracy_ci_high", "final_accuracy_significant"]  # fmt: skip
    assert len(fields) == 3 + 4 * 5


def test_paired_differences_marks_an_interval_that_excludes_zero():
    res = {"a": _runs([0.50, 0.60, 0.70]), "b": _runs([0.53, 0.63, 0.70])}  # +3, +3, 0 pp: 2 ± 4.303
    (row,) = paired_differences(res, "a")
    assert row["final_accuracy_diff"] == pytest.approx(2.0)
    assert row["final_accuracy_diff_std"] == pytest.approx(math.sqrt(3))
    assert row["final_accuracy_ci_low"] == pytest.approx(2 - T975_2) and row["final_accuracy_significant"] is False
    res["b"] = _runs([0.55, 0.655, 0.745])  # +5, +5.5, +4.5 pp: 5 ± 4.303 * 0.5 / √3
    (row,) = paired_differences(res, "a")
    assert row["final_accuracy_ci_low"] == pytest.approx(5 - T975_2 * 0.5 / math.sqrt(3))
    assert row["final_accuracy_significant"] is True
    assert "| b | 3 | +5.00 [+3.76, +6.24]* |" in paired_to_markdown([row], "a")
    res["b"] = _runs([0.45, 0.545, 0.655])  # -5, -5.5, -4.5 pp: significant too
    (row,) = paired_differences(res, "a")
    assert row["final_accuracy_significant"] is True
    assert "| b | 3 | -5.00 [-6.24, -3.76]* |" in paired_to_markdown([row], "a")


def test_paired_differences_single_seed_and_missing_values():
    res = {"a": _runs([0.50]), "b": _runs([0.55])}
    (row,) = paired_differences(res, "a")
    assert row["seeds"] == 1 and row["final_accuracy_diff"] == pytest.approx(5.0)
    assert math.isnan(row["final_accuracy_diff_std"]) and math.isnan(row["final_accuracy_ci_low"])
    assert row["final_accuracy_significant"] is False
    assert "| b | 1 | +5.00 [n/a] | +5.00 [n/a] |" in paired_to_markdown([row], "a")
    assert ",nan," in paired_to_csv([row])
    res["b"][0]["top5_accuracy"] = None  # a run without any accuracy
    (row,) = paired_differences(res, "a")
    assert math.isnan(row["top5_accuracy_diff"]) and "| n/a |" in paired_to_markdown([row], "a")


def test_paired_differences_needs_the_same_seeds():
    with pytest.raises(ValueError, match="cannot pair"):
        paired_differences({"a": _runs([0.5, 0.6]), "b": {0: _runs([0.5])[0], 2: _runs([0.6])[0]}}, "a")
    with pytest.raises(ValueError, match="not among the sims"):
        paired_differences({"a": _runs([0.5])}, "c")


# --------------------------------------------------------------------------- fedkd table


def test_fedkd_table_groups_existing_runs_by_config_and_pairs_on_shared_seeds(tmp_path, capsys):
    """On the committed S1 run directories: no run is repeated, the table is the compare table."""
    import shutil

    from fedkd.cli import main

    s1 = Path(__file__).resolve().parents[1] / "sims" / "results" / "s1"
    runs = tmp_path / "runs"
    for sim, seeds in (("mnist5k-fedavg-dir0.1", 5), ("mnist5k-fedgen-dir0.1", 3)):
        for k in range(seeds):
            shutil.copytree(s1 / sim / f"seed{k}", runs / sim / f"seed{k}",
                            ignore=shutil.ignore_patterns("checkpoint-*"))  # fmt: skip
    (runs / "mnist5k-fedgen-dir0.1" / "seed2" / "summary.json").unlink()  # an unfinished run
    out = tmp_path / "tables"
    assert main(["table", str(runs), "--baseline", "mnist5k-fedavg-dir0.1", "--out", str(out), "--name", "s1"]) == 0
    captured = capsys.readouterr()
    assert "seed2 has not finished (no summary.json); left out" in captured.err
    md = (out / "s1.md").read_text()
    assert "| mnist5k-fedavg-dir0.1 | 5 |" in md and "| mnist5k-fedgen-dir0.1 | 2 |" in md
    paired = list(csv.DictReader(io.StringIO((out / "s1_paired.csv").read_text())))
    assert [(r["sim"], r["seeds"]) for r in paired] == [("mnist5k-fedgen-dir0.1", "2")], "paired on seeds 0, 1"
    fedgen = [json.loads((runs / "mnist5k-fedgen-dir0.1" / f"seed{k}" / "summary.json").read_text()) for k in (0, 1)]
    fedavg = [json.loads((runs / "mnist5k-fedavg-dir0.1" / f"seed{k}" / "summary.json").read_text()) for k in (0, 1)]
    want = sum(100 * (g["top5_accuracy"] - a["top5_accuracy"]) for g, a in zip(fedgen, fedavg)) / 2
    assert float(paired[0]["top5_accuracy_diff"]) == pytest.approx(want, abs=1e-6)
    assert (out / "s1.png").is_file() and (out / "s1.csv").is_file()
    assert md in captured.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent/runs"], "'/nonexistent/runs' does not exist"),
        (["{tmp}"], "no run directory (with config.toml) under"),
        (["{s1}/mnist5k-fedavg-dir0.1", "--baseline", "fedavg"], "--baseline 'fedavg' is not one of the groups"),
        (["{s1}/mnist5k-fedavg-dir0.1", "--baseline", "mnist5k-fedavg-dir0.1"], "needs at least one other group"),
        (["{s1}/mnist5k-fedavg-dir0.1", "--name", "../x"], "must be a plain file stem"),
    ],
)
def test_fedkd_table_bad_input(tmp_path, capsys, args, message):
    from fedkd.cli import main

    s1 = str(Path(__file__).resolve().parents[1] / "sims" / "results" / "s1")
    argv = ["table", *[a.replace("{tmp}", str(tmp_path)).replace("{s1}", s1) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_single_seed_shows_no_zero_spread():
    from fedkd.compare import summarize, to_markdown

    one = summarize({"a": [{"final_accuracy": 0.5, "wall_seconds": 3.0}]})
    md = to_markdown(one, "cmd")
    assert "| a | 1 | 50.00 |" in md and "± 0.00" not in md.split("\n", 6)[-1]
