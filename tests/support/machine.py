"""Drive a `StateMachine` directly in unit tests: commands stamped with a settable
proposer clock (ms) at the machine's next log index, with Ok/Err assertions.

The next index is derived from the machine (``applied_index + 1``), never counted on
the side, so a machine restored from a snapshot simply continues."""

from __future__ import annotations

from typing import Any

from flexcore.statemachine import Command, Err, Ok, Result, StateMachine


class MachineDriver:
    """A state machine plus a settable proposer clock (ms)."""

    def __init__(self, now: int = 1_000_000) -> None:
        self.sm = StateMachine()
        self.now = now

    def run(self, type_: str, body: dict[str, Any]) -> Result:
        return run(self.sm, type_, body, ts=self.now)

    def ok(self, type_: str, body: dict[str, Any]) -> dict[str, Any]:
        result = self.run(type_, body)
        assert isinstance(result, Ok), result
        return result.value

    def err(self, type_: str, body: dict[str, Any], code: str) -> str:
        result = self.run(type_, body)
        assert isinstance(result, Err) and result.code == code, result
        return result.message


def run(sm: StateMachine, type_: str, body: dict[str, Any], *, ts: int = 10_000) -> Result:
    """Apply one command at ``sm``'s next log index."""
    return sm.apply(Command(type_, body, ts, None), sm.applied_index + 1)


def ok(result: Result) -> dict[str, Any]:
    assert isinstance(result, Ok), result
    return result.value


def refused(result: Result, code: str, fragment: str = "") -> None:
    assert isinstance(result, Err), result
    assert result.code == code, result
    assert fragment in result.message, result.message
