"""The Windmill client against the stand-in served on loopback: every call, every error
kind, retries on 5xx / connection errors with backoff, and no retry on a 4xx."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from flexcore.config import SettingsError, load_settings
from flexcore.testing.windmill import SPEC_VERSION, WindmillStandIn
from flexcore.windmill import (
    JobAlreadyExists,
    WindmillBadRequest,
    WindmillClient,
    WindmillError,
    WindmillForbidden,
    WindmillNotFound,
    WindmillServerError,
    WindmillSettings,
    WindmillUnauthorized,
    WindmillUnavailable,
)
from flexcore.windmill.client import error_for

# Required fields of the spec's schemas (openapi.yaml, info.version 1.458.3).
QUEUED_REQUIRED = {"id", "running", "canceled", "job_kind", "permissioned_as",
                   "is_flow_step", "email", "visible_to_owner", "tag"}
COMPLETED_REQUIRED = {"id", "created_by", "duration_ms", "created_at", "started_at",
                      "success", "canceled", "job_kind", "permissioned_as", "is_flow_step",
                      "is_skipped", "email", "visible_to_owner", "tag"}

TOKEN, WS = "t0ken", "flexcore"


class Served:
    def __init__(self, standin: WindmillStandIn, url: str) -> None:
        self.standin = standin
        self.url = url

    def client(self, *, token: str = TOKEN, workspace: str = WS,
               **kwargs: Any) -> WindmillClient:
        kwargs.setdefault("backoff", 0.01)
        kwargs.setdefault("max_backoff", 0.05)
        return WindmillClient(WindmillSettings(self.url, token, workspace), **kwargs)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    standin = WindmillStandIn(token=TOKEN, workspace=WS)
    gate = asyncio.Event()

    async def slow(args: dict[str, Any]) -> Any:
        await gate.wait()
        return {"slow": args}

    def boom(args: dict[str, Any]) -> Any:
        raise ValueError(f"bad input {args.get('x')}")

    standin.script("u/test/echo", lambda args: {"echo": args})
    standin.script("u/test/slow", slow)
    standin.script("u/test/boom", boom)
    standin.flow("f/test/flow", lambda args: ["flow", args])
    runner = web.AppRunner(standin.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Served(standin, f"http://127.0.0.1:{port}")
    finally:
        gate.set()
        await runner.cleanup()


async def _completed(wm: WindmillClient, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        job = await wm.get_job(job_id)
        if job["type"] == "CompletedJob":
            return job
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} did not complete")


# --- each call ------------------------------------------------------------------------------

async def test_version_is_text_and_needs_no_token(served: Served) -> None:
    async with served.client(token="wrong") as wm:
        assert await wm.version() == f"v{SPEC_VERSION} (FlexCore stand-in)"


async def test_run_script_by_path_with_job_id_then_get_and_result(served: Served) -> None:
    job_id = str(uuid.uuid4())
    async with served.client() as wm:
        assert await wm.run_script("u/test/echo", {"a": 1}, job_id=job_id) == job_id
        job = await _completed(wm, job_id)
        assert set(job) >= COMPLETED_REQUIRED
        assert job["success"] is True and job["result"] == {"echo": {"a": 1}}
        assert job["job_kind"] == "script" and job["script_path"] == "u/test/echo"
        assert isinstance(job["duration_ms"], int)
        maybe = await wm.result_maybe(job_id)
        assert (maybe.completed, maybe.success, maybe.result) == (True, True,
                                                                  {"echo": {"a": 1}})
    assert served.standin.creations() == {job_id: 1}


async def test_queued_job_fields_and_started_flag(served: Served) -> None:
    async with served.client() as wm:
        job_id = await wm.run_script("u/test/slow", {"n": 2})
        uuid.UUID(job_id)
        job = await wm.get_job(job_id)
        assert job["type"] == "QueuedJob" and set(job) >= QUEUED_REQUIRED
        assert job["canceled"] is False and job["job_kind"] == "script"
        maybe = await wm.result_maybe(job_id)
        assert maybe.completed is False and maybe.result is None
        assert maybe.started is True and maybe.success is None


async def test_run_flow_by_path(served: Served) -> None:
    job_id = str(uuid.uuid4())
    async with served.client() as wm:
        assert await wm.run_flow("f/test/flow", {"b": 2}, job_id=job_id) == job_id
        job = await _completed(wm, job_id)
        assert job["job_kind"] == "flow" and job["result"] == ["flow", {"b": 2}]


async def test_failing_script_reports_windmill_error_shape(served: Served) -> None:
    async with served.client() as wm:
        job_id = await wm.run_script("u/test/boom", {"x": 7})
        job = await _completed(wm, job_id)
        assert job["success"] is False
        assert job["result"]["error"]["name"] == "ValueError"
        assert job["result"]["error"]["message"] == "bad input 7"
        maybe = await wm.result_maybe(job_id)
        assert maybe.completed and maybe.success is False


async def test_cancel_running_job(served: Served) -> None:
    async with served.client() as wm:
        job_id = await wm.run_script("u/test/slow", {})
        assert job_id in await wm.cancel(job_id, "not needed")
        job = await _completed(wm, job_id)
        assert job["canceled"] is True and job["success"] is False
        assert job["canceled_reason"] == "not needed"
        with pytest.raises(WindmillNotFound) as info:
            await wm.cancel(job_id, "again")
        assert info.value.text.startswith("Not found: ")
    assert served.standin.hits("cancel") == 2


# --- each error kind, and no retry on 4xx ----------------------------------------------------

async def test_job_id_reuse_is_job_already_exists_and_not_retried(served: Served) -> None:
    job_id = str(uuid.uuid4())
    async with served.client() as wm:
        await wm.run_script("u/test/echo", {}, job_id=job_id)
        with pytest.raises(JobAlreadyExists) as info:
            await wm.run_script("u/test/echo", {}, job_id=job_id)
    err = info.value
    assert isinstance(err, WindmillBadRequest) and err.status == 400
    assert err.text == f"Bad request: Job with id {job_id} already exists"
    assert err.kind == "Bad request" and err.detail == f"Job with id {job_id} already exists"
    assert served.standin.hits("run_script") == 2
    assert served.standin.creations() == {job_id: 1}
    assert served.standin.duplicate_attempts() == {job_id: 1}


async def test_unknown_script_is_not_found_with_windmill_message(served: Served) -> None:
    async with served.client() as wm:
        with pytest.raises(WindmillNotFound) as info:
            await wm.run_script("u/test/missing", {}, job_id=str(uuid.uuid4()))
        assert info.value.text == "Not found: Script not found at path u/test/missing"
        assert info.value.status == 404
        with pytest.raises(WindmillNotFound):
            await wm.get_job(str(uuid.uuid4()))
    assert served.standin.hits("run_script") == 1
    assert served.standin.hits("get_job") == 1
    assert served.standin.creations() == {}


async def test_bad_token_is_unauthorized_and_not_retried(served: Served) -> None:
    async with served.client(token="nope") as wm:
        with pytest.raises(WindmillUnauthorized) as info:
            await wm.get_job(str(uuid.uuid4()))
    assert info.value.status == 401 and info.value.text.startswith("Not authorized: ")
    assert served.standin.hits("get_job") == 1


@pytest.mark.parametrize(("status", "cls"), [(400, WindmillBadRequest),
                                             (403, WindmillForbidden),
                                             (404, WindmillNotFound)])
async def test_4xx_is_never_retried(served: Served, status: int,
                                    cls: type[WindmillError]) -> None:
    served.standin.fail("result_maybe", times=5, status=status)
    async with served.client(retries=4) as wm:
        with pytest.raises(cls):
            await wm.result_maybe(str(uuid.uuid4()))
    assert served.standin.hits("result_maybe") == 1


def test_error_mapping_keeps_windmill_text() -> None:
    cases = {400: WindmillBadRequest, 401: WindmillUnauthorized, 403: WindmillForbidden,
             404: WindmillNotFound, 500: WindmillServerError, 503: WindmillServerError}
    for status, cls in cases.items():
        err = error_for(status, "Internal: database is down", "op")
        assert type(err) is cls and err.text == "Internal: database is down"
        assert err.kind == "Internal" and err.detail == "database is down"
    assert isinstance(error_for(400, "Bad request: Job with id x already exists"),
                      JobAlreadyExists)


# --- retries -----------------------------------------------------------------------------------

async def test_5xx_is_retried_with_backoff_then_succeeds(served: Served) -> None:
    job_id = str(uuid.uuid4())
    served.standin.fail("run_script", times=2, status=500)
    async with served.client(retries=3, backoff=0.05, max_backoff=1) as wm:
        t0 = time.monotonic()
        assert await wm.run_script("u/test/echo", {}, job_id=job_id) == job_id
        elapsed = time.monotonic() - t0
    assert served.standin.hits("run_script") == 3
    assert served.standin.creations() == {job_id: 1}
    # Two waits of at least half of 0.05 and 0.1 s (jitter keeps 50-100 %).
    assert elapsed >= 0.075


async def test_5xx_exhausts_retries(served: Served) -> None:
    served.standin.fail("get_job", times=10, status=503)
    async with served.client(retries=2) as wm:
        with pytest.raises(WindmillServerError) as info:
            await wm.get_job(str(uuid.uuid4()))
    assert info.value.status == 503 and info.value.text == "Internal: injected failure"
    assert served.standin.hits("get_job") == 3


async def test_dropped_connection_is_retried(served: Served) -> None:
    served.standin.fail("version", times=2, status=0)
    async with served.client(retries=3) as wm:
        assert (await wm.version()).startswith("v")
    assert served.standin.hits("version") == 3


async def test_run_without_job_id_is_not_retried(served: Served) -> None:
    served.standin.fail("run_script", times=1, status=500)
    async with served.client(retries=3) as wm:
        with pytest.raises(WindmillServerError):
            await wm.run_script("u/test/echo", {})
    assert served.standin.hits("run_script") == 1


async def test_connection_refused_is_unavailable_after_retries() -> None:
    from flexcore.cluster import free_ports
    port = free_ports(1)[0]
    wm = WindmillClient(WindmillSettings(f"http://127.0.0.1:{port}", TOKEN, WS), retries=2,
                        backoff=0.01, max_backoff=0.02)
    async with wm:
        with pytest.raises(WindmillUnavailable) as info:
            await wm.version()
    assert info.value.status is None and wm.attempts == 3


# --- settings ----------------------------------------------------------------------------------

def test_settings_api_url_and_wmill_env_names() -> None:
    assert WindmillSettings("http://wm:8000/", "t", "w").api_url == "http://wm:8000/api"
    assert WindmillSettings("http://wm:8000/api", "t", "w").api_url == "http://wm:8000/api"
    s = WindmillSettings.from_env({"WM_BASE_URL": "http://wm", "WM_TOKEN": "t",
                                   "WM_WORKSPACE": "w"})
    assert s == WindmillSettings("http://wm", "t", "w")
    assert WindmillSettings.from_env({}) is None


def test_node_settings_read_wm_env_and_flexcore_env_wins() -> None:
    env = {"WM_BASE_URL": "http://wm:8000", "WM_TOKEN": "tok", "WM_WORKSPACE": "ws"}
    s = load_settings([], env)
    assert (s.windmill_url, s.windmill_token, s.windmill_workspace) == (
        "http://wm:8000", "tok", "ws")
    s = load_settings([], {**env, "FLEXCORE_WINDMILL_URL": "http://other:1",
                           "FLEXCORE_WINDMILL_WORKSPACE": "mine"})
    assert (s.windmill_url, s.windmill_workspace) == ("http://other:1", "mine")
    s = load_settings(["--windmill-token", "flag"], env)
    assert s.windmill_token == "flag"
    with pytest.raises(SettingsError, match="windmill-workspace"):
        load_settings([], {"WM_BASE_URL": "http://wm", "WM_TOKEN": "t"})
    with pytest.raises(SettingsError, match="windmill-url"):
        load_settings(["--windmill-url", "wm:8000", "--windmill-token", "t",
                       "--windmill-workspace", "w"], {})
    assert load_settings([], {}).windmill_url is None
