"""Workflow runs (Windmill jobs) and the event -> workflow routing rules.

Owns the ``workflow.*`` commands and the read side (``get``, ``list``, ``active``,
``routes``, ``cursor``). Pure data: run ids are UUIDs chosen by the proposer, time is
``ctx.now_ms``, and nothing here talks to Windmill. The leader-side runner
(``flexcore.windmill.runner``) reacts to this state and reports back with commands.

A run's life: ``workflow.run.create`` (``pending``) -> ``workflow.run.submitted``
(the leader created Windmill job ``job_id`` = the run id) -> ``workflow.run.running``
-> ``workflow.run.finish`` (``success`` | ``failure`` | ``canceled``). Status only moves
forward (pending < submitted < running < final): a late report of an earlier status is
accepted as a no-op, and once a run is final every later ``finish`` is a no-op too,
so outcome commits are idempotent and a stale leader cannot overwrite an outcome.
``workflow.run.cancel`` only records the request; the leader carries it out (before
submission it finishes the run as ``canceled``, after it asks Windmill to cancel the
job, and whatever Windmill then reports is the outcome).

Routing: each rule maps an event-type glob (plus an optional JMESPath condition, which
the leader evaluates outside this package) to a workflow. The routed position is a
replicated cursor: ``workflow.route.advance {from, to, starts}`` applies only when
``from`` equals the cursor (compare-and-set), then moves it to ``to`` and creates one
run per start. A start whose (rule, offset) already has a run is skipped. So however
many leaders route the same events, each (rule, event) starts exactly one run.

Bounds: at most ``MAX_ACTIVE_RUNS`` runs that are not final (more is refused with
``too_many_runs``) and ``MAX_RUNS`` runs in all; beyond that the oldest final runs are
forgotten (with their (rule, offset) keys: the cursor already keeps old offsets from
being routed again).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from fnmatch import fnmatchcase
from typing import Any

from flexcore.statemachine.codec import pack_plain, unpack_plain
from flexcore.statemachine.component import Context, Handler
from flexcore.statemachine.validation import (
    Invalid,
    Refused,
    check_keys,
    optional_str,
    require_int,
    require_map,
    require_str,
)

RUN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
ROUTE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Windmill paths: u/<user>/<name>, f/<folder>/<name>, hub/... — segments of safe chars.
WORKFLOW_PATH = re.compile(r"[A-Za-z0-9_@.-]+(?:/[A-Za-z0-9_@.-]+)*")
KINDS = ("script", "flow")
STATUSES = ("pending", "submitted", "running", "success", "failure", "canceled")
FINAL = frozenset({"success", "failure", "canceled"})
_RANK = {"pending": 0, "submitted": 1, "running": 2, "success": 3, "failure": 3,
         "canceled": 3}

MAX_PATH_LENGTH = 255
MAX_ARGS_BYTES = 256 * 1024
MAX_RESULT_BYTES = 256 * 1024
MAX_ERROR_LENGTH = 2000
MAX_REASON_LENGTH = 500
MAX_ACTIVE_RUNS = 10_000
MAX_RUNS = 100_000
MAX_ROUTES = 1000
MAX_STARTS_PER_ADVANCE = 500
MAX_EXPR_LENGTH = 1000
MAX_ARGS_FROM = 64
MAX_SOURCE_KEYS = 8
_TS_MAX = 2**63 - 1


@dataclass(slots=True)
class Run:
    id: str
    seq: int
    path: str
    kind: str
    args: bytes                       # msgpack map
    status: str
    created_ms: int
    source: dict[str, Any] | None = None
    job_id: str | None = None
    result: bytes | None = None       # msgpack; None = no result recorded
    error: str | None = None
    last_error: str | None = None
    cancel_requested: bool = False
    cancel_reason: str | None = None
    submitted_ms: int | None = None
    started_ms: int | None = None
    finished_ms: int | None = None
    duration_ms: int | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def view(self) -> dict[str, Any]:
        """A fresh dict (args and result decoded anew)."""
        out: dict[str, Any] = {
            "id": self.id, "seq": self.seq, "path": self.path, "kind": self.kind,
            "status": self.status, "job_id": self.job_id, "args": unpack_plain(self.args),
            "created_ms": self.created_ms, "submitted_ms": self.submitted_ms,
            "started_ms": self.started_ms, "finished_ms": self.finished_ms,
            "duration_ms": self.duration_ms, "cancel_requested": self.cancel_requested,
            "source": dict(self.source) if self.source is not None else None,
        }
        if self.result is not None:
            out["result"] = unpack_plain(self.result)
        if self.error is not None:
            out["error"] = self.error
        if self.last_error is not None:
            out["last_error"] = self.last_error
        if self.cancel_reason is not None:
            out["cancel_reason"] = self.cancel_reason
        return out

    def row(self) -> list[Any]:
        return [self.id, self.seq, self.path, self.kind, self.args, self.status,
                self.created_ms, self.source, self.job_id, self.result, self.error,
                self.last_error, self.cancel_requested, self.cancel_reason,
                self.submitted_ms, self.started_ms, self.finished_ms, self.duration_ms]


_RUN_FIELDS = len(fields(Run))


@dataclass(slots=True)
class Route:
    id: str
    event_type: str
    condition: str | None
    path: str
    kind: str
    args: bytes                       # msgpack map of literal args
    args_from: dict[str, str]         # arg name -> JMESPath over the event
    enabled: bool
    start_after: int                  # the rule sees events with a larger offset
    version: int
    created_ms: int
    updated_ms: int

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "event_type": self.event_type, "condition": self.condition,
                "path": self.path, "kind": self.kind, "args": unpack_plain(self.args),
                "args_from": dict(self.args_from), "enabled": self.enabled,
                "start_after": self.start_after, "version": self.version,
                "created_ms": self.created_ms, "updated_ms": self.updated_ms}

    def row(self) -> list[Any]:
        return [self.id, self.event_type, self.condition, self.path, self.kind, self.args,
                dict(self.args_from), self.enabled, self.start_after, self.version,
                self.created_ms, self.updated_ms]


def route_matches_type(event_type: str, glob: str) -> bool:
    """The type part of a rule (the condition is evaluated by the leader)."""
    return fnmatchcase(event_type, glob)


# --- validation helpers -------------------------------------------------------------------

def _packed(value: Any, where: str, max_bytes: int) -> bytes:
    try:
        raw = pack_plain(value)
        unpack_plain(raw)
    except Exception:
        raise Invalid(f"{where} is not plain msgpack data (nil, bool, 64-bit int, float, "
                      "str, bin, list, string-keyed map; moderate nesting)") from None
    if len(raw) > max_bytes:
        raise Invalid(f"{where} is {len(raw)} bytes packed; the limit is {max_bytes}")
    return raw


def _args(body: Mapping[str, Any], where: str) -> bytes:
    value = body.get("args")
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise Invalid(f"{where}.args must be a map")
    return _packed(value, f"{where}.args", MAX_ARGS_BYTES)


def _run_id(body: Mapping[str, Any], where: str, key: str = "id") -> str:
    value = body.get(key)
    if not isinstance(value, str) or not RUN_ID.fullmatch(value):
        raise Invalid(f"{where}.{key} must be a lowercase UUID (8-4-4-4-12 hex digits)")
    return value


def validate_path(value: object, where: str) -> str:
    if (not isinstance(value, str) or not 1 <= len(value) <= MAX_PATH_LENGTH
            or not WORKFLOW_PATH.fullmatch(value)
            or any(seg in (".", "..") for seg in value.split("/"))):
        raise Invalid(f"{where} must be a Windmill path like u/user/name or f/folder/name "
                      f"(letters, digits, _ @ . - and /; at most {MAX_PATH_LENGTH} "
                      "characters)")
    return value


def _kind(body: Mapping[str, Any], where: str) -> str:
    value = body.get("kind")
    if value not in KINDS:
        raise Invalid(f"{where}.kind must be script or flow")
    assert isinstance(value, str)
    return value


def _source(value: object, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    src = require_map(value, where)
    if len(src) > MAX_SOURCE_KEYS:
        raise Invalid(f"{where} has more than {MAX_SOURCE_KEYS} keys")
    out: dict[str, Any] = {}
    for key, item in src.items():
        if not isinstance(key, str) or not 1 <= len(key) <= 64:
            raise Invalid(f"{where} keys must be strings of 1 to 64 characters")
        if isinstance(item, bool) or not (
                (isinstance(item, str) and len(item) <= 256)
                or (type(item) is int and 0 <= item <= _TS_MAX)):
            raise Invalid(f"{where} values must be strings (<= 256 chars) or non-negative "
                          "integers")
        out[key] = item
    return out


def _bool(body: Mapping[str, Any], key: str, where: str) -> bool:
    value = body.get(key)
    if not isinstance(value, bool):
        raise Invalid(f"{where}.{key} must be a boolean")
    return value


def _source_key(rule: str, offset: int) -> str:
    return f"{rule}\x00{offset}"


# --- the component --------------------------------------------------------------------------

class Workflows:
    """Runs, routing rules and the routing cursor."""

    def __init__(self) -> None:
        self._runs: dict[str, Run] = {}           # creation order
        self._active: dict[str, None] = {}        # ids of runs that are not final
        self._finished: dict[str, None] = {}      # ids of final runs, in finishing order
        self._by_source: dict[str, str] = {}      # "rule\0offset" -> run id
        self._routes: dict[str, Route] = {}
        self._cursor = 0
        self._seq = 0
        self.revision = 0   # bumped on every change: a cheap "anything new?" for readers

    # --- read side ------------------------------------------------------------------

    @property
    def cursor(self) -> int:
        """Every event with an offset <= cursor has been routed."""
        return self._cursor

    def get(self, run_id: str) -> dict[str, Any] | None:
        run = self._runs.get(run_id)
        return run.view() if run is not None else None

    def list_runs(self, *, status: str | None = None, after: int = 0,
             limit: int = 100) -> tuple[list[dict[str, Any]], int]:
        """Runs with ``seq > after`` (ascending), optionally of one status; returns
        ``(runs, next)`` where ``next`` is the ``after`` of the following page."""
        found: list[dict[str, Any]] = []
        nxt = after
        for run in self._runs.values():
            if run.seq <= after:
                continue
            if status is None or run.status == status:
                found.append(run.view())
                nxt = run.seq
                if len(found) >= limit:
                    break
        return found, nxt

    def active_ids(self) -> list[str]:
        """Ids of the runs that are not final, oldest first."""
        return list(self._active)

    def active(self) -> list[dict[str, Any]]:
        """Every run that is not final, oldest first."""
        return [self._runs[run_id].view() for run_id in self._active]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for run in self._runs.values():
            out[run.status] += 1
        return out

    def route(self, route_id: str) -> dict[str, Any] | None:
        route = self._routes.get(route_id)
        return route.view() if route is not None else None

    def routes(self) -> list[dict[str, Any]]:
        return [r.view() for r in sorted(self._routes.values(), key=lambda r: r.id)]

    def run_for(self, rule: str, offset: int) -> str | None:
        return self._by_source.get(_source_key(rule, offset))

    # --- commands ---------------------------------------------------------------------

    def commands(self) -> Mapping[str, Handler]:
        return {
            "workflow.run.create": self._create,
            "workflow.run.submitted": self._submitted,
            "workflow.run.running": self._running,
            "workflow.run.finish": self._finish,
            "workflow.run.note": self._note,
            "workflow.run.cancel": self._cancel,
            "workflow.route.put": self._route_put,
            "workflow.route.delete": self._route_delete,
            "workflow.route.advance": self._advance,
        }

    def _changed(self) -> None:
        self.revision += 1

    def _known(self, body: Mapping[str, Any], where: str = "body") -> Run:
        run_id = _run_id(body, where)
        run = self._runs.get(run_id)
        if run is None:
            raise Refused("not_found", "no such workflow run")
        return run

    def _add_run(self, run_id: str, path: str, kind: str, args: bytes,
                 source: dict[str, Any] | None, now: int) -> Run:
        self._seq += 1
        run = Run(run_id, self._seq, path, kind, args, "pending", now, source)
        self._runs[run_id] = run
        self._active[run_id] = None
        if source is not None and "rule" in source and "offset" in source:
            self._by_source[_source_key(source["rule"], source["offset"])] = run_id
        return run

    def _trim(self) -> None:
        while len(self._runs) > MAX_RUNS and self._finished:
            old_id = next(iter(self._finished))
            del self._finished[old_id]
            old = self._runs.pop(old_id)
            if old.source is not None and "rule" in old.source and "offset" in old.source:
                key = _source_key(old.source["rule"], old.source["offset"])
                if self._by_source.get(key) == old_id:
                    del self._by_source[key]

    def _create(self, body: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        check_keys(body, "body", required=("id", "path", "kind"),
                   optional=("args", "source"))
        run_id = _run_id(body, "body")
        path = validate_path(body["path"], "body.path")
        kind = _kind(body, "body")
        args = _args(body, "body")
        source = _source(body.get("source"), "body.source")
        existing = self._runs.get(run_id)
        if existing is not None:
            if (existing.path, existing.kind, existing.args) != (path, kind, args):
                raise Refused("conflict", "this run id is already used by another run")
            return {"id": run_id, "status": existing.status, "duplicate": True}
        if len(self._active) >= MAX_ACTIVE_RUNS:
            raise Refused("too_many_runs", f"{MAX_ACTIVE_RUNS} runs are already waiting or "
                                           "running; retry when some have finished")
        self._add_run(run_id, path, kind, args, source, ctx.now_ms)
        self._trim()
        self._changed()
        return {"id": run_id, "status": "pending", "duplicate": False}

    def _submitted(self, body: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        check_keys(body, "body", required=("id", "job_id"))
        run = self._known(body)
        job_id = _run_id(body, "body", "job_id")
        if run.status != "pending":
            return {"id": run.id, "status": run.status, "changed": False}
        run.status = "submitted"
        run.job_id = job_id
        run.submitted_ms = ctx.now_ms
        run.last_error = None
        self._changed()
        return {"id": run.id, "status": run.status, "changed": True}

    def _running(self, body: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        check_keys(body, "body", required=("id",), optional=("job_id",))
        run = self._known(body)
        job_id = _run_id(body, "body", "job_id") if body.get("job_id") is not None else None
        if _RANK[run.status] >= _RANK["running"]:
            return {"id": run.id, "status": run.status, "changed": False}
        run.status = "running"
        if run.job_id is None:
            run.job_id = job_id
        if run.submitted_ms is None:
            run.submitted_ms = ctx.now_ms
        run.started_ms = ctx.now_ms
        run.last_error = None
        self._changed()
        return {"id": run.id, "status": run.status, "changed": True}

    def _finish(self, body: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        check_keys(body, "body", required=("id", "status"),
                   optional=("result", "error", "duration_ms", "job_id"))
        run = self._known(body)
        status = body["status"]
        if status not in FINAL:
            raise Invalid("body.status must be success, failure or canceled")
        result = (_packed(body["result"], "body.result", MAX_RESULT_BYTES)
                  if "result" in body else None)
        error = optional_str(body, "error", "body", max_len=MAX_ERROR_LENGTH,
                             allow_empty=True)
        duration = (require_int(body, "duration_ms", "body", minimum=0, maximum=_TS_MAX)
                    if body.get("duration_ms") is not None else None)
        job_id = _run_id(body, "body", "job_id") if body.get("job_id") is not None else None
        if run.final:
            return {"id": run.id, "status": run.status, "changed": False}
        run.status = status
        run.result = result
        run.error = error
        run.duration_ms = duration
        if run.job_id is None:
            run.job_id = job_id
        run.finished_ms = ctx.now_ms
        run.last_error = None
        del self._active[run.id]
        self._finished[run.id] = None
        self._trim()
        self._changed()
        return {"id": run.id, "status": run.status, "changed": True}

    def _note(self, body: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        check_keys(body, "body", required=("id", "error"))
        run = self._known(body)
        note = optional_str(body, "error", "body", max_len=MAX_ERROR_LENGTH)
        if run.final or run.last_error == note:
            return {"id": run.id, "changed": False}
        run.last_error = note
        self._changed()
        return {"id": run.id, "changed": True}

    def _cancel(self, body: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        check_keys(body, "body", required=("id",), optional=("reason",))
        run = self._known(body)
        reason = optional_str(body, "reason", "body", max_len=MAX_REASON_LENGTH,
                              allow_empty=True)
        if run.final:
            raise Refused("conflict", f"the run already finished ({run.status})")
        if not run.cancel_requested:
            run.cancel_requested = True
            run.cancel_reason = reason
            self._changed()
        return {"id": run.id, "status": run.status, "cancel_requested": True}

    # --- routing ------------------------------------------------------------------------

    def _route_put(self, body: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        check_keys(body, "body", required=("id", "event_type", "path", "kind", "enabled",
                                           "start_after"),
                   optional=("condition", "args", "args_from"))
        route_id = require_str(body, "id", "body", max_len=128)
        if not ROUTE_ID.fullmatch(route_id):
            raise Invalid("body.id must be 1-128 characters of A-Z a-z 0-9 . _ : - "
                          "starting with a letter or digit")
        event_type = require_str(body, "event_type", "body", max_len=256)
        condition = optional_str(body, "condition", "body", max_len=MAX_EXPR_LENGTH)
        path = validate_path(body["path"], "body.path")
        kind = _kind(body, "body")
        args = _args(body, "body")
        raw_from = body.get("args_from") or {}
        args_from = dict(require_map(raw_from, "body.args_from"))
        if len(args_from) > MAX_ARGS_FROM:
            raise Invalid(f"body.args_from has more than {MAX_ARGS_FROM} entries")
        for name, expr in args_from.items():
            if (not isinstance(name, str) or not 1 <= len(name) <= 128
                    or not isinstance(expr, str) or not 1 <= len(expr) <= MAX_EXPR_LENGTH):
                raise Invalid("body.args_from must map argument names (1-128 chars) to "
                              f"expressions (1-{MAX_EXPR_LENGTH} chars)")
        enabled = _bool(body, "enabled", "body")
        start_after = require_int(body, "start_after", "body", minimum=0, maximum=_TS_MAX)
        old = self._routes.get(route_id)
        if old is None and len(self._routes) >= MAX_ROUTES:
            raise Refused("too_many_routes", f"at most {MAX_ROUTES} routing rules")
        self._routes[route_id] = Route(
            route_id, event_type, condition, path, kind, args, args_from, enabled,
            start_after if old is None else old.start_after,   # an edit keeps its scope
            1 if old is None else old.version + 1,
            ctx.now_ms if old is None else old.created_ms, ctx.now_ms)
        self._changed()
        return {"id": route_id, "created": old is None,
                "version": self._routes[route_id].version}

    def _route_delete(self, body: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        check_keys(body, "body", required=("id",))
        route_id = require_str(body, "id", "body", max_len=128)
        if route_id not in self._routes:
            raise Refused("not_found", "no such routing rule")
        del self._routes[route_id]
        self._changed()
        return {"id": route_id, "deleted": True}

    def _advance(self, body: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        check_keys(body, "body", required=("from", "to", "starts"))
        start = require_int(body, "from", "body", minimum=0, maximum=_TS_MAX)
        end = require_int(body, "to", "body", minimum=start, maximum=_TS_MAX)
        starts = body["starts"]
        if not isinstance(starts, list) or len(starts) > MAX_STARTS_PER_ADVANCE:
            raise Invalid(f"body.starts must be a list of at most {MAX_STARTS_PER_ADVANCE}")
        prepared: list[tuple[str, str, str, bytes, dict[str, Any]]] = []
        ids: set[str] = set()
        for number, raw in enumerate(starts):
            where = f"body.starts[{number}]"
            item = require_map(raw, where)
            check_keys(item, where, required=("run_id", "rule", "offset", "path", "kind"),
                       optional=("args", "event_id"))
            run_id = _run_id(item, where, "run_id")
            rule = require_str(item, "rule", where, max_len=128)
            offset = require_int(item, "offset", where, minimum=start + 1, maximum=end)
            path = validate_path(item["path"], f"{where}.path")
            kind = _kind(item, where)
            args = _args(item, where)
            event_id = optional_str(item, "event_id", where, max_len=256)
            if run_id in ids:
                raise Invalid(f"{where}.run_id repeats within the batch")
            ids.add(run_id)
            source: dict[str, Any] = {"rule": rule, "offset": offset}
            if event_id is not None:
                source["event_id"] = event_id
            prepared.append((run_id, path, kind, args, source))
        if start != self._cursor:
            raise Refused("cursor_moved", f"routing cursor is at {self._cursor}, not at "
                                          f"{start}: re-read and route from there")
        if any(p[0] in self._runs for p in prepared):
            raise Refused("conflict", "a run id in body.starts is already used")
        fresh = [p for p in prepared
                 if _source_key(p[4]["rule"], p[4]["offset"]) not in self._by_source]
        if len(self._active) + len(fresh) > MAX_ACTIVE_RUNS:
            raise Refused("too_many_runs", f"routing would exceed {MAX_ACTIVE_RUNS} runs "
                                           "waiting or running")
        created: list[str] = []
        for run_id, path, kind, args, source in fresh:
            key = _source_key(source["rule"], source["offset"])
            if key in self._by_source:   # the same (rule, offset) twice in one batch
                continue
            self._add_run(run_id, path, kind, args, source, ctx.now_ms)
            created.append(run_id)
        self._cursor = end
        self._trim()
        self._changed()
        return {"cursor": end, "created": created,
                "skipped": len(prepared) - len(created)}

    # --- snapshot -----------------------------------------------------------------------

    def to_snapshot(self) -> dict[str, Any]:
        return {"seq": self._seq, "cursor": self._cursor,
                "runs": [run.row() for run in self._runs.values()],
                "finished": list(self._finished),
                "routes": [r.row() for r in self._routes.values()]}

    @classmethod
    def from_snapshot(cls, obj: object) -> Workflows:
        if not isinstance(obj, dict) or set(obj) != {"seq", "cursor", "runs", "finished",
                                                     "routes"}:
            raise ValueError("workflows section must be a map with seq, cursor, runs, "
                             "finished, routes")
        seq, cursor = obj["seq"], obj["cursor"]
        if type(seq) is not int or type(cursor) is not int or seq < 0 or cursor < 0:
            raise ValueError("workflows.seq and cursor must be non-negative integers")
        wf = cls()
        wf._seq, wf._cursor = seq, cursor
        if not isinstance(obj["runs"], list) or not isinstance(obj["routes"], list):
            raise ValueError("workflows.runs and routes must be lists")
        for row in obj["runs"]:
            if not isinstance(row, list) or len(row) != _RUN_FIELDS:
                raise ValueError("a workflow run row has the wrong length")
            run = Run(*row)
            _check_run(run, seq)
            if run.id in wf._runs:
                raise ValueError("workflow run ids repeat")
            wf._runs[run.id] = run
            if not run.final:
                wf._active[run.id] = None
            src = run.source
            if src is not None and "rule" in src and "offset" in src:
                wf._by_source[_source_key(src["rule"], src["offset"])] = run.id
        finished = obj["finished"]
        if (not isinstance(finished, list)
                or sorted(finished) != sorted(i for i, r in wf._runs.items() if r.final)):
            raise ValueError("workflows.finished must list exactly the final runs")
        wf._finished = dict.fromkeys(finished)
        for row in obj["routes"]:
            if not isinstance(row, list) or len(row) != 12:
                raise ValueError("a routing rule row has the wrong length")
            route = Route(*row)
            if not (isinstance(route.id, str) and isinstance(route.event_type, str)
                    and (route.condition is None or isinstance(route.condition, str))
                    and isinstance(route.path, str) and route.kind in KINDS
                    and isinstance(route.args, bytes) and isinstance(route.args_from, dict)
                    and isinstance(route.enabled, bool) and type(route.start_after) is int
                    and type(route.version) is int and type(route.created_ms) is int
                    and type(route.updated_ms) is int):
                raise ValueError("a routing rule has fields of the wrong type")
            unpack_plain(route.args)
            wf._routes[route.id] = route
        return wf


def _check_run(run: Run, seq: int) -> None:
    ok = (isinstance(run.id, str) and type(run.seq) is int and 0 < run.seq <= seq
          and isinstance(run.path, str) and run.kind in KINDS
          and isinstance(run.args, bytes) and run.status in STATUSES
          and type(run.created_ms) is int
          and (run.source is None or isinstance(run.source, dict))
          and (run.job_id is None or isinstance(run.job_id, str))
          and (run.result is None or isinstance(run.result, bytes))
          and all(v is None or isinstance(v, str)
                  for v in (run.error, run.last_error, run.cancel_reason))
          and isinstance(run.cancel_requested, bool)
          and all(v is None or type(v) is int for v in (
              run.submitted_ms, run.started_ms, run.finished_ms, run.duration_ms)))
    if not ok:
        raise ValueError("a workflow run has fields of the wrong type")
    unpack_plain(run.args)
    if run.result is not None:
        unpack_plain(run.result)
