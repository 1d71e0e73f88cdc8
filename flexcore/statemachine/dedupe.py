"""Request dedupe (Raft paper §8): answer a retried proposal from its first application.

A proposer that does not learn the outcome of a command (timeout, lost leader) may
propose it again with the same ``rid``. The state machine remembers the ``Result`` of
the last ``MAX_RIDS`` rids (FIFO by first application) and answers a repeat from memory
instead of applying it twice. Results are stored msgpack-encoded: compact, immutable
(callers get a fresh copy) and written into snapshots as they are.

The memory is also capped at ``MAX_BYTES`` of stored results (a 1000-event publish
answer is ~45 KB): the oldest entries go first when either limit is passed. Eviction
depends only on the applied commands, so it is deterministic. A retry that arrives after
its rid was evicted is applied again; for ``event.publish`` the event ids still make it
idempotent (the answer then reports ``duplicates``).
"""

from __future__ import annotations

from collections import OrderedDict

from flexcore.statemachine.codec import pack_plain, unpack_plain
from flexcore.statemachine.result import Err, Ok, Result

MAX_RIDS = 10_000
MAX_BYTES = 64 * 1024 * 1024


def encode_result(result: Result) -> bytes:
    if isinstance(result, Ok):
        return pack_plain(["ok", result.value])
    return pack_plain(["err", result.code, result.message])


def decode_result(raw: bytes) -> Result:
    """Inverse of ``encode_result``; ``ValueError`` for anything else."""
    obj = unpack_plain(raw)
    if isinstance(obj, list) and len(obj) == 2 and obj[0] == "ok" and isinstance(obj[1], dict):
        return Ok(obj[1])
    if (isinstance(obj, list) and len(obj) == 3 and obj[0] == "err"
            and isinstance(obj[1], str) and isinstance(obj[2], str)):
        return Err(obj[1], obj[2])
    raise ValueError("not an encoded Result")


class RequestDedupe:
    """Bounded FIFO map rid -> encoded Result."""

    def __init__(self, max_rids: int = MAX_RIDS, max_bytes: int = MAX_BYTES) -> None:
        self._max_rids = max_rids
        self._max_bytes = max_bytes
        self._results: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._results)

    def __contains__(self, rid: str) -> bool:
        return rid in self._results

    def get(self, rid: str) -> Result | None:
        raw = self._results.get(rid)
        return None if raw is None else decode_result(raw)

    def remember(self, rid: str, result: Result) -> None:
        """Store the result of the first application of ``rid`` and evict if needed."""
        if rid in self._results:
            return
        raw = encode_result(result)
        self._results[rid] = raw
        self._bytes += len(raw)
        while len(self._results) > self._max_rids or (
                self._bytes > self._max_bytes and len(self._results) > 1):
            _, dropped = self._results.popitem(last=False)
            self._bytes -= len(dropped)

    def to_snapshot(self) -> list[list[str | bytes]]:
        return [[rid, raw] for rid, raw in self._results.items()]

    @classmethod
    def from_snapshot(cls, obj: object) -> RequestDedupe:
        if not isinstance(obj, list):
            raise ValueError("dedupe section must be a list")
        dedupe = cls()
        for row in obj:
            if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str)
                    and isinstance(row[1], bytes)):
                raise ValueError("each dedupe entry must be [rid, encoded result]")
            if row[0] in dedupe._results:
                raise ValueError("dedupe section repeats a rid")
            decode_result(row[1])
            dedupe._results[row[0]] = row[1]
            dedupe._bytes += len(row[1])
        return dedupe
