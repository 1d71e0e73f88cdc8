"""Properties of the state machine that every Raft replica relies on.

- Determinism: the same command sequence (valid or not) on two fresh machines gives
  byte-identical snapshots and equal results, whether the commands arrive one by one
  or group-committed through ``apply_batch``.
- Snapshots: cutting anywhere, restoring and continuing ends byte-identical to a
  machine that never snapshotted.
- Robustness: ``apply_batch`` on arbitrary bytes never raises.
"""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexcore.statemachine import (
    Command,
    Err,
    MalformedCommand,
    Ok,
    Result,
    StateMachine,
    decode,
    decode_batch,
    encode,
    encode_batch,
)

PROPERTY_SETTINGS = settings(max_examples=120, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])

# Plain msgpack values (what a decoded envelope can contain).
scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=False) | st.text(max_size=8) | st.binary(max_size=8))
plain = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=8,
)

# Few distinct ids/types/nodes/rids, so duplicates, dedupe hits and re-registrations
# happen often.
# (sampled_from has no weights: repeating valid values makes invalid ones rarer.)
event_ids = st.sampled_from(["a", "b", "c", "d", "e", "f"] * 4 + ["", "x" * 257])
event_types = st.sampled_from(["order.created", "order.paid", "user.signup"] * 4 + ["", 7])
event = st.fixed_dictionaries(
    {"type": event_types, "id": event_ids},
    optional={"payload": plain, "key": st.none() | st.sampled_from(["k1", "k2", ""])},
)
nodes = st.sampled_from(["n1:4321", "n2:4321", "n3:4321", "bad", ""])

bodies: dict[str, st.SearchStrategy[Any]] = {
    "noop": st.just({}) | st.dictionaries(st.text(max_size=3), plain, max_size=2),
    "event.publish": st.fixed_dictionaries({"events": st.lists(event, min_size=1, max_size=4)}),
    "events.set_retention": st.fixed_dictionaries(
        {"max_events": st.integers(-1, 6) | st.sampled_from(["3", None])}),
    "cluster.register": st.fixed_dictionaries(
        {"node": nodes, "api": st.sampled_from(["http://a:1", "https://b", "ftp://c"])}),
    "cluster.unregister": st.fixed_dictionaries({"node": nodes}),
    "no.such.command": plain.map(lambda p: {"p": p}),
}


@st.composite
def commands(draw: st.DrawFn) -> Command:
    type_ = draw(st.sampled_from(sorted(bodies)))
    if draw(st.integers(0, 5)) == 0:  # now and then a body of the wrong shape entirely
        body = draw(st.dictionaries(st.text(max_size=6), plain, max_size=3))
    else:
        body = draw(bodies[type_])
    ts = draw(st.integers(0, 5_000))  # proposers' clocks disagree and go backwards
    rid = draw(st.sampled_from([None] * 6 + ["r1", "r2", "r3"]))  # retried proposals
    return Command(type_, body, ts, rid)


# A command list split into group-committed log entries: [(index, [cmd, ...]), ...].
entries = st.lists(st.lists(commands(), min_size=1, max_size=3), max_size=25).map(
    lambda groups: [(number + 1, group) for number, group in enumerate(groups)])


def wire(cmd: Command) -> Command:
    """What a replica sees after the command travelled through the log."""
    return decode(encode(cmd))


def apply_one_by_one(sm: StateMachine, log: list[tuple[int, list[Command]]]) -> list[Result]:
    return [sm.apply(wire(cmd), index) for index, group in log for cmd in group]


def apply_batched(sm: StateMachine, log: list[tuple[int, list[Command]]]) -> list[Result]:
    return [r for index, group in log for r in sm.apply_batch(encode_batch(group), index)]


@PROPERTY_SETTINGS
@given(log=entries)
def test_replicas_applying_the_same_log_are_byte_identical(
        log: list[tuple[int, list[Command]]]) -> None:
    first, second, batched = StateMachine(), StateMachine(), StateMachine()
    results = apply_one_by_one(first, log)
    assert apply_one_by_one(second, log) == results
    assert apply_batched(batched, log) == results
    assert all(isinstance(r, Ok | Err) for r in results)
    assert not any(isinstance(r, Err) and r.code == "internal" for r in results)
    snap = first.snapshot()
    assert second.snapshot() == snap
    assert batched.snapshot() == snap
    assert first.read_events(0, 1000) == batched.read_events(0, 1000)


@PROPERTY_SETTINGS
@given(log=entries, data=st.data())
def test_snapshot_restore_at_any_cut_then_continue_is_identical(
        log: list[tuple[int, list[Command]]], data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(log)), label="cut")
    uninterrupted = StateMachine()
    expected = apply_one_by_one(uninterrupted, log)

    before = StateMachine()
    head = apply_one_by_one(before, log[:cut])
    snap = before.snapshot()
    resumed = StateMachine()
    resumed.restore(snap)
    assert resumed.snapshot() == snap
    tail = apply_one_by_one(resumed, log[cut:])

    assert head + tail == expected
    assert resumed.snapshot() == uninterrupted.snapshot()
    assert resumed.applied_index == uninterrupted.applied_index
    assert resumed.clock_ms == uninterrupted.clock_ms


@PROPERTY_SETTINGS
@given(log=entries)
def test_offsets_are_dense_and_reads_match_stats(log: list[tuple[int, list[Command]]]) -> None:
    sm = StateMachine()
    apply_one_by_one(sm, log)
    stats = sm.event_stats()
    events, nxt = sm.read_events(0, 10_000)
    assert [e["offset"] for e in events] == list(range(stats["first_offset"],
                                                       stats["last_offset"] + 1))
    assert len(events) == stats["count"]
    assert len({e["id"] for e in events}) == len(events)  # retained ids are unique
    if stats["max_events"]:
        assert stats["count"] <= stats["max_events"]
    assert nxt == max(stats["last_offset"], stats["first_offset"] - 1)
    assert all(e["ts"] <= sm.clock_ms for e in events)


garbage_items = st.one_of(
    st.binary(max_size=64),
    plain.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    st.fixed_dictionaries(
        {"v": st.sampled_from([1, 1, 2, "1"]), "type": st.sampled_from(sorted(bodies)) | plain,
         "body": plain, "ts": st.integers(-5, 10) | plain},
        optional={"rid": plain, "junk": plain},
    ).map(lambda v: msgpack.packb(v, use_bin_type=True)),
)


@PROPERTY_SETTINGS
@given(raw=st.binary(max_size=256)
       | st.lists(garbage_items, max_size=5).map(
           lambda items: bytes([0x90 | len(items)]) + b"".join(items)))
def test_apply_batch_never_raises(raw: bytes) -> None:
    sm = StateMachine()
    results = sm.apply_batch(raw, 1)
    try:
        expected_len = len(decode_batch(raw))
    except MalformedCommand:
        expected_len = 1  # one Err("malformed") for the whole blob
    assert len(results) == expected_len
    assert all(isinstance(r, Ok | Err) for r in results)
    assert not any(isinstance(r, Err) and r.code == "internal" for r in results)
    assert sm.applied_index == 1
    again = StateMachine()
    assert again.apply_batch(raw, 1) == results
    assert again.snapshot() == sm.snapshot()
