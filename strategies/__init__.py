"""Flower strategies, one registry.

Flower's own strategies are registered as they are (fedkd never re-implements them);
fedkd runs one instance per architecture group (:class:`fedkd.federation.GroupedStrategy`).
Strategies with server-side work across groups subclass ``GroupedStrategy`` in a file of
their own here. External packages add strategies through the ``fedkd.strategies`` entry
point group (see ``docs/writing-a-strategy.md``).
"""

from typing import Any

from fedkd.registry import Registry

STRATEGIES: Registry[Any] = Registry("strategy", "fedkd.strategies")

from strategies import flower  # noqa: E402,F401  isort: skip  (registers Flower's built-ins)
from strategies import continual, dense, dp, fd, feddf, fedensemble, feddyn, fedftg, fedgen, fedgh, fedkd_kd, fml, fednova, fedproto, lgfedavg, moon, personal, scaffold  # noqa: E402,F401  isort: skip

__all__ = ["STRATEGIES"]
