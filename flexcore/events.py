"""Events as the library sees them: `Event`, `Retry`, `Subscription` (filters and
transforms of ``@app.on_event``) and `EventFeed` (the applied log, woken by Raft).

`Subscription` decides, on the node that delivers an event, whether a handler wants it
and what it sees:

- **type**: a glob over the event type (``fnmatch``, as ``GET /v1/events?type=``);
- **where**: a JMESPath expression (truthy under JMESPath rules: null, false, "", []
  and {} are false, 0 is true) or a callable ``(Event) -> bool``. Expressions see the
  whole event ``{offset, id, type, key, payload, ts}`` — the same shape as Windmill
  routing conditions — so payload fields are ``payload.total``;
- **time window**: ``since`` / ``until`` (a ``datetime`` or Unix seconds) over the
  event's ``ts``, half-open ``[since, until)``;
- **transforms**: a chain applied before the handler, each step a JMESPath projection
  over the event (its result becomes the payload) or a callable ``(Event) -> Event |
  value`` (an `Event` replaces the event, any other value becomes the payload). The
  handler sees the last step's event; ``event.original_payload`` keeps what was
  published.

An event a filter rejects counts as done for its group (its offset is committed). An
exception raised by ``where`` or a transform is the handler's failure: retried per its
`Retry`, then dead-lettered — user code decides, not the framework.

`EventFeed` reads the applied log under the Raft lock and lets readers wait for the
next apply (a Raft change listener resolves their futures: no polling). The SSE route
and the group consumers both use it; ``close()`` wakes every waiter when the node stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any

from jmespath.parser import ParsedResult

from .di import HandlerPlan
from .raft import RaftNode
from .statemachine import StateMachine
from .windmill.routing import ExpressionError, compile_expression, truthy

__all__ = ["Event", "EventFeed", "Retry", "Subscription", "Transform", "Where"]


@dataclass(frozen=True, slots=True)
class Event:
    """One event of the log, as a handler receives it."""

    offset: int
    id: str
    type: str
    key: str | None
    payload: Any
    ts: int                      # ms since the epoch, stamped by the proposer
    original_payload: Any = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        return cls(d["offset"], d["id"], d["type"], d["key"], d["payload"], d["ts"],
                   d["payload"])

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.ts / 1000, UTC)

    def to_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "id": self.id, "type": self.type, "key": self.key,
                "payload": self.payload, "ts": self.ts}


@dataclass(frozen=True)
class Retry:
    """How a group handler is retried on the node that delivers the event: up to
    ``max_attempts`` calls in all; before attempt ``n + 1`` it waits ``backoff(n)`` when
    ``backoff`` is a callable, else ``min(backoff * factor ** (n - 1), max_backoff)``
    seconds. After the last failed attempt the event goes to the group's dead letters
    and the group moves on. Attempts are counted in memory: a node that takes a
    partition over after a crash starts again at attempt 1."""

    max_attempts: int = 3
    backoff: float | Callable[[int], float] = 0.5
    factor: float = 2.0
    max_backoff: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 1000:
            raise ValueError("Retry.max_attempts must be from 1 to 1000")
        if not callable(self.backoff) and not (0 <= self.backoff <= 3600):
            raise ValueError("Retry.backoff must be from 0 to 3600 seconds or a callable")
        if not (self.factor >= 1 and 0 <= self.max_backoff <= 3600):
            raise ValueError("Retry.factor must be >= 1, max_backoff 0 to 3600 seconds")

    def delay(self, failed_attempt: int) -> float:
        if callable(self.backoff):
            return max(0.0, float(self.backoff(failed_attempt)))
        return float(min(self.backoff * self.factor ** (failed_attempt - 1),
                         self.max_backoff))


Where = str | Callable[[Event], bool]
Transform = str | Callable[[Event], Any]


def _ms(value: datetime | float | None, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{what} must be timezone-aware")
        return round(value.timestamp() * 1000)
    if isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{what} must be a datetime or Unix seconds")
    return round(value * 1000)


def _compile(expr: str, what: str) -> ParsedResult:
    try:
        return compile_expression(expr, what)
    except ExpressionError as exc:
        raise ValueError(str(exc)) from None


@dataclass
class Subscription:
    """One ``@app.on_event`` handler: what it matches and how it is called."""

    name: str
    pattern: str
    group: str | None                    # None: broadcast (every node)
    plan: HandlerPlan
    retry: Retry = field(default_factory=Retry)
    where: Where | None = None
    since: datetime | float | None = None
    until: datetime | float | None = None
    transforms: Sequence[Transform] = ()
    _where: Callable[[Event], bool] | None = field(init=False, repr=False, default=None)
    _steps: list[Callable[[Event], Event]] = field(init=False, repr=False,
                                                   default_factory=list)
    _window: tuple[int | None, int | None] = field(init=False, repr=False,
                                                   default=(None, None))

    def __post_init__(self) -> None:
        if not self.pattern or len(self.pattern) > 256:
            raise ValueError("the event type pattern must be 1 to 256 characters")
        where = self.where
        if isinstance(where, str):
            expr = _compile(where, "where")
            self._where = lambda ev: truthy(expr.search(ev.to_dict()))
        elif where is not None:
            self._where = where
        self._window = (_ms(self.since, "since"), _ms(self.until, "until"))
        for number, step in enumerate(self.transforms):
            self._steps.append(_transform_step(step, f"transform[{number}]"))

    def matches(self, event: Event) -> bool:
        """Type glob and time window (cheap, never raise), then ``where`` (may raise:
        the caller treats that as a handler failure)."""
        if not fnmatchcase(event.type, self.pattern):
            return False
        since, until = self._window
        if (since is not None and event.ts < since) or (until is not None
                                                        and event.ts >= until):
            return False
        return self._where is None or bool(self._where(event))

    def transform(self, event: Event) -> Event:
        for step in self._steps:
            event = step(event)
        return event


def _transform_step(step: Transform, what: str) -> Callable[[Event], Event]:
    if isinstance(step, str):
        expr = _compile(step, what)
        return lambda ev: replace(ev, payload=expr.search(ev.to_dict()))
    if not callable(step):
        raise ValueError(f"{what} must be a JMESPath string or a callable")

    def call(ev: Event) -> Event:
        out = step(ev)
        return out if isinstance(out, Event) else replace(ev, payload=out)
    return call


class EventFeed:
    """The applied event log of this node, with waiting for the next apply."""

    def __init__(self, raft: RaftNode, machine: StateMachine) -> None:
        self.raft = raft
        self.machine = machine
        self._waiters: set[asyncio.Future[None]] = set()
        self._closed = False
        raft.add_change_listener(self._on_change)

    @property
    def closed(self) -> bool:
        return self._closed

    def read(self, after: int, limit: int, type_glob: str | None = None,
             partition: tuple[int, int] | None = None,
             max_scan: int = 10_000) -> tuple[list[dict[str, Any]], int]:
        with self.raft.lock:
            return self.machine.read_events(after, limit, type_glob, max_scan, partition)

    def last_offset(self) -> int:
        with self.raft.lock:
            return self.machine.event_stats()["last_offset"]

    async def wait(self, timeout: float) -> None:
        """Return after the next apply (or leadership change), ``close()``, or
        ``timeout`` seconds, whichever is first."""
        if self._closed:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, timeout)
        finally:
            self._waiters.discard(fut)

    def _on_change(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def wake(self) -> None:
        """Wake every waiter now (they re-check what they wait for)."""
        self._on_change()

    def close(self) -> None:
        self._closed = True
        self._on_change()
