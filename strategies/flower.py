"""Flower's built-in strategies, registered under fedkd names and used unchanged.

Their constructor keywords become config keys ``strategy.<name>.<param>`` (for example
``strategy.fedprox.proximal-mu``); sampling keywords are set by fedkd from
``clients.fraction`` and ``eval.fraction``, q-FedAvg's ``client_learning_rate`` from
``clients.lr`` and its ``train_loss_key`` to the key fedkd's clients report. The robust
aggregators' assumptions are checked before a run against the replies a group can send per
round: Krum and Multi-Krum need ``n ≥ 2f + 3`` and select at most ``n − f``; Bulyan needs
``n ≥ 4f + 3``.
"""

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
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
STRATEGIES.add("multikrum", MultiKrum)  # Blanchard et al. 2017, the m best-scoring updates averaged
STRATEGIES.add("bulyan", Bulyan)  # El Mhamdi et al. 2018; needs 4f + 3 replies per round
STRATEGIES.add("qfedavg", QFedAvg)  # Li et al. 2020 (q-FFL); fedkd sets client_learning_rate = clients.lr
