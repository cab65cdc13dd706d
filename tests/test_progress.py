"""Progress and output modes (issue 11 item 4): server distillation reports while it runs; --json
prints one JSON object per line; --quiet only the final line."""

from __future__ import annotations

import json

import pytest

from fedkd import progress
from fedkd.cli import main

TINY = ["rounds=2", "clients.num=4", "clients.architectures=mlp", "clients.local-steps=5", "partition.name=iid",
        "dataset.name=digits", "clients.threads=1"]  # fmt: skip


def _argv(out, *extra: str) -> list[str]:
    return ["run", "--out", str(out), *[a for s in TINY for a in ("--set", s)], *extra]


@pytest.fixture
def every_tick(monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL", 0.0)
    yield
    progress.set_reporter(None)


def test_server_distillation_reports_progress_lines(tmp_path, capsys, every_tick):
    assert main(_argv(tmp_path / "r", "--set", "strategy.name=fedftg", "--set", "strategy.fedftg.iterations=3")) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  server distillation")]
    assert len(lines) >= 4 and any("3/3" in ln for ln in lines), lines
    assert all("s" in ln.split()[-1] for ln in lines)


def test_json_mode_prints_only_json_objects_with_events(tmp_path, capsys, every_tick):
    assert main(_argv(tmp_path / "r", "--json", "--set", "strategy.name=fedftg", "--set", "strategy.fedftg.iterations=2")) == 0
    events = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("round") == 2 and "progress" in kinds
    done = events[-1]
    assert done["final_accuracy"] == json.loads((tmp_path / "r" / "summary.json").read_text())["final_accuracy"]


def test_quiet_mode_prints_the_final_line_only(tmp_path, capsys, every_tick):
    assert main(_argv(tmp_path / "r", "--quiet", "--set", "strategy.name=fedftg", "--set", "strategy.fedftg.iterations=2")) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("done in ")
    assert main(_argv(tmp_path / "x", "--quiet", "--json")) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_dfkd_json_has_teacher_epochs_and_epochs(tmp_path, capsys):
    sets = ["dataset.name=digits", "dfkd.threads=1", "dfkd.epochs=2", "dfkd.iterations=1", "dfkd.teacher-epochs=2",
            "distill.steps=1", "synthesis.batch-size=16", "generator.image.base-channels=4"]  # fmt: skip
    assert main(["dfkd", "--out", str(tmp_path / "d"), "--json", *[a for s in sets for a in ("--set", s)]]) == 0
    kinds = [json.loads(ln)["event"] for ln in capsys.readouterr().out.splitlines()]
    assert kinds == ["start", "teacher-epoch", "teacher-epoch", "teacher", "epoch", "epoch", "done"]


# --------------------------------------------------------------------------- TensorBoard (issue 11 item 7)


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_has_every_round_metric(tmp_path):
    assert main(_argv(tmp_path / "r", "--set", "log.tensorboard=true", "--set", "strategy.name=fedftg",
                      "--set", "strategy.fedftg.iterations=1")) == 0  # fmt: skip
    acc = _scalars(tmp_path / "r" / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    assert {"accuracy", "loss", "kd_loss", "g_loss", "group_accuracy/mlp"} <= tags
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in acc.Scalars("accuracy")] == [1, 2]
    assert [round(e.value, 6) for e in acc.Scalars("accuracy")] == [round(r["accuracy"], 6) for r in rows]


def test_tensorboard_dfkd_scalars_and_sample_grids(tmp_path):
    sets = ["dataset.name=digits", "dfkd.threads=1", "dfkd.epochs=2", "dfkd.iterations=1", "dfkd.teacher-epochs=1",
            "distill.steps=1", "synthesis.batch-size=16", "generator.image.base-channels=4", "log.tensorboard=true"]  # fmt: skip
    assert main(["dfkd", "--out", str(tmp_path / "d"), *[a for s in sets for a in ("--set", s)]]) == 0
    acc = _scalars(tmp_path / "d" / "tensorboard")
    assert {"accuracy", "class_entropy", "diversity", "s_kd_loss"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Images("samples")] == [1, 2]


def test_tensorboard_missing_is_one_error_line(tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert main(_argv(tmp_path / "r", "--set", "log.tensorboard=true")) == 2
    err = capsys.readouterr().err
    assert err == "error: log.tensorboard = true needs the tensorboard package: pip install 'fedkd[tensorboard]'\n"
    assert not (tmp_path / "r").exists()
