"""`FlexCore`: the library facade. Embed a node in your own asyncio program.

    app = FlexCore(Settings(self_addr="10.0.0.1:7100", peers=(...), api="10.0.0.1:8100"))

    async with app:                    # starts Raft and the admin API in-process
        await app.publish("order.created", {"id": 42})

``app.run()`` does the same until SIGINT/SIGTERM; ``python -m flexcore.node`` is exactly
``FlexCore(settings_from_flags).run()``. Feature modules (queues, timers, handlers)
register what they need on this object before it starts; `FlexNode` (the composition
root in `flexcore.node`) builds the running parts.

Event handlers (``@app.on_event``) run in consumer groups (`flexcore.groups`): a group's
handlers see each event at least once across the cluster, per key in order, with
retries and dead letters; ``group=None`` runs a handler on every node. Handlers get
their parameters injected (`flexcore.di`): ``event``, ``app``, ``attempt``, ``queues``,
``clock`` by name, or any component by type annotation — built-in ones, those passed
as ``FlexCore(settings, components={Type: instance})`` overrides, and the caller's own
registered with ``app.provide(Type, instance)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeVar

from .api.protocol import EventIn, EventPage, EventQuery, PublishOutcome
from .api.schedules import ScheduleInput, parse_schedule, validate_schedule_id
from .config import Settings
from .di import Clock, plan
from .errors import BadRequest, ConsensusError, FlexCoreError
from .events import Retry, Subscription, Transform, Where
from .groups import GroupConsumer, GroupService
from .node import FlexNode
from .queues import DEFAULT_HANDLER_TIMEOUT_S, QUEUE_NAME, Handler, Queues, Worker
from .statemachine.groups import GROUP_NAME
from .timers import ScheduleService, TimerHandler

log = logging.getLogger("flexcore")

StartHook = Callable[["FlexCore"], Awaitable[None]]
EventHandler = Callable[..., Any]
T = TypeVar("T")
H = TypeVar("H", bound=EventHandler)


class FlexCore:
    """One FlexCore node inside this process, with the library API on top."""

    def __init__(self, settings: Settings | None = None, *,
                 components: Mapping[type[Any], object] | None = None,
                 **overrides: Any) -> None:
        """``overrides`` are `Settings` fields; ``components`` replaces built-in
        components by type (`flexcore.di`: ``{Clock: FakeClock()}``)."""
        if settings is None:
            settings = Settings(**overrides)
        elif overrides:
            settings = replace(settings, **overrides)
        self.settings = settings.validate()
        self._overrides: dict[type[Any], object] = dict(components or {})
        self._provided: dict[type[Any], object] = {}
        self._node: FlexNode | None = None
        self._on_start: list[StartHook] = []
        self._on_stop: list[StartHook] = []
        # Queues: the client works once the node runs; workers start and stop with it.
        self.queues = Queues(lambda: self.node.queues)
        self.workers: list[Worker] = []
        self.on_start(self._start_workers)
        self.on_stop(self._stop_workers)
        # Timers: handlers registered with @app.timer; their schedules are upserted once
        # the node runs (in the background: committing needs a leader).
        self._timers: list[tuple[str, ScheduleInput, TimerHandler]] = []
        self._timer_task: asyncio.Task[None] | None = None
        self.on_start(self._start_timers)
        self.on_stop(self._stop_timers)
        # Event handlers: consumer groups and broadcast subscriptions.
        self.subscriptions: list[Subscription] = []
        self.consumer: GroupConsumer | None = None
        self.on_start(self._start_consumer)
        self.on_stop(self._stop_consumer)

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def node(self) -> FlexNode:
        if self._node is None:
            raise RuntimeError("FlexCore is not started: use 'async with app' or app.run()")
        return self._node

    @property
    def started(self) -> bool:
        return self._node is not None

    def on_start(self, hook: StartHook) -> StartHook:
        """Run ``await hook(app)`` after the node started (decorator)."""
        self._on_start.append(hook)
        return hook

    def on_stop(self, hook: StartHook) -> StartHook:
        """Run ``await hook(app)`` before the node stops (decorator)."""
        self._on_stop.append(hook)
        return hook

    async def start(self) -> None:
        if self._node is not None:
            return
        node = FlexNode(self.settings, components=self._overrides)
        node.components.set(FlexCore, self)
        for kind, value in self._provided.items():
            node.components.set(kind, value)
        if self.subscriptions:   # checks every handler's parameters before starting
            self.consumer = GroupConsumer(
                node.groups, node.feed, node.components, self.settings.self_addr,
                self.subscriptions, session_s=self.settings.group_session,
                named={"app": self, "queues": self.queues,
                       "clock": node.components.get(Clock)})
        for schedule_id, _spec, fn in self._timers:
            node.timers.register_handler(schedule_id, fn)
        await node.start()
        self._node = node
        for hook in self._on_start:
            await hook(self)

    async def stop(self) -> None:
        node = self._node
        if node is None:
            return
        for hook in reversed(self._on_stop):
            try:
                await hook(self)
            except Exception:
                log.exception("stop hook %r failed", hook)
        await node.stop()
        self._node = None

    async def __aenter__(self) -> FlexCore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve(self) -> int:
        """Start, wait for SIGINT/SIGTERM (or a fatal error), stop. Returns an exit code."""
        loop = asyncio.get_running_loop()
        try:
            await self.start()
        except OSError as exc:
            log.error("%s", exc)
            return 1
        node = self.node
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, node.request_stop)
        try:
            await node.wait_stopped()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("shutting down")
        fatal = node.fatal_error
        await self.stop()
        if fatal:
            log.error("stopped on a fatal error: %s", fatal)
            return 1
        return 0

    def run(self) -> int:
        """Blocking: serve until SIGINT/SIGTERM; returns the process exit code."""
        return asyncio.run(self.serve())

    # -- components ---------------------------------------------------------------------

    def provide(self, kind: type[T], value: T) -> T:
        """Register ``value`` as the ``kind`` component: handlers that annotate a
        parameter with ``kind`` receive it."""
        if not isinstance(value, kind):
            raise TypeError(f"{type(value).__name__} is not a {kind.__name__}")
        self._provided[kind] = value
        if self._node is not None:
            self._node.components.set(kind, value)
        return value

    # -- queues ------------------------------------------------------------------------

    def worker(self, queue: str, *, concurrency: int = 1, visibility_s: float | None = None,
               max_attempts: int | None = None, backoff_s: float = 1.0,
               max_backoff_s: float = 300.0,
               extend_leases: bool = True,
               timeout_s: float | None = DEFAULT_HANDLER_TIMEOUT_S,
               ) -> Callable[[Handler], Handler]:
        """Decorator: run ``async def handler(message)`` on messages of ``queue`` with
        ``concurrency`` loops on this node, from start to stop. Success acks the
        message; an exception nacks it with exponential backoff; the lease is extended
        while the handler runs, for at most ``timeout_s`` (then the handler is cancelled
        and the message nacked; see `Worker`). Register before the app starts."""
        if self.started:
            raise RuntimeError("register workers before the app starts")
        if not QUEUE_NAME.fullmatch(queue):
            raise ValueError(f"invalid queue name {queue!r}")
        if not 1 <= concurrency <= 1000:
            raise ValueError("concurrency must be from 1 to 1000")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError("timeout_s must be a positive number of seconds or None")

        def register(handler: Handler) -> Handler:
            self.workers.append(Worker(queue, handler, concurrency=concurrency,
                                       visibility_s=visibility_s, max_attempts=max_attempts,
                                       backoff_s=backoff_s, max_backoff_s=max_backoff_s,
                                       consumer=f"{self.settings.self_addr}/{queue}",
                                       extend_leases=extend_leases, timeout_s=timeout_s))
            return handler
        return register

    async def _start_workers(self, app: FlexCore) -> None:
        for worker in self.workers:
            await worker.start(self.queues)

    async def _stop_workers(self, app: FlexCore) -> None:
        for worker in self.workers:
            await worker.stop()

    # -- timers ------------------------------------------------------------------------

    @property
    def schedules(self) -> ScheduleService:
        """Schedules of the running node: ``put``, ``get``, ``list``, ``trigger``,
        ``fires``, ... (the same service as ``/v1/schedules``)."""
        return self.node.schedules

    def timer(self, trigger: str | Mapping[str, Any], *, id: str | None = None,
              timezone: str | None = None, misfire: str = "run_once",
              misfire_grace_s: float | None = None, max_run_s: float | None = None,
              enabled: bool = True) -> Callable[[TimerHandler], TimerHandler]:
        """Decorator: run ``handler(fire)`` (sync or async) as a cluster-wide timer
        singleton. ``trigger`` is a cron string (5 fields, or 6 with seconds first;
        ``timezone`` applies) or a trigger object (``{"interval_s": 10}``,
        ``{"cron": ..., "timezone": ...}``, ``{"at": ...}``). The schedule (``id``,
        default the function's name) is created or updated when the app starts, and
        fires on whichever node leads; every node of the cluster should register the
        same handlers. Register before the app starts."""
        if self.started:
            raise RuntimeError("register timers before the app starts")
        raw = dict(trigger) if isinstance(trigger, Mapping) else {"cron": trigger}
        if timezone is not None:
            raw["timezone"] = timezone
        body: dict[str, Any] = {"trigger": raw, "action": {"type": "handler", "name": "-"},
                                "misfire": misfire, "enabled": enabled}
        if misfire_grace_s is not None:
            body["misfire_grace_s"] = misfire_grace_s
        if max_run_s is not None:
            body["max_run_s"] = max_run_s
        try:
            spec = parse_schedule(body)
        except BadRequest as exc:
            raise ValueError(exc.message) from None

        def register(handler: TimerHandler) -> TimerHandler:
            schedule_id = validate_schedule_id(id or str(getattr(handler, "__name__", "")))
            if any(t[0] == schedule_id for t in self._timers):
                raise ValueError(f"a timer with id {schedule_id!r} is already registered")
            action = {"type": "handler", "name": schedule_id}
            self._timers.append((schedule_id, replace(spec, action=action), handler))
            return handler
        return register

    async def _start_timers(self, app: FlexCore) -> None:
        if self._timers:
            self._timer_task = asyncio.create_task(self._upsert_timers(),
                                                   name="flexcore-timers-upsert")

    async def _stop_timers(self, app: FlexCore) -> None:
        task, self._timer_task = self._timer_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _upsert_timers(self) -> None:
        """Create or update each @app.timer schedule; retry until a leader commits it."""
        pending = list(self._timers)
        delay = 0.2
        while pending:
            schedule_id, spec, _fn = pending[0]
            try:
                await self.schedules.put(schedule_id, spec)
                pending.pop(0)
                continue
            except ConsensusError as exc:
                log.debug("timer %s not committed yet: %s", schedule_id, exc.message)
            except FlexCoreError as exc:
                log.error("timer %s cannot be scheduled: %s", schedule_id, exc.message)
                pending.pop(0)
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def timers_ready(self, timeout: float = 30.0) -> None:
        """Wait until every @app.timer schedule is committed (TimeoutError after)."""
        task = self._timer_task
        if task is not None:
            await asyncio.wait_for(asyncio.shield(task), timeout)

    # -- events ------------------------------------------------------------------------

    async def publish(self, type: str, payload: Any = None, *, key: str | None = None,
                      id: str | None = None) -> PublishOutcome:
        """Append one event to the replicated log (idempotent when ``id`` is given)."""
        return await self.node.services.publish([EventIn(type, payload, key, id)])

    async def publish_many(self, events: list[EventIn]) -> PublishOutcome:
        return await self.node.services.publish(events)

    async def read_events(self, after: int = 0, *, type: str | None = None, limit: int = 100,
                          consistent: bool = False) -> EventPage:
        return await self.node.services.read_events(
            EventQuery(after=after, type=type, limit=limit, consistent=consistent))

    # -- event handlers ------------------------------------------------------------------

    @property
    def groups(self) -> GroupService:
        """Consumer groups of the running node: ``list_groups``, ``info``, ``dead``,
        ``redrive`` (the same service as ``/v1/groups``)."""
        return self.node.groups

    def on_event(self, type: str = "*", *, group: str | None = None,
                 where: Where | None = None, since: datetime | float | None = None,
                 until: datetime | float | None = None,
                 transform: Transform | Sequence[Transform] = (),
                 retry: Retry | None = None, name: str | None = None,
                 ) -> Callable[[H], H]:
        """Decorator: call the handler (async or plain; plain ones run in a worker
        thread) for every event whose type matches the glob ``type``.

        ``group``: a consumer group — across the cluster each event is handled by one
        node, at least once, in order per key; the group's offsets, assignment and dead
        letters are replicated state. ``None``: a broadcast subscription — every node
        handles every event. ``where``: a JMESPath expression over the event
        (``"payload.total > `100`"``) or a callable ``(Event) -> bool``; ``since`` /
        ``until``: a time window over the event's ``ts`` (datetime or Unix seconds);
        ``transform``: a JMESPath projection or callable, or a list of them, applied
        in order before the handler (see `flexcore.events`). ``retry``: attempts and
        backoff before the event goes to the group's dead letters (default
        ``Retry()``: 3 attempts). ``name``: the handler's name (default: the
        function's), unique per group. Register before the app starts; every node of a
        group should register the same handlers."""
        if self.started:
            raise RuntimeError("register event handlers before the app starts")
        if group is not None and not GROUP_NAME.fullmatch(group):
            raise ValueError(f"invalid group name {group!r}: 1-128 characters of "
                             "A-Z a-z 0-9 . _ : @ - starting with a letter or digit")
        steps = [transform] if isinstance(transform, str) or callable(transform) \
            else list(transform)

        def register(handler: H) -> H:
            sub_name = name or str(getattr(handler, "__name__", "handler"))
            if any(s.name == sub_name and s.group == group for s in self.subscriptions):
                raise ValueError(f"a handler named {sub_name!r} is already registered "
                                 f"for group {group!r}")
            self.subscriptions.append(Subscription(
                sub_name, type, group, plan(handler), retry or Retry(), where, since,
                until, steps))
            return handler
        return register

    async def _start_consumer(self, app: FlexCore) -> None:
        if self.consumer is not None:
            await self.consumer.start()

    async def _stop_consumer(self, app: FlexCore) -> None:
        consumer, self.consumer = self.consumer, None
        if consumer is not None:
            await consumer.stop(leave=True)
