"""The command envelope: round trips, refusal of malformed blobs, batch isolation."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from flexcore.statemachine import (
    ENVELOPE_VERSION,
    MAX_COMMAND_BYTES,
    Command,
    MalformedCommand,
    decode,
    decode_batch,
    encode,
    encode_batch,
)


def envelope(**overrides: Any) -> dict[str, Any]:
    env: dict[str, Any] = {"v": 1, "type": "noop", "body": {}, "ts": 1000, "rid": "r-1"}
    env.update(overrides)
    return env


def pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


# --- round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [
    Command("noop", {}, 0),
    Command("event.publish", {"events": [{"type": "a.b", "id": "x", "key": None,
                                          "payload": {"n": [1, 2.5, "s", b"\x00", None,
                                                            True, -(2**63), 2**64 - 1]}}]},
            1_700_000_000_000, "rid-1"),
    Command("cluster.register", {"node": "h:1", "api": "http://h:2"}, 5, None),
])
def test_round_trip(cmd: Command) -> None:
    raw = encode(cmd)
    assert decode(raw) == cmd
    assert msgpack.unpackb(raw, raw=False)["v"] == ENVELOPE_VERSION


def test_encode_is_deterministic_bytes() -> None:
    cmd = Command("x", {"b": 1, "a": [1, 2]}, 7, "r")
    assert encode(cmd) == encode(Command("x", {"b": 1, "a": [1, 2]}, 7, "r"))


def test_envelope_is_the_documented_map() -> None:
    raw = encode(Command("noop", {"k": 1}, 42, "abc"))
    assert msgpack.unpackb(raw, raw=False) == {"v": 1, "type": "noop", "body": {"k": 1},
                                               "ts": 42, "rid": "abc"}


def test_rid_may_be_absent_on_the_wire() -> None:
    env = envelope()
    del env["rid"]
    assert decode(pack(env)).rid is None


# --- encode refuses what other nodes could not decode (ValueError/TypeError) ------------

@pytest.mark.parametrize("body, exc", [
    ({"n": 2**64}, ValueError),                 # beyond msgpack's integer range
    ({"n": -(2**63) - 1}, ValueError),
    ({"s": {1, 2}}, TypeError),                 # a set
    ({"o": object()}, TypeError),
    ({"m": {1: "int key"}}, ValueError),        # decoders require string keys
    ({"big": "x" * (MAX_COMMAND_BYTES + 1)}, ValueError),
])
def test_encode_refuses_unencodable_bodies(body: dict[str, Any], exc: type[Exception]) -> None:
    with pytest.raises(exc) as info:
        encode(Command("event.publish", body, 1))
    assert not isinstance(info.value, MalformedCommand)


@pytest.mark.parametrize("cmd", [
    Command("", {}, 1),
    Command("noop", {}, -1),
    Command("noop", {}, True),
    Command("noop", {}, 1, ""),
    Command("noop", {}, 1, "r" * 257),
    Command("noop", [], 1),  # type: ignore[arg-type]
])
def test_encode_refuses_bad_fields(cmd: Command) -> None:
    with pytest.raises(ValueError):
        encode(cmd)


# --- decode refuses malformed blobs with a clear message -------------------------------

@pytest.mark.parametrize("raw, fragment", [
    (b"", "not valid msgpack"),
    (b"\xc1", "not valid msgpack"),                           # reserved byte
    (b"{\"v\": 1}", "not valid msgpack"),                     # JSON, trailing bytes
    (pack(envelope()) + b"\x00", "not valid msgpack"),        # trailing bytes
    (pack(envelope())[:-3], "not valid msgpack"),             # truncated
    (pack([1, 2]), "must be a map, got list"),
    (pack("noop"), "must be a map, got str"),
    (pack({"type": "noop", "body": {}, "ts": 1}), "no 'v'"),
    (pack(envelope(ts=None)), "'ts'"),
    (pack(envelope(ts=-5)), "'ts'"),
    (pack(envelope(ts=1.5)), "'ts'"),
    (pack(envelope(ts=True)), "'ts'"),
    (pack(envelope(type=3)), "'type'"),
    (pack(envelope(type="")), "'type'"),
    (pack(envelope(body=[1])), "'body' must be a map"),
    (pack(envelope(body={b"k": 1})), "'body' keys must be strings"),
    (pack(envelope(rid=5)), "'rid'"),
    (pack(envelope(rid="")), "'rid'"),
    (pack(envelope(extra=1)), "unknown field"),
    (pack({1: 2}), "not valid msgpack"),                      # non-string map key
])
def test_decode_refuses_malformed(raw: bytes, fragment: str) -> None:
    with pytest.raises(MalformedCommand) as info:
        decode(raw)
    assert info.value.code == "malformed"
    assert fragment in str(info.value)


@pytest.mark.parametrize("key", ["type", "body", "ts"])
def test_decode_names_the_missing_field(key: str) -> None:
    env = envelope()
    del env[key]
    with pytest.raises(MalformedCommand, match=f"no '{key}' field"):
        decode(pack(env))


@pytest.mark.parametrize("version", [2, 0, "1", True, None])
def test_unsupported_version(version: Any) -> None:
    # The rest of a future envelope may look entirely different: only v is read.
    with pytest.raises(MalformedCommand) as info:
        decode(pack({"v": version, "whatever": [1]}))
    assert info.value.code == "unsupported_version"
    assert "understands 1" in str(info.value)


@pytest.mark.parametrize("ext", [
    msgpack.ExtType(5, b"data"),
    msgpack.Timestamp(1, 0),                   # ext -1, decoded specially by msgpack
    msgpack.ExtType(7, b""),                   # zero-length ext payload
])
def test_ext_types_are_refused(ext: object) -> None:
    raw = pack(envelope(body={"payload": ext}))
    with pytest.raises(MalformedCommand, match="ext types are not allowed"):
        decode(raw)


@pytest.mark.parametrize("raw", [
    b"\x81\xa1v\xdd\xff\xff\xff\xff",       # map whose value declares 2**32-1 array items
    b"\xdb\xff\xff\xff\xff",                # str of declared length 2**32-1
    b"\xc6\x7f\xff\xff\xff",                # bin of declared length 2**31-1
    b"\xdf\xff\xff\xff\xff",                # map of declared length 2**32-1
    b"\x91" * 5000 + b"\xc0",               # nesting beyond the decoder's stack
])
def test_huge_declared_lengths_are_refused_without_allocating(raw: bytes) -> None:
    with pytest.raises(MalformedCommand, match="not valid msgpack"):
        decode(raw)


def test_oversized_envelope_refused_before_decoding() -> None:
    with pytest.raises(MalformedCommand, match="limit is"):
        decode(b"\xc0" * (MAX_COMMAND_BYTES + 1))


def test_decode_refuses_non_bytes() -> None:
    with pytest.raises(MalformedCommand, match="must be bytes"):
        decode("text")  # type: ignore[arg-type]


# --- batches -----------------------------------------------------------------------------

def test_batch_round_trip() -> None:
    cmds = [Command("noop", {}, i, f"r{i}") for i in range(20)]
    assert decode_batch(encode_batch(cmds)) == cmds
    assert decode_batch(encode_batch([])) == []


def test_batch_is_array_header_plus_envelopes() -> None:
    cmds = [Command("noop", {}, 1, "a"), Command("noop", {"x": 1}, 2)]
    raw = encode_batch(cmds)
    header: bytes = msgpack.Packer().pack_array_header(2)
    assert raw == header + encode(cmds[0]) + encode(cmds[1])
    assert msgpack.unpackb(raw, raw=False)[1]["body"] == {"x": 1}


def test_batch_isolates_bad_items() -> None:
    good = Command("noop", {}, 1, "good")
    items = [
        encode(good),
        pack(envelope(body={"p": msgpack.ExtType(3, b"x")})),
        pack({"v": 2}),
        pack("not a map"),
        pack({1: 2}),
        encode(Command("noop", {}, 2)),
    ]
    raw = bytes([0x90 | len(items)]) + b"".join(items)  # fixarray header + the items
    out = decode_batch(raw)
    assert len(out) == 6
    assert out[0] == good
    assert out[5] == Command("noop", {}, 2)
    assert isinstance(out[1], MalformedCommand) and "ext types" in out[1].message
    assert isinstance(out[2], MalformedCommand) and out[2].code == "unsupported_version"
    assert isinstance(out[3], MalformedCommand) and out[3].code == "malformed"
    assert isinstance(out[4], MalformedCommand) and "batch item 4" in out[4].message


@pytest.mark.parametrize("raw, fragment", [
    (b"", "must be a msgpack array"),
    (pack({"v": 1}), "must be a msgpack array"),
    (pack(5), "must be a msgpack array"),
    (b"\x92\xc0", "item 1 of 2 cannot be framed"),            # truncated
    (b"\x91\xc0\xc0", "trailing bytes"),
    (b"\xdd\xff\xff\xff\xff", "limit is"),                     # declares 4 billion items
    (b"\x91" * 5000, "cannot be framed"),                      # absurd nesting
])
def test_undecodable_batch_raises(raw: bytes, fragment: str) -> None:
    with pytest.raises(MalformedCommand) as info:
        decode_batch(raw)
    assert fragment in str(info.value)
    assert info.value.code == "malformed"
