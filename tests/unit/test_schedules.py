"""Schedules in the state machine: ownership, claim fencing, history bounds, snapshots."""

from __future__ import annotations

from typing import Any

import pytest

from flexcore.statemachine import Result, StateMachine
from flexcore.statemachine.schedules import MAX_FIRES, MAX_OWNER_HISTORY, Schedules
from tests.support.machine import ok, refused, run

A, B, C = "10.0.0.1:7100", "10.0.0.2:7100", "10.0.0.3:7100"
EVENT = {"type": "event", "event_type": "tick", "payload": {"k": 1}}


def put(sm: StateMachine, sid: str = "s1", *, ts: int = 10_000, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"id": sid, "trigger": {"interval_ms": 1000}, "action": EVENT}
    body.update(extra)
    return ok(run(sm, "schedule.put", body, ts=ts))


def claim(sm: StateMachine, fire_time: int, *, node: str = A, term: int = 1,
          sid: str = "s1", manual: bool = False, ts: int = 20_000) -> Result:
    return run(sm, "schedule.claim", {"id": sid, "fire_time": fire_time, "node": node,
                                      "term": term, "manual": manual}, ts=ts)


def comp(sm: StateMachine) -> Schedules:
    part = sm.component("schedules")
    assert isinstance(part, Schedules)
    return part


@pytest.fixture
def sm() -> StateMachine:
    machine = StateMachine()
    put(machine)
    ok(run(machine, "schedule.own", {"node": A, "term": 1}))
    return machine


# --- claim rules ------------------------------------------------------------------------------

def test_first_claim_wins_and_a_repeat_is_refused(sm: StateMachine) -> None:
    assert ok(claim(sm, 11_000)) == {"id": "s1", "fire_time": 11_000, "manual": False,
                                     "term": 1}
    refused(claim(sm, 11_000), "already_claimed")
    # An older fire time is refused too: claims move forward (a high-water mark).
    refused(claim(sm, 10_500), "already_claimed")
    ok(claim(sm, 12_000))
    fires = comp(sm).fires("s1")
    assert fires is not None
    assert [(f["fire_time"], f["node"], f["term"], f["status"]) for f in fires] == \
        [(11_000, A, 1, "claimed"), (12_000, A, 1, "claimed")]


def test_claim_from_a_stale_term_is_refused_after_a_new_owner(sm: StateMachine) -> None:
    ok(claim(sm, 11_000))
    ok(run(sm, "schedule.own", {"node": B, "term": 2}))
    refused(claim(sm, 12_000, node=A, term=1), "stale_term")
    # The same node cannot pass itself off under the new term either.
    refused(claim(sm, 12_000, node=A, term=2), "not_owner")
    # A node that leads a newer term must take ownership before it claims.
    refused(claim(sm, 12_000, node=C, term=3), "not_owner")
    ok(claim(sm, 12_000, node=B, term=2))
    fires = comp(sm).fires("s1")
    assert fires is not None and [(f["node"], f["term"]) for f in fires] == [(A, 1), (B, 2)]


def test_refused_claims_change_nothing(sm: StateMachine) -> None:
    before = sm.snapshot()
    refused(claim(sm, 11_000, node=B), "not_owner")
    refused(claim(sm, 11_000, sid="nope"), "not_found")
    refused(claim(sm, 30_000, ts=20_000), "not_due")    # not before its time
    after = StateMachine()
    after.restore(before)
    assert comp(sm).to_snapshot() == comp(after).to_snapshot()


def test_no_claims_before_anyone_owns() -> None:
    machine = StateMachine()
    put(machine)
    refused(claim(machine, 11_000), "not_owner", "no node owns")


def test_ownership_term_rules() -> None:
    machine = StateMachine()
    assert ok(run(machine, "schedule.own", {"node": A, "term": 3}))["changed"] is True
    # Same node, same term: a no-op (a leader may retry).
    assert ok(run(machine, "schedule.own", {"node": A, "term": 3}))["changed"] is False
    refused(run(machine, "schedule.own", {"node": B, "term": 3}), "not_owner")
    refused(run(machine, "schedule.own", {"node": B, "term": 2}), "stale_term")
    ok(run(machine, "schedule.own", {"node": B, "term": 5}))
    assert comp(machine).owner() == {"node": B, "term": 5, "since_ts": 10_000}
    assert [(o["term"], o["node"]) for o in comp(machine).owner_history()] == [(3, A), (5, B)]


def test_paused_schedule_refuses_scheduled_claims_but_not_manual(sm: StateMachine) -> None:
    ok(run(sm, "schedule.set_enabled", {"id": "s1", "enabled": False}))
    refused(claim(sm, 11_000), "disabled")
    # The manual fire time is the effective time (already 20_000: it never goes back).
    fire_time = ok(run(sm, "schedule.trigger", {"id": "s1"}, ts=15_000))["fire_time"]
    assert fire_time == 20_000
    ok(claim(sm, fire_time, manual=True))
    refused(claim(sm, fire_time, manual=True), "already_claimed")


def test_manual_triggers_are_distinct_pending_fires(sm: StateMachine) -> None:
    t1 = ok(run(sm, "schedule.trigger", {"id": "s1"}, ts=15_000))["fire_time"]
    t2 = ok(run(sm, "schedule.trigger", {"id": "s1"}, ts=15_000))["fire_time"]
    assert (t1, t2) == (15_000, 15_001)
    s = comp(sm).get("s1")
    assert s is not None and s["pending_manual"] == [15_000, 15_001]
    refused(claim(sm, 15_000, manual=True, node=B), "not_owner")
    ok(claim(sm, 15_001, manual=True))
    s = comp(sm).get("s1")
    assert s is not None and s["pending_manual"] == [15_000]
    # A manual fire does not move the scheduled high-water mark.
    ok(claim(sm, 14_000))
    refused(run(sm, "schedule.trigger", {"id": "zz"}), "not_found")


def test_outcome_first_report_wins(sm: StateMachine) -> None:
    ok(claim(sm, 11_000))
    body = {"id": "s1", "fire_time": 11_000, "status": "ok", "duration_ms": 5, "lag_ms": 3}
    assert ok(run(sm, "schedule.fire_done", body, ts=21_000))["updated"] is True
    again = dict(body, status="error", error="late")
    assert ok(run(sm, "schedule.fire_done", again))["updated"] is False
    fires = comp(sm).fires("s1")
    assert fires is not None
    assert fires[0] | {} == {"fire_time": 11_000, "manual": False, "node": A, "term": 1,
                             "claimed_ts": 20_000, "status": "ok", "lag_ms": 3,
                             "duration_ms": 5, "error": None, "done_ts": 21_000}
    s = comp(sm).get("s1")
    assert s is not None and s["in_flight"] == []
    # An outcome for an unknown fire is ignored, not an error.
    assert ok(run(sm, "schedule.fire_done", dict(body, fire_time=1)))["updated"] is False
    run_bad = run(sm, "schedule.fire_done", dict(body, status="great"))
    refused(run_bad, "invalid", "status")


# --- definitions ------------------------------------------------------------------------------

def test_put_keeps_anchor_and_claims_when_the_trigger_is_unchanged(sm: StateMachine) -> None:
    ok(claim(sm, 11_000))
    assert put(sm, ts=30_000, misfire="run_all")["created"] is False
    s = comp(sm).get("s1")
    assert s is not None
    assert (s["anchor_ms"], s["last_fire_time"], s["misfire"], s["version"]) == \
        (10_000, 11_000, "run_all", 2)
    put(sm, ts=40_000, trigger={"cron": "*/5 * * * * *", "timezone": "Europe/Berlin"})
    s = comp(sm).get("s1")
    assert s is not None and (s["anchor_ms"], s["last_fire_time"]) == (40_000, 11_000)
    # A replaced schedule still refuses an already-claimed fire time.
    refused(claim(sm, 11_000, ts=50_000), "already_claimed")


@pytest.mark.parametrize(("body", "fragment"), [
    ({"id": "bad id", "trigger": {"interval_ms": 1000}, "action": EVENT}, "body.id"),
    ({"id": "s", "trigger": {"interval_ms": 1}, "action": EVENT}, "interval_ms"),
    ({"id": "s", "trigger": {"cron": "* * * * *"}, "action": EVENT}, "timezone"),
    ({"id": "s", "trigger": {"every": 1}, "action": EVENT}, "one of interval_ms"),
    ({"id": "s", "trigger": {"at_ms": 5}, "action": {"type": "shell"}}, "action.type"),
    ({"id": "s", "trigger": {"at_ms": 5}, "action": {"type": "event"}}, "event_type"),
    ({"id": "s", "trigger": {"at_ms": 5}, "action": {"type": "event", "event_type": "t",
                                                      "payload": [1]}}, "payload"),
    ({"id": "s", "trigger": {"at_ms": 5}, "action": {"type": "workflow", "path": "f/x",
                                                      "kind": "bash"}}, "kind"),
    ({"id": "s", "trigger": {"at_ms": 5}, "action": EVENT, "misfire": "never"}, "misfire"),
    ({"id": "s", "trigger": {"at_ms": 5}, "action": EVENT, "enabled": "yes"}, "enabled"),
])
def test_put_validates_the_whole_body(body: dict[str, Any], fragment: str) -> None:
    machine = StateMachine()
    refused(run(machine, "schedule.put", body), "invalid", fragment)
    assert comp(machine).list_all() == []


def test_delete_and_every_action_type() -> None:
    machine = StateMachine()
    actions = [EVENT, {"type": "enqueue", "queue": "q", "body": {"n": 1}},
               {"type": "workflow", "path": "f/etl", "kind": "flow", "args": {"a": 1}},
               {"type": "pipeline", "name": "p"}, {"type": "handler", "name": "report"}]
    for i, action in enumerate(actions):
        ok(run(machine, "schedule.put", {"id": f"s{i}", "trigger": {"at_ms": 5},
                                         "action": action}))
    assert [s["action"] for s in comp(machine).list_all()] == actions
    assert ok(run(machine, "schedule.delete", {"id": "s0"}))["deleted"] is True
    assert ok(run(machine, "schedule.delete", {"id": "s0"}))["deleted"] is False
    assert comp(machine).get("s0") is None and len(comp(machine)) == 4


# --- bounds and snapshots ---------------------------------------------------------------------

def test_fire_history_is_bounded_but_the_high_water_mark_is_not(sm: StateMachine) -> None:
    for i in range(MAX_FIRES + 20):
        ok(claim(sm, 11_000 + i, ts=100_000))
    fires = comp(sm).fires("s1")
    assert fires is not None and len(fires) == MAX_FIRES
    assert fires[0]["fire_time"] == 11_000 + 20
    refused(claim(sm, 11_000, ts=100_000), "already_claimed")


def test_owner_history_is_bounded() -> None:
    machine = StateMachine()
    for term in range(1, MAX_OWNER_HISTORY + 10):
        ok(run(machine, "schedule.own", {"node": A, "term": term}))
    history = comp(machine).owner_history()
    assert len(history) == MAX_OWNER_HISTORY and history[-1]["term"] == MAX_OWNER_HISTORY + 9


def test_snapshot_round_trip_is_byte_identical_and_keeps_fencing(sm: StateMachine) -> None:
    ok(claim(sm, 11_000))
    ok(run(sm, "schedule.fire_done", {"id": "s1", "fire_time": 11_000, "status": "error",
                                      "error": "boom", "duration_ms": 1}))
    ok(run(sm, "schedule.trigger", {"id": "s1"}, ts=12_000))
    put(sm, "s2", trigger={"cron": "0 9 * * 1-5", "timezone": "America/New_York"},
        enabled=False, max_run_ms=500)
    data = sm.snapshot()
    restored = StateMachine()
    restored.restore(data)
    assert restored.snapshot() == data
    # Both machines refuse and accept the same things afterwards.
    for machine in (sm, restored):
        refused(claim(machine, 11_000), "already_claimed")
        refused(claim(machine, 13_000, node=B), "not_owner")
        ok(claim(machine, 13_000))
    assert comp(sm).to_snapshot() == comp(restored).to_snapshot()


def test_restore_refuses_an_inconsistent_section() -> None:
    with pytest.raises(ValueError, match="schedules section"):
        Schedules.from_snapshot({"owner": None})
    good = Schedules().to_snapshot()
    with pytest.raises(ValueError, match="schedule"):
        Schedules.from_snapshot(dict(good, schedules=[["s1", {}, {}]]))
    with pytest.raises(ValueError, match="owner"):
        Schedules.from_snapshot(dict(good, owner=["a", "1", 2]))
