"""Typed errors that cross FlexCore's layers.

Every error carries a stable ``code`` a client can branch on, a ``message`` a person
can act on, and the HTTP ``status`` the admin API answers with. The API turns any of
them into ``{"error": {"code": ..., "message": ...}}``.

This module imports nothing from FlexCore: every layer may raise these.
"""

from __future__ import annotations

from typing import Any


class FlexCoreError(Exception):
    """Base class: an error with a code, a message and an HTTP status."""

    code = "internal"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return {"error": body}


# --- client mistakes (4xx) -------------------------------------------------------------

class BadRequest(FlexCoreError):
    """The request is malformed or a field has the wrong type or value."""

    code = "bad_request"
    status = 400


class Unauthorized(FlexCoreError):
    code = "unauthorized"
    status = 401


class NotFound(FlexCoreError):
    code = "not_found"
    status = 404


class Conflict(FlexCoreError):
    code = "conflict"
    status = 409


class PayloadTooLarge(FlexCoreError):
    code = "payload_too_large"
    status = 413


# --- consensus and availability (5xx) ------------------------------------------------

class ConsensusError(FlexCoreError):
    """A proposal did not commit. ``retryable`` says whether a retry may succeed."""

    code = "consensus_error"
    status = 503
    retryable = True


class NotLeader(ConsensusError):
    """The node that received a command is not (or no longer) the leader."""

    code = "not_leader"


class NoLeader(ConsensusError):
    """No leader is known: an election is running or this node is cut off."""

    code = "no_quorum"


class NoQuorum(ConsensusError):
    """A majority of the cluster cannot be reached, so nothing can commit."""

    code = "no_quorum"


class ProposalTimeout(ConsensusError):
    """The command did not commit before its deadline; its outcome is unknown."""

    code = "timeout"


class ShuttingDown(ConsensusError):
    code = "shutting_down"


class CommandRejected(FlexCoreError):
    """The state machine refused a committed command (``Err`` result)."""

    code = "rejected"
    status = 400
