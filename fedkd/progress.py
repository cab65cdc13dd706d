"""Progress of the long phases that print nothing on their own (server distillation, teacher training).

A phase calls :func:`report` with its fields; the command line installs the reporter that
prints them (a human line, a JSON line, or nothing with ``--quiet``). Library code never
prints: without a reporter, :func:`report` does nothing. Reports are rate-limited by the
phase itself (:class:`Throttle`) so that a log stays readable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

Reporter = Callable[[dict[str, Any]], None]
_reporter: Reporter | None = None
#: Seconds between two progress lines of one phase (tests set 0).
INTERVAL = 5.0


def set_reporter(reporter: Reporter | None) -> None:
    """Install ``reporter`` for this process (``None``: progress is dropped)."""
    global _reporter
    _reporter = reporter


def report(phase: str, **fields: Any) -> None:
    """Hand ``{"phase": phase, **fields}`` to the installed reporter, if any."""
    if _reporter is not None:
        _reporter({"phase": phase, **fields})


def active() -> bool:
    return _reporter is not None


class Throttle:
    """True at most once per ``every`` seconds (the first call after ``every`` seconds from creation)."""

    def __init__(self, every: float | None = None) -> None:
        self.every = INTERVAL if every is None else every
        self._last = time.perf_counter()

    def __call__(self) -> bool:
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            return True
        return False


def human(event: dict[str, Any]) -> str:
    """The one-line human form of a progress event."""
    phase = event.get("phase", "")
    parts = [f"  {phase}"]
    if "iteration" in event:
        parts.append(f"{event['iteration']}/{event.get('of', '?')}")
    for key in ("kd_loss", "g_loss"):
        if isinstance(event.get(key), float):
            parts.append(f"{key} {event[key]:.4f}")
    if "seconds" in event:
        parts.append(f"{event['seconds']:.1f}s")
    return "  ".join(parts)
