"""The versioned msgpack command envelope that travels through the Raft log.

One command is a msgpack map ``{"v": 1, "type": str, "body": map, "ts": int, "rid":
str | nil}``. A batch (group commit: several commands in one log entry) is a msgpack
array of such maps. Its items are framed without being built and then decoded one by
one, so one bad item never spoils the others.

Decoding is defensive because a log entry is input from the network: size limits bound
what a hostile blob can make us allocate, ext types (including msgpack timestamps) are
refused, map keys must be strings, and every failure is a ``MalformedCommand`` with a
message a person can act on. ``encode`` round-trips through ``decode``, so whatever a
proposer manages to encode, every node can decode.

No pickle, no I/O. Imports only msgpack and the standard library.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import msgpack

from flexcore.statemachine.result import MALFORMED, UNSUPPORTED_VERSION

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_ITEMS",
    "MAX_COMMAND_BYTES",
    "MAX_RID_LENGTH",
    "MAX_TYPE_LENGTH",
    "Command",
    "MalformedCommand",
    "decode",
    "decode_batch",
    "encode",
    "encode_batch",
    "pack_plain",
    "unpack_plain",
]

ENVELOPE_VERSION = 1

MAX_COMMAND_BYTES = 4 * 1024 * 1024
"""Largest encoded envelope. Decoding n bytes of msgpack can allocate roughly 60 n bytes
of Python objects (a one-byte empty array becomes a list), so this bounds the memory a
hostile entry can cost. ``encode`` refuses bigger commands (the proposer answers 413)."""
MAX_BATCH_BYTES = 64 * 1024 * 1024
"""Largest encoded batch; each of its items must also fit ``MAX_COMMAND_BYTES``."""
MAX_BATCH_ITEMS = 100_000
MAX_TYPE_LENGTH = 128
MAX_RID_LENGTH = 256

_ENVELOPE_KEYS = frozenset({"v", "type", "body", "ts", "rid"})
_MAX_CONTAINER_LEN = 1_000_000
_UINT64_MAX = 2**64 - 1


class MalformedCommand(Exception):
    """A blob is not a valid command envelope.

    ``code`` is ``"malformed"`` or ``"unsupported_version"`` (see ``result.py``).
    """

    def __init__(self, message: str, code: str = MALFORMED) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Command:
    """One state-machine command, as the proposer built it.

    ``ts`` is the proposer's wall clock in ms since the epoch; the state machine keeps
    effective time monotonic (``max`` over applied ``ts``). ``rid`` is a proposer-chosen
    unique request id: a command re-proposed with the same ``rid`` (because its outcome
    was unknown) is answered from the first application instead of applied twice.
    """

    type: str
    body: dict[str, Any]
    ts: int
    rid: str | None = None


# --- plain msgpack (no ext types, str/bytes map keys) ----------------------------------

def _refuse_ext(code: int, data: bytes) -> NoReturn:
    raise ValueError(f"msgpack ext type {code} is not allowed")


def unpack_plain(raw: bytes, *, max_container_len: int = _MAX_CONTAINER_LEN) -> Any:
    """Decode msgpack made of nil/bool/int/float/str/bin/array/map only.

    Raises ``ValueError`` (or a subclass) for anything else: bad bytes, trailing bytes,
    ext types, non-string map keys, containers longer than ``max_container_len``.
    """
    return msgpack.unpackb(
        raw,
        raw=False,
        strict_map_key=True,
        use_list=True,
        max_ext_len=0,
        ext_hook=_refuse_ext,
        max_array_len=max_container_len,
        max_map_len=max_container_len,
    )


def pack_plain(obj: Any) -> bytes:
    """Encode ``obj`` as msgpack (bin for bytes, no datetime support).

    Raises ``TypeError`` for a value msgpack cannot encode and ``ValueError`` for an
    integer outside the 64-bit range or a structure nested too deeply.
    """
    try:
        packed = msgpack.packb(obj, use_bin_type=True, datetime=False)
    except OverflowError as exc:  # an int beyond 64 bits: a bad value, not a bad type
        raise ValueError(f"integer out of msgpack range: {exc}") from exc
    assert isinstance(packed, bytes)
    return packed


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if "max_ext_len" in text or "ext type" in text or "timestamp" in text:
        return "msgpack ext types are not allowed"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fail(message: str, code: str = MALFORMED) -> NoReturn:
    raise MalformedCommand(message, code)


# --- one envelope ----------------------------------------------------------------------

def _check_fields(type_: object, body: object, ts: object, rid: object) -> None:
    """Raise ``MalformedCommand`` unless the fields have the envelope's shape."""
    if not isinstance(type_, str) or not 0 < len(type_) <= MAX_TYPE_LENGTH:
        _fail(f"'type' must be a non-empty string of at most {MAX_TYPE_LENGTH} characters")
    if not isinstance(body, dict):
        _fail(f"'body' must be a map, got {type(body).__name__}")
    if not all(isinstance(key, str) for key in body):
        _fail("'body' keys must be strings")
    if type(ts) is not int or not 0 <= ts <= _UINT64_MAX:
        _fail("'ts' must be a non-negative integer (ms since the epoch)")
    if rid is not None and (not isinstance(rid, str) or not 0 < len(rid) <= MAX_RID_LENGTH):
        _fail(f"'rid' must be nil or a non-empty string of at most {MAX_RID_LENGTH} characters")


def _command_from_obj(obj: object) -> Command:
    if not isinstance(obj, dict):
        _fail(f"envelope must be a map, got {type(obj).__name__}")
    if "v" not in obj:
        _fail("envelope has no 'v' (version) field")
    version = obj["v"]
    if type(version) is not int or version != ENVELOPE_VERSION:
        _fail(
            f"envelope version {version!r} is not supported (this node understands "
            f"{ENVELOPE_VERSION}); upgrade this node",
            UNSUPPORTED_VERSION,
        )
    unknown = [key for key in obj if key not in _ENVELOPE_KEYS]
    if unknown:
        _fail(f"envelope has unknown field(s): {', '.join(sorted(map(repr, unknown)))}")
    for key in ("type", "body", "ts"):
        if key not in obj:
            _fail(f"envelope has no {key!r} field")
    type_, body, ts, rid = obj["type"], obj["body"], obj["ts"], obj.get("rid")
    _check_fields(type_, body, ts, rid)
    return Command(type=type_, body=body, ts=ts, rid=rid)


def decode(raw: bytes) -> Command:
    """Decode one envelope; raise ``MalformedCommand`` saying what is wrong."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        _fail(f"envelope must be bytes, got {type(raw).__name__}")
    if len(raw) > MAX_COMMAND_BYTES:
        _fail(f"envelope is {len(raw)} bytes; the limit is {MAX_COMMAND_BYTES}")
    try:
        obj = unpack_plain(bytes(raw))
    except Exception as exc:  # msgpack raises ValueError subclasses and a few others
        _fail(f"envelope is not valid msgpack ({_describe(exc)})")
    return _command_from_obj(obj)


def encode(cmd: Command) -> bytes:
    """Encode one command.

    Raises ``TypeError``/``ValueError`` (never ``MalformedCommand``) when the command
    cannot be encoded or would not decode on the other nodes (a value msgpack cannot
    carry, an integer beyond 64 bits, a non-string map key, too large): the proposer
    turns that into a 4xx instead of committing garbage.
    """
    if not isinstance(cmd, Command):
        raise TypeError(f"expected a Command, got {type(cmd).__name__}")
    try:
        _check_fields(cmd.type, cmd.body, cmd.ts, cmd.rid)
    except MalformedCommand as exc:
        raise ValueError(exc.message) from None
    raw = pack_plain(
        {"v": ENVELOPE_VERSION, "type": cmd.type, "body": cmd.body, "ts": cmd.ts,
         "rid": cmd.rid}
    )
    if len(raw) > MAX_COMMAND_BYTES:
        raise ValueError(f"command is {len(raw)} bytes; the limit is {MAX_COMMAND_BYTES}")
    try:
        decode(raw)
    except MalformedCommand as exc:
        raise ValueError(f"command would not decode: {exc.message}") from None
    return raw


# --- batches ---------------------------------------------------------------------------

def encode_batch(cmds: Sequence[Command]) -> bytes:
    """Encode commands as one msgpack array whose items are envelope maps.

    The result is exactly an array header followed by ``encode(cmd)`` for each command,
    so a proposer that already holds encoded envelopes may build it the same way.
    """
    if len(cmds) > MAX_BATCH_ITEMS:
        raise ValueError(f"batch has {len(cmds)} commands; the limit is {MAX_BATCH_ITEMS}")
    header: bytes = msgpack.Packer().pack_array_header(len(cmds))
    raw = header + b"".join(map(encode, cmds))
    if len(raw) > MAX_BATCH_BYTES:
        raise ValueError(f"batch is {len(raw)} bytes; the limit is {MAX_BATCH_BYTES}")
    return raw


def _split_batch(raw: bytes) -> list[bytes]:
    """Cut a batch into the raw bytes of its items.

    ``Unpacker.skip`` walks an item's structure without building Python objects, so
    framing costs no memory whatever a hostile item nests; each item is then decoded
    (with limits) on its own.
    """
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(raw), 1))
    unpacker.feed(raw)
    try:
        count = unpacker.read_array_header()
    except Exception as exc:
        _fail(f"batch must be a msgpack array of envelopes ({_describe(exc)})")
    if count > MAX_BATCH_ITEMS:
        _fail(f"batch declares {count} items; the limit is {MAX_BATCH_ITEMS}")
    items: list[bytes] = []
    start = unpacker.tell()
    for number in range(count):
        try:
            unpacker.skip()
        except Exception as exc:
            _fail(f"batch item {number} of {count} cannot be framed ({_describe(exc)})")
        end = unpacker.tell()
        items.append(raw[start:end])
        start = end
    if start != len(raw):
        _fail(f"batch has {len(raw) - start} trailing bytes after its {count} items")
    return items


def decode_batch(raw: bytes) -> list[Command | MalformedCommand]:
    """Decode a batch; a bad item becomes a ``MalformedCommand`` in its place.

    Raises ``MalformedCommand`` only when the batch as a whole is unusable: not a
    msgpack array, truncated, trailing bytes, too large.
    """
    if not isinstance(raw, bytes | bytearray | memoryview):
        _fail(f"batch must be bytes, got {type(raw).__name__}")
    if len(raw) > MAX_BATCH_BYTES:
        _fail(f"batch is {len(raw)} bytes; the limit is {MAX_BATCH_BYTES}")
    decoded: list[Command | MalformedCommand] = []
    for number, item in enumerate(_split_batch(bytes(raw))):
        try:
            decoded.append(decode(item))
        except MalformedCommand as exc:
            decoded.append(MalformedCommand(f"batch item {number}: {exc.message}", exc.code))
    return decoded
