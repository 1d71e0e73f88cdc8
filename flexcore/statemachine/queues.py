"""Durable work queues: ready / delayed / leased / dead messages, per named queue.

Owns the ``queue.*`` commands (enqueue, lease, ack, nack, extend, configure, purge,
redrive) and the read side (``list_stats``, ``info``, ``dead``, ``wake_hint``). Pure
data: time is the effective time the machine passes in (``ctx.now_ms``), ids come from
counters kept in the state, so every node computes the same ids.

A message is in exactly one state:

- **ready**: leasable now. Order: higher ``priority`` first, then ``seq`` (enqueue
  order; a redelivered message keeps its ``seq``, so it goes back to its place in line).
- **delayed**: becomes ready at ``due`` (``delay_ms`` / ``deliver_at`` on enqueue, or a
  nack with a delay).
- **leased**: handed to a consumer until ``due`` (lease time + visibility timeout) under
  a ``lease_id`` that names this one delivery. Ack removes the message; nack returns it
  (now or after a delay); extend moves ``due`` (same lease, same attempt); an expired
  lease returns it to ready. Each lease counts one ``attempt``; when a lease that was
  attempt ``max_deliveries`` ends in a nack or an expiry, the message moves to the
  queue's dead letters with its last error (at most ``max_dead`` are kept, default
  10,000: the oldest are dropped first and counted in ``dead_dropped``).
- **dead**: kept (oldest first) until redriven (back to ready, attempts reset) or purged.

No timer runs anywhere: time-driven moves (delayed -> ready, lease expiry) are applied
lazily by the next command on that queue (``_promote``), using the command's effective
time. An ack/nack/extend whose lease is not the message's current, unexpired lease is
refused with ``lease_expired`` and changes nothing, so a late ack never acks a
redelivery. The lease ids of the last ``MAX_SETTLED`` acks and nacks are remembered,
so the refusal of a repeat says "lease already acked" (or nacked): a client whose
first ack timed out learns that it committed, rather than "expired", which then means
it did not.

Storage per queue: ``messages`` (id -> ``_Msg``, every live message), three heaps with
lazy deletion — ready ``(-priority, seq)``, delayed ``(due, seq)``, leased ``(due, seq)``
— whose entries carry the message's ``gen`` (bumped on every move) so a stale entry is
skipped when popped; ``leases`` (lease id -> message id) for O(1) ack; ``dead`` (id ->
message, in order of death); ``dedup`` (dedup id -> (message id, expiry)) with an
expiry heap. Leasing, acking and enqueueing cost O(log n). Heap keys are total orders
(``seq`` is unique), so pop order does not depend on heap layout, and a snapshot
(messages sorted by ``seq``) rebuilds heaps that behave identically.
"""

from __future__ import annotations

import heapq
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from flexcore.statemachine.codec import pack_plain, unpack_plain
from flexcore.statemachine.component import Handler
from flexcore.statemachine.validation import (
    Invalid,
    Refused,
    check_keys,
    optional_str,
    require_int,
    require_map,
    require_str,
)

QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LEASE_EXPIRED = "lease_expired"
NOT_FOUND = "not_found"

MAX_QUEUES = 10_000
MAX_ENQUEUE_BATCH = 1000
MAX_LEASE_BATCH = 100
MAX_REDRIVE_BATCH = 10_000
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000
MAX_DELAY_MS = 30 * 24 * 3600 * 1000          # 30 days
MIN_VISIBILITY_MS, MAX_VISIBILITY_MS = 100, 12 * 3600 * 1000
MAX_DELIVERIES_LIMIT = 10_000
MAX_DEDUP_WINDOW_MS = 7 * 24 * 3600 * 1000
MAX_ID_LENGTH = 256
MAX_ERROR_LENGTH = 2000
MAX_SETTLED = 50_000                          # lease ids of recent acks/nacks remembered
_TS_MAX = 2**63 - 1

DEFAULT_VISIBILITY_MS = 30_000
DEFAULT_MAX_DELIVERIES = 20                   # as RabbitMQ 4 quorum queues
DEFAULT_MAX_DEAD = 10_000                     # as consumer groups' dead letters
MAX_DEAD_LIMIT = 1_000_000
DEFAULT_DEDUP_WINDOW_MS = 300_000             # 5 minutes, as SQS FIFO

READY, DELAYED, LEASED, DEAD = 0, 1, 2, 3
_STATE_NAMES = ("ready", "delayed", "leased", "dead")
_TOTALS = ("enqueued", "duplicates", "leased", "acked", "nacked", "expired",
           "dead_lettered", "redriven", "purged", "dead_dropped")
_OPTION_KEYS = ("visibility_ms", "max_deliveries", "dedup_window_ms", "max_dead")
_EXPIRED_ERROR = "lease expired (visibility timeout)"
ACKED, NACKED = 1, 2                           # in the settled-lease memory
_SETTLED = {ACKED: "acked", NACKED: "nacked"}


class _Msg:
    __slots__ = ("attempt", "body", "consumer", "dedup_id", "due", "enqueued_at", "error",
                 "gen", "id", "lease_id", "priority", "seq", "state")

    def __init__(self, id: str, seq: int, body: bytes, priority: int, enqueued_at: int,
                 dedup_id: str | None) -> None:
        self.id = id
        self.seq = seq
        self.body = body                 # msgpack
        self.priority = priority
        self.enqueued_at = enqueued_at
        self.dedup_id = dedup_id
        self.attempt = 0                 # leases so far
        self.state = READY
        self.due = 0                     # delayed: deliver at; leased: expires at; dead: died at
        self.lease_id: str | None = None
        self.consumer: str | None = None
        self.error: str | None = None
        self.gen = 0                     # bumped on every move; heap entries carry it

    def row(self) -> list[Any]:
        return [self.id, self.seq, self.body, self.priority, self.enqueued_at, self.attempt,
                self.state, self.due, self.lease_id, self.consumer, self.error,
                self.dedup_id]

    @classmethod
    def from_row(cls, row: object) -> _Msg:
        if not isinstance(row, list) or len(row) != 12:
            raise ValueError("a queue message must be a 12-item list")
        (id_, seq, body, priority, enqueued_at, attempt, state, due, lease_id, consumer,
         error, dedup_id) = row
        ints = (seq, priority, enqueued_at, attempt, state, due)
        if not (isinstance(id_, str) and isinstance(body, bytes)
                and all(type(v) is int for v in ints) and state in (READY, DELAYED,
                                                                    LEASED, DEAD)
                and all(v is None or isinstance(v, str)
                        for v in (lease_id, consumer, error, dedup_id))):
            raise ValueError("a queue message has fields of the wrong type")
        if (state == LEASED) != (lease_id is not None):
            raise ValueError(f"message {id_[:64]}: lease id and state disagree")
        unpack_plain(body)
        m = cls(id_, seq, body, priority, enqueued_at, dedup_id)
        m.attempt, m.state, m.due = attempt, state, due
        m.lease_id, m.consumer, m.error = lease_id, consumer, error
        return m


class _Queue:
    """One named queue (see the module docstring for the structures)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.visibility_ms = DEFAULT_VISIBILITY_MS
        self.max_deliveries = DEFAULT_MAX_DELIVERIES
        self.dedup_window_ms = DEFAULT_DEDUP_WINDOW_MS
        self.max_dead = DEFAULT_MAX_DEAD
        self.messages: dict[str, _Msg] = {}
        self.ready: list[tuple[int, int, str, int]] = []     # (-priority, seq, id, gen)
        self.delayed: list[tuple[int, int, str, int]] = []   # (due, seq, id, gen)
        self.leased: list[tuple[int, int, str, int]] = []    # (due, seq, id, gen)
        self.counts = [0, 0, 0]                              # ready, delayed, leased
        self.leases: dict[str, str] = {}                     # lease id -> message id
        self.dead: dict[str, _Msg] = {}                      # in order of death
        self.dedup: dict[str, tuple[str, int]] = {}          # dedup id -> (msg id, expiry)
        self.dedup_heap: list[tuple[int, str]] = []          # (expiry, dedup id)
        self.totals = dict.fromkeys(_TOTALS, 0)

    # -- moves (the only code that changes a message's state) ------------------------

    def _valid(self, entry: tuple[int, int, str, int], state: int) -> _Msg | None:
        m = self.messages.get(entry[2])
        return m if m is not None and m.gen == entry[3] and m.state == state else None

    def place(self, m: _Msg, state: int, due: int = 0) -> None:
        """Put a live message (new or moving) into ``state``."""
        if m.id in self.messages and m.state != DEAD:
            self.counts[m.state] -= 1
        else:
            self.messages[m.id] = m
        if m.state == LEASED and m.lease_id is not None:
            del self.leases[m.lease_id]
            m.lease_id = None
        m.gen += 1
        m.state, m.due = state, due
        self.counts[state] += 1
        if state == READY:
            heapq.heappush(self.ready, (-m.priority, m.seq, m.id, m.gen))
        elif state == DELAYED:
            heapq.heappush(self.delayed, (due, m.seq, m.id, m.gen))
        else:
            heapq.heappush(self.leased, (due, m.seq, m.id, m.gen))

    def remove(self, m: _Msg) -> None:
        """Take a live message out (ack, purge, dead-letter)."""
        self.counts[m.state] -= 1
        if m.lease_id is not None:
            del self.leases[m.lease_id]
            m.lease_id = None
        m.gen += 1
        del self.messages[m.id]

    def kill(self, m: _Msg, error: str | None, now: int) -> None:
        self.remove(m)
        m.state, m.due, m.error = DEAD, now, error
        self.dead[m.id] = m
        self.totals["dead_lettered"] += 1
        self.trim_dead()

    def trim_dead(self) -> None:
        """Keep at most ``max_dead`` dead letters: the oldest go first (counted)."""
        while len(self.dead) > self.max_dead:
            del self.dead[next(iter(self.dead))]
            self.totals["dead_dropped"] += 1

    def promote(self, now: int) -> None:
        """Apply what time did: due delayed messages become ready, expired leases end."""
        while self.delayed and self.delayed[0][0] <= now:
            m = self._valid(heapq.heappop(self.delayed), DELAYED)
            if m is not None:
                self.place(m, READY)
        while self.leased and self.leased[0][0] <= now:
            m = self._valid(heapq.heappop(self.leased), LEASED)
            if m is None:
                continue
            self.totals["expired"] += 1
            if m.attempt >= self.max_deliveries:
                self.kill(m, _EXPIRED_ERROR if m.error is None else
                          f"{_EXPIRED_ERROR}; last error: {m.error}", now)
            else:
                self.place(m, READY)
        while self.dedup_heap and self.dedup_heap[0][0] <= now:
            expiry, dedup_id = heapq.heappop(self.dedup_heap)
            entry = self.dedup.get(dedup_id)
            if entry is not None and entry[1] == expiry:
                del self.dedup[dedup_id]

    def next_due(self, heap: list[tuple[int, int, str, int]], state: int) -> int | None:
        while heap and self._valid(heap[0], state) is None:
            heapq.heappop(heap)   # stale entry: dropping it changes nothing observable
        return heap[0][0] if heap else None

    # -- views -------------------------------------------------------------------------

    def options(self) -> dict[str, int]:
        return {"visibility_ms": self.visibility_ms, "max_deliveries": self.max_deliveries,
                "dedup_window_ms": self.dedup_window_ms, "max_dead": self.max_dead}

    def counts_view(self) -> dict[str, int]:
        return {"ready": self.counts[READY], "leased": self.counts[LEASED],
                "delayed": self.counts[DELAYED], "dead": len(self.dead)}


# --- body checks --------------------------------------------------------------------

def _queue_name(body: Mapping[str, Any]) -> str:
    name = require_str(body, "queue", "body", max_len=128)
    if not QUEUE_NAME.fullmatch(name):
        raise Invalid("body.queue must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}")
    return name


def _optional_int(body: Mapping[str, Any], key: str, where: str, *, minimum: int,
                  maximum: int) -> int | None:
    if body.get(key) is None:
        return None
    return require_int(body, key, where, minimum=minimum, maximum=maximum)


def _pack_body(value: Any, where: str) -> bytes:
    try:
        packed = pack_plain(value)
        unpack_plain(packed)   # consumers must always be able to decode it
    except Exception:
        raise Invalid(f"{where}.body is not plain msgpack data (nil, bool, 64-bit int, "
                      "float, str, bin, list, string-keyed map; moderate nesting)") from None
    return packed


def _check_options(body: Mapping[str, Any], where: str) -> dict[str, int]:
    check_keys(body, where, required=(), optional=_OPTION_KEYS)
    limits = {"visibility_ms": (MIN_VISIBILITY_MS, MAX_VISIBILITY_MS),
              "max_deliveries": (1, MAX_DELIVERIES_LIMIT),
              "dedup_window_ms": (0, MAX_DEDUP_WINDOW_MS),
              "max_dead": (1, MAX_DEAD_LIMIT)}
    return {key: require_int(body, key, where, minimum=lo, maximum=hi)
            for key, (lo, hi) in limits.items() if body.get(key) is not None}


def _message_out(m: _Msg) -> dict[str, Any]:
    return {"id": m.id, "body": unpack_plain(m.body), "lease_id": m.lease_id,
            "attempt": m.attempt, "priority": m.priority, "enqueued_at": m.enqueued_at,
            "expires_at": m.due}


class QueueStore:
    """Every queue of the cluster, and the counters that make ids."""

    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}
        self._next_seq = 1        # message sequence (ids, FIFO order), never reused
        self._next_lease = 1      # lease sequence, never reused
        self._settled: OrderedDict[str, int] = OrderedDict()   # lease id -> ACKED/NACKED

    # --- read side -----------------------------------------------------------------

    def list_stats(self) -> dict[str, dict[str, int]]:
        """Queue name -> ``{ready, leased, delayed, dead}``, sorted by name."""
        return {name: self._queues[name].counts_view() for name in sorted(self._queues)}

    def info(self, name: str) -> dict[str, Any] | None:
        """Counts, options and lifetime totals of one queue; None if it never existed."""
        q = self._queues.get(name)
        if q is None:
            return None
        return {"name": name, **q.counts_view(), "options": q.options(),
                "totals": dict(q.totals)}

    def dead(self, name: str, limit: int) -> list[dict[str, Any]] | None:
        """The oldest ``limit`` dead letters; None if the queue never existed."""
        q = self._queues.get(name)
        if q is None:
            return None
        out: list[dict[str, Any]] = []
        for m in q.dead.values():
            if len(out) >= limit:
                break
            out.append({"id": m.id, "body": unpack_plain(m.body), "attempt": m.attempt,
                        "priority": m.priority, "enqueued_at": m.enqueued_at,
                        "died_at": m.due, "error": m.error, "consumer": m.consumer})
        return out

    def wake_hint(self, name: str) -> tuple[int, int | None]:
        """``(ready, next_due)`` for a long-polling lease: how many messages are ready
        in the applied state, and the earliest effective time (ms) at which a delayed
        message becomes ready or a lease expires (None if neither is pending).
        Dropping stale heap entries here changes nothing a command can observe."""
        q = self._queues.get(name)
        if q is None:
            return 0, None
        dues = [d for d in (q.next_due(q.delayed, DELAYED), q.next_due(q.leased, LEASED))
                if d is not None]
        return q.counts[READY], min(dues) if dues else None

    # --- commands (validate everything, then mutate) ---------------------------------

    def commands(self) -> Mapping[str, Handler]:
        return {
            "queue.enqueue": lambda body, ctx: self.enqueue(body, ctx.now_ms),
            "queue.lease": lambda body, ctx: self.lease(body, ctx.now_ms),
            "queue.ack": lambda body, ctx: self.ack(body, ctx.now_ms),
            "queue.nack": lambda body, ctx: self.nack(body, ctx.now_ms),
            "queue.extend": lambda body, ctx: self.extend(body, ctx.now_ms),
            "queue.configure": lambda body, ctx: self.configure(body, ctx.now_ms),
            "queue.purge": lambda body, ctx: self.purge(body, ctx.now_ms),
            "queue.redrive": lambda body, ctx: self.redrive(body, ctx.now_ms),
        }

    def _get_or_create(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            if len(self._queues) >= MAX_QUEUES:
                raise Invalid(f"body.queue: the cluster already has {MAX_QUEUES} queues")
            q = self._queues[name] = _Queue(name)
        return q

    def enqueue(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """``{queue, messages: [{body, priority?, delay_ms? | deliver_at?, dedup_id?}]}``
        -> ``{ids, duplicates}``. Creates the queue on first use."""
        check_keys(body, "body", required=("queue", "messages"))
        name = _queue_name(body)
        items = body["messages"]
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_ENQUEUE_BATCH:
            raise Invalid(f"body.messages must be a list of 1 to {MAX_ENQUEUE_BATCH} messages")
        prepared = []
        for number, raw in enumerate(items):
            where = f"messages[{number}]"
            item = require_map(raw, where)
            check_keys(item, where, required=("body",),
                       optional=("priority", "delay_ms", "deliver_at", "dedup_id"))
            priority = _optional_int(item, "priority", where, minimum=MIN_PRIORITY,
                                     maximum=MAX_PRIORITY) or 0
            delay = _optional_int(item, "delay_ms", where, minimum=0, maximum=MAX_DELAY_MS)
            at = _optional_int(item, "deliver_at", where, minimum=0, maximum=_TS_MAX)
            if delay is not None and at is not None:
                raise Invalid(f"{where}: give delay_ms or deliver_at, not both")
            if at is not None and at > now + MAX_DELAY_MS:
                raise Invalid(f"{where}.deliver_at is more than 30 days ahead")
            due = now + delay if delay is not None else at if at is not None else 0
            dedup_id = optional_str(item, "dedup_id", where, max_len=MAX_ID_LENGTH)
            prepared.append((_pack_body(item["body"], where), priority, due, dedup_id))
        q = self._get_or_create(name)
        q.promote(now)
        ids: list[str] = []
        duplicates: list[bool] = []
        for packed, priority, due, dedup_id in prepared:
            earlier = q.dedup.get(dedup_id) if dedup_id is not None else None
            if earlier is not None:
                ids.append(earlier[0])
                duplicates.append(True)
                q.totals["duplicates"] += 1
                continue
            seq = self._next_seq
            self._next_seq += 1
            m = _Msg(str(seq), seq, packed, priority, now, dedup_id)
            if due > now:
                q.place(m, DELAYED, due)
            else:
                q.place(m, READY)
            if dedup_id is not None and q.dedup_window_ms > 0:
                expiry = now + q.dedup_window_ms
                q.dedup[dedup_id] = (m.id, expiry)
                heapq.heappush(q.dedup_heap, (expiry, dedup_id))
            q.totals["enqueued"] += 1
            ids.append(m.id)
            duplicates.append(False)
        return {"ids": ids, "duplicates": duplicates}

    def lease(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """``{queue, consumer, max?, visibility_ms?}`` -> ``{messages: [...]}`` (possibly
        empty); each message is ``{id, body, lease_id, attempt, priority, enqueued_at,
        expires_at}``. Never creates a queue."""
        check_keys(body, "body", required=("queue", "consumer"),
                   optional=("max", "visibility_ms"))
        name = _queue_name(body)
        consumer = require_str(body, "consumer", "body", max_len=MAX_ID_LENGTH)
        limit = _optional_int(body, "max", "body", minimum=1, maximum=MAX_LEASE_BATCH) or 1
        visibility = _optional_int(body, "visibility_ms", "body", minimum=MIN_VISIBILITY_MS,
                                   maximum=MAX_VISIBILITY_MS)
        q = self._queues.get(name)
        if q is None:
            return {"messages": []}
        q.promote(now)
        expires = now + (visibility if visibility is not None else q.visibility_ms)
        out: list[dict[str, Any]] = []
        while q.ready and len(out) < limit:
            m = q._valid(heapq.heappop(q.ready), READY)
            if m is None:
                continue
            m.attempt += 1
            m.consumer = consumer
            q.place(m, LEASED, expires)
            m.lease_id = f"{m.id}.{self._next_lease}"
            self._next_lease += 1
            q.leases[m.lease_id] = m.id
            q.totals["leased"] += 1
            out.append(_message_out(m))
        return {"messages": out}

    def _held(self, body: Mapping[str, Any], now: int, extra: tuple[str, ...],
              ) -> tuple[_Queue, _Msg]:
        """The queue and message of a current, unexpired lease, or ``Refused``."""
        check_keys(body, "body", required=("queue", "lease_id"), optional=extra)
        name = _queue_name(body)
        lease_id = require_str(body, "lease_id", "body", max_len=2 * MAX_ID_LENGTH)
        q = self._queues.get(name)
        msg_id = q.leases.get(lease_id) if q is not None else None
        m = q.messages.get(msg_id) if q is not None and msg_id is not None else None
        if q is None or m is None or m.due <= now:
            settled = self._settled.get(lease_id)
            if settled is not None:
                raise Refused(LEASE_EXPIRED, f"lease already {_SETTLED[settled]}: this "
                              "repeat changes nothing")
            raise Refused(LEASE_EXPIRED, "this lease is not current: it expired or the "
                          "message was redelivered under a newer lease (no ack or nack of "
                          f"it among the last {MAX_SETTLED:,})")
        return q, m

    def _settle(self, lease_id: str, outcome: int) -> None:
        self._settled[lease_id] = outcome
        if len(self._settled) > MAX_SETTLED:
            self._settled.popitem(last=False)

    def ack(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """``{queue, lease_id}`` -> ``{id}``; removes the message for good."""
        q, m = self._held(body, now, ())
        assert m.lease_id is not None
        self._settle(m.lease_id, ACKED)
        q.remove(m)
        q.totals["acked"] += 1
        q.promote(now)
        return {"id": m.id}

    def extend(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """``{queue, lease_id, visibility_ms?}`` -> ``{id, lease_id, expires_at}``: the
        current lease now ends ``visibility_ms`` (default: the queue's) after this
        command - later or sooner, as SQS ChangeMessageVisibility. Same lease id, same
        attempt: a consumer still working on a message keeps it."""
        visibility = _optional_int(body, "visibility_ms", "body", minimum=MIN_VISIBILITY_MS,
                                   maximum=MAX_VISIBILITY_MS)
        q, m = self._held(body, now, ("visibility_ms",))
        lease_id = m.lease_id
        assert lease_id is not None
        q.place(m, LEASED, now + (visibility if visibility is not None else q.visibility_ms))
        m.lease_id = lease_id     # place() retired it with the old heap entry: restore
        q.leases[lease_id] = m.id
        q.promote(now)
        return {"id": m.id, "lease_id": lease_id, "expires_at": m.due}

    def nack(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """``{queue, lease_id, delay_ms?, error?}`` -> ``{id, state}``: back to ready
        (or delayed), or dead when this was attempt ``max_deliveries``."""
        check_keys(body, "body", required=("queue", "lease_id"),
                   optional=("delay_ms", "error"))
        delay = _optional_int(body, "delay_ms", "body", minimum=0, maximum=MAX_DELAY_MS) or 0
        error = optional_str(body, "error", "body", max_len=MAX_ERROR_LENGTH, allow_empty=True)
        q, m = self._held(body, now, ("delay_ms", "error"))
        assert m.lease_id is not None
        self._settle(m.lease_id, NACKED)
        q.totals["nacked"] += 1
        if error is not None:
            m.error = error
        if m.attempt >= q.max_deliveries:
            q.kill(m, m.error, now)
        elif delay > 0:
            q.place(m, DELAYED, now + delay)
        else:
            q.place(m, READY)
        q.promote(now)
        return {"id": m.id, "state": _STATE_NAMES[m.state]}

    def configure(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """``{queue, options: {visibility_ms?, max_deliveries?, dedup_window_ms?}}`` ->
        ``{queue, options}``; creates the queue. New options apply to later leases,
        nacks, expiries and enqueues (existing leases keep their expiry)."""
        check_keys(body, "body", required=("queue", "options"))
        name = _queue_name(body)
        options = _check_options(require_map(body["options"], "body.options"), "body.options")
        q = self._get_or_create(name)
        q.promote(now)
        for key, value in options.items():
            setattr(q, key, value)
        q.trim_dead()
        return {"queue": name, "options": q.options()}

    def purge(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """``{queue, dead?: bool}`` -> ``{purged}``. Drops every ready and delayed message
        (leased ones stay: their consumers may still ack them), or with ``dead`` every
        dead letter. Dedup entries stay for their window."""
        check_keys(body, "body", required=("queue",), optional=("dead",))
        name = _queue_name(body)
        dead = body.get("dead", False)
        if not isinstance(dead, bool):
            raise Invalid("body.dead must be a boolean")
        q = self._queues.get(name)
        if q is None:
            raise Refused(NOT_FOUND, "no such queue")
        q.promote(now)
        if dead:
            purged = len(q.dead)
            q.dead.clear()
        else:
            victims = [m for m in q.messages.values() if m.state in (READY, DELAYED)]
            for m in victims:
                q.remove(m)
            q.ready.clear()
            q.delayed = [e for e in q.delayed if q._valid(e, DELAYED) is not None]
            heapq.heapify(q.delayed)
            purged = len(victims)
        q.totals["purged"] += purged
        return {"purged": purged}

    def redrive(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """``{queue, max?}`` -> ``{redriven, ids}``: the oldest dead letters go back to
        ready at the end of the line (new ``seq``), with attempts reset to 0."""
        check_keys(body, "body", required=("queue",), optional=("max",))
        name = _queue_name(body)
        limit = _optional_int(body, "max", "body", minimum=1,
                              maximum=MAX_REDRIVE_BATCH) or MAX_REDRIVE_BATCH
        q = self._queues.get(name)
        if q is None:
            raise Refused(NOT_FOUND, "no such queue")
        q.promote(now)
        ids: list[str] = []
        for m in list(q.dead.values())[:limit]:
            del q.dead[m.id]
            m.seq = self._next_seq
            self._next_seq += 1
            m.attempt, m.error = 0, None
            q.place(m, READY)
            ids.append(m.id)
        q.totals["redriven"] += len(ids)
        return {"redriven": len(ids), "ids": ids}

    # --- snapshot ------------------------------------------------------------------

    def to_snapshot(self) -> dict[str, Any]:
        queues = []
        for name in sorted(self._queues):
            q = self._queues[name]
            queues.append({
                "name": name,
                "options": [q.visibility_ms, q.max_deliveries, q.dedup_window_ms,
                            q.max_dead],
                "totals": [q.totals[k] for k in _TOTALS],
                "messages": [m.row() for m in sorted(q.messages.values(),
                                                     key=lambda m: m.seq)],
                "dead": [m.row() for m in q.dead.values()],
                "dedup": [[d, mid, exp] for d, (mid, exp) in sorted(q.dedup.items())],
            })
        return {"next_seq": self._next_seq, "next_lease": self._next_lease,
                "queues": queues, "settled": [[k, v] for k, v in self._settled.items()]}

    @classmethod
    def from_snapshot(cls, obj: object) -> QueueStore:
        """Rebuild from ``to_snapshot()`` output; ``ValueError`` if it is inconsistent."""
        # Snapshots written before "settled" existed restore with an empty memory.
        if not isinstance(obj, dict) or set(obj) - {"settled"} != {"next_seq", "next_lease",
                                                                   "queues"}:
            raise ValueError("queues section must be a map with next_seq, next_lease, "
                             "queues, settled")
        store = cls()
        for row in _rows(obj.get("settled", [])):
            if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str)
                    and type(row[1]) is int and row[1] in _SETTLED
                    and row[0] not in store._settled):
                raise ValueError("queues.settled: an entry is malformed or repeated")
            store._settled[row[0]] = row[1]
        if len(store._settled) > MAX_SETTLED:
            raise ValueError(f"queues.settled holds more than {MAX_SETTLED} entries")
        store._next_seq, store._next_lease = obj["next_seq"], obj["next_lease"]
        if type(store._next_seq) is not int or type(store._next_lease) is not int:
            raise ValueError("queues.next_seq and next_lease must be integers")
        if not isinstance(obj["queues"], list):
            raise ValueError("queues.queues must be a list")
        for raw in obj["queues"]:
            if not isinstance(raw, dict) or set(raw) != {"name", "options", "totals",
                                                         "messages", "dead", "dedup"}:
                raise ValueError("a queue must be a map with name, options, totals, "
                                 "messages, dead, dedup")
            name = raw["name"]
            if not isinstance(name, str) or not QUEUE_NAME.fullmatch(name) \
                    or name in store._queues:
                raise ValueError("a queue name is invalid or repeated")
            q = store._queues[name] = _Queue(name)
            opts, totals = raw["options"], raw["totals"]
            # Snapshots written before max_dead / dead_dropped existed have 3 options and
            # 9 totals: they restore with the default and a zero.
            if not (isinstance(opts, list) and len(opts) in (3, 4)
                    and all(type(v) is int for v in opts)):
                raise ValueError(f"queue {name}: options must be 4 integers")
            q.visibility_ms, q.max_deliveries, q.dedup_window_ms = opts[:3]
            q.max_dead = opts[3] if len(opts) == 4 else DEFAULT_MAX_DEAD
            if not (isinstance(totals, list) and len(totals) in (len(_TOTALS) - 1, len(_TOTALS))
                    and all(type(v) is int for v in totals)):
                raise ValueError(f"queue {name}: totals must be {len(_TOTALS)} integers")
            q.totals = dict(zip(_TOTALS, [*totals, 0][:len(_TOTALS)], strict=True))
            for row in _rows(raw["messages"]):
                m = _Msg.from_row(row)
                if m.state == DEAD or m.id in q.messages or m.seq >= store._next_seq:
                    raise ValueError(f"queue {name}: message {m.id[:64]} is inconsistent")
                q.messages[m.id] = m
                q.counts[m.state] += 1
                if m.state == READY:
                    q.ready.append((-m.priority, m.seq, m.id, m.gen))
                elif m.state == DELAYED:
                    q.delayed.append((m.due, m.seq, m.id, m.gen))
                else:
                    q.leased.append((m.due, m.seq, m.id, m.gen))
                    assert m.lease_id is not None
                    q.leases[m.lease_id] = m.id
            for heap in (q.ready, q.delayed, q.leased):
                heapq.heapify(heap)
            for row in _rows(raw["dead"]):
                m = _Msg.from_row(row)
                if m.state != DEAD or m.id in q.dead or m.id in q.messages:
                    raise ValueError(f"queue {name}: dead letter {m.id[:64]} is inconsistent")
                q.dead[m.id] = m
            for row in _rows(raw["dedup"]):
                if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                        and isinstance(row[1], str) and type(row[2]) is int):
                    raise ValueError(f"queue {name}: a dedup entry is malformed")
                q.dedup[row[0]] = (row[1], row[2])
                q.dedup_heap.append((row[2], row[0]))
            heapq.heapify(q.dedup_heap)
        return store


def _rows(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("expected a list of rows")
    return value
