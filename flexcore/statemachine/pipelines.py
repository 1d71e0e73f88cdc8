"""ETL pipelines: definitions, runs and the replicated checkpoint of each pipeline.

Owns the ``pipeline.*`` commands and their read side. Pure data: nothing here starts
a plugin; the leader-side runner (``flexcore.plugins.runner``) reacts to this state and
reports back with commands.

A **pipeline** is ``{name, extractor, transforms, loader}``, each stage ``{plugin,
config, timeout_s?}``. Its **checkpoint** is ``(epoch, seq, cursor)``: ``cursor`` is
the extractor's position after the last batch that was loaded, ``seq`` counts those
batches, ``epoch`` counts resets (a changed extractor starts a new epoch at seq 0 with
no cursor, because the old cursor means nothing in another source). The checkpoint
belongs to the pipeline, so each run continues where the previous one stopped
(incremental).

A **run**: ``pipeline.run.create`` (``pending``; run id chosen by the proposer) ->
``pipeline.run.start`` (``running``) -> ``pipeline.checkpoint`` once per loaded batch ->
``pipeline.run.finish`` (``success`` | ``failure``). Status only moves forward and a
finish after a finish is a no-op, so a deposed leader cannot overwrite an outcome. At
most one run per pipeline is not final (``run_active`` otherwise), and a pipeline with
an active run can be neither redefined nor deleted (``conflict``).

``pipeline.checkpoint {pipeline, run, epoch, seq, cursor, rows}`` is a compare-and-set:
it applies only for the running run of that pipeline, in the current epoch, with
``seq`` = current seq + 1 and a cursor above the current one (when both are numbers or
both strings). A ``seq`` at or below the current one is answered ``changed: false``
(the batch was already committed: a retried proposal, or a stale leader's late
report), a gap is refused with ``checkpoint_gap``. So the checkpoint only moves
forward, one batch at a time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
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

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PLUGIN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
RUN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
STATUSES = ("pending", "running", "success", "failure")
FINAL = frozenset({"success", "failure"})
MAX_PIPELINES = 1000
MAX_RUNS = 10_000
MAX_TRANSFORMS = 16
MAX_SPEC_BYTES = 64 * 1024
MAX_CURSOR_BYTES = 1024
MAX_ERROR_LENGTH = 2000
MAX_TIMEOUT_S = 3600
_I64 = 2**63 - 1


@dataclass(slots=True)
class Pipeline:
    name: str
    spec: bytes               # msgpack {extractor, transforms, loader}
    version: int
    created_ms: int
    updated_ms: int
    epoch: int = 0
    seq: int = 0
    cursor: Any = None
    rows: int = 0             # rows loaded in this epoch
    checkpoint_ms: int | None = None

    def checkpoint(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seq": self.seq, "cursor": self.cursor,
                "rows": self.rows, "updated_ms": self.checkpoint_ms}

    def view(self) -> dict[str, Any]:
        spec = unpack_plain(self.spec)
        return {"name": self.name, **spec, "version": self.version,
                "created_ms": self.created_ms, "updated_ms": self.updated_ms,
                "checkpoint": self.checkpoint()}

    def row(self) -> list[Any]:
        return [self.name, self.spec, self.version, self.created_ms, self.updated_ms,
                self.epoch, self.seq, self.cursor, self.rows, self.checkpoint_ms]


@dataclass(slots=True)
class Run:
    id: str
    seq: int
    pipeline: str
    status: str
    created_ms: int
    source: dict[str, Any] | None = None
    epoch: int | None = None
    start_seq: int | None = None
    start_cursor: Any = None
    batches: int = 0
    rows: int = 0
    error: str | None = None
    last_error: str | None = None
    started_ms: int | None = None
    finished_ms: int | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def view(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "seq": self.seq, "pipeline": self.pipeline,
            "status": self.status, "created_ms": self.created_ms,
            "started_ms": self.started_ms, "finished_ms": self.finished_ms,
            "source": dict(self.source) if self.source is not None else None,
            "epoch": self.epoch, "start_seq": self.start_seq,
            "start_cursor": self.start_cursor, "batches": self.batches, "rows": self.rows}
        if self.error is not None:
            out["error"] = self.error
        if self.last_error is not None:
            out["last_error"] = self.last_error
        return out

    def row(self) -> list[Any]:
        return [getattr(self, f.name) for f in fields(Run)]


_RUN_FIELDS = len(fields(Run))
_PIPELINE_FIELDS = len(fields(Pipeline))


# --- validation ---------------------------------------------------------------------------

def _stage(value: object, where: str) -> dict[str, Any]:
    stage = require_map(value, where)
    check_keys(stage, where, required=("plugin", "config"), optional=("timeout_s",))
    plugin = stage["plugin"]
    if not isinstance(plugin, str) or not PLUGIN.fullmatch(plugin):
        raise Invalid(f"{where}.plugin must be a plugin name (a-z 0-9 . _ -, at most 64)")
    require_map(stage["config"], f"{where}.config")
    out: dict[str, Any] = {"plugin": plugin, "config": stage["config"]}
    if stage.get("timeout_s") is not None:
        out["timeout_s"] = require_int(stage, "timeout_s", where, minimum=1,
                                       maximum=MAX_TIMEOUT_S)
    return out


def validate_spec(body: Mapping[str, Any]) -> dict[str, Any]:
    """``{extractor, transforms, loader}`` in canonical form."""
    transforms = body.get("transforms")
    if transforms is None:
        transforms = []
    if not isinstance(transforms, list) or len(transforms) > MAX_TRANSFORMS:
        raise Invalid(f"body.transforms must be a list of at most {MAX_TRANSFORMS} stages")
    return {"extractor": _stage(body.get("extractor"), "body.extractor"),
            "transforms": [_stage(t, f"body.transforms[{i}]")
                           for i, t in enumerate(transforms)],
            "loader": _stage(body.get("loader"), "body.loader")}


def _name(body: Mapping[str, Any], key: str, where: str = "body") -> str:
    value = body.get(key)
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise Invalid(f"{where}.{key} must be 1-128 characters of A-Z a-z 0-9 . _ - "
                      "starting with a letter or digit")
    return value


def _run_id(body: Mapping[str, Any], key: str = "id") -> str:
    value = body.get(key)
    if not isinstance(value, str) or not RUN_ID.fullmatch(value):
        raise Invalid(f"body.{key} must be a lowercase UUID (8-4-4-4-12 hex digits)")
    return value


def _cursor(value: Any) -> Any:
    try:
        raw = pack_plain(value)
        unpack_plain(raw)
    except Exception:
        raise Invalid("body.cursor must be plain msgpack data") from None
    if len(raw) > MAX_CURSOR_BYTES:
        raise Invalid(f"body.cursor is larger than {MAX_CURSOR_BYTES} bytes packed")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def cursor_advances(old: Any, new: Any) -> bool:
    """Whether ``new`` is past ``old`` (always true when they cannot be compared)."""
    if old is None:
        return True
    if _number(old) and _number(new):
        return bool(new > old)
    if isinstance(old, str) and isinstance(new, str):
        return new > old
    return True


def _source(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    src = require_map(value, "body.source")
    if len(src) > 8 or not all(
            isinstance(k, str) and len(k) <= 64
            and ((isinstance(v, str) and len(v) <= 256) or (type(v) is int and v >= 0))
            for k, v in src.items()):
        raise Invalid("body.source must map at most 8 names to strings or integers")
    return dict(src)


# --- the component --------------------------------------------------------------------------

class Pipelines:
    """Pipeline definitions, their checkpoints, and runs."""

    def __init__(self) -> None:
        self._pipelines: dict[str, Pipeline] = {}
        self._runs: dict[str, Run] = {}
        self._active: dict[str, str] = {}         # pipeline name -> id of its active run
        self._finished: dict[str, None] = {}      # final run ids, in finishing order
        self._seq = 0
        self.revision = 0

    # --- read side --------------------------------------------------------------------

    def get(self, name: str) -> dict[str, Any] | None:
        p = self._pipelines.get(name)
        if p is None:
            return None
        return {**p.view(), "active_run": self._active.get(name)}

    def spec(self, name: str) -> dict[str, Any] | None:
        p = self._pipelines.get(name)
        if p is None:
            return None
        spec: dict[str, Any] = unpack_plain(p.spec)
        return spec

    def checkpoint(self, name: str) -> dict[str, Any] | None:
        p = self._pipelines.get(name)
        return p.checkpoint() if p is not None else None

    def list_pipelines(self) -> list[dict[str, Any]]:
        return [self.get(name) or {} for name in sorted(self._pipelines)]

    def run(self, run_id: str) -> dict[str, Any] | None:
        run = self._runs.get(run_id)
        return run.view() if run is not None else None

    def runs(self, pipeline: str | None = None, *, after: int = 0,
             limit: int = 100) -> tuple[list[dict[str, Any]], int]:
        out: list[dict[str, Any]] = []
        nxt = after
        for run in self._runs.values():
            if run.seq <= after or (pipeline is not None and run.pipeline != pipeline):
                continue
            out.append(run.view())
            nxt = run.seq
            if len(out) >= limit:
                break
        return out, nxt

    def active_ids(self) -> list[str]:
        """Runs that are not final, oldest first."""
        return sorted(self._active.values(), key=lambda i: self._runs[i].seq)

    # --- commands -----------------------------------------------------------------------

    def commands(self) -> Mapping[str, Handler]:
        return {
            "pipeline.put": self._put,
            "pipeline.delete": self._delete,
            "pipeline.run.create": self._create,
            "pipeline.run.start": self._start,
            "pipeline.checkpoint": self._checkpoint,
            "pipeline.run.finish": self._finish,
            "pipeline.run.note": self._note,
        }

    def _changed(self) -> None:
        self.revision += 1

    def _put(self, body: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        check_keys(body, "body", required=("name", "extractor", "loader"),
                   optional=("transforms",))
        name = _name(body, "name")
        spec = validate_spec(body)
        try:
            packed = pack_plain(spec)
            unpack_plain(packed)
        except Exception:
            raise Invalid("the stage configs must be plain msgpack data") from None
        if len(packed) > MAX_SPEC_BYTES:
            raise Invalid(f"the pipeline definition is {len(packed)} bytes packed; the "
                          f"limit is {MAX_SPEC_BYTES}")
        old = self._pipelines.get(name)
        if old is None:
            if len(self._pipelines) >= MAX_PIPELINES:
                raise Refused("too_many_pipelines", f"at most {MAX_PIPELINES} pipelines")
            self._pipelines[name] = Pipeline(name, packed, 1, ctx.now_ms, ctx.now_ms)
            self._changed()
            return {"name": name, "created": True, "version": 1, "epoch": 0}
        if old.spec == packed:
            return {"name": name, "created": False, "version": old.version,
                    "epoch": old.epoch}
        if name in self._active:
            raise Refused("conflict", f"run {self._active[name]} of this pipeline is not "
                                      "finished: redefine it afterwards")
        old_extractor = unpack_plain(old.spec)["extractor"]
        if old_extractor != spec["extractor"]:   # another source: its cursor is void
            old.epoch += 1
            old.seq, old.cursor, old.rows, old.checkpoint_ms = 0, None, 0, None
        old.spec, old.version, old.updated_ms = packed, old.version + 1, ctx.now_ms
        self._changed()
        return {"name": name, "created": False, "version": old.version, "epoch": old.epoch}

    def _delete(self, body: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        check_keys(body, "body", required=("name",))
        name = _name(body, "name")
        if name not in self._pipelines:
            raise Refused("not_found", "no such pipeline")
        if name in self._active:
            raise Refused("conflict", f"run {self._active[name]} of this pipeline is not "
                                      "finished")
        del self._pipelines[name]
        self._changed()
        return {"name": name, "deleted": True}

    def _create(self, body: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        check_keys(body, "body", required=("id", "pipeline"), optional=("source",))
        run_id = _run_id(body)
        name = _name(body, "pipeline")
        source = _source(body.get("source"))
        existing = self._runs.get(run_id)
        if existing is not None:
            if existing.pipeline != name:
                raise Refused("conflict", "this run id belongs to another pipeline")
            return {"id": run_id, "status": existing.status, "duplicate": True}
        if name not in self._pipelines:
            raise Refused("not_found", "no such pipeline")
        active = self._active.get(name)
        if active is not None:
            raise Refused("run_active", f"run {active} of this pipeline is not finished")
        self._seq += 1
        self._runs[run_id] = Run(run_id, self._seq, name, "pending", ctx.now_ms, source)
        self._active[name] = run_id
        self._trim()
        self._changed()
        return {"id": run_id, "status": "pending", "duplicate": False}

    def _known(self, body: Mapping[str, Any], key: str = "id") -> Run:
        run = self._runs.get(_run_id(body, key))
        if run is None:
            raise Refused("not_found", "no such pipeline run")
        return run

    def _start(self, body: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        check_keys(body, "body", required=("id",))
        run = self._known(body)
        if run.status != "pending":
            return {"id": run.id, "status": run.status, "changed": False}
        p = self._pipelines[run.pipeline]
        run.status, run.started_ms = "running", ctx.now_ms
        run.epoch, run.start_seq, run.start_cursor = p.epoch, p.seq, p.cursor
        self._changed()
        return {"id": run.id, "status": run.status, "changed": True}

    def _checkpoint(self, body: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        check_keys(body, "body", required=("pipeline", "run", "epoch", "seq", "cursor",
                                           "rows"))
        name = _name(body, "pipeline")
        run = self._known(body, "run")
        epoch = require_int(body, "epoch", "body", minimum=0, maximum=_I64)
        seq = require_int(body, "seq", "body", minimum=1, maximum=_I64)
        cursor = _cursor(body["cursor"])
        rows = require_int(body, "rows", "body", minimum=0, maximum=_I64)
        p = self._pipelines.get(name)
        if p is None or run.pipeline != name:
            raise Refused("not_found", "no such pipeline, or the run is not one of its runs")
        if run.status != "running":
            return {"changed": False, "seq": p.seq, "reason": f"run is {run.status}"}
        if epoch != p.epoch:
            raise Refused("conflict", f"the checkpoint is in epoch {p.epoch}, not {epoch}")
        if seq <= p.seq:
            return {"changed": False, "seq": p.seq, "reason": "batch already committed"}
        if seq != p.seq + 1:
            raise Refused("checkpoint_gap", f"the next batch is {p.seq + 1}, not {seq}")
        if not cursor_advances(p.cursor, cursor):
            raise Refused("conflict", "the cursor must move forward")
        p.seq, p.cursor, p.rows, p.checkpoint_ms = seq, cursor, p.rows + rows, ctx.now_ms
        run.batches += 1
        run.rows += rows
        run.last_error = None
        self._changed()
        return {"changed": True, "seq": seq}

    def _finish(self, body: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        check_keys(body, "body", required=("id", "status"), optional=("error",))
        run = self._known(body)
        status = body["status"]
        if status not in FINAL:
            raise Invalid("body.status must be success or failure")
        error = optional_str(body, "error", "body", max_len=MAX_ERROR_LENGTH,
                             allow_empty=True)
        if run.final:
            return {"id": run.id, "status": run.status, "changed": False}
        run.status, run.error, run.finished_ms = status, error, ctx.now_ms
        if self._active.get(run.pipeline) == run.id:
            del self._active[run.pipeline]
        self._finished[run.id] = None
        self._trim()
        self._changed()
        return {"id": run.id, "status": run.status, "changed": True}

    def _note(self, body: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
        check_keys(body, "body", required=("id", "error"))
        run = self._known(body)
        note = require_str(body, "error", "body", max_len=MAX_ERROR_LENGTH)
        if run.final or run.last_error == note:
            return {"id": run.id, "changed": False}
        run.last_error = note
        self._changed()
        return {"id": run.id, "changed": True}

    def _trim(self) -> None:
        while len(self._runs) > MAX_RUNS and self._finished:
            old = next(iter(self._finished))
            del self._finished[old]
            del self._runs[old]

    # --- snapshot -----------------------------------------------------------------------

    def to_snapshot(self) -> dict[str, Any]:
        return {"seq": self._seq,
                "pipelines": [p.row() for p in self._pipelines.values()],
                "runs": [r.row() for r in self._runs.values()],
                "finished": list(self._finished)}

    @classmethod
    def from_snapshot(cls, obj: object) -> Pipelines:
        if not isinstance(obj, dict) or set(obj) != {"seq", "pipelines", "runs", "finished"}:
            raise ValueError("pipelines section must be a map with seq, pipelines, runs, "
                             "finished")
        seq = obj["seq"]
        if type(seq) is not int or seq < 0:
            raise ValueError("pipelines.seq must be a non-negative integer")
        out = cls()
        out._seq = seq
        for row in _list(obj["pipelines"]):
            if not isinstance(row, list) or len(row) != _PIPELINE_FIELDS:
                raise ValueError("a pipeline row has the wrong length")
            p = Pipeline(*row)
            if not (isinstance(p.name, str) and isinstance(p.spec, bytes)
                    and all(type(v) is int for v in (p.version, p.created_ms, p.updated_ms,
                                                     p.epoch, p.seq, p.rows))
                    and (p.checkpoint_ms is None or type(p.checkpoint_ms) is int)):
                raise ValueError("a pipeline has fields of the wrong type")
            unpack_plain(p.spec)
            out._pipelines[p.name] = p
        for row in _list(obj["runs"]):
            if not isinstance(row, list) or len(row) != _RUN_FIELDS:
                raise ValueError("a pipeline run row has the wrong length")
            run = Run(*row)
            if not (isinstance(run.id, str) and type(run.seq) is int and 0 < run.seq <= seq
                    and isinstance(run.pipeline, str) and run.status in STATUSES
                    and type(run.created_ms) is int and type(run.batches) is int
                    and type(run.rows) is int
                    and (run.source is None or isinstance(run.source, dict))
                    and all(v is None or isinstance(v, str)
                            for v in (run.error, run.last_error))
                    and all(v is None or type(v) is int for v in (
                        run.epoch, run.start_seq, run.started_ms, run.finished_ms))):
                raise ValueError("a pipeline run has fields of the wrong type")
            if run.id in out._runs:
                raise ValueError("pipeline run ids repeat")
            out._runs[run.id] = run
            if not run.final:
                if run.pipeline in out._active:
                    raise ValueError("two active runs of one pipeline")
                out._active[run.pipeline] = run.id
        finished = _list(obj["finished"])
        if sorted(finished) != sorted(i for i, r in out._runs.items() if r.final):
            raise ValueError("pipelines.finished must list exactly the final runs")
        out._finished = dict.fromkeys(finished)
        return out


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("expected a list")
    return value
