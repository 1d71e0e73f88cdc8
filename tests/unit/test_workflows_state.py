"""Workflow runs and routing rules in the state machine: lifecycle, monotonic status,
idempotent outcomes, cancel, routing cursor compare-and-set, (rule, offset) dedupe,
bounds, snapshots and determinism."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from flexcore.statemachine import StateMachine
from flexcore.statemachine.workflows import MAX_ACTIVE_RUNS, Workflows
from tests.support.machine import ok, refused, run


def rid(n: int) -> str:
    return str(uuid.UUID(int=n))


def wf(sm: StateMachine) -> Workflows:
    part = sm.component("workflows")
    assert isinstance(part, Workflows)
    return part


def create(sm: StateMachine, n: int = 1, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"id": rid(n), "path": "u/flexcore/echo", "kind": "script",
                            "args": {"n": n}}
    body.update(extra)
    return ok(run(sm, "workflow.run.create", body))


def state(sm: StateMachine, n: int = 1) -> dict[str, Any]:
    view = wf(sm).get(rid(n))
    assert view is not None
    return view


@pytest.fixture
def sm() -> StateMachine:
    machine = StateMachine()
    return machine


# --- lifecycle --------------------------------------------------------------------------------

def test_create_then_submitted_running_success(sm: StateMachine) -> None:
    assert create(sm) == {"id": rid(1), "status": "pending", "duplicate": False}
    assert state(sm)["status"] == "pending" and state(sm)["job_id"] is None
    assert state(sm)["args"] == {"n": 1} and state(sm)["created_ms"] == 10_000
    assert ok(run(sm, "workflow.run.submitted", {"id": rid(1), "job_id": rid(1)},
                  ts=11_000))["changed"]
    assert state(sm)["status"] == "submitted" and state(sm)["job_id"] == rid(1)
    assert ok(run(sm, "workflow.run.running", {"id": rid(1)}, ts=12_000))["changed"]
    assert ok(run(sm, "workflow.run.finish", {"id": rid(1), "status": "success",
                                              "result": {"ok": [1, 2]},
                                              "duration_ms": 40}, ts=13_000))["changed"]
    view = state(sm)
    assert view["status"] == "success" and view["result"] == {"ok": [1, 2]}
    assert (view["submitted_ms"], view["started_ms"], view["finished_ms"],
            view["duration_ms"]) == (11_000, 12_000, 13_000, 40)
    assert "error" not in view
    assert wf(sm).active_ids() == []


def test_create_with_same_id_is_idempotent_and_conflicting_reuse_refused(
        sm: StateMachine) -> None:
    create(sm)
    assert create(sm)["duplicate"] is True
    refused(run(sm, "workflow.run.create", {"id": rid(1), "path": "u/other/x",
                                            "kind": "script"}), "conflict")
    assert len(wf(sm).list_runs()[0]) == 1


def test_status_is_monotonic_and_outcome_idempotent(sm: StateMachine) -> None:
    create(sm)
    ok(run(sm, "workflow.run.running", {"id": rid(1), "job_id": rid(1)}))
    # A late "submitted" (an earlier report) changes nothing.
    assert not ok(run(sm, "workflow.run.submitted", {"id": rid(1), "job_id": rid(1)}))[
        "changed"]
    assert state(sm)["status"] == "running"
    ok(run(sm, "workflow.run.finish", {"id": rid(1), "status": "failure",
                                       "error": "RuntimeError: boom", "result": None}))
    # Neither a late running report nor a second outcome overwrites the first.
    assert not ok(run(sm, "workflow.run.running", {"id": rid(1)}))["changed"]
    again = ok(run(sm, "workflow.run.finish", {"id": rid(1), "status": "success",
                                               "result": 1}))
    assert again == {"id": rid(1), "status": "failure", "changed": False}
    assert state(sm)["status"] == "failure" and state(sm)["error"] == "RuntimeError: boom"


def test_finish_from_pending_records_failure_without_job(sm: StateMachine) -> None:
    create(sm)
    ok(run(sm, "workflow.run.finish", {"id": rid(1), "status": "failure",
                                       "error": "Not found: Script not found at path x"}))
    assert state(sm)["status"] == "failure" and state(sm)["job_id"] is None


def test_unknown_run_and_bad_bodies(sm: StateMachine) -> None:
    refused(run(sm, "workflow.run.submitted", {"id": rid(9), "job_id": rid(9)}),
            "not_found")
    refused(run(sm, "workflow.run.create", {"id": "nope", "path": "u/a/b",
                                            "kind": "script"}), "invalid", "UUID")
    refused(run(sm, "workflow.run.create", {"id": rid(1), "path": "../etc",
                                            "kind": "script"}), "invalid", "path")
    refused(run(sm, "workflow.run.create", {"id": rid(1), "path": "u/a/b",
                                            "kind": "app"}), "invalid", "kind")
    refused(run(sm, "workflow.run.create", {"id": rid(1), "path": "u/a/b",
                                            "kind": "script", "args": [1]}), "invalid")
    create(sm)
    refused(run(sm, "workflow.run.finish", {"id": rid(1), "status": "running"}),
            "invalid", "status")
    assert state(sm)["status"] == "pending"


def test_note_sets_last_error_until_progress(sm: StateMachine) -> None:
    create(sm)
    ok(run(sm, "workflow.run.note", {"id": rid(1), "error": "Internal: db down"}))
    assert state(sm)["last_error"] == "Internal: db down"
    ok(run(sm, "workflow.run.submitted", {"id": rid(1), "job_id": rid(1)}))
    assert "last_error" not in state(sm)


def test_cancel_records_request_and_refuses_final_runs(sm: StateMachine) -> None:
    create(sm)
    out = ok(run(sm, "workflow.run.cancel", {"id": rid(1), "reason": "changed my mind"}))
    assert out == {"id": rid(1), "status": "pending", "cancel_requested": True}
    assert state(sm)["cancel_requested"] and state(sm)["cancel_reason"] == "changed my mind"
    ok(run(sm, "workflow.run.finish", {"id": rid(1), "status": "canceled"}))
    refused(run(sm, "workflow.run.cancel", {"id": rid(1)}), "conflict", "canceled")


def test_list_by_status_pages_by_seq(sm: StateMachine) -> None:
    for n in range(1, 6):
        create(sm, n)
    ok(run(sm, "workflow.run.finish", {"id": rid(2), "status": "success", "result": 2}))
    pending, nxt = wf(sm).list_runs(status="pending", limit=2)
    assert [r["id"] for r in pending] == [rid(1), rid(3)] and nxt == 3
    rest, _ = wf(sm).list_runs(status="pending", after=nxt)
    assert [r["id"] for r in rest] == [rid(4), rid(5)]
    assert wf(sm).counts()["success"] == 1 and wf(sm).counts()["pending"] == 4


def test_active_runs_are_bounded(sm: StateMachine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("flexcore.statemachine.workflows.MAX_ACTIVE_RUNS", 3)
    for n in range(1, 4):
        create(sm, n)
    refused(run(sm, "workflow.run.create", {"id": rid(4), "path": "u/a/b",
                                            "kind": "script"}), "too_many_runs")
    ok(run(sm, "workflow.run.finish", {"id": rid(1), "status": "success"}))
    create(sm, 4)
    assert MAX_ACTIVE_RUNS == 10_000


def test_oldest_final_runs_are_forgotten_beyond_max_runs(
        sm: StateMachine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("flexcore.statemachine.workflows.MAX_RUNS", 3)
    for n in range(1, 4):
        create(sm, n)
        ok(run(sm, "workflow.run.finish", {"id": rid(n), "status": "success"}))
    create(sm, 4)
    assert wf(sm).get(rid(1)) is None and wf(sm).get(rid(2)) is not None


# --- routing ----------------------------------------------------------------------------------

def put_route(sm: StateMachine, route_id: str = "r1", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"id": route_id, "event_type": "order.*", "path": "u/a/route",
                            "kind": "script", "enabled": True, "start_after": 0,
                            "condition": "payload.total > `10`",
                            "args_from": {"order": "payload.id"}}
    body.update(extra)
    return ok(run(sm, "workflow.route.put", body))


def start(n: int, offset: int, rule: str = "r1") -> dict[str, Any]:
    return {"run_id": rid(n), "rule": rule, "offset": offset, "path": "u/a/route",
            "kind": "script", "args": {"order": offset}, "event_id": f"e{offset}"}


def test_route_put_get_update_delete(sm: StateMachine) -> None:
    assert put_route(sm)["created"] is True
    view = wf(sm).route("r1")
    assert view is not None and view["version"] == 1 and view["start_after"] == 0
    assert view["args_from"] == {"order": "payload.id"}
    out = put_route(sm, start_after=50, enabled=False)
    assert out == {"id": "r1", "created": False, "version": 2}
    view = wf(sm).route("r1")
    assert view is not None and view["enabled"] is False
    assert view["start_after"] == 0          # an edit keeps the rule's scope
    ok(run(sm, "workflow.route.delete", {"id": "r1"}))
    refused(run(sm, "workflow.route.delete", {"id": "r1"}), "not_found")


def test_advance_is_compare_and_set_on_the_cursor(sm: StateMachine) -> None:
    put_route(sm)
    out = ok(run(sm, "workflow.route.advance", {"from": 0, "to": 5,
                                                "starts": [start(1, 2), start(2, 4)]}))
    assert out["created"] == [rid(1), rid(2)] and wf(sm).cursor == 5
    assert state(sm, 1)["source"] == {"rule": "r1", "offset": 2, "event_id": "e2"}
    # A second leader routing the same events from the old cursor is refused whole.
    refused(run(sm, "workflow.route.advance", {"from": 0, "to": 5,
                                               "starts": [start(3, 2), start(4, 4)]}),
            "cursor_moved")
    assert wf(sm).get(rid(3)) is None and len(wf(sm).active_ids()) == 2
    assert wf(sm).run_for("r1", 2) == rid(1)


def test_advance_skips_rule_offset_pairs_that_already_have_a_run(sm: StateMachine) -> None:
    put_route(sm)
    ok(run(sm, "workflow.route.advance", {"from": 0, "to": 3, "starts": [start(1, 3)]}))
    # Forced replay of offset 3 under a moved cursor cannot happen (CAS), and the same
    # (rule, offset) twice in one batch starts one run.
    out = ok(run(sm, "workflow.route.advance", {"from": 3, "to": 6,
                                                "starts": [start(2, 5), start(3, 5)]}))
    assert out["created"] == [rid(2)] and out["skipped"] == 1
    # Another rule on the same event is its own (rule, offset).
    out = ok(run(sm, "workflow.route.advance", {"from": 6, "to": 7,
                                                "starts": [start(4, 7, "r2")]}))
    assert out["created"] == [rid(4)]


def test_advance_validates_before_moving(sm: StateMachine) -> None:
    refused(run(sm, "workflow.route.advance", {"from": 0, "to": 5,
                                               "starts": [start(1, 9)]}), "invalid", "offset")
    refused(run(sm, "workflow.route.advance", {"from": 2, "to": 1, "starts": []}), "invalid")
    assert wf(sm).cursor == 0
    create(sm, 1)
    refused(run(sm, "workflow.route.advance", {"from": 0, "to": 5,
                                               "starts": [start(1, 2)]}), "conflict")
    assert wf(sm).cursor == 0


# --- snapshots and determinism -----------------------------------------------------------------

def _script(sm: StateMachine) -> None:
    put_route(sm)
    for n in range(1, 8):
        create(sm, n)
    ok(run(sm, "workflow.run.submitted", {"id": rid(1), "job_id": rid(1)}))
    ok(run(sm, "workflow.run.finish", {"id": rid(2), "status": "success",
                                       "result": {"x": b"bytes", "y": [1.5, None]}}))
    ok(run(sm, "workflow.run.cancel", {"id": rid(3)}))
    ok(run(sm, "workflow.route.advance", {"from": 0, "to": 4, "starts": [start(20, 4)]}))
    ok(run(sm, "workflow.run.note", {"id": rid(4), "error": "Internal: x"}))


def test_snapshot_round_trip_and_determinism() -> None:
    a, b = StateMachine(), StateMachine()
    for machine in (a, b):
            _script(machine)
    assert a.snapshot() == b.snapshot()
    c = StateMachine()
    c.restore(a.snapshot())
    assert c.snapshot() == a.snapshot()
    assert wf(c).get(rid(2)) == wf(a).get(rid(2))
    assert wf(c).active_ids() == wf(a).active_ids() and wf(c).cursor == 4
    assert wf(c).run_for("r1", 4) == rid(20)
    # Both continue identically.
    for machine in (a, c):
        ok(run(machine, "workflow.run.finish", {"id": rid(1), "status": "success"}))
        create(machine, 30)
    assert a.snapshot() == c.snapshot()


def test_corrupt_section_is_refused() -> None:
    with pytest.raises(ValueError):
        Workflows.from_snapshot({"seq": 1, "cursor": 0, "runs": [["x"]], "finished": [],
                                 "routes": []})
    with pytest.raises(ValueError):
        Workflows.from_snapshot({"seq": 0})
