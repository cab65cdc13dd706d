"""One generic registry for every kind of plug-in.

Strategies, generators, models, datasets and partitioners each have a
:class:`Registry`. Built-ins are registered by explicit imports in each package's
``__init__``; external packages add entries through entry points
(``fedkd.strategies``, ``fedkd.generators``, ``fedkd.models``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from fedkd.errors import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)


NAME_ATTR = "__fedkd_name__"


def _stamp(obj: Any, name: str) -> None:
    """Record on a class the name it is registered under (its own attribute, not inherited)."""
    if isinstance(obj, type) and NAME_ATTR not in obj.__dict__:
        try:
            setattr(obj, NAME_ATTR, name)
        except (AttributeError, TypeError):  # a class that refuses attributes keeps working unnamed
            pass


def registered_name(cls: type, default: str | None = None) -> str:
    """The name ``cls`` itself was registered under (a subclass does not inherit its parent's);
    ``default`` (else the lower-cased class name) for an unregistered class."""
    name = cls.__dict__.get(NAME_ATTR)
    return name if isinstance(name, str) else (default or cls.__name__.lower())


class Registry(Generic[T]):
    """A name → factory mapping for one kind of plug-in.

    Parameters
    ----------
    kind : str
        Human-readable kind, used in error messages ("strategy", "model", ...).
    entry_point_group : str, optional
        Entry-point group scanned once, lazily, for external plug-ins.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._entry_points_loaded = entry_point_group is None

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; duplicates are an error."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name``; a class learns its name (:func:`registered_name`)."""
        if name in self._items:
            raise ValueError(f"duplicate {self.kind} name {name!r}; registered: {', '.join(self.names())}")
        self._items[name] = obj
        _stamp(obj, name)

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        assert self.entry_point_group is not None
        for ep in entry_points(group=self.entry_point_group):
            if ep.name in self._items:
                log.warning("%s plug-in %r shadows a built-in; ignored", self.kind, ep.name)
                continue
            self._items[ep.name] = ep.load()
            _stamp(self._items[ep.name], ep.name)

    def get(self, name: str) -> T:
        """Return the entry ``name``, or raise :class:`ConfigError` listing valid names."""
        self._load_entry_points()
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}") from None

    def build(self, name: str, **kwargs: Any) -> Any:
        """Call the factory registered as ``name`` with ``kwargs``."""
        factory = self.get(name)
        assert callable(factory)
        return factory(**kwargs)

    def names(self) -> list[str]:
        """Sorted registered names, entry points included."""
        self._load_entry_points()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def configurable_params(factory: Callable[..., Any], exclude: Iterable[str] = ()) -> dict[str, inspect.Parameter]:
    """Keyword parameters of ``factory`` that a config may set.

    Only parameters with a default of a plain TOML type (bool, int, float, str) are
    configurable; ``exclude`` names parameters fedkd sets itself. For a class whose
    ``__init__`` forwards ``**kwargs`` to its parent, the parent's parameters count too
    (the subclass's defaults win), so a subclass declares only what it adds or changes.

    A class whose ``**kwargs`` end in another callable instead (e.g. a strategy that hands
    them to its distiller) names it in ``__config_forward__ = (callable, excluded names)``:
    that callable's parameters count too, after the class's own.
    """
    excluded = set(exclude) | {"self"}
    out: dict[str, inspect.Parameter] = {}
    if isinstance(factory, type):
        inits = [k.__dict__["__init__"] for k in factory.__mro__ if "__init__" in k.__dict__ and k is not object]
    else:
        inits = [factory]
    forward = getattr(factory, "__config_forward__", None)
    owner = None
    if forward is not None and isinstance(factory, type):
        owner = next((k for k in factory.__mro__ if "__config_forward__" in k.__dict__), None)
    for fn in inits:
        params = inspect.signature(fn).parameters
        for name, p in params.items():
            if name in excluded or name in out or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.default is not inspect.Parameter.empty and isinstance(p.default, bool | int | float | str):
                out[name] = p
        if owner is not None and fn is owner.__dict__.get("__init__"):
            break
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    if forward is not None:
        target, skip = forward
        for name, p in configurable_params(target, excluded | set(skip)).items():
            out.setdefault(name, p)
    return out
