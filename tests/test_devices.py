"""Where clients train (``clients.device``, issue 12): the rules, the handshake, and a real run."""

from __future__ import annotations

import json

import pytest
import torch

from fedkd import records
from fedkd.cli import device_plan, main
from fedkd.client_app import client_device
from fedkd.config import load_config
from fedkd.errors import ConfigError
from fedkd.models import build_model
from fedkd.train import LocalTrainConfig, train_local

CUDA = torch.cuda.is_available()
LOCAL = {records.PARTITION_ID: 0, records.ENGINE: "local"}


def cfg(*sets: str):
    return load_config(None, list(sets))


@pytest.mark.parametrize(
    ("sets", "node_config", "expected"),
    [
        (["clients.device=cpu"], LOCAL, "cpu"),
        (["device=cpu"], LOCAL, "cpu"),  # the local engine's clients share the server's device
        (["engine=ray", "ray.num-gpus=0"], {records.PARTITION_ID: 0}, "cpu"),  # no GPU share: cpu
        (["clients.device=cuda:0"], {records.PARTITION_ID: 0, records.DEVICE: "cpu"}, "cpu"),  # SuperNode wins
        ([], {records.PARTITION_ID: 0}, "cuda" if CUDA else "cpu"),  # a SuperNode with auto
    ],
)
def test_client_device_rules(sets, node_config, expected):
    assert client_device(cfg(*sets), node_config).type == expected


def test_local_engine_clients_follow_the_server_device_when_auto():
    server = "cuda" if CUDA else "cpu"
    assert client_device(cfg(), LOCAL).type == server


def test_a_bad_node_config_device_names_the_node_config():
    with pytest.raises(ConfigError, match="node config 'device' must be auto, cpu, cuda or cuda:N"):
        client_device(cfg(), {records.PARTITION_ID: 0, records.DEVICE: "tpu"})


def test_device_plan_says_where_each_side_computes():
    plan = device_plan(cfg("device=cpu", "clients.device=cpu"))
    assert plan == "server cpu, clients cpu"
    ray = device_plan(cfg("device=cpu", "engine=ray"))
    assert "clients cpu (ray.num-gpus = 0)" in ray
    if not CUDA:
        assert device_plan(cfg()).endswith("(auto: no CUDA GPU)")


def test_a_local_run_reports_its_client_devices(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), "--set", "clients.device=cpu"] + [a for s in tiny for a in ("--set", s)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["client_devices"] == {"cpu": 4}
    assert "clients cpu" in capsys.readouterr().out


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_training_on_cuda_matches_cpu():
    """The same local update on cuda and on cpu: same steps, same batches (float tolerance)."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    local = LocalTrainConfig(lr=0.05, batch_size=16, steps=8)
    models = {}
    for dev in ("cpu", "cuda"):
        torch.manual_seed(1)
        m = build_model("cnn", (1, 28, 28), 10)
        train_local(m, x, y, local, seed=3, device=torch.device(dev))
        assert next(m.parameters()).device.type == dev
        models[dev] = m.cpu().state_dict()
    for k, v in models["cpu"].items():
        torch.testing.assert_close(models["cuda"][k], v, rtol=1e-3, atol=1e-4)
