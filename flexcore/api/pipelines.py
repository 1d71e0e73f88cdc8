"""The plugins and pipelines part of the admin API: ``/v1/plugins``, ``/v1/pipelines``.

Owns the HTTP shape: request parsing (pipeline names, stages ``{plugin, config,
timeout_s?}``, run ids) with 400s that name the field, and the routes that call a
`PipelineBackend` (implemented by `flexcore.plugins.service.PipelineService`). Errors
are `flexcore.errors` types; the app's middleware renders the envelope and guards the
writes with the API token.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from multidict import MultiMapping

from flexcore.api.validation import parse_json_body, require_object
from flexcore.errors import BadRequest

__all__ = ["PipelineBackend", "PipelineInput", "add_pipeline_routes", "parse_pipeline",
           "validate_pipeline_name"]

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PLUGIN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MAX_TRANSFORMS = 16
MAX_TIMEOUT_S = 3600
_FIELDS = frozenset({"extractor", "transforms", "loader"})
_STAGE_FIELDS = frozenset({"plugin", "config", "timeout_s"})


@dataclass(frozen=True, slots=True)
class PipelineInput:
    extractor: dict[str, Any]
    loader: dict[str, Any]
    transforms: list[dict[str, Any]] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        return {"extractor": self.extractor, "transforms": self.transforms,
                "loader": self.loader}


class PipelineBackend(Protocol):
    async def plugins(self, *, probe: bool = True) -> dict[str, Any]: ...

    async def put(self, name: str, spec: PipelineInput) -> dict[str, Any]: ...

    async def get(self, name: str, *, consistent: bool = False) -> dict[str, Any]: ...

    async def list(self, *, consistent: bool = False) -> dict[str, Any]: ...

    async def delete(self, name: str) -> dict[str, Any]: ...

    async def create_run(self, name: str, run_id: str | None) -> dict[str, Any]: ...

    async def get_run(self, name: str, run_id: str, *, consistent: bool = False
                      ) -> dict[str, Any]: ...

    async def list_runs(self, name: str, *, after: int, limit: int,
                        consistent: bool = False) -> dict[str, Any]: ...


def validate_pipeline_name(value: str) -> str:
    if not NAME.fullmatch(value):
        raise BadRequest("pipeline name must be 1-128 characters of A-Z a-z 0-9 . _ - "
                         "starting with a letter or digit")
    return value


def _stage(value: Any, where: str) -> dict[str, Any]:
    obj = require_object(value, where, _STAGE_FIELDS)
    plugin = obj.get("plugin")
    if not isinstance(plugin, str) or not PLUGIN.fullmatch(plugin):
        raise BadRequest(f"{where}.plugin must be a plugin name (a-z 0-9 . _ -, at most 64 "
                         "characters; see GET /v1/plugins)")
    config = obj.get("config", {})
    if not isinstance(config, dict):
        raise BadRequest(f"{where}.config must be an object")
    out: dict[str, Any] = {"plugin": plugin, "config": config}
    timeout = obj.get("timeout_s")
    if timeout is not None:
        if type(timeout) is not int or not 1 <= timeout <= MAX_TIMEOUT_S:
            raise BadRequest(f"{where}.timeout_s must be an integer from 1 to {MAX_TIMEOUT_S}")
        out["timeout_s"] = timeout
    return out


def parse_pipeline(value: Any) -> PipelineInput:
    """``{extractor: stage, transforms?: [stage], loader: stage}``."""
    obj = require_object(value, "body", _FIELDS)
    for name in ("extractor", "loader"):
        if name not in obj:
            raise BadRequest(f"{name} is required")
    transforms = obj.get("transforms") or []
    if not isinstance(transforms, list) or len(transforms) > MAX_TRANSFORMS:
        raise BadRequest(f"transforms must be a list of at most {MAX_TRANSFORMS} stages")
    return PipelineInput(_stage(obj["extractor"], "extractor"), _stage(obj["loader"], "loader"),
                         [_stage(t, f"transforms[{i}]") for i, t in enumerate(transforms)])


def parse_run_request(raw: bytes) -> str | None:
    """An optional ``{id?}`` body: the run's UUID (makes the request idempotent)."""
    if not raw.strip():
        return None
    obj = require_object(parse_json_body(raw), "body", frozenset({"id"}))
    run_id = obj.get("id")
    if run_id is None:
        return None
    if not isinstance(run_id, str):
        raise BadRequest("id must be a UUID string")
    return validate_run_id(run_id)


def validate_run_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise BadRequest("run id must be a UUID") from None


def _flag(query: MultiMapping[str], name: str, default: str = "false") -> bool:
    text = query.get(name, default).lower()
    if text not in ("true", "1", "false", "0"):
        raise BadRequest(f"query parameter {name} must be true, false, 1 or 0")
    return text in ("true", "1")


def _int(query: MultiMapping[str], name: str, default: int, maximum: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    if not text.isdigit() or int(text) > maximum:
        raise BadRequest(f"query parameter {name} must be an integer from 0 to {maximum}")
    return int(text)


def add_pipeline_routes(app: web.Application, service: PipelineBackend) -> None:
    """Register ``/v1/plugins`` and ``/v1/pipelines`` routes on ``app``."""

    def name_of(request: web.Request) -> str:
        return validate_pipeline_name(request.match_info["name"])

    async def plugins(request: web.Request) -> web.Response:
        return web.json_response(await service.plugins(
            probe=_flag(request.query, "probe", "true")))

    async def put(request: web.Request) -> web.Response:
        spec = parse_pipeline(parse_json_body(await request.read()))
        out = await service.put(name_of(request), spec)
        return web.json_response(out, status=201 if out.get("created") else 200)

    async def get(request: web.Request) -> web.Response:
        return web.json_response(await service.get(
            name_of(request), consistent=_flag(request.query, "consistent")))

    async def list_(request: web.Request) -> web.Response:
        return web.json_response(await service.list(
            consistent=_flag(request.query, "consistent")))

    async def delete(request: web.Request) -> web.Response:
        return web.json_response(await service.delete(name_of(request)))

    async def create_run(request: web.Request) -> web.Response:
        name = name_of(request)
        run_id = parse_run_request(await request.read())
        return web.json_response(await service.create_run(name, run_id), status=202)

    async def get_run(request: web.Request) -> web.Response:
        return web.json_response(await service.get_run(
            name_of(request), validate_run_id(request.match_info["id"]),
            consistent=_flag(request.query, "consistent")))

    async def list_runs(request: web.Request) -> web.Response:
        q = request.query
        return web.json_response(await service.list_runs(
            name_of(request), after=_int(q, "after", 0, 2**63 - 1),
            limit=max(1, _int(q, "limit", 100, 1000)), consistent=_flag(q, "consistent")))

    app.router.add_get("/v1/plugins", plugins)
    app.router.add_get("/v1/pipelines", list_)
    app.router.add_put("/v1/pipelines/{name}", put)
    app.router.add_get("/v1/pipelines/{name}", get)
    app.router.add_delete("/v1/pipelines/{name}", delete)
    app.router.add_post("/v1/pipelines/{name}/runs", create_run)
    app.router.add_get("/v1/pipelines/{name}/runs", list_runs)
    app.router.add_get("/v1/pipelines/{name}/runs/{id}", get_run)
