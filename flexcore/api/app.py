"""The admin API: an aiohttp application over a `NodeService`.

This module owns routing, the error envelope, bearer-token auth for writes and the
mapping of service results to JSON bodies. It sees the node only through
`flexcore.api.protocol.NodeService` and must not import Raft, the state machine or the
node's composition root; the caller serves the app with `web.AppRunner`/`web.TCPSite`.

Every error leaves as ``{"error": {"code": ..., "message": ...}}``:
a `FlexCoreError` with its own status and code, aiohttp's routing and size errors with
``not_found`` / ``method_not_allowed`` / ``payload_too_large``, and anything unexpected
as a generic 500 ``internal`` (logged with its traceback, never sent to the client).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from flexcore.api.protocol import EventPage, NodeService, PublishOutcome
from flexcore.api.validation import (
    parse_batch,
    parse_event,
    parse_event_query,
    parse_json_body,
    parse_member,
    validate_raft_address,
)
from flexcore.errors import FlexCoreError, PayloadTooLarge, Unauthorized

__all__ = ["SERVICE_KEY", "create_app"]

log = logging.getLogger("flexcore.api")

SERVICE_KEY = web.AppKey[NodeService]("flexcore.service")
"""Where `create_app` keeps the service, for code that wraps the app."""

_OPEN_METHODS = frozenset({"GET", "HEAD"})

# Codes for aiohttp's own HTTP errors (routing, body size, bad requests it detects).
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def create_app(
    service: NodeService,
    *,
    api_token: str | None = None,
    max_body_bytes: int = 1024 * 1024,
) -> web.Application:
    """Build the admin API application for ``service``.

    ``api_token``: when set, POST/PUT/PATCH/DELETE need ``Authorization: Bearer <token>``;
    GET and HEAD stay open. ``max_body_bytes``: larger bodies get 413.
    """
    if api_token is not None and not api_token:
        raise ValueError("api_token must be a non-empty string or None")
    if max_body_bytes < 1:
        raise ValueError("max_body_bytes must be positive")

    app = web.Application(
        client_max_size=max_body_bytes,
        middlewares=[_error_envelope_middleware(max_body_bytes), _auth_middleware(api_token)],
    )
    app[SERVICE_KEY] = service
    routes = _Routes(service)
    app.router.add_get("/health", routes.health)
    app.router.add_get("/ready", routes.ready)
    app.router.add_get("/metrics", routes.metrics)
    app.router.add_get("/v1/cluster", routes.cluster)
    app.router.add_post("/v1/cluster/members", routes.add_member)
    app.router.add_delete("/v1/cluster/members/{raft}", routes.remove_member)
    app.router.add_post("/v1/events", routes.publish)
    app.router.add_post("/v1/events/batch", routes.publish_batch)
    app.router.add_get("/v1/events", routes.read_events)
    return app


# --- handlers ---------------------------------------------------------------------------


class _Routes:
    """Request handlers: parse, call the service, shape the JSON answer."""

    def __init__(self, service: NodeService) -> None:
        self._service = service

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(self._service.health())

    async def ready(self, request: web.Request) -> web.Response:
        ready, facts = self._service.readiness()
        body = {"ready": bool(ready), **{k: v for k, v in facts.items() if k != "ready"}}
        return web.json_response(body, status=200 if ready else 503)

    async def cluster(self, request: web.Request) -> web.Response:
        return web.json_response(self._service.cluster())

    async def metrics(self, request: web.Request) -> web.Response:
        # Collectors walk queues and group backlogs: keep that off the event loop.
        body, content_type = await asyncio.to_thread(self._service.metrics)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def publish(self, request: web.Request) -> web.Response:
        event = parse_event(await _read_json(request))
        outcome = await self._service.publish([event])
        return web.json_response(_single_outcome(outcome), status=201)

    async def publish_batch(self, request: web.Request) -> web.Response:
        events = parse_batch(await _read_json(request))
        outcome = await self._service.publish(events)
        return web.json_response(
            {
                "offsets": outcome.offsets,
                "ids": outcome.ids,
                "duplicates": outcome.duplicates,
                "index": outcome.index,
            },
            status=201,
        )

    async def read_events(self, request: web.Request) -> web.Response:
        query = parse_event_query(request.query)
        page: EventPage = await self._service.read_events(query)
        return web.json_response({"events": page.events, "next": page.next})

    async def add_member(self, request: web.Request) -> web.Response:
        raft, api = parse_member(await _read_json(request))
        return web.json_response(await self._service.add_member(raft, api), status=201)

    async def remove_member(self, request: web.Request) -> web.Response:
        raft = validate_raft_address(request.match_info["raft"])
        return web.json_response(await self._service.remove_member(raft))


def _single_outcome(outcome: PublishOutcome) -> dict[str, Any]:
    if not (len(outcome.offsets) == len(outcome.ids) == len(outcome.duplicates) == 1):
        raise RuntimeError(f"service returned {len(outcome.offsets)} outcomes for one event")
    return {
        "offset": outcome.offsets[0],
        "id": outcome.ids[0],
        "index": outcome.index,
        "duplicate": outcome.duplicates[0],
    }


async def _read_json(request: web.Request) -> Any:
    """The request body parsed as JSON, whatever its Content-Type says.

    A body over ``client_max_size`` raises aiohttp's 413, which the envelope
    middleware turns into ``payload_too_large``.
    """
    return parse_json_body(await request.read())


# --- middleware -------------------------------------------------------------------------


def _error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


def _error_envelope_middleware(max_body_bytes: int) -> Middleware:
    @web.middleware
    async def error_envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except FlexCoreError as exc:
            return web.json_response(exc.to_dict(), status=exc.status)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = _HTTP_CODES.get(exc.status, _snake(exc.reason))
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return _error_response(
                exc.status, code, _http_message(request, exc, max_body_bytes), headers
            )
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return _error_response(500, "internal", "internal server error; see the node's log")

    return error_envelope


def _http_message(request: web.Request, exc: web.HTTPException, max_body_bytes: int) -> str:
    path = request.path if len(request.path) <= 200 else request.path[:200] + "..."
    if exc.status == 404:
        return f"no route for {request.method} {path}"
    if exc.status == 405:
        return f"method {request.method} is not allowed on {path}"
    if exc.status == PayloadTooLarge.status:
        return f"request body exceeds {max_body_bytes} bytes"
    return exc.reason


def _snake(reason: str) -> str:
    return "_".join(reason.lower().replace("-", " ").split()) or "http_error"


def _auth_middleware(api_token: str | None) -> Middleware:
    expected = api_token.encode("utf-8") if api_token is not None else None

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            expected is not None
            and request.method not in _OPEN_METHODS
            and not _bearer_ok(request.headers.get("Authorization", ""), expected)
        ):
            return _error_response(
                Unauthorized.status,
                Unauthorized.code,
                "this request needs the header Authorization: Bearer <api token>",
                {"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    return auth


def _bearer_ok(header: str, expected: bytes) -> bool:
    scheme, _, token = header.strip().partition(" ")
    try:
        given = token.strip().encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a non-UTF-8 header byte
        return False
    # compare_digest first so a wrong scheme costs the same as a wrong token
    return hmac.compare_digest(given, expected) and scheme.lower() == "bearer"
