"""The FlexCore plugin protocol, version 1: one handshake line, then msgpack RPC frames.

A plugin is a separate process (as HashiCorp go-plugin). The host starts it with
``FLEXCORE_PLUGIN=1`` and ``FLEXCORE_PLUGIN_SOCKET=<path>`` in its environment (and
``FLEXCORE_PLUGIN_TRANSPORT=tcp`` where unix sockets are unavailable); the plugin
listens there and prints exactly one line on stdout::

    FLEXCORE-PLUGIN|1|unix|/tmp/flexcore-plugins-x/extractor.sock
    FLEXCORE-PLUGIN|1|tcp|127.0.0.1:41233

The host refuses any other first line (another protocol version, garbage, a line that
never comes within the handshake timeout) with `HandshakeError`, then connects.

Every message is a frame: a 4-byte big-endian length followed by that many bytes of
msgpack (plain values only: nil, bool, int, float, str, bin, array, string-keyed map;
ext types are refused, and nothing is ever unpickled). Requests are
``{"id": int, "method": str, "params": map}``; answers are ``{"id", "result": any}`` or
``{"id", "error": {"code": str, "message": str}}``. Frames larger than `MAX_FRAME`
are refused on both sides (`FrameTooLarge`); a frame that is not such a map is a
`ProtocolError`.

Methods: ``info`` -> ``{name, version, kind: extractor|transformer|loader,
config_schema?}``; ``init`` ``{config}`` -> ``{}``; ``execute`` (by kind, see
`flexcore.plugins.builtin`) ; ``shutdown`` -> ``{}`` (the plugin then exits).

Error codes a plugin answers with: ``bad_config``, ``bad_request``, ``not_initialized``,
``unknown_method``, ``retryable`` (may succeed if tried again: a 5xx, a lost
connection) and ``failed`` (anything else). The host adds ``crashed`` and ``timeout``.
"""

from __future__ import annotations

import asyncio
import re
import struct
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
HANDSHAKE_PREFIX = "FLEXCORE-PLUGIN"
MAX_FRAME = 16 * 1024 * 1024
MAX_HANDSHAKE_LINE = 1024
KINDS = ("extractor", "transformer", "loader")
METHODS = ("info", "init", "execute", "shutdown")

ENV_MAGIC = "FLEXCORE_PLUGIN"
ENV_SOCKET = "FLEXCORE_PLUGIN_SOCKET"
ENV_TRANSPORT = "FLEXCORE_PLUGIN_TRANSPORT"

_HEADER = struct.Struct(">I")
_HANDSHAKE = re.compile(
    r"FLEXCORE-PLUGIN\|(?P<version>[0-9]{1,4})\|(?P<transport>unix|tcp)\|(?P<address>\S{1,900})")
_TCP_ADDRESS = re.compile(r"127\.0\.0\.1:(?P<port>[0-9]{1,5})")


class ProtocolError(Exception):
    """A peer broke the protocol (bad frame, bad message shape)."""


class FrameTooLarge(ProtocolError):
    """A frame above `MAX_FRAME` bytes (refused before reading or sending it)."""


class HandshakeError(ProtocolError):
    """The plugin's first stdout line is not a valid version-1 handshake."""


class RemoteError(Exception):
    """An error answer from the other side: ``code`` and ``message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# --- handshake ----------------------------------------------------------------------------

def handshake_line(transport: str, address: str) -> str:
    """The line a plugin prints (without the newline)."""
    return f"{HANDSHAKE_PREFIX}|{PROTOCOL_VERSION}|{transport}|{address}"


def parse_handshake(line: bytes | str) -> tuple[str, str | tuple[str, int]]:
    """``(transport, address)`` from a handshake line: a socket path for ``unix``,
    ``("127.0.0.1", port)`` for ``tcp``. Raises `HandshakeError` for anything else."""
    text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
    text = text.rstrip("\r\n")
    shown = repr(text[:120])
    m = _HANDSHAKE.fullmatch(text)
    if m is None:
        raise HandshakeError(f"expected a handshake line like "
                             f"'{HANDSHAKE_PREFIX}|{PROTOCOL_VERSION}|unix|/path.sock' as the "
                             f"first line on stdout, got {shown}")
    if int(m["version"]) != PROTOCOL_VERSION:
        raise HandshakeError(f"the plugin speaks protocol version {m['version']}; this host "
                             f"speaks version {PROTOCOL_VERSION}")
    if m["transport"] == "unix":
        if not m["address"].startswith("/"):
            raise HandshakeError(f"unix socket path must be absolute, got {shown}")
        return "unix", m["address"]
    tcp = _TCP_ADDRESS.fullmatch(m["address"])
    if tcp is None or not 1 <= int(tcp["port"]) <= 65535:
        raise HandshakeError(f"tcp address must be 127.0.0.1:PORT (loopback only), got {shown}")
    return "tcp", ("127.0.0.1", int(tcp["port"]))


# --- frames -------------------------------------------------------------------------------

def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("msgpack ext types are not allowed")


def encode(message: dict[str, Any], max_frame: int = MAX_FRAME) -> bytes:
    """One frame (header + msgpack). Raises `FrameTooLarge`, or `ProtocolError` for a
    value msgpack cannot carry."""
    try:
        body = msgpack.packb(message, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode the message: {exc}") from None
    assert isinstance(body, bytes)
    if len(body) > max_frame:
        raise FrameTooLarge(f"frame of {len(body)} bytes exceeds the {max_frame}-byte limit")
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    """A frame body (after the header) as a message map."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True,
                              max_ext_len=0, ext_hook=_refuse_ext)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"frame is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"a frame must hold a map, got {type(obj).__name__}")
    msg_id = obj.get("id")
    if type(msg_id) is not int:
        raise ProtocolError("a frame must carry an integer id")
    if "method" in obj:
        if not isinstance(obj["method"], str) or not isinstance(obj.get("params", {}), dict) \
                or set(obj) - {"id", "method", "params"}:
            raise ProtocolError("a request is {id, method: str, params: map}")
    elif "result" in obj:
        if set(obj) != {"id", "result"}:
            raise ProtocolError("a result is {id, result}")
    elif "error" in obj:
        err = obj["error"]
        if (set(obj) != {"id", "error"} or not isinstance(err, dict)
                or not isinstance(err.get("code"), str)
                or not isinstance(err.get("message"), str)):
            raise ProtocolError("an error is {id, error: {code: str, message: str}}")
    else:
        raise ProtocolError("a frame must be a request, a result or an error")
    return obj


async def read_frame(reader: asyncio.StreamReader, max_frame: int = MAX_FRAME
                     ) -> dict[str, Any] | None:
    """The next message, or None at a clean end of stream (between frames)."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError("stream ended inside a frame header") from None
    (size,) = _HEADER.unpack(header)
    if size > max_frame:
        raise FrameTooLarge(f"peer announced a frame of {size} bytes; the limit is "
                            f"{max_frame}")
    try:
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise ProtocolError("stream ended inside a frame") from None
    return decode(body)


async def write_frame(writer: asyncio.StreamWriter, message: dict[str, Any],
                      max_frame: int = MAX_FRAME) -> None:
    writer.write(encode(message, max_frame))
    await writer.drain()


def request(msg_id: int, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": msg_id, "method": method, "params": params or {}}


def result(msg_id: int, value: Any) -> dict[str, Any]:
    return {"id": msg_id, "result": value}


def error(msg_id: int, code: str, message: str) -> dict[str, Any]:
    return {"id": msg_id, "error": {"code": code, "message": message[:2000]}}


def check_info(value: Any) -> dict[str, Any]:
    """Validate an ``info`` answer; raises `ProtocolError` saying what is wrong."""
    if not isinstance(value, dict):
        raise ProtocolError("info must answer a map")
    name, version, kind = value.get("name"), value.get("version"), value.get("kind")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise ProtocolError("info.name must be a non-empty string of at most 64 characters")
    if not isinstance(version, str) or not version or len(version) > 64:
        raise ProtocolError("info.version must be a non-empty string")
    if kind not in KINDS:
        raise ProtocolError(f"info.kind must be one of {', '.join(KINDS)}")
    schema = value.get("config_schema")
    if schema is not None and not isinstance(schema, dict):
        raise ProtocolError("info.config_schema must be a map when present")
    return {"name": name, "version": version, "kind": kind,
            **({"config_schema": schema} if schema is not None else {})}
