"""Bad input, end to end: every malformed input fails before any training starts.

Each row of :data:`ROWS` is one malformed input. For every row:

* the exit code is 2;
* stderr is exactly one non-empty line, starting with ``error:`` and containing the expected
  fragment (a string, or a compiled regex where the message depends on the environment);
* no ``Traceback`` appears on stdout or stderr;
* nothing under the test's workspace changed: the pre-existing run directory (and every other
  fixture file) is byte-for-byte unchanged, and no new file or directory (no run directory,
  no ``--out`` target) was created.

Rows are ``pytest.param(argv, fragment, id=...)``. ``argv`` may use the placeholders
``{ws}`` (the workspace, holding the fixture files built by :func:`_build_workspace`),
``{run}`` (the pre-existing run directory), ``{new}`` (an ``--out`` path that must not exist
afterwards) and ``{sim}`` (a valid sim file with the TINY settings). ``T`` expands to the TINY
settings of ``tests/conftest.py`` as ``--set`` flags, the valid baseline. To add a row, append a
``pytest.param`` to :data:`ROWS` (and any file it needs to :func:`_build_workspace`).

A few rows also go through the real ``fedkd`` console script in a subprocess
(:data:`SUBPROCESS_IDS`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedkd.cli import main
from tests.conftest import TINY

# The TINY settings as --set flags: the valid baseline of config rows.
T = [a for s in TINY for a in ("--set", s)]
NEW = ["--out", "{new}"]
RUN = ["run", *T]  # a valid `fedkd run` up to the flag under test
DIR = ["--set", "partition.name=dirichlet"]
KD = ["--set", "rounds=1"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# An empty or corrupt torchvision root: which one-line error depends on whether torchvision imports here.
TV_ROOT = re.compile(r"torchvision (is not installed|cannot be imported)|cannot load 'mnist' from dataset\.root")


def _sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


ROWS = [
    # ---------------------------------------------------------------- config keys
    pytest.param([*RUN, "--set", "clients.lrr=0.1", *NEW], "unknown config key 'clients.lrr'; did you mean 'clients.lr'?",
                 id="key-typo-suggests"),
    pytest.param([*RUN, "--set", "roundz=3", *NEW], "unknown config key 'roundz'; did you mean 'rounds'?", id="key-typo-top-level"),
    pytest.param([*RUN, "--set", "frobnicate.level=3", *NEW], "unknown config key 'frobnicate.level'", id="key-unknown"),
    pytest.param([*RUN, "--set", "strategy.fedfoo.mu=1", *NEW], "unknown strategy 'fedfoo' in config key 'strategy.fedfoo.mu'; valid:",
                 id="key-unknown-plugin-name"),
    pytest.param([*RUN, "--set", "partition.zipf.s=1.1", *NEW], "unknown partitioner 'zipf' in config key", id="key-unknown-partitioner-name"),
    pytest.param([*RUN, "--set", "strategy.fedprox.mu=0.1", *NEW], "strategy 'fedprox' takes: strategy.fedprox.proximal-mu",
                 id="key-unknown-plugin-param"),
    pytest.param([*RUN, "--set", "partition.iid.alpha=1", *NEW], "partitioner 'iid' takes: none", id="key-param-of-paramless-plugin"),
    pytest.param(["dfkd", "--set", "generator.image.depth=3", *NEW], "unknown config key 'generator.image.depth'; generator 'image' takes:",
                 id="key-unknown-generator-param"),
    pytest.param(["run", "{ws}/sim-unknown-key.toml", *T, *NEW], "unknown config key 'clients.numm'; did you mean 'clients.num'?",
                 id="key-unknown-in-sim-file"),
    # ---------------------------------------------------------------- values and types
    pytest.param([*RUN, "--set", "rounds=ten", *NEW], "rounds must be an integer, got 'ten'", id="type-word-for-int"),
    pytest.param([*RUN, "--set", "rounds=1.5", *NEW], "rounds must be an integer, got 1.5", id="type-float-for-int"),
    pytest.param([*RUN, "--set", "clients.lr=true", *NEW], "clients.lr must be a number, got True", id="type-bool-for-float"),
    pytest.param([*RUN, "--set", "dataset.download=yes", *NEW], "dataset.download must be a boolean", id="type-word-for-bool"),
    pytest.param([*RUN, "--set", "clients.architectures=3", *NEW], "clients.architectures must be a string, got 3",
                 id="type-int-for-string"),
    pytest.param([*RUN, "--set", "strategy.fedprox.proximal-mu=abc", *NEW], "strategy.fedprox.proximal-mu must be a number",
                 id="type-plugin-param"),
    pytest.param([*RUN, "--set", "rounds=[1, 2]", *NEW], "--set rounds: only scalar values are allowed", id="type-list-value"),
    pytest.param([*RUN, "--set", "rounds=0", *NEW], "rounds must be ≥ 1, got 0", id="range-rounds-zero"),
    pytest.param([*RUN, "--set", "clients.num=0", *NEW], "clients.num must be ≥ 1, got 0", id="range-clients-zero"),
    pytest.param([*RUN, "--set", "clients.lr=-0.1", *NEW], "clients.lr must be > 0, got -0.1", id="range-negative-lr"),
    pytest.param([*RUN, "--set", "clients.momentum=1", *NEW], "clients.momentum must be in [0, 1)", id="range-momentum-one"),
    pytest.param([*RUN, "--set", "clients.fraction=1.5", *NEW], "clients.fraction must be in (0, 1], got 1.5", id="range-fraction-above-1"),
    pytest.param([*RUN, "--set", "clients.fraction=0", *NEW], "clients.fraction must be in (0, 1], got 0.0", id="range-fraction-zero"),
    pytest.param([*RUN, "--set", "eval.fraction=-0.5", *NEW], "eval.fraction must be in [0, 1]", id="range-eval-fraction"),
    pytest.param([*RUN, "--set", "partition.test-fraction=1", *NEW], "partition.test-fraction must be in [0, 1)",
                 id="range-test-fraction"),
    pytest.param([*RUN, "--set", "model.feature-dim=-1", *NEW], "model.feature-dim must be ≥ 0, got -1", id="range-feature-dim"),
    pytest.param([*RUN, "--set", "clients.num=5000", *NEW], "more clients (5000) than training samples (4000)",
                 id="range-more-clients-than-samples"),
    pytest.param([*RUN, "--set", "clients.lr=nan", *NEW], "clients.lr must be finite, got nan", id="nonfinite-nan"),
    pytest.param([*RUN, "--set", "clients.lr=inf", *NEW], "clients.lr must be finite, got inf", id="nonfinite-inf"),
    pytest.param([*RUN, "--set", "round-timeout=1e400", *NEW], "round-timeout must be finite", id="nonfinite-overflow"),
    pytest.param([*RUN, "--set", "strategy.fedprox.proximal-mu=nan", *NEW], "strategy.fedprox.proximal-mu must be finite",
                 id="nonfinite-plugin-param"),
    pytest.param([*RUN, *DIR, "--set", "partition.dirichlet.alpha=inf", *NEW], "partition.dirichlet.alpha must be finite",
                 id="nonfinite-dirichlet-alpha"),
    pytest.param([*RUN, "--set", "engine=spark", *NEW], "engine must be one of local, ray; got 'spark'", id="choice-engine-key"),
    pytest.param([*RUN, "--set", "device=tpu", *NEW], "device must be auto, cpu, cuda or cuda:N, got 'tpu'", id="choice-device"),
    pytest.param([*RUN, "--set", "strategy.name=fedfoo", *NEW], "unknown strategy 'fedfoo'; valid: ", id="choice-strategy"),
    pytest.param([*RUN, "--set", "dataset.name=imagenet", *NEW], "unknown dataset 'imagenet'; valid: ", id="choice-dataset"),
    pytest.param([*RUN, "--set", "partition.name=zipf", *NEW], "unknown partitioner 'zipf'; valid: ", id="choice-partitioner"),
    pytest.param([*RUN, "--set", "clients.architectures=vgg19", *NEW], "unknown model 'vgg19'; valid: ", id="arch-unknown-model"),
    pytest.param([*RUN, "--set", "clients.architectures=mlp:2,lenet5", *NEW], "clients.architectures: cannot parse 'lenet5'",
                 id="arch-missing-count"),
    pytest.param([*RUN, "--set", "clients.architectures=mlp:4,cnn:0", *NEW], "clients.architectures: cannot parse 'cnn:0'",
                 id="arch-zero-count"),
    pytest.param([*RUN, "--set", "clients.architectures=mlp:x", *NEW], "clients.architectures: cannot parse 'mlp:x'", id="arch-bad-count"),
    pytest.param([*RUN, "--set", "clients.architectures= ", *NEW], "clients.architectures is empty", id="arch-empty"),
    pytest.param([*RUN, "--set", "clients.architectures=mlp:2,cnn:1", *NEW], "assigns 3 clients but clients.num is 4",
                 id="arch-count-mismatch"),
    pytest.param([*RUN, "--set", "clients.architectures=mlp:2,vgg:2", *NEW], "unknown model 'vgg'", id="arch-unknown-in-list"),
    pytest.param([*RUN, "--set", "global.architecture=vgg19", *NEW], "unknown model 'vgg19'", id="global-arch-unknown"),
    pytest.param([*RUN, "--set", "global.architecture=lenet5", *NEW], "global.architecture 'lenet5' has no clients",
                 id="global-arch-without-clients"),
    pytest.param([*RUN, *DIR, "--set", "partition.dirichlet.alpha=0", *NEW], "partition.dirichlet.alpha must be > 0, got 0.0",
                 id="dirichlet-alpha-zero"),
    pytest.param([*RUN, *DIR, "--set", "partition.dirichlet.alpha=-0.5", *NEW], "partition.dirichlet.alpha must be > 0",
                 id="dirichlet-alpha-negative"),
    pytest.param([*RUN, *DIR, "--set", "partition.dirichlet.min-size=0", *NEW], "partition.dirichlet.min-size must be ≥ 1",
                 id="dirichlet-min-size-zero"),
    pytest.param([*RUN, *DIR, "--set", "partition.dirichlet.min-size=2000", *NEW], "exceeds the 4000 training samples",
                 id="dirichlet-min-size-too-big"),
    pytest.param([*RUN, "--set", "partition.name=pathological", "--set", "partition.pathological.classes-per-client=11", *NEW],
                 "partition.pathological.classes-per-client must be in [1, 10], got 11", id="pathological-classes"),
    pytest.param([*RUN, "--set", "partition.name=shards", "--set", "partition.shards.shards-per-client=0", *NEW],
                 "partition.shards.shards-per-client must be ≥ 1", id="shards-zero"),
    pytest.param([*RUN, "--set", "partition.name=quantity-skew", "--set", "partition.quantity-skew.sigma=-1", *NEW],
                 "partition.quantity-skew.sigma must be ≥ 0", id="quantity-skew-sigma"),
    pytest.param([*RUN, "--set", "seed=-1", *NEW], "seed must be ≥ 0, got -1", id="seed-negative-key"),
    # ---------------------------------------------------------------- strategy-specific errors
    pytest.param([*RUN, "--set", "strategy.name=dense", "--set", "strategy.dense.preset=dafl", *NEW],
                 "strategy 'dense' is one-shot: set rounds = 1 (got 2)", id="dense-rounds-gt-1"),
    pytest.param([*RUN, *KD, "--set", "strategy.name=dense", *NEW],
                 "strategy.dense: generator loss term 'bn' needs a teacher with BatchNorm layers", id="dense-bn-without-batchnorm"),
    pytest.param([*RUN, "--set", "strategy.name=fedgen", "--set", "clients.architectures=mlp:2,lenet5:2", *NEW],
                 "FedGen needs one feature dimension across client architectures", id="fedgen-feature-dims"),
    pytest.param([*RUN, "--set", "strategy.name=fedensemble", "--set", "strategy.fedensemble.ensemble=median", *NEW],
                 "strategy.fedensemble.ensemble must be one of", id="fedensemble-ensemble"),
    pytest.param([*RUN, *KD, "--set", "strategy.name=fedftg", "--set", "strategy.fedftg.ensemble-vmap=sometimes", *NEW],
                 "strategy.fedftg.ensemble-vmap must be one of", id="fedftg-ensemble-vmap"),
    pytest.param([*RUN, "--set", "strategy.name=scaffold", "--set", "strategy.scaffold.server-learning-rate=0", *NEW],
                 "strategy.scaffold.server-learning-rate must be > 0", id="scaffold-server-lr"),
    pytest.param([*RUN, *_sets("strategy.name=dp-server-fixed", "strategy.dp-server-fixed.noise-multiplier=-1"), *NEW],
                 "strategy.dp-server-fixed.noise-multiplier must be ≥ 0", id="dp-noise-negative"),
    pytest.param([*RUN, *_sets("strategy.name=dp-client-fixed", "strategy.dp-client-fixed.clipping-norm=0"), *NEW],
                 "strategy.dp-client-fixed.clipping-norm must be > 0", id="dp-clipping-norm"),
    pytest.param([*RUN, *_sets("strategy.name=dp-server-adaptive", "strategy.dp-server-adaptive.target-clipped-quantile=2"),
                  *NEW], "strategy.dp-server-adaptive.target-clipped-quantile must be in [0, 1]", id="dp-quantile"),
    pytest.param([*RUN, *_sets("strategy.name=dp-client-adaptive", "strategy.dp-client-adaptive.noise-multiplier=5"), *NEW],
                 "too low to achieve the desired effective `noise_multiplier`", id="dp-adaptive-noise-split"),
    pytest.param([*RUN, *_sets("strategy.name=dp-server-fixed", "strategy.dp-server-fixed.base=scaffold"), *NEW],
                 "its clients send state besides their model", id="dp-base-stateful"),
    pytest.param([*RUN, *_sets("strategy.name=dp-server-fixed", "strategy.dp-server-fixed.base=dp-client-fixed"), *NEW],
                 "a DP wrapper cannot wrap another one", id="dp-base-dp"),
    pytest.param([*RUN, *_sets("strategy.name=dp-server-fixed", "strategy.dp-server-fixed.base=nope"), *NEW],
                 "unknown strategy 'nope'", id="dp-base-unknown"),
    pytest.param([*RUN, *_sets("strategy.name=dp-server-fixed", "clients.architectures=resnet8"), *NEW],
                 "Flower's clipping cannot scale the integer arrays of 'resnet8'", id="dp-batchnorm-model"),
    pytest.param([*RUN, *_sets("strategy.name=lgfedavg", "clients.architectures=mlp:2,lenet5:2"), *NEW],
                 "their heads differ (mlp 64→10, lenet5 84→10); set model.feature-dim", id="lgfedavg-heads"),
    pytest.param([*RUN, *_sets("strategy.name=fd", "strategy.fd.lamda=-1"), *NEW],
                 "strategy.fd.lamda must be ≥ 0", id="fd-lamda"),
    pytest.param([*RUN, *_sets("strategy.name=fedproto", "clients.architectures=mlp:2,lenet5:2"), *NEW],
                 "their feature dimensions differ (mlp 64, lenet5 84); set model.feature-dim", id="fedproto-dims"),
    pytest.param([*RUN, *_sets("strategy.name=fml", "strategy.fml.shared=resnet99"), *NEW],
                 "resnet99", id="fml-shared"),
    pytest.param([*RUN, *_sets("strategy.name=fml", "strategy.fml.alpha=1.5"), *NEW],
                 "strategy.fml.alpha must be in [0, 1]", id="fml-alpha"),
    pytest.param([*RUN, *_sets("strategy.name=fedkd", "strategy.fedkd.t-start=0"), *NEW],
                 "strategy.fedkd.t-start must be in (0, 1]", id="fedkd-energy"),
    pytest.param([*RUN, *_sets("strategy.name=fedkd", "strategy.fedkd.clip=-1"), *NEW],
                 "strategy.fedkd.clip must be ≥ 0", id="fedkd-clip"),
    pytest.param([*RUN, *_sets("strategy.name=fedgh", "strategy.fedgh.server-lr=0"), *NEW],
                 "strategy.fedgh.server-lr must be > 0", id="fedgh-lr"),
    pytest.param([*RUN, *_sets("strategy.name=fedgh", "clients.architectures=mlp:2,lenet5:2"), *NEW],
                 "fedgh shares one classifier head across architectures", id="fedgh-heads"),
    pytest.param([*RUN, *_sets("strategy.name=fedrep", "strategy.fedrep.head-steps=-1"), *NEW],
                 "strategy.fedrep.head-steps must be ≥ 0", id="fedrep-head-steps"),
    pytest.param([*RUN, "--set", "strategy.name=feddyn", "--set", "strategy.feddyn.alpha=0", *NEW],
                 "strategy.feddyn.alpha must be > 0", id="feddyn-alpha"),
    pytest.param([*RUN, "--set", "strategy.name=moon", "--set", "strategy.moon.mu=-1", *NEW],
                 "strategy.moon.mu must be ≥ 0", id="moon-mu"),
    pytest.param([*RUN, "--set", "strategy.name=moon", "--set", "strategy.moon.temperature=0", *NEW],
                 "strategy.moon.temperature must be > 0", id="moon-temperature"),
    pytest.param([*RUN, "--set", "strategy.name=fedgen", "--set", "strategy.fedgen.gen-steps=0", *NEW],
                 "strategy.fedgen.gen-steps must be ≥ 1, got 0", id="fedgen-gen-steps"),
    pytest.param([*RUN, "--set", "strategy.name=feddf", "--set", "strategy.feddf.base=dense", *NEW],
                 "strategy 'dense' cannot be a base strategy", id="kd-base-not-plain"),
    pytest.param([*RUN, "--set", "strategy.name=feddf", "--set", "strategy.feddf.base=fedfoo", *NEW],
                 "unknown strategy 'fedfoo'", id="kd-base-unknown"),
    pytest.param([*RUN, "--set", "strategy.name=feddf", "--set", "strategy.feddf.retention=forever", *NEW],
                 "strategy.feddf.retention must be one of", id="kd-bad-choice"),
    pytest.param([*RUN, "--set", "strategy.name=feddf", "--set", "strategy.feddf.generator=feature", *NEW],
                 "strategy.feddf.generator 'feature' is not an input-space generator", id="kd-generator-wrong-space"),
    pytest.param([*RUN, "--set", "strategy.name=fedftg", "--set", "strategy.fedftg.generator=", *NEW],
                 "unknown generator ''", id="kd-no-generator"),
    pytest.param([*RUN, "--set", "strategy.name=feddf", "--set", "strategy.feddf.proxy=digits", *NEW],
                 "strategy.feddf.proxy 'digits' has inputs of shape (1, 8, 8), but the federation's are (1, 28, 28)",
                 id="kd-proxy-shape"),
    pytest.param([*RUN, "--set", "strategy.name=feddf", "--set", "strategy.feddf.proxy=cifar10", *NEW],
                 "set strategy.feddf.proxy-root", id="kd-proxy-without-root"),
    # the server-side knobs of issue 9: each names its key
    pytest.param([*RUN, "--set", "strategy.name=fedftg", "--set", "strategy.fedftg.per-client=sometimes", *NEW],
                 "strategy.fedftg.per-client must be one of off, mean, steps; got 'sometimes'", id="kd-per-client"),
    pytest.param([*RUN, "--set", "strategy.name=feddf", "--set", "strategy.feddf.memory-targets=never", *NEW],
                 "strategy.feddf.memory-targets must be one of stored, current; got 'never'", id="kd-memory-targets"),
    pytest.param([*RUN, "--set", "strategy.name=fedftg", "--set", "strategy.fedftg.loss-reduction=sum", *NEW],
                 "strategy.fedftg.loss-reduction must be one of auto, batchmean, mean; got 'sum'", id="kd-loss-reduction"),
    pytest.param([*RUN, "--set", "strategy.name=fedftg", "--set", "strategy.fedftg.optimizer=rmsprop", *NEW],
                 "strategy.fedftg.optimizer must be one of sgd, adam; got 'rmsprop'", id="kd-optimizer"),
    pytest.param([*RUN, "--set", "strategy.name=fedftg", "--set", "strategy.fedftg.sample-mode=test", *NEW],
                 "strategy.fedftg.sample-mode must be one of train, eval; got 'test'", id="kd-sample-mode"),
    pytest.param([*RUN, "--set", "strategy.name=fedftg", "--set", "strategy.fedftg.gen-lr-decay=1.5", *NEW],
                 "strategy.fedftg.gen-lr-decay must be in (0, 1], got 1.5", id="kd-gen-lr-decay"),
    pytest.param([*RUN, "--set", "strategy.name=fedftg", "--set", "strategy.fedftg.momentum=1.0", *NEW],
                 "strategy.fedftg.momentum must be in [0, 1), got 1.0", id="kd-momentum"),
    pytest.param([*RUN, "--set", "strategy.name=feddf", "--set", "strategy.feddf.memory-push=-1", *NEW],
                 "strategy.feddf.memory-push must be ≥ 0, got -1", id="kd-memory-push"),
    pytest.param([*RUN, "--set", "strategy.name=feddf", "--set", "strategy.feddf.memory-size=0", *NEW],
                 "strategy.feddf.memory-size must be ≥ 1, got 0", id="kd-memory-size"),
    pytest.param([*RUN, "--set", "strategy.name=feddf", "--set", "strategy.feddf.gen-channels=0", *NEW],
                 "strategy.feddf.gen-channels must be ≥ 1, got 0", id="kd-gen-channels"),
    pytest.param([*RUN, "--set", "strategy.name=feddf", "--set", "strategy.feddf.weight-decay=-0.1", *NEW],
                 "strategy.feddf.weight-decay must be ≥ 0, got -0.1", id="kd-weight-decay"),
    pytest.param([*RUN, "--set", "strategy.name=fedgen", "--set", "strategy.fedgen.label-sampling=zipf", *NEW],
                 "strategy.fedgen.label-sampling must be one of uniform, prior; got 'zipf'", id="fedgen-label-sampling"),
    pytest.param([*RUN, "--set", "strategy.name=fedgen", "--set", "strategy.fedgen.activation=tanh", *NEW],
                 "strategy.fedgen.activation must be one of relu, none; got 'tanh'", id="fedgen-activation"),
    # ---------------------------------------------------------------- CLI flags
    pytest.param([*RUN, "--bogus", *NEW], "unrecognized arguments: --bogus", id="flag-unknown"),
    pytest.param([*RUN, "--out"], "argument --out: expected one argument", id="flag-missing-value"),
    pytest.param(["run", "--set"], "argument --set: expected one argument", id="flag-set-missing-value"),
    pytest.param([*RUN, "--set", "rounds", *NEW], "--set expects KEY=VALUE, got 'rounds'", id="flag-set-without-equals"),
    pytest.param([*RUN, "--set", "=3", *NEW], "--set expects KEY=VALUE, got '=3'", id="flag-set-without-key"),
    pytest.param([*RUN, "--engine", "bogus", *NEW], "argument --engine: invalid choice: 'bogus'", id="flag-engine"),
    pytest.param([*RUN, "--seed", "x", *NEW], "argument --seed: invalid int value: 'x'", id="flag-seed-word"),
    pytest.param([*RUN, "--seed", "1.5", *NEW], "argument --seed: invalid int value: '1.5'", id="flag-seed-float"),
    pytest.param([*RUN, "--seed", "-3", *NEW], "seed must be ≥ 0, got -3", id="flag-seed-negative"),
    pytest.param(["run", "{sim}", "{sim}", *NEW], "unrecognized arguments", id="flag-two-sims"),
    pytest.param(["compare", "{sim}", "--seeds", "0", *NEW], "--seeds must be ≥ 1, got 0", id="flag-seeds-zero"),
    pytest.param(["compare", "{sim}", "--seeds", "-2", *NEW], "--seeds must be ≥ 1, got -2", id="flag-seeds-negative"),
    pytest.param(["compare", "{sim}", "--seeds", "two", *NEW], "argument --seeds: invalid int value: 'two'", id="flag-seeds-word"),
    pytest.param(["compare", *NEW], "the following arguments are required: sims", id="flag-compare-no-sims"),
    pytest.param(["compare", "{sim}", "--resume"], "compare --resume needs --out DIR", id="flag-resume-without-out"),
    pytest.param(["plot"], "the following arguments are required: run_dir", id="flag-plot-no-dir"),
    pytest.param(["list", "--bogus"], "unrecognized arguments: --bogus", id="flag-list-unknown"),
    pytest.param(["frobnicate"], "invalid choice: 'frobnicate'", id="flag-unknown-command"),
    pytest.param([], "the following arguments are required: command", id="flag-no-command"),
    # ---------------------------------------------------------------- sim files
    pytest.param(["run", "{ws}/no-such-sim.toml", *NEW], "sim file '{ws}/no-such-sim.toml' does not exist", id="sim-missing"),
    pytest.param(["run", "{ws}/a-directory.toml", *NEW], "sim file '{ws}/a-directory.toml' is not a file", id="sim-is-a-directory"),
    pytest.param(["run", "{ws}/sim-invalid.toml", *NEW], "invalid TOML", id="sim-invalid-toml"),
    pytest.param(["run", "{ws}/sim-wrong-type.toml", *NEW], "rounds must be an integer, got 'ten'", id="sim-wrong-type"),
    pytest.param(["run", "{ws}/sim-table-for-scalar.toml", *NEW], "unknown config key 'clients.architectures.mlp'; did you mean 'clients.architectures'?",
                 id="sim-table-where-scalar"),
    pytest.param(["run", "{ws}/sim-scalar-for-table.toml", *NEW], "unknown config key 'clients'", id="sim-scalar-where-table"),
    pytest.param(["run", "{ws}/sim-date.toml", *NEW], "rounds must be an integer, got datetime.date(2024, 1, 2)", id="sim-date-value"),
    pytest.param(["run", "{ws}/sim-not-utf8.toml", *NEW], "cannot read", id="sim-not-utf8"),
    pytest.param(["run", "{ws}/sim-unreadable.toml", *NEW], "cannot read", id="sim-unreadable",
                 marks=pytest.mark.skipif(IS_ROOT, reason="root reads a chmod 000 file")),
    pytest.param(["run", "{ws}/sim-empty.toml", *T, "--set", "rounds=0", *NEW], "rounds must be ≥ 1, got 0",
                 id="sim-empty-is-valid-then-bad-set"),
    pytest.param(["compare", "{sim}", "{ws}/sim-invalid.toml", *NEW], "invalid TOML", id="sim-compare-second-invalid"),
    pytest.param(["dfkd", "{ws}/no-such-sim.toml", *NEW], "sim file '{ws}/no-such-sim.toml' does not exist", id="sim-dfkd-missing"),
    # ---------------------------------------------------------------- dataset roots
    pytest.param([*RUN, "--set", "dataset.name=cifar10", *NEW], "dataset 'cifar10' reads from a local folder: set dataset.root",
                 id="root-not-set"),
    pytest.param([*RUN, *_sets("dataset.name=mnist", "dataset.root={ws}/no-such-root"), *NEW],
                 "dataset.root '{ws}/no-such-root' does not exist", id="root-missing"),
    pytest.param([*RUN, *_sets("dataset.name=fashion-mnist", "dataset.root={ws}/a-file"), *NEW],
                 "dataset.root '{ws}/a-file' is not a folder", id="root-is-a-file"),
    pytest.param([*RUN, *_sets("dataset.name=mnist", "dataset.root={ws}/empty-dir"), *NEW], TV_ROOT, id="root-empty"),
    pytest.param([*RUN, *_sets("dataset.name=mnist", "dataset.root={ws}/corrupt-mnist"), *NEW], TV_ROOT, id="root-corrupt-files"),
    # ---------------------------------------------------------------- unreadable or corrupt files
    pytest.param(["plot", "{ws}/plot-corrupt-metrics"], "metrics.jsonl:2: not valid JSON", id="plot-corrupt-metrics"),
    pytest.param(["plot", "{ws}/plot-metrics-not-objects"], "metrics.jsonl:1: not a metrics record", id="plot-metrics-not-objects"),
    pytest.param(["plot", "{ws}/plot-metrics-no-round"], "metrics.jsonl:1: not a metrics record", id="plot-metrics-missing-round"),
    pytest.param(["plot", "{ws}/plot-metrics-not-utf8"], "metrics.jsonl: cannot read", id="plot-metrics-not-utf8"),
    pytest.param(["plot", "{ws}/plot-corrupt-labels"], "label_counts.csv: not a label-count matrix", id="plot-corrupt-label-counts"),
    pytest.param(["plot", "{ws}/plot-empty-labels"], "label_counts.csv: not a label-count matrix", id="plot-empty-label-counts"),
    pytest.param(["plot", "{ws}/no-such-run"], "run directory '{ws}/no-such-run' does not exist", id="plot-missing-dir"),
    pytest.param(["plot", "{ws}/empty-dir"], "is not a run directory (no metrics.jsonl)", id="plot-not-a-run-dir"),
    pytest.param(["plot", "{ws}/a-file"], "run directory '{ws}/a-file' is not a directory", id="plot-path-is-a-file"),
    pytest.param(["dfkd", "--set", "dfkd.teacher-checkpoint={ws}/no-such.pt", *NEW],
                 "dfkd.teacher-checkpoint: '{ws}/no-such.pt' does not exist", id="ckpt-missing"),
    pytest.param(["dfkd", "--set", "dfkd.teacher-checkpoint={ws}/garbage.pt", *NEW], "cannot load teacher checkpoint",
                 id="ckpt-not-torch"),
    pytest.param(["dfkd", "--set", "dfkd.teacher-checkpoint={ws}/list.pt", *NEW], "holds a list, not a state dict", id="ckpt-a-list"),
    pytest.param(["dfkd", "--set", "dfkd.teacher-checkpoint={ws}/wrong-weights.pt", *NEW], "does not fit 'lenet5'",
                 id="ckpt-wrong-weights"),
    pytest.param(["dfkd", "--set", "dfkd.teacher-checkpoint={ws}/wrong-arch.pt", *NEW], "holds a 'mlp', but dfkd.teacher is 'lenet5'",
                 id="ckpt-wrong-arch"),
    pytest.param(["dfkd", "--set", "dfkd.teacher-checkpoint={ws}/incomplete.pt", *NEW], "is incomplete: no arch, dataset, in_shape, num_classes",
                 id="ckpt-incomplete-metadata"),
    pytest.param(["dfkd", "--set", "dfkd.teacher-checkpoint={ws}/empty-dir", *NEW], "dfkd.teacher-checkpoint: '{ws}/empty-dir' is not a file", id="ckpt-a-directory"),
    pytest.param(["dfkd", "--set", "synthesis.preset=magic", *NEW], "unknown preset 'magic'", id="dfkd-unknown-preset"),
    pytest.param(["dfkd", "--set", "synthesis.weights=adv", *NEW], "synthesis.weights: expected TERM=WEIGHT, got 'adv'",
                 id="dfkd-weights-syntax"),
    pytest.param(["dfkd", "--set", "dfkd.student=vgg", *NEW], "dfkd.student: unknown model 'vgg'", id="dfkd-unknown-student"),
    pytest.param(["dfkd", *_sets("distill.rule=replay", "distill.memory-capacity=0"), *NEW],
                 "distill.memory-capacity must be ≥ 1 with distill.rule = 'replay'", id="dfkd-replay-without-memory"),
    pytest.param(["dfkd", "--set", "generator.name=feature", *NEW], "needs an input-space generator", id="dfkd-feature-generator"),
    pytest.param(["compare", "{sim}", "--seeds", "1", "--resume", "--out", "{ws}/suite-corrupt"],
                 "config.toml is not a valid fedkd config", id="resume-corrupt-config"),
    pytest.param(["compare", "{sim}", "--seeds", "1", "--resume", "--out", "{ws}/suite-other"],
                 "holds a run of a different config", id="resume-different-config"),
    pytest.param(["compare", "{sim}", "--seeds", "1", "--resume", "--out", "{ws}/suite-foreign"],
                 "is not empty and holds no run", id="resume-foreign-files"),
    pytest.param(["compare", "{sim}", "--seeds", "1", "--resume", "--out", "{ws}/no-such-suite"],
                 "compare --resume: '{ws}/no-such-suite' is not a directory", id="resume-missing-dir"),
    # ---------------------------------------------------------------- an existing run directory
    # --- faults, validation, checkpoints, resume
    pytest.param([*RUN, "--set", "faults.crash-rate=1.5", *NEW], "faults.crash-rate must be in [0, 1], got 1.5", id="faults-rate-above-1"),
    pytest.param([*RUN, "--set", "faults.nan-rate=-0.1", *NEW], "faults.nan-rate must be in [0, 1]", id="faults-rate-negative"),
    pytest.param([*RUN, "--set", "faults.label-flip=yes", *NEW], "faults.label-flip must be", id="faults-flip-not-bool"),
    pytest.param([*RUN, "--set", "faults.scale-attack=inf", *NEW], "faults.scale-attack must be finite", id="faults-scale-inf"),
    pytest.param([*RUN, "--set", "validation.max-update-norm=-1", *NEW], "validation.max-update-norm must be ≥ 0", id="norm-bound-negative"),
    pytest.param([*RUN, "--set", "checkpoint.keep=0", *NEW], "checkpoint.keep must be ≥ 1", id="checkpoint-keep-zero"),
    pytest.param(["run", "--resume", "{run}", "--seed", "3"], "--resume takes the run's own config; drop --seed", id="resume-with-seed"),
    pytest.param(["run", "--resume", "{run}"], "already finished (it has summary.json)", id="resume-finished-run"),
    pytest.param(["run", "--resume", "{new}"], "is not a directory", id="run-resume-missing-dir"),
    pytest.param(["run", "--resume"], "expected one argument", id="resume-no-value"),
    pytest.param([*RUN, "--out", "{run}"], "output directory '{run}' already holds a run", id="out-existing-run"),
    pytest.param(["run", "{run}/config.toml", "--out", "{run}"], "already holds a run", id="out-rerun-into-own-dir"),
    pytest.param([*RUN, "--out", "{ws}/non-empty"], "output directory '{ws}/non-empty' already is not empty", id="out-non-empty-dir"),
    pytest.param([*RUN, "--out", "{ws}/a-file"], "output path '{ws}/a-file' exists and is not a directory", id="out-is-a-file"),
    pytest.param([*RUN, "--out", "{ws}/a-file/sub"], "cannot create output directory '{ws}/a-file/sub'", id="out-under-a-file"),
    pytest.param(["dfkd", "--out", "{run}"], "already holds a run", id="out-dfkd-existing-run"),
    pytest.param(["compare", "{sim}", "--seeds", "1", "--out", "{run}"], "already holds a run", id="out-compare-existing-run"),
    pytest.param(["compare", "{sim}", "--seeds", "1", "--set", "dataset.name=cifar10", *NEW], "set dataset.root",
                 id="out-compare-preflight-before-mkdir"),
    pytest.param(["compare", "{sim}", "{ws}/sims/bad-root.toml", "--seeds", "1", *NEW], "dataset.root '/nonexistent/fedkd-root' does not exist",
                 id="out-compare-second-sim-preflight"),
    pytest.param(["compare", "{sim}", "{ws}/sims/tiny.toml", "--seeds", "1", *NEW], "two sims share a file name",
                 id="out-compare-same-stem"),
    # checked before any preflight: the second sim's bad dataset root is never reached
    pytest.param(["compare", "{sim}", "{ws}/sims/bad-root.toml", "--seeds", "1", "--baseline", "other", *NEW],
                 "--baseline 'other' is not one of the sims (tiny, bad-root)", id="compare-unknown-baseline"),
    # ---------------------------------------------------------------- issue 11: devices, Flower's strategy
    # parameters, --out edge cases, runs that train nothing (classes, not cases)
    pytest.param([*RUN, "--set", "device=cuda:x", *NEW], "device must be auto, cpu, cuda or cuda:N, got 'cuda:x'", id="device-malformed-index"),
    pytest.param([*RUN, "--set", "device=cuda:", *NEW], "device must be auto, cpu, cuda or cuda:N", id="device-empty-index"),
    pytest.param([*RUN, "--set", "device=cuda:99", *NEW], re.compile(r"device = 'cuda:99' is not available"), id="device-unavailable-index"),
    pytest.param(["dfkd", "--set", "dataset.name=digits", "--set", "device=cuda:99", *NEW], re.compile(r"device = 'cuda:99' is not available"),
                 id="device-unavailable-dfkd"),
    # ---------------------------------------------------------------- issue 12: the clients' device
    pytest.param([*RUN, "--set", "clients.device=gpu", *NEW], "clients.device must be auto, cpu, cuda or cuda:N, got 'gpu'",
                 id="clients-device-malformed"),
    pytest.param([*RUN, "--set", "clients.device=cuda:99", *NEW], re.compile(r"clients.device = 'cuda:99' is not available"),
                 id="clients-device-unavailable"),
    pytest.param([*RUN, "--engine", "ray", "--set", "clients.device=cuda", *NEW],
                 "clients.device = 'cuda' on the ray engine needs a GPU share per actor", id="clients-device-ray-no-share"),
    pytest.param([*RUN, "--engine", "ray", "--set", "ray.num-gpus=0.5", *NEW], "but no CUDA GPU is visible", id="ray-gpus-without-gpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")),
    pytest.param([*RUN, "--engine", "ray", "--set", "clients.batched=true", *NEW], "clients.batched = true needs the local engine",
                 id="batched-on-ray"),
    pytest.param([*RUN, "--set", "clients.batched=yes", *NEW], "clients.batched", id="batched-not-a-bool"),
    # ---------------------------------------------------------------- issue 13: Flower's robust aggregators
    pytest.param([*RUN, "--set", "strategy.name=bulyan", "--set", "strategy.bulyan.num-malicious-nodes=1", *NEW],
                 "needs at least 4f + 3 = 7 replies per round, but a group of 4 clients samples 4", id="bulyan-too-few-replies"),
    pytest.param([*RUN, "--set", "strategy.name=bulyan", "--set", "clients.fraction=0.5", *NEW],
                 "needs at least 4f + 3 = 3 replies per round, but a group of 4 clients samples 2", id="bulyan-fraction"),
    pytest.param([*RUN, "--set", "strategy.name=krum", "--set", "strategy.krum.num-malicious-nodes=1", *NEW],
                 "needs at least 2f + 3 = 5 replies per round", id="krum-too-few-replies"),
    pytest.param([*RUN, "--set", "strategy.name=multikrum", "--set", "strategy.multikrum.num-nodes-to-select=5", *NEW],
                 "strategy.multikrum.num-nodes-to-select = 5 exceeds the 4 − 0 honest replies", id="multikrum-select-too-many"),
    pytest.param([*RUN, "--set", "strategy.name=multikrum", "--set", "strategy.multikrum.num-nodes-to-select=0", *NEW],
                 "strategy.multikrum.num-nodes-to-select must be ≥ 1, got 0", id="multikrum-select-none"),
    pytest.param([*RUN, "--set", "strategy.name=qfedavg", "--set", "strategy.qfedavg.q=-1", *NEW], "strategy.qfedavg.q must be ≥ 0, got -1.0",
                 id="qfedavg-negative-q"),
    pytest.param([*RUN, "--set", "strategy.name=fedadam", "--set", "strategy.fedadam.eta=-1", *NEW], "strategy.fedadam.eta must be > 0, got -1.0",
                 id="flower-param-fedadam-eta"),
    pytest.param([*RUN, "--set", "strategy.name=fedyogi", "--set", "strategy.fedyogi.beta-1=1.0", *NEW], "strategy.fedyogi.beta-1 must be in [0, 1)",
                 id="flower-param-fedyogi-beta1"),
    pytest.param([*RUN, "--set", "strategy.name=fedadagrad", "--set", "strategy.fedadagrad.tau=0", *NEW], "strategy.fedadagrad.tau must be > 0",
                 id="flower-param-fedadagrad-tau"),
    pytest.param([*RUN, "--set", "strategy.name=fedavgm", "--set", "strategy.fedavgm.server-momentum=1.5", *NEW],
                 "strategy.fedavgm.server-momentum must be in [0, 1)", id="flower-param-fedavgm-momentum"),
    pytest.param([*RUN, "--set", "strategy.name=fedprox", "--set", "strategy.fedprox.proximal-mu=-0.1", *NEW],
                 "strategy.fedprox.proximal-mu must be ≥ 0", id="flower-param-fedprox-mu"),
    pytest.param([*RUN, "--set", "strategy.name=fedtrimmedavg", "--set", "strategy.fedtrimmedavg.beta=0.5", *NEW],
                 "strategy.fedtrimmedavg.beta must be in [0, 0.5)", id="flower-param-trimmed-beta"),
    pytest.param([*RUN, "--set", "strategy.name=krum", "--set", "strategy.krum.num-malicious-nodes=-1", *NEW],
                 "strategy.krum.num-malicious-nodes must be ≥ 0", id="flower-param-krum"),
    pytest.param([*RUN, "--set", "strategy.name=fedftg", "--set", "strategy.fedftg.base=fedadam", "--set", "strategy.fedadam.eta=0", *NEW],
                 "strategy.fedadam.eta must be > 0", id="flower-param-of-a-kd-base"),
    pytest.param([*RUN, "--out", ""], "--out must not be empty", id="out-empty"),
    pytest.param([*RUN, "--out", "  "], "--out must not be empty", id="out-blank"),
    pytest.param(["compare", "{sim}", "--seeds", "1", "--out", ""], "--out must not be empty", id="out-empty-compare"),
    pytest.param([*RUN, "--out", "{run}/inner"], "is inside the run directory", id="out-inside-a-run"),
    pytest.param(["dfkd", "--set", "dataset.name=digits", "--out", "{run}/a/b"], "is inside the run directory", id="out-dfkd-inside-a-run"),
    pytest.param([*RUN, "--out", "{ws}/" + "x" * 300], "cannot create output directory", id="out-too-long"),
    pytest.param(["run", "--resume", ""], "--resume must not be empty", id="resume-empty"),
    pytest.param([*RUN, "--set", "clients.local-steps=0", "--set", "clients.local-epochs=0", *NEW],
                 "clients.local-steps and clients.local-epochs are both 0: the clients would train nothing", id="trains-nothing"),
]  # fmt: skip

# Rows that also go through the installed console script (no traceback, exit 2, one line).
SUBPROCESS_IDS = [
    "flag-unknown",
    "sim-invalid-toml",
    "plot-corrupt-label-counts",
    "ckpt-not-torch",
    "out-existing-run",
]


# --------------------------------------------------------------------------- the workspace


def _tiny_config_toml() -> str:
    from fedkd.config import load_config

    return load_config(None, TINY).to_toml()


def _build_workspace(ws: Path) -> None:
    """Every fixture file the rows refer to; all tiny."""
    import torch

    ws.mkdir()
    (ws / "cwd").mkdir()  # the working directory: a default runs/<name> would show up here
    tiny = _tiny_config_toml()

    # the pre-existing run directory
    run = ws / "existing-run"
    run.mkdir()
    (run / "config.toml").write_text(tiny)
    (run / "metrics.jsonl").write_text(
        '{"round": 1, "accuracy": 0.5, "loss": 1.2, "group_accuracy": {"mlp": 0.5}, "failures": 0}\n'
        '{"round": 2, "accuracy": 0.6, "loss": 1.0, "group_accuracy": {"mlp": 0.6}, "failures": 0}\n'
    )
    (run / "summary.json").write_text('{"final_accuracy": 0.6, "best_accuracy": 0.6, "rounds": 2}\n')
    (run / "label_counts.csv").write_text("class_0,class_1\n3,4\n5,6\n")

    # sim files
    (ws / "sims").mkdir()
    (ws / "sims" / "tiny.toml").write_text(tiny)
    (ws / "sims" / "bad-root.toml").write_text(
        tiny.replace('name = "mnist5k"', 'name = "mnist"').replace('root = ""', 'root = "/nonexistent/fedkd-root"')
    )
    (ws / "sim-unknown-key.toml").write_text("[clients]\nnumm = 3\n")
    (ws / "a-directory.toml").mkdir()
    (ws / "sim-invalid.toml").write_text("[clients\nnum = 3\n")
    (ws / "sim-wrong-type.toml").write_text('rounds = "ten"\n')
    (ws / "sim-table-for-scalar.toml").write_text("[clients.architectures]\nmlp = 4\n")
    (ws / "sim-scalar-for-table.toml").write_text("clients = 4\n")
    (ws / "sim-date.toml").write_text("rounds = 2024-01-02\n")
    (ws / "sim-not-utf8.toml").write_bytes(b"rounds = 2\n# \xff\xfe\xfa\n")
    (ws / "sim-empty.toml").write_text("")
    (ws / "sim-unreadable.toml").write_text("rounds = 0\n")  # chmod 000 in each copy (see `workspace`)

    # plain files and directories
    (ws / "a-file").write_text("not a directory\n")
    (ws / "empty-dir").mkdir()
    (ws / "non-empty").mkdir()
    (ws / "non-empty" / "notes.txt").write_text("mine\n")
    raw = ws / "corrupt-mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / f).write_bytes(b"\x00\x00\x08\x03garbage")

    # run directories with corrupt files, for `fedkd plot`
    good = (run / "metrics.jsonl").read_text()
    for name, metrics, labels in (
        ("plot-corrupt-metrics", good.splitlines()[0] + '\n{"round": 2, "accuracy": \n', None),
        ("plot-metrics-not-objects", "[1, 2]\n", None),
        ("plot-metrics-no-round", '{"accuracy": 0.5}\n', None),
        ("plot-metrics-not-utf8", b'{"round": 1, "accuracy": 0.5}\n\xff\xfe\n', None),
        ("plot-corrupt-labels", good, "class_0,class_1\n3,4\n5,oops\n"),
        ("plot-empty-labels", good, "class_0,class_1\n"),
    ):
        d = ws / name
        d.mkdir()
        (d / "config.toml").write_text(tiny)
        if isinstance(metrics, bytes):
            (d / "metrics.jsonl").write_bytes(metrics)
        else:
            (d / "metrics.jsonl").write_text(metrics)
        if labels is not None:
            (d / "label_counts.csv").write_text(labels)

    # teacher checkpoints
    (ws / "garbage.pt").write_bytes(b"this is not a torch file\n" * 4)
    torch.save([1, 2, 3], ws / "list.pt")
    torch.save({"fc.weight": torch.zeros(2, 2)}, ws / "wrong-weights.pt")
    meta = {"format": "fedkd-teacher/1", "dataset": "mnist5k", "in_shape": [1, 28, 28], "num_classes": 10,
            "feature_dim": 64, "accuracy": 0.9, "state_dict": {}}  # fmt: skip
    torch.save({**meta, "arch": "mlp"}, ws / "wrong-arch.pt")
    torch.save({"format": "fedkd-teacher/1", "state_dict": {}}, ws / "incomplete.pt")

    # compare suites to --resume: seed dirs under OUT/<sim stem>/seed0
    for name in ("suite-corrupt", "suite-other", "suite-foreign"):
        (ws / name / "tiny" / "seed0").mkdir(parents=True)
    (ws / "suite-corrupt" / "tiny" / "seed0" / "config.toml").write_text("rounds = = 2\n")
    (ws / "suite-other" / "tiny" / "seed0" / "config.toml").write_text(tiny.replace("rounds = 2", "rounds = 3"))
    (ws / "suite-foreign" / "tiny" / "seed0" / "notes.txt").write_text("mine\n")


def _snapshot(root: Path) -> dict[str, object]:
    """Every path under ``root``: directories as None, files as (bytes, mtime_ns, mode)."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_dir():
            out[rel + "/"] = None
        else:
            st = p.stat()
            data = p.read_bytes() if os.access(p, os.R_OK) else b"<unreadable>"
            out[rel] = (data, st.st_mtime_ns, st.st_mode)
    return out


@pytest.fixture(scope="module")
def _template(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("bad-input") / "ws"
    _build_workspace(ws)
    return ws


@pytest.fixture
def workspace(_template, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the fixture workspace; the working directory is its ``cwd``."""
    ws = tmp_path / "ws"
    shutil.copytree(_template, ws, symlinks=True)
    (ws / "sim-unreadable.toml").chmod(0)
    monkeypatch.chdir(ws / "cwd")
    return ws


def _fill(items: list[str], ws: Path) -> list[str]:
    subs = {"{ws}": str(ws), "{run}": str(ws / "existing-run"), "{new}": str(ws / "new-run"),
            "{sim}": str(ws / "sims" / "tiny.toml")}  # fmt: skip
    out = []
    for s in items:
        for k, v in subs.items():
            s = s.replace(k, v)
        out.append(s)
    return out


def _check(code: int, out: str, err: str, fragment: str | re.Pattern[str], ws: Path) -> None:
    assert "Traceback" not in out + err, err
    lines = err.splitlines()
    assert code == 2, f"exit {code}; stderr:\n{err}"
    assert len(lines) == 1 and lines[0].strip(), f"stderr is not one line:\n{err}"
    line = lines[0]
    assert line.startswith("error:"), line
    if isinstance(fragment, re.Pattern):
        assert fragment.search(line), f"{fragment.pattern!r} not in {line!r}"
    else:
        expected = _fill([fragment], ws)[0]
        assert expected in line, f"{expected!r} not in {line!r}"


@pytest.mark.parametrize(("argv", "fragment"), ROWS)
def test_bad_input(workspace, capsys, caplog, argv, fragment):
    before = _snapshot(workspace)
    code = main(_fill(argv, workspace))
    captured = capsys.readouterr()
    _check(code, captured.out, captured.err, fragment, workspace)
    # a logged warning would be a second line on a user's stderr
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert not (workspace / "new-run").exists(), "a run directory was created for bad input"
    after = _snapshot(workspace)
    assert sorted(set(after) - set(before)) == [], "bad input created files"
    assert sorted(set(before) - set(after)) == [], "bad input removed files"
    changed = [k for k in before if before[k] != after[k]]
    assert changed == [], "bad input modified files"


def _console_script() -> list[str]:
    exe = Path(sys.executable).parent / "fedkd"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "fedkd.cli"]


@pytest.mark.parametrize(("argv", "fragment"), [r for r in ROWS if r.id in SUBPROCESS_IDS])
def test_bad_input_console_script(workspace, argv, fragment):
    before = _snapshot(workspace)
    # the user's default warning filters: a warning shown to them would be a second stderr line
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([*_console_script(), *_fill(argv, workspace)], cwd=workspace / "cwd", env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    _check(proc.returncode, proc.stdout, proc.stderr, fragment, workspace)
    assert _snapshot(workspace) == before


def test_enough_rows():
    assert len(ROWS) >= 40
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)), "duplicate row ids"
    assert set(SUBPROCESS_IDS) <= set(ids)


def test_empty_sim_file_means_the_defaults(tmp_path):
    """An empty sim file is valid: it is the declared defaults."""
    from fedkd.config import load_config

    sim = tmp_path / "empty.toml"
    sim.write_text("")
    assert dict(load_config(sim)) == dict(load_config(None))


# ---------------------------------------------------------------- the environment (issue 11)


def test_a_non_utf8_stdout_still_gets_one_error_line(tmp_path):
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([*_console_script(), "run", "--set", "rounds=0", "--out", str(tmp_path / "x")],
                          capture_output=True, env=env, timeout=120)  # fmt: skip
    err = proc.stderr.decode("ascii")
    assert proc.returncode == 2 and err.count("\n") == 1 and err.startswith("error: rounds must be \\u2265 1"), err
    assert b"Traceback" not in proc.stdout + proc.stderr and not (tmp_path / "x").exists()


def test_a_closed_pipe_is_no_traceback():
    """`fedkd list --keys | head -c 10`: the reader is gone before fedkd writes (deterministically)."""
    r, w = os.pipe()
    os.close(r)  # nobody will ever read: every write gets EPIPE
    try:
        proc = subprocess.run([*_console_script(), "list", "--keys"], stdout=w, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(w)
    err = proc.stderr.decode()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_bad_mplbackend_does_not_break_plotting(tmp_path):
    src = Path(__file__).resolve().parents[1] / "sims" / "results" / "s1" / "mnist5k-fedavg-dir0.1" / "seed0"
    run = tmp_path / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    env = {**os.environ, "MPLBACKEND": "no-such-backend"}
    proc = subprocess.run([*_console_script(), "plot", str(run)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert (run / "accuracy.png").stat().st_mtime > (src / "accuracy.png").stat().st_mtime - 1
