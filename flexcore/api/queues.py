"""Queue routes of the admin API: ``/v1/queues...`` over a `QueueBackend`.

Owns request parsing for queues (every field checked, a 400 names it) and the JSON
shape of the answers. Sees the node only through the `QueueBackend` protocol, which
`flexcore.queues.QueueService` implements; errors are `flexcore.errors` types that the
app's middleware turns into the error envelope (409 ``lease_expired`` for a stale lease,
404 ``not_found`` for a queue that never existed).
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any, Protocol

from aiohttp import web

from flexcore.api.validation import parse_json_body, require_object
from flexcore.errors import BadRequest, NotFound

__all__ = ["QueueBackend", "add_queue_routes"]

QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000
MAX_DELAY_S = 30 * 24 * 3600.0
MIN_VISIBILITY_S, MAX_VISIBILITY_S = 0.1, 12 * 3600.0
MAX_WAIT_S = 20.0
MAX_LEASE = 100
MAX_DEAD_LIMIT = 1000
MAX_ID_CHARS = 256
MAX_ERROR_CHARS = 2000

_ENQUEUE = frozenset({"body", "priority", "delay_s", "deliver_at", "dedup_id"})
_LEASE = frozenset({"consumer", "max", "visibility_s", "wait_s"})
_ACK = frozenset({"lease_id"})
_NACK = frozenset({"lease_id", "delay_s", "error"})
_EXTEND = frozenset({"lease_id", "visibility_s"})
_OPTIONS = frozenset({"visibility_s", "max_deliveries", "dedup_window_s", "max_dead"})
_REDRIVE = frozenset({"max"})


class QueueBackend(Protocol):
    """What the routes need from the node (see `flexcore.queues.QueueService`)."""

    async def enqueue(self, queue: str, body: Any, *, priority: int | None = None,
                      delay_s: float | None = None, deliver_at_ms: int | None = None,
                      dedup_id: str | None = None) -> dict[str, Any]: ...

    async def lease(self, queue: str, consumer: str, *, limit: int = 1,
                    visibility_s: float | None = None,
                    wait_s: float = 0.0) -> list[dict[str, Any]]: ...

    async def ack(self, queue: str, lease_id: str) -> dict[str, Any]: ...

    async def nack(self, queue: str, lease_id: str, *, delay_s: float | None = None,
                   error: str | None = None) -> dict[str, Any]: ...

    async def extend(self, queue: str, lease_id: str, *,
                     visibility_s: float | None = None) -> dict[str, Any]: ...

    async def configure(self, queue: str, *, visibility_s: float | None = None,
                        max_deliveries: int | None = None,
                        dedup_window_s: float | None = None,
                        max_dead: int | None = None) -> dict[str, Any]: ...

    async def purge(self, queue: str, *, dead: bool = False) -> dict[str, Any]: ...

    async def redrive(self, queue: str, *, limit: int | None = None) -> dict[str, Any]: ...

    def list_queues(self) -> dict[str, dict[str, int]]: ...

    def info(self, queue: str) -> dict[str, Any] | None: ...

    def dead(self, queue: str, limit: int = 100) -> list[dict[str, Any]]: ...


def add_queue_routes(app: web.Application, service: QueueBackend) -> None:
    """Register the ``/v1/queues`` routes on ``app`` (built by ``create_app``)."""
    r = _QueueRoutes(service)
    app.router.add_get("/v1/queues", r.list_queues)
    app.router.add_get("/v1/queues/{q}", r.info)
    app.router.add_put("/v1/queues/{q}", r.configure)
    app.router.add_post("/v1/queues/{q}/messages", r.enqueue)
    app.router.add_delete("/v1/queues/{q}/messages", r.purge)
    app.router.add_post("/v1/queues/{q}/lease", r.lease)
    app.router.add_post("/v1/queues/{q}/ack", r.ack)
    app.router.add_post("/v1/queues/{q}/nack", r.nack)
    app.router.add_post("/v1/queues/{q}/extend", r.extend)
    app.router.add_get("/v1/queues/{q}/dead", r.dead)
    app.router.add_delete("/v1/queues/{q}/dead", r.purge_dead)
    app.router.add_post("/v1/queues/{q}/dead/redrive", r.redrive)


# --- field parsing ----------------------------------------------------------------------

def queue_name(request: web.Request) -> str:
    name = request.match_info["q"]
    if not QUEUE_NAME.fullmatch(name):
        raise BadRequest("queue name must be 1-128 characters of A-Z a-z 0-9 . _ - "
                         "starting with a letter or digit")
    return name


def _number(obj: dict[str, Any], field: str, lo: float, hi: float) -> float | None:
    value = obj.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or not lo <= value <= hi:
        raise BadRequest(f"{field} must be a number of seconds from {lo:g} to {hi:g}")
    return float(value)


def _int(obj: dict[str, Any], field: str, lo: int, hi: int) -> int | None:
    value = obj.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"{field} must be an integer from {lo} to {hi}")
    return value


def _str(obj: dict[str, Any], field: str, max_chars: int, *, required: bool = False,
         allow_empty: bool = False) -> str | None:
    value = obj.get(field)
    if value is None:
        if required:
            raise BadRequest(f"{field} is required")
        return None
    if not isinstance(value, str) or len(value) > max_chars or (not value and not allow_empty):
        raise BadRequest(f"{field} must be a {'' if allow_empty else 'non-empty '}string of "
                         f"at most {max_chars} characters")
    return value


def _deliver_at_ms(value: Any) -> int | None:
    """Unix time in seconds (number) or an ISO 8601 time with a UTC offset."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value) and 0 <= value < 2**53 / 1000:
        return round(value * 1000)
    if isinstance(value, str) and len(value) <= 64:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            when = None
        if when is not None and when.tzinfo is not None:
            return round(when.timestamp() * 1000)
    raise BadRequest("deliver_at must be Unix time in seconds or an ISO 8601 time with "
                     "a UTC offset (e.g. 2030-01-01T09:00:00Z)")


async def _body(request: web.Request, allowed: frozenset[str], *,
                optional: bool = False) -> dict[str, Any]:
    raw = await request.read()
    if optional and not raw.strip():
        return {}
    return require_object(parse_json_body(raw), "body", allowed)


# --- handlers ---------------------------------------------------------------------------

class _QueueRoutes:
    def __init__(self, service: QueueBackend) -> None:
        self._s = service

    async def list_queues(self, request: web.Request) -> web.Response:
        return web.json_response({"queues": [{"name": name, **counts} for name, counts
                                             in self._s.list_queues().items()]})

    async def info(self, request: web.Request) -> web.Response:
        name = queue_name(request)
        info = self._s.info(name)
        if info is None:
            raise NotFound(f"queue {name} does not exist")
        return web.json_response(info)

    async def configure(self, request: web.Request) -> web.Response:
        name = queue_name(request)
        obj = await _body(request, _OPTIONS)
        visibility = _number(obj, "visibility_s", MIN_VISIBILITY_S, MAX_VISIBILITY_S)
        max_deliveries = _int(obj, "max_deliveries", 1, 10_000)
        window = _number(obj, "dedup_window_s", 0, 7 * 24 * 3600.0)
        max_dead = _int(obj, "max_dead", 1, 1_000_000)
        return web.json_response(await self._s.configure(
            name, visibility_s=visibility, max_deliveries=max_deliveries,
            dedup_window_s=window, max_dead=max_dead))

    async def enqueue(self, request: web.Request) -> web.Response:
        name = queue_name(request)
        obj = await _body(request, _ENQUEUE)
        if "body" not in obj:
            raise BadRequest("body is required (any JSON value)")
        priority = _int(obj, "priority", MIN_PRIORITY, MAX_PRIORITY)
        delay = _number(obj, "delay_s", 0, MAX_DELAY_S)
        deliver_at = _deliver_at_ms(obj.get("deliver_at"))
        if delay is not None and deliver_at is not None:
            raise BadRequest("give delay_s or deliver_at, not both")
        dedup_id = _str(obj, "dedup_id", MAX_ID_CHARS)
        out = await self._s.enqueue(name, obj["body"], priority=priority, delay_s=delay,
                                    deliver_at_ms=deliver_at, dedup_id=dedup_id)
        return web.json_response(out, status=201)

    async def lease(self, request: web.Request) -> web.Response:
        name = queue_name(request)
        obj = await _body(request, _LEASE)
        consumer = _str(obj, "consumer", MAX_ID_CHARS, required=True)
        assert consumer is not None
        limit = _int(obj, "max", 1, MAX_LEASE)
        visibility = _number(obj, "visibility_s", MIN_VISIBILITY_S, MAX_VISIBILITY_S)
        wait = _number(obj, "wait_s", 0, MAX_WAIT_S)
        messages = await self._s.lease(name, consumer, limit=limit or 1,
                                       visibility_s=visibility, wait_s=wait or 0.0)
        return web.json_response({"messages": messages})

    async def ack(self, request: web.Request) -> web.Response:
        name = queue_name(request)
        obj = await _body(request, _ACK)
        lease_id = _str(obj, "lease_id", 2 * MAX_ID_CHARS, required=True)
        assert lease_id is not None
        return web.json_response(await self._s.ack(name, lease_id))

    async def nack(self, request: web.Request) -> web.Response:
        name = queue_name(request)
        obj = await _body(request, _NACK)
        lease_id = _str(obj, "lease_id", 2 * MAX_ID_CHARS, required=True)
        assert lease_id is not None
        delay = _number(obj, "delay_s", 0, MAX_DELAY_S)
        error = _str(obj, "error", MAX_ERROR_CHARS, allow_empty=True)
        return web.json_response(await self._s.nack(name, lease_id, delay_s=delay,
                                                    error=error))

    async def extend(self, request: web.Request) -> web.Response:
        name = queue_name(request)
        obj = await _body(request, _EXTEND)
        lease_id = _str(obj, "lease_id", 2 * MAX_ID_CHARS, required=True)
        assert lease_id is not None
        visibility = _number(obj, "visibility_s", MIN_VISIBILITY_S, MAX_VISIBILITY_S)
        return web.json_response(await self._s.extend(name, lease_id,
                                                      visibility_s=visibility))

    async def purge(self, request: web.Request) -> web.Response:
        return web.json_response(await self._s.purge(queue_name(request)))

    async def purge_dead(self, request: web.Request) -> web.Response:
        return web.json_response(await self._s.purge(queue_name(request), dead=True))

    async def dead(self, request: web.Request) -> web.Response:
        name = queue_name(request)
        text = request.query.get("limit", "100")
        if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_DEAD_LIMIT):
            raise BadRequest(f"query parameter limit must be an integer from 1 to "
                             f"{MAX_DEAD_LIMIT}")
        return web.json_response({"messages": self._s.dead(name, int(text))})

    async def redrive(self, request: web.Request) -> web.Response:
        name = queue_name(request)
        obj = await _body(request, _REDRIVE, optional=True)
        return web.json_response(await self._s.redrive(name, limit=_int(obj, "max", 1,
                                                                        10_000)))
