"""Timer singletons on the node side: the owner's scheduler and the schedules service.

`TimerRunner` runs on every node and does nothing unless this node is the Raft leader
with a quorum. Then it commits ``schedule.own {node, term}``; once that commits (and the
node still leads in that term) it starts an APScheduler 3 ``AsyncIOScheduler`` with one
date-triggered job per enabled schedule, armed at the schedule's next fire time
(computed by `flexcore.schedule_math`). When a job runs, the runner works out which
fires are due (misfire policy included), and for each one first commits
``schedule.claim {id, fire_time, node, term}``; only a committed claim runs the action,
and the outcome (ok / error / timeout, duration, claim lag) is committed with
``schedule.fire_done``. The state machine refuses claims from any term but the
recorded owner's, so a deposed leader cannot fire even if it has not noticed yet.

It stops its scheduler at once (and cancels claims and actions in flight) when this
node stops leading, loses its quorum, its term changes, or its event loop was frozen
for longer than an election timeout (SIGSTOP, a long GC pause): every 0.1 s a watchdog
compares the Raft status with what it owns. A later owner *completes* fires that were
claimed but have no outcome: ``event`` and ``enqueue`` actions are re-run (they are
idempotent: the event id / dedup id is ``sched:{id}:{fire_time}``), other actions are
recorded as ``unknown`` rather than risk running twice.

`ScheduleService` is what the admin API (``flexcore.api.schedules``) and the library
call: it turns requests into ``schedule.*`` commands and renders the replicated state.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger
from prometheus_client import Counter, Gauge, Histogram

from .api.schedules import ScheduleInput
from .errors import CommandRejected, FlexCoreError, NotFound
from .raft import RaftNode
from .schedule_math import (
    due_fires,
    from_ms,
    iso,
    next_fire_after,
    plan_fires,
    trigger_from_state,
    trigger_to_api,
    trigger_to_state,
)
from .service import NodeServices
from .statemachine import StateMachine

log = logging.getLogger("flexcore.timers")

WATCHDOG_S = 0.1
RETAKE_BACKOFF_S = 0.5
_FENCED = frozenset({"stale_term", "not_owner"})


@dataclass(frozen=True, slots=True)
class Fire:
    """What a ``handler`` action receives: one claimed fire."""

    schedule_id: str
    fire_time_ms: int
    manual: bool
    node: str
    term: int

    @property
    def fire_time(self) -> datetime:
        return from_ms(self.fire_time_ms)

    @property
    def key(self) -> str:
        """``sched:{schedule_id}:{fire_time_ms}`` (``:manual`` appended for a manual
        trigger): the event id / queue dedup id of this fire's action."""
        return f"sched:{self.schedule_id}:{self.fire_time_ms}" + (":manual" if self.manual
                                                                   else "")


TimerHandler = Callable[[Fire], Any]
"""A handler action: ``async def f(fire)`` (runs on the loop) or ``def f(fire)`` (runs in
a worker thread)."""
ActionHook = Callable[[dict[str, Any], Fire], Awaitable[Any]]
"""An executor for an action type this module does not run itself (workflow, pipeline)."""


def _is_owner_state(role: str, has_quorum: bool) -> bool:
    return role == "leader" and has_quorum


class TimerRunner:
    """Fires the schedules while this node is the recorded scheduler owner."""

    def __init__(self, raft: RaftNode, machine: StateMachine, services: NodeServices, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.raft = raft
        self.machine = machine
        self.services = services
        self._clock = clock
        self._me = raft.config.self_addr
        self._stall_s = raft.config.election_timeout
        self._handlers: dict[str, TimerHandler] = {}
        self._hooks: dict[str, ActionHook] = {}
        self._term: int | None = None                 # the term we own the scheduler in
        self._scheduler: AsyncIOScheduler | None = None
        self._taking: asyncio.Task[None] | None = None
        self._retake_after = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._inflight: set[tuple[str, int, bool]] = set()   # fires being claimed/run
        self._armed: dict[str, int] = {}                     # schedule id -> version
        self._locks: dict[str, asyncio.Lock] = {}
        self._seen_revision = -1
        self._watchdog: asyncio.Task[None] | None = None
        self._closed = False
        reg = services.registry
        self.claims = Counter("flexcore_timer_claims", "Fire claims proposed by this node",
                              ["result"], registry=reg)
        self.lag = Histogram("flexcore_timer_claim_lag_seconds",
                             "Claim commit time minus scheduled fire time", registry=reg,
                             buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                      0.5, 1, 2.5, 5))
        self.owner_gauge = Gauge("flexcore_timer_owner",
                                 "1 while this node runs the scheduler", registry=reg)

    # -- registration ------------------------------------------------------------------

    def register_handler(self, name: str, fn: TimerHandler) -> None:
        """Make ``{type: "handler", name}`` actions run ``fn(fire)`` on this node."""
        self._handlers[name] = fn

    def register_action(self, type_: str, hook: ActionHook) -> None:
        """Run ``{type: type_}`` actions (``workflow``, ``pipeline``) with ``hook``."""
        self._hooks[type_] = hook

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self.raft.add_change_listener(self._on_change)
        self._watchdog = asyncio.create_task(self._watch(), name="timers-watchdog")

    async def stop(self) -> None:
        self._closed = True
        self._deactivate("node stopping")
        tasks = [t for t in (self._watchdog, self._taking, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def owned_term(self) -> int | None:
        """The term this node runs the scheduler in (None: it does not)."""
        return self._term

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("timer task %s failed", task.get_name(), exc_info=task.exception())

    # -- leadership ---------------------------------------------------------------------

    def _on_change(self) -> None:
        """Called on the loop after applies and leadership changes: cheap checks only."""
        if self._closed:
            return
        try:
            self._check()
        except Exception:
            log.exception("timer runner check failed")

    def _check(self) -> None:
        st = self.raft.status()
        leading = _is_owner_state(st.role, st.has_quorum)
        if self._term is not None and (not leading or st.term != self._term):
            self._deactivate(f"role {st.role}, term {st.term}, quorum {st.has_quorum}")
        if (leading and self._term is None and self._taking is None
                and time.monotonic() >= self._retake_after):
            self._taking = asyncio.create_task(self._take(st.term), name="timers-take")
        if self._term is not None:
            with self.raft.lock:
                revision = self.machine.component("schedules").revision
            if revision != self._seen_revision:
                self._seen_revision = revision
                self._reconcile()

    async def _watch(self) -> None:
        """Every WATCHDOG_S: notice a frozen loop and changes no listener reported."""
        last = time.monotonic()
        while not self._closed:
            await asyncio.sleep(WATCHDOG_S)
            now = time.monotonic()
            if now - last > self._stall_s and self._term is not None:
                # The process was frozen (SIGSTOP, swap, GC) for longer than an election
                # timeout: another node may lead now. Stop, then re-take ownership through
                # Raft, which refuses a stale term.
                self._deactivate(f"event loop was frozen for {now - last:.1f} s")
                self._retake_after = now + RETAKE_BACKOFF_S
            last = now
            self._on_change()

    async def _take(self, term: int) -> None:
        try:
            value, _ = await self.services.propose("schedule.own",
                                                   {"node": self._me, "term": term})
        except FlexCoreError as exc:
            log.info("taking over the scheduler in term %d failed: %s", term, exc.message)
            self._retake_after = time.monotonic() + RETAKE_BACKOFF_S
            return
        finally:
            self._taking = None
        st = self.raft.status()
        if self._closed or not _is_owner_state(st.role, st.has_quorum) or st.term != term:
            return
        if value.get("changed"):
            log.info("scheduler owner: this node (%s), term %d", self._me, term)
        self._activate(term)

    def _activate(self, term: int) -> None:
        if self._term is not None:
            return
        self._term = term
        self.owner_gauge.set(1)
        scheduler = AsyncIOScheduler(timezone="UTC", job_defaults={
            "misfire_grace_time": None, "coalesce": True, "max_instances": 1000})
        scheduler.start()
        self._scheduler = scheduler
        self._armed.clear()
        self._seen_revision = -1
        self._check()

    def _deactivate(self, reason: str) -> None:
        if self._term is None and self._scheduler is None:
            return
        log.info("scheduler stopped on this node (%s): %s", self._me, reason)
        self._term = None
        self.owner_gauge.set(0)
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None and scheduler.running:
            scheduler.remove_all_jobs()
            scheduler.shutdown(wait=False)
        for task in list(self._tasks):
            task.cancel()
        self._armed.clear()
        self._inflight.clear()

    def _owns(self, term: int) -> bool:
        if self._term != term or self._closed:
            return False
        st = self.raft.status()
        return _is_owner_state(st.role, st.has_quorum) and st.term == term

    # -- reacting to the replicated state --------------------------------------------------

    def _reconcile(self) -> None:
        term, scheduler = self._term, self._scheduler
        if term is None or scheduler is None:
            return
        with self.raft.lock:
            schedules = self.machine.component("schedules").list_all()
        present = set()
        for s in schedules:
            sid = s["id"]
            present.add(sid)
            for fire_time in s["pending_manual"]:
                if (sid, fire_time, True) not in self._inflight:
                    self._spawn(self._claim_and_run(s, fire_time, True, term),
                                f"timer-manual-{sid}")
            for fire in s["in_flight"]:
                key = (sid, fire["fire_time"], fire["manual"])
                if key not in self._inflight:
                    self._inflight.add(key)
                    self._spawn(self._complete(s, fire, term), f"timer-complete-{sid}")
            if not s["enabled"]:
                self._disarm(sid)
            elif self._armed.get(sid) != s["version"]:
                self._armed[sid] = s["version"]
                self._spawn(self._due(sid, term), f"timer-due-{sid}")
        for sid in list(self._armed):
            if sid not in present:
                self._disarm(sid)

    def _disarm(self, sid: str) -> None:
        self._armed.pop(sid, None)
        if self._scheduler is not None and self._scheduler.get_job(sid) is not None:
            self._scheduler.remove_job(sid)

    def _arm(self, sid: str, fire_ms: int, term: int) -> None:
        if self._scheduler is None or self._term != term:
            return
        self._scheduler.add_job(self._due, trigger=DateTrigger(run_date=from_ms(fire_ms)),
                                args=[sid, term], id=sid, replace_existing=True,
                                name=f"schedule {sid}")

    async def _due(self, sid: str, term: int) -> None:
        """A schedule's job: claim the due fires the misfire policy keeps, start their
        actions, and arm the job at the next fire time."""
        lock = self._locks.setdefault(sid, asyncio.Lock())
        async with lock:
            if not self._owns(term):
                return
            with self.raft.lock:
                s = self.machine.component("schedules").get(sid)
            if s is None or not s["enabled"]:
                return
            spec = trigger_from_state(s["trigger"])
            now = self._now_ms()
            last = s["last_fire_time"]
            due = due_fires(spec, s["anchor_ms"], last, now, s["misfire_grace_ms"])
            for fire_time in plan_fires(due, now, s["misfire"], s["misfire_grace_ms"]):
                ran = await self._claim_and_run(s, fire_time, False, term, background=True)
                if not ran and not self._owns(term):
                    return
            nxt = next_fire_after(spec, s["anchor_ms"], max(now, last))
            if nxt is not None and self._armed.get(sid) is not None:
                self._arm(sid, nxt, term)

    async def _claim_and_run(self, s: dict[str, Any], fire_time: int, manual: bool,
                             term: int, *, background: bool = False) -> bool:
        """Commit the claim; if it commits, run the action (in a task when
        ``background``). Returns whether the claim committed."""
        sid = s["id"]
        key = (sid, fire_time, manual)
        if key in self._inflight or not self._owns(term):
            return False
        self._inflight.add(key)
        handed_off = False
        try:
            committed = await self._claim(sid, fire_time, manual, term)
            if not committed:
                return False
            fire = Fire(sid, fire_time, manual, self._me, term)
            lag = self._now_ms() - fire_time
            self.lag.observe(max(lag, 0) / 1000)
            if background:
                handed_off = True
                self._spawn(self._run(s, fire, lag, key), f"timer-run-{sid}")
            else:
                await self._run(s, fire, lag, None)
            return True
        finally:
            if not handed_off:
                self._inflight.discard(key)

    async def _claim(self, sid: str, fire_time: int, manual: bool, term: int) -> bool:
        body = {"id": sid, "fire_time": fire_time, "node": self._me, "term": term,
                "manual": manual}
        try:
            await self.services.propose("schedule.claim", body)
        except CommandRejected as exc:
            self.claims.labels(exc.code).inc()
            log.debug("claim %s@%d refused: %s", sid, fire_time, exc.message)
            if exc.code in _FENCED:
                self._deactivate(f"claim refused: {exc.message}")
            return False
        except FlexCoreError as exc:
            # Outcome unknown: the claim may have committed. The state says.
            self.claims.labels("unknown").inc()
            log.warning("claim %s@%d: %s", sid, fire_time, exc.message)
            with self.raft.lock:
                fires = self.machine.component("schedules").fires(sid) or []
            return any(f["fire_time"] == fire_time and f["manual"] == manual
                       and f["term"] == term and f["node"] == self._me for f in fires)
        self.claims.labels("ok").inc()
        return True

    async def _run(self, s: dict[str, Any], fire: Fire, lag: int | None,
                   key: tuple[str, int, bool] | None) -> None:
        try:
            started = time.monotonic()
            error: str | None = None
            try:
                limit = s["max_run_ms"] / 1000 if s["max_run_ms"] else None
                await asyncio.wait_for(self._execute(s["action"], fire), limit)
                status = "ok"
            except TimeoutError:
                status, error = "timeout", f"action ran longer than {s['max_run_ms']} ms"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                status, error = "error", f"{type(exc).__name__}: {exc}"[:1000]
                log.warning("schedule %s fire %s failed: %s", fire.schedule_id,
                            iso(fire.fire_time_ms), error)
            duration = int((time.monotonic() - started) * 1000)
            await self._report(fire, status, duration, lag, error)
        finally:
            if key is not None:
                self._inflight.discard(key)

    async def _report(self, fire: Fire, status: str, duration: int | None, lag: int | None,
                      error: str | None) -> None:
        body: dict[str, Any] = {"id": fire.schedule_id, "fire_time": fire.fire_time_ms,
                                "manual": fire.manual, "status": status}
        if duration is not None:
            body["duration_ms"] = duration
        if lag is not None:
            body["lag_ms"] = lag
        if error is not None:
            body["error"] = error
        try:
            await self.services.propose("schedule.fire_done", body)
        except FlexCoreError as exc:
            log.warning("could not record the outcome of %s: %s", fire.key, exc.message)

    async def _complete(self, s: dict[str, Any], fire_row: dict[str, Any], term: int) -> None:
        """Finish a fire claimed without an outcome (its owner died or stopped)."""
        key = (s["id"], fire_row["fire_time"], fire_row["manual"])
        try:
            if not self._owns(term):
                return
            fire = Fire(s["id"], fire_row["fire_time"], fire_row["manual"], fire_row["node"],
                        fire_row["term"])
            if s["action"]["type"] in ("event", "enqueue"):
                log.info("completing %s (claimed by %s in term %d)", fire.key, fire.node,
                         fire.term)
                await self._run(s, fire, fire_row["lag_ms"], None)
            else:
                await self._report(fire, "unknown", None, None,
                                   f"the owner ({fire.node}, term {fire.term}) stopped while "
                                   f"the action ran; not re-run (it may not be idempotent)")
        finally:
            self._inflight.discard(key)

    # -- actions -------------------------------------------------------------------------

    async def _execute(self, action: dict[str, Any], fire: Fire) -> None:
        kind = action["type"]
        if kind == "event":
            payload = dict(action.get("payload") or {})
            payload.update(schedule_id=fire.schedule_id, fire_time=iso(fire.fire_time_ms),
                           fire_time_ms=fire.fire_time_ms)
            if fire.manual:
                payload["manual"] = True
            await self.services.propose("event.publish", {"events": [
                {"type": action["event_type"], "id": fire.key, "key": fire.schedule_id,
                 "payload": payload}]})
        elif kind == "enqueue":
            await self.services.propose("queue.enqueue", {
                "queue": action["queue"],
                "messages": [{"body": action["body"], "dedup_id": fire.key}]})
        elif kind == "handler":
            fn = self._handlers.get(action["name"])
            if fn is None:
                raise LookupError(f"no timer handler {action['name']!r} is registered on "
                                  f"node {self._me}")
            if inspect.iscoroutinefunction(fn):
                await fn(fire)
            else:   # a plain function may block: keep it off the event loop
                result = await asyncio.to_thread(fn, fire)
                if inspect.isawaitable(result):
                    await result
        else:
            hook = self._hooks.get(kind)
            if hook is None:
                raise LookupError(f"no executor for {kind} actions on node {self._me}")
            await hook(action, fire)


# -- the service the API and library call ------------------------------------------------------

def _seconds(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000


class ScheduleService:
    """``/v1/schedules`` on a real node (implements `flexcore.api.schedules.ScheduleBackend`)."""

    def __init__(self, services: NodeServices, runner: TimerRunner,
                 *, clock: Callable[[], float] = time.time) -> None:
        self.services = services
        self.raft = services.raft
        self.machine = services.machine
        self.runner = runner
        self._clock = clock

    def _component(self) -> Any:
        return self.machine.component("schedules")

    async def _fresh(self, consistent: bool, index: int | None = None) -> None:
        if consistent:
            await self.services.barrier()
        if index is not None:
            await self.raft.wait_applied(index, self.raft.config.propose_timeout)

    def _render(self, s: dict[str, Any], owner: dict[str, Any] | None) -> dict[str, Any]:
        spec = trigger_from_state(s["trigger"])
        nxt = None
        if s["enabled"]:
            nxt = next_fire_after(spec, s["anchor_ms"],
                                  max(int(self._clock() * 1000), s["last_fire_time"]))
        return {
            "id": s["id"], "trigger": trigger_to_api(spec), "action": s["action"],
            "misfire": s["misfire"], "misfire_grace_s": s["misfire_grace_ms"] / 1000,
            "max_run_s": _seconds(s["max_run_ms"] or None), "enabled": s["enabled"],
            "version": s["version"], "created_at": iso(s["created_ts"]),
            "updated_at": iso(s["updated_ts"]),
            "last_fire_time": iso(s["last_fire_time"]) if s["last_fire_time"] else None,
            "next_fire_time": iso(nxt) if nxt is not None else None,
            "pending_manual": len(s["pending_manual"]), "owner": owner,
        }

    async def put(self, schedule_id: str, spec: ScheduleInput) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": schedule_id, "trigger": trigger_to_state(spec.trigger),
            "action": spec.action, "misfire": spec.misfire,
            "misfire_grace_ms": round(spec.misfire_grace_s * 1000), "enabled": spec.enabled}
        if spec.max_run_s is not None:
            body["max_run_ms"] = max(1, round(spec.max_run_s * 1000))
        value, index = await self.services.propose("schedule.put", body)
        out = await self.get(schedule_id, index=index)
        return dict(out, created=value["created"], index=index)

    async def get(self, schedule_id: str, *, consistent: bool = False,
                  index: int | None = None) -> dict[str, Any]:
        await self._fresh(consistent, index)
        with self.raft.lock:
            comp = self._component()
            s, owner = comp.get(schedule_id), comp.owner()
        if s is None:
            raise NotFound(f"no schedule {schedule_id!r}")
        return self._render(s, owner)

    async def list(self, *, consistent: bool = False) -> dict[str, Any]:
        await self._fresh(consistent)
        with self.raft.lock:
            comp = self._component()
            rows, owner, owners = comp.list_all(), comp.owner(), comp.owner_history()
        return {"schedules": [self._render(s, owner) for s in rows], "owner": owner,
                "owner_history": owners}

    async def delete(self, schedule_id: str) -> dict[str, Any]:
        value, index = await self.services.propose("schedule.delete", {"id": schedule_id})
        if not value["deleted"]:
            raise NotFound(f"no schedule {schedule_id!r}")
        return {"id": schedule_id, "deleted": True, "index": index}

    async def set_enabled(self, schedule_id: str, enabled: bool) -> dict[str, Any]:
        value, index = await self.services.propose(
            "schedule.set_enabled", {"id": schedule_id, "enabled": enabled})
        return {"id": schedule_id, "enabled": value["enabled"], "index": index}

    async def trigger(self, schedule_id: str) -> dict[str, Any]:
        """Queue a manual fire; the owner claims and runs it (202: not run yet)."""
        value, index = await self.services.propose("schedule.trigger", {"id": schedule_id})
        return {"id": schedule_id, "fire_time": iso(value["fire_time"]),
                "fire_time_ms": value["fire_time"], "manual": True, "status": "pending",
                "index": index}

    async def fires(self, schedule_id: str, *, consistent: bool = False) -> dict[str, Any]:
        await self._fresh(consistent)
        with self.raft.lock:
            rows = self._component().fires(schedule_id)
        if rows is None:
            raise NotFound(f"no schedule {schedule_id!r}")
        return {"id": schedule_id, "fires": [
            {"fire_time": iso(f["fire_time"]), "fire_time_ms": f["fire_time"],
             "node": f["node"], "term": f["term"], "status": f["status"],
             "manual": f["manual"], "claimed_at": iso(f["claimed_ts"]),
             "claimed_ts": f["claimed_ts"], "lag_ms": f["lag_ms"],
             "duration_ms": f["duration_ms"], "error": f["error"]} for f in rows]}


__all__ = ["ActionHook", "Fire", "ScheduleService", "TimerHandler", "TimerRunner"]
