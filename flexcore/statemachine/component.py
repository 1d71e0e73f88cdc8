"""What a part of the replicated state provides to the `StateMachine`.

Each capability (event log, cluster registry, queues, schedules, ...) is one component:
it names the commands it handles and serialises its own snapshot section. Adding a
capability means writing a component and listing it in `machine.COMPONENTS`; the
machine does dispatch, request dedupe, effective time and the snapshot envelope.

Rules for a component (the machine's contract is theirs too): handlers are
deterministic functions of (state, body, context); they validate the whole body before
changing anything and raise `validation.Invalid` for a bad body; they never read a
clock, randomness or anything outside their arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, Self


@dataclass(frozen=True, slots=True)
class Context:
    """What a handler may know besides the body."""

    now_ms: int     # effective time: monotonic max of the proposers' stamps
    index: int      # Raft log index of the entry that carries the command


Handler = Callable[[Mapping[str, Any], Context], dict[str, Any]]


class Component(Protocol):
    def commands(self) -> Mapping[str, Handler]:
        """Command type -> handler returning the Ok value."""
        ...

    def to_snapshot(self) -> Any:
        """Plain msgpack-able data; equal states must give equal data."""
        ...

    @classmethod
    def from_snapshot(cls, obj: object) -> Self:
        """Rebuild from `to_snapshot()` output; raise ValueError if inconsistent."""
        ...
