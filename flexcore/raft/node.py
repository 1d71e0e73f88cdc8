"""The Raft node as asyncio sees it: `RaftNode.propose()` and the read lock.

Data path: ``propose(type, body)`` stamps the command (time, request id), encodes it
(msgpack envelope), and queues it. Proposals that arrive while earlier batches are in
flight are coalesced into one replicated entry (group commit): one client gets a
sub-millisecond commit, many clients share entries. PySyncObj's tick thread applies
committed entries to the `StateMachine` under `RaftNode.lock`, then the batch's
callback is handed to the event loop with ``loop.call_soon_threadsafe`` and each
proposal's future gets ``(Result, log index)``.

Failures: a proposal that could not be placed (no leader yet, leader changed, entry
discarded by a new leader, outcome unknown) is retried until its deadline. Retrying
is safe because every command carries a request id the state machine deduplicates.
At the deadline the caller gets `NoQuorum` (this node reaches no majority or knows no
leader) or `ProposalTimeout` (outcome unknown).

Reads: API handlers read the state machine on the loop thread while the tick thread
applies: both hold `RaftNode.lock`, so a read never sees half a command.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from pysyncobj import FAIL_REASON, SyncObjConf
from pysyncobj.node import Node, TCPNode

from ..errors import (
    BadRequest,
    Conflict,
    ConsensusError,
    NoLeader,
    NoQuorum,
    ProposalTimeout,
    ShuttingDown,
)
from ..statemachine import Command, Result, StateMachine, encode
from .syncobj import FlexSyncObj

log = logging.getLogger("flexcore.raft")

SNAPSHOT_FORMAT = 1
_AE_BATCH_BYTES = 16 << 20
_SNAPSHOT_LIMIT = 1 << 31

# Failures after which the command certainly or possibly did not commit; a retry is
# safe (request-id dedupe) and may succeed once a leader is reachable.
_RETRYABLE = {
    FAIL_REASON.QUEUE_FULL, FAIL_REASON.MISSING_LEADER, FAIL_REASON.DISCARDED,
    FAIL_REASON.NOT_LEADER, FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME,
}
_ROLE_NAMES = {0: "follower", 1: "candidate", 2: "leader"}
_FAIL_NAMES = {v: k.lower() for k, v in vars(FAIL_REASON).items() if k.isupper()}


@dataclass(frozen=True)
class RaftConfig:
    """How this node takes part in the Raft group."""

    self_addr: str
    peers: tuple[str, ...]
    data_dir: Path
    secret: str | None = None
    fsync: bool = False
    election_timeout: float = 1.0      # min; PySyncObj picks in [t, 2t]
    heartbeat: float = 0.1
    propose_timeout: float = 5.0
    compaction_min_entries: int = 5000
    compaction_min_time: float = 300.0
    max_batch_commands: int = 1000
    max_batch_bytes: int = 1 << 20
    max_in_flight: int = 4

    @property
    def journal_file(self) -> Path:
        return self.data_dir / "raft.journal"

    @property
    def snapshot_file(self) -> Path:
        return self.data_dir / "raft.snapshot"


@dataclass(eq=False)
class _Proposal:
    raw: bytes
    future: asyncio.Future[tuple[Result, int]]
    deadline: float
    attempts: int = 0


@dataclass(eq=False)
class _Batch:
    proposals: list[_Proposal]
    done: bool = False
    timer: asyncio.TimerHandle | None = None


@dataclass
class RaftStatus:
    node: str
    leader: str | None
    role: str                       # leader | follower | candidate
    term: int
    commit_index: int
    applied_index: int
    has_quorum: bool
    members: list[dict[str, Any]] = field(default_factory=list)


class RaftNode:
    """One member of the Raft group, bridged to an asyncio loop."""

    def __init__(self, config: RaftConfig, machine: StateMachine, *,
                 clock: Callable[[], float] = time.time,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.machine = machine
        self.lock = threading.RLock()
        self._clock = clock
        self._on_fatal = on_fatal
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sync: FlexSyncObj | None = None
        self._pending: deque[_Proposal] = deque()
        self._in_flight = 0
        self._flush_scheduled = False
        self._retry_handle: asyncio.TimerHandle | None = None
        self._applied = 0                 # highest index applied through _on_apply
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiter_seq = itertools.count()
        self._wake_scheduled = False
        self._closed = False
        self._last_seen: tuple[Any, ...] = ()
        self._change_listeners: list[Callable[[], None]] = []

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the journal, bind the Raft port and join the group."""
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        t = cfg.election_timeout
        conf = SyncObjConf(
            password=cfg.secret,
            autoTick=True,
            appendEntriesUseBatch=False,          # low latency; we batch ourselves
            # Larger than any one entry can be (codec caps a command at 4 MiB, a batch
            # at max_batch_bytes): PySyncObj's chunked 'transmission' path for oversize
            # entries is never taken.
            appendEntriesBatchSizeBytes=_AE_BATCH_BYTES,
            raftMinTimeout=t,
            raftMaxTimeout=2 * t,
            appendEntriesPeriod=cfg.heartbeat,
            leaderFallbackTimeout=t,              # stock: 30 s of a deposed leader
            connectionTimeout=max(3.5, 2 * t),
            connectionRetryTime=0.5,
            commandsWaitLeader=False,             # we retry with a deadline instead
            journalFile=str(cfg.journal_file),
            fullDumpFile=str(cfg.snapshot_file),  # both, always (see README: durability)
            serializer=self._write_snapshot,
            deserializer=self._read_snapshot,
            logCompactionMinEntries=cfg.compaction_min_entries,
            logCompactionMinTime=cfg.compaction_min_time,
            dynamicMembershipChange=True,
            bindAddress=cfg.self_addr,            # listen where we advertise, not 0.0.0.0
            maxBindRetries=3,
            bindRetryTime=0.5,
            onStateChanged=self._on_state_changed,
        )
        self._sync = FlexSyncObj(cfg.self_addr, list(cfg.peers), conf, self._on_apply,
                                 fsync=cfg.fsync, snapshot_last=snapshot_last_entry)
        try:
            await asyncio.to_thread(self._sync.waitBinded)
        except Exception as exc:
            self._sync.destroy()
            raise OSError(f"cannot listen for raft on {cfg.self_addr}: bind failed") from exc
        self._sync.addOnTickCallback(self._on_tick)
        log.info("raft listening on %s, peers %s, data %s, fsync=%s, secret=%s",
                 cfg.self_addr, ",".join(cfg.peers) or "-", cfg.data_dir,
                 cfg.fsync, "set" if cfg.secret else "none")

    async def stop(self) -> None:
        """Fail waiting proposals, stop the tick thread and close the journal."""
        if self._closed:
            return
        self._closed = True
        err = ShuttingDown("node is shutting down")
        while self._pending:
            p = self._pending.popleft()
            if not p.future.done():
                p.future.set_exception(err)
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(err)
        self._waiters.clear()
        sync = self._sync
        if sync is not None:
            sync.destroy()
            await asyncio.to_thread(_join_tick_thread, sync)

    @property
    def syncobj(self) -> FlexSyncObj:
        if self._sync is None:
            raise RuntimeError("raft node not started")
        return self._sync

    # -- proposals -------------------------------------------------------------------

    async def propose(self, type: str, body: dict[str, Any], *,
                      timeout: float | None = None) -> tuple[Result, int]:
        """Replicate one command; return its `Result` and the log index that carried it.

        Raises `BadRequest` if the body cannot be encoded, `NoQuorum` / `NoLeader` /
        `ProposalTimeout` when it did not commit in time, `ShuttingDown` on close.
        """
        if self._closed or self._loop is None:
            raise ShuttingDown("node is not running")
        cmd = Command(type=type, body=body, ts=int(self._clock() * 1000),
                      rid=uuid.uuid4().hex)
        try:
            raw = encode(cmd)
        except (TypeError, ValueError, OverflowError) as exc:
            raise BadRequest(f"cannot encode command: {exc}") from exc
        self._fail_fast()
        loop = self._loop
        fut: asyncio.Future[tuple[Result, int]] = loop.create_future()
        deadline = loop.time() + (timeout if timeout is not None else self.config.propose_timeout)
        proposal = _Proposal(raw, fut, deadline)
        handle = loop.call_at(deadline, self._expire, proposal)
        fut.add_done_callback(lambda _f: handle.cancel())
        self._pending.append(proposal)
        self._schedule_flush()
        return await fut

    def _leader(self) -> Any:
        """The leader as far as this node can use it: PySyncObj keeps naming a leader it
        lost every connection to (a follower cut off from all peers never starts an
        election), so a leader that is neither us nor connected counts as none."""
        sync = self.syncobj
        leader = sync._getLeader()
        if leader is None or leader == sync.selfNode or sync.isNodeConnected(leader):
            return leader
        return None

    def _fail_fast(self) -> None:
        sync = self.syncobj
        if self._leader() is None and not sync.hasQuorum:
            raise NoQuorum(self._quorum_message())

    def _quorum_message(self) -> str:
        sync = self.syncobj
        others = sync.otherNodes
        reach = 1 + sum(1 for n in others if sync.isNodeConnected(n))
        total = 1 + len(others)
        leader = self._leader()
        who = f"leader {leader.id}" if leader is not None else "no leader"
        return (f"no quorum: this node reaches {reach} of {total} nodes ({who}); "
                f"a majority of {total // 2 + 1} is needed to commit")

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        cfg = self.config
        while self._pending and self._in_flight < cfg.max_in_flight and not self._closed:
            proposals: list[_Proposal] = []
            size = 0
            while self._pending and len(proposals) < cfg.max_batch_commands:
                p = self._pending[0]
                if p.future.done():
                    self._pending.popleft()
                    continue
                if proposals and size + len(p.raw) > cfg.max_batch_bytes:
                    break
                self._pending.popleft()
                proposals.append(p)
                size += len(p.raw)
            if not proposals:
                return
            self._send(_Batch(proposals))

    def _send(self, batch: _Batch) -> None:
        assert self._loop is not None
        packer = msgpack.Packer(use_bin_type=True)
        blob = packer.pack_array_header(len(batch.proposals)) + b"".join(
            p.raw for p in batch.proposals)
        self._in_flight += 1
        for p in batch.proposals:
            p.attempts += 1
        deadline = max(p.deadline for p in batch.proposals)
        batch.timer = self._loop.call_at(deadline, self._abandon, batch)
        loop = self._loop

        def on_done(result: Any, err: int) -> None:  # tick thread
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                loop.call_soon_threadsafe(self._on_batch_done, batch, result, err)

        self.syncobj.submit(blob, on_done)

    def _release(self, batch: _Batch) -> bool:
        if batch.done:
            return False
        batch.done = True
        if batch.timer is not None:
            batch.timer.cancel()
        self._in_flight -= 1
        return True

    def _abandon(self, batch: _Batch) -> None:
        # No callback by the deadline (e.g. a deposed leader holds the entry): free the
        # slot; each proposal's own deadline has failed or will fail its future.
        if self._release(batch):
            self._schedule_flush()

    def _on_batch_done(self, batch: _Batch, result: Any, err: int) -> None:
        if not self._release(batch):
            return
        if err == FAIL_REASON.SUCCESS:
            index, results = result
            for p, res in zip(batch.proposals, results, strict=True):
                if not p.future.done():
                    p.future.set_result((res, index))
        elif err in _RETRYABLE:
            log.debug("batch of %d not committed (%s); retrying",
                      len(batch.proposals), _FAIL_NAMES.get(err, err))
            for p in reversed(batch.proposals):
                if not p.future.done():
                    self._pending.appendleft(p)
            self._retry_later()
            return
        else:
            exc = ConsensusError(f"command refused by raft: {_FAIL_NAMES.get(err, err)}")
            for p in batch.proposals:
                if not p.future.done():
                    p.future.set_exception(exc)
        self._schedule_flush()

    def _retry_later(self) -> None:
        if self._retry_handle is None and self._loop is not None:
            def fire() -> None:
                self._retry_handle = None
                self._schedule_flush()
            self._retry_handle = self._loop.call_later(0.05, fire)

    def _expire(self, proposal: _Proposal) -> None:
        if proposal.future.done():
            return
        sync = self.syncobj
        if self._leader() is None:
            exc: ConsensusError = NoLeader(self._quorum_message())
        elif not sync.hasQuorum:
            exc = NoQuorum(self._quorum_message())
        else:
            exc = ProposalTimeout(
                f"not committed within the deadline (term {sync.raftCurrentTerm}); "
                "the outcome is unknown")
        proposal.future.set_exception(exc)

    # -- membership -----------------------------------------------------------------

    async def change_membership(self, op: str, addr: str) -> None:
        """Add or remove one node through Raft (one change at a time)."""
        assert self._loop is not None
        loop = self._loop
        fut: asyncio.Future[int] = loop.create_future()

        def on_done(_result: Any, err: int) -> None:
            def settle() -> None:
                if not fut.done():
                    fut.set_result(err)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle)

        self._fail_fast()
        self.syncobj.submit_membership(op, addr, on_done)
        try:
            err = await asyncio.wait_for(fut, self.config.propose_timeout)
        except TimeoutError:
            raise ProposalTimeout("membership change not committed within the deadline; "
                                  "check GET /v1/cluster before retrying") from None
        if err == FAIL_REASON.SUCCESS:
            return
        if err == FAIL_REASON.REQUEST_DENIED:
            raise Conflict("membership change refused: another change is in progress, the "
                           "node is already in that state, or it is the leader itself")
        if err == FAIL_REASON.MISSING_LEADER:
            raise NoLeader(self._quorum_message())
        raise ConsensusError(f"membership change failed: {_FAIL_NAMES.get(err, err)}")

    # -- waiting on the applied index ----------------------------------------------------

    @property
    def applied_index(self) -> int:
        sync = self._sync
        return max(self._applied, sync.raftLastApplied if sync is not None else 0)

    async def wait_applied(self, index: int, timeout: float) -> None:
        """Return once this node has applied ``index``; `ProposalTimeout` otherwise."""
        if self.applied_index >= index:
            return
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        heapq.heappush(self._waiters, (index, next(self._waiter_seq), fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise ProposalTimeout(
                f"index {index} not applied on this node within {timeout:g} s "
                f"(applied {self.applied_index})") from None

    def _wake(self) -> None:
        self._wake_scheduled = False
        applied = self.applied_index
        while self._waiters and self._waiters[0][0] <= applied:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
        for listener in self._change_listeners:
            listener()

    def add_change_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` on the loop after entries apply or leadership changes."""
        self._change_listeners.append(listener)

    def _schedule_wake(self) -> None:
        if self._wake_scheduled or self._loop is None:
            return
        self._wake_scheduled = True
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._wake)

    # -- tick-thread callbacks --------------------------------------------------------

    def _on_apply(self, blob: bytes, index: int) -> tuple[int, list[Result]]:
        with self.lock:
            results = self.machine.apply_batch(blob, index)
            self._applied = index
        self._schedule_wake()
        return index, results

    def _on_tick(self) -> None:
        sync = self._sync
        if sync is None:
            return
        leader = self._leader()
        seen = (sync.raftLastApplied, sync.raftCurrentTerm, leader)
        if seen != self._last_seen:
            if len(self._last_seen) == 3 and leader != self._last_seen[2]:
                if leader is None:
                    log.warning("no leader (term %d): election in progress or cut off",
                                sync.raftCurrentTerm)
                else:
                    log.info("leader is %s (term %d)%s", leader.id, sync.raftCurrentTerm,
                             " - this node" if leader == sync.selfNode else "")
            self._last_seen = seen
            self._schedule_wake()

    def _on_state_changed(self, old: int, new: int) -> None:
        sync = self._sync
        term = sync.raftCurrentTerm if sync is not None else 0
        log.info("raft role %s -> %s (term %d)", _ROLE_NAMES.get(old, old),
                 _ROLE_NAMES.get(new, new), term + (new == 1))

    # -- snapshots (PySyncObj serializer hooks; tick thread) ------------------------------

    def _write_snapshot(self, filename: str, raft_data: Any) -> None:
        last, prev, cluster = raft_data
        with self.lock:
            state = self.machine.snapshot()
        doc = {
            "format": SNAPSHOT_FORMAT,
            "last": [bytes(last[0]), int(last[1]), int(last[2])],
            "prev": [bytes(prev[0]), int(prev[1]), int(prev[2])],
            "cluster": sorted(n.id if isinstance(n, Node) else str(n) for n in cluster),
            "state": state,
        }
        with open(filename, "wb") as f:
            f.write(msgpack.packb(doc, use_bin_type=True))
            f.flush()
            os.fsync(f.fileno())
        log.info("snapshot written at index %d (%d bytes of state)", last[1], len(state))

    def _read_snapshot(self, filename: str) -> tuple[Any, Any, list[TCPNode]]:
        try:
            with open(filename, "rb") as f:
                doc = msgpack.unpackb(f.read(), raw=False, strict_map_key=True,
                                      max_bin_len=_SNAPSHOT_LIMIT, max_str_len=_SNAPSHOT_LIMIT)
            if not isinstance(doc, dict) or doc.get("format") != SNAPSHOT_FORMAT:
                raise ValueError(f"unknown snapshot format {doc.get('format')!r}"
                                 if isinstance(doc, dict) else "snapshot is not a map")
            last, prev = doc["last"], doc["prev"]
            with self.lock:
                self.machine.restore(doc["state"])
                self._applied = int(last[1])
            log.info("restored snapshot at index %d", last[1])
            # Node objects, not strings: PySyncObj drops itself from this list with
            # `node != selfNode`, which is always true for a str - every node would then
            # count itself as a peer (4 members in a 3-node cluster) and, with one node
            # down, never win an election again.
            return ((bytes(last[0]), int(last[1]), int(last[2])),
                    (bytes(prev[0]), int(prev[1]), int(prev[2])),
                    [TCPNode(str(n)) for n in doc["cluster"]])
        except Exception as exc:
            # PySyncObj would log this and carry on with an empty state machine over a
            # compacted log: a silent divergence. Stop the node instead.
            msg = f"cannot load raft snapshot {filename}: {exc}"
            log.critical(msg)
            if self._on_fatal is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(self._on_fatal, msg)
            raise

    # -- status ---------------------------------------------------------------------

    def status(self) -> RaftStatus:
        sync = self.syncobj
        leader = self._leader()
        leader_id = leader.id if leader is not None else None
        self_id = sync.selfNode.id
        role = _ROLE_NAMES.get(sync._SyncObj__raftState, "follower")
        members = [{"id": self_id, "role": role, "status": "self"}]
        for node in sorted(sync.otherNodes, key=lambda n: str(n.id)):
            members.append({
                "id": node.id,
                "role": "leader" if node.id == leader_id else "follower",
                "status": "connected" if sync.isNodeConnected(node) else "unreachable",
            })
        return RaftStatus(node=self_id, leader=leader_id, role=role,
                          term=sync.raftCurrentTerm, commit_index=sync.raftCommitIndex,
                          applied_index=self.applied_index, has_quorum=sync.hasQuorum,
                          members=members)

    def is_ready(self) -> bool:
        sync = self._sync
        if sync is None or self._closed:
            return False
        return self._leader() is not None and self.applied_index >= sync.raftCommitIndex


def snapshot_last_entry(raw: bytes) -> tuple[int, int] | None:
    """(index, term) of the last entry a snapshot file covers; None if unreadable."""
    try:
        doc = msgpack.unpackb(raw, raw=False, strict_map_key=True,
                              max_bin_len=_SNAPSHOT_LIMIT, max_str_len=_SNAPSHOT_LIMIT)
        last = doc["last"]
        return int(last[1]), int(last[2])
    except Exception:
        return None


def _join_tick_thread(sync: FlexSyncObj) -> None:
    thread = sync._SyncObj__thread
    if thread is not None:
        thread.join(timeout=10)


__all__ = ["RaftConfig", "RaftNode", "RaftStatus"]
