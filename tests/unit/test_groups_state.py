"""Consumer groups in the state machine: deterministic sticky assignment, rebalancing on
join / leave / heartbeat expiry, cooperative hand-off, fencing, dead letters, redrive,
partition lag, and snapshots."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from flexcore.statemachine import Command, Err, StateMachine
from flexcore.statemachine.events import backlog_counts, event_partition
from flexcore.statemachine.groups import ConsumerGroups
from tests.support.machine import MachineDriver


class G(MachineDriver):
    """A state machine plus a settable proposer clock (ms)."""

    @property
    def store(self) -> ConsumerGroups:
        store = self.sm.component("groups")
        assert isinstance(store, ConsumerGroups)
        return store

    def join(self, node: str, group: str = "g", **extra: Any) -> dict[str, Any]:
        return self.ok("group.join", {"group": group, "node": node, **extra})

    def view(self, group: str = "g") -> dict[str, Any]:
        view = self.store.view(group)
        assert view is not None
        return view

    def owners(self, group: str = "g") -> list[str | None]:
        return [a["owner"] for a in self.view(group)["assignment"]]

    def targets(self, group: str = "g") -> list[str | None]:
        return [a["target"] for a in self.view(group)["assignment"]]

    def release_all(self, group: str = "g") -> None:
        """Every owner releases its revoked partitions (what the runners do)."""
        for a in self.view(group)["assignment"]:
            if a["owner"] is not None and a["owner"] != a["target"]:
                self.ok("group.release", {"group": group, "node": a["owner"],
                                          "partition": a["partition"], "epoch": a["epoch"]})

    def epoch(self, p: int, group: str = "g") -> int:
        return int(self.view(group)["assignment"][p]["epoch"])


def test_first_member_owns_everything_then_balanced_sticky_rebalance() -> None:
    g = G()
    out = g.join("a", partitions=8)
    assert out["owned"] == list(range(8)) and g.owners() == ["a"] * 8
    g.join("b")
    # b is the target of half, but a still owns them until it releases (cooperative).
    assert Counter(g.targets()) == {"a": 4, "b": 4}
    assert g.owners() == ["a"] * 8
    kept = [p for p, t in enumerate(g.targets()) if t == "a"]
    g.release_all()
    assert g.owners() == g.targets()
    g.join("c")
    assert sorted(Counter(g.targets()).values()) == [2, 3, 3]
    # Sticky: a partition moves only away from an over-quota member.
    assert all(g.targets()[p] in ("a", "c") for p in kept)
    g.release_all()
    assert g.owners() == g.targets()
    # Heartbeats do not move anything.
    before = g.view()
    g.now += 100
    g.join("a")
    assert g.view()["assignment"] == before["assignment"]


def test_assignment_is_a_function_of_the_committed_commands() -> None:
    rng = random.Random(7)
    script: list[tuple[int, str, dict[str, Any]]] = []
    now = 1_000_000
    for _ in range(200):
        now += rng.randrange(0, 4000)
        node = f"n{rng.randrange(5)}"
        kind = rng.choice(["group.join", "group.join", "group.leave"])
        script.append((now, kind, {"group": "g", "node": node, "session_ms": 5000}))
    machines = [StateMachine(), StateMachine()]
    for sm in machines:
        for i, (ts, kind, body) in enumerate(script, 1):
            sm.apply(Command(kind, body, ts), i)
    assert machines[0].snapshot() == machines[1].snapshot()
    restored = StateMachine()
    restored.restore(machines[0].snapshot())
    assert restored.snapshot() == machines[0].snapshot()


def test_leaving_or_expired_owner_hands_over_at_once_and_bumps_epochs() -> None:
    g = G()
    g.join("a", partitions=4, session_ms=3000)
    g.join("b")
    g.release_all()
    b_parts = [p for p, o in enumerate(g.owners()) if o == "b"]
    epochs = {p: g.epoch(p) for p in b_parts}
    g.ok("group.leave", {"group": "g", "node": "b"})
    assert g.owners() == ["a"] * 4
    assert all(g.epoch(p) > epochs[p] for p in b_parts)
    # Expiry: c joins, then stops heartbeating; a heartbeats every second and the
    # heartbeat that finds c silent for 3 s drops it.
    g.join("c")
    g.release_all()
    assert "c" in g.owners()
    for _ in range(2):
        g.now += 1000
        g.join("a")
    assert "c" in g.view()["members"]
    g.now += 1000
    g.join("a")
    assert g.view()["members"] == ["a"] and g.owners() == ["a"] * 4
    assert g.view()["totals"]["expired"] == 1


def test_a_silence_of_the_whole_group_does_not_expire_its_members() -> None:
    """Nothing committed for a minute (no quorum): the first heartbeat afterwards must
    not expire the members that could not heartbeat either."""
    g = G()
    g.join("a", partitions=4, session_ms=3000)
    g.join("b")
    g.now += 60_000
    g.join("a")
    assert g.view()["members"] == ["a", "b"]
    # b really is gone: a session of a's heartbeats later it is dropped.
    for _ in range(3):
        g.now += 1000
        g.join("a")
    assert g.view()["members"] == ["a"]


def test_commit_and_release_are_fenced_by_owner_and_epoch() -> None:
    g = G()
    g.join("a", partitions=2)
    e0 = g.epoch(0)
    assert g.ok("group.commit", {"group": "g", "node": "a", "partition": 0, "epoch": e0,
                                 "offset": 5}) == {"committed": 5}
    # Never backwards.
    assert g.ok("group.commit", {"group": "g", "node": "a", "partition": 0, "epoch": e0,
                                 "offset": 3}) == {"committed": 5}
    g.err("group.commit", {"group": "g", "node": "b", "partition": 0, "epoch": e0,
                           "offset": 9}, "not_owner")
    g.err("group.commit", {"group": "g", "node": "a", "partition": 0, "epoch": e0 + 7,
                           "offset": 9}, "stale_epoch")
    g.join("b")
    moving = next(p for p, t in enumerate(g.targets()) if t == "b")
    e = g.epoch(moving)
    # Still a's until released: a may flush its progress first.
    g.ok("group.commit", {"group": "g", "node": "a", "partition": moving, "epoch": e,
                          "offset": 6})
    g.err("group.commit", {"group": "g", "node": "b", "partition": moving, "epoch": e,
                           "offset": 7}, "not_owner")
    out = g.ok("group.release", {"group": "g", "node": "a", "partition": moving, "epoch": e})
    assert out["owner"] == "b" and out["epoch"] > e
    # The old owner is fenced off now, with either epoch.
    for epoch in (e, out["epoch"]):
        g.err("group.commit", {"group": "g", "node": "a", "partition": moving,
                               "epoch": epoch, "offset": 99}, "not_owner")
    g.err("group.release", {"group": "g", "node": "a", "partition": moving, "epoch": e},
          "not_owner")
    assert (g.store.committed("g") or [])[moving] == 6
    assert g.store.owned("g", "b") == [(moving, out["epoch"], 6, False, ())]
    g.err("group.commit", {"group": "nope", "node": "a", "partition": 0, "epoch": 1},
          "not_found")
    g.err("group.commit", {"group": "g", "node": "a", "partition": 2, "epoch": 1},
          "invalid")


def _dead(offset: int, error: str = "boom") -> dict[str, Any]:
    return {"offset": offset, "id": f"e{offset}", "type": "t", "key": None,
            "handler": "h", "error": error, "attempts": 3}


def test_dead_letters_redrive_and_completion() -> None:
    g = G()
    g.join("a", partitions=1)
    e = g.epoch(0)
    g.ok("group.commit", {"group": "g", "node": "a", "partition": 0, "epoch": e,
                          "offset": 4, "dead": [_dead(2), _dead(4)]})
    dead = g.store.dead("g", 10)
    assert dead is not None and [d["offset"] for d in dead] == [2, 4]
    assert dead[0]["partition"] == 0 and dead[0]["dead_ms"] == g.now
    assert g.ok("group.redrive", {"group": "g", "max": 1}) == {"redriven": 1,
                                                                "offsets": [2]}
    assert g.store.owned("g", "a") == [(0, e, 4, False, (2,))]
    g.ok("group.redrive", {"group": "g"})
    assert g.store.owned("g", "a")[0][4] == (2, 4)
    assert g.store.dead("g", 10) == []
    # The owner handled 2 (ok) and gave up on 4 again.
    g.ok("group.commit", {"group": "g", "node": "a", "partition": 0, "epoch": e,
                          "redriven": [2, 4], "dead": [_dead(4, "again")]})
    assert g.store.owned("g", "a")[0][4] == ()
    dead = g.store.dead("g", 10)
    assert dead is not None and [(d["offset"], d["error"]) for d in dead] == [(4, "again")]
    totals = g.view()["totals"]
    assert (totals["dead_lettered"], totals["redriven"]) == (3, 2)
    g.err("group.redrive", {"group": "nope"}, "not_found")


def test_bad_bodies_change_nothing() -> None:
    g = G()
    before = g.sm.snapshot()
    for body in ({"group": "bad name", "node": "a"}, {"group": "g"},
                 {"group": "g", "node": "a", "partitions": 0},
                 {"group": "g", "node": "a", "session_ms": 1},
                 {"group": "g", "node": "a", "extra": 1}):
        assert isinstance(g.run("group.join", body), Err)
    assert g.sm.snapshot().split(b"groups")[1] == before.split(b"groups")[1]
    g.join("a", partitions=1)
    e = g.epoch(0)
    snap = g.sm.snapshot()
    g.err("group.commit", {"group": "g", "node": "a", "partition": 0, "epoch": e,
                           "offset": 3, "dead": [{"offset": 1}]}, "invalid")
    assert g.store.committed("g") == [0]
    assert g.sm.snapshot().split(b"groups")[1] == snap.split(b"groups")[1]


def test_snapshot_round_trip_keeps_behaviour() -> None:
    g = G()
    g.join("a", partitions=4, start_offset=10)
    g.join("b")
    g.release_all()
    e = g.epoch(0)
    owner0 = g.owners()[0]
    assert owner0 is not None
    g.ok("group.commit", {"group": "g", "node": owner0, "partition": 0, "epoch": e,
                          "offset": 12, "dead": [_dead(11)]})
    g.ok("group.redrive", {"group": "g"})
    copy = StateMachine()
    copy.restore(g.sm.snapshot())
    assert copy.snapshot() == g.sm.snapshot()
    for sm in (g.sm, copy):
        sm.apply(Command("group.join", {"group": "g", "node": "c"}, g.now + 1), 10_000)
        sm.apply(Command("group.commit", {"group": "g", "node": owner0, "partition": 0,
                                          "epoch": e, "offset": 13}, g.now + 2), 10_001)
    assert copy.snapshot() == g.sm.snapshot()
    view = copy.component("groups").view("g")
    assert view["assignment"][0]["committed"] == 13
    assert [a["committed"] for a in view["assignment"][1:]] == [10, 10, 10]


def test_partition_filter_and_backlog() -> None:
    g = G()
    keys = [f"k{i % 5}" for i in range(40)]
    g.ok("event.publish", {"events": [{"type": "t", "id": f"e{i}", "key": k,
                                       "payload": i} for i, k in enumerate(keys)]})
    g.ok("event.publish", {"events": [{"type": "t", "id": "nokey"}]})
    parts = [event_partition(k, "", 4) for k in keys] + [event_partition(None, "nokey", 4)]
    seen: list[int] = []
    for p in range(4):
        events, nxt = g.sm.read_events(0, 100, partition=(4, p))
        assert nxt == 41
        assert all(parts[e["offset"] - 1] == p for e in events)
        seen += [e["offset"] for e in events]
    assert sorted(seen) == list(range(1, 42))
    counts, exact = _lag(g.sm, [0, 0, 0, 0])
    assert exact and counts == [parts.count(p) for p in range(4)]
    counts, exact = _lag(g.sm, [41, 41, 41, 20], max_scan=5)
    assert not exact and sum(counts) <= 5


def _lag(sm: StateMachine, committed: list[int], max_scan: int = 100_000
         ) -> tuple[list[int], bool]:
    """A group's per-partition lag as GroupService computes it."""
    window, exact = sm.event_window(min(committed), max_scan)
    return backlog_counts(window, committed), exact


def test_event_window_is_a_copy_counted_after_the_lock() -> None:
    """Group listings copy the events above the committed offsets under the raft lock
    and count them after it: the copy must not change when the log moves on."""
    g = G()
    g.ok("event.publish", {"events": [{"type": "t", "id": f"e{i}", "key": f"k{i % 3}"}
                                      for i in range(30)]})
    window, exact = g.sm.event_window(10)
    assert exact and [e.offset for e in window] == list(range(11, 31))
    before = list(window)
    g.ok("event.publish", {"events": [{"type": "t", "id": f"late{i}"} for i in range(5)]})
    assert window == before
    committed = [10, 20, 25]
    # Counted against the log as it was: the five late events are not in the copy.
    assert sum(_lag(g.sm, committed)[0]) - sum(backlog_counts(window, committed)) \
        == sum(1 for i in range(5)
               if 31 + i > committed[event_partition(None, f"late{i}", 3)])
    window, exact = g.sm.event_window(0, max_scan=7)
    assert not exact and [e.offset for e in window] == list(range(1, 8))
