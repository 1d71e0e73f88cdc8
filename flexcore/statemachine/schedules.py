"""Timer schedules, their fire claims, and who may fire them (owner + Raft term).

Owns the ``schedule.*`` commands and the read side (``get``, ``list``, ``fires``,
``owner``). Pure data: triggers arrive already validated and normalised by the
proposer (``flexcore.schedule_math``: ``{interval_ms}``, ``{cron, timezone}`` or
``{at_ms}``); this component checks their shape only and never computes fire times
(that needs time zones and a clock, which the state machine must not touch).

Fencing (Kleppmann, "How to do distributed locking"): the scheduler owner is recorded
as (node, Raft term). ``schedule.own`` is accepted for a term >= the recorded one (the
same node again in the same term is a no-op; another node in the same term, or any
lower term, is refused). ``schedule.claim`` is accepted only from the recorded owner
with the recorded term, so a deposed leader's claims, which carry its old term, are
refused once the new leader has taken ownership. For each schedule the first claim of
a scheduled fire time wins: claims must be strictly newer than the newest claimed
scheduled fire time (a high-water mark, kept even after the bounded history forgets
the fire), and no later than the command's effective time (a fire is never claimed
before it is due). A manual trigger (``schedule.trigger``) records a pending fire at
the effective time; the owner claims it like any other fire (``manual: true``).
Claims and outcomes go into a bounded per-schedule history (newest ``MAX_FIRES``).
"""

from __future__ import annotations

import re
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

SCHEDULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
MAX_SCHEDULES = 10_000
MAX_FIRES = 100                 # fire history kept per schedule
MAX_PENDING_MANUAL = 100
MAX_OWNER_HISTORY = 50
MAX_NAME_LENGTH = 256
MAX_CRON_LENGTH = 256
MAX_TZ_LENGTH = 64
MAX_ERROR_LENGTH = 1000
MIN_INTERVAL_MS, MAX_INTERVAL_MS = 10, 366 * 86_400_000
MAX_GRACE_MS = 7 * 86_400_000
MAX_RUN_MS = 86_400_000
_TS_MAX = 2**63 - 1

MISFIRE = ("skip", "run_once", "run_all")
FIRE_STATUSES = ("ok", "error", "timeout", "unknown")   # outcomes; "claimed" until then
ACTION_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # type: (required, optional) besides "type"
    "event": (("event_type",), ("payload",)),
    "enqueue": (("queue", "body"), ()),
    "workflow": (("path", "kind"), ("args",)),
    "pipeline": (("name",), ()),
    "handler": (("name",), ()),
}

# Err codes of refusals (besides "invalid").
NOT_FOUND = "not_found"
NOT_OWNER = "not_owner"
STALE_TERM = "stale_term"
ALREADY_CLAIMED = "already_claimed"
NOT_DUE = "not_due"
DISABLED = "disabled"
TOO_MANY_PENDING = "too_many_pending"


def _plain(value: Any, where: str) -> Any:
    try:
        return unpack_plain(pack_plain(value))
    except Exception:
        raise Invalid(f"{where} is not plain msgpack data (nil, bool, 64-bit int, float, "
                      "str, bin, list, string-keyed map; moderate nesting)") from None


def _require_bool(body: Mapping[str, Any], key: str, where: str) -> bool:
    value = body.get(key)
    if not isinstance(value, bool):
        raise Invalid(f"{where}.{key} must be a boolean")
    return value


def _schedule_id(body: Mapping[str, Any]) -> str:
    sid = require_str(body, "id", "body", max_len=128)
    if not SCHEDULE_ID.fullmatch(sid):
        raise Invalid("body.id must be 1-128 characters of A-Z a-z 0-9 . _ : - "
                      "starting with a letter or digit")
    return sid


def _check_trigger(raw: Any) -> dict[str, Any]:
    trig = require_map(raw, "body.trigger")
    if "interval_ms" in trig:
        check_keys(trig, "body.trigger", required=("interval_ms",))
        ms = require_int(trig, "interval_ms", "body.trigger", minimum=MIN_INTERVAL_MS,
                         maximum=MAX_INTERVAL_MS)
        return {"interval_ms": ms}
    if "at_ms" in trig:
        check_keys(trig, "body.trigger", required=("at_ms",))
        return {"at_ms": require_int(trig, "at_ms", "body.trigger", minimum=0,
                                     maximum=_TS_MAX)}
    if "cron" in trig:
        check_keys(trig, "body.trigger", required=("cron", "timezone"))
        return {"cron": require_str(trig, "cron", "body.trigger", max_len=MAX_CRON_LENGTH),
                "timezone": require_str(trig, "timezone", "body.trigger",
                                        max_len=MAX_TZ_LENGTH)}
    raise Invalid("body.trigger must have one of interval_ms, at_ms, cron")


def _check_action(raw: Any) -> dict[str, Any]:
    action = require_map(raw, "body.action")
    kind = action.get("type")
    if not isinstance(kind, str) or kind not in ACTION_FIELDS:
        raise Invalid(f"body.action.type must be one of {', '.join(ACTION_FIELDS)}")
    required, optional = ACTION_FIELDS[kind]
    check_keys(action, "body.action", required=("type", *required), optional=optional)
    out: dict[str, Any] = {"type": kind}
    where = "body.action"
    if kind == "event":
        out["event_type"] = require_str(action, "event_type", where, max_len=MAX_NAME_LENGTH)
        if action.get("payload") is not None:
            if not isinstance(action["payload"], dict):
                raise Invalid("body.action.payload must be a map (schedule_id and fire_time "
                              "are added to it)")
            out["payload"] = _plain(action["payload"], "body.action.payload")
    elif kind == "enqueue":
        out["queue"] = require_str(action, "queue", where, max_len=MAX_NAME_LENGTH)
        out["body"] = _plain(action["body"], "body.action.body")
    elif kind == "workflow":
        out["path"] = require_str(action, "path", where, max_len=1024)
        kind_ = require_str(action, "kind", where, max_len=16)
        if kind_ not in ("script", "flow"):
            raise Invalid("body.action.kind must be script or flow")
        out["kind"] = kind_
        if action.get("args") is not None:
            if not isinstance(action["args"], dict):
                raise Invalid("body.action.args must be a map")
            out["args"] = _plain(action["args"], "body.action.args")
    else:
        out["name"] = require_str(action, "name", where, max_len=MAX_NAME_LENGTH)
    return out


class _Fire:
    """One claimed fire and, once reported, its outcome."""

    __slots__ = ("claimed_ts", "done_ts", "duration_ms", "error", "fire_time", "lag_ms",
                 "manual", "node", "status", "term")

    def __init__(self, fire_time: int, manual: bool, node: str, term: int,
                 claimed_ts: int) -> None:
        self.fire_time = fire_time
        self.manual = manual
        self.node = node
        self.term = term
        self.claimed_ts = claimed_ts
        self.status = "claimed"
        self.lag_ms: int | None = None
        self.duration_ms: int | None = None
        self.error: str | None = None
        self.done_ts: int | None = None

    def row(self) -> list[Any]:
        return [self.fire_time, self.manual, self.node, self.term, self.claimed_ts,
                self.status, self.lag_ms, self.duration_ms, self.error, self.done_ts]

    @classmethod
    def from_row(cls, row: Any) -> _Fire:
        if not (isinstance(row, list) and len(row) == 10):
            raise ValueError("a fire must be a 10-item list")
        (fire_time, manual, node, term, claimed_ts, status, lag_ms, duration_ms, error,
         done_ts) = row
        if not (type(fire_time) is int and isinstance(manual, bool) and isinstance(node, str)
                and type(term) is int and type(claimed_ts) is int
                and status in ("claimed", *FIRE_STATUSES)
                and all(v is None or type(v) is int for v in (lag_ms, duration_ms, done_ts))
                and (error is None or isinstance(error, str))):
            raise ValueError("a fire has fields of the wrong type")
        fire = cls(fire_time, manual, node, term, claimed_ts)
        fire.status, fire.lag_ms, fire.duration_ms = status, lag_ms, duration_ms
        fire.error, fire.done_ts = error, done_ts
        return fire

    def to_dict(self) -> dict[str, Any]:
        return {"fire_time": self.fire_time, "manual": self.manual, "node": self.node,
                "term": self.term, "claimed_ts": self.claimed_ts, "status": self.status,
                "lag_ms": self.lag_ms, "duration_ms": self.duration_ms, "error": self.error,
                "done_ts": self.done_ts}


class _Schedule:
    __slots__ = ("action", "anchor_ms", "created_ts", "enabled", "fires", "grace_ms", "id",
                 "last_fire", "last_manual", "max_run_ms", "misfire", "pending", "trigger",
                 "updated_ts", "version")

    def __init__(self, sid: str, trigger: dict[str, Any], action: dict[str, Any],
                 misfire: str, grace_ms: int, max_run_ms: int, enabled: bool,
                 now: int) -> None:
        self.id = sid
        self.trigger = trigger
        self.action = action
        self.misfire = misfire
        self.grace_ms = grace_ms
        self.max_run_ms = max_run_ms      # 0 = no limit
        self.enabled = enabled
        self.anchor_ms = now              # when the trigger was set: fires come after it
        self.created_ts = now
        self.updated_ts = now
        self.version = 1
        self.last_fire = 0                # newest claimed scheduled fire time
        self.last_manual = 0              # newest manual fire time handed out
        self.pending: list[int] = []      # manual fire times not claimed yet
        self.fires: list[_Fire] = []      # oldest first, at most MAX_FIRES

    def find(self, fire_time: int, manual: bool) -> _Fire | None:
        for fire in reversed(self.fires):
            if fire.fire_time == fire_time and fire.manual == manual:
                return fire
        return None

    def to_dict(self) -> dict[str, Any]:
        """A fresh dict (triggers and actions are copied)."""
        return {"id": self.id, "trigger": dict(self.trigger),
                "action": unpack_plain(pack_plain(self.action)), "misfire": self.misfire,
                "misfire_grace_ms": self.grace_ms, "max_run_ms": self.max_run_ms,
                "enabled": self.enabled, "anchor_ms": self.anchor_ms,
                "created_ts": self.created_ts, "updated_ts": self.updated_ts,
                "version": self.version, "last_fire_time": self.last_fire,
                "pending_manual": list(self.pending),
                "in_flight": [f.to_dict() for f in self.fires if f.status == "claimed"]}

    def row(self) -> list[Any]:
        return [self.id, self.trigger, self.action, self.misfire, self.grace_ms,
                self.max_run_ms, self.enabled, self.anchor_ms, self.created_ts,
                self.updated_ts, self.version, self.last_fire, self.last_manual,
                list(self.pending), [f.row() for f in self.fires]]

    @classmethod
    def from_row(cls, row: Any) -> _Schedule:
        if not (isinstance(row, list) and len(row) == 15):
            raise ValueError("a schedule must be a 15-item list")
        (sid, trigger, action, misfire, grace_ms, max_run_ms, enabled, anchor_ms, created_ts,
         updated_ts, version, last_fire, last_manual, pending, fires) = row
        if not (isinstance(sid, str) and SCHEDULE_ID.fullmatch(sid)):
            raise ValueError("a schedule id is malformed")
        try:
            trigger = _check_trigger(trigger)
            action = _check_action(action)
        except Invalid as exc:
            raise ValueError(f"schedule {sid}: {exc}") from None
        ints = (grace_ms, max_run_ms, anchor_ms, created_ts, updated_ts, version, last_fire,
                last_manual)
        if (misfire not in MISFIRE or not isinstance(enabled, bool)
                or not all(type(v) is int for v in ints)
                or not isinstance(pending, list) or not all(type(p) is int for p in pending)
                or not isinstance(fires, list) or len(fires) > MAX_FIRES):
            raise ValueError(f"schedule {sid} has fields of the wrong type")
        s = cls(sid, trigger, action, misfire, grace_ms, max_run_ms, enabled, anchor_ms)
        s.created_ts, s.updated_ts, s.version = created_ts, updated_ts, version
        s.last_fire, s.last_manual, s.pending = last_fire, last_manual, list(pending)
        s.fires = [_Fire.from_row(f) for f in fires]
        return s


class Schedules:
    """Schedules by id, the scheduler owner and its recent history."""

    def __init__(self) -> None:
        self._schedules: dict[str, _Schedule] = {}
        self._owner: tuple[str, int, int] | None = None     # (node, term, since_ts)
        self._owners: list[tuple[int, str, int]] = []       # (term, node, ts), oldest first
        self._revision = 0   # bumped by every change the owner's runner must react to

    # --- read side -----------------------------------------------------------------

    @property
    def revision(self) -> int:
        """Changes with every put, delete, pause/resume, manual trigger and ownership
        change (not with claims or outcomes)."""
        return self._revision

    def owner(self) -> dict[str, Any] | None:
        if self._owner is None:
            return None
        node, term, since = self._owner
        return {"node": node, "term": term, "since_ts": since}

    def owner_history(self) -> list[dict[str, Any]]:
        return [{"term": t, "node": n, "ts": ts} for t, n, ts in self._owners]

    def get(self, sid: str) -> dict[str, Any] | None:
        s = self._schedules.get(sid)
        return s.to_dict() if s is not None else None

    def list_all(self) -> list[dict[str, Any]]:
        return [self._schedules[sid].to_dict() for sid in sorted(self._schedules)]

    def fires(self, sid: str) -> list[dict[str, Any]] | None:
        """The fire history of ``sid`` in claim order (None: no such schedule)."""
        s = self._schedules.get(sid)
        return [f.to_dict() for f in s.fires] if s is not None else None

    def __len__(self) -> int:
        return len(self._schedules)

    # --- commands --------------------------------------------------------------------

    def commands(self) -> Mapping[str, Handler]:
        return {
            "schedule.put": lambda body, ctx: self.put(body, ctx.now_ms),
            "schedule.delete": lambda body, ctx: self.delete(body),
            "schedule.set_enabled": lambda body, ctx: self.set_enabled(body, ctx.now_ms),
            "schedule.trigger": lambda body, ctx: self.trigger(body, ctx.now_ms),
            "schedule.own": lambda body, ctx: self.own(body, ctx.now_ms),
            "schedule.claim": lambda body, ctx: self.claim(body, ctx.now_ms),
            "schedule.fire_done": lambda body, ctx: self.fire_done(body, ctx.now_ms),
        }

    def _existing(self, body: Mapping[str, Any]) -> _Schedule:
        sid = _schedule_id(body)
        s = self._schedules.get(sid)
        if s is None:
            raise Refused(NOT_FOUND, f"no schedule {sid!r}")
        return s

    def put(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """Create or replace a schedule. A replaced schedule keeps its claimed fires (so
        a fire time is never claimed twice) and, if its trigger is unchanged, its anchor
        (so interval fires stay on the same grid)."""
        check_keys(body, "body", required=("id", "trigger", "action"),
                   optional=("misfire", "misfire_grace_ms", "max_run_ms", "enabled"))
        sid = _schedule_id(body)
        trigger = _check_trigger(body["trigger"])
        action = _check_action(body["action"])
        misfire = body.get("misfire", "run_once")
        if misfire not in MISFIRE:
            raise Invalid(f"body.misfire must be one of {', '.join(MISFIRE)}")
        grace = (require_int(body, "misfire_grace_ms", "body", minimum=0, maximum=MAX_GRACE_MS)
                 if body.get("misfire_grace_ms") is not None else 60_000)
        max_run = (require_int(body, "max_run_ms", "body", minimum=0, maximum=MAX_RUN_MS)
                   if body.get("max_run_ms") is not None else 0)
        enabled = (_require_bool(body, "enabled", "body")
                   if body.get("enabled") is not None else True)
        existing = self._schedules.get(sid)
        if existing is None and len(self._schedules) >= MAX_SCHEDULES:
            raise Invalid(f"the cluster already has {MAX_SCHEDULES} schedules")
        self._revision += 1
        if existing is None:
            self._schedules[sid] = _Schedule(sid, trigger, action, misfire, grace, max_run,
                                             enabled, now)
            return {"id": sid, "created": True, "version": 1}
        if existing.trigger != trigger:
            existing.anchor_ms = now
        existing.trigger, existing.action, existing.misfire = trigger, action, misfire
        existing.grace_ms, existing.max_run_ms, existing.enabled = grace, max_run, enabled
        existing.updated_ts = now
        existing.version += 1
        return {"id": sid, "created": False, "version": existing.version}

    def delete(self, body: Mapping[str, Any]) -> dict[str, Any]:
        check_keys(body, "body", required=("id",))
        sid = _schedule_id(body)
        deleted = self._schedules.pop(sid, None) is not None
        if deleted:
            self._revision += 1
        return {"id": sid, "deleted": deleted}

    def set_enabled(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        check_keys(body, "body", required=("id", "enabled"))
        enabled = _require_bool(body, "enabled", "body")
        s = self._existing(body)
        if s.enabled != enabled:
            s.enabled = enabled
            s.updated_ts = now
            s.version += 1
            self._revision += 1
        return {"id": s.id, "enabled": s.enabled, "version": s.version}

    def trigger(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """Ask the owner to fire now: a pending manual fire at the effective time (kept
        strictly increasing per schedule, so two triggers are two fires)."""
        check_keys(body, "body", required=("id",))
        s = self._existing(body)
        if len(s.pending) >= MAX_PENDING_MANUAL:
            raise Refused(TOO_MANY_PENDING, f"schedule {s.id!r} already has "
                          f"{MAX_PENDING_MANUAL} manual fires waiting for the owner")
        fire_time = max(now, s.last_manual + 1)
        s.last_manual = fire_time
        s.pending.append(fire_time)
        self._revision += 1
        return {"id": s.id, "fire_time": fire_time, "manual": True}

    def own(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """The Raft leader of ``term`` takes the scheduler over."""
        check_keys(body, "body", required=("node", "term"))
        node = require_str(body, "node", "body", max_len=MAX_NAME_LENGTH)
        term = require_int(body, "term", "body", minimum=0, maximum=_TS_MAX)
        if self._owner is not None:
            cur_node, cur_term, _ = self._owner
            if term < cur_term:
                raise Refused(STALE_TERM, f"term {term} is older than the owner's term "
                              f"{cur_term}")
            if term == cur_term:
                if node != cur_node:
                    raise Refused(NOT_OWNER, f"term {term} is already owned by another node")
                return {"node": node, "term": term, "changed": False}
        self._owner = (node, term, now)
        self._owners.append((term, node, now))
        del self._owners[:-MAX_OWNER_HISTORY]
        self._revision += 1
        return {"node": node, "term": term, "changed": True}

    def _check_fence(self, node: str, term: int) -> None:
        if self._owner is None:
            raise Refused(NOT_OWNER, "no node owns the scheduler yet")
        cur_node, cur_term, _ = self._owner
        if term < cur_term:
            raise Refused(STALE_TERM, f"claim from term {term}; the scheduler is owned in "
                          f"term {cur_term}")
        if term != cur_term or node != cur_node:
            raise Refused(NOT_OWNER, f"this node does not own the scheduler in term {term}")

    def claim(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """The owner claims one fire; only a committed claim may run the action."""
        check_keys(body, "body", required=("id", "fire_time", "node", "term"),
                   optional=("manual",))
        sid = _schedule_id(body)
        fire_time = require_int(body, "fire_time", "body", minimum=0, maximum=_TS_MAX)
        node = require_str(body, "node", "body", max_len=MAX_NAME_LENGTH)
        term = require_int(body, "term", "body", minimum=0, maximum=_TS_MAX)
        manual = (_require_bool(body, "manual", "body")
                  if body.get("manual") is not None else False)
        self._check_fence(node, term)
        s = self._schedules.get(sid)
        if s is None:
            raise Refused(NOT_FOUND, f"no schedule {sid!r}")
        if manual:
            if fire_time not in s.pending:
                raise Refused(ALREADY_CLAIMED, f"manual fire {fire_time} of {sid!r} is not "
                              "pending (already claimed or never triggered)")
        else:
            if not s.enabled:
                raise Refused(DISABLED, f"schedule {sid!r} is paused")
            if fire_time <= s.last_fire:
                raise Refused(ALREADY_CLAIMED, f"fire {fire_time} of {sid!r} is not newer "
                              f"than the last claimed fire {s.last_fire}")
            if fire_time > now:
                raise Refused(NOT_DUE, f"fire {fire_time} of {sid!r} is not due yet "
                              f"(effective time {now})")
        if manual:
            s.pending.remove(fire_time)
        else:
            s.last_fire = fire_time
        s.fires.append(_Fire(fire_time, manual, node, term, now))
        del s.fires[:-MAX_FIRES]
        return {"id": sid, "fire_time": fire_time, "manual": manual, "term": term}

    def fire_done(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """Record a claimed fire's outcome; the first report wins."""
        check_keys(body, "body", required=("id", "fire_time", "status"),
                   optional=("manual", "duration_ms", "lag_ms", "error"))
        sid = _schedule_id(body)
        fire_time = require_int(body, "fire_time", "body", minimum=0, maximum=_TS_MAX)
        status = require_str(body, "status", "body", max_len=16)
        if status not in FIRE_STATUSES:
            raise Invalid(f"body.status must be one of {', '.join(FIRE_STATUSES)}")
        manual = (_require_bool(body, "manual", "body")
                  if body.get("manual") is not None else False)
        duration = (require_int(body, "duration_ms", "body", minimum=0, maximum=_TS_MAX)
                    if body.get("duration_ms") is not None else None)
        lag = (require_int(body, "lag_ms", "body", minimum=-_TS_MAX, maximum=_TS_MAX)
               if body.get("lag_ms") is not None else None)
        error = optional_str(body, "error", "body", max_len=MAX_ERROR_LENGTH)
        s = self._schedules.get(sid)
        fire = s.find(fire_time, manual) if s is not None else None
        if fire is None or fire.status != "claimed":
            return {"id": sid, "fire_time": fire_time, "updated": False}
        fire.status, fire.duration_ms, fire.lag_ms = status, duration, lag
        fire.error, fire.done_ts = error, now
        return {"id": sid, "fire_time": fire_time, "updated": True}

    # --- snapshot ------------------------------------------------------------------

    def to_snapshot(self) -> dict[str, Any]:
        return {
            "owner": list(self._owner) if self._owner is not None else None,
            "owners": [list(o) for o in self._owners],
            "revision": self._revision,
            "schedules": [self._schedules[sid].row() for sid in sorted(self._schedules)],
        }

    @classmethod
    def from_snapshot(cls, obj: object) -> Schedules:
        if not isinstance(obj, dict) or set(obj) != {"owner", "owners", "revision",
                                                     "schedules"}:
            raise ValueError("schedules section must be a map with owner, owners, revision, "
                             "schedules")
        owner, owners, revision, rows = (obj["owner"], obj["owners"], obj["revision"],
                                         obj["schedules"])
        out = cls()
        if owner is not None:
            if not (isinstance(owner, list) and len(owner) == 3 and isinstance(owner[0], str)
                    and type(owner[1]) is int and type(owner[2]) is int):
                raise ValueError("schedules.owner must be [node, term, since_ts] or nil")
            out._owner = (owner[0], owner[1], owner[2])
        if not isinstance(owners, list) or len(owners) > MAX_OWNER_HISTORY:
            raise ValueError("schedules.owners must be a list")
        for o in owners:
            if not (isinstance(o, list) and len(o) == 3 and type(o[0]) is int
                    and isinstance(o[1], str) and type(o[2]) is int):
                raise ValueError("each owner history entry must be [term, node, ts]")
            out._owners.append((o[0], o[1], o[2]))
        if type(revision) is not int:
            raise ValueError("schedules.revision must be an integer")
        out._revision = revision
        if not isinstance(rows, list):
            raise ValueError("schedules.schedules must be a list")
        for row in rows:
            s = _Schedule.from_row(row)
            if s.id in out._schedules:
                raise ValueError(f"schedule {s.id} appears twice")
            out._schedules[s.id] = s
        return out
