"""``GET /v1/events/stream`` (Server-Sent Events) over real HTTP against an in-process
node: live push, type filter, resume with ``Last-Event-ID`` after a disconnect with no
gap and no repeat, and a clean end when the node stops."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from flexcore import FlexCore, Settings
from flexcore.cluster import free_ports


async def _read_events(resp: aiohttp.ClientResponse, n: int,
                       timeout: float = 10.0) -> list[tuple[int, dict[str, Any]]]:
    """Read ``n`` SSE messages: ``(id, data)`` pairs (comments and ``retry`` skipped)."""
    out: list[tuple[int, dict[str, Any]]] = []
    event_id: int | None = None
    async with asyncio.timeout(timeout):
        while len(out) < n:
            line = (await resp.content.readline()).decode()
            assert line, "stream ended early"
            line = line.rstrip("\n")
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: "):
                assert event_id is not None
                out.append((event_id, json.loads(line[6:])))
                event_id = None
    return out


async def test_sse_pushes_filters_and_resumes_without_gap_or_repeat(tmp_path: Path) -> None:
    raft, api = free_ports(2)
    url = f"http://127.0.0.1:{api}/v1/events/stream"
    app = FlexCore(Settings(self_addr=f"127.0.0.1:{raft}", api=f"127.0.0.1:{api}",
                            data_dir=tmp_path / "d"))
    async with app, aiohttp.ClientSession() as http:
        for n in range(20):
            await app.publish("a.x" if n % 2 else "b.y", {"n": n}, key=f"k{n}")
        # From the start, filtered: the ten a.* events, then live ones as they commit.
        seen: list[int] = []
        async with http.get(url, params={"after": "0", "type": "a.*"}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            first = await _read_events(resp, 6)
            seen += [i for i, _ in first]
            assert all(d["type"] == "a.x" and d["offset"] == i for i, d in first)
        # Disconnected after 6 of 10. Meanwhile more events are written.
        for n in range(20, 30):
            await app.publish("a.x" if n % 2 else "b.y", {"n": n})
        headers = {"Last-Event-ID": str(seen[-1])}
        async with http.get(url, params={"after": "0", "type": "a.*"},
                            headers=headers) as resp:   # the header wins over after=
            rest = await _read_events(resp, 9)
            seen += [i for i, _ in rest]
            t0 = time.monotonic()
            out = await app.publish("a.x", {"n": "live"})
            [(live_id, live)] = await _read_events(resp, 1)
            latency = time.monotonic() - t0
            assert live_id == out.offsets[0] and live["payload"] == {"n": "live"}
            seen.append(live_id)
        page = await app.read_events(type="a.*", limit=100)
        assert seen == [e["offset"] for e in page.events], "no gap, no repeat"
        # No after=: a live tail from the current end.
        async with http.get(url) as resp:   # headers arrive once its start is fixed
            out = await app.publish("b.y", {"n": "tail"})
            [(tail_id, _)] = await _read_events(resp, 1)
            assert tail_id == out.offsets[0]
        async with http.get(url, headers={"Last-Event-ID": "x"}) as resp:
            assert resp.status == 400
            assert "Last-Event-ID" in (await resp.json())["error"]["message"]
        # A node that stops ends its streams cleanly (EOF, not a reset) and promptly.
        async with http.get(url) as resp:   # headers arrive once its start is fixed
            t0 = time.monotonic()
            await app.stop()
            body = await asyncio.wait_for(resp.content.read(), 5)
            assert time.monotonic() - t0 < 3.0
            assert body.startswith(b"retry: 1000")
    print(f"\nSSE: 16 events across a reconnect, no gap or repeat; live push "
          f"{latency * 1000:.1f} ms after publish")
