"""Plugin protocol framing, the shipped transformer and loader, and batch keys."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
from aiohttp import web

from flexcore.plugins import protocol
from flexcore.plugins.builtin.api_loader import Loader, backoff, classify
from flexcore.plugins.builtin.json_transformer import Mapping, Transformer
from flexcore.plugins.runner import batch_key
from flexcore.plugins.sdk import PluginError


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


# --- framing ---------------------------------------------------------------------------------

async def test_frames_round_trip() -> None:
    messages = [protocol.request(1, "execute", {"rows": [{"a": 1, "b": b"\x00", "c": None}]}),
                protocol.result(1, {"rows": [], "cursor": 2**63}),
                protocol.error(2, "retryable", "HTTP 503")]
    reader = _reader(b"".join(protocol.encode(m) for m in messages))
    for message in messages:
        assert await protocol.read_frame(reader) == message
    assert await protocol.read_frame(reader) is None   # clean end between frames


async def test_oversize_frames_are_refused_both_ways() -> None:
    big = protocol.request(1, "execute", {"blob": b"x" * 2000})
    with pytest.raises(protocol.FrameTooLarge):
        protocol.encode(big, max_frame=1000)
    # A header announcing more than the limit is refused before anything is read.
    with pytest.raises(protocol.FrameTooLarge):
        await protocol.read_frame(_reader(struct.pack(">I", protocol.MAX_FRAME + 1)))


@pytest.mark.parametrize("body", [
    b"\xc1\xc1\xc1",                                              # not msgpack
    msgpack.packb([1, 2, 3]),                                     # not a map
    msgpack.packb({"id": "1", "method": "info"}),                 # id not an int
    msgpack.packb({"id": 1}),                                     # neither request nor answer
    msgpack.packb({"id": 1, "error": {"code": 1}}),               # bad error shape
    msgpack.packb({"id": 1, "result": msgpack.ExtType(1, b"x")}),  # ext type (no objects)
])
async def test_garbage_frames_are_refused(body: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        await protocol.read_frame(_reader(struct.pack(">I", len(body)) + body))


async def test_a_truncated_frame_is_an_error_not_an_end() -> None:
    frame = protocol.encode(protocol.result(1, "x" * 100))
    with pytest.raises(protocol.ProtocolError):
        await protocol.read_frame(_reader(frame[:-10]))


def test_handshake_lines() -> None:
    assert protocol.parse_handshake(b"FLEXCORE-PLUGIN|1|unix|/tmp/a.sock\n") == (
        "unix", "/tmp/a.sock")
    assert protocol.parse_handshake("FLEXCORE-PLUGIN|1|tcp|127.0.0.1:4000") == (
        "tcp", ("127.0.0.1", 4000))
    for bad in ("HELLO", "FLEXCORE-PLUGIN|2|unix|/tmp/a.sock", "FLEXCORE-PLUGIN|1|unix|rel",
                "FLEXCORE-PLUGIN|1|tcp|10.0.0.1:4000", "FLEXCORE-PLUGIN|1|grpc|/x", ""):
        with pytest.raises(protocol.HandshakeError):
            protocol.parse_handshake(bad)


# --- json-transformer -------------------------------------------------------------------------

def test_json_transformer_maps_and_filters() -> None:
    m = Mapping({"mapping": {"id": "id", "total": "amount", "city": "address.city",
                             "tags": "length(tags)"},
                 "filter": "amount > `10`"})
    rows = [{"id": 1, "amount": 5, "tags": []},
            {"id": 2, "amount": 50, "address": {"city": "Oslo"}, "tags": ["a", "b"]}]
    assert m.apply(rows) == [{"id": 2, "total": 50, "city": "Oslo", "tags": 2}]
    assert Mapping({"filter": "keep"}).apply([{"keep": True}, {"keep": []}]) == [
        {"keep": True}]


def test_json_transformer_refuses_bad_config() -> None:
    for config, needle in (({}, "mapping, a filter"), ({"mapping": {"a": "[["}}, "mapping.a"),
                           ({"filter": ""}, "filter"), ({"mapping": {"a": "a"}, "x": 1},
                                                       "unknown")):
        with pytest.raises(PluginError) as info:
            Mapping(config)
        assert info.value.code == "bad_config" and needle in info.value.message
    with pytest.raises(PluginError, match="init"):
        Transformer().execute({"rows": []})


# --- api-loader -------------------------------------------------------------------------------

def test_retry_policy_retries_5xx_and_connection_errors_only() -> None:
    assert classify(200) == classify(204) == "ok"
    assert classify(500) == classify(503) == classify(None) == "retry"
    for status in (400, 401, 404, 409, 422, 429):
        assert classify(status) == "fail"
    delays = [backoff(n, 0.2, 1.0) for n in range(1, 6)]
    assert 0.15 <= delays[0] <= 0.2 and 0.75 <= delays[-1] <= 1.0


class _Receiver:
    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.seen: list[tuple[str, int]] = []
        self.hit = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append((request.headers["Idempotency-Key"], len(body["rows"])))
        self.hit.set()
        assert body["key"] == request.headers["Idempotency-Key"]
        status = self.statuses.pop(0) if self.statuses else 200
        return web.json_response({"ok": status < 300}, status=status)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[_Receiver, str]]:
    rec = _Receiver([])
    app = web.Application()
    app.router.add_post("/in", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield rec, f"http://127.0.0.1:{port}/in"
    await runner.cleanup()


async def test_loader_retries_5xx_with_the_same_key(receiver: tuple[_Receiver, str]) -> None:
    rec, url = receiver
    loader = Loader()
    loader.init({"url": url, "backoff_s": 0.01, "max_attempts": 4})
    rec.statuses = [503, 500]
    out = await loader.execute({"rows": [{"a": 1}, {"a": 2}], "key": "p-e0-b1-abc"})
    assert out["attempts"] == 3 and out["loaded"] == 2
    assert rec.seen == [("p-e0-b1-abc", 2)] * 3
    rec.seen.clear()
    rec.statuses = [503] * 10
    with pytest.raises(PluginError) as info:
        await loader.execute({"rows": [], "key": "k2"})
    assert info.value.code == "retryable" and len(rec.seen) == 4
    await loader.shutdown()


async def test_loader_never_retries_4xx(receiver: tuple[_Receiver, str]) -> None:
    rec, url = receiver
    loader = Loader()
    loader.init({"url": url, "backoff_s": 0.01})
    rec.statuses = [429]
    with pytest.raises(PluginError) as info:
        await loader.execute({"rows": [{"a": 1}], "key": "k"})
    assert info.value.code == "rejected" and len(rec.seen) == 1
    await loader.shutdown()


async def test_loader_retry_sleep_ends_at_cancellation(receiver: tuple[_Receiver, str]
                                                       ) -> None:
    rec, url = receiver
    loader = Loader()
    loader.init({"url": url, "backoff_s": 30, "backoff_max_s": 30})
    rec.statuses = [503] * 5
    task = asyncio.create_task(loader.execute({"rows": [], "key": "k"}))
    await asyncio.wait_for(rec.hit.wait(), 10)
    t0 = time.monotonic()
    task.cancel()   # what the SDK does on shutdown
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 1 and len(rec.seen) == 1
    await loader.shutdown()


def test_loader_refuses_bad_config() -> None:
    for config in ({}, {"url": "ftp://x"}, {"url": "http://x", "max_attempts": 0},
                   {"url": "http://x", "headers": {"a b": "c"}}, {"url": "http://x", "y": 1}):
        with pytest.raises(PluginError) as info:
            Loader().init(config)
        assert info.value.code == "bad_config"


def test_batch_keys_are_stable_and_distinct() -> None:
    key = batch_key("orders", 0, 3, 200, 300)
    assert key == batch_key("orders", 0, 3, 200, 300)
    assert key.startswith("orders-e0-b3-")
    others = {batch_key("orders", 0, 3, 200, 301), batch_key("orders", 1, 3, 200, 300),
              batch_key("orders", 0, 4, 200, 300), batch_key("orders2", 0, 3, 200, 300)}
    assert key not in others and len(others) == 4
    assert batch_key("orders", 0, 1, None, "2024-01-01") == batch_key(
        "orders", 0, 1, None, "2024-01-01")


def test_frame_decode_keeps_plain_values() -> None:
    msg: dict[str, Any] = protocol.decode(msgpack.packb({"id": 3, "result": [1, "a", None]}))
    assert msg == {"id": 3, "result": [1, "a", None]}


def test_extractor_refuses_unknown_config_fields() -> None:
    from flexcore.plugins.builtin.postgres_extractor import Extractor
    with pytest.raises(PluginError) as info:
        Extractor().init({"url": "sqlite://", "table": "t", "cursor_column": "id",
                          "bogus": 1, "also": 2})
    assert info.value.code == "bad_config"
    assert info.value.message == "unknown config field(s): also, bogus"
