"""Generator networks for data-free distillation, one registry.

Each generator is an ``nn.Module`` with an explicit typed constructor and
``forward(z, y=None)``; no loss code, no device code, no lookup by dataset name.
External packages add generators through the ``fedkd.generators`` entry point group.
"""

from typing import Any

from fedkd.registry import Registry

GENERATORS: Registry[Any] = Registry("generator", "fedkd.generators")

# Built-ins register themselves on import.
from generators import feature, image  # noqa: E402,F401  isort: skip

__all__ = ["GENERATORS"]
