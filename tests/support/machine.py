"""Drive a `StateMachine` directly in unit tests: commands stamped with a settable
proposer clock (ms) and increasing log indices, with Ok/Err assertions."""

from __future__ import annotations

import itertools
from typing import Any

from flexcore.statemachine import Command, Err, Ok, Result, StateMachine


class MachineDriver:
    """A state machine plus a settable proposer clock (ms)."""

    def __init__(self, now: int = 1_000_000) -> None:
        self.sm = StateMachine()
        self.now = now
        self._index = itertools.count(1)

    def run(self, type_: str, body: dict[str, Any]) -> Result:
        return self.sm.apply(Command(type_, body, self.now), next(self._index))

    def ok(self, type_: str, body: dict[str, Any]) -> dict[str, Any]:
        result = self.run(type_, body)
        assert isinstance(result, Ok), result
        return result.value

    def err(self, type_: str, body: dict[str, Any], code: str) -> str:
        result = self.run(type_, body)
        assert isinstance(result, Err) and result.code == code, result
        return result.message
