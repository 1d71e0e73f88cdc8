"""``StateMachine``: applies committed commands; snapshots and restores its state.

It dispatches each command to the component that owns it (see `COMPONENTS` and
``component.Component``), keeps effective time and the applied index, and answers
retried proposals through ``dedupe.RequestDedupe``. See the package docstring for the
contract; in short, ``apply`` is deterministic and never raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flexcore.statemachine.cluster import ClusterRegistry
from flexcore.statemachine.codec import (
    Command,
    MalformedCommand,
    decode_batch,
    pack_plain,
    unpack_plain,
)
from flexcore.statemachine.component import Component, Context, Handler
from flexcore.statemachine.dedupe import RequestDedupe
from flexcore.statemachine.events import EventLog, StoredEvent
from flexcore.statemachine.groups import ConsumerGroups
from flexcore.statemachine.pipelines import Pipelines
from flexcore.statemachine.queues import QueueStore
from flexcore.statemachine.result import (
    INTERNAL,
    INVALID,
    MALFORMED,
    UNKNOWN_COMMAND,
    Err,
    Ok,
    Result,
)
from flexcore.statemachine.schedules import Schedules
from flexcore.statemachine.validation import Invalid, check_keys
from flexcore.statemachine.workflows import Workflows

SNAPSHOT_FORMAT = 1

# The parts of the replicated state, in snapshot order: (snapshot key, component class).
# A new capability adds one line here.
COMPONENTS: tuple[tuple[str, type[Component]], ...] = (
    ("events", EventLog),
    ("nodes", ClusterRegistry),
    ("queues", QueueStore),
    ("schedules", Schedules),
    ("workflows", Workflows),
    ("groups", ConsumerGroups),
    ("pipelines", Pipelines),
)
_BASE_KEYS = frozenset({"format", "applied_index", "clock_ms", "dedupe"})


class SnapshotError(ValueError):
    """A snapshot cannot be restored (corrupt, wrong shape or unknown format)."""


def _name(value: object) -> str:
    return value[:64] if isinstance(value, str) else type(value).__name__


class StateMachine:
    """The replicated state of a FlexCore cluster. Not thread-safe: callers serialise
    ``apply*``/``restore`` and hold the same lock around reads."""

    def __init__(self) -> None:
        self._applied_index = 0
        self._clock_ms = 0
        self._dedupe = RequestDedupe()
        self._install({key: cls() for key, cls in COMPONENTS})

    def _install(self, parts: dict[str, Component]) -> None:
        self._parts = parts
        self._handlers: dict[str, Handler] = {"noop": self._noop}
        for part in parts.values():
            for type_, handler in part.commands().items():
                assert type_ not in self._handlers, f"two handlers for {type_}"
                self._handlers[type_] = handler

    def component(self, key: str) -> Any:
        """The component stored under ``key`` in `COMPONENTS` (for read-side queries)."""
        return self._parts[key]

    @property
    def _events(self) -> EventLog:
        part = self._parts["events"]
        assert isinstance(part, EventLog)
        return part

    @property
    def _cluster(self) -> ClusterRegistry:
        part = self._parts["nodes"]
        assert isinstance(part, ClusterRegistry)
        return part

    # --- properties ----------------------------------------------------------------

    @property
    def applied_index(self) -> int:
        """The largest Raft log index passed to ``apply``/``apply_batch``."""
        return self._applied_index

    @property
    def clock_ms(self) -> int:
        """Effective time: the largest ``ts`` of any applied command (ms since epoch)."""
        return self._clock_ms

    # --- write side ----------------------------------------------------------------

    def apply(self, cmd: Command, index: int) -> Result:
        """Apply one committed command carried by the log entry at ``index``.

        Never raises. A command whose ``rid`` was already applied (and is still
        remembered) returns the first application's result and changes nothing but the
        applied index and the effective time.
        """
        try:
            return self._apply(cmd, index)
        except Exception as exc:  # last resort: a raise here would wedge the cluster
            return Err(INTERNAL, f"applying the command failed: {type(exc).__name__}: "
                                 f"{str(exc)[:200]}")

    def apply_batch(self, raw: bytes, index: int) -> list[Result]:
        """Decode a batch (``codec.encode_batch``) and apply each command in order.

        Never raises. An undecodable item gives ``Err("malformed" |
        "unsupported_version", ...)`` in its place; an undecodable batch gives a single
        ``Err("malformed", ...)``.
        """
        try:
            self._advance_index(index)
            try:
                items = decode_batch(raw)
            except MalformedCommand as exc:
                return [Err(exc.code, exc.message)]
            return [Err(item.code, item.message) if isinstance(item, MalformedCommand)
                    else self.apply(item, index) for item in items]
        except Exception as exc:
            return [Err(INTERNAL, f"applying the batch failed: {type(exc).__name__}")]

    def _advance_index(self, index: int) -> None:
        if type(index) is int and index > self._applied_index:
            self._applied_index = index

    def _apply(self, cmd: Command, index: int) -> Result:
        self._advance_index(index)
        if not isinstance(cmd, Command):
            return Err(MALFORMED, f"expected a Command, got {type(cmd).__name__}")
        if type(cmd.ts) is not int or cmd.ts < 0:
            return Err(MALFORMED, "command ts must be a non-negative integer")
        if cmd.rid is not None and not isinstance(cmd.rid, str):
            return Err(MALFORMED, "command rid must be a string or None")
        self._clock_ms = max(self._clock_ms, cmd.ts)
        if cmd.rid is not None:
            earlier = self._dedupe.get(cmd.rid)
            if earlier is not None:
                return earlier
        result = self._dispatch(cmd, Context(now_ms=self._clock_ms, index=index))
        if cmd.rid is not None:
            self._dedupe.remember(cmd.rid, result)
        return result

    def _dispatch(self, cmd: Command, ctx: Context) -> Result:
        handler = self._handlers.get(cmd.type) if isinstance(cmd.type, str) else None
        if handler is None:
            return Err(UNKNOWN_COMMAND, f"unknown command type {_name(cmd.type)!r}")
        if not isinstance(cmd.body, dict):
            return Err(INVALID, f"body must be a map, got {type(cmd.body).__name__}")
        try:
            return Ok(handler(cmd.body, ctx))
        except Invalid as exc:  # Refused carries another code (see validation)
            return Err(exc.code, str(exc))
        except Exception as exc:
            return Err(INTERNAL, f"{cmd.type} failed: {type(exc).__name__}: "
                                 f"{str(exc)[:200]}")

    def _noop(self, body: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        check_keys(body, "body", required=())
        return {}

    # --- read side (pure queries) ---------------------------------------------------

    def read_events(self, after: int, limit: int, type_glob: str | None = None,
                    max_scan: int = 10_000, partition: tuple[int, int] | None = None,
                    ) -> tuple[list[dict[str, Any]], int]:
        """Retained events with offset > ``after``, ascending by offset.

        Scans at most ``max_scan`` events from the first offset after ``after`` (or
        from the oldest retained event when ``after`` points before it), keeps those
        whose type matches ``type_glob`` (``fnmatch.fnmatchcase``; all when None) and
        stops after ``limit`` matches. Returns ``(events, next)``: ``next`` is the offset
        of the last event scanned, so passing it back as ``after`` continues exactly
        where this read stopped, even when the filter matched nothing in the scanned
        window. When nothing was scanned, ``next`` is ``max(after, first_offset - 1)``:
        never behind the retained log (a client that fell behind retention skips the
        trimmed gap) and never backwards for a client that is ahead of this replica.
        Events are fresh dicts; mutating them does not change the machine.
        ``partition=(count, number)`` keeps only the events of that consumer-group
        partition (``events.event_partition``).
        """
        return self._events.read(after, limit, type_glob, max_scan, partition)

    def event_window(self, after: int, max_scan: int = 100_000,
                     ) -> tuple[list[StoredEvent], bool]:
        """A copy of up to ``max_scan`` events above ``after`` (immutable, readable
        without the lock) and whether it reaches the newest; see ``EventLog.window``.
        A group's lag is ``events.backlog_counts`` over the window above its lowest
        committed offset."""
        return self._events.window(after, max_scan)

    def event_stats(self) -> dict[str, int]:
        """``{"first_offset", "last_offset", "count", "max_events"}`` (0 = unlimited)."""
        return self._events.stats()

    def nodes(self) -> dict[str, dict[str, Any]]:
        """Registered nodes: Raft address -> ``{"api": url, "registered_ts": ms}``."""
        return self._cluster.nodes()

    # --- snapshot ------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """All state as msgpack ``{"format": 1, ...}``; equal states give equal bytes."""
        doc: dict[str, Any] = {
            "format": SNAPSHOT_FORMAT,
            "applied_index": self._applied_index,
            "clock_ms": self._clock_ms,
            "dedupe": self._dedupe.to_snapshot(),
        }
        for key, _cls in COMPONENTS:
            doc[key] = self._parts[key].to_snapshot()
        return pack_plain(doc)

    def restore(self, data: bytes) -> None:
        """Replace all state with a ``snapshot()``.

        Raises ``SnapshotError`` for anything that is not a complete, consistent
        snapshot of a known format; the current state is then left untouched.
        """
        try:
            obj = unpack_plain(bytes(data), max_container_len=2**32 - 1)
        except Exception as exc:
            raise SnapshotError(f"snapshot is not valid msgpack ({type(exc).__name__})") \
                from None
        if not isinstance(obj, dict):
            raise SnapshotError("snapshot must be a msgpack map")
        if obj.get("format") != SNAPSHOT_FORMAT or type(obj.get("format")) is not int:
            raise SnapshotError(f"unknown snapshot format {_name(obj.get('format'))!r} "
                                f"(this node reads format {SNAPSHOT_FORMAT})")
        known = _BASE_KEYS | {key for key, _cls in COMPONENTS}
        if not set(obj) >= _BASE_KEYS or not set(obj) <= known:
            raise SnapshotError(f"snapshot keys must be {', '.join(sorted(_BASE_KEYS))} and "
                                f"component sections among {', '.join(sorted(known))}")
        applied_index, clock_ms = obj["applied_index"], obj["clock_ms"]
        if type(applied_index) is not int or type(clock_ms) is not int:
            raise SnapshotError("snapshot applied_index and clock_ms must be integers")
        try:
            # A section missing from an older snapshot starts empty.
            parts: dict[str, Component] = {
                key: cls.from_snapshot(obj[key]) if key in obj else cls()
                for key, cls in COMPONENTS}
            dedupe = RequestDedupe.from_snapshot(obj["dedupe"])
        except Exception as exc:
            raise SnapshotError(f"snapshot is inconsistent: {exc}") from None
        # Everything parsed: swap it in (no step below can fail).
        self._applied_index = applied_index
        self._clock_ms = clock_ms
        self._install(parts)
        self._dedupe = dedupe
