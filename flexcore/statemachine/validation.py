"""Small, deterministic checks for command bodies.

Handlers validate a whole body before they mutate anything; a failed check raises
``Invalid`` whose message names the field and the reason, and the state machine turns
it into ``Err("invalid", message)``. Messages never embed client-supplied values, so
they stay short whatever the client sent.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any


class Invalid(Exception):
    """A command body failed validation; ``str(exc)`` says which field and why."""

    code = "invalid"
    """The ``Err`` code the state machine answers with."""


class Refused(Invalid):
    """A valid command the current state refuses, with its own ``Err`` code (e.g.
    ``lease_expired``, ``not_found``). Raised before any mutation, like ``Invalid``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _kind(value: object) -> str:
    return "nil" if value is None else type(value).__name__


def require_map(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise Invalid(f"{where} must be a map, got {_kind(value)}")
    return value


def check_keys(body: Mapping[str, Any], where: str, *, required: Collection[str],
               optional: Collection[str] = ()) -> None:
    """Every required key present, no key outside required + optional."""
    for key in required:
        if key not in body:
            raise Invalid(f"{where}.{key} is required")
    allowed = set(required) | set(optional)
    unknown = sorted(str(key)[:64] for key in body if key not in allowed)
    if unknown:
        raise Invalid(f"{where} has unknown field(s): {', '.join(unknown)}")


def require_str(body: Mapping[str, Any], key: str, where: str, *, max_len: int,
                allow_empty: bool = False) -> str:
    """A string of at most ``max_len`` characters, non-empty unless ``allow_empty``."""
    value = body.get(key)
    if not isinstance(value, str) or not (0 if allow_empty else 1) <= len(value) <= max_len:
        raise Invalid(_str_message(value, key, where, max_len, allow_empty, nullable=False))
    return value


def optional_str(body: Mapping[str, Any], key: str, where: str, *, max_len: int,
                 allow_empty: bool = False) -> str | None:
    """Like ``require_str``, but a missing key or nil gives None."""
    if body.get(key) is None:
        return None
    value = body[key]
    if not isinstance(value, str) or not (0 if allow_empty else 1) <= len(value) <= max_len:
        raise Invalid(_str_message(value, key, where, max_len, allow_empty, nullable=True))
    return value


def _str_message(value: object, key: str, where: str, max_len: int, allow_empty: bool,
                 nullable: bool) -> str:
    what = "a string" if allow_empty else "a non-empty string"
    got = _kind(value) + (f" of length {len(value)}" if isinstance(value, str) else "")
    return (f"{where}.{key} must be {what} of at most {max_len} characters"
            f"{' or nil' if nullable else ''}, got {got}")


def require_int(body: Mapping[str, Any], key: str, where: str, *, minimum: int,
                maximum: int) -> int:
    value = body.get(key)
    if type(value) is not int or not minimum <= value <= maximum:
        raise Invalid(f"{where}.{key} must be an integer in [{minimum}, {maximum}], "
                      f"got {_kind(value)}")
    return value
