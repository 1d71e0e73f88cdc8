"""PySyncObj corrections in flexcore.raft.syncobj, checked against the stock class.

Raft paper §5.3 / Figure 2, AppendEntries receiver rule 3: "If an existing entry
conflicts with a new one (same index but different terms), delete the existing entry
and all that follow it" — and only then.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
from pysyncobj import SyncObj, SyncObjConf

from flexcore.cluster import free_ports
from flexcore.raft import wire
from flexcore.raft.syncobj import FlexSyncObj

NOOP = b"\x01"  # PySyncObj's NO_OP command type byte: applies to nothing


def _conf(port: int) -> SyncObjConf:
    return SyncObjConf(autoTick=False, bindAddress=f"127.0.0.1:{port}")


class Follower:
    """A follower driven by hand: no tick thread, messages injected, replies captured."""

    def __init__(self, obj: SyncObj) -> None:
        self.obj = obj
        self.leader = next(iter(obj.otherNodes))
        self.replies: list[dict[str, Any]] = []
        transport = obj._SyncObj__transport

        def capture(node: Any, message: Any) -> bool:
            self.replies.append(message)
            return True

        transport.send = capture

    def append_entries(self, prev: tuple[int, int], entries: list[tuple[int, int]],
                       commit: int = 1, term: int = 1) -> None:
        self.obj._SyncObj__onMessageReceived(self.leader, {
            "type": "append_entries", "term": term, "commit_index": commit,
            "prevLogIdx": prev[0], "prevLogTerm": prev[1],
            "entries": [(NOOP, idx, t) for idx, t in entries],
        })

    @property
    def log(self) -> list[tuple[int, int]]:
        raft_log = self.obj._SyncObj__raftLog
        return [(raft_log[i][1], raft_log[i][2]) for i in range(len(raft_log))]

    @property
    def commit_index(self) -> int:
        return int(self.obj.raftCommitIndex)


@pytest.fixture
def stock() -> Iterator[Follower]:
    p1, p2 = free_ports(2)
    obj = SyncObj(f"127.0.0.1:{p1}", [f"127.0.0.1:{p2}"], conf=_conf(p1))
    yield Follower(obj)
    obj.destroy()


@pytest.fixture
def flex() -> Iterator[Follower]:
    p1, p2 = free_ports(2)
    obj = FlexSyncObj(f"127.0.0.1:{p1}", [f"127.0.0.1:{p2}"], _conf(p1),
                      on_apply=lambda blob, index: None)
    yield Follower(obj)
    obj.destroy()


def test_stock_pysyncobj_truncates_acknowledged_entries(stock: Follower) -> None:
    """The hole, reproduced: a re-sent AppendEntries deletes entries already acked."""
    stock.append_entries(prev=(1, 0), entries=[(2, 1), (3, 1), (4, 1)])
    assert stock.log[-1] == (4, 1)
    assert stock.replies[-1]["success"] and stock.replies[-1]["next_node_idx"] == 5
    # The same leader re-sends from index 2 (a stale next_node_idx reset, or a batch
    # cut by appendEntriesBatchSizeBytes): nothing conflicts, yet...
    stock.append_entries(prev=(1, 0), entries=[(2, 1)])
    assert stock.log == [(1, 0), (2, 1)], "stock PySyncObj no longer truncates: " \
        "re-check whether flexcore.raft.syncobj's override is still needed"


def test_flex_keeps_matching_entries(flex: Follower) -> None:
    flex.append_entries(prev=(1, 0), entries=[(2, 1), (3, 1), (4, 1)])
    flex.append_entries(prev=(1, 0), entries=[(2, 1)])
    assert flex.log == [(1, 0), (2, 1), (3, 1), (4, 1)]
    # It acknowledges exactly what this message verified, no more.
    assert flex.replies[-1] == {"type": "next_node_idx", "next_node_idx": 3,
                                "reset": False, "success": True}


def test_flex_heartbeat_with_stale_prev_keeps_tail(flex: Follower) -> None:
    flex.append_entries(prev=(1, 0), entries=[(2, 1), (3, 1)])
    flex.append_entries(prev=(1, 0), entries=[])
    assert flex.log[-1] == (3, 1)
    assert flex.replies[-1]["success"] and flex.replies[-1]["next_node_idx"] == 2


def test_flex_commit_index_capped_at_verified_prefix(flex: Follower) -> None:
    flex.append_entries(prev=(1, 0), entries=[(2, 1), (3, 1), (4, 1)], commit=1)
    # The leader says 4 is committed, but this message only vouches for index 2.
    flex.append_entries(prev=(1, 0), entries=[(2, 1)], commit=4)
    assert flex.commit_index == 2
    flex.append_entries(prev=(3, 1), entries=[(4, 1)], commit=4)
    assert flex.commit_index == 4


def test_flex_still_truncates_at_a_real_conflict(flex: Follower) -> None:
    flex.append_entries(prev=(1, 0), entries=[(2, 1), (3, 1), (4, 1)], term=1)
    # A new leader of term 2 never had 3 and 4 of term 1: they conflict and go.
    flex.append_entries(prev=(2, 1), entries=[(3, 2)], term=2)
    assert flex.log == [(1, 0), (2, 1), (3, 2)]
    assert flex.replies[-1]["success"] and flex.replies[-1]["next_node_idx"] == 4


def test_flex_skips_already_held_prefix_and_appends_the_rest(flex: Follower) -> None:
    flex.append_entries(prev=(1, 0), entries=[(2, 1), (3, 1)])
    flex.append_entries(prev=(1, 0), entries=[(2, 1), (3, 1), (4, 1), (5, 1)])
    assert flex.log == [(1, 0), (2, 1), (3, 1), (4, 1), (5, 1)]
    assert flex.replies[-1]["next_node_idx"] == 6


def test_flex_rejects_mismatching_prev_like_stock(flex: Follower) -> None:
    flex.append_entries(prev=(1, 0), entries=[(2, 1)])
    flex.append_entries(prev=(2, 7), entries=[(3, 7)], term=7)
    assert flex.log == [(1, 0), (2, 1)]
    assert flex.replies[-1]["success"] is False and flex.replies[-1]["reset"] is True


def test_flex_ignores_lower_term(flex: Follower) -> None:
    flex.append_entries(prev=(1, 0), entries=[(2, 3)], term=3)
    n = len(flex.replies)
    flex.append_entries(prev=(1, 0), entries=[], term=2)
    assert flex.log == [(1, 0), (2, 3)] and len(flex.replies) == n


def test_flex_drops_non_dict_messages(flex: Follower) -> None:
    flex.obj._SyncObj__onMessageReceived(flex.leader, ["status"])
    flex.obj._SyncObj__onMessageReceived(flex.leader, "junk")
    assert flex.log == [(1, 0)]


# -- wire ------------------------------------------------------------------------------

class _Boom:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("pwned",))


def test_wire_refuses_any_global() -> None:
    wire.install()
    for protocol in (2, 5):
        with pytest.raises(wire.RefusedGlobal):
            wire.loads(pickle.dumps(_Boom(), protocol))
    # Protocol 2 writes bytes through _codecs.encode: refused as well, which is why
    # FlexCore writes protocol 5 everywhere.
    with pytest.raises(wire.RefusedGlobal):
        wire.loads(pickle.dumps(b"x", 2))


def test_wire_round_trips_plain_values() -> None:
    value = {"type": "append_entries", "entries": [(b"\x00abc", 2, 1)],
             "s": {1, 2}, "f": frozenset({"a"}), "n": None, "x": 1.5, "t": True}
    assert wire.loads(wire.dumps(value)) == value


def test_install_patches_pysyncobj_everywhere() -> None:
    import pysyncobj.journal
    import pysyncobj.pickle
    wire.install()
    assert pysyncobj.pickle.loads is wire.loads and pysyncobj.pickle.dumps is wire.dumps
    assert pysyncobj.journal.loads is wire.loads and pysyncobj.journal.dumps is wire.dumps


# -- fsync mode ------------------------------------------------------------------------

def test_fsync_mode_flushes_before_acknowledging(tmp_path: Any) -> None:
    p1, p2 = free_ports(2)
    conf = _conf(p1)
    conf.journalFile = str(tmp_path / "raft.journal")
    obj = FlexSyncObj(f"127.0.0.1:{p1}", [f"127.0.0.1:{p2}"], conf,
                      on_apply=lambda blob, index: None, fsync=True)
    try:
        follower = Follower(obj)
        events: list[str] = []
        raft_log = obj._SyncObj__raftLog
        real_flush = raft_log.flush

        def flush() -> None:
            events.append("flush")
            real_flush()

        raft_log.flush = flush
        send = obj._SyncObj__transport.send

        def send_after_flush(node: Any, message: Any) -> bool:
            events.append("reply")
            return bool(send(node, message))

        obj._SyncObj__transport.send = send_after_flush
        follower.append_entries(prev=(1, 0), entries=[(2, 1), (3, 1)])
        assert events == ["flush", "reply"]
        # Nothing new: the heartbeat's acknowledgement needs no second flush.
        follower.append_entries(prev=(3, 1), entries=[])
        assert events == ["flush", "reply", "reply"]
        assert follower.replies[-1]["success"]
        # Term and vote metadata goes through the fsyncing storer.
        storer = raft_log._FileJournal__metaStorer
        assert type(storer).__name__ == "_DurableMetaStorer"
    finally:
        obj.destroy()


def test_keepalive_reaches_every_connected_member_once_per_period(flex: Follower) -> None:
    """Idle links between followers must see traffic, or PySyncObj's send-time
    inactivity check drops the first vote request of an election."""
    from flexcore.raft.syncobj import KEEPALIVE
    obj = flex.obj
    obj.isNodeConnected = lambda node: True
    obj._keepalive()
    assert flex.replies == [KEEPALIVE]
    obj._keepalive()                       # within the period: nothing more
    assert flex.replies == [KEEPALIVE]
    obj._flex_next_keepalive = 0.0         # the period elapsed
    obj._keepalive()
    assert flex.replies == [KEEPALIVE, KEEPALIVE]
    assert obj._flex_keepalive_period < obj.conf.connectionTimeout
    # The stock message handler ignores it.
    before = flex.log
    obj._SyncObj__onMessageReceived(flex.leader, dict(KEEPALIVE))
    assert flex.log == before


# -- snapshot installs that would roll back ---------------------------------------------

def _snapshot_doc(last: tuple[int, int], prev: tuple[int, int]) -> bytes:
    import msgpack
    return bytes(msgpack.packb({"format": 1, "last": [NOOP, *last], "prev": [NOOP, *prev],
                                "cluster": [], "state": b""}, use_bin_type=True))


def _read_doc(filename: str) -> tuple[Any, Any, list[Any]]:
    import msgpack
    with open(filename, "rb") as f:
        doc = msgpack.unpackb(f.read(), raw=False)
    return (tuple(doc["last"]), tuple(doc["prev"]), [])


@contextlib.contextmanager
def _snapshot_follower(tmp_path: Any, *, flex: bool) -> Iterator[Follower]:
    """A hand-driven follower (stock or FlexCore) that can receive snapshots."""
    from flexcore.raft.node import snapshot_last_entry
    p1, p2 = free_ports(2)
    conf = _conf(p1)
    conf.fullDumpFile = str(tmp_path / "raft.snapshot")
    conf.serializer = lambda filename, data: None
    conf.deserializer = _read_doc
    self_addr, peers = f"127.0.0.1:{p1}", [f"127.0.0.1:{p2}"]
    obj = (FlexSyncObj(self_addr, peers, conf, on_apply=lambda blob, index: None,
                       snapshot_last=snapshot_last_entry)
           if flex else SyncObj(self_addr, peers, conf=conf))
    try:
        yield Follower(obj)
    finally:
        incoming = obj._SyncObj__serializer._Serializer__incomingTransmissionFile
        if incoming is not None:   # a transmission left unfinished: close its file
            incoming.close()
        obj.destroy()


def _applied(f: Follower, upto: int) -> None:
    f.append_entries(prev=(1, 0), entries=[(i, 1) for i in range(2, upto + 1)], commit=upto)
    f.obj.doTick(0)                                # applies up to the commit index
    assert f.obj.raftLastApplied == upto


def _chunk(f: Follower, data: bytes, *, first: bool, last: bool, commit: int,
           term: int = 1) -> None:
    f.obj._SyncObj__onMessageReceived(f.leader, {
        "type": "append_entries", "term": term, "commit_index": commit,
        "serialized": (data, first, last)})


def _send_snapshot(f: Follower, last: tuple[int, int], commit: int, term: int = 1,
                   *, finish: bool = True) -> None:
    """Stream a snapshot ending at ``last`` in two chunks (only the first with
    ``finish=False``)."""
    doc = _snapshot_doc(last, (last[0] - 1, last[1]))
    _chunk(f, doc, first=True, last=False, commit=commit, term=term)
    if finish:
        _chunk(f, b"", first=False, last=True, commit=commit, term=term)


def test_stock_pysyncobj_rolls_back_on_an_old_snapshot(tmp_path: Any) -> None:
    """The hole, reproduced: an applied follower installs an older snapshot, loses the
    entries after it (which it had acknowledged) and rolls its applied index back."""
    with _snapshot_follower(tmp_path, flex=False) as f:
        _applied(f, 6)
        _send_snapshot(f, last=(3, 1), commit=6)
        assert f.log == [(2, 1), (3, 1)] and f.obj.raftLastApplied == 3, \
            "stock PySyncObj no longer rolls back: re-check the override"


def test_flex_discards_a_snapshot_it_already_holds(tmp_path: Any) -> None:
    with _snapshot_follower(tmp_path, flex=True) as f:
        _applied(f, 6)
        _send_snapshot(f, last=(3, 1), commit=6)
        assert f.log == [(1, 0), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1)]
        assert f.obj.raftLastApplied == 6
        assert f.replies[-1] == {"type": "next_node_idx", "next_node_idx": 4,
                                 "reset": False, "success": True}
        assert not (tmp_path / "raft.snapshot").exists()          # nothing replaced
        assert not (tmp_path / "raft.snapshot.1.tmp").exists()


def test_flex_still_installs_a_newer_snapshot(tmp_path: Any) -> None:
    with _snapshot_follower(tmp_path, flex=True) as f:
        _applied(f, 3)
        _send_snapshot(f, last=(9, 1), commit=9)
        assert f.log == [(8, 1), (9, 1)] and f.obj.raftLastApplied == 9


def _deposed_leader_log(f: Follower) -> None:
    """Entries 2..6 of term 1, only 2..3 committed (and applied): 4..6 were appended
    by this node as a leader that was then deposed before they reached anyone."""
    f.append_entries(prev=(1, 0), entries=[(i, 1) for i in range(2, 7)], commit=3)
    f.obj.doTick(0)
    assert f.obj.raftLastApplied == 3 and f.commit_index == 3


def test_stock_pysyncobj_commits_a_deposed_leaders_entries_on_a_snapshot_chunk(
        tmp_path: Any) -> None:
    """The hole, reproduced: the new leader (term 2) streams a snapshot; on its first
    chunk a stock follower raises its commit index to min(leader commit, own last
    index) and applies entries 4..6 that the new leader never had."""
    with _snapshot_follower(tmp_path, flex=False) as f:
        _deposed_leader_log(f)
        _send_snapshot(f, last=(20, 2), commit=20, term=2, finish=False)
        f.obj.doTick(0)
        assert f.commit_index == 6 and f.obj.raftLastApplied == 6, \
            "stock PySyncObj no longer commits on a chunk: re-check the override"


def test_flex_snapshot_chunks_do_not_commit_an_unverified_log(tmp_path: Any) -> None:
    with _snapshot_follower(tmp_path, flex=True) as f:
        _deposed_leader_log(f)
        _send_snapshot(f, last=(20, 2), commit=20, term=2, finish=False)
        f.obj.doTick(0)
        assert f.commit_index == 3 and f.obj.raftLastApplied == 3
        assert f.obj.raftCurrentTerm == 2          # the leader/term bookkeeping still ran
        # The last chunk installs the snapshot; the commit index follows it.
        _chunk(f, b"", first=False, last=True, commit=20, term=2)
        f.obj.doTick(0)
        assert f.log == [(19, 2), (20, 2)] and f.obj.raftLastApplied == 20
        assert f.commit_index == 20
