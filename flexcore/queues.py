"""Durable queues on a node: `QueueService` (API and library) and the library's
`Queues` client, `Message` and workers.

`QueueService` turns calls into ``queue.*`` commands proposed through Raft (seconds
become milliseconds here; the proposer stamps time) and answers reads from this
node's applied state under the raft lock. A lease is a write: it goes through Raft.

Long-poll (``lease(wait_s=...)``): when the applied state has nothing leasable, the
caller waits on a future, not a poll loop. The apply path wakes it (a Raft change
listener checks, for each queue that has waiters, whether messages are ready or
something falls due sooner than the waiter planned), and a timer wakes it at the
earliest ``deliver_at`` / lease expiry visible in the applied state, because those
become leasable by time, not by an apply. `close()` wakes every waiter at once so a
long-poll never holds the node's shutdown.

The library side: `Queues` (``app.queues``) enqueues, leases, acks and nacks, and
``consume()`` yields `Message` objects; `Worker` runs a handler with N concurrent
loops (``@app.worker``): ack on success, nack with exponential backoff on an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import CommandRejected, ConsensusError, FlexCoreError, NotFound
from .service import NodeServices
from .statemachine.queues import QUEUE_NAME, QueueStore

log = logging.getLogger("flexcore.queues")

__all__ = ["QUEUE_NAME", "Handler", "Message", "QueueService", "Queues", "Worker"]

MAX_WAIT_S = 20.0


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


@dataclass(eq=False)
class _Waiter:
    queue: str
    future: asyncio.Future[None]
    wake_at_ms: float            # the time-driven wake-up it planned (inf: none)


class QueueService:
    """Queue commands and reads for one node."""

    def __init__(self, services: NodeServices, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.services = services
        self.raft = services.raft
        self._clock = clock
        self._waiters: dict[str, list[_Waiter]] = {}
        self._closed = False
        self.raft.add_change_listener(self._on_change)
        services.registry.register(_QueueCollector(self))

    @property
    def _store(self) -> QueueStore:
        store = self.services.machine.component("queues")
        assert isinstance(store, QueueStore)
        return store

    # -- writes --------------------------------------------------------------------------

    async def enqueue(self, queue: str, body: Any, *, priority: int | None = None,
                      delay_s: float | None = None, deliver_at_ms: int | None = None,
                      dedup_id: str | None = None) -> dict[str, Any]:
        """Enqueue one message -> ``{id, duplicate, index}``."""
        item: dict[str, Any] = {"body": body}
        if priority is not None:
            item["priority"] = priority
        if delay_s is not None:
            item["delay_ms"] = _ms(delay_s)
        if deliver_at_ms is not None:
            item["deliver_at"] = deliver_at_ms
        if dedup_id is not None:
            item["dedup_id"] = dedup_id
        value, index = await self.services.propose(
            "queue.enqueue", {"queue": queue, "messages": [item]})
        return {"id": value["ids"][0], "duplicate": value["duplicates"][0], "index": index}

    async def lease(self, queue: str, consumer: str, *, limit: int = 1,
                    visibility_s: float | None = None,
                    wait_s: float = 0.0) -> list[dict[str, Any]]:
        """Lease up to ``limit`` messages; with ``wait_s`` > 0, wait up to that long for
        one (returns ``[]`` on timeout or when the node stops)."""
        body: dict[str, Any] = {"queue": queue, "consumer": consumer, "max": limit}
        if visibility_s is not None:
            body["visibility_ms"] = _ms(visibility_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(wait_s, 0.0), MAX_WAIT_S)
        while not self._closed:
            with self.raft.lock:
                ready, next_due = self._store.wake_hint(queue)
            now_ms = self._clock() * 1000
            if ready or wait_s <= 0 or (next_due is not None and next_due <= now_ms):
                value, _ = await self.services.propose("queue.lease", body)
                messages: list[dict[str, Any]] = value["messages"]
                if messages or loop.time() >= deadline:
                    return messages
                continue   # others were faster: the applied state now says so; wait
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            wake_at = float("inf") if next_due is None else float(next_due)
            timeout = remaining if next_due is None else min(
                remaining, max((next_due - now_ms) / 1000, 0.0) + 0.001)
            await self._wait(queue, timeout, wake_at)
        return []

    async def ack(self, queue: str, lease_id: str) -> dict[str, Any]:
        value, _ = await self.services.propose("queue.ack",
                                               {"queue": queue, "lease_id": lease_id})
        return value

    async def nack(self, queue: str, lease_id: str, *, delay_s: float | None = None,
                   error: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"queue": queue, "lease_id": lease_id}
        if delay_s:
            body["delay_ms"] = _ms(delay_s)
        if error is not None:
            body["error"] = error
        value, _ = await self.services.propose("queue.nack", body)
        return value

    async def extend(self, queue: str, lease_id: str, *,
                     visibility_s: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"queue": queue, "lease_id": lease_id}
        if visibility_s is not None:
            body["visibility_ms"] = _ms(visibility_s)
        value, _ = await self.services.propose("queue.extend", body)
        return value

    async def configure(self, queue: str, *, visibility_s: float | None = None,
                        max_deliveries: int | None = None,
                        dedup_window_s: float | None = None,
                        max_dead: int | None = None) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if max_dead is not None:
            options["max_dead"] = max_dead
        if visibility_s is not None:
            options["visibility_ms"] = _ms(visibility_s)
        if max_deliveries is not None:
            options["max_deliveries"] = max_deliveries
        if dedup_window_s is not None:
            options["dedup_window_ms"] = _ms(dedup_window_s)
        await self.services.propose("queue.configure", {"queue": queue, "options": options})
        info = self.info(queue)
        assert info is not None
        return info

    async def purge(self, queue: str, *, dead: bool = False) -> dict[str, Any]:
        value, _ = await self.services.propose("queue.purge", {"queue": queue, "dead": dead})
        return value

    async def redrive(self, queue: str, *, limit: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"queue": queue}
        if limit is not None:
            body["max"] = limit
        value, _ = await self.services.propose("queue.redrive", body)
        return value

    # -- reads (this node's applied state) ------------------------------------------------

    def list_queues(self) -> dict[str, dict[str, int]]:
        with self.raft.lock:
            return self._store.list_stats()

    def info(self, queue: str) -> dict[str, Any] | None:
        with self.raft.lock:
            info = self._store.info(queue)
        if info is not None:
            options = info.pop("options")
            info["options"] = {"visibility_s": options["visibility_ms"] / 1000,
                               "max_deliveries": options["max_deliveries"],
                               "dedup_window_s": options["dedup_window_ms"] / 1000,
                               "max_dead": options["max_dead"]}
        return info

    def dead(self, queue: str, limit: int = 100) -> list[dict[str, Any]]:
        with self.raft.lock:
            dead = self._store.dead(queue, limit)
        if dead is None:
            raise NotFound(f"queue {queue} does not exist")
        return dead

    # -- long-poll plumbing -----------------------------------------------------------------

    async def _wait(self, queue: str, timeout: float, wake_at_ms: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(queue, fut, wake_at_ms)
        self._waiters.setdefault(queue, []).append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, timeout)
        finally:
            waiters = self._waiters.get(queue)
            if waiters is not None:
                with contextlib.suppress(ValueError):
                    waiters.remove(waiter)
                if not waiters:
                    del self._waiters[queue]

    def _on_change(self) -> None:
        """After entries apply (on the loop): wake the waiters that have reason to look.
        Cost: one heap peek per queue that has waiters, plus O(waiters)."""
        if not self._waiters:
            return
        with self.raft.lock:
            hints = {q: self._store.wake_hint(q) for q in self._waiters}
        for queue, (ready, next_due) in hints.items():
            waiters = self._waiters.get(queue, [])
            woken = 0
            for waiter in waiters:
                due_sooner = next_due is not None and next_due < waiter.wake_at_ms
                if (woken < ready or due_sooner) and not waiter.future.done():
                    waiter.future.set_result(None)
                    woken += 1

    @property
    def closed(self) -> bool:
        return self._closed

    def waiting(self, queue: str) -> int:
        """Long-polling leases parked on ``queue`` at this node right now."""
        return len(self._waiters.get(queue, ()))

    def close(self) -> None:
        """Stop long-polls: every waiting lease returns ``[]`` now, later ones at once."""
        self._closed = True
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.future.done():
                    waiter.future.set_result(None)


class _QueueCollector(Collector):
    """Per-queue gauges read from this node's applied state at scrape time:
    ``flexcore_queue_messages{queue, state}`` and the lifetime totals as
    ``flexcore_queue_operations_total{queue, op}`` (enqueued, acked, expired, ...)."""

    def __init__(self, service: QueueService) -> None:
        self._service = service

    def collect(self) -> Iterable[Metric]:
        messages = GaugeMetricFamily("flexcore_queue_messages",
                                     "Messages in each queue by state", labels=["queue", "state"])
        ops = CounterMetricFamily("flexcore_queue_operations",
                                  "Lifetime queue operations (replicated: the same on every node)",
                                  labels=["queue", "op"])
        for name in self._service.list_queues():
            info = self._service.info(name)
            if info is None:
                continue
            for state in ("ready", "leased", "delayed", "dead"):
                messages.add_metric([info["name"], state], info[state])
            for op, value in info["totals"].items():
                ops.add_metric([info["name"], op], value)
        yield messages
        yield ops


# --- library client --------------------------------------------------------------------


@dataclass(eq=False)
class Message:
    """One leased message. Call `ack` when done or `nack` to give it back."""

    queue: str
    id: str
    body: Any
    lease_id: str
    attempt: int
    priority: int
    expires_at_ms: int
    _client: Queues = field(repr=False)

    async def ack(self) -> None:
        """Remove the message. Raises `CommandRejected` (``lease_expired``) when the
        lease is no longer current: the message was or will be delivered again — or,
        when its message starts "lease already acked", an earlier ack of it committed
        (a retry after an unconfirmed ack)."""
        await self._client.ack(self.queue, self.lease_id)

    async def nack(self, *, delay_s: float = 0.0, error: str | None = None) -> None:
        """Give the message back: ready now, or after ``delay_s``."""
        await self._client.nack(self.queue, self.lease_id, delay_s=delay_s, error=error)

    async def extend(self, visibility_s: float | None = None) -> None:
        """Keep the lease for ``visibility_s`` (default: the queue's) from now; updates
        `expires_at_ms`. Raises `CommandRejected` (``lease_expired``) when it already
        ended."""
        out = await self._client.extend(self.queue, self.lease_id, visibility_s=visibility_s)
        self.expires_at_ms = int(out["expires_at"])


class Queues:
    """``app.queues``: the queue API of the embedded node (usable once it started)."""

    def __init__(self, service: Callable[[], QueueService]) -> None:
        self._service = service

    async def enqueue(self, queue: str, body: Any, *, priority: int | None = None,
                      delay_s: float | None = None, dedup_id: str | None = None) -> str:
        """Enqueue one message; returns its id (the original id for a dedup repeat)."""
        out = await self._service().enqueue(queue, body, priority=priority, delay_s=delay_s,
                                            dedup_id=dedup_id)
        return str(out["id"])

    async def lease(self, queue: str, *, consumer: str = "library", limit: int = 1,
                    visibility_s: float | None = None,
                    wait_s: float = 0.0) -> list[Message]:
        raw = await self._service().lease(queue, consumer, limit=limit,
                                          visibility_s=visibility_s, wait_s=wait_s)
        return [Message(queue, m["id"], m["body"], m["lease_id"], m["attempt"],
                        m["priority"], m["expires_at"], self) for m in raw]

    async def ack(self, queue: str, lease_id: str) -> None:
        await self._service().ack(queue, lease_id)

    async def nack(self, queue: str, lease_id: str, *, delay_s: float = 0.0,
                   error: str | None = None) -> None:
        await self._service().nack(queue, lease_id, delay_s=delay_s, error=error)

    async def extend(self, queue: str, lease_id: str, *,
                     visibility_s: float | None = None) -> dict[str, Any]:
        return await self._service().extend(queue, lease_id, visibility_s=visibility_s)

    async def configure(self, queue: str, *, visibility_s: float | None = None,
                        max_deliveries: int | None = None,
                        dedup_window_s: float | None = None,
                        max_dead: int | None = None) -> dict[str, Any]:
        return await self._service().configure(queue, visibility_s=visibility_s,
                                               max_deliveries=max_deliveries,
                                               dedup_window_s=dedup_window_s,
                                               max_dead=max_dead)

    def stats(self, queue: str) -> dict[str, Any] | None:
        return self._service().info(queue)

    async def consume(self, queue: str, *, consumer: str = "library",
                      visibility_s: float | None = None, batch: int = 1,
                      wait_s: float = MAX_WAIT_S) -> AsyncGenerator[Message, None]:
        """Yield messages as they become available, forever (until the node stops).
        The caller acks or nacks each one; an unacked message comes back after its
        visibility timeout. Transient cluster errors (no quorum during a failover)
        are retried after a short pause."""
        while True:
            try:
                service = self._service()
            except RuntimeError:
                return   # the node stopped
            try:
                messages = await self.lease(queue, consumer=consumer, limit=batch,
                                            visibility_s=visibility_s, wait_s=wait_s)
            except ConsensusError as exc:
                if service.closed:
                    return
                log.info("lease on %s failed (%s); retrying", queue, exc.message)
                await asyncio.sleep(0.5)
                continue
            if not messages and service.closed:
                return
            for message in messages:
                yield message


Handler = Callable[[Message], Awaitable[None]]


DEFAULT_HANDLER_TIMEOUT_S = 1800.0


@dataclass
class Worker:
    """``@app.worker(queue, concurrency=N)``: N loops on this node, each leasing one
    message, awaiting ``handler(message)``, then acking it; on an exception the message
    is nacked with backoff ``min(backoff_s * 2 ** (attempt - 1), max_backoff_s)`` and
    the exception text as its error. With ``max_attempts`` the queue's
    ``max_deliveries`` is set to it when the worker starts. While a handler runs, its
    lease is extended every third of the visibility timeout (``extend_leases``), so a
    handler slower than the timeout is not redelivered to another consumer meanwhile;
    the extensions stop when the handler returns, raises, or this node stops.
    ``timeout_s`` (default 1,800 s, like RabbitMQ's ``consumer_timeout``; None = no
    limit) bounds that: a handler still running then is cancelled and the message
    nacked with a "timed out" error, so a hung handler cannot hold a message forever."""

    queue: str
    handler: Handler
    concurrency: int = 1
    visibility_s: float | None = None
    max_attempts: int | None = None
    backoff_s: float = 1.0
    max_backoff_s: float = 300.0
    consumer: str = "worker"
    extend_leases: bool = True
    timeout_s: float | None = DEFAULT_HANDLER_TIMEOUT_S
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, repr=False)
    handled: int = 0
    failed: int = 0

    async def start(self, client: Queues) -> None:
        self._tasks = [asyncio.create_task(self._run(client, n),
                                           name=f"worker {self.queue} #{n}")
                       for n in range(self.concurrency)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _run(self, client: Queues, n: int) -> None:
        while n == 0 and self.max_attempts is not None:
            try:   # retried: at start-up the cluster may not have a leader yet
                await client.configure(self.queue, max_deliveries=self.max_attempts)
                break
            except ConsensusError as exc:
                log.info("worker %s: configure not committed (%s); retrying", self.queue,
                         exc.message)
                await asyncio.sleep(0.5)
        consumer = f"{self.consumer}-{n}"
        while True:
            stream = client.consume(self.queue, consumer=consumer,
                                    visibility_s=self.visibility_s)
            try:
                async with contextlib.aclosing(stream):
                    async for message in stream:
                        await self._handle(message)
                return   # the node stopped
            except FlexCoreError as exc:
                log.error("worker %s: %s; restarting in 1 s", self.queue, exc.message)
                await asyncio.sleep(1.0)

    async def _handle(self, message: Message) -> None:
        keeper = (asyncio.create_task(self._keep_lease(message),
                                      name=f"lease keeper {message.id}")
                  if self.extend_leases else None)
        limit = asyncio.timeout(self.timeout_s)
        try:
            try:
                async with limit:
                    await self.handler(message)
            finally:   # before the ack/nack: an extension must not race it
                await _stop_keeper(keeper)
        except asyncio.CancelledError:
            raise   # stopping: the lease expires and the message is redelivered
        except Exception as exc:
            self.failed += 1
            delay = min(self.backoff_s * 2 ** (message.attempt - 1), self.max_backoff_s)
            error = (f"TimeoutError: handler timed out after {self.timeout_s:g} s"
                     if limit.expired() else repr(exc)[:2000])
            log.warning("handler for %s failed on message %s (attempt %d): %s; "
                        "retry in %.1f s", self.queue, message.id, message.attempt,
                        error, delay)
            await _settle(message.nack(delay_s=delay, error=error), message)
        else:
            self.handled += 1
            await _settle(message.ack(), message)

    async def _keep_lease(self, message: Message) -> None:
        """Extend ``message``'s lease at a third of its visibility timeout, until
        cancelled or the lease is gone."""
        visibility = self.visibility_s or (message.expires_at_ms / 1000 - time.time())
        interval = max(visibility / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                await message.extend(self.visibility_s)
            except CommandRejected as exc:
                log.warning("message %s: lease lost while its handler runs (%s); it will "
                            "be delivered again", message.id, exc.message)
                return
            except FlexCoreError as exc:
                log.info("message %s: lease extension not confirmed (%s); retrying",
                         message.id, exc.message)
            except RuntimeError:
                return   # the node stopped: the lease runs out and the message comes back


async def _stop_keeper(keeper: asyncio.Task[None] | None) -> None:
    if keeper is not None and not keeper.done():
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper


async def _settle(call: Awaitable[None], message: Message) -> None:
    """Run an ack/nack; a stale lease or a cluster error is logged, not raised (the
    message comes back after its visibility timeout either way)."""
    try:
        await call
    except CommandRejected as exc:
        log.warning("message %s: %s", message.id, exc.message)
    except FlexCoreError as exc:
        log.warning("message %s: ack/nack not confirmed (%s); it may be redelivered",
                    message.id, exc.message)
