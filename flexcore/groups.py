"""Consumer groups on a node: `GroupService` (API and library) and `GroupConsumer`, the
runner that delivers events to ``@app.on_event`` handlers.

`GroupService` turns calls into ``group.*`` commands (see
`flexcore.statemachine.groups`) and renders the replicated state for the API, adding
each partition's lag (events of the partition above its committed offset).

`GroupConsumer` runs on every node, one loop per group this node has handlers for:

1. **Join and heartbeat.** It commits ``group.join`` (creating the group with this
   node's partition count, session timeout and start position on first use) and again
   every ``session / 3``. A node that stops heartbeating (killed, frozen, cut off) is
   dropped by the next command on the group after its session ran out, and its
   partitions move to live members.
2. **Own partitions.** Woken by every apply (`EventFeed`), it compares the partitions
   the state says this node owns with the tasks it runs: a task per owned partition
   (and epoch); a partition revoked by a rebalance is stopped after the event in hand,
   its progress committed, and released (``group.release``) to its new owner.
3. **Deliver.** A partition task reads the partition's events after its committed
   offset from the applied log (redriven dead letters first), and for each event calls
   every handler of the group whose filters match, in registration order, each with
   its own `Retry` (a handler that already succeeded for the event is not called again
   when another one is retried). Then it commits ``group.commit {offset, dead}`` —
   only after the handlers finished, one commit per batch of up to 100 events, so a
   crash redelivers at most the uncommitted batch (**at-least-once**). A partition is
   handled by one task on one node at a time and events of a key share a partition, so
   **per-key order** is the log's order. A commit refused as ``not_owner`` /
   ``stale_epoch`` (the partition moved while this node was paused) stops the task.
4. **Stop.** Graceful: tasks finish the event in hand, commit, and the node leaves the
   group (its partitions move at once). `abort` (tests: a crash) cancels without
   committing or leaving; the session timeout then hands the partitions over.

**Broadcast** subscriptions (``group=None``) run on every node. Each node keeps them in
a group of its own, ``{name}@{node}`` with one partition, so their offsets, retries,
dead letters and redrive work exactly like a group's, survive a restart of the node
(the offset is replicated state, not a local file: a node that lost its data dir still
resumes where it left off), and show in ``GET /v1/groups``. The price is one commit
through Raft per batch per node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .di import Components
from .errors import CommandRejected, ConsensusError, FlexCoreError, NotFound, ShuttingDown
from .events import Event, EventFeed, Subscription
from .service import NodeServices
from .statemachine.events import StoredEvent, backlog_counts
from .statemachine.groups import ConsumerGroups

log = logging.getLogger("flexcore.groups")

__all__ = ["GroupConsumer", "GroupService", "broadcast_group"]

BATCH = 100
STOP_GRACE_S = 5.0
_FENCED = frozenset({"not_owner", "stale_epoch"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._:@-]")


def broadcast_group(name: str, node: str) -> str:
    """The private group name of a broadcast subscription on ``node``."""
    return _UNSAFE.sub("_", f"{name}@{node}")[:128]


class _GroupCollector(Collector):
    """Per-group gauges from this node's applied state at scrape time: lag (events not
    yet committed by the group), members and dead letters."""

    def __init__(self, service: GroupService) -> None:
        self._service = service

    def collect(self) -> Iterable[Metric]:
        lag = GaugeMetricFamily("flexcore_group_lag", "Events above the group's committed "
                                "offsets", labels=["group"])
        members = GaugeMetricFamily("flexcore_group_members", "Members of the group",
                                    labels=["group"])
        dead = GaugeMetricFamily("flexcore_group_dead_letters", "Dead letters of the group",
                                 labels=["group"])
        for g in self._service.list_groups():
            lag.add_metric([g["name"]], g["lag"])
            members.add_metric([g["name"]], len(g["members"]))
            dead.add_metric([g["name"]], g["dead"])
        yield lag
        yield members
        yield dead


class GroupService:
    """Consumer-group commands and reads for one node."""

    def __init__(self, services: NodeServices) -> None:
        self.services = services
        self.raft = services.raft
        services.registry.register(_GroupCollector(self))

    @property
    def _store(self) -> ConsumerGroups:
        store = self.services.machine.component("groups")
        assert isinstance(store, ConsumerGroups)
        return store

    # -- writes ----------------------------------------------------------------------

    async def join(self, group: str, node: str, *, partitions: int, session_ms: int,
                   start_offset: int) -> dict[str, Any]:
        value, _ = await self.services.propose("group.join", {
            "group": group, "node": node, "partitions": partitions,
            "session_ms": session_ms, "start_offset": start_offset})
        return value

    async def leave(self, group: str, node: str) -> dict[str, Any]:
        value, _ = await self.services.propose("group.leave", {"group": group, "node": node})
        return value

    async def release(self, group: str, node: str, partition: int,
                      epoch: int) -> dict[str, Any]:
        value, _ = await self.services.propose("group.release", {
            "group": group, "node": node, "partition": partition, "epoch": epoch})
        return value

    async def commit(self, group: str, node: str, partition: int, epoch: int, *,
                     offset: int | None = None, dead: list[dict[str, Any]] | None = None,
                     redriven: list[int] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"group": group, "node": node, "partition": partition,
                                "epoch": epoch}
        if offset is not None:
            body["offset"] = offset
        if dead:
            body["dead"] = dead
        if redriven:
            body["redriven"] = redriven
        value, _ = await self.services.propose("group.commit", body)
        return value

    async def redrive(self, group: str, *, limit: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"group": group}
        if limit is not None:
            body["max"] = limit
        value, _ = await self.services.propose("group.redrive", body)
        return value

    # -- reads (this node's applied state) ---------------------------------------------

    def list_groups(self) -> list[dict[str, Any]]:
        # Under the lock only copy (committed offsets, the events above them); the
        # per-event partition hashing runs after it is released, so a scrape or a
        # listing over a long backlog never holds up the apply path.
        with self.raft.lock:
            taken = []
            for name in self._store.names():
                summary = self._store.summary(name)
                committed = self._store.committed(name)
                assert summary is not None and committed is not None
                taken.append((summary, committed, self._window(committed)[0]))
        return [{**summary, "lag": sum(backlog_counts(window, committed))}
                for summary, committed, window in taken]

    def _window(self, committed: list[int]) -> tuple[list[StoredEvent], bool]:
        """Under the raft lock: a copy of the events above the lowest committed offset
        (at most 100,000) and whether it reaches the newest."""
        if not committed:
            return [], True
        return self.services.machine.event_window(min(committed))

    def info(self, group: str) -> dict[str, Any]:
        """Members (with their last heartbeat and partitions), per-partition owner,
        target, epoch, committed offset, lag and pending redrives, totals."""
        with self.raft.lock:
            view = self._store.view(group)
            if view is None:
                raise NotFound(f"group {group} does not exist")
            committed = [a["committed"] for a in view["assignment"]]
            window, exact = self._window(committed)
        lag = backlog_counts(window, committed)
        heartbeats = view.pop("heartbeats")
        view["members"] = [{"node": node, "last_heartbeat_ms": hb,
                            "partitions": [a["partition"] for a in view["assignment"]
                                           if a["owner"] == node]}
                           for node, hb in heartbeats.items()]
        for a, n in zip(view["assignment"], lag, strict=True):
            a["lag"] = n
        view["lag"] = sum(lag)
        view["lag_exact"] = exact
        return view

    def dead(self, group: str, limit: int = 100) -> list[dict[str, Any]]:
        with self.raft.lock:
            dead = self._store.dead(group, limit)
        if dead is None:
            raise NotFound(f"group {group} does not exist")
        return dead

    def owned(self, group: str, node: str) -> list[tuple[int, int, int, bool,
                                                          tuple[int, ...]]]:
        with self.raft.lock:
            return self._store.owned(group, node)

    def session_ms(self, group: str) -> int | None:
        with self.raft.lock:
            summary = self._store.summary(group)
        return None if summary is None else int(summary["session_ms"])


@dataclass(eq=False)
class _PartitionTask:
    partition: int
    epoch: int
    task: asyncio.Task[None] = field(init=False)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)


class _Stopped(Exception):
    """The partition task was asked to stop (revoked, or the node stops)."""


class _Fenced(Exception):
    """The partition is no longer ours: a commit was refused."""


class _GroupLoop:
    """One group on this node: membership, partition tasks, delivery."""

    def __init__(self, consumer: GroupConsumer, group: str, subs: list[Subscription], *,
                 partitions: int, start: str) -> None:
        self.c = consumer
        self.group = group
        self.subs = subs
        self.partitions = partitions
        self.start = start
        self.tasks: dict[int, _PartitionTask] = {}
        self.main: asyncio.Task[None] | None = None
        self.stopping = False

    # -- membership --------------------------------------------------------------------

    async def run(self) -> None:
        c = self.c
        next_beat = 0.0
        session_s = c.session_s
        while not self.stopping:
            loop_now = time.monotonic()
            if loop_now >= next_beat:
                try:
                    start = 0 if self.start == "earliest" else c.feed.last_offset()
                    await c.service.join(self.group, c.node_id,
                                         partitions=self.partitions,
                                         session_ms=round(c.session_s * 1000),
                                         start_offset=start)
                    session_s = (c.service.session_ms(self.group) or 0) / 1000 or session_s
                    next_beat = time.monotonic() + session_s / 3
                except FlexCoreError as exc:
                    log.info("group %s: heartbeat not committed (%s)", self.group,
                             exc.message)
                    next_beat = time.monotonic() + min(0.5, session_s / 6)
            self._sync()
            await c.feed.wait(max(0.01, next_beat - time.monotonic()))

    def _sync(self) -> None:
        """Start tasks for partitions we own, stop those we no longer own."""
        owned = {p: (epoch, committed, revoking)
                 for p, epoch, committed, revoking, _ in
                 self.c.service.owned(self.group, self.c.node_id)}
        for p, pt in list(self.tasks.items()):
            mine = owned.get(p)
            if pt.task.done():
                del self.tasks[p]
            elif mine is None or mine[0] != pt.epoch:
                pt.stopping.set()            # lost it (fenced): stop, no release
        for p, (epoch, committed, revoking) in owned.items():
            if p in self.tasks:
                if revoking:
                    self.tasks[p].stopping.set()
                continue
            # (Also when revoking: the task finds nothing to do and releases it.)
            pt = _PartitionTask(p, epoch)
            pt.task = asyncio.create_task(self._partition(pt, committed),
                                          name=f"group {self.group} p{p}")
            pt.task.add_done_callback(lambda _t: self.c.feed.wake())   # re-sync soon
            self.tasks[p] = pt

    async def stop(self, *, leave: bool) -> None:
        self.stopping = True
        if self.main is not None:
            self.main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.main
        tasks = list(self.tasks.values())
        if leave:
            for pt in tasks:
                pt.stopping.set()
            self.c.feed.wake()
            if tasks:
                await asyncio.wait([pt.task for pt in tasks], timeout=STOP_GRACE_S)
        for pt in tasks:
            pt.task.cancel()
        for pt in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pt.task
        self.tasks.clear()
        if leave:
            with contextlib.suppress(FlexCoreError):
                await self.c.service.leave(self.group, self.c.node_id)

    # -- one partition ------------------------------------------------------------------

    async def _partition(self, pt: _PartitionTask, committed: int) -> None:
        try:
            await self._consume(pt, committed)
            # Stopped: progress is committed. Revoked by a rebalance (the state still
            # says ours, target another node): hand the partition to its new owner.
            mine = self._mine(pt)
            if mine is not None and mine[1]:
                await self._retrying(lambda: self.c.service.release(
                    self.group, self.c.node_id, pt.partition, pt.epoch), pt, "release")
        except _Fenced:
            log.info("group %s: partition %d is no longer this node's", self.group,
                     pt.partition)
        except Exception:
            log.exception("group %s: partition %d failed; restarting it", self.group,
                          pt.partition)
            await asyncio.sleep(1.0)

    def _mine(self, pt: _PartitionTask) -> tuple[int, bool, tuple[int, ...]] | None:
        """(epoch, revoking, redrive offsets) if this node still owns the partition at
        the task's epoch, else None."""
        for p, epoch, _, revoking, redrive in self.c.service.owned(self.group,
                                                                   self.c.node_id):
            if p == pt.partition:
                return (epoch, revoking, redrive) if epoch == pt.epoch else None
        return None

    async def _consume(self, pt: _PartitionTask, committed: int) -> None:
        c = self.c
        cursor = committed
        while not pt.stopping.is_set():
            mine = self._mine(pt)
            if mine is None or mine[1]:
                return                                    # moved away, or revoked
            if mine[2]:
                await self._redrive(pt, list(mine[2]))
                continue
            events, nxt = c.feed.read(cursor, BATCH,
                                      partition=(self.partitions, pt.partition))
            if not events:
                cursor = nxt
                await c.feed.wait(5.0)
                continue
            dead: list[dict[str, Any]] = []
            done = cursor
            for d in events:
                try:
                    letter = await self._deliver(pt, Event.from_dict(d))
                except _Stopped:
                    break
                if letter is not None:
                    dead.append(letter)
                done = d["offset"]
                if pt.stopping.is_set():
                    break
            else:
                done = nxt
            if done > cursor:
                await self._commit(pt, offset=done, dead=dead)
                cursor = done

    async def _redrive(self, pt: _PartitionTask, offsets: list[int]) -> None:
        """Deliver redriven dead letters again (to every matching handler of the
        group), then report them done (or dead again) in one commit."""
        dead: list[dict[str, Any]] = []
        done: list[int] = []
        for offset in offsets:
            events, _ = self.c.feed.read(offset - 1, 1, max_scan=1)
            if not events or events[0]["offset"] != offset:
                log.warning("group %s: redriven event %d left retention; dropped",
                            self.group, offset)
                done.append(offset)
                continue
            try:
                letter = await self._deliver(pt, Event.from_dict(events[0]))
            except _Stopped:
                break
            if letter is not None:
                dead.append(letter)
            done.append(offset)
            if pt.stopping.is_set():
                break
        if done:
            await self._commit(pt, dead=dead, redriven=done)
        elif pt.stopping.is_set():
            raise _Stopped

    async def _deliver(self, pt: _PartitionTask, event: Event) -> dict[str, Any] | None:
        """Run every matching handler with its retries; a dead letter or None."""
        failed: list[tuple[str, str, int]] = []
        for sub in self.subs:
            attempt = 1
            while True:
                try:
                    if sub.matches(event):
                        await self.c.call(sub, sub.transform(event), attempt)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"[:2000]
                    if attempt >= sub.retry.max_attempts:
                        log.warning("group %s: handler %s gave up on event %d after %d "
                                    "attempts: %s", self.group, sub.name, event.offset,
                                    attempt, error)
                        failed.append((sub.name, error, attempt))
                        break
                    delay = sub.retry.delay(attempt)
                    log.info("group %s: handler %s failed on event %d (attempt %d): %s; "
                             "retry in %.2f s", self.group, sub.name, event.offset,
                             attempt, error, delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(pt.stopping.wait(), delay)
                    if pt.stopping.is_set():
                        raise _Stopped from None
                    attempt += 1
        if not failed:
            return None
        return {"offset": event.offset, "id": event.id, "type": event.type,
                "key": event.key, "handler": ",".join(n for n, _, _ in failed)[:256],
                "error": "; ".join(e for _, e, _ in failed)[:2000],
                "attempts": max(a for _, _, a in failed)}

    async def _commit(self, pt: _PartitionTask, **kwargs: Any) -> None:
        c = self.c
        await self._retrying(lambda: c.service.commit(
            self.group, c.node_id, pt.partition, pt.epoch, **kwargs), pt, "commit")

    async def _retrying(self, call: Callable[[], Any], pt: _PartitionTask,
                        what: str) -> None:
        """Retry a commit/release through cluster errors (the outcome matters: an
        uncommitted batch would be redelivered); a fencing refusal raises `_Fenced`."""
        delay = 0.1
        while True:
            try:
                await call()
                return
            except CommandRejected as exc:
                if exc.code in _FENCED or exc.code == "not_found":
                    raise _Fenced from None
                raise
            except ShuttingDown:
                raise _Fenced from None
            except ConsensusError as exc:
                log.info("group %s: %s of partition %d not committed (%s); retrying",
                         self.group, what, pt.partition, exc.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


class GroupConsumer:
    """Runs this node's ``@app.on_event`` subscriptions (see the module docstring)."""

    def __init__(self, service: GroupService, feed: EventFeed, components: Components,
                 node_id: str, subscriptions: list[Subscription], *,
                 named: Mapping[str, object], session_s: float, partitions: int = 16,
                 start: str = "earliest") -> None:
        self.service = service
        self.feed = feed
        self.components = components
        self.node_id = node_id
        self.session_s = session_s
        self._named = dict(named)
        by_group: dict[str, list[Subscription]] = {}
        for sub in subscriptions:
            group = sub.group or broadcast_group(sub.name, node_id)
            by_group.setdefault(group, []).append(sub)
        self.loops = [_GroupLoop(self, g, subs, partitions=partitions if subs[0].group
                                 else 1, start=start) for g, subs in by_group.items()]
        names = frozenset(self._named) | {"event", "attempt"}
        for sub in subscriptions:
            sub.plan.check(components, names)
        self.handled = 0
        self.failed = 0
        self._stopped = False

    async def start(self) -> None:
        for gl in self.loops:
            gl.main = asyncio.create_task(gl.run(), name=f"group {gl.group}")

    async def stop(self, *, leave: bool = True) -> None:
        """Graceful (``leave=True``): finish the events in hand, commit, leave the
        groups. ``leave=False`` is a crash as far as the cluster can tell: cancel
        everything, commit nothing; the session timeout hands the partitions over.
        Only the first call counts."""
        if self._stopped:
            return
        self._stopped = True
        await asyncio.gather(*(gl.stop(leave=leave) for gl in self.loops))

    async def call(self, sub: Subscription, event: Event, attempt: int) -> None:
        named = {**self._named, "event": event, "attempt": attempt}
        kwargs = sub.plan.kwargs(self.components, named)
        try:
            if sub.plan.is_async:
                await sub.plan.fn(**kwargs)
            else:
                await asyncio.to_thread(sub.plan.fn, **kwargs)
        except BaseException:
            self.failed += 1
            raise
        self.handled += 1
