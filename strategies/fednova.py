"""FedNova: normalized averaging (Wang et al., NeurIPS 2020).

Clients that run different numbers of local steps ``τ_i`` (``clients.local-epochs`` over
partitions of different sizes) pull FedAvg toward their own optimum. Each client reports
``a_i`` (:func:`fedkd.train.nova_normalizer`: ``τ_i`` for plain SGD, less with momentum);
the server averages normalized updates, ``d_i = (x − θ_i) / a_i``, with weights
``p_i = n_i / Σ n`` and takes ``x ← x − τ_eff Σ p_i d_i``, ``τ_eff = Σ p_i a_i``
(the official code, github.com/JYWa/FedNova, ``distoptim/FedNova.py``, without its global
momentum). With ``clients.local-steps`` every ``τ_i`` is equal and FedNova is FedAvg.
BatchNorm's running statistics are averaged as FedAvg does (the official driver averages
parameters only and keeps buffers local). ``p_i`` and ``τ_eff`` are over the round's
replies (the official code has full participation; Flower's niid_bench does the same). The
FedNova + proximal variant (``a_i = [1 − (1 − ημ)^τ] / (ημ)``) is not implemented. Audit and
recipe: ``sims/papers/mnist5k-fednova-dir0.1.toml``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

from fedkd.rules import RuleReply, RuleStrategy, is_parameter, to_record
from strategies import STRATEGIES


@STRATEGIES.register("fednova")
class FedNova(RuleStrategy):
    """FedNova (normalized averaging of the clients' updates)."""

    rule = "fednova"

    def combine(
        self, server_round: int, current: ArrayRecord, averaged: ArrayRecord, replies: list[RuleReply]
    ) -> ArrayRecord:
        total = sum(r.examples for r in replies)
        p = [r.examples / total for r in replies]
        a = [max(r.metrics.get("fednova-a", 1.0), 1e-12) for r in replies]
        tau_eff = sum(pi * ai for pi, ai in zip(p, a, strict=True))
        sent = {k: v.numpy() for k, v in current.items()}
        out: dict[str, np.ndarray] = {}
        for k, avg in averaged.items():
            x = sent[k]
            if not is_parameter(k, x):
                out[k] = avg.numpy()
                continue
            x64 = x.astype(np.float64)
            d = sum(pi * (x64 - r.weights[k].astype(np.float64)) / ai for pi, ai, r in zip(p, a, replies, strict=True))
            out[k] = (x64 - tau_eff * d).astype(x.dtype)
        return to_record(out)
