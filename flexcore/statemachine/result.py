"""What applying a command returns: ``Ok(value)`` or ``Err(code, message)``.

A committed command never raises inside the state machine (an exception in a Raft
replicated method would wedge the cluster); every failure is an ``Err`` whose ``code``
a client can branch on and whose ``message`` says what to fix.

Imports nothing from FlexCore.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Error codes carried by ``Err.code``.
MALFORMED = "malformed"
"""The envelope is not decodable or has the wrong shape."""
UNSUPPORTED_VERSION = "unsupported_version"
"""The envelope's ``v`` is not a version this code understands."""
UNKNOWN_COMMAND = "unknown_command"
"""The envelope's ``type`` names no command."""
INVALID = "invalid"
"""The body failed validation; the message names the field and the reason."""
INTERNAL = "internal"
"""A bug: the command raised. State was validated before mutation, so it is intact."""


@dataclass(frozen=True, slots=True)
class Ok:
    """The command was applied (or was a recognised duplicate); ``value`` is its answer."""

    value: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Err:
    """The command was refused; nothing in the state machine changed because of it."""

    code: str
    message: str


Result = Ok | Err
