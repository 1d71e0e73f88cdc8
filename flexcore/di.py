"""Dependency injection for FlexCore: a typed component registry and handler parameters.

The composition root (`flexcore.node.FlexNode`) builds each component through
``components.provide(Type, factory)``: when the caller passed an override for ``Type``
(``FlexCore(settings, components={Clock: FakeClock()})``) that instance is used and the
factory never runs. Overridable today: `Clock`, `StateMachine`, `WindmillClient`
(the plugin host joins when plugins land); the Raft node, the services and the API are
built from those. Library users add their own (``app.provide(Database, db)``).

Handlers (``@app.on_event``) receive what they declare: a parameter named like one of
the call's own values (``event``, ``app``, ``attempt``, ``queues``, ``clock``) gets it;
otherwise its annotation is looked up in the registry (exact type first, then any
registered instance of that type); a parameter with a default may stay unresolved.
The plan is computed once per handler (``plan``) and checked when the app starts, so a
handler asking for something nobody provides fails at start-up with its name, not at
its first event.

Why not dependency-injector: its containers and providers are a framework of their own
(declarative classes, wiring by module scanning, a compiled extension) for what here is
a dict from type to instance plus one ``inspect.signature`` per handler. This module is
the whole mechanism, fully typed, and tests override components with a plain mapping.
"""

from __future__ import annotations

import inspect
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

__all__ = ["Clock", "Components", "FakeClock", "HandlerPlan", "InjectionError", "plan"]

T = TypeVar("T")


class Clock:
    """Wall-clock time in seconds since the epoch (``time.time``): what proposers stamp
    commands with and what timers and leases measure against. Override it (FakeClock)
    to control time in tests."""

    def __call__(self) -> float:
        return time.time()


class FakeClock(Clock):
    """A clock that moves only when told (``advance``), for tests."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class InjectionError(TypeError):
    """A handler asks for a parameter nothing provides."""


class Components:
    """Type -> instance. Overrides given at construction win over what
    ``provide`` would build."""

    def __init__(self, overrides: Mapping[type[Any], object] | None = None) -> None:
        self._overrides: dict[type[Any], object] = dict(overrides or {})
        for kind, value in self._overrides.items():
            if not isinstance(value, kind):
                raise TypeError(f"override for {kind.__name__} is a "
                                f"{type(value).__name__}, not a {kind.__name__}")
        self._items: dict[type[Any], object] = dict(self._overrides)

    def provide(self, kind: type[T], factory: Callable[[], T]) -> T:
        """The override for ``kind`` if there is one, else ``factory()``; recorded."""
        if kind in self._overrides:
            return cast(T, self._overrides[kind])
        value = factory()
        self._items[kind] = value
        return value

    def overridden(self, kind: type[Any]) -> bool:
        return kind in self._overrides

    def set(self, kind: type[T], value: T) -> None:
        """Register ``value`` as the ``kind`` component (replaces an earlier one)."""
        if not isinstance(value, kind):
            raise TypeError(f"{type(value).__name__} is not a {kind.__name__}")
        self._items[kind] = value

    def find(self, kind: type[T]) -> T | None:
        """The ``kind`` component: exact type first, else the first registered
        instance of ``kind``; None if there is none."""
        if kind in self._items:
            return cast(T, self._items[kind])
        for value in self._items.values():
            if isinstance(value, kind):
                return value
        return None

    def get(self, kind: type[T]) -> T:
        value = self.find(kind)
        if value is None:
            raise LookupError(f"no {kind.__name__} component")
        return value

    def __contains__(self, kind: type[Any]) -> bool:
        return self.find(kind) is not None


@dataclass(frozen=True)
class _Param:
    name: str
    kind: type[Any] | None      # a class annotation, or None
    has_default: bool


@dataclass(frozen=True)
class HandlerPlan:
    """How to call one handler: its parameters and whether it is a coroutine."""

    fn: Callable[..., Any]
    name: str
    params: tuple[_Param, ...]
    is_async: bool

    def check(self, components: Components, named: frozenset[str]) -> None:
        """Raise `InjectionError` for a parameter that cannot be resolved."""
        for p in self.params:
            if p.name in named or p.has_default:
                continue
            if p.kind is None or p.kind not in components:
                what = f" ({p.kind.__name__})" if p.kind is not None else ""
                raise InjectionError(
                    f"handler {self.name}: nothing provides parameter {p.name!r}{what}; "
                    f"known names are {', '.join(sorted(named))}, or annotate it with a "
                    "component type (register your own with app.provide)")

    def kwargs(self, components: Components, named: Mapping[str, object]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name in named:
                value = named[p.name]
                if p.kind is None or isinstance(value, p.kind):
                    out[p.name] = value
                    continue
            if p.kind is not None:
                found = next((v for v in named.values() if type(v) is p.kind), None)
                if found is None:
                    found = components.find(p.kind)
                if found is not None:
                    out[p.name] = found
                    continue
            if not p.has_default:
                raise InjectionError(f"handler {self.name}: nothing provides {p.name!r}")
        return out


def plan(fn: Callable[..., Any]) -> HandlerPlan:
    """Inspect ``fn`` once: its parameters (by name and class annotation)."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:   # unresolvable forward references: fall back to names
        hints = {}
    params: list[_Param] = []
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.kind is param.POSITIONAL_ONLY:
            raise InjectionError(f"handler {fn.__name__}: positional-only parameter "
                                 f"{param.name!r} cannot be injected")
        hint = hints.get(param.name)
        kind = hint if isinstance(hint, type) else None
        params.append(_Param(param.name, kind, param.default is not param.empty))
    return HandlerPlan(fn, getattr(fn, "__qualname__", repr(fn)), tuple(params),
                       inspect.iscoroutinefunction(fn))
