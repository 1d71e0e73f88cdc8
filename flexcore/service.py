"""The node's services: what the admin API (and the library) call.

`NodeServices` implements `flexcore.api.protocol.NodeService` on a real `RaftNode`
and `StateMachine`: writes become commands proposed through Raft, reads come from
this node's applied state under the raft lock (optionally after waiting for an index
or a Raft barrier, so a client reads its own writes from any node).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .api.protocol import EventIn, EventPage, EventQuery, PublishOutcome
from .errors import BadRequest, CommandRejected, Conflict, ConsensusError, NotFound
from .raft import RaftNode
from .statemachine import Err, Ok, Result, StateMachine

log = logging.getLogger("flexcore.node")


# HTTP status of a state-machine refusal by its code; any other code is a 400.
ERR_STATUS: dict[str, int] = {"not_found": 404, "conflict": 409, "lease_expired": 409,
                              # a handler raised: a bug in the node, not the client's mistake
                              "internal": 500}
# Timer fencing refusals (flexcore.statemachine.schedules): the state, not the request,
# is in the way.
ERR_STATUS.update({"not_owner": 409, "stale_term": 409, "already_claimed": 409,
                   "not_due": 409, "disabled": 409, "too_many_pending": 409})
# Workflow refusals (flexcore.statemachine.workflows).
ERR_STATUS.update({"too_many_runs": 429, "too_many_routes": 409, "cursor_moved": 409})
# Consumer-group fencing (flexcore.statemachine.groups): the partition moved.
ERR_STATUS.update({"stale_epoch": 409})
# Pipeline refusals (flexcore.statemachine.pipelines).
ERR_STATUS.update({"run_active": 409, "checkpoint_gap": 409, "too_many_pipelines": 409})


def unwrap(result: Result) -> dict[str, Any]:
    """The value of an `Ok`; an `Err` becomes `CommandRejected` with its code and the
    status from `ERR_STATUS` (400 by default)."""
    if isinstance(result, Ok):
        return result.value
    assert isinstance(result, Err)
    raise CommandRejected(result.message, code=result.code,
                          status=ERR_STATUS.get(result.code, 400))


class NodeServices:
    """Events, cluster status and membership for one node."""

    def __init__(self, raft: RaftNode, machine: StateMachine, *, api_url: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.raft = raft
        self.machine = machine
        self.api_url = api_url
        self._clock = clock
        self._started = clock()
        self.registry = CollectorRegistry()
        self.registry.register(_RaftCollector(self))
        self.commit_seconds = Histogram(
            "flexcore_propose_seconds", "Time from proposal to applied result",
            ["command"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))

    # -- status ------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "node": self.raft.config.self_addr,
                "uptime_s": round(self._clock() - self._started, 3)}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        st = self.raft.status()
        ready = self.raft.is_ready()
        return ready, {"ready": ready, "node": st.node, "leader": st.leader,
                       "commit_index": st.commit_index, "applied_index": st.applied_index}

    def cluster(self) -> dict[str, Any]:
        st = self.raft.status()
        with self.raft.lock:
            registered = self.machine.nodes()
        members = [dict(m, api=registered.get(m["id"], {}).get("api")) for m in st.members]
        return {"node": st.node, "api": self.api_url, "leader": st.leader,
                "leader_api": registered.get(st.leader, {}).get("api") if st.leader else None,
                "role": st.role, "term": st.term, "commit_index": st.commit_index,
                "applied_index": st.applied_index, "has_quorum": st.has_quorum,
                "ready": self.raft.is_ready(), "members": members}

    # -- commands ------------------------------------------------------------------------

    async def propose(self, type: str, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """Propose a command and return its Ok value and log index (Err → 4xx)."""
        t0 = time.perf_counter()
        result, index = await self.raft.propose(type, body)
        self.commit_seconds.labels(type).observe(time.perf_counter() - t0)
        return unwrap(result), index

    async def publish(self, events: Sequence[EventIn]) -> PublishOutcome:
        if not events:
            raise BadRequest("no events to publish")
        body = {"events": [{"type": e.type, "payload": e.payload, "key": e.key,
                            "id": e.id if e.id is not None else uuid.uuid4().hex}
                           for e in events]}
        value, index = await self.propose("event.publish", body)
        return PublishOutcome(offsets=list(value["offsets"]), ids=list(value["ids"]),
                              duplicates=list(value["duplicates"]), index=index)

    async def barrier(self) -> int:
        """Commit a no-op through Raft; once it returns, this node has applied every
        write acknowledged anywhere before the call."""
        _, index = await self.propose("noop", {})
        return index

    async def read_events(self, query: EventQuery) -> EventPage:
        if query.consistent:
            await self.barrier()
        if query.min_index is not None:
            await self.raft.wait_applied(query.min_index, self.raft.config.propose_timeout)
        with self.raft.lock:
            events, nxt = self.machine.read_events(query.after, query.limit, query.type)
        return EventPage(events=events, next=nxt)

    # -- membership ------------------------------------------------------------------------

    def _member_ids(self) -> set[str]:
        return {m["id"] for m in self.raft.status().members}

    async def add_member(self, raft: str, api: str | None) -> dict[str, Any]:
        if raft in self._member_ids():
            raise Conflict(f"{raft} is already a member", code="already_member")
        await self.raft.change_membership("add", raft)
        log.info("member %s added (api %s)", raft, api or "-")
        if api:
            await self.propose("cluster.register", {"node": raft, "api": api})
        return {"raft": raft, "api": api, "members": sorted(self._member_ids())}

    async def remove_member(self, raft: str) -> dict[str, Any]:
        if raft not in self._member_ids():
            raise NotFound(f"{raft} is not a member", code="not_member")
        await self.raft.change_membership("rem", raft)
        log.info("member %s removed", raft)
        await self.propose("cluster.unregister", {"node": raft})
        return {"raft": raft, "members": sorted(self._member_ids())}

    async def register_self(self, stop: asyncio.Event) -> None:
        """Record this node's API address in the replicated state (retries until done)."""
        me = self.raft.config.self_addr
        delay = 0.2
        while not stop.is_set():
            with self.raft.lock:
                current = self.machine.nodes().get(me, {}).get("api")
            if current == self.api_url:
                return
            try:
                await self.propose("cluster.register", {"node": me, "api": self.api_url})
                log.info("registered API %s for %s", self.api_url, me)
                return
            except ConsensusError as exc:
                log.debug("registration not committed yet: %s", exc.message)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                delay = min(delay * 2, 2.0)

    # -- metrics ------------------------------------------------------------------------

    def metrics(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _RaftCollector(Collector):
    """Raft and event-log gauges read at scrape time."""

    def __init__(self, services: NodeServices) -> None:
        self._s = services

    def collect(self) -> Iterable[Metric]:
        st = self._s.raft.status()
        with self._s.raft.lock:
            stats = self._s.machine.event_stats()
        for name, doc, value in (
            ("flexcore_raft_term", "Current Raft term", st.term),
            ("flexcore_raft_commit_index", "Raft commit index", st.commit_index),
            ("flexcore_raft_applied_index", "Last applied Raft index", st.applied_index),
            ("flexcore_raft_is_leader", "1 when this node leads", int(st.role == "leader")),
            ("flexcore_raft_has_quorum", "1 when a majority is reachable", int(st.has_quorum)),
            ("flexcore_events_retained", "Events retained in the log", stats["count"]),
            ("flexcore_events_last_offset", "Offset of the newest event", stats["last_offset"]),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        connected = sum(1 for m in st.members if m["status"] in ("self", "connected"))
        yield GaugeMetricFamily("flexcore_raft_members_connected",
                                "Members this node reaches (itself included)", value=connected)
