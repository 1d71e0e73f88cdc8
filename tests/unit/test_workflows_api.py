"""Request parsing for /v1/workflows, the not-configured refusal, and routing rules'
matching and argument rendering (leader side)."""

from __future__ import annotations

from typing import Any

import pytest

from flexcore.api.workflows import RouteInput, RunRequest, parse_cancel, parse_route, parse_run
from flexcore.errors import BadRequest
from flexcore.windmill.routing import RouteCache, truthy
from flexcore.windmill.runner import error_text, schedule_run_id
from flexcore.windmill.service import WorkflowService


def test_parse_run() -> None:
    assert parse_run({"path": "u/a/b"}) == RunRequest("u/a/b", "script", {}, None)
    req = parse_run({"path": "f/x/flow", "kind": "flow", "args": {"a": 1},
                     "id": "6B0F2A52-9D3E-4C55-8F57-2F1F3C4B7A10"})
    assert req.id == "6b0f2a52-9d3e-4c55-8f57-2f1f3c4b7a10" and req.kind == "flow"
    for body, fragment in (({}, "path is required"), ({"path": "../x"}, "Windmill path"),
                           ({"path": "u/a b"}, "Windmill path"),
                           ({"path": "u/a/b", "kind": "app"}, "kind"),
                           ({"path": "u/a/b", "args": [1]}, "args must be an object"),
                           ({"path": "u/a/b", "id": "x"}, "UUID"),
                           ({"path": "u/a/b", "other": 1}, "unknown field")):
        with pytest.raises(BadRequest, match=fragment):
            parse_run(body)


def test_parse_route_compiles_jmespath() -> None:
    spec = parse_route({"event_type": "order.*", "path": "u/a/b",
                        "condition": "payload.total > `10`",
                        "args_from": {"order": "payload.id"}})
    assert spec == RouteInput("order.*", "u/a/b", "script", "payload.total > `10`", {},
                              {"order": "payload.id"}, True)
    with pytest.raises(BadRequest, match="condition is not a valid JMESPath"):
        parse_route({"event_type": "a", "path": "u/a/b", "condition": "payload.[["})
    with pytest.raises(BadRequest, match=r"args_from\.x is not a valid JMESPath"):
        parse_route({"event_type": "a", "path": "u/a/b", "args_from": {"x": "]"}})
    with pytest.raises(BadRequest, match="enabled"):
        parse_route({"event_type": "a", "path": "u/a/b", "enabled": "yes"})
    assert parse_cancel(b"") is None and parse_cancel(b'{"reason": "r"}') == "r"


async def test_runs_and_rules_need_windmill_settings() -> None:
    class _Services:
        raft = machine = None

    service = WorkflowService(_Services(), configured=False)  # type: ignore[arg-type]
    with pytest.raises(Exception) as info:
        await service.create_run(RunRequest("u/a/b", "script"))
    assert getattr(info.value, "status", None) == 503
    assert getattr(info.value, "code", None) == "windmill_not_configured"


def _rule(**extra: Any) -> dict[str, Any]:
    view = {"id": "r", "version": 1, "event_type": "order.*", "start_after": 2,
            "path": "u/a/b", "kind": "script", "args": {"k": "v"},
            "condition": "payload.total >= `100`",
            "args_from": {"total": "payload.total", "event": "@"}, "enabled": True}
    view.update(extra)
    return view


def _event(offset: int, type_: str = "order.created", total: Any = 150) -> dict[str, Any]:
    return {"offset": offset, "id": f"e{offset}", "type": type_, "key": None,
            "payload": {"total": total}, "ts": 1}


def test_routing_matches_type_offset_condition_and_renders_args() -> None:
    cache = RouteCache()
    routes = cache.compile([_rule()])
    (route, args), = cache.plan(routes, _event(3))
    assert route.id == "r" and args == {"k": "v", "total": 150, "event": _event(3)}
    assert cache.plan(routes, _event(2)) == []                    # before the rule
    assert cache.plan(routes, _event(3, "user.created")) == []    # other type
    assert cache.plan(routes, _event(3, total=5)) == []           # condition false
    # A type error inside the expression is "no match", counted.
    assert cache.plan(routes, _event(3, total="many")) == [] and cache.errors == 1
    assert cache.compile([_rule(enabled=False)]) == []
    assert truthy(0) and not truthy([]) and not truthy("") and not truthy(None)


def test_helpers() -> None:
    assert error_text({"error": {"name": "ValueError", "message": "bad"}}) == "ValueError: bad"
    assert error_text(None) == "the job failed"
    assert schedule_run_id("sched:s:1") == schedule_run_id("sched:s:1")
    assert schedule_run_id("sched:s:1") != schedule_run_id("sched:s:2")
