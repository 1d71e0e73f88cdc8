"""StateMachine: every command, every refusal, dedupe, retention, reads, snapshots."""

from __future__ import annotations

import itertools
from typing import Any

import msgpack
import pytest

from flexcore.statemachine import (
    DEDUPE_MAX_RIDS,
    DEFAULT_MAX_EVENTS,
    Command,
    Err,
    Ok,
    Result,
    SnapshotError,
    StateMachine,
    encode,
    encode_batch,
)
from flexcore.statemachine.dedupe import RequestDedupe

_index = itertools.count(1)


def ev(event_id: str, type_: str = "order.created", payload: Any = None,
       key: str | None = None) -> dict[str, Any]:
    return {"type": type_, "id": event_id, "payload": payload, "key": key}


def run(sm: StateMachine, type_: str, body: Any = None, *, ts: int = 1000,
        rid: str | None = None, index: int | None = None) -> Result:
    cmd = Command(type_, {} if body is None else body, ts, rid)
    return sm.apply(cmd, next(_index) if index is None else index)


def publish(sm: StateMachine, *events: dict[str, Any], ts: int = 1000,
            rid: str | None = None) -> dict[str, Any]:
    result = run(sm, "event.publish", {"events": list(events)}, ts=ts, rid=rid)
    assert isinstance(result, Ok), result
    return result.value


def invalid(result: Result, fragment: str) -> None:
    assert isinstance(result, Err), result
    assert result.code == "invalid"
    assert fragment in result.message, result.message


# --- noop, unknown, shape errors -------------------------------------------------------

def test_noop() -> None:
    sm = StateMachine()
    assert run(sm, "noop", index=7) == Ok({})
    assert sm.applied_index == 7
    invalid(run(sm, "noop", {"x": 1}), "unknown field")


def test_unknown_command() -> None:
    sm = StateMachine()
    before = sm.snapshot()
    result = run(sm, "queue.explode", {}, ts=0, index=0)
    assert isinstance(result, Err) and result.code == "unknown_command"
    assert "queue.explode" in result.message
    assert sm.snapshot() == before


def test_fresh_machine() -> None:
    sm = StateMachine()
    assert sm.applied_index == 0 and sm.clock_ms == 0
    assert sm.event_stats() == {"first_offset": 1, "last_offset": 0, "count": 0,
                                "max_events": DEFAULT_MAX_EVENTS}
    assert sm.read_events(0, 10) == ([], 0)
    assert sm.nodes() == {}


@pytest.mark.parametrize("cmd", [
    Command("noop", [], 1),        # type: ignore[arg-type]
    Command("noop", {}, "1"),      # type: ignore[arg-type]
    Command("noop", {}, -1),
    Command("noop", {}, 1, 5),     # type: ignore[arg-type]
    Command(None, {}, 1),          # type: ignore[arg-type]
    "not a command",
    None,
])
def test_apply_never_raises_on_bad_command_objects(cmd: Any) -> None:
    sm = StateMachine()
    result = sm.apply(cmd, 3)
    assert isinstance(result, Err)
    assert sm.applied_index == 3


# --- event.publish ---------------------------------------------------------------------

def test_publish_assigns_dense_one_based_offsets_and_stamps_clock() -> None:
    sm = StateMachine()
    out = publish(sm, ev("a", payload={"n": 1}, key="k"), ev("b"), ts=5000)
    assert out == {"offsets": [1, 2], "ids": ["a", "b"], "duplicates": [False, False]}
    assert publish(sm, ev("c"), ts=6000)["offsets"] == [3]
    events, nxt = sm.read_events(0, 10)
    assert nxt == 3
    assert events[0] == {"offset": 1, "id": "a", "type": "order.created", "key": "k",
                         "payload": {"n": 1}, "ts": 5000}
    assert [e["ts"] for e in events] == [5000, 5000, 6000]
    assert sm.event_stats() == {"first_offset": 1, "last_offset": 3, "count": 3,
                                "max_events": DEFAULT_MAX_EVENTS}


def test_payload_and_key_are_optional() -> None:
    sm = StateMachine()
    publish(sm, {"type": "t", "id": "a"})
    assert sm.read_events(0, 1)[0][0]["payload"] is None
    assert sm.read_events(0, 1)[0][0]["key"] is None


def test_payload_types_survive() -> None:
    sm = StateMachine()
    payload = {"s": "é", "b": b"\x00\xff", "i": -(2**63), "u": 2**64 - 1, "f": 1.5,
               "l": [None, True, False, [1]], "m": {"nested": {"deep": []}}}
    publish(sm, ev("a", payload=payload))
    assert sm.read_events(0, 1)[0][0]["payload"] == payload


def test_idempotent_ids_return_first_offset_and_append_nothing() -> None:
    sm = StateMachine()
    publish(sm, ev("a", payload=1), ev("b", payload=2))
    out = publish(sm, ev("b", payload="other"), ev("c"))
    assert out == {"offsets": [2, 3], "ids": ["b", "c"], "duplicates": [True, False]}
    events, _ = sm.read_events(0, 10)
    assert [e["id"] for e in events] == ["a", "b", "c"]
    assert events[1]["payload"] == 2  # the first publish wins


def test_duplicate_within_one_batch_refers_to_first() -> None:
    sm = StateMachine()
    out = publish(sm, ev("x", payload=1), ev("y"), ev("x", payload=2))
    assert out == {"offsets": [1, 2, 1], "ids": ["x", "y", "x"],
                   "duplicates": [False, False, True]}
    assert sm.event_stats()["count"] == 2


@pytest.mark.parametrize("body, fragment", [
    ({}, "body.events is required"),
    ({"events": [], "x": 1}, "unknown field"),
    ({"events": []}, "1 to 1000"),
    ({"events": "abc"}, "1 to 1000"),
    ({"events": [ev(str(i)) for i in range(1001)]}, "1 to 1000"),
    ({"events": [5]}, "events[0] must be a map"),
    ({"events": [{"id": "a"}]}, "events[0].type is required"),
    ({"events": [{"type": "t"}]}, "events[0].id is required"),
    ({"events": [ev("a", type_="")]}, "events[0].type must be a non-empty string"),
    ({"events": [ev("a", type_="t" * 257)]}, "at most 256"),
    ({"events": [ev("a", type_=5)]}, "got int"),  # type: ignore[arg-type]
    ({"events": [ev("")]}, "events[0].id must be a non-empty string"),
    ({"events": [ev("i" * 257)]}, "events[0].id"),
    ({"events": [ev("a", key="k" * 1025)]}, "events[0].key"),
    ({"events": [ev("a", key=7)]}, "events[0].key"),  # type: ignore[arg-type]
    ({"events": [{**ev("a"), "extra": 1}]}, "events[0] has unknown field(s): extra"),
    ({"events": [ev("a"), ev("b", payload={1, 2})]}, "events[1].payload"),
    ({"events": [ev("a"), ev("b", payload={1: "int key"})]}, "events[1].payload"),
    ({"events": [ev("a"), ev("b", payload=2**64)]}, "events[1].payload"),
    ({"events": [ev("a"), ev("b", payload=object())]}, "events[1].payload"),
])
def test_publish_validation_rejects_whole_command(body: Any, fragment: str) -> None:
    sm = StateMachine()
    publish(sm, ev("seed"))
    before = sm.snapshot()
    invalid(run(sm, "event.publish", body, index=0), fragment)
    assert sm.snapshot() == before
    assert sm.event_stats()["last_offset"] == 1


def test_boundary_lengths_are_accepted() -> None:
    sm = StateMachine()
    out = publish(sm, ev("i" * 256, type_="t" * 256, key="k" * 1024),
                  *[ev(str(n)) for n in range(999)])
    assert len(out["offsets"]) == 1000
    publish(sm, ev("empty-key", key=""))


def test_returned_events_are_copies() -> None:
    sm = StateMachine()
    publish(sm, ev("a", payload={"list": [1, 2]}))
    events, _ = sm.read_events(0, 1)
    events[0]["payload"]["list"].append(3)
    events[0]["id"] = "changed"
    assert sm.read_events(0, 1)[0][0]["payload"] == {"list": [1, 2]}
    assert sm.read_events(0, 1)[0][0]["id"] == "a"


def test_input_body_mutation_after_apply_does_not_leak() -> None:
    sm = StateMachine()
    payload = {"list": [1]}
    publish(sm, ev("a", payload=payload))
    payload["list"].append(2)
    assert sm.read_events(0, 1)[0][0]["payload"] == {"list": [1]}


# --- retention -------------------------------------------------------------------------

def test_retention_trims_oldest_and_updates_first_offset() -> None:
    sm = StateMachine()
    publish(sm, *[ev(f"e{i}") for i in range(1, 11)])
    assert run(sm, "events.set_retention", {"max_events": 4}) == \
        Ok({"max_events": 4, "first_offset": 7})
    assert sm.event_stats() == {"first_offset": 7, "last_offset": 10, "count": 4,
                                "max_events": 4}
    events, nxt = sm.read_events(0, 100)
    assert [e["offset"] for e in events] == [7, 8, 9, 10] and nxt == 10
    publish(sm, ev("e11"), ev("e12"))
    assert sm.event_stats()["first_offset"] == 9
    assert [e["id"] for e in sm.read_events(0, 100)[0]] == ["e9", "e10", "e11", "e12"]


def test_trimmed_id_leaves_index_and_is_appended_again() -> None:
    sm = StateMachine()
    run(sm, "events.set_retention", {"max_events": 2})
    publish(sm, ev("a"), ev("b"), ev("c"))           # "a" is trimmed at once
    assert publish(sm, ev("b")) == {"offsets": [2], "ids": ["b"], "duplicates": [True]}
    assert publish(sm, ev("a")) == {"offsets": [4], "ids": ["a"], "duplicates": [False]}
    assert [e["id"] for e in sm.read_events(0, 10)[0]] == ["c", "a"]


def test_duplicate_in_batch_resolved_before_trim() -> None:
    sm = StateMachine()
    run(sm, "events.set_retention", {"max_events": 1})
    out = publish(sm, ev("x"), ev("y"), ev("x"))
    assert out["offsets"] == [1, 2, 1] and out["duplicates"] == [False, False, True]
    assert sm.event_stats() == {"first_offset": 2, "last_offset": 2, "count": 1,
                                "max_events": 1}


def test_retention_to_zero_means_unlimited_and_empty_log_first_offset() -> None:
    sm = StateMachine()
    run(sm, "events.set_retention", {"max_events": 1})
    publish(sm, ev("a"), ev("b"))
    assert sm.event_stats()["first_offset"] == 2
    assert run(sm, "events.set_retention", {"max_events": 0}) == \
        Ok({"max_events": 0, "first_offset": 2})
    publish(sm, *[ev(f"n{i}") for i in range(50)])
    assert sm.event_stats()["count"] == 51


def test_first_offset_of_emptied_log_is_last_plus_one() -> None:
    sm = StateMachine()
    publish(sm, ev("a"), ev("b"), ev("c"))
    run(sm, "events.set_retention", {"max_events": 1})
    stats = sm.event_stats()
    assert (stats["first_offset"], stats["last_offset"]) == (3, 3)
    # read from before the retained window starts at the first retained event
    assert [e["offset"] for e in sm.read_events(0, 10)[0]] == [3]


@pytest.mark.parametrize("body, fragment", [
    ({}, "max_events is required"),
    ({"max_events": -1}, "integer in [0,"),
    ({"max_events": "5"}, "got str"),
    ({"max_events": True}, "got bool"),
    ({"max_events": 1.0}, "got float"),
    ({"max_events": 5, "x": 1}, "unknown field"),
])
def test_set_retention_validation(body: Any, fragment: str) -> None:
    sm = StateMachine()
    invalid(run(sm, "events.set_retention", body), fragment)
    assert sm.event_stats()["max_events"] == DEFAULT_MAX_EVENTS


def test_trimming_long_streams_keeps_offsets_addressable() -> None:
    """Many trims (forcing internal compaction) keep offset lookups exact."""
    sm = StateMachine()
    run(sm, "events.set_retention", {"max_events": 100})
    for batch in range(50):
        publish(sm, *[ev(f"b{batch}-{i}") for i in range(100)])
    stats = sm.event_stats()
    assert stats == {"first_offset": 4901, "last_offset": 5000, "count": 100,
                     "max_events": 100}
    events, nxt = sm.read_events(4949, 3)
    assert [(e["offset"], e["id"]) for e in events] == \
        [(4950, "b49-49"), (4951, "b49-50"), (4952, "b49-51")]
    assert nxt == 4952
    assert publish(sm, ev("b49-99"))["duplicates"] == [True]
    assert publish(sm, ev("b48-99"))["duplicates"] == [False]  # trimmed long ago


# --- read_events -----------------------------------------------------------------------

@pytest.fixture
def mixed() -> StateMachine:
    sm = StateMachine()
    publish(sm, *[ev(f"e{i}", type_="order.created" if i % 3 else "user.signup",
                     payload=i) for i in range(1, 21)])
    return sm


def test_read_paging(mixed: StateMachine) -> None:
    seen: list[int] = []
    after = 0
    while True:
        events, after_next = mixed.read_events(after, 6)
        if not events:
            assert after_next == after == 20
            break
        seen += [e["offset"] for e in events]
        assert after_next == events[-1]["offset"]
        after = after_next
    assert seen == list(range(1, 21))


def test_read_type_glob(mixed: StateMachine) -> None:
    events, nxt = mixed.read_events(0, 100, "user.*")
    assert [e["offset"] for e in events] == [3, 6, 9, 12, 15, 18]
    assert nxt == 20  # scanned to the end
    events, nxt = mixed.read_events(0, 2, "user.*")
    assert [e["offset"] for e in events] == [3, 6] and nxt == 6
    assert mixed.read_events(0, 5, "USER.*") == ([], 20)  # case-sensitive
    assert [e["offset"] for e in mixed.read_events(0, 3, "order.create?")[0]] == [1, 2, 4]


def test_read_max_scan_bounds_work_and_next_advances(mixed: StateMachine) -> None:
    events, nxt = mixed.read_events(0, 100, "user.*", max_scan=2)
    assert events == [] and nxt == 2  # nothing matched, but the window was consumed
    events, nxt = mixed.read_events(nxt, 100, "user.*", max_scan=4)
    assert [e["offset"] for e in events] == [3, 6] and nxt == 6


def test_read_edge_arguments(mixed: StateMachine) -> None:
    assert mixed.read_events(20, 10) == ([], 20)
    assert mixed.read_events(25, 10) == ([], 25)         # ahead of this replica
    assert mixed.read_events(-5, 1)[0][0]["offset"] == 1
    assert mixed.read_events(3, 0) == ([], 3)
    assert mixed.read_events(3, 5, max_scan=0) == ([], 3)
    run(mixed, "events.set_retention", {"max_events": 5})
    assert mixed.read_events(0, 0) == ([], 15)          # never behind first_offset - 1
    assert mixed.read_events(2, 1)[0][0]["offset"] == 16


# --- cluster ---------------------------------------------------------------------------

def test_register_update_unregister() -> None:
    sm = StateMachine()
    assert run(sm, "cluster.register", {"node": "10.0.0.1:4321",
                                        "api": "http://10.0.0.1:8101"}, ts=100) == \
        Ok({"node": "10.0.0.1:4321", "api": "http://10.0.0.1:8101"})
    run(sm, "cluster.register", {"node": "n2:4321", "api": "https://n2"}, ts=200)
    run(sm, "cluster.register", {"node": "10.0.0.1:4321", "api": "http://x:9"}, ts=300)
    assert sm.nodes() == {"10.0.0.1:4321": {"api": "http://x:9", "registered_ts": 300},
                          "n2:4321": {"api": "https://n2", "registered_ts": 200}}
    assert run(sm, "cluster.unregister", {"node": "n2:4321"}) == Ok({"removed": True})
    assert run(sm, "cluster.unregister", {"node": "n2:4321"}) == Ok({"removed": False})
    assert list(sm.nodes()) == ["10.0.0.1:4321"]
    sm.nodes()["10.0.0.1:4321"]["api"] = "mutated"
    assert sm.nodes()["10.0.0.1:4321"]["api"] == "http://x:9"


@pytest.mark.parametrize("body, fragment", [
    ({"node": "h:1"}, "body.api is required"),
    ({"api": "http://h"}, "body.node is required"),
    ({"node": "h", "api": "http://h"}, "host:port"),
    ({"node": ":80", "api": "http://h"}, "host:port"),
    ({"node": "h:0", "api": "http://h"}, "host:port"),
    ({"node": "h:65536", "api": "http://h"}, "host:port"),
    ({"node": "h:\uff18\uff10", "api": "http://h"}, "host:port"),
    ({"node": "h x:80", "api": "http://h"}, "host:port"),
    ({"node": 5, "api": "http://h"}, "body.node"),
    ({"node": "h:1", "api": "ftp://h"}, "http://"),
    ({"node": "h:1", "api": "http://"}, "http://"),
    ({"node": "h:1", "api": "http://a b"}, "http://"),
    ({"node": "h:1", "api": "http://" + "a" * 1020}, "body.api"),
    ({"node": "h:1", "api": "http://h", "x": 1}, "unknown field"),
])
def test_register_validation(body: Any, fragment: str) -> None:
    sm = StateMachine()
    invalid(run(sm, "cluster.register", body), fragment)
    assert sm.nodes() == {}


def test_unregister_validation() -> None:
    invalid(run(StateMachine(), "cluster.unregister", {}), "body.node is required")
    invalid(run(StateMachine(), "cluster.unregister", {"node": 1}), "body.node")


# --- effective time --------------------------------------------------------------------

def test_clock_is_monotonic_when_proposer_clocks_go_backwards() -> None:
    sm = StateMachine()
    publish(sm, ev("a"), ts=10_000)
    publish(sm, ev("b"), ts=4_000)     # a proposer with a clock behind
    run(sm, "noop", ts=9_000)
    assert sm.clock_ms == 10_000
    assert [e["ts"] for e in sm.read_events(0, 10)[0]] == [10_000, 10_000]
    run(sm, "nope", ts=12_000)         # even refused commands advance time
    publish(sm, ev("c"), ts=11_000)
    assert sm.read_events(2, 1)[0][0]["ts"] == 12_000


def test_applied_index_is_monotonic_and_shared_by_batch_items() -> None:
    sm = StateMachine()
    run(sm, "noop", index=10)
    run(sm, "noop", index=4)
    assert sm.applied_index == 10
    sm.apply_batch(encode_batch([Command("noop", {}, 1), Command("noop", {}, 1)]), 11)
    assert sm.applied_index == 11


# --- request dedupe --------------------------------------------------------------------

def test_rid_dedupe_returns_first_result_without_reapplying() -> None:
    sm = StateMachine()
    first = run(sm, "event.publish", {"events": [ev("a")]}, rid="req-1")
    run(sm, "events.set_retention", {"max_events": 1})
    publish(sm, ev("b"))                                   # trims "a"
    again = run(sm, "event.publish", {"events": [ev("a")]}, rid="req-1", ts=99_999)
    assert again == first == Ok({"offsets": [1], "ids": ["a"], "duplicates": [False]})
    assert sm.event_stats()["last_offset"] == 2            # "a" not appended again
    assert sm.clock_ms == 99_999


def test_rid_dedupe_remembers_errors_and_returns_copies() -> None:
    sm = StateMachine()
    err = run(sm, "event.publish", {"events": []}, rid="bad")
    assert isinstance(err, Err)
    # Same rid, now a valid body: still the stored answer (it is the same proposal).
    assert run(sm, "event.publish", {"events": [ev("a")]}, rid="bad") == err
    assert sm.event_stats()["count"] == 0
    ok = run(sm, "cluster.register", {"node": "h:1", "api": "http://h"}, rid="reg")
    assert isinstance(ok, Ok)
    ok.value["node"] = "mutated"
    assert run(sm, "cluster.register", {"node": "h:1", "api": "http://h"}, rid="reg") == \
        Ok({"node": "h:1", "api": "http://h"})


def test_rid_dedupe_evicts_oldest_after_limit() -> None:
    sm = StateMachine()
    run(sm, "event.publish", {"events": [ev("first")]}, rid="r0")
    for n in range(1, DEDUPE_MAX_RIDS):
        run(sm, "noop", rid=f"r{n}", index=1)
    # r0 is the oldest of exactly MAX rids: still remembered.
    assert run(sm, "event.publish", {"events": [ev("other")]}, rid="r0") == \
        Ok({"offsets": [1], "ids": ["first"], "duplicates": [False]})
    run(sm, "noop", rid="one-more", index=1)               # evicts r0
    again = run(sm, "event.publish", {"events": [ev("other")]}, rid="r0")
    assert again == Ok({"offsets": [2], "ids": ["other"], "duplicates": [False]})
    # r1 was evicted when r0 came back, so it applies afresh:
    assert run(sm, "event.publish", {"events": [ev("r1-event")]}, rid="r1") == \
        Ok({"offsets": [3], "ids": ["r1-event"], "duplicates": [False]})
    assert run(sm, "event.publish", {"events": [ev("zzz")]}, rid="one-more") == Ok({})


def test_dedupe_byte_budget_evicts_oldest_first() -> None:
    dedupe = RequestDedupe(max_rids=100, max_bytes=120)  # each entry ~52 bytes
    big = Ok({"ids": ["x" * 40]})
    dedupe.remember("a", big)
    dedupe.remember("b", big)
    assert "a" in dedupe and "b" in dedupe
    dedupe.remember("c", big)                      # ~156 bytes: "a" goes
    assert "a" not in dedupe and dedupe.get("b") == big and dedupe.get("c") == big
    dedupe.remember("huge", Ok({"ids": ["y" * 500]}))
    assert len(dedupe) == 1 and "huge" in dedupe  # the newest is always kept


def test_dedupe_survives_snapshot() -> None:
    sm = StateMachine()
    first = run(sm, "event.publish", {"events": [ev("a")]}, rid="req")
    other = StateMachine()
    other.restore(sm.snapshot())
    assert run(other, "event.publish", {"events": [ev("b")]}, rid="req") == first
    assert other.event_stats()["count"] == 1


# --- apply_batch -----------------------------------------------------------------------

def test_apply_batch_applies_in_order_and_isolates_bad_items() -> None:
    sm = StateMachine()
    items = [
        encode(Command("event.publish", {"events": [ev("a")]}, 5)),
        msgpack.packb({"v": 2}),
        b"\xc1",  # not msgpack at all: the batch cannot be framed past this
    ]
    raw = b"\x92" + items[0] + items[1]
    results = sm.apply_batch(raw, 9)
    assert results[0] == Ok({"offsets": [1], "ids": ["a"], "duplicates": [False]})
    assert isinstance(results[1], Err) and results[1].code == "unsupported_version"
    assert sm.applied_index == 9
    garbage = sm.apply_batch(b"\x91" + items[2], 10)
    assert len(garbage) == 1 and isinstance(garbage[0], Err)
    assert garbage[0].code == "malformed"
    assert sm.applied_index == 10


@pytest.mark.parametrize("raw", [b"", b"\xff" * 10, b"\x93\x01\x02\x03", b"\x91\xa1x"])
def test_apply_batch_never_raises_on_garbage(raw: bytes) -> None:
    sm = StateMachine()
    before = sm.snapshot()
    results = sm.apply_batch(raw, 1)
    assert results and all(isinstance(r, Err) and r.code == "malformed" for r in results)
    assert sm.applied_index == 1
    assert StateMachine().snapshot() == before


@pytest.mark.parametrize("body", [
    None, 5, "x", [], {"events": None}, {"events": [None]}, {"events": [[1, 2]]},
    {"events": [{"type": None, "id": None}]}, {"max_events": None}, {"node": ["x"]},
    {"events": [{"type": "t", "id": "i", "payload": {"k": float("nan")}}], "z": 1},
])
@pytest.mark.parametrize("type_", ["noop", "event.publish", "events.set_retention",
                                   "cluster.register", "cluster.unregister"])
def test_apply_never_raises_on_garbage_bodies(type_: str, body: Any) -> None:
    sm = StateMachine()
    result = sm.apply(Command(type_, body, 0), 1)
    assert isinstance(result, Err) and result.code == "invalid", result
    untouched = StateMachine()
    untouched.apply(Command("noop", {}, 0), 1)  # same index and time, no state change
    assert sm.snapshot() == untouched.snapshot()


# --- snapshots -------------------------------------------------------------------------

def build_busy_machine() -> StateMachine:
    sm = StateMachine()
    publish(sm, ev("a", payload={"x": [1, 2]}, key="k"), ev("b", payload=b"\x00"), ts=50)
    run(sm, "cluster.register", {"node": "h:1", "api": "http://h:8"}, ts=60, rid="q1")
    run(sm, "events.set_retention", {"max_events": 3})
    publish(sm, ev("c"), ev("d"), ev("e"), rid="q2")
    run(sm, "bogus", rid="q3", index=10**9)
    return sm


def test_snapshot_round_trip_is_byte_identical_and_equivalent() -> None:
    sm = build_busy_machine()
    snap = sm.snapshot()
    assert msgpack.unpackb(snap, raw=False)["format"] == 1
    other = StateMachine()
    other.restore(snap)
    assert other.snapshot() == snap
    assert other.applied_index == sm.applied_index == 10**9
    assert other.clock_ms == sm.clock_ms
    assert other.event_stats() == sm.event_stats()
    assert other.read_events(0, 10) == sm.read_events(0, 10)
    assert other.nodes() == sm.nodes()
    for machine in (sm, other):
        assert publish(machine, ev("d"), ev("f"))["duplicates"] == [True, False]
    assert sm.snapshot() == other.snapshot()


def test_restore_replaces_all_state() -> None:
    sm = build_busy_machine()
    sm.restore(StateMachine().snapshot())
    assert sm.snapshot() == StateMachine().snapshot()
    assert sm.nodes() == {} and sm.event_stats()["count"] == 0
    assert publish(sm, ev("a"))["duplicates"] == [False]  # id index rebuilt too


def _snapshot_with(**changes: Any) -> bytes:
    obj = msgpack.unpackb(build_busy_machine().snapshot(), raw=False)
    obj.update(changes)
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


@pytest.mark.parametrize("data", [
    b"",
    b"garbage",
    msgpack.packb([1, 2]),
    msgpack.packb({"format": 2}),
    msgpack.packb({"format": "1"}),
    _snapshot_with(format=2),
    _snapshot_with(extra=1),
    _snapshot_with(clock_ms="x"),
    _snapshot_with(events={"first_offset": 0, "max_events": 0, "events": []}),
    _snapshot_with(events={"first_offset": 1, "max_events": 1,
                           "events": [["a", "t", None, b"\xc0", 1],
                                      ["b", "t", None, b"\xc0", 1]]}),
    _snapshot_with(events={"first_offset": 1, "max_events": 0,
                           "events": [["a", "t", None, b"\xc0", 1],
                                      ["a", "t", None, b"\xc0", 1]]}),
    _snapshot_with(events={"first_offset": 1, "max_events": 0,
                           "events": [["a", "t", None, b"\xc1", 1]]}),
    _snapshot_with(events={"first_offset": 1, "max_events": 0, "events": [["a"]]}),
    _snapshot_with(nodes=[["h:1", "http://h"]]),
    _snapshot_with(nodes=[["h:1", "http://h", 1], ["h:1", "http://h", 2]]),
    _snapshot_with(dedupe=[["r", b"\x00"]]),
    _snapshot_with(dedupe=[["r", msgpack.packb(["ok", {}])],
                           ["r", msgpack.packb(["ok", {}])]]),
    msgpack.packb(msgpack.ExtType(1, b"x")),
])
def test_bad_snapshot_raises_and_keeps_state(data: bytes) -> None:
    sm = build_busy_machine()
    before = sm.snapshot()
    with pytest.raises(SnapshotError):
        sm.restore(data)
    assert isinstance(SnapshotError("x"), ValueError)
    assert sm.snapshot() == before
    assert publish(sm, ev("c"))["duplicates"] == [True]  # id index still live
