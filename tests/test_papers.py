"""Every faithful recipe in sims/papers/ runs end to end (shrunk to seconds), and its header names its source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedkd.cli import main
from fedkd.config import load_config

ALL = sorted((Path(__file__).resolve().parents[1] / "sims" / "papers").glob("*.toml"))
DFKD = [p for p in ALL if p.stem.endswith("-dfkd")]  # centralized recipes, run by `fedkd dfkd`
PAPERS = [p for p in ALL if p not in DFKD]
SHRINK = {
    "fedftg": ["strategy.fedftg.iterations=1"],
    "fedgen": ["strategy.fedgen.gen-steps=2"],
    "feddf": ["strategy.feddf.gen-steps=2", "strategy.feddf.student-steps=2"],
    "dense": ["strategy.dense.iterations=2", "clients.local-epochs=1"],
    "scaffold": [],
    "feddyn": [],
    "moon": [],
    "fednova": [],
    "fml": [],
    "fedkd": [],
    "fedgh": [],
    "finetune": ["tasks.classes-per-task=5", "tasks.rounds-per-task=1"],  # 2 tasks of 1 round
}


def test_there_is_a_recipe_per_method():
    assert {load_config(p).str("strategy.name") for p in PAPERS} >= set(SHRINK)


@pytest.mark.parametrize("path", PAPERS, ids=[p.stem for p in PAPERS])
def test_recipe_runs_end_to_end(tmp_path, path):
    header = path.read_text(encoding="utf-8").split("\n\n")[0]
    assert "Official code:" in path.read_text(encoding="utf-8") and "Deviations" in path.read_text(encoding="utf-8")
    assert header.startswith("#")
    cfg = load_config(path)
    name = cfg.str("strategy.name")
    one_shot = cfg.int("rounds") == 1
    sets = [f"rounds={1 if one_shot else 2}", f"clients.num={cfg.int('clients.num') if one_shot else 4}",
            "clients.fraction=1.0", "clients.local-steps=5", *SHRINK[name]]  # fmt: skip
    archs = [item.split(":")[0].strip() for item in cfg.str("clients.architectures").split(",")]
    if not one_shot and len(archs) > 1:  # the same architectures over the 4 clients
        counts = [sum(1 for i in range(4) if i % len(archs) == j) for j in range(len(archs))]
        sets.append("clients.architectures=" + ",".join(f"{a}:{c}" for a, c in zip(archs, counts, strict=True) if c))
    out = tmp_path / path.stem
    argv = ["run", str(path), "--out", str(out)] + [x for s in sets for x in ("--set", s)]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == (1 if one_shot else 2) and all(0 <= r["accuracy"] <= 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert {"top5_accuracy", "last5_accuracy"} <= set(summary)


@pytest.mark.parametrize("path", DFKD, ids=[p.stem for p in DFKD])
def test_dfkd_recipe_runs_end_to_end(tmp_path, path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#") and "Official code:" in text and "Deviations" in text
    assert f"fedkd dfkd sims/papers/{path.name}" in text.split("\n\n")[0]
    sets = ["dataset.name=digits", "dfkd.epochs=2", "dfkd.iterations=2", "dfkd.teacher-epochs=2",
            "distill.steps=2", "synthesis.batch-size=32", "distill.memory-push-epochs=1"]  # fmt: skip
    out = tmp_path / path.stem
    assert main(["dfkd", str(path), "--out", str(out)] + [x for s in sets for x in ("--set", s)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["memory"] > 0
    assert rows[1]["lr"] < rows[0]["lr"], "cosine schedule"
