"""Per-client evaluation: each client's own test split (``partition.test-fraction``), scored
by federated evaluation, in metrics.jsonl, summary.json, the progress line and compare."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedkd import records
from fedkd.cli import main
from fedkd.config import load_config
from fedkd.data.partition import holdout


@pytest.mark.parametrize(("n", "fraction", "k"), [(100, 0.25, 25), (3, 0.1, 1), (2, 0.9, 1), (1, 0.5, 0), (40, 0.0, 0)])
def test_holdout_is_a_seeded_disjoint_split_that_never_takes_everything(n, fraction, k):
    idx = np.arange(1000, 1000 + n) * 3
    train, test = holdout(idx, fraction, seed=7, pid=2)
    assert len(test) == k and len(train) == n - k
    assert sorted([*train, *test]) == sorted(idx) and not set(train) & set(test)
    again = holdout(idx, fraction, seed=7, pid=2)
    assert np.array_equal(again[1], test)
    if k and n > 3:
        assert not np.array_equal(holdout(idx, fraction, seed=7, pid=3)[1], test)  # per client
        assert not np.array_equal(holdout(idx, fraction, seed=8, pid=2)[1], test)  # per seed


def test_clients_train_on_the_rest_and_report_its_label_counts():
    from fedkd.client_app import client_partition, client_test_split

    base = ["clients.num=4", "partition.name=dirichlet"]
    full_x, full_y, _ = client_partition(load_config(None, base), 1)
    cfg = load_config(None, [*base, "partition.test-fraction=0.2"])
    x, y, counts = client_partition(cfg, 1)
    tx, ty = client_test_split(cfg, 1)
    assert len(x) + len(tx) == len(full_x) and len(tx) == round(0.2 * len(full_x))
    assert sum(counts) == len(x) and counts == torch.bincount(y, minlength=10).tolist()
    seen = {r.numpy().tobytes() for r in x}
    assert not any(r.numpy().tobytes() in seen for r in tx)  # held out, not trained on
    assert client_test_split(load_config(None, base), 1) is None


SETS = ["rounds=2", "clients.num=5", "clients.architectures=mlp", "clients.local-steps=5", "partition.name=dirichlet",
        "strategy.name=fedavg", "clients.threads=1", "partition.test-fraction=0.25", "eval.fraction=1"]  # fmt: skip


def test_federated_evaluation_scores_the_model_on_each_clients_test_split(tmp_path, capsys):
    from fedkd import checkpoint
    from fedkd.client_app import client_model, client_test_split
    from fedkd.train import evaluate

    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *[a for s in SETS for a in ("--set", s)]]) == 0
    assert "clients 0." in capsys.readouterr().out  # the progress line shows the clients' mean
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        accs = r["client_accuracy"]
        assert sorted(accs, key=int) == ["0", "1", "2", "3", "4"]
        assert r["client_accuracy_mean"] == pytest.approx(np.mean(list(accs.values())))
        assert r["client_accuracy_min"] == min(accs.values()) <= r["client_accuracy_p10"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_client_accuracy"] == pytest.approx(rows[-1]["client_accuracy_mean"])
    # the last round's accuracies are the final global model on each client's own test split
    cfg = load_config(out / "config.toml")
    (ck,) = checkpoint.checkpoints(out)
    arrays = records.unpack(checkpoint.from_tree(checkpoint.read(ck)["arrays"]), "mlp")
    for pid in range(5):
        model = client_model(cfg, pid)
        records.load_record(model, arrays)
        x, y = client_test_split(cfg, pid)
        _, acc = evaluate(model, x, y, 500, torch.device("cpu"))
        assert rows[-1]["client_accuracy"][str(pid)] == pytest.approx(acc, abs=1e-6)


def test_compare_shows_the_client_column_only_when_a_run_has_it():
    from fedkd.compare import summarize, to_markdown

    plain = {"final_accuracy": 0.5, "best_accuracy": 0.5, "wall_seconds": 1.0, "bytes_up": 1, "bytes_down": 1}
    assert "client acc" not in to_markdown(summarize({"a": [plain]}), "cmd")
    md = to_markdown(summarize({"a": [plain], "b": [{**plain, "final_client_accuracy": 0.4}]}), "cmd")
    assert "client acc (final)" in md and "| 40.00 |" in md
