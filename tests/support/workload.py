"""Client-side workload and checker for the integration tests.

Writers publish events with unique client ids and record what the cluster answered:
``acked`` (201), ``failed`` (a definite 4xx), ``unknown`` (timeout, 503, connection
error: the write may or may not have committed). The checker reads every node's log
and asserts the invariants: every acked id present exactly once, no id twice, and
identical logs everywhere.
"""

from __future__ import annotations

import collections
import itertools
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flexcore.cluster import ClusterObserver, http_json


def read_all(url: str, *, consistent: bool = False, min_index: int | None = None,
             token: str | None = None) -> list[dict[str, Any]]:
    """Every retained event of one node, ascending by offset."""
    events: list[dict[str, Any]] = []
    after = 0
    first = True
    while True:
        q = f"after={after}&limit=1000"
        if first and consistent:
            q += "&consistent=true"
        if first and min_index is not None:
            q += f"&min_index={min_index}"
        code, body = http_json("GET", f"{url}/v1/events?{q}", timeout=10, token=token)
        assert code == 200, (url, code, body)
        first = False
        events.extend(body["events"])
        if not body["events"] or body["next"] <= after:
            return events
        after = body["next"]


@dataclass(frozen=True)
class Op:
    """One write as the client saw it (monotonic times)."""

    id: str
    node: int
    start: float
    end: float
    code: int


@dataclass
class History:
    acked: dict[str, int] = field(default_factory=dict)      # id -> offset answered
    unknown: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    ops: list[Op] = field(default_factory=list)
    max_index: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acked_by(self, node: int, after: float, before: float) -> list[Op]:
        """Writes sent to ``node`` strictly inside (after, before) that got 201."""
        with self.lock:
            return [op for op in self.ops if op.node == node and op.code == 201
                    and op.start > after and op.end < before]

    def summary(self) -> str:
        return (f"ok={len(self.acked)} unknown={len(self.unknown)} "
                f"failed={len(self.failed)} max_index={self.max_index}")


class Writers:
    """``n`` threads publishing events with unique ids to random live nodes."""

    def __init__(self, cluster: ClusterObserver, n: int = 4, prefix: str = "w",
                 timeout: float = 8.0) -> None:
        self.cluster = cluster
        self.history = History()
        self._stop = threading.Event()
        self._seq = itertools.count()
        self._timeout = timeout
        self._threads = [threading.Thread(target=self._run, args=(f"{prefix}{i}",), daemon=True)
                         for i in range(n)]

    def __enter__(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> History:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        return self.history

    def count(self) -> int:
        return len(self.history.acked)

    def _run(self, name: str) -> None:
        rng = random.Random(name)
        h = self.history
        while not self._stop.is_set():
            live = self.cluster.live()
            if not live:
                self._stop.wait(0.05)
                continue
            node = rng.choice(live)
            eid = f"{name}-{next(self._seq)}"
            start = time.monotonic()
            try:
                code, body = http_json("POST", node.url + "/v1/events",
                                       {"type": "test.write", "id": eid,
                                        "payload": {"writer": name}},
                                       timeout=self._timeout)
            except OSError:
                code, body = 0, None
            with h.lock:
                h.ops.append(Op(eid, node.index, start, time.monotonic(), code))
                if code == 201:
                    h.acked[eid] = body["offset"]
                    h.max_index = max(h.max_index, body["index"])
                elif 400 <= code < 500:
                    h.failed.add(eid)
                else:
                    h.unknown.add(eid)
            if code != 201:
                self._stop.wait(0.05)


def check_logs(logs: Sequence[list[dict[str, Any]]], history: History) -> None:
    """The invariants every integration/chaos test ends with."""
    assert logs, "no node to check"
    first = logs[0]
    for i, other in enumerate(logs[1:], start=1):
        assert len(other) == len(first), f"node {i} has {len(other)} events, node 0 {len(first)}"
        assert other == first, f"node {i}'s log differs from node 0's"
    ids = [e["id"] for e in first]
    dupes = [i for i, c in collections.Counter(ids).items() if c > 1]
    assert not dupes, f"ids stored twice: {dupes[:10]}"
    offsets = [e["offset"] for e in first]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    present = {e["id"]: e["offset"] for e in first}
    missing = [i for i in history.acked if i not in present]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:10]}"
    moved = [i for i, off in history.acked.items() if present[i] != off]
    assert not moved, f"acknowledged offsets changed for {moved[:10]}"
    assert not (history.failed & present.keys()), "a write answered 4xx was applied"
