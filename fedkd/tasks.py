"""Class-continual federated learning: the run's classes arrive in tasks (``tasks.*``).

A :class:`TaskPlan` splits the dataset's classes, in an order drawn from the run's seed (or the
natural one, or a given one), into tasks of ``tasks.classes-per-task`` classes; each task lasts
``tasks.rounds-per-task`` rounds. During task ``t`` every client trains on its share of task
``t``'s training samples only: each task's samples are split among all the clients by the
configured partitioner, with a seed of its own (TARGET's code re-partitions every task with a
Dirichlet split), so the data is non-IID within a task and no client keeps old classes.

The server scores the global model on the classes seen so far, as a model whose head has grown
with the tasks (TARGET's ``IncrementalNet``: logits of classes not seen yet take no part in the
prediction), on each seen task, and reports the average forgetting (Chaudhry et al., 2018):
for each earlier task ``j``, the best accuracy on ``j`` at the end of a task before the current
one minus the accuracy on ``j`` now, averaged over ``j``. The accuracy matrix ``A[t][j]``
(accuracy on task ``j`` at the end of task ``t``) is written with its heat map into the run
directory (:func:`write_matrix`).

Pure: no Flower here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedkd.errors import ConfigError

#: Files of the accuracy matrix in the run directory.
MATRIX_JSON = "tasks.json"
MATRIX_PNG = "tasks.png"


@dataclass(frozen=True)
class TaskPlan:
    """The run's tasks.

    Attributes
    ----------
    order : tuple of int
        Every class, in the order the tasks bring them.
    classes_per_task : int
    rounds_per_task : int
    """

    order: tuple[int, ...]
    classes_per_task: int
    rounds_per_task: int

    @property
    def num_tasks(self) -> int:
        return len(self.order) // self.classes_per_task

    @property
    def rounds(self) -> int:
        return self.num_tasks * self.rounds_per_task

    def task_of(self, server_round: int) -> int:
        """The task (0-based) that round ``server_round`` (1-based; 0: before training) trains."""
        return min(max(server_round - 1, 0) // self.rounds_per_task, self.num_tasks - 1)

    def is_task_end(self, server_round: int) -> bool:
        """Whether ``server_round`` is the last round of its task."""
        return server_round > 0 and server_round % self.rounds_per_task == 0

    def first_round(self, task: int) -> int:
        return task * self.rounds_per_task + 1

    def classes(self, task: int) -> tuple[int, ...]:
        """The classes of ``task``."""
        k = self.classes_per_task
        return self.order[task * k : (task + 1) * k]

    def seen(self, task: int) -> tuple[int, ...]:
        """The classes of tasks ``0 … task`` (none for ``task < 0``)."""
        return self.order[: max(task + 1, 0) * self.classes_per_task]

    def old(self, task: int) -> tuple[int, ...]:
        """The classes of the tasks before ``task``."""
        return self.seen(task - 1)

    def samples(self, labels: np.ndarray, task: int) -> np.ndarray:
        """Indices of the samples of ``task``'s classes in ``labels``."""
        return np.flatnonzero(np.isin(np.asarray(labels), self.classes(task)))


def parse_order(spec: str, num_classes: int, seed: int) -> tuple[int, ...]:
    """``tasks.class-order``: ``seed`` (a permutation drawn from the run's seed, as TARGET's
    ``DataManager`` shuffles its classes), ``natural`` (0, 1, …) or the classes listed, e.g.
    ``"3,1,0,2"`` (each class exactly once)."""
    spec = spec.strip()
    if spec == "natural":
        return tuple(range(num_classes))
    if spec == "seed":
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC1A55]))
        return tuple(int(c) for c in rng.permutation(num_classes))
    try:
        order = tuple(int(c) for c in spec.split(","))
    except ValueError:
        raise ConfigError(
            f"tasks.class-order must be seed, natural or a comma-separated list of classes, got {spec!r}"
        ) from None
    if sorted(order) != list(range(num_classes)):
        raise ConfigError(
            f"tasks.class-order {spec!r} must list every class 0 … {num_classes - 1} exactly once"
        )
    return order


def plan_of(cfg: Any, num_classes: int) -> TaskPlan | None:
    """The run's :class:`TaskPlan` from ``tasks.*``, or None when ``tasks.classes-per-task`` is 0.

    Raises :class:`~fedkd.errors.ConfigError` (naming the key) when the classes do not divide
    into tasks, the rounds do not divide into tasks, or a setting cannot go with tasks.
    """
    k = cfg.int("tasks.classes-per-task")
    if k == 0:
        return None
    if k > num_classes or num_classes % k:
        raise ConfigError(
            f"tasks.classes-per-task = {k} does not divide the dataset's {num_classes} classes into tasks"
        )
    num_tasks = num_classes // k
    if num_tasks < 2:
        raise ConfigError(f"tasks.classes-per-task = {k} makes one task of all {num_classes} classes; use at least 2 tasks")
    rounds, per = cfg.int("rounds"), cfg.int("tasks.rounds-per-task")
    if per == 0:
        if rounds % num_tasks:
            raise ConfigError(
                f"rounds = {rounds} does not divide into {num_tasks} tasks; set rounds to a multiple of "
                f"{num_tasks} or tasks.rounds-per-task"
            )
        per = rounds // num_tasks
    elif per * num_tasks != rounds:
        raise ConfigError(
            f"tasks.rounds-per-task = {per} × {num_tasks} tasks is {per * num_tasks} rounds, but rounds = {rounds}; "
            f"set rounds = {per * num_tasks} (or tasks.rounds-per-task = 0: rounds / tasks)"
        )
    if cfg.float("partition.test-fraction") > 0:
        raise ConfigError("partition.test-fraction cannot go with tasks.* (a client's test split would change with the task)")
    return TaskPlan(parse_order(cfg.str("tasks.class-order"), num_classes, cfg.int("seed")), k, per)


def task_seed(seed: int, task: int) -> int:
    """The partitioner's seed of ``task`` (task 0 keeps the run's seed)."""
    from fedkd.train import derive_seed

    return seed if task == 0 else derive_seed(seed, 0x7A5C, task)


# ------------------------------------------------------------------- the loss over a task's classes
def restricted_ce(logits: Tensor, y: Tensor, classes: Sequence[int]) -> Tensor:
    """Cross-entropy over the logits of ``classes`` only, the target being the label's place in
    ``classes`` (TARGET's code: ``CE(output[:, known:total], labels − known)``; every label of
    ``y`` must be one of ``classes``)."""
    cols = torch.as_tensor(list(classes), device=logits.device)
    remap = torch.full((logits.shape[1],), -1, dtype=torch.long, device=logits.device)
    remap[cols] = torch.arange(len(cols), device=logits.device)
    return F.cross_entropy(logits[:, cols], remap[y])


def soft_ce(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``−Σ softmax(t/T) · log_softmax(s/T)``, summed over classes, mean over the batch: the
    distillation loss of LwF's and TARGET's code (``_KD_loss``; no ``T²`` factor)."""
    return -(F.softmax(teacher / temperature, dim=1) * F.log_softmax(student / temperature, dim=1)).sum(1).mean()


# ------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_tasks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    plan: TaskPlan,
    task: int,
    batch_size: int = 500,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """The model after (or during) ``task``, scored as a class-incremental model: on the test
    samples of the classes seen so far, the prediction taken over the seen classes' logits.

    Returns ``loss`` and ``accuracy`` over every seen class, and ``task_accuracy``: the accuracy on
    each task ``0 … task``.
    """
    device = device or torch.device("cpu")
    seen = list(plan.seen(task))
    keep = torch.as_tensor(np.isin(y.numpy(), seen))
    xs, ys = x[keep], y[keep]
    model.to(device).eval()
    cols = torch.as_tensor(seen, device=device)
    preds, loss = [], 0.0
    for i in range(0, len(xs), batch_size):
        xb, yb = xs[i : i + batch_size].to(device), ys[i : i + batch_size].to(device)
        out = model(xb)
        loss += float(restricted_ce(out, yb, seen)) * len(yb)
        preds.append(cols[out[:, cols].argmax(1)].cpu())
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    correct = pred == ys
    per_task = []
    for j in range(task + 1):
        m = torch.as_tensor(np.isin(ys.numpy(), plan.classes(j)))
        per_task.append(int(correct[m].sum()) / int(m.sum()) if bool(m.any()) else 0.0)
    n = max(len(ys), 1)
    return {"loss": loss / n, "accuracy": int(correct.sum()) / n, "task_accuracy": per_task}


def forgetting(ends: Sequence[Sequence[float]], now: Sequence[float]) -> float | None:
    """Average forgetting: for each task ``j`` before the last entry of ``now``, the best
    accuracy on ``j`` over the rows of ``ends`` (the accuracies at the end of each earlier task)
    minus ``now[j]``, averaged over ``j``; None when there is no earlier task.

    ``ends[t][j]`` is the accuracy on task ``j`` at the end of task ``t`` (``j ≤ t``).
    """
    earlier = len(now) - 1
    if earlier < 1 or not ends:
        return None
    drops = []
    for j in range(earlier):
        best = max(row[j] for row in ends if len(row) > j)
        drops.append(best - now[j])
    return float(np.mean(drops))


def task_metrics(plan: TaskPlan, server_round: int, ev: Mapping[str, Any], ends: Sequence[Sequence[float]]) -> dict[str, Any]:
    """The per-round task fields of ``metrics.jsonl`` (``ev`` from :func:`evaluate_tasks` of
    this round's task, ``ends`` the ``task_accuracy`` rows of the earlier tasks' last rounds)."""
    task = plan.task_of(server_round)
    acc = list(ev["task_accuracy"])
    return {
        "task": task + 1,
        "current_task_accuracy": acc[task],
        "task_accuracy": acc,
        "forgetting": forgetting([e for e in ends[:task]], acc),
        **({"task_end": True} if plan.is_task_end(server_round) else {}),
    }


# ------------------------------------------------------------------- the matrix and its picture
def matrix_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    """``A[t]``: the ``task_accuracy`` of each task's last round, from metrics rows."""
    return [list(r["task_accuracy"]) for r in rows if r.get("task_end") and "task_accuracy" in r]


def write_matrix(run_dir: Path, plan: TaskPlan, rows: Sequence[Mapping[str, Any]]) -> None:
    """``tasks.json`` (the plan, the accuracy matrix, the final average accuracy and forgetting)
    and ``tasks.png`` (the matrix as a heat map) from the metrics rows so far."""
    from fedkd.results import write_atomic

    a = matrix_rows(rows)
    last = next((r for r in reversed(rows) if "task_accuracy" in r), None)
    data = {
        "classes": [list(plan.classes(t)) for t in range(plan.num_tasks)],
        "rounds_per_task": plan.rounds_per_task,
        "matrix": a,
        "average_accuracy": None if last is None else last["accuracy"],
        "forgetting": None if last is None else last.get("forgetting"),
    }
    write_atomic(run_dir / MATRIX_JSON, json.dumps(data, indent=1) + "\n")
    if a:
        plot_matrix(a, plan, run_dir / MATRIX_PNG)


def plot_matrix(a: Sequence[Sequence[float]], plan: TaskPlan, path: Path) -> None:
    """The accuracy matrix as a heat map: row ``t`` after task ``t``, column ``j`` task ``j``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = plan.num_tasks
    grid = np.full((n, n), np.nan)
    for t, row in enumerate(a):
        grid[t, : len(row)] = row
    fig, ax = plt.subplots(figsize=(1.1 * n + 2, 0.9 * n + 1.6))
    im = ax.imshow(grid * 100, vmin=0, vmax=100, cmap="viridis")
    for t in range(len(a)):
        for j in range(len(a[t])):
            v = a[t][j] * 100
            ax.text(j, t, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=9)
    labels = [f"{j + 1}: " + ",".join(str(c) for c in plan.classes(j)) for j in range(n)]
    ax.set_xticks(range(n), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(n), [f"after {t + 1}" for t in range(n)], fontsize=8)
    ax.set_xlabel("accuracy on task (classes)")
    ax.set_title("class-continual accuracy (%)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def summary(plan: TaskPlan, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The run summary's class-continual fields: the tasks, the accuracy matrix, and the final
    average accuracy (over every class seen) and average forgetting."""
    last = next((r for r in reversed(rows) if "task_accuracy" in r), None)
    return {
        "tasks": plan.num_tasks,
        "accuracy_matrix": matrix_rows(rows),
        "average_accuracy": None if last is None else last["accuracy"],
        "forgetting": None if last is None else last.get("forgetting"),
    }
