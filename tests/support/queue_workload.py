"""Client-side queue workload and checker for the integration and chaos tests.

Producers enqueue messages with unique client ids, using the client id as ``dedup_id``
and retrying until the cluster answers 201, so every message ends acknowledged exactly
once. Consumers lease over HTTP from a preferred node (any live node when it is down),
ack each message, and record every delivery and every ack outcome: ``ok`` (200),
``stale`` (409 ``lease_expired``: the lease expired), ``unknown`` (timeout, 503,
connection error: the ack may or may not have committed; retried with the same lease
id), ``repeat`` (409 "lease already acked" to such a retry: the earlier try committed).
Some first deliveries are deliberately not acked (a consumer "crash"); their lease ids
are acked after expiry and must get 409 saying the lease is not current.

`check` asserts the invariants: nothing lost, nothing left, each message acked exactly
once (one ``ok`` or ``repeat`` over all its deliveries), a redelivery only after the
previous lease expired, never after a committed ack.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from flexcore.cluster import ClusterObserver, http_json

VISIBILITY_S = 5.0


@dataclass(frozen=True)
class Delivery:
    msg_id: str
    cid: str
    attempt: int
    lease_id: str
    expires_at: int          # ms, effective time of the cluster
    consumer: str


@dataclass
class QueueHistory:
    enqueued: dict[str, str] = field(default_factory=dict)          # cid -> message id
    last_enqueue: float = 0.0                                         # monotonic time
    enqueue_retries: int = 0
    deliveries: list[Delivery] = field(default_factory=list)
    acks: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    # ^ message id -> outcomes ("ok" | "stale" | "unknown" | "repeat") of its acks
    ok_lease: dict[str, str] = field(default_factory=dict)         # msg id -> acked lease
    crashed: list[tuple[str, int]] = field(default_factory=list)   # (lease id, expires)
    crashed_total: int = 0
    stale_rejected: int = 0
    stale_accepted: list[str] = field(default_factory=list)
    lease_errors: Counter[str] = field(default_factory=Counter)     # "node code" -> n
    ack_errors: Counter[str] = field(default_factory=Counter)       # "node code" -> n
    thread_errors: list[str] = field(default_factory=list)   # a producer/consumer died
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok_acks(self) -> int:
        with self.lock:
            return len(self.ok_lease)

    def crashed_settled(self) -> bool:
        """Every left-behind lease was acked again after its expiry (and answered)."""
        with self.lock:
            return self.stale_rejected + len(self.stale_accepted) == self.crashed_total


class QueueWorkload:
    """``producers`` threads enqueue ``total`` messages; ``consumers`` threads consume.

    With ``pace_s``, each producer waits that long after each enqueue, so producing
    spans a long fault sequence; `finish_producing` then ends it early: each producer
    completes the message it is on (retrying until acknowledged) and stops. `total`
    then becomes the number actually enqueued."""

    def __init__(self, cluster: ClusterObserver, queue: str, total: int, *, producers: int = 4,
                 consumers: int = 4, crash_every: int = 50, batch: int = 10,
                 pace_s: float = 0.0) -> None:
        self.cluster = cluster
        self.queue = queue
        self.total = total
        self.crash_every = crash_every
        self.batch = batch
        self.pace_s = pace_s
        self.history = QueueHistory()
        self.last_state: Any = None   # the queue as `drained` last saw it
        self._stop = threading.Event()
        self._finish = threading.Event()
        self._producers = [threading.Thread(target=self._guarded, args=(self._produce, p,
                                                                       producers),
                                            daemon=True) for p in range(producers)]
        self._consumers = [threading.Thread(target=self._guarded, args=(self._consume, c),
                                            daemon=True) for c in range(consumers)]

    def __enter__(self) -> QueueWorkload:
        for t in self._producers + self._consumers:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._producers + self._consumers:
            t.join(timeout=30)

    def _guarded(self, body: Any, *args: Any) -> None:
        """Run a worker; record why it died, so a waiting test fails with the reason
        instead of waiting out its deadline."""
        try:
            body(*args)
        except BaseException as exc:
            with self.history.lock:
                self.history.thread_errors.append(f"{body.__name__}{args}: {exc!r}")

    def raise_if_broken(self) -> None:
        if self.history.thread_errors:
            raise AssertionError(f"queue workload threads died: {self.history.thread_errors}")

    def progress(self) -> str:
        """What a waiting test reports when it times out."""
        h = self.history
        with h.lock:
            return (f"enqueued {len(h.enqueued)}/{self.total}, ok acks {len(h.ok_lease)}, "
                    f"producers done {self.producers_done}, crashed leases "
                    f"{h.stale_rejected + len(h.stale_accepted)}/{h.crashed_total} answered, "
                    f"lease errors {dict(h.lease_errors)}, ack errors {dict(h.ack_errors)}, "
                    f"queue last seen {self.last_state}")

    def drained(self) -> bool | None:
        """For `wait_for`: True once the producers are done, every enqueued message is
        acked with nothing left (as the first live node sees it) and every crashed
        lease was acked again; raises at once if a workload thread died."""
        self.raise_if_broken()
        if not self.producers_done:
            return None
        url = self.cluster.live()[0].url
        code, body = http_json("GET", f"{url}/v1/queues/{self.queue}", timeout=10)
        self.last_state = body
        done = (code == 200 and body["totals"]["acked"] == self.total
                and (body["ready"], body["leased"], body["delayed"]) == (0, 0, 0))
        return True if done and self.history.crashed_settled() else None

    @property
    def producers_done(self) -> bool:
        return not any(t.is_alive() for t in self._producers)

    def finish_producing(self, timeout: float = 60.0) -> int:
        """Stop enqueueing new messages; wait for the producers; return the total."""
        self._finish.set()
        for t in self._producers:
            t.join(timeout)
        assert self.producers_done, "producers did not finish their last enqueue"
        self.total = len(self.history.enqueued)
        return self.total

    def _node_url(self, preferred: int) -> str | None:
        live = self.cluster.live()
        nodes = self.cluster.nodes
        node = nodes[preferred % len(nodes)]
        if node in live:
            return node.url
        return live[preferred % len(live)].url if live else None

    def _post(self, preferred: int, path: str, body: Any,
              timeout: float = 10.0) -> tuple[int, Any]:
        code, body, _url = self._post_to(preferred, path, body, timeout)
        return code, body

    def _post_to(self, preferred: int, path: str, body: Any,
                 timeout: float = 10.0) -> tuple[int, Any, str]:
        """POST to the preferred node (or a live one); also say which node answered."""
        url = self._node_url(preferred)
        if url is None:
            return 0, None, "none"
        try:
            code, answer = http_json("POST", f"{url}/v1/queues/{self.queue}{path}", body,
                                     timeout=timeout)
            return code, answer, url
        except OSError:
            return 0, None, url

    def _count_error(self, counter: Counter[str], url: str, code: int, body: Any) -> None:
        what = body.get("error", {}).get("code") if isinstance(body, dict) else None
        with self.history.lock:
            counter[f"{url} {code} {what or ''}".strip()] += 1

    # -- producers -------------------------------------------------------------------

    def _produce(self, p: int, producers: int) -> None:
        h = self.history
        for n in range(p, self.total, producers):
            if self._finish.is_set():
                return
            cid = f"c{n}"
            attempt = 0
            while not self._stop.is_set():
                code, body = self._post(n, "/messages",
                                        {"body": {"cid": cid}, "dedup_id": cid})
                if code == 201:
                    with h.lock:
                        h.enqueued[cid] = body["id"]
                        h.last_enqueue = time.monotonic()
                    break
                attempt += 1
                with h.lock:
                    h.enqueue_retries += 1
                assert code == 0 or code >= 500, (code, body)   # never a 4xx
                self._stop.wait(0.05)
            if self.pace_s:
                self._finish.wait(self.pace_s)

    # -- consumers -------------------------------------------------------------------

    def _consume(self, c: int) -> None:
        h = self.history
        name = f"consumer{c}"
        while not self._stop.is_set():
            self._ack_crashed(c)
            code, body, url = self._post_to(c, "/lease", {"consumer": name,
                                                          "max": self.batch,
                                                          "visibility_s": VISIBILITY_S,
                                                          "wait_s": 1.0})
            if code != 200:
                self._count_error(h.lease_errors, url, code, body)
                self._stop.wait(0.05)
                continue
            for m in body["messages"]:
                d = Delivery(m["id"], m["body"]["cid"], m["attempt"], m["lease_id"],
                             m["expires_at"], name)
                with h.lock:
                    h.deliveries.append(d)
                if d.attempt == 1 and int(d.cid[1:]) % self.crash_every == 0:
                    with h.lock:   # as if this consumer crashed before acking
                        h.crashed.append((d.lease_id, d.expires_at))
                        h.crashed_total += 1
                    continue
                self._ack(c, d)

    def _ack(self, c: int, d: Delivery) -> None:
        h = self.history
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            code, body, url = self._post_to(c, "/ack", {"lease_id": d.lease_id})
            if code == 200:
                with h.lock:
                    h.acks[d.msg_id].append("ok")
                    h.ok_lease[d.msg_id] = d.lease_id
                return
            if code == 409:
                assert body["error"]["code"] == "lease_expired", body
                repeat = body["error"]["message"].startswith("lease already acked")
                with h.lock:
                    # "already acked" only answers a retry: the try before committed.
                    assert not repeat or h.acks[d.msg_id][-1:] == ["unknown"], (d, body)
                    h.acks[d.msg_id].append("repeat" if repeat else "stale")
                    if repeat:
                        h.ok_lease[d.msg_id] = d.lease_id
                return
            assert code == 0 or code >= 500, (code, body)
            self._count_error(h.ack_errors, url, code, body)
            with h.lock:   # outcome unknown: retry with the same lease id
                h.acks[d.msg_id].append("unknown")
            self._stop.wait(0.1)

    def _ack_crashed(self, c: int) -> None:
        """Ack leases left behind once they expired: each must get 409."""
        h = self.history
        now_ms = time.time() * 1000
        with h.lock:
            due = [x for x in h.crashed if x[1] + 100 < now_ms]
            h.crashed = [x for x in h.crashed if x[1] + 100 >= now_ms]
        for lease_id, _expires in due:
            while not self._stop.is_set():
                code, body, url = self._post_to(c, "/ack", {"lease_id": lease_id})
                if code == 409:
                    # Never acked: the refusal must not claim it was.
                    assert "already" not in body["error"]["message"], (lease_id, body)
                    with h.lock:
                        h.stale_rejected += 1
                    break
                if code == 200:
                    with h.lock:
                        h.stale_accepted.append(lease_id)
                    break
                self._count_error(h.ack_errors, url, code, body)
                self._stop.wait(0.1)


def queue_state(url: str, queue: str) -> dict[str, Any]:
    """Stats of ``queue`` on one node after a Raft barrier through that node (so it has
    applied every write acknowledged anywhere before the call)."""
    code, _ = http_json("GET", f"{url}/v1/events?limit=1&consistent=true", timeout=10)
    assert code == 200
    code, body = http_json("GET", f"{url}/v1/queues/{queue}", timeout=10)
    assert code == 200, body
    return dict(body)


def check(history: QueueHistory, total: int, states: list[dict[str, Any]],
          visibility_ms: int) -> dict[str, int]:
    """Assert the invariants; return the figures worth printing."""
    h = history
    assert not h.thread_errors, f"queue workload threads died: {h.thread_errors}"
    # Every enqueue acknowledged, once: the dedup id mapped retries to one message.
    assert len(h.enqueued) == total
    assert len(set(h.enqueued.values())) == total, "two client ids share a message id"
    ids = set(h.enqueued.values())
    # The replicated state agrees everywhere: nothing left, nothing lost, acked once.
    for state in states:
        counts = (state["ready"], state["leased"], state["delayed"], state["dead"])
        assert counts == (0, 0, 0, 0), f"left in the queue: {state}"
        assert state["totals"]["enqueued"] == total, state
        assert state["totals"]["acked"] == total, state   # one ack removes one message
        assert state == states[0], "nodes disagree on the queue"
    # Every message delivered; each acked by at most one successful ack, and those
    # without a successful ack had an ack whose outcome the consumer could not know.
    by_msg: dict[str, list[Delivery]] = defaultdict(list)
    for d in h.deliveries:
        assert d.msg_id in ids, f"delivered a message nobody enqueued: {d}"
        assert h.enqueued[d.cid] == d.msg_id
        by_msg[d.msg_id].append(d)
    missing = ids - by_msg.keys()
    assert not missing, f"{len(missing)} messages never delivered, e.g. {sorted(missing)[:5]}"
    unknown_only = 0
    for msg_id in ids:
        outcomes = h.acks.get(msg_id, [])
        committed = outcomes.count("ok") + outcomes.count("repeat")
        assert committed <= 1, f"message {msg_id} acked twice: {outcomes}"
        if not committed:   # only when the consumer gave up retrying an unknown ack
            assert "unknown" in outcomes, f"message {msg_id} never acked: {outcomes}"
            unknown_only += 1
    # Redelivery only after the previous lease expired, and never after a good ack.
    duplicates = redeliveries = 0
    for msg_id, ds in by_msg.items():
        ds.sort(key=lambda d: d.attempt)
        attempts = [d.attempt for d in ds]
        assert len(set(attempts)) == len(attempts), f"{msg_id} attempt repeated: {ds}"
        for earlier, later in itertools.pairwise(ds):
            leased_at = later.expires_at - visibility_ms
            assert leased_at >= earlier.expires_at, \
                f"{msg_id} redelivered before its lease expired: {earlier} -> {later}"
        if msg_id in h.ok_lease:
            assert ds[-1].lease_id == h.ok_lease[msg_id], \
                f"{msg_id} delivered again after a successful ack"
        if len(ds) > 1:
            duplicates += 1
            redeliveries += len(ds) - 1
    assert not h.stale_accepted, f"acks after expiry were accepted: {h.stale_accepted}"
    return {"messages": total, "deliveries": len(h.deliveries),
            "duplicated_messages": duplicates, "redeliveries": redeliveries,
            "max_attempt": max(d.attempt for d in h.deliveries),
            "stale_acks_rejected": h.stale_rejected,
            "acks_outcome_unknown": sum(o.count("unknown") for o in h.acks.values()),
            "acks_confirmed_by_retry": sum(o.count("repeat") for o in h.acks.values()),
            "messages_acked_only_by_unknown_outcome": unknown_only,
            "enqueue_retries": h.enqueue_retries}
