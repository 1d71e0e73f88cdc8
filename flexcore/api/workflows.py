"""The workflows part of the admin API: ``/v1/workflows/runs`` and ``/v1/workflows/routes``.

Owns the HTTP shape of Windmill workflow runs and event routing rules: request parsing
(paths, kinds, args, JMESPath conditions compiled here so a bad one is a 400 that says
why) and the routes that call a `WorkflowBackend` (implemented by
`flexcore.windmill.service.WorkflowService`). Errors are `flexcore.errors` types; the
app's middleware renders the envelope and guards the writes with the API token.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import jmespath
import jmespath.exceptions
from aiohttp import web
from multidict import MultiMapping

from flexcore.api.validation import parse_json_body, require_object
from flexcore.errors import BadRequest

__all__ = ["RouteInput", "RunRequest", "WorkflowBackend", "add_workflow_routes",
           "parse_route", "parse_run"]

RUN_STATUSES = ("pending", "submitted", "running", "success", "failure", "canceled")
ROUTE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
WORKFLOW_PATH = re.compile(r"[A-Za-z0-9_@.-]+(?:/[A-Za-z0-9_@.-]+)*")
MAX_PATH_CHARS = 255
MAX_EXPR_CHARS = 1000
MAX_REASON_CHARS = 500
MAX_LIST = 1000
_RUN_FIELDS = frozenset({"path", "kind", "args", "id"})
_ROUTE_FIELDS = frozenset({"event_type", "condition", "path", "kind", "args", "args_from",
                           "enabled"})


@dataclass(frozen=True, slots=True)
class RunRequest:
    path: str
    kind: str
    args: dict[str, Any] = field(default_factory=dict)
    id: str | None = None


@dataclass(frozen=True, slots=True)
class RouteInput:
    event_type: str
    path: str
    kind: str
    condition: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    args_from: dict[str, str] = field(default_factory=dict)
    enabled: bool = True


class WorkflowBackend(Protocol):
    """What the routes need from the node."""

    async def create_run(self, request: RunRequest) -> dict[str, Any]: ...

    async def get_run(self, run_id: str, *, consistent: bool = False,
                      min_index: int | None = None) -> dict[str, Any]: ...

    async def list_runs(self, *, status: str | None, after: int, limit: int,
                        consistent: bool = False) -> dict[str, Any]: ...

    async def cancel_run(self, run_id: str, reason: str | None) -> dict[str, Any]: ...

    async def put_route(self, route_id: str, spec: RouteInput) -> dict[str, Any]: ...

    async def get_route(self, route_id: str, *, consistent: bool = False) -> dict[str, Any]:
        ...

    async def list_routes(self, *, consistent: bool = False) -> dict[str, Any]: ...

    async def delete_route(self, route_id: str) -> dict[str, Any]: ...


# --- parsing --------------------------------------------------------------------------------

def validate_path(value: Any, field_name: str = "path") -> str:
    if (not isinstance(value, str) or not 1 <= len(value) <= MAX_PATH_CHARS
            or not WORKFLOW_PATH.fullmatch(value)
            or any(seg in (".", "..") for seg in value.split("/"))):
        raise BadRequest(f"{field_name} must be a Windmill path like u/user/name or "
                         f"f/folder/name (letters, digits, _ @ . - and /; at most "
                         f"{MAX_PATH_CHARS} characters)")
    return value


def _kind(obj: dict[str, Any]) -> str:
    kind = obj.get("kind", "script")
    if kind not in ("script", "flow"):
        raise BadRequest("kind must be script or flow")
    assert isinstance(kind, str)
    return kind


def _args(obj: dict[str, Any], field_name: str = "args") -> dict[str, Any]:
    args = obj.get(field_name)
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise BadRequest(f"{field_name} must be an object (Windmill's script arguments)")
    return args


def validate_run_id(value: str) -> str:
    try:
        parsed = uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise BadRequest("run id must be a UUID") from None
    return str(parsed)


def parse_run(value: Any) -> RunRequest:
    """``{path, kind?: script|flow (default script), args?, id?}``."""
    obj = require_object(value, "body", _RUN_FIELDS)
    if "path" not in obj:
        raise BadRequest("path is required")
    run_id = obj.get("id")
    if run_id is not None:
        if not isinstance(run_id, str):
            raise BadRequest("id must be a UUID string")
        run_id = validate_run_id(run_id)
    return RunRequest(validate_path(obj["path"]), _kind(obj), _args(obj), run_id)


def _expression(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_EXPR_CHARS:
        raise BadRequest(f"{what} must be a JMESPath expression of 1 to {MAX_EXPR_CHARS} "
                         "characters")
    try:
        jmespath.compile(value)
    except jmespath.exceptions.JMESPathError as exc:
        raise BadRequest(f"{what} is not a valid JMESPath expression: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    return value


def parse_route(value: Any) -> RouteInput:
    """``{event_type, path, kind?, condition?, args?, args_from?, enabled?}``."""
    obj = require_object(value, "body", _ROUTE_FIELDS)
    for name in ("event_type", "path"):
        if name not in obj:
            raise BadRequest(f"{name} is required")
    event_type = obj["event_type"]
    if not isinstance(event_type, str) or not 1 <= len(event_type) <= 256:
        raise BadRequest("event_type must be a type or glob (order.*) of 1 to 256 "
                         "characters")
    condition = obj.get("condition")
    if condition is not None:
        condition = _expression(condition, "condition")
    raw_from = obj.get("args_from") or {}
    if not isinstance(raw_from, dict):
        raise BadRequest("args_from must be an object: argument name -> JMESPath over the "
                         "event")
    if len(raw_from) > 64:
        raise BadRequest("args_from may name at most 64 arguments")
    args_from = {name: _expression(expr, f"args_from.{name}")
                 for name, expr in raw_from.items()}
    for name in args_from:
        if not 1 <= len(name) <= 128:
            raise BadRequest("args_from names must be 1 to 128 characters")
    enabled = obj.get("enabled", True)
    if not isinstance(enabled, bool):
        raise BadRequest("enabled must be true or false")
    return RouteInput(event_type, validate_path(obj["path"]), _kind(obj), condition,
                      _args(obj), args_from, enabled)


def validate_route_id(value: str) -> str:
    if not ROUTE_ID.fullmatch(value):
        raise BadRequest("route id must be 1-128 characters of A-Z a-z 0-9 . _ : - "
                         "starting with a letter or digit")
    return value


def _flag(query: MultiMapping[str], name: str) -> bool:
    text = query.get(name, "false").lower()
    if text not in ("true", "1", "false", "0"):
        raise BadRequest(f"query parameter {name} must be true, false, 1 or 0")
    return text in ("true", "1")


def _int(query: MultiMapping[str], name: str, default: int | None, *, minimum: int,
         maximum: int) -> int | None:
    text = query.get(name)
    if text is None:
        return default
    if not text.isdigit() or not minimum <= int(text) <= maximum:
        raise BadRequest(f"query parameter {name} must be an integer from {minimum} to "
                         f"{maximum}")
    return int(text)


def parse_cancel(raw: bytes) -> str | None:
    """An optional ``{reason?}`` body."""
    if not raw.strip():
        return None
    obj = require_object(parse_json_body(raw), "body", frozenset({"reason"}))
    reason = obj.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS):
        raise BadRequest(f"reason must be a string of at most {MAX_REASON_CHARS} characters")
    return reason


# --- routes ----------------------------------------------------------------------------------

def add_workflow_routes(app: web.Application, service: WorkflowBackend) -> None:
    """Register ``/v1/workflows`` routes on ``app`` (before it starts)."""

    def run_id(request: web.Request) -> str:
        return validate_run_id(request.match_info["id"])

    def route_id(request: web.Request) -> str:
        return validate_route_id(request.match_info["id"])

    async def create_run(request: web.Request) -> web.Response:
        spec = parse_run(parse_json_body(await request.read()))
        return web.json_response(await service.create_run(spec), status=202)

    async def get_run(request: web.Request) -> web.Response:
        q = request.query
        min_index = _int(q, "min_index", None, minimum=0, maximum=2**63 - 1)
        return web.json_response(await service.get_run(
            run_id(request), consistent=_flag(q, "consistent"), min_index=min_index))

    async def list_runs(request: web.Request) -> web.Response:
        q = request.query
        status = q.get("status")
        if status is not None and status not in RUN_STATUSES:
            raise BadRequest(f"query parameter status must be one of {', '.join(RUN_STATUSES)}")
        after = _int(q, "after", 0, minimum=0, maximum=2**63 - 1)
        limit = _int(q, "limit", 100, minimum=1, maximum=MAX_LIST)
        assert after is not None and limit is not None
        return web.json_response(await service.list_runs(
            status=status, after=after, limit=limit, consistent=_flag(q, "consistent")))

    async def cancel_run(request: web.Request) -> web.Response:
        reason = parse_cancel(await request.read())
        return web.json_response(await service.cancel_run(run_id(request), reason),
                                 status=202)

    async def put_route(request: web.Request) -> web.Response:
        spec = parse_route(parse_json_body(await request.read()))
        out = await service.put_route(route_id(request), spec)
        return web.json_response(out, status=201 if out.get("created") else 200)

    async def get_route(request: web.Request) -> web.Response:
        return web.json_response(await service.get_route(
            route_id(request), consistent=_flag(request.query, "consistent")))

    async def list_routes(request: web.Request) -> web.Response:
        return web.json_response(await service.list_routes(
            consistent=_flag(request.query, "consistent")))

    async def delete_route(request: web.Request) -> web.Response:
        return web.json_response(await service.delete_route(route_id(request)))

    app.router.add_post("/v1/workflows/runs", create_run)
    app.router.add_get("/v1/workflows/runs", list_runs)
    app.router.add_get("/v1/workflows/runs/{id}", get_run)
    app.router.add_post("/v1/workflows/runs/{id}/cancel", cancel_run)
    app.router.add_get("/v1/workflows/routes", list_routes)
    app.router.add_put("/v1/workflows/routes/{id}", put_route)
    app.router.add_get("/v1/workflows/routes/{id}", get_route)
    app.router.add_delete("/v1/workflows/routes/{id}", delete_route)
