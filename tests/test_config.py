from __future__ import annotations

import tomllib

import pytest

from fedkd.config import (
    CORE_KEYS,
    Config,
    declared_defaults,
    flatten,
    load_config,
    nest,
    parse_override,
)
from fedkd.errors import ConfigError
from tests.conftest import REPO


def test_defaults_are_complete_and_valid():
    cfg = load_config()
    for key in CORE_KEYS:
        assert cfg[key.name] == key.default
    assert cfg.str("strategy.name") == "fedavg"


def test_pyproject_flwr_config_is_in_sync_with_declarations():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = flatten(data["tool"]["flwr"]["app"]["config"])
    assert declared == declared_defaults(), "run `python -m fedkd.config --pyproject` to regenerate"


def test_sim_file_then_set_then_seed(tmp_path):
    sim = tmp_path / "s.toml"
    sim.write_text("rounds = 3\n[clients]\nnum = 5\n[partition.dirichlet]\nalpha = 0.3\n")
    cfg = load_config(sim, ["rounds=7", "strategy.name=fedprox", "strategy.fedprox.proximal-mu=0.01"], seed=9)
    assert (cfg.int("rounds"), cfg.int("clients.num"), cfg.int("seed")) == (7, 5, 9)
    assert cfg.plugin_kwargs("partition", "dirichlet")["alpha"] == 0.3
    assert cfg.plugin_kwargs("strategy", "fedprox") == {"proximal_mu": 0.01}


def test_parse_override_types():
    assert parse_override("a=3") == ("a", 3)
    assert parse_override("a=0.5") == ("a", 0.5)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=fedprox") == ("a", "fedprox")
    assert parse_override('a="3"') == ("a", "3")
    assert parse_override("a=cnn:4,lenet5:6") == ("a", "cnn:4,lenet5:6")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("clients.nmu=3", r"unknown config key 'clients.nmu'; did you mean 'clients.num'\?"),
        ("rounds=abc", r"rounds must be an integer, got 'abc'"),
        ("rounds=0", r"rounds must be ≥ 1, got 0"),
        ("clients.fraction=1.5", r"clients.fraction must be in \(0, 1\]"),
        ("engine=spark", r"engine must be one of local, ray"),
        ("strategy.name=fedfoo", r"unknown strategy 'fedfoo'; valid: .*fedavg"),
        (
            "partition.dirichlet.beta=1",
            r"unknown config key 'partition.dirichlet.beta'; partitioner 'dirichlet' takes: .*alpha",
        ),
        ("partition.nope.alpha=1", r"unknown partitioner 'nope' in config key"),
        ("partition.dirichlet.alpha=yes", r"partition.dirichlet.alpha must be a number"),
        ("strategy.fedprox.proximal-mu=x", r"strategy.fedprox.proximal-mu must be a number"),
        ("dataset.download=1", r"dataset.download must be a boolean"),
        ("noequals", r"--set expects KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_invalid_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_toml_roundtrip_and_nesting():
    cfg = load_config(None, ["clients.num=3", "partition.dirichlet.alpha=0.2"])
    again = Config.from_toml(cfg.to_toml())
    assert again.resolved() == cfg.resolved() and dict(cfg).items() <= dict(again).items()
    assert again.float("partition.dirichlet.alpha") == 0.2
    assert flatten(nest({"a.b.c": 1, "a.d": 2, "e": 3})) == {"a.b.c": 1, "a.d": 2, "e": 3}


def test_shipped_sims_are_valid():
    for sim in sorted((REPO / "sims").glob("**/*.toml")):
        if sim.name.startswith("dfkd-"):
            continue  # checked by the dfkd tests
        load_config(sim)
