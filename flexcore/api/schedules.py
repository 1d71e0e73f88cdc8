"""The schedules part of the admin API: ``/v1/schedules`` routes and request parsing.

Owns the HTTP shape of timer schedules: parsing ``PUT /v1/schedules/{id}`` bodies
(triggers are validated by `flexcore.schedule_math`, so a bad cron, time zone or
interval is a 400 that says why), and the routes that call a `ScheduleBackend`.
It sees the node only through that protocol (implemented by
`flexcore.timers.ScheduleService`); errors are `flexcore.errors` types, which the
app's middleware turns into the error envelope, and the app's auth middleware guards
the writes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from multidict import MultiMapping

from flexcore.api.validation import parse_json_body, require_object
from flexcore.errors import BadRequest
from flexcore.schedule_math import (
    DEFAULT_MISFIRE_GRACE_S,
    MAX_MISFIRE_GRACE_S,
    MISFIRE_POLICIES,
    TriggerError,
    TriggerSpec,
    parse_trigger,
)

__all__ = ["ScheduleBackend", "ScheduleInput", "add_schedule_routes", "parse_schedule",
           "validate_schedule_id"]

SCHEDULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
MAX_RUN_S = 86400.0
_BODY_FIELDS = frozenset({"trigger", "action", "misfire", "misfire_grace_s", "max_run_s",
                          "enabled"})
_ACTION_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "event": (frozenset({"event_type"}), frozenset({"payload"})),
    "enqueue": (frozenset({"queue", "body"}), frozenset()),
    "workflow": (frozenset({"path", "kind"}), frozenset({"args"})),
    "pipeline": (frozenset({"name"}), frozenset()),
    "handler": (frozenset({"name"}), frozenset()),
}


@dataclass(frozen=True, slots=True)
class ScheduleInput:
    """A validated schedule definition (what ``PUT /v1/schedules/{id}`` carries)."""

    trigger: TriggerSpec
    action: dict[str, Any]
    misfire: str = "run_once"
    misfire_grace_s: float = DEFAULT_MISFIRE_GRACE_S
    max_run_s: float | None = None
    enabled: bool = True


class ScheduleBackend(Protocol):
    """What the routes need from the node (see `flexcore.timers.ScheduleService`)."""

    async def put(self, schedule_id: str, spec: ScheduleInput) -> dict[str, Any]: ...

    async def get(self, schedule_id: str, *, consistent: bool = False) -> dict[str, Any]: ...

    async def list(self, *, consistent: bool = False) -> dict[str, Any]: ...

    async def delete(self, schedule_id: str) -> dict[str, Any]: ...

    async def set_enabled(self, schedule_id: str, enabled: bool) -> dict[str, Any]: ...

    async def trigger(self, schedule_id: str) -> dict[str, Any]: ...

    async def fires(self, schedule_id: str, *, consistent: bool = False) -> dict[str, Any]: ...


def validate_schedule_id(value: str) -> str:
    if not SCHEDULE_ID.fullmatch(value):
        raise BadRequest("schedule id must be 1-128 characters of A-Z a-z 0-9 . _ : - "
                         "starting with a letter or digit")
    return value


def _seconds(obj: dict[str, Any], field: str, *, minimum: float, maximum: float) -> float:
    value = obj[field]
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or not minimum <= value <= maximum):
        raise BadRequest(f"{field} must be a number of seconds from {minimum:g} to "
                         f"{maximum:.0f}")
    return float(value)


def _name(obj: dict[str, Any], field: str, max_chars: int = 256) -> str:
    value = obj.get(field)
    if not isinstance(value, str) or not value or len(value) > max_chars:
        raise BadRequest(f"action.{field} must be a non-empty string of at most "
                         f"{max_chars} characters")
    return value


def parse_action(value: Any) -> dict[str, Any]:
    """``{type: event|enqueue|workflow|pipeline|handler, ...}`` (see the README)."""
    if not isinstance(value, dict):
        raise BadRequest("action must be an object with a type: event, enqueue, workflow, "
                         "pipeline or handler")
    kind = value.get("type")
    if not isinstance(kind, str) or kind not in _ACTION_FIELDS:
        raise BadRequest(f"action.type must be one of {', '.join(_ACTION_FIELDS)}")
    required, optional = _ACTION_FIELDS[kind]
    obj = require_object(value, "action", required | optional | {"type"})
    missing = sorted(required - set(obj))
    if missing:
        raise BadRequest(f"action.{missing[0]} is required for a {kind} action")
    out: dict[str, Any] = {"type": kind}
    if kind == "event":
        out["event_type"] = _name(obj, "event_type")
        if obj.get("payload") is not None:
            if not isinstance(obj["payload"], dict):
                raise BadRequest("action.payload must be an object (the fire adds "
                                 "schedule_id and fire_time to it)")
            out["payload"] = obj["payload"]
    elif kind == "enqueue":
        out["queue"] = _name(obj, "queue", 128)
        out["body"] = obj["body"]
    elif kind == "workflow":
        out["path"] = _name(obj, "path", 1024)
        if obj["kind"] not in ("script", "flow"):
            raise BadRequest("action.kind must be script or flow")
        out["kind"] = obj["kind"]
        if obj.get("args") is not None:
            if not isinstance(obj["args"], dict):
                raise BadRequest("action.args must be an object")
            out["args"] = obj["args"]
    else:
        out["name"] = _name(obj, "name")
    return out


def parse_schedule(value: Any) -> ScheduleInput:
    """The body of ``PUT /v1/schedules/{id}``; `BadRequest` names what is wrong."""
    obj = require_object(value, "body", _BODY_FIELDS)
    for field in ("trigger", "action"):
        if field not in obj:
            raise BadRequest(f"{field} is required")
    try:
        trigger = parse_trigger(obj["trigger"])
    except TriggerError as exc:
        raise BadRequest(str(exc)) from None
    action = parse_action(obj["action"])
    misfire = obj.get("misfire", "run_once")
    if misfire not in MISFIRE_POLICIES:
        raise BadRequest(f"misfire must be one of {', '.join(MISFIRE_POLICIES)}")
    grace = (_seconds(obj, "misfire_grace_s", minimum=0, maximum=MAX_MISFIRE_GRACE_S)
             if obj.get("misfire_grace_s") is not None else DEFAULT_MISFIRE_GRACE_S)
    max_run = (_seconds(obj, "max_run_s", minimum=0.001, maximum=MAX_RUN_S)
               if obj.get("max_run_s") is not None else None)
    enabled = obj.get("enabled", True)
    if not isinstance(enabled, bool):
        raise BadRequest("enabled must be true or false")
    return ScheduleInput(trigger, action, misfire, grace, max_run, enabled)


def _consistent(query: MultiMapping[str]) -> bool:
    text = query.get("consistent", "false").lower()
    if text not in ("true", "1", "false", "0"):
        raise BadRequest("query parameter consistent must be true, false, 1 or 0")
    return text in ("true", "1")


def add_schedule_routes(app: web.Application, service: ScheduleBackend) -> None:
    """Register ``/v1/schedules`` routes on ``app`` (before it starts)."""

    def sid(request: web.Request) -> str:
        return validate_schedule_id(request.match_info["id"])

    async def put(request: web.Request) -> web.Response:
        spec = parse_schedule(parse_json_body(await request.read()))
        out = await service.put(sid(request), spec)
        return web.json_response(out, status=201 if out.get("created") else 200)

    async def get(request: web.Request) -> web.Response:
        return web.json_response(await service.get(sid(request),
                                                   consistent=_consistent(request.query)))

    async def list_(request: web.Request) -> web.Response:
        return web.json_response(await service.list(consistent=_consistent(request.query)))

    async def delete(request: web.Request) -> web.Response:
        return web.json_response(await service.delete(sid(request)))

    async def pause(request: web.Request) -> web.Response:
        return web.json_response(await service.set_enabled(sid(request), False))

    async def resume(request: web.Request) -> web.Response:
        return web.json_response(await service.set_enabled(sid(request), True))

    async def trigger(request: web.Request) -> web.Response:
        return web.json_response(await service.trigger(sid(request)), status=202)

    async def fires(request: web.Request) -> web.Response:
        return web.json_response(await service.fires(sid(request),
                                                     consistent=_consistent(request.query)))

    app.router.add_get("/v1/schedules", list_)
    app.router.add_put("/v1/schedules/{id}", put)
    app.router.add_get("/v1/schedules/{id}", get)
    app.router.add_delete("/v1/schedules/{id}", delete)
    app.router.add_post("/v1/schedules/{id}/pause", pause)
    app.router.add_post("/v1/schedules/{id}/resume", resume)
    app.router.add_post("/v1/schedules/{id}/trigger", trigger)
    app.router.add_get("/v1/schedules/{id}/fires", fires)
