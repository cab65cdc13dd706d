"""Shared fixtures: environment for Flower, tiny configs, mocked Flower replies."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

REPO = Path(__file__).resolve().parents[1]

# Small, fast federated settings (seconds on 2 CPU cores).
TINY = [
    "rounds=2",
    "clients.num=4",
    "clients.architectures=mlp",
    "clients.local-steps=20",
    "partition.name=iid",
    "strategy.name=fedavg",  # the quickstart's FedDF is tested on its own; these settings test the rest
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``-n 2 --dist loadgroup``, the README's command) the ``slow`` tests (ray
    clusters, SuperLinks, ``flwr run``) share one worker, so no two of them start at once; the
    rest spread over the workers."""
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.xdist_group("engines"))


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


@pytest.fixture
def task_identity() -> None:
    """Flower's runtimes set the ServerApp's identity before strategies create Messages."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def make_reply(src_node_id: int, content, dst_node_id: int = 1, message_type: str = "train"):
    """A reply Message from ``src_node_id``, as Flower's own strategy tests build them."""
    from flwr.app import Metadata
    from flwr.app.message import make_message

    md = Metadata(
        run_id=1, message_id=f"m{src_node_id}-{time.monotonic_ns()}", src_node_id=src_node_id,
        dst_node_id=dst_node_id, reply_to_message_id="x", group_id="1", created_at=time.time(),
        ttl=3600, message_type=message_type,
    )  # fmt: skip
    return make_message(metadata=md, content=content)


@pytest.fixture
def reply() -> Callable:
    return make_reply
