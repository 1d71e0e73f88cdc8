"""The leader's side of workflow runs: submit to Windmill, poll, commit outcomes, route.

`WorkflowRunner` runs on every node and does nothing unless this node is the Raft leader
with a quorum. Then, for the term it leads in, it keeps one driver task per run that is
not final (a new leader therefore resumes every run a previous one left behind):

- ``pending``: submit to Windmill with ``job_id`` = the run id (the UUID committed
  before anything was sent). A 400 "Job with id ... already exists" means an earlier
  attempt (ours or a dead leader's) created it: counted as submitted, never a second
  job. 404 (no such script/flow) and other 400s finish the run as ``failure`` with
  Windmill's message. 5xx, connection errors, 401 and 403 leave it ``pending`` with
  ``last_error`` set, and it is tried again with backoff.
- ``submitted`` / ``running``: poll ``get_result_maybe`` with backoff (``poll_min`` to
  ``poll_max``); commit ``running`` once Windmill reports it started; once completed,
  read the ``CompletedJob`` and commit ``success`` / ``failure`` / ``canceled`` with the
  result or error and Windmill's ``duration_ms``.
- a cancel request: before submission the run finishes ``canceled`` without calling
  Windmill; after it, the runner asks Windmill to cancel the job and commits whatever
  Windmill then reports.

Routing: a router task reads events after the replicated cursor from this node's
applied log, evaluates the rules (`flexcore.windmill.routing`) and commits
``workflow.route.advance {from, to, starts}``; the state machine applies it only if the
cursor is still at ``from``, so each (rule, event) starts exactly one run.

Leadership is re-checked before every side effect, and the watchdog (the Raft change
listener plus a 0.1 s tick) cancels every task of a term as soon as this node stops
leading in it. A deposed leader's proposals cannot overwrite anything: status only
moves forward in the state machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

import msgpack
from prometheus_client import Counter

from ..errors import CommandRejected, ConsensusError
from ..leadership import RunDriverDuty
from ..raft import RaftNode
from ..service import NodeServices
from ..statemachine import StateMachine
from .client import (
    JobAlreadyExists,
    WindmillBadRequest,
    WindmillClient,
    WindmillError,
    WindmillNotFound,
)
from .routing import RouteCache

log = logging.getLogger("flexcore.windmill")

FINAL = frozenset({"success", "failure", "canceled"})
MAX_RESULT_BYTES = 256 * 1024        # as flexcore.statemachine.workflows
MAX_ERROR_CHARS = 2000
ROUTE_SCAN = 500
ROUTE_MAX_STARTS = 500
_SCHEDULE_NS = uuid.UUID("6b0f2a52-9d3e-4c55-8f57-2f1f3c4b7a10")


def schedule_run_id(fire_key: str) -> str:
    """The run id of a schedule fire: the same fire always names the same run."""
    return str(uuid.uuid5(_SCHEDULE_NS, fire_key))


def _plain_result(value: Any) -> tuple[Any, str | None]:
    """The result as the state machine can keep it, and a note when it could not."""
    try:
        size = len(msgpack.packb(value, use_bin_type=True))
    except (TypeError, ValueError, OverflowError):
        return {"unrepresentable": True}, "the result cannot be stored (e.g. an integer " \
                                          "beyond 64 bits)"
    if size > MAX_RESULT_BYTES:
        return {"truncated": True, "bytes": size}, \
            f"the result is {size} bytes; only results up to {MAX_RESULT_BYTES} are kept"
    return value, None


def error_text(result: Any) -> str:
    """A Windmill error result (``{"error": {"name", "message", ...}}``) as one line."""
    err = result.get("error") if isinstance(result, dict) else None
    if isinstance(err, dict):
        name, message = err.get("name"), err.get("message")
        text = f"{name}: {message}" if name and message else str(message or name or err)
    elif err is not None:
        text = str(err)
    else:
        text = "the job failed"
    return text[:MAX_ERROR_CHARS]


class WorkflowRunner(RunDriverDuty):
    """Drives workflow runs and routing while this node leads."""

    duty = "driving workflow runs and routing"
    runs_component = "workflows"
    run_task_prefix = "workflow-run"

    def __init__(self, raft: RaftNode, machine: StateMachine, services: NodeServices,
                 client: WindmillClient | None, *, poll_min: float = 0.1,
                 poll_max: float = 2.0, retry_max: float = 30.0) -> None:
        super().__init__(raft, machine, log)
        self.services = services
        self.client = client
        self.poll_min = poll_min
        self.poll_max = poll_max
        self.retry_max = retry_max
        self.routes = RouteCache()
        reg = services.registry
        self.submits = Counter("flexcore_workflow_submissions",
                               "Workflow submissions to Windmill by this node",
                               ["result"], registry=reg)
        self.outcomes = Counter("flexcore_workflow_outcomes",
                                "Workflow run outcomes committed by this node",
                                ["status"], registry=reg)
        self.routed = Counter("flexcore_workflow_routed_runs",
                              "Runs started by routing rules (committed by this node)",
                              registry=reg)

    @property
    def enabled(self) -> bool:
        return self.client is not None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self.client is None:
            return
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        if self.client is not None:
            await self.client.close()

    def _begin_session(self, term: int) -> None:
        self.spawn(self._dispatch(term), "workflows-dispatch")
        self.spawn(self._route(term), "workflows-router")

    # -- proposals ---------------------------------------------------------------------

    async def _propose(self, type_: str, body: dict[str, Any]) -> dict[str, Any]:
        value, _ = await self.services.propose(type_, body)
        return value

    def _read_run(self, run_id: str) -> dict[str, Any] | None:
        with self.raft.lock:
            run: dict[str, Any] | None = self.machine.component("workflows").get(run_id)
        return run

    # -- runs ----------------------------------------------------------------------------

    async def _drive(self, run_id: str, term: int) -> None:
        try:
            await self._drive_run(run_id, term)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("workflow run %s: driver failed; the next leader term retries",
                          run_id)
        finally:
            if self._drivers.get(run_id) is asyncio.current_task():
                del self._drivers[run_id]

    async def _drive_run(self, run_id: str, term: int) -> None:
        assert self.client is not None
        delay = self.poll_min
        cancel_sent = False
        last_note: str | None = None
        while self.leads(term):
            run = self._read_run(run_id)
            if run is None or run["status"] in FINAL:
                return
            note: str | None = None
            retry_delay: float | None = None
            try:
                if run["status"] == "pending":
                    if run["cancel_requested"]:
                        await self._finish(run_id, "canceled", term, error=(
                            "canceled before submission"
                            + (f": {run['cancel_reason']}" if run.get("cancel_reason")
                               else "")))
                        return
                    if await self._submit(run, term):
                        delay = self.poll_min
                        continue
                    return
                job_id = run["job_id"] or run_id
                if run["cancel_requested"] and not cancel_sent:
                    if not self.leads(term):
                        return
                    with contextlib.suppress(WindmillNotFound):  # it already completed
                        await self.client.cancel(job_id, run.get("cancel_reason") or
                                                 "canceled through FlexCore")
                    cancel_sent = True
                maybe = await self.client.result_maybe(job_id)
                if maybe.completed:
                    job = await self.client.get_job(job_id)
                    await self._complete(run_id, job, maybe.result, term)
                    return
                if maybe.started and run["status"] == "submitted" and self.leads(term):
                    await self._propose("workflow.run.running", {"id": run_id,
                                                                 "job_id": job_id})
            except WindmillNotFound as exc:
                # A submitted job Windmill does not know (deleted, or another instance).
                await self._finish(run_id, "failure", term, error=exc.text)
                return
            except WindmillError as exc:
                note, retry_delay = exc.text, self._retry_delay(delay)
                log.warning("workflow run %s: %s", run_id, exc)
            except (ConsensusError, CommandRejected) as exc:
                log.debug("workflow run %s: commit failed: %s", run_id, exc.message)
            if note is not None and note != last_note and self.leads(term):
                with contextlib.suppress(ConsensusError, CommandRejected):
                    await self._propose("workflow.run.note", {"id": run_id, "error": note})
                    last_note = note
            await asyncio.sleep(retry_delay if retry_delay is not None else delay)
            delay = min(delay * 1.5, self.poll_max)

    def _retry_delay(self, delay: float) -> float:
        return min(max(delay * 2, 0.5), self.retry_max)

    async def _submit(self, run: dict[str, Any], term: int) -> bool:
        """Submit a pending run; True when it is (now) submitted, False when it ended.
        Raises `WindmillError` for failures worth retrying."""
        assert self.client is not None
        run_id = run["id"]
        if not self.leads(term):
            return False
        submit = self.client.run_script if run["kind"] == "script" else self.client.run_flow
        try:
            job_id = (await submit(run["path"], run["args"], job_id=run_id)).lower()
            self.submits.labels("created").inc()
        except JobAlreadyExists:
            job_id = run_id
            self.submits.labels("already_exists").inc()
            log.info("workflow run %s: Windmill already has job %s (an earlier attempt "
                     "created it): counted as submitted", run_id, job_id)
        except (WindmillNotFound, WindmillBadRequest) as exc:
            self.submits.labels("refused").inc()
            await self._finish(run_id, "failure", term, error=exc.text)
            return False
        except WindmillError:
            self.submits.labels("error").inc()
            raise
        if job_id != run_id:
            log.warning("workflow run %s: Windmill named the job %s (job_id ignored?)",
                        run_id, job_id)
        await self._propose("workflow.run.submitted", {"id": run_id, "job_id": job_id})
        return True

    async def _complete(self, run_id: str, job: dict[str, Any], result: Any,
                        term: int) -> None:
        if job.get("type") != "CompletedJob":
            return  # raced with completion: the next poll sees it
        result = job.get("result", result)
        duration = job.get("duration_ms")
        duration = int(duration) if isinstance(duration, int | float) and duration >= 0 \
            else None
        if job.get("canceled"):
            reason = job.get("canceled_reason")
            await self._finish(run_id, "canceled", term, result=result, duration=duration,
                               error=f"canceled in Windmill by {job.get('canceled_by')}"
                                     + (f": {reason}" if reason else ""))
        elif job.get("success"):
            await self._finish(run_id, "success", term, result=result, duration=duration)
        else:
            await self._finish(run_id, "failure", term, result=result, duration=duration,
                               error=error_text(result))

    async def _finish(self, run_id: str, status: str, term: int, *, result: Any = None,
                      error: str | None = None, duration: int | None = None) -> None:
        if not self.leads(term):
            return
        body: dict[str, Any] = {"id": run_id, "status": status}
        if result is not None or status == "success":
            body["result"], note = _plain_result(result)
            if note:
                error = f"{error}; {note}" if error else note
        if error is not None:
            body["error"] = error[:MAX_ERROR_CHARS]
        if duration is not None:
            body["duration_ms"] = duration
        out = await self._propose("workflow.run.finish", body)
        if out.get("changed"):
            self.outcomes.labels(status).inc()

    # -- routing ---------------------------------------------------------------------------

    async def _route(self, term: int) -> None:
        while self.leads(term):
            wait = self.change_event
            try:
                progressed = await self._route_once(term)
            except (ConsensusError, CommandRejected) as exc:
                code = getattr(exc, "code", "")
                log.log(logging.DEBUG if code == "cursor_moved" else logging.WARNING,
                        "routing step not committed: %s", exc.message)
                progressed = code == "cursor_moved"
                if code == "too_many_runs":
                    await asyncio.sleep(1.0)
            except Exception:
                log.exception("routing step failed; retrying in 1 s")
                progressed = False
                await asyncio.sleep(1.0)
            if not progressed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wait.wait(), 0.5)

    async def _route_once(self, term: int) -> bool:
        with self.raft.lock:
            wf = self.machine.component("workflows")
            views = wf.routes()
            cursor: int = wf.cursor
            last = self.machine.event_stats()["last_offset"]
        routes = self.routes.compile(views)
        if not routes or cursor >= last:
            return False
        first_start = min(r.start_after for r in routes)
        if cursor < first_start:     # nothing before a rule's start can match: skip it
            return await self._advance(term, cursor, min(first_start, last), [])
        with self.raft.lock:
            events, nxt = self.machine.read_events(cursor, ROUTE_SCAN, None, ROUTE_SCAN)
        starts: list[dict[str, Any]] = []
        to = nxt
        for event in events:
            planned = self.routes.plan(routes, event)
            if len(starts) + len(planned) > ROUTE_MAX_STARTS:
                to = event["offset"] - 1
                break
            for route, args in planned:
                starts.append({"run_id": str(uuid.uuid4()), "rule": route.id,
                               "offset": event["offset"], "event_id": event["id"],
                               "path": route.path, "kind": route.kind, "args": args})
        if to <= cursor:
            return False
        return await self._advance(term, cursor, to, starts)

    async def _advance(self, term: int, cursor: int, to: int,
                       starts: list[dict[str, Any]]) -> bool:
        if not self.leads(term):
            return False
        out = await self._propose("workflow.route.advance",
                                  {"from": cursor, "to": to, "starts": starts})
        created = len(out.get("created", []))
        if created:
            self.routed.inc(created)
            log.debug("routed events %d..%d: %d runs started", cursor + 1, to, created)
        return True

    # -- schedules ---------------------------------------------------------------------------

    async def run_for_fire(self, action: dict[str, Any], fire: Any) -> dict[str, Any]:
        """The timer runner's hook for ``{type: "workflow", path, kind, args?}`` actions:
        creates the fire's run (its id is derived from the fire, so completing a fire
        again names the same run and creates nothing new)."""
        body = {"id": schedule_run_id(fire.key), "path": action["path"],
                "kind": action["kind"], "args": action.get("args") or {},
                "source": {"schedule": fire.schedule_id, "fire_time": fire.fire_time_ms}}
        return await self._propose("workflow.run.create", body)

