"""Errors that fedkd reports to the user as one line with exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: config, CLI flags, dataset roots, paths.

    The CLI prints ``error: <message>`` on one line and exits with code 2.
    Library code raises it (or a subclass) for anything the user can fix.
    """


class ConfigError(UserError):
    """An invalid configuration key or value."""
