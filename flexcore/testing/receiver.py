"""A batch receiver for the ``api-loader`` plugin: records every POSTed batch and
deduplicates by ``Idempotency-Key``, as a receiver of at-least-once batches should.

Tests run it in a background thread (`BatchReceiver.start`). ``python -m
flexcore.testing.receiver --port 8200`` serves it as the ETL demo's sink
(docker/compose.yml): ``POST /batches`` takes what ``api-loader`` sends, ``GET /batches``
answers ``{batches, deliveries, duplicates, rows}`` (counts; ``?rows=true`` adds the
accepted rows).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Delivery:
    key: str
    rows: list[dict[str, Any]]
    duplicate: bool
    meta: dict[str, Any] | None


@dataclass
class BatchReceiver:
    host: str = "127.0.0.1"
    port: int = 0
    latency: float = 0.0                    # seconds per request (to keep a run busy)
    fail_first: int = 0                     # answer 503 to this many first requests
    deliveries: list[Delivery] = field(default_factory=list)
    accepted: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ready: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/batches"

    async def _handle(self, request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key")
        if not key:
            return web.json_response({"error": "Idempotency-Key required"}, status=400)
        body = await request.json()
        if self.latency:
            await asyncio.sleep(self.latency)
        with self._lock:
            if self.fail_first > 0:
                self.fail_first -= 1
                return web.json_response({"error": "try later"}, status=503)
            duplicate = key in self.accepted
            self.deliveries.append(Delivery(key, body["rows"], duplicate, body.get("meta")))
            if not duplicate:
                self.accepted[key] = body["rows"]
        return web.json_response({"key": key, "duplicate": duplicate})

    async def _summary(self, request: web.Request) -> web.Response:
        with self._lock:
            body: dict[str, Any] = {
                "batches": len(self.accepted), "deliveries": len(self.deliveries),
                "duplicates": sum(d.duplicate for d in self.deliveries),
                "rows": sum(len(rows) for rows in self.accepted.values())}
            if request.query.get("rows") == "true":
                body["accepted"] = self._rows()
        return web.json_response(body)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/batches", self._handle)
        app.router.add_get("/batches", self._summary)
        return app

    def rows(self) -> list[dict[str, Any]]:
        """Every accepted (deduplicated) row."""
        with self._lock:
            return self._rows()

    def _rows(self) -> list[dict[str, Any]]:   # the lock held
        return [row for rows in self.accepted.values() for row in rows]

    def count(self) -> int:
        with self._lock:
            return len(self.deliveries)

    def start(self) -> BatchReceiver:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()),
                                        name="batch-receiver", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the batch receiver did not start")
        return self

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            self.port = runner.addresses[0][1]
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexcore.testing.receiver",
                                     description="Serve a batch receiver for api-loader.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    args = parser.parse_args(argv)
    receiver = BatchReceiver(host=args.host, port=args.port)
    web.run_app(receiver.app(), host=args.host, port=args.port, access_log=None,
                print=lambda *a: print(f"batch receiver on http://{args.host}:{args.port}"
                                       "/batches", flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
