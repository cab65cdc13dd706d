"""`fedkd dfkd`: bad input (exit 2, one line), end-to-end runs, the teacher cache, shipped sims."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from fedkd.cli import main
from fedkd.config import load_config
from fedkd.data import load_dataset
from fedkd.dfkd import save_teacher
from fedkd.models import build_model

REPO = Path(__file__).resolve().parents[1]

# A few seconds on 2 CPU cores: sklearn's 8×8 digits, tiny generator, a handful of steps.
FAST = [
    "dataset.name=digits",
    "dfkd.threads=1",
    "dfkd.epochs=2",
    "dfkd.iterations=2",
    "dfkd.teacher-epochs=5",
    "dfkd.teacher-lr=0.05",
    "distill.steps=2",
    "synthesis.batch-size=32",
    "generator.image.base-channels=4",
    "generator.image.latent-dim=16",
    "distill.memory-push-every=1",
]
SUMMARY_KEYS = {
    "teacher_accuracy",
    "student_final_accuracy",
    "student_best_accuracy",
    "mean_accuracy",
    "var_accuracy",
    "wall_seconds",
}


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _dfkd(out: Path, *extra: str, sim: str | None = None) -> int:
    return main(["dfkd", *([sim] if sim else []), "--out", str(out), *_sets(FAST), *extra])


@pytest.fixture
def digits_teacher_ckpt(tmp_path: Path) -> Path:
    """A fedkd teacher checkpoint for lenet5 on 8×8 digits (untrained weights suffice)."""
    ds = load_dataset("digits")
    path = tmp_path / "digits-lenet5.pt"
    save_teacher(path, build_model("lenet5", ds.shape, ds.num_classes), "lenet5", ds, 0.0)
    return path


BAD = [
    (["--set", "synthesis.preset=dfkd"], "synthesis.preset: unknown preset 'dfkd'; valid: adi, cmi, dafl, dfad,"),
    (["--set", "synthesis.weights=foo=1"], "synthesis.weights: unknown term 'foo'"),
    (["--set", "synthesis.weights=oh=-1"], "synthesis.weights: the weight of 'oh' must be ≥ 0"),
    (["--set", "distill.rule=sgd"], "distill.rule must be one of plain, replay, lra"),
    (["--set", "distill.lra-order=zeroth-order"], "distill.lra-order must be one of"),
    (
        ["--set", "distill.rule=replay", "--set", "distill.memory-capacity=0"],
        "distill.memory-capacity must be ≥ 1 with distill.rule = 'replay'",
    ),
    (
        ["--set", "distill.rule=lra", "--set", "distill.memory-capacity=0"],
        "distill.memory-capacity must be ≥ 1 with distill.rule = 'lra'",
    ),
    (
        ["--set", "dfkd.teacher-checkpoint=/nonexistent/teacher.pt"],
        "dfkd.teacher-checkpoint: '/nonexistent/teacher.pt' does not exist",
    ),
    (["--set", "dfkd.student=vgg"], "dfkd.student: unknown model 'vgg'; valid:"),
    (["--set", "synthesis.preset=adi"], "'bn' needs a teacher with BatchNorm"),
    (["--set", "generator.name=feature"], "needs an input-space generator"),
    (["--set", "distill.lra-beta=-0.5"], "distill.lra-beta must be ≥ 0"),
    (["--set", "distill.replay-mode=epoch"], "distill.replay-mode must be one of samples, batch"),
    (["--set", "distill.lr-schedule=step"], "distill.lr-schedule must be one of constant, cosine"),
    (["--set", "synthesis.adv-metric=js10"], "synthesis.adv-metric must be one of"),
    (["--set", "dfkd.collapse-entropy=2"], "dfkd.collapse-entropy must be in [0, 1]"),
    (["--set", "distill.memory-push-epochs=-1"], "distill.memory-push-epochs must be ≥ 0"),
    (["--set", "dfkd.teacher-cache=/etc/hostname"], "dfkd.teacher-cache: '/etc/hostname' exists and is not a directory"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[b[1][:40] for b in BAD])
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "run"
    assert main(["dfkd", "--out", str(out), "--set", "dataset.name=digits", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not out.exists(), "no run directory for bad input"


def test_checkpoint_for_other_inputs_does_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], digits_teacher_ckpt: Path
) -> None:
    """A teacher trained on 8×8 digits offered for 28×28 mnist5k: one line, exit 2."""
    out = tmp_path / "run"
    assert (
        main(
            [
                "dfkd",
                "--out",
                str(out),
                "--set",
                "dataset.name=mnist5k",
                "--set",
                f"dfkd.teacher-checkpoint={digits_teacher_ckpt}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was trained on inputs (1, 8, 8)" in err and "(1, 28, 28)" in err
    # a bare state dict of the wrong shape, and a file that is no checkpoint at all
    bare = tmp_path / "bare.pt"
    torch.save(build_model("lenet5", (1, 8, 8), 10).state_dict(), bare)
    assert main(["dfkd", "--out", str(out), "--set", f"dfkd.teacher-checkpoint={bare}"]) == 2
    assert "does not fit 'lenet5' on 'mnist5k'" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert (
        main(["dfkd", "--out", str(out), "--set", "dataset.name=digits", "--set", f"dfkd.teacher-checkpoint={junk}"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load teacher checkpoint") and err.count("\n") == 1
    wrong_arch = [
        "--set",
        "dataset.name=digits",
        "--set",
        "dfkd.teacher=cnn",
        "--set",
        f"dfkd.teacher-checkpoint={digits_teacher_ckpt}",
    ]
    assert main(["dfkd", "--out", str(out), *wrong_arch]) == 2
    assert "holds a 'lenet5', but dfkd.teacher is 'cnn'" in capsys.readouterr().err
    assert not out.exists()


def test_end_to_end_lra_then_cached_teacher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = tmp_path / "a"
    assert _dfkd(first, "--set", "distill.rule=lra", "--set", "synthesis.preset=lra") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert sum(ln.startswith("epoch ") for ln in lines) == 2 and "teacher accuracy" in out
    assert [ln.split()[2] for ln in lines if ln.startswith("teacher epoch")] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    for name in ("config.toml", "metrics.jsonl", "summary.json", "accuracy.png", "samples.png"):
        assert (first / name).is_file(), name
    rows = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"accuracy", "loss", "g_loss", "g_oh", "g_ie", "g_act", "g_adv", "s_kd_loss", "s_ret_loss", "memory"} <= set(
        rows[0]
    )
    assert rows[-1]["memory"] > 0 and rows[-1]["s_ret_loss"] is not None
    summary = json.loads((first / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["teacher_source"] == "trained" and summary["teacher_accuracy"] > 0.5
    accs = [r["accuracy"] for r in rows]
    assert summary["student_final_accuracy"] == accs[-1] and summary["student_best_accuracy"] == max(accs)
    assert summary["mean_accuracy"] == pytest.approx(sum(accs) / 2)
    assert summary["var_accuracy"] == pytest.approx(((accs[0] - accs[1]) / 2) ** 2)
    cached = list(tmp_path.glob("teacher-digits-lenet5-*.pt"))
    assert len(cached) == 1
    assert torch.load(cached[0], weights_only=True)["arch"] == "lenet5"

    # the same teacher settings in the same parent: loaded from the cache, same accuracy
    second = tmp_path / "b"
    assert _dfkd(second, "--set", "distill.rule=plain") == 0
    again = json.loads((second / "summary.json").read_text())
    assert again["teacher_source"] == "cache" and again["teacher_accuracy"] == summary["teacher_accuracy"]
    # an existing run directory is refused
    assert _dfkd(second) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_same_seed_same_metrics_and_explicit_checkpoint(tmp_path: Path) -> None:
    short = ["--set", "distill.rule=replay", "--set", "dfkd.epochs=1", "--seed", "3"]
    assert _dfkd(tmp_path / "a", *short) == 0
    assert _dfkd(tmp_path / "b", *short) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "elapsed")} for r in rows]  # noqa: E731
    read = lambda d: strip([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()])  # noqa: E731
    assert read("a") == read("b")
    ckpt = next(tmp_path.glob("teacher-*.pt"))
    other = tmp_path / "elsewhere" / "c"
    assert _dfkd(other, "--set", f"dfkd.teacher-checkpoint={ckpt}", *short) == 0
    s = json.loads((other / "summary.json").read_text())
    assert s["teacher_source"] == "checkpoint"
    assert s["teacher_accuracy"] == json.loads((tmp_path / "a" / "summary.json").read_text())["teacher_accuracy"]
    assert not list(other.parent.glob("teacher-*.pt")), "an explicit checkpoint is not copied into a cache"


@pytest.mark.parametrize("sim", sorted(p.name for p in (REPO / "sims").glob("dfkd-*.toml")))
def test_shipped_sims_are_valid_documented_and_run(tmp_path: Path, sim: str) -> None:
    path = REPO / "sims" / sim
    text = path.read_text()
    assert text.startswith("#") and f"fedkd dfkd sims/{sim}" in text.split("\n\n")[0], "header comment with the command"
    cfg = load_config(path)
    # the BatchNorm-teacher recipe: the matrix's hardest pair, with the BN term named (not left to dfkd.bn-auto)
    pair = ("resnet8", "mlp") if sim == "dfkd-mnist5k-bn-teacher.toml" else ("lenet5", "lenet5-half")
    assert cfg.str("dataset.name") == "mnist5k" and (cfg.str("dfkd.teacher"), cfg.str("dfkd.student")) == pair
    if sim == "dfkd-mnist5k-bn-teacher.toml":
        assert cfg.str("synthesis.weights") == "bn=1" and cfg.float("synthesis.lr") == 1e-2
    assert set(tomllib.loads(text)) <= {"dfkd", "synthesis", "distill", "generator", "dataset", "seed", "device"}
    # end to end on the real config, shrunk to one iteration
    tiny = ["dfkd.epochs=1", "dfkd.iterations=1", "dfkd.teacher-epochs=1", "distill.steps=1", "synthesis.batch-size=16"]
    assert main(["dfkd", str(path), "--out", str(tmp_path / "run"), *_sets(tiny)]) == 0
    assert SUMMARY_KEYS <= set(json.loads((tmp_path / "run" / "summary.json").read_text()))


def test_fedkd_plot_redraws_a_dfkd_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "a"
    assert _dfkd(run, "--set", "dfkd.epochs=1") == 0
    capsys.readouterr()
    assert main(["plot", str(run)]) == 0
    assert "accuracy.png" in capsys.readouterr().out


def test_teacher_cache_is_shared_by_runs_that_name_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    assert _dfkd(tmp_path / "x" / "a", "--set", f"dfkd.teacher-cache={cache}") == 0
    assert "teacher epoch   5/5" in capsys.readouterr().out
    assert len(list(cache.glob("teacher-digits-lenet5-*.pt"))) == 1
    assert not list((tmp_path / "x").glob("teacher-*.pt")), "the cache is where the key says, not the parent"
    assert _dfkd(tmp_path / "y" / "b", "--set", f"dfkd.teacher-cache={cache}") == 0
    out = capsys.readouterr().out
    assert "teacher epoch" not in out and "(cache: " in out
    assert json.loads((tmp_path / "y" / "b" / "summary.json").read_text())["teacher_source"] == "cache"


def test_collapse_statistics_every_epoch_and_the_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _dfkd(tmp_path / "ok", "--set", "dfkd.collapse-entropy=0", "--set", "dfkd.collapse-diversity=0") == 0
    rows = [json.loads(x) for x in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["class_entropy"] <= 1 and r["diversity"] > 0 and r["collapse"] is False for r in rows)
    assert "WARNING" not in capsys.readouterr().out
    # a threshold no generator can pass: every epoch is flagged on its progress line and in the summary
    assert _dfkd(tmp_path / "flagged", "--set", "dfkd.collapse-diversity=1000") == 0
    out = capsys.readouterr().out
    epoch_lines = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all("WARNING: the generator may have collapsed" in ln for ln in epoch_lines)
    assert "WARNING: 2 epochs looked collapsed" in out.splitlines()[-1]
    assert json.loads((tmp_path / "flagged" / "summary.json").read_text())["collapse_epochs"] == 2


RESUMABLE = [*FAST, "dfkd.epochs=6", "dfkd.iterations=6", "distill.rule=lra", "distill.lr-schedule=cosine",
             "distill.replay-mode=batch", "distill.memory-push-epochs=2"]  # fmt: skip


def test_kill_9_then_resume_gives_the_uninterrupted_metrics(tmp_path: Path) -> None:
    """A real `fedkd dfkd` process killed with SIGKILL after an epoch's checkpoint, resumed from the CLI."""
    import os
    import signal
    import subprocess
    import sys
    import time

    fedkd = [sys.executable, "-m", "fedkd.cli", "dfkd"]
    sets = [*_sets(RESUMABLE), "--set", f"dfkd.teacher-cache={tmp_path / 'cache'}"]
    ref = subprocess.run([*fedkd, "--out", str(tmp_path / "ref"), *sets], cwd=REPO, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert ref.returncode == 0, ref.stderr
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*fedkd, "--out", str(cut), *sets], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (cut / "checkpoint-00003.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (cut / "summary.json").exists()
    # an option beside --resume is refused, before anything is touched
    bad = subprocess.run([*fedkd, "--resume", str(cut), "--seed", "2"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --resume takes the run's own config")
    res = subprocess.run([*fedkd, "--resume", str(cut)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stdout and "teacher epoch" not in res.stdout, "the cached teacher is reused"
    strip = lambda d: [{k: v for k, v in json.loads(x).items() if k not in ("seconds", "elapsed")}  # noqa: E731
                       for x in (d / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    want, got = strip(tmp_path / "ref"), strip(cut)
    assert len(got) == 6 and got == want
    assert max(r["memory"] for r in got) > 0, "the memory was restored and kept filling"
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["resumed"] is True
    assert summary["student_final_accuracy"] == json.loads((tmp_path / "ref" / "summary.json").read_text())[
        "student_final_accuracy"
    ]
    again = subprocess.run([*fedkd, "--resume", str(cut)], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and "already finished" in again.stderr


@pytest.mark.parametrize(
    ("teacher", "extra", "expect_bn"),
    [
        ("resnet8", [], True),  # a BatchNorm teacher under the default dfad preset: the BN term is added
        ("resnet8", ["dfkd.bn-auto=false"], False),
        ("resnet8", ["synthesis.weights=bn=0"], False),  # an explicit weight is kept
        ("resnet8", ["synthesis.weights=bn=3"], False),  # named by the user: not "added", weight kept
        ("lenet5", [], False),  # no BatchNorm layer: nothing to match
    ],
)
def test_bn_auto_adds_the_bn_term_for_batchnorm_teachers(teacher: str, extra: list[str], expect_bn: bool) -> None:
    from fedkd.dfkd import prepare

    plan = prepare(load_config(None, [*FAST, f"dfkd.teacher={teacher}", *extra]))
    active = plan.synthesizer.objective.active
    assert plan.bn_auto is expect_bn
    assert active.get("bn", 0.0) == (1.0 if expect_bn else 3.0 if "synthesis.weights=bn=3" in extra else 0.0)
    assert active["adv"] == 1.0  # the preset's own terms are untouched


def test_bn_auto_is_in_the_start_line_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _dfkd(tmp_path / "r", "--set", "dfkd.teacher=resnet8", "--set", "dfkd.teacher-epochs=1") == 0
    assert "+ bn (BatchNorm teacher, dfkd.bn-auto)" in capsys.readouterr().out.splitlines()[0]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["bn_auto"] is True and summary["generator_terms"] == {"bn": 1.0, "adv": 1.0}
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["g_bn"] > 0 for r in rows)  # the term really enters the generator loss
