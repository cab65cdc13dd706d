"""Every faithful recipe in sims/papers/ runs end to end (shrunk to seconds), and its header names its source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedkd.cli import main
from fedkd.config import load_config

PAPERS = sorted((Path(__file__).resolve().parents[1] / "sims" / "papers").glob("*.toml"))
SHRINK = {
    "fedftg": ["strategy.fedftg.iterations=1"],
    "fedgen": ["strategy.fedgen.gen-steps=2"],
    "feddf": ["strategy.feddf.gen-steps=2", "strategy.feddf.student-steps=2"],
    "dense": ["strategy.dense.iterations=2", "clients.local-epochs=1"],
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
    out = tmp_path / path.stem
    argv = ["run", str(path), "--out", str(out)] + [x for s in sets for x in ("--set", s)]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == (1 if one_shot else 2) and all(0 <= r["accuracy"] <= 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert {"top5_accuracy", "last5_accuracy"} <= set(summary)
