"""The replicated event log: dense 1-based offsets, idempotent ids, count retention.

Owns the ``event.publish`` and ``events.set_retention`` commands and the read side
(``read``, ``stats``). Pure data: no clock (the caller passes effective time), no I/O.

Storage: a list of immutable ``StoredEvent`` tuples plus a head pointer. Offsets are
dense, so the event with offset ``o`` sits at ``_events[_head + o - first_offset]``:
locating an offset is O(1). Retention advances the head and compacts the list once the
dropped prefix is at least half of it, so trimming costs amortised O(1) per event.
Payloads are kept as msgpack bytes: immutable (a reader cannot alias internal state,
each read decodes a fresh copy), compact, and written into snapshots as they are.

Idempotency: an event ``id`` that is present among the *retained* events is not
appended again; its first offset is returned with ``duplicate=True``. Retention drops an
event's id from that index together with the event, so re-publishing an id whose event
was trimmed appends it again under a new offset.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any, NamedTuple

from flexcore.statemachine.codec import pack_plain, unpack_plain
from flexcore.statemachine.component import Handler
from flexcore.statemachine.validation import (
    Invalid,
    check_keys,
    optional_str,
    require_int,
    require_map,
    require_str,
)

DEFAULT_MAX_EVENTS = 1_000_000
MAX_EVENTS_PER_PUBLISH = 1000
MAX_EVENT_TYPE_LENGTH = 256
MAX_EVENT_KEY_LENGTH = 1024
MAX_EVENT_ID_LENGTH = 256
_MAX_RETENTION = 2**63 - 1
_COMPACT_MIN_HEAD = 1024


def event_partition(key: str | None, event_id: str, partitions: int) -> int:
    """The consumer-group partition of an event: CRC-32 of its key (of its id when it
    has no key) modulo ``partitions``. Every node computes the same; events of one key
    share a partition, so per-key order is the log's order."""
    return zlib.crc32((event_id if key is None else key).encode("utf-8", "surrogatepass")) \
        % partitions


def backlog_counts(events: Iterable[StoredEvent], committed: Sequence[int]) -> list[int]:
    """Per partition ``p``, how many of ``events`` fall in ``p`` above ``committed[p]``."""
    counts = [0] * len(committed)
    for event in events:
        p = event_partition(event.key, event.id, len(committed))
        if event.offset > committed[p]:
            counts[p] += 1
    return counts


class StoredEvent(NamedTuple):
    offset: int
    id: str
    type: str
    key: str | None
    payload: bytes  # msgpack
    ts: int

    def to_dict(self) -> dict[str, Any]:
        """A fresh dict; the payload is decoded anew, so callers may mutate it."""
        return {"offset": self.offset, "id": self.id, "type": self.type, "key": self.key,
                "payload": unpack_plain(self.payload), "ts": self.ts}


class _NewEvent(NamedTuple):
    id: str
    type: str
    key: str | None
    payload: bytes


def _validate_publish(body: Mapping[str, Any]) -> list[_NewEvent]:
    check_keys(body, "body", required=("events",))
    events = body["events"]
    if not isinstance(events, list) or not 1 <= len(events) <= MAX_EVENTS_PER_PUBLISH:
        raise Invalid(f"body.events must be a list of 1 to {MAX_EVENTS_PER_PUBLISH} events")
    prepared: list[_NewEvent] = []
    for number, raw_event in enumerate(events):
        where = f"events[{number}]"
        event = require_map(raw_event, where)
        check_keys(event, where, required=("type", "id"), optional=("payload", "key"))
        type_ = require_str(event, "type", where, max_len=MAX_EVENT_TYPE_LENGTH)
        event_id = require_str(event, "id", where, max_len=MAX_EVENT_ID_LENGTH)
        key = optional_str(event, "key", where, max_len=MAX_EVENT_KEY_LENGTH,
                           allow_empty=True)
        try:
            payload = pack_plain(event.get("payload"))
            unpack_plain(payload)  # readers must always be able to decode it
        except Exception:
            raise Invalid(f"{where}.payload is not plain msgpack data (only nil, bool, "
                          "64-bit int, float, str, bin, list and string-keyed map; "
                          "moderate nesting)") from None
        prepared.append(_NewEvent(event_id, type_, key, payload))
    return prepared


class EventLog:
    """Events, their id index and the retention limit."""

    def __init__(self, max_events: int = DEFAULT_MAX_EVENTS, first_offset: int = 1) -> None:
        self._events: list[StoredEvent] = []
        self._head = 0  # index in _events of the first retained event
        self._next_offset = first_offset
        self._max_events = max_events  # 0 = unlimited
        self._offset_by_id: dict[str, int] = {}

    # --- read side -----------------------------------------------------------------

    @property
    def count(self) -> int:
        return len(self._events) - self._head

    @property
    def first_offset(self) -> int:
        """Offset of the oldest retained event; ``last_offset + 1`` when none is."""
        return self._next_offset - self.count

    @property
    def last_offset(self) -> int:
        """Offset of the newest event ever appended (0 before the first)."""
        return self._next_offset - 1

    @property
    def max_events(self) -> int:
        return self._max_events

    def stats(self) -> dict[str, int]:
        return {"first_offset": self.first_offset, "last_offset": self.last_offset,
                "count": self.count, "max_events": self._max_events}

    def read(self, after: int, limit: int, type_glob: str | None,
             max_scan: int, partition: tuple[int, int] | None = None,
             ) -> tuple[list[dict[str, Any]], int]:
        """Events with offset > ``after``, ascending; see ``StateMachine.read_events``.
        ``partition`` = ``(count, number)`` keeps only events of that partition
        (`event_partition`); payloads of the others are not decoded."""
        first = self.first_offset
        cursor = max(after, first - 1)
        if limit <= 0 or max_scan <= 0:
            return [], cursor
        start = cursor + 1
        stop = min(self.last_offset, cursor + max_scan)
        found: list[dict[str, Any]] = []
        base = self._head - first
        for offset in range(start, stop + 1):
            event = self._events[base + offset]
            cursor = offset
            if partition is not None and event_partition(
                    event.key, event.id, partition[0]) != partition[1]:
                continue
            if type_glob is None or fnmatchcase(event.type, type_glob):
                found.append(event.to_dict())
                if len(found) >= limit:
                    break
        return found, cursor

    def window(self, after: int, max_scan: int) -> tuple[list[StoredEvent], bool]:
        """Up to ``max_scan`` retained events with an offset above ``after``, oldest
        first, as a new list of immutable tuples (safe to read after the lock is
        released), and whether it reaches the newest event."""
        start = max(after + 1, self.first_offset)
        stop = min(self.last_offset, start + max_scan - 1)
        base = self._head - self.first_offset
        return self._events[base + start:base + stop + 1], stop >= self.last_offset

    # --- commands (validate everything, then mutate) ---------------------------------

    def commands(self) -> Mapping[str, Handler]:
        return {
            "event.publish": lambda body, ctx: self.publish(body, ctx.now_ms),
            "events.set_retention": lambda body, ctx: self.set_retention(body),
        }

    def publish(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        prepared = _validate_publish(body)
        offsets: list[int] = []
        ids: list[str] = []
        duplicates: list[bool] = []
        for new in prepared:
            existing = self._offset_by_id.get(new.id)
            if existing is None:
                offset = self._next_offset
                self._events.append(
                    StoredEvent(offset, new.id, new.type, new.key, new.payload, now))
                self._offset_by_id[new.id] = offset
                self._next_offset += 1
                offsets.append(offset)
                duplicates.append(False)
            else:
                offsets.append(existing)
                duplicates.append(True)
            ids.append(new.id)
        self._trim()  # after the batch: a duplicate within it refers to its first copy
        return {"offsets": offsets, "ids": ids, "duplicates": duplicates}

    def set_retention(self, body: Mapping[str, Any]) -> dict[str, Any]:
        check_keys(body, "body", required=("max_events",))
        self._max_events = require_int(body, "max_events", "body", minimum=0,
                                       maximum=_MAX_RETENTION)
        self._trim()
        return {"max_events": self._max_events, "first_offset": self.first_offset}

    def _trim(self) -> None:
        excess = self.count - self._max_events
        if self._max_events == 0 or excess <= 0:
            return
        for index in range(self._head, self._head + excess):
            dropped = self._events[index]
            if self._offset_by_id.get(dropped.id) == dropped.offset:
                del self._offset_by_id[dropped.id]
        self._head += excess
        if self._head >= _COMPACT_MIN_HEAD and 2 * self._head >= len(self._events):
            del self._events[: self._head]
            self._head = 0

    # --- snapshot ------------------------------------------------------------------

    def to_snapshot(self) -> dict[str, Any]:
        return {
            "first_offset": self.first_offset,
            "max_events": self._max_events,
            "events": [[e.id, e.type, e.key, e.payload, e.ts]
                       for e in self._events[self._head:]],
        }

    @classmethod
    def from_snapshot(cls, obj: object) -> EventLog:
        """Rebuild from ``to_snapshot()`` output; ``ValueError`` if it is inconsistent."""
        if not isinstance(obj, dict) or set(obj) != {"first_offset", "max_events", "events"}:
            raise ValueError("events section must be a map with first_offset, max_events, "
                             "events")
        first, max_events, rows = obj["first_offset"], obj["max_events"], obj["events"]
        if type(first) is not int or first < 1:
            raise ValueError("events.first_offset must be an integer >= 1")
        if type(max_events) is not int or not 0 <= max_events <= _MAX_RETENTION:
            raise ValueError("events.max_events must be a non-negative integer")
        if not isinstance(rows, list):
            raise ValueError("events.events must be a list")
        if max_events and len(rows) > max_events:
            raise ValueError("events.events holds more events than max_events")
        log = cls(max_events=max_events, first_offset=first)
        for number, row in enumerate(rows):
            offset = first + number
            if not (isinstance(row, list) and len(row) == 5):
                raise ValueError(f"event at offset {offset} must be a 5-item list")
            event_id, type_, key, payload, ts = row
            if not (isinstance(event_id, str) and isinstance(type_, str)
                    and (key is None or isinstance(key, str))
                    and isinstance(payload, bytes) and type(ts) is int):
                raise ValueError(f"event at offset {offset} has fields of the wrong type")
            if event_id in log._offset_by_id:
                raise ValueError(f"event at offset {offset} repeats an id")
            unpack_plain(payload)  # raises ValueError if unreadable
            log._events.append(StoredEvent(offset, event_id, type_, key, payload, ts))
            log._offset_by_id[event_id] = offset
        log._next_offset = first + len(rows)
        return log
