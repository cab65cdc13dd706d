"""Example 2: a FedDF variant. The generator learns DAFL's terms, the students learn by JS.

Nothing is copied from FedDF: the subclass changes two defaults and registers one preset.
Every other FedDF keyword (iterations, gen-steps, student-lr, ...) stays a config key, now
under ``strategy.feddf-dafl.*``.
"""

from __future__ import annotations

from typing import Any

from fedkd.api import PRESETS, FedDF, Objective

# DAFL's terms (one-hot, information entropy, activation) plus FedFTG's bounded diversity.
PRESETS.add("dafl-div", Objective({"oh": 1.0, "ie": 5.0, "act": 0.1, "div": 1.0}))


class FedDFDAFL(FedDF):
    """FedDF whose generator uses DAFL's objective and whose students minimise the JS divergence."""

    def __init__(self, *args: Any, preset: str = "dafl-div", loss: str = "js", **kwargs: Any) -> None:
        super().__init__(*args, preset=preset, loss=loss, **kwargs)
