"""FlexCore's PySyncObj subclass: the only place that reaches into PySyncObj internals.

Pinned to pysyncobj 0.3.17 (`check_version()` refuses any other). What it changes, and
why, each covered by ``tests/unit/test_raft_syncobj.py``:

1. **Log truncation rule.** On every AppendEntries a stock follower deletes its log
   after ``prevLogIdx`` whenever it holds more entries, even when they match the
   leader's (syncobj.py, "truncating already-applied log entries"). A stale or
   re-sent AppendEntries (after a ``next_node_idx`` reset, a reconnect, a batch cut
   by ``appendEntriesBatchSizeBytes``) can so remove entries the follower already
   acknowledged; if the leader counted that acknowledgement to commit and then dies,
   a committed entry is lost. Raft (Figure 2, AppendEntries rule 3) truncates only
   from the first *conflicting* entry. `_guard_append_entries` rewrites such a message
   so the stock code only truncates at a real conflict, and caps the follower's commit
   index at the last entry verified against the leader. Snapshots (1b): one the node
   already holds is discarded instead of rolling the node back, and a chunk of a
   snapshot transmission never raises the commit index over the node's own, still
   unverified log (stock code does, and so applies a deposed leader's entries).
2. **Durability.** In ``fsync`` mode the journal is flushed (msync) before a follower
   acknowledges entries and before the leader counts its own log towards a commit
   (once per tick: group commit), and term/vote metadata is fsynced.
3. **Transport admission.** Incoming connections may only identify as a configured
   peer: PySyncObj's unauthenticated utility commands (add/remove node, status) and
   read-only observers (which receive the whole log) are refused.
4. **One replicated method**, `_apply(blob)`, whose body is handed to FlexCore's
   callback with the Raft log index; snapshots go through msgpack hooks (see
   `flexcore.raft.node`), never pickle.
5. The journal's metadata reader no longer leaks a file handle (ResourceWarning).
6. **Keepalive** between every pair of members, so an idle follower-to-follower link
   is not closed by the first vote request of an election (see `_keepalive`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from time import monotonic
from typing import Any

import pysyncobj.journal as _journal
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.syncobj import _COMMAND_TYPE
from pysyncobj.transport import TCPTransport
from pysyncobj.version import VERSION

from . import wire

PINNED_VERSION = "0.3.17"
KEEPALIVE = {"type": "flex_keepalive"}

log = logging.getLogger("flexcore.raft")


def check_version() -> None:
    if VERSION != PINNED_VERSION:
        raise RuntimeError(
            f"flexcore.raft is pinned to pysyncobj {PINNED_VERSION} (it overrides internals); "
            f"found {VERSION}")


def _get_meta(self: Any) -> dict[str, Any]:
    """MetaStorer.getMeta without leaking the file handle (stock: open(...).read())."""
    try:
        with open(self.getPath(), "rb") as f:
            meta = wire.loads(f.read())
    except Exception:
        return {}
    return meta if isinstance(meta, dict) else {}


_journal.MetaStorer.getMeta = _get_meta


class _DurableMetaStorer(_journal.MetaStorer):  # type: ignore[misc]
    """Writes the journal's term/vote/commit metadata with fsync of file and folder."""

    def storeMeta(self, meta: dict[str, Any]) -> None:
        path = self.getPath()
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(wire.dumps(meta))
            f.flush()
            os.fsync(f.fileno())
        shutil.move(tmp, path)
        _fsync_dir(os.path.dirname(path) or ".")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FlexTransport(TCPTransport):  # type: ignore[misc]
    """TCP transport that admits only configured peers on incoming connections."""

    def _onIncomingMessageReceived(self, conn: Any, message: Any) -> None:
        if self._syncObj.encryptor and not conn.sendRandKey:
            # First frame of the encrypted handshake: it decrypted, so the peer
            # knows the cluster secret.
            super()._onIncomingMessageReceived(conn, message)
            return
        if not isinstance(message, str) or message not in self._nodeAddrToNode:
            log.warning("refused a raft connection that did not identify as a cluster member "
                        "(sent %s)", type(message).__name__)
            conn.disconnect()
            self._unknownConnections.discard(conn)
            return
        super()._onIncomingMessageReceived(conn, message)


ApplyCallback = Callable[[bytes, int], Any]
SnapshotPeek = Callable[[bytes], "tuple[int, int] | None"]
"""(index, term) of a snapshot's last entry, read from the snapshot file's bytes."""


class FlexSyncObj(SyncObj):  # type: ignore[misc]
    """SyncObj with FlexCore's corrections. Construct through `flexcore.raft.node`."""

    def __init__(self, self_addr: str, peers: list[str], conf: SyncObjConf,
                 on_apply: ApplyCallback, *, fsync: bool = False,
                 snapshot_last: SnapshotPeek | None = None) -> None:
        check_version()
        wire.install()
        self._flex_on_apply = on_apply
        self._flex_snapshot_last = snapshot_last
        self._flex_fsync = fsync
        self._flex_synced: tuple[int, int, int] | None = None
        # Well inside the inactivity timeout, so no idle link between members expires.
        self._flex_keepalive_period = min(1.0, conf.connectionTimeout / 3)
        self._flex_next_keepalive = 0.0
        super().__init__(self_addr, [p for p in peers if p != self_addr], conf=conf,
                         transportClass=FlexTransport)
        raft_log = self._SyncObj__raftLog
        if fsync and isinstance(raft_log, _journal.FileJournal):
            raft_log._FileJournal__metaStorer = _DurableMetaStorer(
                raft_log._FileJournal__metaStorer.getPath())

    # -- the one replicated entry point ------------------------------------------------

    @replicated  # type: ignore[untyped-decorator]
    def _apply(self, blob: bytes) -> Any:
        # Called on the tick thread for committed entries, in log order. PySyncObj
        # increments raftLastApplied after this returns, so this entry's index is +1.
        return self._flex_on_apply(blob, self.raftLastApplied + 1)

    def submit(self, blob: bytes, callback: Callable[[Any, int], None]) -> None:
        """Queue ``blob`` for replication; ``callback(result, fail_reason)`` runs on the
        tick thread when it commits and applies here, or fails."""
        self._apply(blob, callback=callback)

    def submit_membership(self, op: str, addr: str,
                          callback: Callable[[Any, int], None]) -> None:
        """Add (``op="add"``) or remove (``"rem"``) a node, as a plain-value command."""
        assert op in ("add", "rem")
        self._applyCommand(wire.dumps([op, addr]), callback, _COMMAND_TYPE.MEMBERSHIP)

    # -- 1. truncation rule ------------------------------------------------------------

    def _SyncObj__onMessageReceived(self, node: Any, message: Any) -> None:
        if not isinstance(message, dict) or "type" not in message:
            log.warning("dropped a malformed raft message from %s", node)
            return
        if message["type"] == "request_vote" and log.isEnabledFor(logging.DEBUG):
            raft_log = self._SyncObj__raftLog
            log.debug("vote request from %s: term %s last %s/%s; here term %s voted %s "
                      "last %s/%s", node, message.get("term"), message.get("last_log_index"),
                      message.get("last_log_term"), self.raftCurrentTerm,
                      self._SyncObj__votedForNodeId, raft_log[-1][1], raft_log[-1][2])
        if message["type"] == "response_vote" and log.isEnabledFor(logging.DEBUG):
            log.debug("vote response from %s: term %s; here term %s state %s", node,
                      message.get("term"), self.raftCurrentTerm, self._SyncObj__raftState)
        reply_next: int | None = None
        if (message["type"] == "append_entries" and "prevLogIdx" in message
                and "transmission" not in message):
            message, reply_next = self._guard_append_entries(message)
        elif message["type"] == "append_entries" and message.get("serialized") is not None:
            message, reply_next = self._guard_snapshot_install(message)
        SyncObj._SyncObj__onMessageReceived(self, node, message)
        if reply_next is not None:
            self._SyncObj__sendNextNodeIdx(node, nextNodeIdx=reply_next, success=True)

    def _guard_append_entries(self, msg: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        """Return the message the stock handler may safely process, and the success
        reply to send ourselves when the stock handler must not see the entries.

        Only rewrites what the stock code gets wrong: it still rejects a missing or
        mismatching ``prevLogIdx`` and still truncates at a real conflict.
        """
        if msg["term"] < self.raftCurrentTerm:
            return msg, None
        raft_log = self._SyncObj__raftLog
        prev_idx, prev_term = msg["prevLogIdx"], msg["prevLogTerm"]
        first_idx, last_idx = raft_log[0][1], raft_log[-1][1]
        if prev_idx is None or prev_idx < first_idx or prev_idx > last_idx:
            return msg, None
        if raft_log[prev_idx - first_idx][2] != prev_term:
            return msg, None
        entries = msg.get("entries") or []
        matched = 0  # leading entries we already hold with the leader's term
        for entry in entries:
            idx = entry[1]
            if idx > last_idx or raft_log[idx - first_idx][2] != entry[2]:
                break
            matched += 1
        verified = prev_idx + matched
        if matched < len(entries):
            # New or conflicting entries from `verified + 1` on: the stock code truncates
            # exactly there (correct) and appends the rest.
            if matched:
                msg = dict(msg, prevLogIdx=verified, prevLogTerm=entries[matched - 1][2],
                           entries=entries[matched:])
            return msg, None
        if verified == last_idx:
            # Everything is already here and nothing follows: nothing to write.
            return dict(msg, prevLogIdx=verified,
                        prevLogTerm=entries[-1][2] if entries else prev_term,
                        entries=[]), None
        # Our log extends past what this message verifies. Stock code would delete the
        # tail (possibly acknowledged, possibly committed). Keep it: let the stock code
        # do only the leader/term bookkeeping, never commit past the verified prefix,
        # and acknowledge exactly the verified prefix.
        bookkeeping = {k: v for k, v in msg.items()
                       if k not in ("prevLogIdx", "prevLogTerm", "entries")}
        bookkeeping["commit_index"] = min(msg["commit_index"], verified)
        return bookkeeping, verified + 1

    # -- 1b. snapshot installs that would roll back ---------------------------------------

    def _guard_snapshot_install(self, msg: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        """Drop a snapshot from the leader that is not newer than what this node holds.

        Stock PySyncObj installs every snapshot it receives: it wipes the journal past the
        snapshot and rolls the state machine back, even when this node already applied
        (and acknowledged) entries beyond it - seen in the chaos suite when a leader
        re-sent an old snapshot. The leader's matchIndex never goes down, so it keeps
        counting entries this node no longer has; a leader failure right after can lose
        a committed entry. Raft (§7): if the log already holds the snapshot's last entry
        (same index and term), retain the log. Here: if that entry was applied already,
        or is in the log with the same term, the transmission is discarded (this node's
        snapshot file and journal stay as they are) and only the verified index is
        acknowledged.
        """
        if msg["term"] < self.raftCurrentTerm:
            return msg, None
        # Until a snapshot is installed nothing in this node's log is verified against
        # this leader: stock PySyncObj still raises its commit index to
        # min(leader's commit, own last index) on every chunk, which commits and applies
        # entries of a deposed leader that the new leader never had (seen in the chaos
        # suite: a paused leader, resumed, applied its own uncommitted queue lease while
        # the new leader streamed it a snapshot; that lease was later handed out again).
        # A passed-through chunk may therefore not move the commit index; the install
        # itself sets it from the snapshot.
        passed = dict(msg, commit_index=min(msg["commit_index"], self.raftCommitIndex))
        if self._flex_snapshot_last is None:
            return passed, None
        data, _is_first, is_last = msg["serialized"]
        if not is_last:
            return passed, None
        serializer = self._SyncObj__serializer
        incoming = serializer._Serializer__incomingTransmissionFile
        if incoming is None:
            return passed, None
        incoming.flush()
        tmp = self.conf.fullDumpFile + ".1.tmp"
        try:
            with open(tmp, "rb") as f:
                last = self._flex_snapshot_last(f.read() + bytes(data or b""))
        except OSError:
            return passed, None
        if last is None:
            return passed, None
        idx, term = last
        raft_log = self._SyncObj__raftLog
        first_idx, last_idx = raft_log[0][1], raft_log[-1][1]
        holds = first_idx <= idx <= last_idx and raft_log[idx - first_idx][2] == term
        if idx > self.raftLastApplied and not holds:
            # Genuinely newer: install it. Afterwards the log is the snapshot's last
            # entry, so the leader's commit index is capped there by the stock code.
            return msg, None
        incoming.close()
        serializer._Serializer__incomingTransmissionFile = None
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        log.info("discarded a snapshot at index %d from the leader: this node already "
                 "holds it (applied %d, log %d..%d)", idx, self.raftLastApplied, first_idx,
                 last_idx)
        bookkeeping = {k: v for k, v in msg.items() if k != "serialized"}
        bookkeeping["commit_index"] = min(msg["commit_index"], max(idx, self.raftCommitIndex))
        return bookkeeping, idx + 1

    # -- 2. durability -----------------------------------------------------------------

    def _sync_journal(self) -> None:
        if not self._flex_fsync:
            return
        raft_log = self._SyncObj__raftLog
        last = raft_log[-1]
        mark = (last[1], last[2], len(raft_log))
        if mark != self._flex_synced:
            raft_log.flush()
            self._flex_synced = mark

    def _SyncObj__sendNextNodeIdx(self, node: Any, reset: bool = False,
                                  nextNodeIdx: int | None = None,
                                  success: bool = False) -> None:
        if success:
            self._sync_journal()  # persist before acknowledging (Raft §5.3)
        SyncObj._SyncObj__sendNextNodeIdx(self, node, reset=reset, nextNodeIdx=nextNodeIdx,
                                          success=success)

    def _onTick(self, timeToWait: float = 0.0) -> None:
        # The leader counts its own log in the commit calculation at the top of the
        # tick: flush what earlier ticks appended first (one flush per tick).
        self._sync_journal()
        self._keepalive()
        super()._onTick(timeToWait)

    # -- 6. keepalive between every pair of members ------------------------------------

    def _keepalive(self) -> None:
        """Send a small message to every connected member once per keepalive period.

        Followers never talk to each other, and PySyncObj checks a connection's
        inactivity timeout when it *sends*: the first RequestVote over an idle
        follower-to-follower link closed the link instead of leaving, so most failovers
        needed a second election round (+1-2 s). The stock handler ignores the type.
        """
        now = monotonic()
        if now < self._flex_next_keepalive:
            return
        self._flex_next_keepalive = now + self._flex_keepalive_period
        transport = self._SyncObj__transport
        for node in self.otherNodes:
            if self.isNodeConnected(node):
                transport.send(node, KEEPALIVE)
