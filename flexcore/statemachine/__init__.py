"""FlexCore's replicated state machine: pure, deterministic, three-method contract.

Every node applies the same committed commands in the same order and must end in the
same state. So this package does no I/O, reads no clock, draws no random numbers, and
imports neither asyncio, threading nor pysyncobj; only the standard library and msgpack.
Time and ids are stamped by the proposer and carried in the ``Command``.

The contract (what ``flexcore.raft`` relies on):

``StateMachine.apply(cmd, index) -> Result``
    Apply one committed command from the log entry at ``index`` (several commands may
    share an index: group commit, see ``apply_batch``). **Deterministic**: the same
    sequence of ``(cmd, index)`` on two fresh machines gives byte-identical
    ``snapshot()``. **Never raises**: a refusal is ``Err(code, message)`` with code
    ``malformed``, ``unsupported_version``, ``unknown_command``, ``invalid`` (or
    ``internal`` for a bug), and a refused command changes nothing except
    ``applied_index`` and ``clock_ms``: bodies are validated completely before any
    mutation. A command whose ``rid`` is among the last 10,000 applied rids returns the
    first application's result and is not applied again (Raft paper §8); the remembered
    results are also capped at 64 MiB, oldest evicted first (see ``dedupe``).
``StateMachine.snapshot() -> bytes``
    All state as msgpack ``{"format": 1, ...}`` (never pickle). ``restore(snapshot())``
    followed by ``snapshot()`` gives the same bytes, and a restored machine that
    applies more commands ends byte-identical to one that never snapshotted.
``StateMachine.restore(data)``
    Replace all state, or raise ``SnapshotError`` and keep the current state.

Effective time ``clock_ms`` is the max ``ts`` of all applied commands, so it never goes
backwards even when proposers' clocks do; stored timestamps use it.

Commands (``type``: body -> ``Ok`` value):

- ``noop``: ``{}`` -> ``{}``. A barrier for consistent reads.
- ``event.publish``: ``{"events": [{"type", "id", "payload"?, "key"?}, ...]}``
  (1..1000 events) -> ``{"offsets", "ids", "duplicates"}``. Offsets are 1-based and
  dense. An ``id`` present among the retained events is not appended again: its first
  offset is returned with ``duplicates[i] = True`` (also within one publish).
- ``events.set_retention``: ``{"max_events": int >= 0}`` (0 = unlimited, default
  1,000,000) -> ``{"max_events", "first_offset"}``. The oldest events beyond the limit
  are dropped together with their ids, so re-publishing a trimmed id appends it again.
- ``cluster.register``: ``{"node": "host:port", "api": "http://..."}`` ->
  ``{"node", "api"}``; registering again replaces the API URL.
- ``cluster.unregister``: ``{"node"}`` -> ``{"removed": bool}``.
- ``workflow.run.create`` / ``.submitted`` / ``.running`` / ``.finish`` / ``.note`` /
  ``.cancel`` and ``workflow.route.put`` / ``.delete`` / ``.advance``: Windmill workflow
  runs (proposer-chosen UUIDs, status only moves forward, outcomes idempotent) and
  event routing rules with a compare-and-set routing cursor; see ``workflows``.
- ``pipeline.put`` / ``pipeline.delete`` / ``pipeline.run.create`` / ``.start`` /
  ``.finish`` / ``.note`` and ``pipeline.checkpoint``: ETL pipeline definitions, runs
  (one active per pipeline: ``run_active``) and the per-pipeline checkpoint, moved one
  batch at a time by compare-and-set on its seq (``checkpoint_gap``); see ``pipelines``.
- ``queue.enqueue`` / ``queue.lease`` / ``queue.ack`` / ``queue.nack`` /
  ``queue.extend`` / ``queue.configure`` / ``queue.purge`` / ``queue.redrive``: durable
  queues (see ``queues``). A stale ack/nack/extend is refused with ``lease_expired``;
  purge/redrive of an unknown queue with ``not_found`` (``validation.Refused`` carries
  such codes).
- ``schedule.put`` / ``schedule.delete`` / ``schedule.set_enabled`` /
  ``schedule.trigger`` / ``schedule.own`` / ``schedule.claim`` / ``schedule.fire_done``:
  timer schedules, the scheduler owner (node, term) and fenced fire claims (see
  ``schedules``). Refusals: ``not_found``, ``not_owner``, ``stale_term``,
  ``already_claimed``, ``not_due``, ``disabled``, ``too_many_pending``.
- ``group.join`` / ``group.leave`` / ``group.release`` / ``group.commit`` /
  ``group.redrive``: consumer groups — members and heartbeats (lazy expiry), sticky
  partition assignment, per-partition committed offset fenced by owner + epoch, dead
  letters and redrive (see ``groups``). Refusals: ``not_found``, ``not_owner``,
  ``stale_epoch``.

Wire format (``codec``): a command is the msgpack map ``{"v": 1, "type", "body", "ts",
"rid"}``; a group-committed log entry is a msgpack array of such maps, fed to
``apply_batch``, which isolates a bad item as an ``Err`` in its place.

Read side (``read_events``, ``event_stats``, ``nodes``): pure queries that return fresh
copies. The caller holds the same lock as ``apply`` so a read never sees half a command.

Modules: ``codec`` (envelope and batch encoding, decode limits), ``result`` (Ok/Err and
error codes), ``machine`` (dispatch, snapshot, the `COMPONENTS` list), ``component``
(what a part of the state provides: commands + snapshot section; a new capability is a
new component), ``events`` (event log), ``queues`` (ready/delayed/leased/dead
messages), ``schedules`` (timer schedules, ownership, fire claims), ``cluster`` (node
-> API map), ``workflows`` (workflow runs, routing rules and cursor), ``groups``
(consumer groups), ``dedupe`` (rid -> result memory), ``validation`` (body checks).
"""

from flexcore.statemachine.codec import (
    ENVELOPE_VERSION,
    MAX_BATCH_BYTES,
    MAX_BATCH_ITEMS,
    MAX_COMMAND_BYTES,
    Command,
    MalformedCommand,
    decode,
    decode_batch,
    encode,
    encode_batch,
)
from flexcore.statemachine.component import Component, Context, Handler
from flexcore.statemachine.dedupe import MAX_RIDS as DEDUPE_MAX_RIDS
from flexcore.statemachine.events import (
    DEFAULT_MAX_EVENTS,
    MAX_EVENT_ID_LENGTH,
    MAX_EVENT_KEY_LENGTH,
    MAX_EVENT_TYPE_LENGTH,
    MAX_EVENTS_PER_PUBLISH,
)
from flexcore.statemachine.machine import SNAPSHOT_FORMAT, SnapshotError, StateMachine
from flexcore.statemachine.result import (
    INTERNAL,
    INVALID,
    MALFORMED,
    UNKNOWN_COMMAND,
    UNSUPPORTED_VERSION,
    Err,
    Ok,
    Result,
)

__all__ = [
    "DEDUPE_MAX_RIDS",
    "DEFAULT_MAX_EVENTS",
    "ENVELOPE_VERSION",
    "INTERNAL",
    "INVALID",
    "MALFORMED",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_ITEMS",
    "MAX_COMMAND_BYTES",
    "MAX_EVENTS_PER_PUBLISH",
    "MAX_EVENT_ID_LENGTH",
    "MAX_EVENT_KEY_LENGTH",
    "MAX_EVENT_TYPE_LENGTH",
    "SNAPSHOT_FORMAT",
    "UNKNOWN_COMMAND",
    "UNSUPPORTED_VERSION",
    "Command",
    "Component",
    "Context",
    "Err",
    "Handler",
    "MalformedCommand",
    "Ok",
    "Result",
    "SnapshotError",
    "StateMachine",
    "decode",
    "decode_batch",
    "encode",
    "encode_batch",
]
