"""Request parsing for the admin API: JSON bodies, event fields, query strings, addresses.

Everything here is pure (no aiohttp request, no I/O) and raises
`flexcore.errors.BadRequest` with a message that names the offending field, so the HTTP
layer can turn it into the error envelope and tests can call it directly.

What is accepted is what can travel on: a body that parses here can be msgpack-encoded
downstream and serialised back to JSON, so integers must fit 64 bits, floats must be
finite, strings must be valid UTF-8 and nesting is bounded.

Imports only `flexcore.errors` and `flexcore.api.protocol`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from multidict import MultiMapping
from yarl import URL

from flexcore.api.protocol import EventIn, EventQuery
from flexcore.errors import BadRequest

__all__ = [
    "MAX_BATCH_EVENTS",
    "MAX_DEPTH",
    "parse_batch",
    "parse_event",
    "parse_event_query",
    "parse_json_body",
    "parse_member",
    "require_object",
    "validate_raft_address",
]

MAX_TYPE_CHARS = 256
MAX_KEY_CHARS = 1024
MAX_ID_CHARS = 256
MAX_BATCH_EVENTS = 1000
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_URL_CHARS = 2048
# msgpack refuses to pack deeper than 511 levels; stay well below it.
MAX_DEPTH = 100

INT_MIN = -(2**63)  # smallest msgpack int64
UINT_MAX = 2**64 - 1  # largest msgpack uint64
INT64_MAX = 2**63 - 1

_EVENT_FIELDS = frozenset({"type", "payload", "key", "id"})
_BATCH_FIELDS = frozenset({"events"})
_MEMBER_FIELDS = frozenset({"raft", "api"})

_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]{2,45}\]")
_DIGITS = re.compile(r"[0-9]{1,20}")


class _Invalid:
    """A JSON literal the parser accepted but FlexCore cannot carry (found by `_check`)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _parse_int(text: str) -> int | _Invalid:
    # Refuse long literals before int(): Python limits int() to 4300 digits anyway.
    if len(text.lstrip("-")) > 20:
        return _Invalid(f"integer {text[:24]}... is outside the 64-bit range")
    value = int(text)
    if not INT_MIN <= value <= UINT_MAX:
        return _Invalid(f"integer {text} is outside the 64-bit range")
    return value


def _parse_float(text: str) -> float | _Invalid:
    value = float(text)
    if not math.isfinite(value):
        return _Invalid(f"number {text[:32]} is too large to represent")
    return value


def _parse_constant(text: str) -> _Invalid:
    return _Invalid(f"{text} is not valid JSON")


def _check(value: Any, root: str) -> None:
    """Walk a parsed document (iteratively) for markers, bad strings and depth."""
    stack: list[tuple[Any, str, int]] = [(value, root, 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, _Invalid):
            raise BadRequest(f"{path}: {item.reason}")
        if isinstance(item, str):
            _require_utf8(item, path)
        elif isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise BadRequest(f"{path}: JSON is nested deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    _require_utf8(key, path)
                    stack.append((child, f"{path}.{key}", depth + 1))
            else:
                for i, child in enumerate(item):
                    stack.append((child, f"{path}[{i}]", depth + 1))


def _require_utf8(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{path}: string contains an unpaired surrogate") from None


def parse_json_body(raw: bytes) -> Any:
    """Parse a request body. Empty or malformed → `bad_json`; unrepresentable → 400."""
    if not raw.strip():
        raise BadRequest("request body is empty; expected JSON", code="bad_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8", code="bad_json") from None
    try:
        value = json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except RecursionError:
        raise BadRequest("request body is nested too deeply", code="bad_json") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise BadRequest(f"request body is not valid JSON: {exc}", code="bad_json") from None
    _check(value, "body")
    return value


def require_object(value: Any, what: str, allowed: frozenset[str]) -> dict[str, Any]:
    """``value`` must be a JSON object whose keys are all in ``allowed``."""
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, not {_json_kind(value)}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise BadRequest(
            f"{what} has unknown field(s): {', '.join(unknown)} "
            f"(allowed: {', '.join(sorted(allowed))})"
        )
    return value


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _string(
    obj: Mapping[str, Any],
    field: str,
    where: str,
    *,
    required: bool,
    max_chars: int,
    allow_empty: bool,
) -> str | None:
    name = f"{where}{field}"
    if field not in obj or obj[field] is None:
        if required:
            raise BadRequest(f"{name} is required")
        return None
    value = obj[field]
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string, not {_json_kind(value)}")
    if not value and not allow_empty:
        raise BadRequest(f"{name} must not be empty")
    if len(value) > max_chars:
        raise BadRequest(f"{name} must be at most {max_chars} characters (got {len(value)})")
    return value


def parse_event(value: Any, where: str = "") -> EventIn:
    """One event ``{type, payload?, key?, id?}``; ``where`` prefixes field names."""
    obj = require_object(value, where.rstrip(".") or "body", _EVENT_FIELDS)
    type_ = _string(obj, "type", where, required=True, max_chars=MAX_TYPE_CHARS, allow_empty=False)
    assert type_ is not None
    key = _string(obj, "key", where, required=False, max_chars=MAX_KEY_CHARS, allow_empty=True)
    id_ = _string(obj, "id", where, required=False, max_chars=MAX_ID_CHARS, allow_empty=False)
    return EventIn(type=type_, payload=obj.get("payload"), key=key, id=id_)


def parse_batch(value: Any) -> list[EventIn]:
    """``{events: [event, ...]}`` with 1..MAX_BATCH_EVENTS events."""
    obj = require_object(value, "body", _BATCH_FIELDS)
    if "events" not in obj:
        raise BadRequest("events is required")
    events = obj["events"]
    if not isinstance(events, list):
        raise BadRequest(f"events must be an array, not {_json_kind(events)}")
    if not 1 <= len(events) <= MAX_BATCH_EVENTS:
        raise BadRequest(f"events must hold 1 to {MAX_BATCH_EVENTS} events (got {len(events)})")
    return [parse_event(item, f"events[{i}].") for i, item in enumerate(events)]


def validate_raft_address(value: Any, field: str = "raft") -> str:
    """``host:port`` (IPv6 as ``[addr]:port``) with port 1..65535."""
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string host:port, not {_json_kind(value)}")
    host, sep, port = value.rpartition(":")
    if (
        not sep
        or not (_HOSTNAME.fullmatch(host) or _IPV6.fullmatch(host))
        or not _DIGITS.fullmatch(port)
        or not 1 <= int(port) <= 65535
    ):
        raise BadRequest(f"{field} must look like host:port with port 1..65535, got {value!r:.80}")
    return value


def _validate_api_url(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"api must be an http(s) URL string, not {_json_kind(value)}")
    if len(value) > MAX_URL_CHARS:
        raise BadRequest(f"api must be at most {MAX_URL_CHARS} characters")
    try:
        url = URL(value)
        ok = url.scheme in ("http", "https") and bool(url.host) and url.is_absolute()
        if ok:
            url.port  # noqa: B018 - raises ValueError on a bad port
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise BadRequest(f"api must be an http(s) URL like http://host:port, got {value!r:.80}")
    return value


def parse_member(value: Any) -> tuple[str, str | None]:
    """``{raft: "host:port", api?: "http://host:port"}`` → (raft, api)."""
    obj = require_object(value, "body", _MEMBER_FIELDS)
    if obj.get("raft") is None:
        raise BadRequest("raft is required")
    return validate_raft_address(obj["raft"]), _validate_api_url(obj.get("api"))


def _single(query: MultiMapping[str], name: str) -> str | None:
    values = query.getall(name, [])
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"query parameter {name} is given more than once")
    return values[0]


def _query_int(text: str | None, name: str, *, minimum: int, maximum: int) -> int | None:
    if text is None:
        return None
    if not _DIGITS.fullmatch(text) or not minimum <= int(text) <= maximum:
        raise BadRequest(
            f"query parameter {name} must be an integer from {minimum} to {maximum}, "
            f"got {text!r:.40}"
        )
    return int(text)


def parse_event_query(query: MultiMapping[str]) -> EventQuery:
    """``after``, ``type``, ``limit``, ``min_index``, ``consistent`` from a MultiDict.

    Unknown parameters are ignored (cache busters, tracing tags).
    """
    after = _query_int(_single(query, "after"), "after", minimum=0, maximum=INT64_MAX)
    limit = _query_int(_single(query, "limit"), "limit", minimum=1, maximum=MAX_LIMIT)
    min_index = _query_int(_single(query, "min_index"), "min_index", minimum=0, maximum=INT64_MAX)
    type_ = _single(query, "type")
    if type_ is not None:
        if not type_:
            raise BadRequest("query parameter type must not be empty")
        if len(type_) > MAX_TYPE_CHARS:
            raise BadRequest(f"query parameter type must be at most {MAX_TYPE_CHARS} characters")
        _require_utf8(type_, "query parameter type")
    consistent_text = _single(query, "consistent")
    consistent = False
    if consistent_text is not None:
        lowered = consistent_text.lower()
        if lowered in ("true", "1"):
            consistent = True
        elif lowered not in ("false", "0"):
            raise BadRequest(
                f"query parameter consistent must be true, false, 1 or 0, "
                f"got {consistent_text!r:.40}"
            )
    return EventQuery(
        after=0 if after is None else after,
        type=type_,
        limit=DEFAULT_LIMIT if limit is None else limit,
        min_index=min_index,
        consistent=consistent,
    )
