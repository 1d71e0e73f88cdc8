"""Queues through the library and the HTTP API of one in-process node: `app.queues`,
``consume()``, ``@app.worker`` (ack on success, nack with backoff on an exception,
dead letters after max_attempts), long-poll wake-ups, and a prompt stop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from flexcore import FlexCore, Settings
from flexcore.cluster import free_ports
from flexcore.queues import Message


def _app(tmp_path: Path) -> tuple[FlexCore, str]:
    raft, api = free_ports(2)
    app = FlexCore(Settings(self_addr=f"127.0.0.1:{raft}", api=f"127.0.0.1:{api}",
                            data_dir=tmp_path / "d"))
    return app, f"http://127.0.0.1:{api}"


async def _until(what: str, probe: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_worker_acks_retries_with_backoff_and_dead_letters(tmp_path: Path) -> None:
    app, _ = _app(tmp_path)
    seen: list[tuple[Any, int]] = []
    ok: list[Any] = []

    @app.worker("emails", concurrency=3, visibility_s=10, max_attempts=3, backoff_s=0.1)
    async def send(msg: Message) -> None:
        seen.append((msg.body["n"], msg.attempt))
        if msg.body.get("fail_until", 0) >= msg.attempt:
            raise RuntimeError(f"smtp down (attempt {msg.attempt})")
        ok.append(msg.body["n"])

    async with app:
        for n in range(20):
            await app.queues.enqueue("emails", {"n": n})
        await app.queues.enqueue("emails", {"n": 100, "fail_until": 1})   # ok on attempt 2
        await app.queues.enqueue("emails", {"n": 200, "fail_until": 99})  # never ok
        await _until("all handled", lambda: len(ok) == 21 and
                     (app.queues.stats("emails") or {}).get("dead") == 1)
        stats = app.queues.stats("emails")
        assert stats is not None
        assert (stats["ready"], stats["leased"], stats["delayed"]) == (0, 0, 0)
        assert stats["totals"]["acked"] == 21 and stats["options"]["max_deliveries"] == 3
        assert sorted(ok) == [*range(20), 100]
        assert [a for n, a in seen if n == 100] == [1, 2]
        assert [a for n, a in seen if n == 200] == [1, 2, 3]
        [dead] = app.node.queues.dead("emails")
        assert dead["body"]["n"] == 200 and "smtp down (attempt 3)" in dead["error"]
        worker = app.workers[0]
        assert worker.handled == 21 and worker.failed == 4
        async with aiohttp.ClientSession() as http, \
                http.get(f"{app.settings.advertised_api}/metrics") as resp:
            metrics = (await resp.text()).splitlines()
        for line in ('flexcore_queue_messages{queue="emails",state="ready"} 0.0',
                     'flexcore_queue_messages{queue="emails",state="dead"} 1.0',
                     'flexcore_queue_operations_total{op="acked",queue="emails"} 21.0',
                     'flexcore_queue_operations_total{op="enqueued",queue="emails"} 22.0'):
            assert line in metrics, (line, [m for m in metrics if "queue" in m])


async def test_worker_keeps_the_lease_of_a_handler_slower_than_visibility(
        tmp_path: Path) -> None:
    """A handler that runs 4x its visibility timeout: its lease is extended meanwhile,
    so no other loop gets the message; with extensions off it is delivered again."""
    app, _ = _app(tmp_path)
    seen: dict[str, list[int]] = {"kept": [], "lost": []}

    @app.worker("slow", concurrency=2, visibility_s=0.5)
    async def slow(msg: Message) -> None:
        seen["kept"].append(msg.attempt)
        await asyncio.sleep(2.0)

    @app.worker("slow-off", concurrency=2, visibility_s=0.5, extend_leases=False)
    async def slow_off(msg: Message) -> None:
        seen["lost"].append(msg.attempt)
        await asyncio.sleep(2.0)

    async with app:
        await app.queues.enqueue("slow", "job")
        await app.queues.enqueue("slow-off", "job")
        await _until("the slow message acked", lambda: (app.queues.stats("slow") or {})
                     .get("totals", {}).get("acked") == 1)
        stats = app.queues.stats("slow")
        assert stats is not None and app.workers[0].handled == 1
        assert stats["totals"]["leased"] == 1 and stats["totals"]["expired"] == 0, stats
        assert seen["kept"] == [1]
        # Control: without extensions the second loop got it after 0.5 s.
        await _until("the unextended message redelivered", lambda: len(seen["lost"]) >= 2)
        assert seen["lost"][:2] == [1, 2]


async def test_worker_timeout_cancels_a_hung_handler_and_stops_extending(
        tmp_path: Path) -> None:
    """A handler that never returns holds its lease only for ``timeout_s``: then it is
    cancelled, the message nacked with a "timed out" error and, after max_attempts,
    dead-lettered; the extensions do not outlive it."""
    app, _ = _app(tmp_path)
    cancelled: list[int] = []

    @app.worker("hung", visibility_s=0.3, timeout_s=0.8, max_attempts=2, backoff_s=0.05)
    async def hung(msg: Message) -> None:
        try:
            await asyncio.Event().wait()   # never set
        except asyncio.CancelledError:
            cancelled.append(msg.attempt)
            raise

    async with app:
        await app.queues.enqueue("hung", "job")
        await _until("the hung message dead-lettered",
                     lambda: (app.queues.stats("hung") or {}).get("dead") == 1)
        assert cancelled == [1, 2]
        stats = app.queues.stats("hung")
        assert stats is not None
        # Held by extensions past its 0.3 s visibility, never expired and redelivered.
        assert stats["totals"]["expired"] == 0 and stats["totals"]["leased"] == 2, stats
        [dead] = app.node.queues.dead("hung")
        assert "handler timed out after 0.8 s" in dead["error"], dead
        assert app.workers[0].failed == 2
    try:
        app.worker("x", timeout_s=0)
    except ValueError as exc:
        assert "timeout_s" in str(exc)
    else:
        raise AssertionError("timeout_s=0 accepted")


async def test_consume_long_poll_wakes_on_enqueue_and_delay(tmp_path: Path) -> None:
    app, _ = _app(tmp_path)
    async with app:
        await app.node.services.barrier()   # a leader is elected: timings are the queue's
        got: list[tuple[Any, float]] = []

        async def consumer() -> None:
            async for msg in app.queues.consume("jobs", wait_s=20):
                got.append((msg.body, time.monotonic()))
                await msg.ack()
                if len(got) == 2:
                    return

        task = asyncio.create_task(consumer())
        await _until("the consumer parked in a long-poll",
                     lambda: app.node.queues.waiting("jobs") == 1)
        t0 = time.monotonic()
        await app.queues.enqueue("jobs", "now")
        await app.queues.enqueue("jobs", "later", delay_s=1.0)
        await asyncio.wait_for(task, 10)
        (b1, t1), (b2, t2) = got
        assert (b1, b2) == ("now", "later")
        assert t1 - t0 < 0.5, "woken by the apply path, not a poll interval"
        assert 0.9 <= t2 - t0 < 2.0, "woken by the delay timer"


async def test_http_queue_api_and_prompt_stop(tmp_path: Path) -> None:
    app, url = _app(tmp_path)
    await app.start()
    try:
        async with aiohttp.ClientSession() as http:
            async def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
                async with http.request(method, url + path, json=body) as resp:
                    return resp.status, await resp.json()

            assert await call("GET", "/v1/queues/q") == (404, {"error": {
                "code": "not_found", "message": "queue q does not exist"}})
            code, first = await call("POST", "/v1/queues/q/messages",
                                     {"body": {"a": 1}, "dedup_id": "x"})
            assert code == 201 and first["duplicate"] is False
            code, again = await call("POST", "/v1/queues/q/messages",
                                     {"body": {"a": 2}, "dedup_id": "x"})
            assert code == 201 and again["id"] == first["id"] and again["duplicate"]
            code, out = await call("POST", "/v1/queues/q/lease",
                                   {"consumer": "c", "visibility_s": 0.3})
            assert code == 200
            [m] = out["messages"]
            assert m["body"] == {"a": 1} and m["attempt"] == 1
            await asyncio.sleep(max(0.0, m["expires_at"] / 1000 - time.time()) + 0.05)
            code, out = await call("POST", "/v1/queues/q/lease", {"consumer": "d"})
            [m2] = out["messages"]
            assert m2["id"] == m["id"] and m2["attempt"] == 2
            code, err = await call("POST", "/v1/queues/q/ack", {"lease_id": m["lease_id"]})
            assert code == 409 and err["error"]["code"] == "lease_expired"
            assert (await call("POST", "/v1/queues/q/ack", {"lease_id": m2["lease_id"]}))[0] \
                == 200
            # Extend: the lease outlives its first expiry; stale or malformed: refused.
            await call("POST", "/v1/queues/q/messages", {"body": "slow"})
            code, out = await call("POST", "/v1/queues/q/lease",
                                   {"consumer": "c", "visibility_s": 0.5})
            [slow] = out["messages"]
            code, ext = await call("POST", "/v1/queues/q/extend",
                                   {"lease_id": slow["lease_id"], "visibility_s": 5})
            assert code == 200 and ext["lease_id"] == slow["lease_id"], ext
            assert ext["expires_at"] >= slow["expires_at"] + 4000
            await asyncio.sleep(max(0.0, slow["expires_at"] / 1000 - time.time()) + 0.1)
            assert (await call("POST", "/v1/queues/q/lease", {"consumer": "d"}))[1] \
                == {"messages": []}
            bad_extends: list[tuple[dict[str, Any], str]] = [
                ({}, "lease_id"), ({"lease_id": "x", "visibility_s": 0}, "visibility_s"),
                ({"lease_id": "x", "delay_s": 1}, "delay_s")]
            for bad_ext, what in bad_extends:
                code, err = await call("POST", "/v1/queues/q/extend", bad_ext)
                assert code == 400 and what in err["error"]["message"], (bad_ext, err)
            assert (await call("POST", "/v1/queues/q/ack", {"lease_id": slow["lease_id"]}))[0] \
                == 200
            code, err = await call("POST", "/v1/queues/q/extend",
                                   {"lease_id": slow["lease_id"]})
            assert code == 409 and err["error"]["code"] == "lease_expired"
            code, listing = await call("GET", "/v1/queues")
            assert listing == {"queues": [{"name": "q", "ready": 0, "leased": 0,
                                           "delayed": 0, "dead": 0}]}
            code, info = await call("PUT", "/v1/queues/q", {"visibility_s": 5,
                                                            "max_deliveries": 2,
                                                            "max_dead": 50})
            assert code == 200 and info["options"] == {
                "visibility_s": 5.0, "max_deliveries": 2, "dedup_window_s": 300.0,
                "max_dead": 50}
            code, err = await call("PUT", "/v1/queues/q", {"max_dead": 0})
            assert code == 400 and "max_dead" in err["error"]["message"], err
            for bad, field in (({"body": 1, "priority": 1.5}, "priority"),
                               ({"body": 1, "delay_s": -1}, "delay_s"),
                               ({"body": 1, "deliver_at": "tomorrow"}, "deliver_at"),
                               ({"priority": 1}, "body"), ({"body": 1, "x": 1}, "x")):
                code, err = await call("POST", "/v1/queues/q/messages", bad)
                assert code == 400 and field in err["error"]["message"], (bad, err)
            code, err = await call("POST", "/v1/queues/bad%20name/messages", {"body": 1})
            assert code == 400 and "queue name" in err["error"]["message"]
            code, err = await call("POST", "/v1/queues/q/lease", {"consumer": "c",
                                                                  "wait_s": 21})
            assert code == 400 and "wait_s" in err["error"]["message"]
            # A long-poll in flight must not hold the node's shutdown.
            poll = asyncio.create_task(call("POST", "/v1/queues/empty/lease",
                                            {"consumer": "c", "wait_s": 20}))
            await _until("the HTTP lease parked", lambda: app.node.queues.waiting("empty") == 1)
            t0 = time.monotonic()
            await app.stop()
            assert time.monotonic() - t0 < 3.0
            assert (await poll) == (200, {"messages": []})
    finally:
        await app.stop()
