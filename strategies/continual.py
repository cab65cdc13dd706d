"""Class-continual baselines (``tasks.*``, :mod:`fedkd.tasks`): finetune, FedLwF and FedEWC, as
in TARGET's code (Zhang et al., ICCV 2023; github.com/zj-jayzhang/Federated-Class-Continual-Learning,
``methods/finetune.py``, ``lwf.py``, ``ewc.py``).

Every one is FedAvg on the server. The clients train on their share of the current task's
samples with the cross-entropy over the current task's classes (``tasks.local-classes``); FedLwF
and FedEWC add a term against forgetting (:class:`fedkd.train.LwFRule`,
:class:`fedkd.train.EWCRule`) that needs the **old global model**: the global model at the end
of the previous task, which the server keeps (checkpointed) and sends with the model from the
second task on, as ``rule-arrays`` (counted in the bytes down).

Deviations from the official code, and why: the model's head has every class from the start
(fedkd's models have a fixed head) where the official ``IncrementalNet`` grows it per task; the
server evaluates with the logits of the classes not yet seen left out and the clients'
cross-entropy takes the current task's logits only, which is what the grown head computes.
FedEWC's penalty is on the client's model (the official ``compute_ewc`` reads the server's copy
``self._network``, which the local optimizer never moves, so its gradient never reaches the
client's model and the official FedEWC trains as finetune does), anchored at the old global
model (the official anchors at the client's own model of its last round, which after the first
round of a task is already a model of the new task). Recipe: ``sims/papers/mnist5k-fcl.toml``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedkd.errors import ConfigError
from fedkd.rules import RuleStrategy
from fedkd.tasks import TaskPlan
from strategies import STRATEGIES


def _need_tasks(name: str, tasks: TaskPlan | None) -> TaskPlan:
    if tasks is None:
        raise ConfigError(
            f"strategy {name!r} is class-continual: set tasks.classes-per-task (e.g. 2 on a 10-class dataset)"
        )
    return tasks


@STRATEGIES.register("finetune")
class Finetune(FedAvg):
    """FedAvg over the tasks, with nothing against forgetting: the lower bound of TARGET's table."""

    #: fedkd hands a class-continual strategy the run's :class:`~fedkd.tasks.TaskPlan` (``tasks``).
    needs_tasks: ClassVar[bool] = True

    def __init__(self, *args: Any, tasks: TaskPlan | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tasks = _need_tasks("finetune", tasks)


class ContinualStrategy(RuleStrategy):
    """FedAvg whose clients' rule needs the old global model: the server keeps the group's model
    as it was at the end of the previous task (:attr:`old`) and sends it from the second task on."""

    name = ""
    needs_tasks: ClassVar[bool] = True

    def __init__(self, *args: Any, tasks: TaskPlan | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tasks = _need_tasks(self.name, tasks)
        #: The group's model at the end of the previous task (None during the first task).
        self.old: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        task = self.tasks.task_of(server_round)
        if task > 0 and server_round == self.tasks.first_round(task):  # the model that ended the last task
            self.old = ArrayRecord({k: v for k, v in arrays.items()})
        return super().configure_train(server_round, arrays, config, grid)

    def rule_arrays(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord | None:
        return self.old if self.tasks.task_of(server_round) > 0 else None


@STRATEGIES.register("fedlwf")
class FedLwF(ContinualStrategy):
    """FedLwF: ``lamda`` (official 3) times LwF's distillation from the old global model at
    temperature ``temperature`` (official 2) on the clients' current-task data."""

    rule = "lwf"
    name = "fedlwf"

    def __init__(self, *args: Any, lamda: float = 3.0, temperature: float = 2.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not lamda >= 0:
            raise ConfigError(f"strategy.fedlwf.lamda must be ≥ 0, got {lamda!r}")
        if not temperature > 0:
            raise ConfigError(f"strategy.fedlwf.temperature must be > 0, got {temperature!r}")
        self.lamda, self.temperature = float(lamda), float(temperature)

    def rule_params(self) -> dict[str, Any]:
        return {"lamda": self.lamda, "temperature": self.temperature}


@STRATEGIES.register("fedewc")
class FedEWC(ContinualStrategy):
    """FedEWC: ``lamda`` (official 1000) times EWC's penalty, the clients' Fisher diagonals
    clamped at ``fisher_max`` (official 1e-4)."""

    rule = "ewc"
    name = "fedewc"

    def __init__(self, *args: Any, lamda: float = 1000.0, fisher_max: float = 1e-4, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not lamda >= 0:
            raise ConfigError(f"strategy.fedewc.lamda must be ≥ 0, got {lamda!r}")
        if not fisher_max > 0:
            raise ConfigError(f"strategy.fedewc.fisher-max must be > 0, got {fisher_max!r}")
        self.lamda, self.fisher_max = float(lamda), float(fisher_max)

    def rule_params(self) -> dict[str, Any]:
        return {"lamda": self.lamda, "fisher_max": self.fisher_max}
