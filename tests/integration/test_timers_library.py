"""Timers in an embedded FlexCore (one node, in this test's event loop): ``@app.timer``
handlers, the enqueue action, manual triggers, pause, and the schedules API."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import pytest

from flexcore import FlexCore, Settings
from flexcore.api.schedules import parse_schedule
from flexcore.cluster import free_ports, http_json
from flexcore.timers import Fire


async def wait_until(what: str, probe: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_app_timer_handlers_enqueue_and_manual_triggers(tmp_path: Path) -> None:
    raft, api = free_ports(2)
    app = FlexCore(Settings(self_addr=f"127.0.0.1:{raft}", api=f"127.0.0.1:{api}",
                            data_dir=tmp_path / "d"))
    seen: list[Fire] = []
    sync_seen: list[int] = []

    @app.timer({"interval_s": 0.2}, id="lib-tick")
    async def tick(fire: Fire) -> None:
        seen.append(fire)

    @app.timer("* * * * * *")                   # 6 fields: every second, id = "report"
    def report(fire: Fire) -> None:
        sync_seen.append(fire.fire_time_ms)

    with pytest.raises(ValueError, match="cron"):
        app.timer("61 * * * *", id="bad")
    with pytest.raises(ValueError, match="timezone"):
        app.timer("* * * * *", id="bad", timezone="Nowhere/Land")

    async with app:
        await app.timers_ready()
        await wait_until("three ticks", lambda: asyncio.sleep(0, len(seen) >= 3))
        await wait_until("a report", lambda: asyncio.sleep(0, len(sync_seen) >= 1))
        assert len({f.fire_time_ms for f in seen}) == len(seen)
        assert all(f.schedule_id == "lib-tick" and not f.manual for f in seen)
        # On the 200 ms grid and increasing; under CPU load the misfire policy may skip
        # a late fire, so consecutive fires are not always exactly 200 ms apart.
        assert all(b.fire_time_ms > a.fire_time_ms and (b.fire_time_ms - a.fire_time_ms) % 200
                   == 0 for a, b in itertools.pairwise(seen))
        assert all(ms % 1000 == 0 for ms in sync_seen)

        # The enqueue action: one message per fire, its dedup id names the fire.
        put = await app.schedules.put("to-queue", parse_schedule({
            "trigger": {"interval_s": 0.2},
            "action": {"type": "enqueue", "queue": "jobs", "body": {"job": "sweep"}}}))
        assert put["created"] is True and put["action"]["queue"] == "jobs"

        async def enqueued() -> int | None:
            info = app.node.machine.component("queues").info("jobs")
            history = (await app.schedules.fires("to-queue"))["fires"]
            ok = [f for f in history if f["status"] == "ok"]
            if info is None or len(ok) < 3:
                return None
            return int(info["totals"]["enqueued"]) if info else None
        assert await wait_until("three enqueued fires", enqueued) >= 3
        await app.schedules.set_enabled("to-queue", False)

        async def settled() -> list[dict[str, Any]] | None:
            rows = (await app.schedules.fires("to-queue", consistent=True))["fires"]
            return None if any(f["status"] == "claimed" for f in rows) else list(rows)
        history = await wait_until("every claimed fire's outcome", settled)
        assert all(f["status"] == "ok" for f in history)
        info = app.node.machine.component("queues").info("jobs")
        assert info["totals"]["enqueued"] == len(history)
        assert info["totals"]["duplicates"] == 0

        # Pause, then a manual trigger still fires (once), marked manual.
        await app.schedules.set_enabled("lib-tick", False)
        count = len(seen)
        trig = await app.schedules.trigger("lib-tick")
        assert trig["status"] == "pending"
        await wait_until("the manual fire", lambda: asyncio.sleep(0, len(seen) > count))
        manual = [f for f in seen if f.manual]
        assert [f.fire_time_ms for f in manual] == [trig["fire_time_ms"]]
        assert manual[0].key.endswith(":manual")
        fires = (await app.schedules.fires("lib-tick", consistent=True))["fires"]
        assert fires[-1]["manual"] is True and fires[-1]["node"] == f"127.0.0.1:{raft}"

        # The HTTP API answers the same state; bad definitions get a 400 with the reason.
        url = f"http://127.0.0.1:{api}"
        code, listing = await asyncio.to_thread(http_json, "GET", url + "/v1/schedules")
        assert code == 200
        assert [s["id"] for s in listing["schedules"]] == ["lib-tick", "report", "to-queue"]
        assert listing["owner"]["node"] == f"127.0.0.1:{raft}"
        code, err = await asyncio.to_thread(http_json, "PUT", url + "/v1/schedules/x", {
            "trigger": {"cron": "0 9 * * *", "timezone": "Mars/Olympus"},
            "action": {"type": "event", "event_type": "t"}})
        assert code == 400 and "IANA" in err["error"]["message"]
        code, err = await asyncio.to_thread(http_json, "PUT", url + "/v1/schedules/x", {
            "trigger": {"interval_s": -1}, "action": {"type": "event", "event_type": "t"}})
        assert code == 400 and "interval_s" in err["error"]["message"]
        code, err = await asyncio.to_thread(http_json, "GET", url + "/v1/schedules/nope")
        assert code == 404
        code, err = await asyncio.to_thread(http_json, "POST",
                                            url + "/v1/schedules/nope/trigger")
        assert code == 404 and err["error"]["code"] == "not_found"
        code, body = await asyncio.to_thread(http_json, "DELETE", url + "/v1/schedules/report")
        assert code == 200 and body["deleted"] is True
        code, body = await asyncio.to_thread(http_json, "GET", url + "/v1/schedules/report")
        assert code == 404
