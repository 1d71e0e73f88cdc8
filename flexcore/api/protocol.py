"""What the admin API needs from a node: a small Protocol and its plain data types.

The HTTP layer (`flexcore.api.app`) depends only on this module and on
`flexcore.errors`; it never sees Raft or the state machine. `flexcore.service`
implements it for a real node; tests may implement it too.

Service methods raise `flexcore.errors.FlexCoreError` subclasses; the API maps
them to status codes and the error envelope.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class EventIn:
    """One event a client asked to publish (already validated by the API)."""

    type: str
    payload: Any = None
    key: str | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class PublishOutcome:
    """Offsets and ids of a committed publish, in request order.

    ``duplicates[i]`` is true when ``ids[i]`` was already in the log, in which case
    ``offsets[i]`` is the offset of the first publish and nothing was appended.
    ``index`` is the Raft log index of the entry that committed the publish.
    """

    offsets: list[int]
    ids: list[str]
    duplicates: list[bool]
    index: int


@dataclass(frozen=True, slots=True)
class EventQuery:
    after: int = 0
    type: str | None = None
    limit: int = 100
    min_index: int | None = None
    consistent: bool = False


@dataclass(frozen=True, slots=True)
class EventPage:
    """Events ascending by offset; ``next`` is the ``after`` of the next page."""

    events: list[dict[str, Any]]
    next: int


class NodeService(Protocol):
    """The node as the admin API sees it."""

    def health(self) -> dict[str, Any]:
        """Liveness facts of this process (always answerable)."""
        ...

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, facts): ready when a leader is known and the log is applied
        up to the commit index."""
        ...

    def cluster(self) -> dict[str, Any]:
        """The body of ``GET /v1/cluster``: node, leader, term, commit_index,
        applied_index, ready, members [{id, api, role, status}]."""
        ...

    async def publish(self, events: Sequence[EventIn]) -> PublishOutcome: ...

    async def read_events(self, query: EventQuery) -> EventPage: ...

    async def add_member(self, raft: str, api: str | None) -> dict[str, Any]: ...

    async def remove_member(self, raft: str) -> dict[str, Any]: ...

    def metrics(self) -> tuple[bytes, str]:
        """Prometheus exposition: (body, content type)."""
        ...
