"""Pipelines in the state machine: definitions, run transitions, the monotonic
checkpoint (compare-and-set on seq), epochs, and snapshot round trips."""

from __future__ import annotations

import uuid
from typing import Any

from flexcore.statemachine import Result, StateMachine
from tests.support.machine import ok, refused, run

EXTRACTOR: dict[str, Any] = {"plugin": "postgres-extractor",
             "config": {"url": "sqlite:////tmp/x.db", "table": "t", "cursor_column": "id"}}
LOADER = {"plugin": "api-loader", "config": {"url": "http://127.0.0.1:9/in"}}


def rid(n: int) -> str:
    return str(uuid.UUID(int=n))


def setup(sm: StateMachine, name: str = "orders") -> None:
    assert ok(run(sm, "pipeline.put", {
        "name": name, "extractor": EXTRACTOR, "loader": LOADER,
        "transforms": [{"plugin": "json-transformer", "config": {"mapping": {"id": "id"}},
                        "timeout_s": 30}]}))["created"]


def cp(sm: StateMachine, run_id: str, seq: int, cursor: Any, rows: int = 10,
       epoch: int = 0) -> Result:
    return run(sm, "pipeline.checkpoint", {"pipeline": "orders", "run": run_id,
                                           "epoch": epoch, "seq": seq, "cursor": cursor,
                                           "rows": rows})


def test_run_lifecycle_and_one_active_run_per_pipeline() -> None:
    sm = StateMachine()
    setup(sm)
    refused(run(sm, "pipeline.run.create", {"id": rid(1), "pipeline": "nope"}), "not_found")
    assert ok(run(sm, "pipeline.run.create", {"id": rid(1), "pipeline": "orders"})) == {
        "id": rid(1), "status": "pending", "duplicate": False}
    assert ok(run(sm, "pipeline.run.create", {"id": rid(1), "pipeline": "orders"}))[
        "duplicate"]
    refused(run(sm, "pipeline.run.create", {"id": rid(2), "pipeline": "orders"}),
            "run_active", rid(1))
    refused(run(sm, "pipeline.delete", {"name": "orders"}), "conflict")
    # A checkpoint before the run started changes nothing.
    assert not ok(cp(sm, rid(1), 1, 10))["changed"]
    assert ok(run(sm, "pipeline.run.start", {"id": rid(1)}))["changed"]
    assert not ok(run(sm, "pipeline.run.start", {"id": rid(1)}))["changed"]
    assert ok(cp(sm, rid(1), 1, 10))["changed"]
    assert ok(run(sm, "pipeline.run.finish", {"id": rid(1), "status": "success"}))["changed"]
    # Final is final: a late failure from a deposed leader is a no-op.
    assert not ok(run(sm, "pipeline.run.finish", {"id": rid(1), "status": "failure",
                                                  "error": "late"}))["changed"]
    view = sm.component("pipelines").run(rid(1))
    assert view["status"] == "success" and view["batches"] == 1 and view["rows"] == 10
    assert view["start_seq"] == 0 and view["start_cursor"] is None and "error" not in view
    # The next run continues from the pipeline's checkpoint.
    ok(run(sm, "pipeline.run.create", {"id": rid(2), "pipeline": "orders"}))
    ok(run(sm, "pipeline.run.start", {"id": rid(2)}))
    assert sm.component("pipelines").run(rid(2))["start_cursor"] == 10
    assert sm.component("pipelines").active_ids() == [rid(2)]


def test_checkpoint_moves_forward_one_batch_at_a_time() -> None:
    sm = StateMachine()
    setup(sm)
    ok(run(sm, "pipeline.run.create", {"id": rid(1), "pipeline": "orders"}))
    ok(run(sm, "pipeline.run.start", {"id": rid(1)}))
    assert ok(cp(sm, rid(1), 1, 100))["changed"]
    # The same batch again (a retried proposal, a stale leader): no-op.
    assert ok(cp(sm, rid(1), 1, 100)) == {"changed": False, "seq": 1,
                                          "reason": "batch already committed"}
    assert not ok(cp(sm, rid(1), 1, 150))["changed"]
    refused(cp(sm, rid(1), 3, 300), "checkpoint_gap", "next batch is 2")
    refused(cp(sm, rid(1), 2, 50), "conflict", "forward")
    refused(cp(sm, rid(1), 2, 200, epoch=1), "conflict", "epoch")
    assert ok(cp(sm, rid(1), 2, 200, rows=7))["changed"]
    assert sm.component("pipelines").checkpoint("orders") == {
        "epoch": 0, "seq": 2, "cursor": 200, "rows": 17, "updated_ms": 10_000}
    refused(run(sm, "pipeline.checkpoint", {"pipeline": "orders", "run": rid(1), "epoch": 0,
                                            "seq": 3, "cursor": "x" * 2000, "rows": 1}),
            "invalid", "cursor")


def test_a_new_extractor_starts_a_new_epoch() -> None:
    sm = StateMachine()
    setup(sm)
    ok(run(sm, "pipeline.run.create", {"id": rid(1), "pipeline": "orders"}))
    ok(run(sm, "pipeline.run.start", {"id": rid(1)}))
    ok(cp(sm, rid(1), 1, 100))
    refused(run(sm, "pipeline.put", {"name": "orders", "extractor": EXTRACTOR,
                                     "loader": {**LOADER, "timeout_s": 5}}), "conflict")
    ok(run(sm, "pipeline.run.finish", {"id": rid(1), "status": "failure", "error": "x"}))
    # Same extractor, other loader: the checkpoint stays.
    out = ok(run(sm, "pipeline.put", {"name": "orders", "extractor": EXTRACTOR,
                                      "loader": {**LOADER, "timeout_s": 5}}))
    assert out == {"name": "orders", "created": False, "version": 2, "epoch": 0}
    assert sm.component("pipelines").checkpoint("orders")["cursor"] == 100
    other = {**EXTRACTOR, "config": {**EXTRACTOR["config"], "table": "t2"}}
    out = ok(run(sm, "pipeline.put", {"name": "orders", "extractor": other, "loader": LOADER}))
    assert out["epoch"] == 1
    assert sm.component("pipelines").checkpoint("orders")["seq"] == 0
    assert sm.component("pipelines").checkpoint("orders")["cursor"] is None


def test_definitions_are_validated() -> None:
    sm = StateMachine()
    for body, fragment in (
            ({"name": "bad name", "extractor": EXTRACTOR, "loader": LOADER}, "body.name"),
            ({"name": "a", "extractor": {"plugin": "X!", "config": {}}, "loader": LOADER},
             "extractor.plugin"),
            ({"name": "a", "extractor": EXTRACTOR}, "body.loader is required"),
            ({"name": "a", "extractor": EXTRACTOR, "loader": {**LOADER, "timeout_s": 0}},
             "timeout_s"),
            ({"name": "a", "extractor": EXTRACTOR, "loader": LOADER, "transforms": {}},
             "transforms")):
        refused(run(sm, "pipeline.put", body), "invalid", fragment)
    refused(run(sm, "pipeline.delete", {"name": "a"}), "not_found")


def test_snapshot_round_trip_and_determinism() -> None:
    machines = [StateMachine(), StateMachine()]
    for sm in machines:
        setup(sm)
        setup(sm, "other")
        ok(run(sm, "pipeline.run.create", {"id": rid(1), "pipeline": "orders",
                                           "source": {"schedule": "s", "fire_time": 5}}))
        ok(run(sm, "pipeline.run.start", {"id": rid(1)}))
        ok(cp(sm, rid(1), 1, "2024-01-01T00:00:00"))
        ok(run(sm, "pipeline.run.note", {"id": rid(1), "error": "timeout: slow"}))
        ok(run(sm, "pipeline.run.create", {"id": rid(2), "pipeline": "other"}))
        ok(run(sm, "pipeline.run.finish", {"id": rid(2), "status": "failure", "error": "e"}))
    a, b = machines
    assert a.snapshot() == b.snapshot()
    restored = StateMachine()
    restored.restore(a.snapshot())
    assert restored.snapshot() == a.snapshot()
    comp = restored.component("pipelines")
    assert comp.run(rid(1))["last_error"] == "timeout: slow"
    assert comp.checkpoint("orders")["cursor"] == "2024-01-01T00:00:00"
    assert comp.active_ids() == [rid(1)]
    # The restored machine keeps refusing a second active run.
    refused(run(restored, "pipeline.run.create", {"id": rid(3), "pipeline": "orders"}),
            "run_active")
