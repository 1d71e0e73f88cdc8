"""Live tail of the event log as Server-Sent Events: ``GET /v1/events/stream``.

``?type=`` (a glob, as ``GET /v1/events``) filters; the stream starts after the offset
in the ``Last-Event-ID`` header when the client sends one (an ``EventSource``
reconnecting does), else after ``?after=``, else at the current end of the log (a live
tail). Each event is one SSE message, ``id: <offset>`` and ``data: <event JSON>``
(``{offset, id, type, key, payload, ts}``), so a client that reconnects with the last
id it saw continues with no gap and no repeat. A ``: keepalive`` comment goes out when
nothing was sent for ``heartbeat_s`` (15 s) so proxies keep the connection open.

New events are pushed as this node applies them: the handler waits on the backend's
apply signal, never on a poll interval. When the node stops, the backend closes and
every stream ends cleanly (the response is finished, not reset). Reads come from the
answering node's applied state, like ``GET /v1/events``.

Sees the node only through `StreamBackend` (`flexcore.events.EventFeed`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Protocol

from aiohttp import web

from flexcore.api.validation import INT64_MAX, parse_event_query
from flexcore.errors import BadRequest

__all__ = ["StreamBackend", "add_stream_routes"]

PAGE = 500


class StreamBackend(Protocol):
    """What the stream needs from the node (see `flexcore.events.EventFeed`)."""

    @property
    def closed(self) -> bool: ...

    def read(self, after: int, limit: int, type_glob: str | None = None,
             partition: tuple[int, int] | None = None,
             max_scan: int = 10_000) -> tuple[list[dict[str, Any]], int]: ...

    def last_offset(self) -> int: ...

    async def wait(self, timeout: float) -> None: ...


def add_stream_routes(app: web.Application, backend: StreamBackend, *,
                      heartbeat_s: float = 15.0) -> None:
    """Register ``GET /v1/events/stream`` on ``app`` (before ``/v1/events/{...}``)."""
    app.router.add_get("/v1/events/stream", _StreamRoute(backend, heartbeat_s).stream)


def _last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID")
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    if not text.isdigit() or len(text) > 19 or int(text) > INT64_MAX:
        raise BadRequest("header Last-Event-ID must be an event offset (a non-negative "
                         "integer)")
    return int(text)


class _StreamRoute:
    def __init__(self, backend: StreamBackend, heartbeat_s: float) -> None:
        self._b = backend
        self._heartbeat_s = heartbeat_s

    async def stream(self, request: web.Request) -> web.StreamResponse:
        query = parse_event_query(request.query)
        resume = _last_event_id(request)
        if resume is not None:
            cursor = resume
        elif "after" in request.query:
            cursor = query.after
        else:
            cursor = self._b.last_offset()
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        try:
            await resp.write(b"retry: 1000\n\n")
            quiet_since = loop.time()
            while not self._b.closed:
                events, nxt = self._b.read(cursor, PAGE, query.type)
                if events:
                    await resp.write("".join(
                        f"id: {e['offset']}\ndata: {json.dumps(e, separators=(',', ':'))}"
                        "\n\n" for e in events).encode())
                    quiet_since = loop.time()
                advanced = nxt > cursor
                cursor = nxt
                if advanced:
                    continue                  # maybe more pages: read again first
                remaining = quiet_since + self._heartbeat_s - loop.time()
                if remaining <= 0:
                    await resp.write(b": keepalive\n\n")
                    quiet_since = loop.time()
                    continue
                await self._b.wait(remaining)
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass                              # the client went away
        return resp
