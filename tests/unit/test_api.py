"""The admin API's HTTP layer against a fake NodeService: routes, validation, envelope, auth.

These tests check what `flexcore.api.app` does with requests and with what the service
returns or raises. They do not exercise a real node; integration tests do that.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from flexcore.api import create_app
from flexcore.api.protocol import EventIn, EventPage, EventQuery, NodeService, PublishOutcome
from flexcore.errors import BadRequest, NoQuorum, NotLeader, ProposalTimeout

TOKEN = "s3cret-token"


class FakeNodeService:
    """A fake NodeService for testing the HTTP layer only: records calls, returns canned
    answers, and raises ``self.fail_with`` from every async method when it is set."""

    def __init__(self) -> None:
        self.published: list[list[EventIn]] = []
        self.queries: list[EventQuery] = []
        self.added: list[tuple[str, str | None]] = []
        self.removed: list[str] = []
        self.ready = True
        self.fail_with: BaseException | None = None
        self.outcome: PublishOutcome | None = None

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "node": "n1"}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        return self.ready, {"leader": "n1" if self.ready else None, "lag": 0, "ready": "lie"}

    def cluster(self) -> dict[str, Any]:
        return {
            "node": "n1",
            "leader": "n1",
            "term": 3,
            "commit_index": 10,
            "applied_index": 10,
            "ready": True,
            "members": [
                {"id": "n1", "api": "http://n1:8080", "role": "leader", "status": "connected"}
            ],
        }

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    async def publish(self, events: Sequence[EventIn]) -> PublishOutcome:
        self._maybe_fail()
        self.published.append(list(events))
        if self.outcome is not None:
            return self.outcome
        return PublishOutcome(
            offsets=[100 + i for i in range(len(events))],
            ids=[e.id or f"gen-{i}" for i, e in enumerate(events)],
            duplicates=[e.id == "seen" for e in events],
            index=42,
        )

    async def read_events(self, query: EventQuery) -> EventPage:
        self._maybe_fail()
        self.queries.append(query)
        events = [
            {
                "offset": query.after + 1,
                "id": "e1",
                "type": "t",
                "key": None,
                "payload": {"a": 1},
                "ts": 1.5,
            }
        ]
        return EventPage(events=events, next=query.after + 1)

    async def add_member(self, raft: str, api: str | None) -> dict[str, Any]:
        self._maybe_fail()
        self.added.append((raft, api))
        return {"added": raft, "api": api}

    async def remove_member(self, raft: str) -> dict[str, Any]:
        self._maybe_fail()
        self.removed.append(raft)
        return {"removed": raft}

    def metrics(self) -> tuple[bytes, str]:
        return (
            b"# TYPE flexcore_up gauge\nflexcore_up 1\n",
            "text/plain; version=0.0.4; charset=utf-8",
        )


def _typed(service: FakeNodeService) -> NodeService:
    return service  # mypy/pyright check that the fake satisfies the Protocol


@asynccontextmanager
async def api_client(
    service: FakeNodeService | None = None, **kwargs: Any
) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(_typed(service or FakeNodeService()), **kwargs)
    async with TestClient(TestServer(app)) as client:
        yield client


async def error_of(resp: Any, status: int, code: str) -> str:
    """Assert the envelope, status and code; return the message."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return str(body["error"]["message"])


# --- happy paths ------------------------------------------------------------------------


async def test_health() -> None:
    async with api_client() as client:
        resp = await client.get("/health")
        assert resp.status == 200
        assert await resp.json() == {"status": "ok", "node": "n1"}
        head = await client.head("/health")
        assert head.status == 200


async def test_ready_200_and_503_and_ready_key_wins() -> None:
    service = FakeNodeService()
    async with api_client(service) as client:
        resp = await client.get("/ready")
        assert resp.status == 200
        assert await resp.json() == {"ready": True, "leader": "n1", "lag": 0}
        service.ready = False
        resp = await client.get("/ready")
        assert resp.status == 503
        assert await resp.json() == {"ready": False, "leader": None, "lag": 0}


async def test_cluster() -> None:
    async with api_client() as client:
        resp = await client.get("/v1/cluster")
        assert resp.status == 200
        body = await resp.json()
        assert body["members"][0]["role"] == "leader"
        assert body["commit_index"] == 10


async def test_metrics_keeps_content_type() -> None:
    async with api_client() as client:
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert await resp.read() == b"# TYPE flexcore_up gauge\nflexcore_up 1\n"


async def test_publish_one_event() -> None:
    service = FakeNodeService()
    async with api_client(service) as client:
        resp = await client.post(
            "/v1/events",
            json={"type": "order.created", "payload": {"n": 1}, "key": "k", "id": "abc"},
        )
        assert resp.status == 201
        assert await resp.json() == {"offset": 100, "id": "abc", "index": 42, "duplicate": False}
    assert service.published == [[EventIn("order.created", {"n": 1}, "k", "abc")]]


async def test_publish_defaults_and_duplicate_flag() -> None:
    service = FakeNodeService()
    async with api_client(service) as client:
        resp = await client.post("/v1/events", json={"type": "t"})
        assert resp.status == 201
        resp = await client.post("/v1/events", json={"type": "t", "id": "seen", "key": None})
        assert (await resp.json())["duplicate"] is True
    assert service.published[0] == [EventIn(type="t", payload=None, key=None, id=None)]


async def test_publish_accepts_any_content_type() -> None:
    service = FakeNodeService()
    async with api_client(service) as client:
        resp = await client.post(
            "/v1/events", data=b'{"type": "t"}', headers={"Content-Type": "text/plain"}
        )
        assert resp.status == 201
    assert service.published == [[EventIn(type="t")]]


async def test_publish_batch() -> None:
    service = FakeNodeService()
    async with api_client(service) as client:
        resp = await client.post(
            "/v1/events/batch",
            json={
                "events": [
                    {"type": "a", "id": "x"},
                    {"type": "b", "payload": [1, 2]},
                    {"type": "c", "id": "seen"},
                ]
            },
        )
        assert resp.status == 201
        assert await resp.json() == {
            "offsets": [100, 101, 102],
            "ids": ["x", "gen-1", "seen"],
            "duplicates": [False, False, True],
            "index": 42,
        }
    assert [e.type for e in service.published[0]] == ["a", "b", "c"]
    assert service.published[0][1].payload == [1, 2]


async def test_publish_batch_of_1000_is_accepted() -> None:
    service = FakeNodeService()
    async with api_client(service) as client:
        resp = await client.post("/v1/events/batch", json={"events": [{"type": "t"}] * 1000})
        assert resp.status == 201
    assert len(service.published[0]) == 1000


async def test_read_events_defaults() -> None:
    service = FakeNodeService()
    async with api_client(service) as client:
        resp = await client.get("/v1/events")
        assert resp.status == 200
        body = await resp.json()
        assert body == {
            "events": [
                {"offset": 1, "id": "e1", "type": "t", "key": None, "payload": {"a": 1}, "ts": 1.5}
            ],
            "next": 1,
        }
    assert service.queries == [
        EventQuery(after=0, type=None, limit=100, min_index=None, consistent=False)
    ]


async def test_read_events_passes_every_parameter() -> None:
    service = FakeNodeService()
    async with api_client(service) as client:
        resp = await client.get(
            "/v1/events",
            params={
                "after": "7",
                "type": "order.*",
                "limit": "1000",
                "min_index": "0",
                "consistent": "true",
                "cachebust": "123",
            },
        )
        assert resp.status == 200
        assert (await resp.json())["next"] == 8
    assert service.queries == [
        EventQuery(after=7, type="order.*", limit=1000, min_index=0, consistent=True)
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("1", True),
        ("TRUE", True),
        ("false", False),
        ("0", False),
    ],
)
async def test_read_events_consistent_values(text: str, expected: bool) -> None:
    service = FakeNodeService()
    async with api_client(service) as client:
        resp = await client.get("/v1/events", params={"consistent": text})
        assert resp.status == 200
    assert service.queries[0].consistent is expected


async def test_add_member() -> None:
    service = FakeNodeService()
    async with api_client(service) as client:
        resp = await client.post(
            "/v1/cluster/members", json={"raft": "n4:4321", "api": "http://n4:8080"}
        )
        assert resp.status == 201
        assert await resp.json() == {"added": "n4:4321", "api": "http://n4:8080"}
        resp = await client.post("/v1/cluster/members", json={"raft": "[::1]:4321"})
        assert resp.status == 201
    assert service.added == [("n4:4321", "http://n4:8080"), ("[::1]:4321", None)]


async def test_remove_member() -> None:
    service = FakeNodeService()
    async with api_client(service) as client:
        resp = await client.delete("/v1/cluster/members/10.0.0.4:4321")
        assert resp.status == 200
        assert await resp.json() == {"removed": "10.0.0.4:4321"}
        resp = await client.delete("/v1/cluster/members/n5%3A4321")
        assert resp.status == 200
    assert service.removed == ["10.0.0.4:4321", "n5:4321"]


async def test_remove_member_rejects_bad_address() -> None:
    service = FakeNodeService()
    async with api_client(service) as client:
        for bad in ("n5", "n5:0", "n5:65536", "n5:abc"):
            msg = await error_of(
                await client.delete(f"/v1/cluster/members/{bad}"), 400, "bad_request"
            )
            assert "raft" in msg
    assert service.removed == []


# --- body validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "type"),
        ({"type": None}, "type"),
        ({"type": ""}, "type"),
        ({"type": 5}, "type"),
        ({"type": ["a"]}, "type"),
        ({"type": "x" * 257}, "type"),
        ({"type": "t", "key": 5}, "key"),
        ({"type": "t", "key": "k" * 1025}, "key"),
        ({"type": "t", "id": ""}, "id"),
        ({"type": "t", "id": 7}, "id"),
        ({"type": "t", "id": "i" * 257}, "id"),
        ({"type": "t", "extra": 1}, "extra"),
        ({"type": "t", "payload": {"n": 2**64}}, "payload.n"),
        ({"type": "t", "payload": [0, -(2**63) - 1]}, "payload[1]"),
    ],
)
async def test_publish_field_errors(body: dict[str, Any], field: str) -> None:
    service = FakeNodeService()
    async with api_client(service) as client:
        msg = await error_of(await client.post("/v1/events", json=body), 400, "bad_request")
        assert field in msg
    assert service.published == []


async def test_publish_accepts_limits() -> None:
    service = FakeNodeService()
    payload = {"max": 2**64 - 1, "min": -(2**63), "f": 1.5e300}
    async with api_client(service) as client:
        resp = await client.post(
            "/v1/events", json={"type": "x" * 256, "key": "", "id": "i" * 256, "payload": payload}
        )
        assert resp.status == 201
        resp = await client.post("/v1/events", json={"type": "t", "key": "k" * 1024})
        assert resp.status == 201
    assert service.published[0][0].payload == payload
    assert service.published[0][0].key == ""


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "events"),
        ({"events": None}, "events"),
        ({"events": {"type": "t"}}, "events"),
        ({"events": []}, "events"),
        ({"events": [{"type": "t"}] * 1001}, "events"),
        ({"events": [{"type": "t"}], "other": True}, "other"),
        ({"events": [{"type": "t"}, {"type": "t"}, {"type": ""}]}, "events[2].type"),
        ({"events": [{"type": "t", "bogus": 1}]}, "bogus"),
        ({"events": [{"type": "t"}, "not an object"]}, "events[1]"),
    ],
)
async def test_batch_errors(body: dict[str, Any], field: str) -> None:
    service = FakeNodeService()
    async with api_client(service) as client:
        msg = await error_of(await client.post("/v1/events/batch", json=body), 400, "bad_request")
        assert field in msg
    assert service.published == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "raft"),
        ({"raft": None}, "raft"),
        ({"raft": 1234}, "raft"),
        ({"raft": "host"}, "raft"),
        ({"raft": "host:"}, "raft"),
        ({"raft": ":4321"}, "raft"),
        ({"raft": "host:0"}, "raft"),
        ({"raft": "host:65536"}, "raft"),
        ({"raft": "host:+80"}, "raft"),
        ({"raft": "ho st:80"}, "raft"),
        ({"raft": "::1:80"}, "raft"),
        ({"raft": "h:80", "api": "ftp://h:21"}, "api"),
        ({"raft": "h:80", "api": "h:8080"}, "api"),
        ({"raft": "h:80", "api": "http://"}, "api"),
        ({"raft": "h:80", "api": "http://h:99999"}, "api"),
        ({"raft": "h:80", "api": 8080}, "api"),
        ({"raft": "h:80", "role": "voter"}, "role"),
    ],
)
async def test_member_errors(body: dict[str, Any], field: str) -> None:
    service = FakeNodeService()
    async with api_client(service) as client:
        msg = await error_of(
            await client.post("/v1/cluster/members", json=body), 400, "bad_request"
        )
        assert field in msg
    assert service.added == []


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "bad_json"),
        (b"   \n", "bad_json"),
        (b"{not json", "bad_json"),
        (b'{"type": "t"} trailing', "bad_json"),
        (b"\xff\xfe{}", "bad_json"),
        (b'{"type": "t", "payload": NaN}', "bad_request"),
        (b'{"type": "t", "payload": Infinity}', "bad_request"),
        (b'{"type": "t", "payload": -Infinity}', "bad_request"),
        (b'{"type": "t", "payload": 1e400}', "bad_request"),
        (b'{"type": "t", "payload": 18446744073709551616}', "bad_request"),
        (b'{"type": "t", "payload": ' + b"9" * 5000 + b"}", "bad_request"),
        (b'{"type": "t", "payload": "\\ud800"}', "bad_request"),
        (b'{"type": "t", "payload": {"\\udfff": 1}}', "bad_request"),
        (b'{"type": "t", "payload": ' + b"[" * 150 + b"]" * 150 + b"}", "bad_request"),
        (b"[" * 100_000 + b"]" * 100_000, "bad_json"),
        (b'[{"type": "t"}]', "bad_request"),
        (b'"a string"', "bad_request"),
        (b"null", "bad_request"),
        (b"42", "bad_request"),
    ],
)
async def test_bad_bodies(raw: bytes, code: str) -> None:
    service = FakeNodeService()
    async with api_client(service) as client:
        resp = await client.post(
            "/v1/events", data=raw, headers={"Content-Type": "application/json"}
        )
        await error_of(resp, 400, code)
    assert service.published == []


async def test_non_object_body_message_says_object() -> None:
    async with api_client() as client:
        msg = await error_of(
            await client.post("/v1/cluster/members", json=["h:1"]), 400, "bad_request"
        )
        assert "JSON object" in msg and "array" in msg


async def test_oversize_body_is_413() -> None:
    service = FakeNodeService()
    async with api_client(service, max_body_bytes=1000) as client:
        big = json.dumps({"type": "t", "payload": "x" * 2000}).encode()
        msg = await error_of(await client.post("/v1/events", data=big), 413, "payload_too_large")
        assert "1000" in msg

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(5):
                yield b" " * 400

        resp = await client.post("/v1/events/batch", data=chunks())
        await error_of(resp, 413, "payload_too_large")

        ok = json.dumps({"type": "t", "payload": "x" * 900}).encode()
        assert len(ok) <= 1000
        assert (await client.post("/v1/events", data=ok)).status == 201
    assert len(service.published) == 1


# --- query validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"after": "-1"}, "after"),
        ({"after": "abc"}, "after"),
        ({"after": "1.5"}, "after"),
        ({"after": " 1"}, "after"),
        ({"after": "1_000"}, "after"),
        ({"after": ""}, "after"),
        ({"after": str(2**63)}, "after"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"min_index": "-5"}, "min_index"),
        ({"min_index": "x"}, "min_index"),
        ({"consistent": "yes"}, "consistent"),
        ({"consistent": ""}, "consistent"),
        ({"type": ""}, "type"),
        ({"type": "t" * 257}, "type"),
        ([("after", "1"), ("after", "2")], "after"),
    ],
)
async def test_query_errors(params: Any, name: str) -> None:
    service = FakeNodeService()
    async with api_client(service) as client:
        msg = await error_of(await client.get("/v1/events", params=params), 400, "bad_request")
        assert name in msg
    assert service.queries == []


# --- routing errors ---------------------------------------------------------------------


async def test_unknown_route_is_404_envelope() -> None:
    async with api_client() as client:
        msg = await error_of(await client.get("/nope"), 404, "not_found")
        assert "/nope" in msg
        await error_of(await client.get("/v1/events/"), 404, "not_found")


async def test_wrong_method_is_405_envelope_with_allow() -> None:
    async with api_client() as client:
        resp = await client.put("/v1/events", json={"type": "t"})
        await error_of(resp, 405, "method_not_allowed")
        assert set(resp.headers["Allow"].split(",")) >= {"GET", "POST"}
        resp = await client.post("/health")
        await error_of(resp, 405, "method_not_allowed")
        assert "GET" in resp.headers["Allow"]


# --- auth -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer tökén"},
    ],
)
async def test_writes_need_the_token(headers: dict[str, str]) -> None:
    service = FakeNodeService()
    async with api_client(service, api_token=TOKEN) as client:
        for method, path, body in [
            ("POST", "/v1/events", {"type": "t"}),
            ("POST", "/v1/events/batch", {"events": [{"type": "t"}]}),
            ("POST", "/v1/cluster/members", {"raft": "h:1"}),
            ("DELETE", "/v1/cluster/members/h:1", None),
        ]:
            resp = await client.request(method, path, json=body, headers=headers)
            await error_of(resp, 401, "unauthorized")
            assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert service.published == [] and service.added == [] and service.removed == []


async def test_reads_stay_open_with_a_token() -> None:
    async with api_client(api_token=TOKEN) as client:
        for path in ("/health", "/ready", "/metrics", "/v1/cluster", "/v1/events"):
            assert (await client.get(path)).status == 200, path


async def test_writes_pass_with_the_token() -> None:
    service = FakeNodeService()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with api_client(service, api_token=TOKEN) as client:
        assert (await client.post("/v1/events", json={"type": "t"}, headers=auth)).status == 201
        resp = await client.post(
            "/v1/events", json={"type": "t"}, headers={"Authorization": f"bearer {TOKEN}"}
        )
        assert resp.status == 201
        resp = await client.delete("/v1/cluster/members/h:1", headers=auth)
        assert resp.status == 200
    assert len(service.published) == 2 and service.removed == ["h:1"]


async def test_no_token_means_writes_are_open() -> None:
    async with api_client() as client:
        assert (await client.post("/v1/events", json={"type": "t"})).status == 201


def test_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="api_token"):
        create_app(FakeNodeService(), api_token="")


# --- service errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (NoQuorum("no majority reachable"), 503, "no_quorum"),
        (ProposalTimeout("did not commit in 5s"), 503, "timeout"),
        (NotLeader("leader changed"), 503, "not_leader"),
        (BadRequest("type is reserved"), 400, "bad_request"),
    ],
)
async def test_service_errors_map_to_envelope(error: Exception, status: int, code: str) -> None:
    service = FakeNodeService()
    service.fail_with = error
    async with api_client(service) as client:
        for method, path, body in [
            ("POST", "/v1/events", {"type": "t"}),
            ("GET", "/v1/events", None),
            ("POST", "/v1/cluster/members", {"raft": "h:1"}),
            ("DELETE", "/v1/cluster/members/h:1", None),
        ]:
            resp = await client.request(method, path, json=body)
            assert await error_of(resp, status, code) == str(error)


async def test_unexpected_error_is_generic_500_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = FakeNodeService()
    service.fail_with = RuntimeError("db password is hunter2")
    with caplog.at_level(logging.ERROR, logger="flexcore.api"):
        async with api_client(service) as client:
            resp = await client.post("/v1/events", json={"type": "t"})
            text = await resp.text()
            await error_of(resp, 500, "internal")
    assert "Traceback" not in text and "hunter2" not in text and "RuntimeError" not in text
    records = [r for r in caplog.records if r.name == "flexcore.api"]
    assert len(records) == 1
    assert records[0].exc_info is not None and records[0].exc_info[0] is RuntimeError
    assert "/v1/events" in records[0].getMessage()


async def test_inconsistent_outcome_is_500() -> None:
    service = FakeNodeService()
    service.outcome = PublishOutcome(offsets=[], ids=[], duplicates=[], index=1)
    async with api_client(service) as client:
        await error_of(await client.post("/v1/events", json={"type": "t"}), 500, "internal")


async def test_cancellation_is_not_turned_into_a_response() -> None:
    app = create_app(FakeNodeService())
    error_envelope = app.middlewares[0]

    async def cancelled(request: web.Request) -> web.StreamResponse:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await error_envelope(make_mocked_request("GET", "/v1/events", app=app), cancelled)


def test_state_machine_internal_error_is_a_500_not_a_client_mistake() -> None:
    from flexcore.errors import CommandRejected
    from flexcore.service import unwrap
    from flexcore.statemachine import Err
    for code, status in (("internal", 500), ("invalid", 400), ("lease_expired", 409)):
        with pytest.raises(CommandRejected) as info:
            unwrap(Err(code, "x"))
        assert info.value.status == status and info.value.code == code
