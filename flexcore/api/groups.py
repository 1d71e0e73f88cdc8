"""Consumer-group routes of the admin API: ``/v1/groups...`` over a `GroupBackend`.

``GET /v1/groups`` lists groups (partitions, members, generation, dead letters, lag);
``GET /v1/groups/{g}`` shows one group: members with their last heartbeat and owned
partitions, and per partition the owner, target, epoch, committed offset, lag and
pending redrives; ``GET /v1/groups/{g}/dead?limit=`` lists its dead letters, oldest
first; ``POST /v1/groups/{g}/dead/redrive`` ``{max?}`` sends dead letters back to their
partition's owner. Sees the node only through the `GroupBackend` protocol
(`flexcore.groups.GroupService` implements it).
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from aiohttp import web

from flexcore.api.validation import parse_json_body, require_object
from flexcore.errors import BadRequest

__all__ = ["GroupBackend", "add_group_routes"]

GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
MAX_DEAD_LIMIT = 1000
MAX_REDRIVE = 10_000


class GroupBackend(Protocol):
    """What the routes need from the node (see `flexcore.groups.GroupService`)."""

    def list_groups(self) -> list[dict[str, Any]]: ...

    def info(self, group: str) -> dict[str, Any]: ...

    def dead(self, group: str, limit: int = 100) -> list[dict[str, Any]]: ...

    async def redrive(self, group: str, *, limit: int | None = None) -> dict[str, Any]: ...


def add_group_routes(app: web.Application, service: GroupBackend) -> None:
    """Register the ``/v1/groups`` routes on ``app`` (built by ``create_app``)."""
    r = _GroupRoutes(service)
    app.router.add_get("/v1/groups", r.list_groups)
    app.router.add_get("/v1/groups/{g}", r.info)
    app.router.add_get("/v1/groups/{g}/dead", r.dead)
    app.router.add_post("/v1/groups/{g}/dead/redrive", r.redrive)


def _group(request: web.Request) -> str:
    name = request.match_info["g"]
    if not GROUP_NAME.fullmatch(name):
        raise BadRequest("group name must be 1-128 characters of A-Z a-z 0-9 . _ : @ - "
                         "starting with a letter or digit")
    return name


def _int(value: Any, field: str, lo: int, hi: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not value.isdigit() or len(value) > 12:
            raise BadRequest(f"{field} must be an integer from {lo} to {hi}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"{field} must be an integer from {lo} to {hi}")
    return value


class _GroupRoutes:
    def __init__(self, service: GroupBackend) -> None:
        self._s = service

    async def list_groups(self, request: web.Request) -> web.Response:
        return web.json_response({"groups": self._s.list_groups()})

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response(self._s.info(_group(request)))

    async def dead(self, request: web.Request) -> web.Response:
        group = _group(request)
        limit = _int(request.query.get("limit"), "limit", 1, MAX_DEAD_LIMIT) or 100
        return web.json_response({"dead": self._s.dead(group, limit)})

    async def redrive(self, request: web.Request) -> web.Response:
        group = _group(request)
        raw = await request.read()
        body = require_object(parse_json_body(raw), "body", frozenset({"max"})) \
            if raw.strip() else {}
        limit = _int(body.get("max"), "max", 1, MAX_REDRIVE)
        return web.json_response(await self._s.redrive(group, limit=limit))
