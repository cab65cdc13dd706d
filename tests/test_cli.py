"""CLI contract: bad input gives one line on stderr and exit 2, and never touches an existing run."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from fedkd.cli import main
from tests.conftest import REPO, TINY

BAD = [
    # (description, argv after "run", expected fragment)
    ("unknown strategy", ["--set", "strategy.name=fedfoo"], "unknown strategy 'fedfoo'; valid: "),
    ("unknown model", ["--set", "clients.architectures=vgg19"], "unknown model 'vgg19'; valid: "),
    ("unknown global model", ["--set", "global.architecture=vgg19"], "unknown model 'vgg19'"),
    ("unknown dataset", ["--set", "dataset.name=imagenet"], "unknown dataset 'imagenet'; valid: "),
    ("unknown partitioner", ["--set", "partition.name=zipf"], "unknown partitioner 'zipf'; valid: "),
    ("alpha zero", ["--set", "partition.dirichlet.alpha=0"], "partition.dirichlet.alpha must be > 0"),
    ("alpha negative", ["--set", "partition.dirichlet.alpha=-0.5"], "partition.dirichlet.alpha must be > 0"),
    ("more clients than samples", ["--set", "clients.num=5000", "--set", "clients.architectures=mlp"],
     "more clients (5000) than training samples (4000)"),
    ("partition leaves a client empty",
     ["--set", "dataset.name=digits", "--set", "clients.num=1400", "--set", "clients.architectures=mlp",
      "--set", "partition.name=pathological", "--set", "partition.pathological.classes-per-client=1"],
     "leaves client"),
    ("architecture string", ["--set", "clients.architectures=cnn:4,lenet5"], "clients.architectures: cannot parse 'lenet5'"),
    ("architecture counts", ["--set", "clients.architectures=cnn:4,lenet5:3"], "assigns 7 clients but clients.num is 10"),
    ("unknown key", ["--set", "clients.lrr=0.1"], "unknown config key 'clients.lrr'; did you mean 'clients.lr'?"),
    ("unknown plug-in key", ["--set", "strategy.fedprox.mu=0.1"], "strategy 'fedprox' takes: strategy.fedprox.proximal-mu"),
    ("wrong type", ["--set", "rounds=ten"], "rounds must be an integer"),
    ("missing dataset root", ["--set", "dataset.name=cifar10"], "set dataset.root"),
    ("dataset root does not exist", ["--set", "dataset.name=mnist", "--set", "dataset.root=/no/such/dir"],
     "dataset.root '/no/such/dir' does not exist"),
    ("global arch without clients", ["--set", "strategy.name=fedavg", "--set", "global.architecture=resnet8"],
     "global.architecture 'resnet8' has no clients"),  # FedDF (the quickstart's) can train a clientless global
    ("bad --set", ["--set", "rounds"], "--set expects KEY=VALUE"),
    ("bad engine flag", ["--engine", "spark"], "invalid choice: 'spark'"),
    ("bad seed flag", ["--seed", "x"], "invalid int value: 'x'"),
    ("missing sim file", ["no/such/sim.toml"], "sim file 'no/such/sim.toml' does not exist"),
]  # fmt: skip


def _check_one_line(capsys, code: int, fragment: str) -> None:
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize(("what", "argv", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_line_exit_2(tmp_path, capsys, what, argv, fragment):
    out = tmp_path / "out"
    code = main(["run", *argv, "--out", str(out)])
    _check_one_line(capsys, code, fragment)
    assert not out.exists(), "no run directory is created for bad input"


def test_invalid_toml_sim(tmp_path, capsys):
    sim = tmp_path / "bad.toml"
    sim.write_text("[clients\nnum = 3")
    _check_one_line(capsys, main(["run", str(sim), "--out", str(tmp_path / "o")]), "invalid TOML")


def _digest(d) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_existing_run_directory_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    sets = [a for s in TINY for a in ("--set", s)]
    assert main(["run", *sets, "--out", str(out)]) == 0
    before = _digest(out)
    capsys.readouterr()
    _check_one_line(capsys, main(["run", *sets, "--out", str(out)]), "already holds a run")
    assert _digest(out) == before


def test_non_empty_directory_is_refused(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    _check_one_line(capsys, main(["run", "--out", str(tmp_path / "x")]), "is not empty")
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


def test_plot_bad_dir(tmp_path, capsys):
    _check_one_line(capsys, main(["plot", str(tmp_path / "nope")]), "does not exist")
    (tmp_path / "empty").mkdir()
    _check_one_line(capsys, main(["plot", str(tmp_path / "empty")]), "is not a run directory")


def test_unknown_command_and_no_command(capsys):
    _check_one_line(capsys, main(["frobnicate"]), "invalid choice")
    _check_one_line(capsys, main([]), "required")


def test_list_shows_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for title in ("strategies:", "generators:", "models:", "datasets:", "partitioners:"):
        assert title in out
    assert "fedprox" in out and "mnist5k" in out and "dirichlet" in out and "resnet8" in out
    assert main(["list", "--keys"]) == 0
    keys = capsys.readouterr().out
    assert "strategy.fedprox.proximal-mu = 0.0" in keys and "clients.num = 10" in keys


def test_console_script_exit_code(tmp_path):
    """The installed `fedkd` entry point, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "fedkd.cli", "run", "--set", "partition.dirichlet.alpha=0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: partition.dirichlet.alpha must be > 0, got 0.0"]
