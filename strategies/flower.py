"""Flower's built-in strategies, registered under fedkd names and used unchanged.

Their constructor keywords become config keys ``strategy.<name>.<param>`` (for example
``strategy.fedprox.proximal-mu``); sampling keywords are set by fedkd from
``clients.fraction`` and ``eval.fraction``.
"""

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)

from strategies import STRATEGIES

STRATEGIES.add("fedavg", FedAvg)  # McMahan et al. 2017
STRATEGIES.add("fedprox", FedProx)  # Li et al. 2020; clients add (mu/2)||w - w_global||^2
STRATEGIES.add("fedavgm", FedAvgM)  # Hsu et al. 2019, server momentum
STRATEGIES.add("fedadam", FedAdam)  # Reddi et al. 2021
STRATEGIES.add("fedyogi", FedYogi)  # Reddi et al. 2021
STRATEGIES.add("fedadagrad", FedAdagrad)  # Reddi et al. 2021
STRATEGIES.add("fedmedian", FedMedian)  # Yin et al. 2018, coordinate-wise median
STRATEGIES.add("fedtrimmedavg", FedTrimmedAvg)  # Yin et al. 2018, trimmed mean
STRATEGIES.add("krum", Krum)  # Blanchard et al. 2017
