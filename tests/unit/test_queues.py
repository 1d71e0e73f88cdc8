"""Queues in the state machine: every transition, ordering, time, dedupe, dead letters,
stale leases, snapshots with leases in flight, and determinism under random commands."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from flexcore.statemachine import Command, Ok, Result, StateMachine
from flexcore.statemachine.queues import DEFAULT_MAX_DELIVERIES, QueueStore
from tests.support.machine import MachineDriver


class Q(MachineDriver):
    """A state machine plus a settable proposer clock (ms)."""

    def put(self, body: Any, queue: str = "q", **extra: Any) -> str:
        value = self.ok("queue.enqueue", {"queue": queue, "messages": [{"body": body, **extra}]})
        return str(value["ids"][0])

    def lease(self, queue: str = "q", n: int = 1, **extra: Any) -> list[dict[str, Any]]:
        value = self.ok("queue.lease", {"queue": queue, "consumer": "c", "max": n, **extra})
        return list(value["messages"])

    def bodies(self, queue: str = "q", n: int = 100) -> list[Any]:
        return [m["body"] for m in self.lease(queue, n)]

    def ack(self, lease_id: str, queue: str = "q") -> dict[str, Any]:
        return self.ok("queue.ack", {"queue": queue, "lease_id": lease_id})

    def nack(self, lease_id: str, queue: str = "q", **extra: Any) -> dict[str, Any]:
        return self.ok("queue.nack", {"queue": queue, "lease_id": lease_id, **extra})

    def stats(self, queue: str = "q") -> dict[str, Any]:
        info = self.sm.component("queues").info(queue)
        assert info is not None
        return dict(info)


# --- enqueue, lease, ack ------------------------------------------------------------

def test_enqueue_lease_ack_removes() -> None:
    q = Q()
    mid = q.put({"to": "a@b"})
    assert q.stats()["ready"] == 1
    [m] = q.lease(visibility_ms=5000)
    assert m["id"] == mid and m["body"] == {"to": "a@b"} and m["attempt"] == 1
    assert m["expires_at"] == q.now + 5000 and m["lease_id"].startswith(mid + ".")
    assert q.stats()["leased"] == 1 and q.stats()["ready"] == 0
    assert q.lease() == []
    assert q.ack(m["lease_id"]) == {"id": mid}
    s = q.stats()
    assert (s["ready"], s["leased"], s["delayed"], s["dead"]) == (0, 0, 0, 0)
    assert s["totals"]["enqueued"] == 1 and s["totals"]["acked"] == 1


def test_lease_of_unknown_queue_is_empty_and_creates_nothing() -> None:
    q = Q()
    assert q.lease("nobody") == []
    assert q.sm.component("queues").info("nobody") is None
    assert q.sm.component("queues").list_stats() == {}


def test_fifo_within_priority_and_priority_across() -> None:
    q = Q()
    for i in range(5):
        q.put(f"low{i}")
    q.put("high0", priority=10)
    q.put("mid0", priority=5)
    q.put("high1", priority=10)
    q.put("neg", priority=-3)
    assert q.bodies() == ["high0", "high1", "mid0", "low0", "low1", "low2", "low3",
                          "low4", "neg"]


def test_lease_max_takes_a_prefix_in_order() -> None:
    q = Q()
    for i in range(10):
        q.put(i)
    assert [m["body"] for m in q.lease(n=3)] == [0, 1, 2]
    assert [m["body"] for m in q.lease(n=3)] == [3, 4, 5]
    assert q.stats()["leased"] == 6 and q.stats()["ready"] == 4


# --- time: delays, expiry ---------------------------------------------------------------

def test_delay_and_deliver_at() -> None:
    q = Q()
    q.put("later", delay_ms=1000)
    q.put("at", deliver_at=q.now + 500)
    q.put("past", deliver_at=q.now - 500)
    assert q.stats()["delayed"] == 2 and q.stats()["ready"] == 1
    assert q.bodies() == ["past"]
    q.now += 499
    assert q.bodies() == []
    q.now += 1
    assert q.bodies() == ["at"]
    q.now += 500
    assert q.bodies() == ["later"]
    assert q.sm.component("queues").wake_hint("q") == (0, q.now - 1000 + 30_000)  # "past"


def test_time_comes_from_commands_and_stays_monotonic() -> None:
    q = Q()
    q.put("x", delay_ms=1000)
    q.now += 2000
    q.ok("noop", {})                     # the machine has seen t+2000
    q.now -= 2000                         # a proposer with a clock behind
    assert q.bodies() == ["x"]            # effective time is still t+2000


def test_expired_lease_redelivers_with_attempt_counted() -> None:
    q = Q()
    mid = q.put("job")
    [first] = q.lease(visibility_ms=1000)
    q.now += 999
    assert q.lease() == []
    q.now += 1
    [second] = q.lease(visibility_ms=1000)
    assert second["id"] == mid and second["attempt"] == 2
    assert second["lease_id"] != first["lease_id"]
    assert q.stats()["totals"]["expired"] == 1


def test_stale_leases_are_rejected_and_change_nothing() -> None:
    q = Q()
    q.put("job")
    [first] = q.lease(visibility_ms=1000)
    q.now += 1000
    # Expired (even before any other command noticed it).
    q.err("queue.ack", {"queue": "q", "lease_id": first["lease_id"]}, "lease_expired")
    [second] = q.lease(visibility_ms=1000)
    # A late ack of attempt 1 must never ack attempt 2.
    q.err("queue.ack", {"queue": "q", "lease_id": first["lease_id"]}, "lease_expired")
    q.err("queue.nack", {"queue": "q", "lease_id": first["lease_id"]}, "lease_expired")
    assert q.stats()["leased"] == 1
    q.ack(second["lease_id"])
    # Already acked; unknown; wrong queue.
    q.err("queue.ack", {"queue": "q", "lease_id": second["lease_id"]}, "lease_expired")
    q.err("queue.ack", {"queue": "q", "lease_id": "nope"}, "lease_expired")
    q.put("other", queue="r")
    [m] = q.lease("r")
    q.err("queue.ack", {"queue": "q", "lease_id": m["lease_id"]}, "lease_expired")
    before = q.sm.component("queues").to_snapshot()
    q.err("queue.nack", {"queue": "r", "lease_id": "gone"}, "lease_expired")
    assert q.sm.component("queues").to_snapshot() == before


def test_a_repeated_ack_or_nack_is_told_apart_from_an_expired_lease(monkeypatch: Any) -> None:
    """Still 409 lease_expired and no change, but the message says whether the lease
    was already acked / nacked (the first try committed) or expired (it did not)."""
    q = Q()
    q.put("a")
    q.put("b")
    [a, b] = q.lease(n=2, visibility_ms=1000)
    q.ack(a["lease_id"])
    q.nack(b["lease_id"])
    before = q.sm.component("queues").to_snapshot()
    for kind in ("queue.ack", "queue.nack", "queue.extend"):
        msg = q.err(kind, {"queue": "q", "lease_id": a["lease_id"]}, "lease_expired")
        assert msg.startswith("lease already acked"), msg
        msg = q.err(kind, {"queue": "q", "lease_id": b["lease_id"]}, "lease_expired")
        assert msg.startswith("lease already nacked"), msg
    assert q.sm.component("queues").to_snapshot() == before
    [b2] = q.lease(visibility_ms=1000)
    q.now += 1000
    msg = q.err("queue.ack", {"queue": "q", "lease_id": b2["lease_id"]}, "lease_expired")
    assert "not current" in msg and "already" not in msg, msg
    # The memory survives a snapshot, in order, and is bounded (oldest forgotten).
    restored = QueueStore.from_snapshot(q.sm.component("queues").to_snapshot())
    assert restored.to_snapshot() == q.sm.component("queues").to_snapshot()
    assert restored.to_snapshot()["settled"] == [[a["lease_id"], 1], [b["lease_id"], 2]]
    monkeypatch.setattr("flexcore.statemachine.queues.MAX_SETTLED", 2)
    q.now += 1
    [b3] = q.lease(visibility_ms=1000)
    q.ack(b3["lease_id"])
    assert [k for k, _ in q.sm.component("queues").to_snapshot()["settled"]] == \
        [b["lease_id"], b3["lease_id"]]
    msg = q.err("queue.ack", {"queue": "q", "lease_id": a["lease_id"]}, "lease_expired")
    assert "not current" in msg, msg


def test_extend_keeps_the_lease_and_moves_its_expiry() -> None:
    q = Q()
    mid = q.put("long job")
    [m] = q.lease(visibility_ms=1000)
    q.now += 900
    out = q.ok("queue.extend", {"queue": "q", "lease_id": m["lease_id"],
                                "visibility_ms": 5000})
    assert out == {"id": mid, "lease_id": m["lease_id"], "expires_at": q.now + 5000}
    q.now += 4000          # past the first expiry, before the new one
    assert q.lease() == []
    assert q.stats()["leased"] == 1 and q.stats()["totals"]["expired"] == 0
    # Without visibility_ms: the queue's default; it may also shorten the lease.
    q.ok("queue.configure", {"queue": "q", "options": {"visibility_ms": 2000}})
    out = q.ok("queue.extend", {"queue": "q", "lease_id": m["lease_id"]})
    assert out["expires_at"] == q.now + 2000
    out = q.ok("queue.extend", {"queue": "q", "lease_id": m["lease_id"],
                                "visibility_ms": 100})
    assert out["expires_at"] == q.now + 100
    # Same lease, same attempt: it still acks.
    assert q.ack(m["lease_id"]) == {"id": mid}
    assert q.stats()["totals"]["acked"] == 1 and q.stats()["totals"]["leased"] == 1


def test_extend_of_a_stale_lease_is_refused_and_changes_nothing() -> None:
    q = Q()
    q.put("job")
    [first] = q.lease(visibility_ms=1000)
    q.now += 1000
    snap = q.sm.component("queues").to_snapshot()
    q.err("queue.extend", {"queue": "q", "lease_id": first["lease_id"]}, "lease_expired")
    assert q.sm.component("queues").to_snapshot() == snap
    [second] = q.lease(visibility_ms=1000)
    assert second["attempt"] == 2
    q.err("queue.extend", {"queue": "q", "lease_id": first["lease_id"]}, "lease_expired")
    q.ack(second["lease_id"])
    q.err("queue.extend", {"queue": "q", "lease_id": second["lease_id"]}, "lease_expired")
    q.err("queue.extend", {"queue": "nope", "lease_id": "1.1"}, "lease_expired")


def test_extended_lease_survives_a_snapshot() -> None:
    q = Q()
    q.put("a")
    q.put("b")
    leases = q.lease(n=2, visibility_ms=1000)
    q.ok("queue.extend", {"queue": "q", "lease_id": leases[0]["lease_id"],
                          "visibility_ms": 10_000})
    restored = StateMachine()
    restored.restore(q.sm.snapshot())
    assert restored.snapshot() == q.sm.snapshot()
    q.sm = restored
    q.now += 2000          # b's lease expired, a's was extended
    [again] = q.lease(n=2)
    assert again["body"] == "b" and again["attempt"] == 2
    q.ack(leases[0]["lease_id"])


def test_refused_ack_changes_no_state() -> None:
    q = Q()
    q.put("job")
    q.lease(visibility_ms=1000)
    q.now += 5000
    snap = q.sm.component("queues").to_snapshot()
    q.err("queue.ack", {"queue": "q", "lease_id": "1.999"}, "lease_expired")
    assert q.sm.component("queues").to_snapshot() == snap   # expiry not even applied


# --- nack ----------------------------------------------------------------------------

def test_nack_requeues_now_at_its_place_in_line() -> None:
    q = Q()
    for body in ("a", "b", "c"):
        q.put(body)
    [a] = q.lease()
    assert q.nack(a["lease_id"], error="boom") == {"id": a["id"], "state": "ready"}
    [again] = q.lease()
    assert again["body"] == "a" and again["attempt"] == 2


def test_nack_with_delay() -> None:
    q = Q()
    q.put("a")
    q.put("b")
    [a] = q.lease()
    assert q.nack(a["lease_id"], delay_ms=1000)["state"] == "delayed"
    assert q.stats()["delayed"] == 1
    assert q.bodies() == ["b"]
    q.now += 1000
    [m] = q.lease()
    assert m["body"] == "a" and m["attempt"] == 2


def test_max_deliveries_moves_to_dead_letters_with_last_error() -> None:
    q = Q()
    q.ok("queue.configure", {"queue": "q", "options": {"max_deliveries": 3}})
    mid = q.put({"n": 1})
    for attempt in (1, 2, 3):
        [m] = q.lease()
        assert m["attempt"] == attempt
        state = q.nack(m["lease_id"], error=f"fail {attempt}")["state"]
        assert state == ("dead" if attempt == 3 else "ready")
    assert q.lease() == []
    s = q.stats()
    assert (s["ready"], s["dead"], s["totals"]["dead_lettered"]) == (0, 1, 1)
    [dead] = q.sm.component("queues").dead("q", 10)
    assert dead["id"] == mid and dead["error"] == "fail 3" and dead["attempt"] == 3
    assert dead["body"] == {"n": 1} and dead["died_at"] == q.now


def test_dead_letters_are_capped_oldest_first_and_counted() -> None:
    q = Q()
    q.ok("queue.configure", {"queue": "q", "options": {"max_deliveries": 1, "max_dead": 3}})
    for n in range(5):
        q.put(n)
    for m in q.lease(n=5):
        assert q.nack(m["lease_id"], error=f"e{m['body']}")["state"] == "dead"
    store = q.sm.component("queues")
    assert [d["body"] for d in store.dead("q", 10)] == [2, 3, 4]   # 0 and 1 dropped
    s = q.stats()
    assert (s["dead"], s["totals"]["dead_lettered"], s["totals"]["dead_dropped"]) == (3, 5, 2)
    # Lowering the cap trims at once; every message is still accounted for.
    q.ok("queue.configure", {"queue": "q", "options": {"max_dead": 1}})
    assert [d["body"] for d in store.dead("q", 10)] == [4]
    assert q.stats()["totals"]["dead_dropped"] == 4
    q.err("queue.configure", {"queue": "q", "options": {"max_dead": 0}}, "invalid")


def test_a_snapshot_from_before_max_dead_restores_with_the_defaults() -> None:
    q = Q()
    q.put("a")
    snap = q.sm.component("queues").to_snapshot()
    [raw] = snap["queues"]
    raw["options"], raw["totals"] = raw["options"][:3], raw["totals"][:-1]
    del snap["settled"]   # also from before the settled-lease memory
    restored = QueueStore.from_snapshot(snap)
    info = restored.info("q")
    assert info is not None
    assert info["options"]["max_dead"] == 10_000 and info["totals"]["dead_dropped"] == 0
    assert restored.to_snapshot()["settled"] == []
    assert info["ready"] == 1 and info["totals"]["enqueued"] == 1


def test_expiry_on_the_last_delivery_dead_letters() -> None:
    q = Q()
    q.ok("queue.configure", {"queue": "q", "options": {"max_deliveries": 2,
                                                       "visibility_ms": 1000}})
    q.put("slow")
    for _ in range(2):
        assert q.lease()
        q.now += 1000
    assert q.lease() == []
    [dead] = q.sm.component("queues").dead("q", 10)
    assert "lease expired" in dead["error"]


def test_default_max_deliveries_is_20() -> None:
    q = Q()
    q.put("x")
    for _ in range(DEFAULT_MAX_DELIVERIES):
        [m] = q.lease()
        q.nack(m["lease_id"])
    assert q.stats()["dead"] == 1 and q.stats()["options"]["max_deliveries"] == 20


def test_redrive_and_purge_dead() -> None:
    q = Q()
    q.ok("queue.configure", {"queue": "q", "options": {"max_deliveries": 1}})
    for body in ("a", "b", "c"):
        q.put(body)
    q.put("z")
    for _ in range(3):
        [m] = q.lease()
        q.nack(m["lease_id"], error="x")
    assert q.stats()["dead"] == 3
    assert q.ok("queue.redrive", {"queue": "q", "max": 2})["redriven"] == 2
    # Redriven letters join the end of the line with attempts reset.
    out = q.lease(n=10)
    assert [(m["body"], m["attempt"]) for m in out] == [("z", 1), ("a", 1), ("b", 1)]
    assert q.ok("queue.purge", {"queue": "q", "dead": True}) == {"purged": 1}
    assert q.stats()["dead"] == 0
    q.err("queue.redrive", {"queue": "nope"}, "not_found")


# --- dedupe ------------------------------------------------------------------------------

def test_dedup_window() -> None:
    q = Q()
    q.ok("queue.configure", {"queue": "q", "options": {"dedup_window_ms": 10_000}})
    first = q.ok("queue.enqueue", {"queue": "q", "messages": [{"body": 1, "dedup_id": "d"}]})
    q.now += 9_999
    again = q.ok("queue.enqueue", {"queue": "q", "messages": [
        {"body": 2, "dedup_id": "d"}, {"body": 3, "dedup_id": "e"}, {"body": 4,
                                                                    "dedup_id": "e"}]})
    assert again["ids"][0] == first["ids"][0] and again["duplicates"] == [True, False, True]
    assert again["ids"][1] == again["ids"][2]
    assert q.stats()["ready"] == 2
    # Even after the original was acked, a repeat within the window adds nothing.
    for m in q.lease(n=5):
        q.ack(m["lease_id"])
    assert q.ok("queue.enqueue", {"queue": "q", "messages": [
        {"body": 5, "dedup_id": "d"}]})["duplicates"] == [True]
    q.now += 1
    third = q.ok("queue.enqueue", {"queue": "q", "messages": [{"body": 6, "dedup_id": "d"}]})
    assert third["duplicates"] == [False] and third["ids"][0] != first["ids"][0]
    assert q.bodies() == [6]


# --- purge, configure, stats, validation ------------------------------------------------

def test_purge_keeps_leased_messages() -> None:
    q = Q()
    for i in range(4):
        q.put(i)
    q.put("d", delay_ms=100)
    [m] = q.lease()
    assert q.ok("queue.purge", {"queue": "q"}) == {"purged": 4}
    assert q.stats()["leased"] == 1 and q.stats()["ready"] == 0
    q.ack(m["lease_id"])
    q.now += 100
    assert q.lease() == []
    q.err("queue.purge", {"queue": "nope"}, "not_found")


def test_configure_creates_and_reports_options() -> None:
    q = Q()
    value = q.ok("queue.configure", {"queue": "jobs", "options": {"visibility_ms": 2000}})
    assert value["options"] == {"visibility_ms": 2000, "max_deliveries": 20,
                                "dedup_window_ms": 300_000, "max_dead": 10_000}
    assert q.sm.component("queues").list_stats() == {
        "jobs": {"ready": 0, "leased": 0, "delayed": 0, "dead": 0}}
    q.put("x", queue="jobs")
    [m] = q.lease("jobs")
    assert m["expires_at"] == q.now + 2000


def test_invalid_bodies_name_the_field() -> None:
    q = Q()
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("queue.enqueue", {"queue": "bad name", "messages": [{"body": 1}]}, "body.queue"),
        ("queue.enqueue", {"queue": "q", "messages": []}, "body.messages"),
        ("queue.enqueue", {"queue": "q", "messages": [{"body": 1, "priority": 5000}]},
         "priority"),
        ("queue.enqueue", {"queue": "q", "messages": [{"body": 1, "delay_ms": 1,
                                                      "deliver_at": 1}]}, "not both"),
        ("queue.enqueue", {"queue": "q", "messages": [{"nobody": 1}]}, "body is required"),
        ("queue.lease", {"queue": "q", "consumer": "c", "max": 0}, "body.max"),
        ("queue.lease", {"queue": "q", "consumer": "c", "visibility_ms": 5}, "visibility_ms"),
        ("queue.lease", {"queue": "q"}, "body.consumer"),
        ("queue.nack", {"queue": "q", "lease_id": "x", "delay_ms": -1}, "delay_ms"),
        ("queue.extend", {"queue": "q", "lease_id": "x", "visibility_ms": 5}, "visibility_ms"),
        ("queue.extend", {"queue": "q"}, "lease_id"),
        ("queue.extend", {"queue": "q", "lease_id": "x", "delay_ms": 5}, "unknown field"),
        ("queue.configure", {"queue": "q", "options": {"max_deliveries": 0}},
         "max_deliveries"),
        ("queue.configure", {"queue": "q", "options": {"other": 1}}, "unknown field"),
        ("queue.purge", {"queue": "q", "dead": "yes"}, "body.dead"),
    ]
    for type_, body, fragment in cases:
        assert fragment in q.err(type_, body, "invalid"), (type_, body)
    # A bad message anywhere in a batch enqueues none of it.
    q.err("queue.enqueue", {"queue": "q", "messages": [{"body": 1}, {"body": 2,
                                                                     "priority": "hi"}]},
          "invalid")
    assert q.sm.component("queues").info("q") is None


def test_wake_hint_reports_ready_and_next_due() -> None:
    q = Q()
    store = q.sm.component("queues")
    assert store.wake_hint("q") == (0, None)
    q.put("a", delay_ms=700)
    assert store.wake_hint("q") == (0, q.now + 700)
    q.put("b")
    q.lease(visibility_ms=300)
    assert store.wake_hint("q") == (0, q.now + 300)
    q.put("c")
    assert store.wake_hint("q") == (1, q.now + 300)


# --- snapshots ----------------------------------------------------------------------------

def _busy(q: Q) -> dict[str, str]:
    """A queue with ready, delayed, leased, dead and deduped messages."""
    q.ok("queue.configure", {"queue": "q", "options": {"max_deliveries": 1}})
    for i in range(6):
        q.put({"i": i}, priority=i % 2, dedup_id=f"d{i}")
    q.put("later", delay_ms=5000)
    leased = q.lease(n=2, visibility_ms=3000)
    [dead] = q.lease()
    q.nack(dead["lease_id"], error="bad")
    q.put("other", queue="r")
    return {"l0": leased[0]["lease_id"], "l1": leased[1]["lease_id"]}


def test_snapshot_round_trip_with_leases_in_flight() -> None:
    q = Q()
    leases = _busy(q)
    snap = q.sm.snapshot()
    restored = StateMachine()
    restored.restore(snap)
    assert restored.snapshot() == snap
    r = Q()
    r.sm, r.now = restored, q.now
    # Both machines continue identically: leases still ackable, expiry, order, dedupe.
    for machine in (q, r):
        machine.ack(leases["l0"])
        machine.now += 3000
        machine.err("queue.ack", {"queue": "q", "lease_id": leases["l1"]}, "lease_expired")
        machine.now += 2000
        out = machine.lease(n=10)
        assert [m["attempt"] for m in out].count(2) == 0   # max_deliveries 1: l1 died
        assert machine.ok("queue.enqueue", {"queue": "q", "messages": [
            {"body": 0, "dedup_id": "d3"}]})["duplicates"] == [True]
    # (whole snapshots differ only in applied_index: these commands had other indexes)
    assert q.sm.component("queues").to_snapshot() == r.sm.component("queues").to_snapshot()
    assert q.stats() == r.stats()


def test_bad_queue_snapshots_are_refused() -> None:
    good = QueueStore()
    for bad in (None, {"next_seq": 1}, {"next_seq": "1", "next_lease": 1, "queues": []},
                {"next_seq": 1, "next_lease": 1, "queues": [{"name": "bad name"}]},
                *({"next_seq": 1, "next_lease": 1, "queues": [], "settled": bad_settled}
                  for bad_settled in ("x", [["l.1", 3]], [["l.1", True]], [["l.1"]],
                                      [["l.1", 1], ["l.1", 2]], [[1, 1]])),
                {"next_seq": 1, "next_lease": 1, "queues": [], "other": []}):
        try:
            QueueStore.from_snapshot(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")
    assert QueueStore.from_snapshot(good.to_snapshot()).to_snapshot() == good.to_snapshot()


def test_snapshot_of_100k_messages_is_reasonable() -> None:
    import time
    q = Q()
    for start in range(0, 100_000, 1000):
        q.ok("queue.enqueue", {"queue": "big", "messages": [
            {"body": {"n": n}, "priority": n % 3} for n in range(start, start + 1000)]})
    t0 = time.perf_counter()
    first = q.lease("big", 100)
    assert [m["body"]["n"] for m in first[:3]] == [2, 5, 8]
    lease_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    snap = q.sm.snapshot()
    restored = StateMachine()
    restored.restore(snap)
    elapsed = time.perf_counter() - t0
    assert restored.snapshot() == snap
    assert len(snap) < 100_000 * 40
    assert elapsed < 5.0 and lease_s < 0.5, (elapsed, lease_s)


# --- determinism under random commands ------------------------------------------------------

_ops = st.lists(st.tuples(st.sampled_from(["put", "putd", "lease", "ack", "nack", "nackd",
                                           "tick", "purge", "redrive", "stale", "extend"]),
                          st.integers(0, 10)), max_size=60)


@settings(max_examples=60, deadline=None)
@given(_ops)
def test_random_commands_snapshot_and_replay_identically(ops: list[tuple[str, int]]) -> None:
    """A machine restored mid-way ends byte-identical to one that never snapshotted, and
    the counts always match the messages (no message lost or duplicated)."""
    cmds: list[Command] = []
    q = Q()
    q.ok("queue.configure", {"queue": "q", "options": {"max_deliveries": 3,
                                                       "visibility_ms": 1000,
                                                       "max_dead": 4}})
    leases: list[str] = []
    rng = random.Random(len(ops))

    def do(type_: str, body: dict[str, Any]) -> Result:
        cmds.append(Command(type_, body, q.now))
        return q.run(type_, body)

    for op, n in ops:
        if op in ("put", "putd"):
            extra = {"delay_ms": 100 * n} if op == "putd" else {"priority": n % 3}
            do("queue.enqueue", {"queue": "q", "messages": [{"body": n, **extra,
                                                             "dedup_id": f"k{n}"}]})
        elif op == "lease":
            res = do("queue.lease", {"queue": "q", "consumer": "c", "max": n % 3 + 1})
            assert isinstance(res, Ok)
            leases += [m["lease_id"] for m in res.value["messages"]]
        elif op in ("ack", "nack", "nackd", "stale") and leases:
            lease_id = leases.pop(rng.randrange(len(leases))) if op != "stale" else leases[0]
            body: dict[str, Any] = {"queue": "q", "lease_id": lease_id}
            if op == "nackd":
                body["delay_ms"] = 50 * n
            do("queue.ack" if op in ("ack", "stale") else "queue.nack", body)
        elif op == "extend" and leases:
            do("queue.extend", {"queue": "q", "lease_id": leases[n % len(leases)],
                                "visibility_ms": 100 + 200 * n})
        elif op == "tick":
            q.now += 150 * n
        elif op == "purge":
            do("queue.purge", {"queue": "q", "dead": n % 2 == 0})
        elif op == "redrive":
            do("queue.redrive", {"queue": "q", "max": n + 1})
        info = q.stats()
        totals = info["totals"]
        live = info["ready"] + info["leased"] + info["delayed"]
        # Every message enqueued is in exactly one place: live, acked, dead (kept or
        # dropped past max_dead) or purged.
        assert totals["enqueued"] == (live + totals["acked"] + info["dead"]
                                      + totals["dead_dropped"] + totals["purged"])
    # Replay: from scratch, and from a snapshot taken half-way.
    half = len(cmds) // 2
    a, b = StateMachine(), StateMachine()
    for i, cmd in enumerate(cmds[:half]):
        a.apply(cmd, i + 1)
        b.apply(cmd, i + 1)
    c = StateMachine()
    c.restore(b.snapshot())
    for i, cmd in enumerate(cmds[half:], start=half):
        assert a.apply(cmd, i + 1) == c.apply(cmd, i + 1)
    assert a.snapshot() == c.snapshot()
