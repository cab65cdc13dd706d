"""`fedkd compare`: sims × seeds, paired partitions, table and plot."""

from __future__ import annotations

import csv

import pytest

from fedkd.cli import main
from fedkd.compare import summarize, to_markdown


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


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["compare", "nope.toml"], "sim file 'nope.toml' does not exist"),
        (["compare", "sims/quickstart.toml", "--seeds", "0"], "--seeds must be ≥ 1"),
        (["compare", "sims/quickstart.toml", "--set", "rounds=0"], "rounds must be ≥ 1"),
        (["compare"], "the following arguments are required: sims"),
    ],
)
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
