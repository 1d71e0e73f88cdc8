"""A Windmill stand-in: the endpoints FlexCore uses, served by aiohttp.

A real Windmill ships as images from its own registry and cannot run on the test
machines, so the client and the cluster are tested against this app instead. It follows
Windmill's OpenAPI spec (windmill-labs/windmill ``backend/windmill-api/openapi.yaml``,
``info.version: 1.458.3``) for every endpoint FlexCore calls:

- ``POST /api/w/{workspace}/jobs/run/p/{path}`` and ``.../jobs/run/f/{path}``: body is
  the args object (``ScriptArgs``); optional ``job_id`` query parameter (``NewJobId``:
  "If a job id already exists in the queue or as a completed job, the request to create
  one will fail (Bad Request)"); 201 ``text/plain`` job UUID.
- ``GET /api/w/{workspace}/jobs_u/get/{id}``: a ``Job``: ``QueuedJob`` or ``CompletedJob``
  (all their required fields) plus ``type``.
- ``GET /api/w/{workspace}/jobs_u/completed/get_result_maybe/{id}``: ``{completed,
  result}`` (required) plus ``success`` once completed and ``started`` with
  ``get_started=true``.
- ``POST /api/w/{workspace}/jobs_u/queue/cancel/{id}`` ``{reason}``: 200 ``text/plain``.
- ``GET /api/version``: 200 ``text/plain``.

Errors are what Windmill's ``Error`` enum renders (``windmill-common/src/error.rs``):
``text/plain`` ``"<Kind>: <message>"`` with 400 ``Bad request``, 401 ``Not authorized``,
404 ``Not found`` and 500 ``Internal``. Scripts and flows are Python callables the test
registers (``fn(args) -> result``; ``async def`` for slow ones: a plain function runs on
the server's loop). A callable that raises makes the job fail with Windmill's error
result shape ``{"error": {"name", "message", "stack"}}``.

Test hooks: ``latency`` (seconds added to every request), ``fail(operation, times,
status)`` (the next ``times`` calls of an operation answer ``status``, or drop the
connection when ``status`` is 0), and the records ``created`` (job id -> number of
creations), ``duplicates`` (job id -> refused re-creations) and ``requests``
(operation -> count).

``python -m flexcore.testing.windmill --port 8000`` serves it with a few demo scripts
(``u/flexcore/echo``, ``u/flexcore/sleep``, ``u/flexcore/fail`` and the flow
``f/flexcore/echo``); the docker cluster runs it that way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import threading
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

__all__ = ["SPEC_VERSION", "StandInServer", "WindmillStandIn"]

SPEC_VERSION = "1.458.3"
VERSION_TEXT = f"v{SPEC_VERSION} (FlexCore stand-in)"

Script = Callable[[dict[str, Any]], Any]
OPERATIONS = ("run_script", "run_flow", "get_job", "result_maybe", "cancel", "version")


def _iso(ts: datetime) -> str:
    return ts.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain")


@dataclass
class _Job:
    id: str
    workspace: str
    path: str
    kind: str                   # script | flow
    args: dict[str, Any]
    user: str
    created_at: datetime
    started_at: datetime | None = None
    completed: bool = False
    success: bool = False
    result: Any = None
    duration_ms: int = 0
    canceled: bool = False
    canceled_by: str | None = None
    canceled_reason: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        common: dict[str, Any] = {
            "workspace_id": self.workspace, "id": self.id,
            "created_by": self.user, "created_at": _iso(self.created_at),
            "script_path": self.path, "args": self.args, "canceled": self.canceled,
            "job_kind": self.kind, "permissioned_as": f"u/{self.user}",
            "is_flow_step": False, "email": f"{self.user}@flexcore.test",
            "visible_to_owner": True, "tag": "flow" if self.kind == "flow" else "python3",
            "priority": 0,
        }
        if self.kind == "script":
            common["language"] = "python3"
        if self.canceled:
            common["canceled_by"] = self.canceled_by
            common["canceled_reason"] = self.canceled_reason
        if self.completed:
            return {**common, "type": "CompletedJob",
                    "started_at": _iso(self.started_at or self.created_at),
                    "duration_ms": self.duration_ms, "success": self.success,
                    "result": self.result, "logs": "", "deleted": False,
                    "is_skipped": False, "mem_peak": 0}
        queued = {**common, "type": "QueuedJob", "running": self.started_at is not None,
                  "scheduled_for": _iso(self.created_at), "logs": ""}
        if self.started_at is not None:
            queued["started_at"] = _iso(self.started_at)
            queued["last_ping"] = _iso(self.started_at)
        return queued


class WindmillStandIn:
    """The stand-in's state and its aiohttp app (``app()``); see the module docstring."""

    def __init__(self, *, token: str = "standin-token", workspace: str = "flexcore",
                 user: str = "flexcore", latency: float = 0.0) -> None:
        self.token = token
        self.workspace = workspace
        self.user = user
        self.latency = latency
        self.scripts: dict[str, Script] = {}
        self.flows: dict[str, Script] = {}
        self.jobs: dict[str, _Job] = {}
        self.created: Counter[str] = Counter()
        self.duplicates: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self._failures: dict[str, list[int]] = {}
        self._lock = threading.Lock()     # the records are read from other threads
        self._closing = False

    # -- registration and test hooks ------------------------------------------------------

    def script(self, path: str, fn: Script) -> None:
        self.scripts[path.strip("/")] = fn

    def flow(self, path: str, fn: Script) -> None:
        self.flows[path.strip("/")] = fn

    def fail(self, operation: str, times: int = 1, status: int = 500) -> None:
        """The next ``times`` calls of ``operation`` answer ``status`` (0: the connection
        is dropped without an answer)."""
        if operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {', '.join(OPERATIONS)}")
        with self._lock:
            self._failures.setdefault(operation, []).extend([status] * times)

    def creations(self) -> dict[str, int]:
        with self._lock:
            return dict(self.created)

    def duplicate_attempts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.duplicates)

    def hits(self, operation: str) -> int:
        with self._lock:
            return self.requests[operation]

    def job_view(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            job = self.jobs.get(job_id)
            return job.to_json() if job is not None else None

    # -- app ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        ws = "/api/w/{workspace}"
        app.router.add_get("/api/version", self._version)
        app.router.add_post(ws + "/jobs/run/p/{path:.+}", self._run_script)
        app.router.add_post(ws + "/jobs/run/f/{path:.+}", self._run_flow)
        app.router.add_get(ws + "/jobs_u/get/{id}", self._get_job)
        app.router.add_get(ws + "/jobs_u/completed/get_result_maybe/{id}",
                           self._result_maybe)
        app.router.add_post(ws + "/jobs_u/queue/cancel/{id}", self._cancel)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _shutdown(self, app: web.Application) -> None:
        self._closing = True
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _enter(self, request: web.Request, operation: str, *,
                     workspace: bool = True) -> web.Response | None:
        """Latency, injected failures, auth and workspace: a response ends the request."""
        with self._lock:
            self.requests[operation] += 1
            queue = self._failures.get(operation)
            injected = queue.pop(0) if queue else None
        if self.latency:
            await asyncio.sleep(self.latency)
        if injected is not None:
            if injected == 0:
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError
            return _text(injected, "Internal: injected failure" if injected >= 500
                         else f"Bad request: injected failure {injected}")
        if not workspace:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""
        given = given or request.query.get("token", "")
        if given != self.token:
            return _text(401, "Not authorized: Unauthorized")
        if request.match_info["workspace"] != self.workspace:
            return _text(401, "Not authorized: not a member of workspace "
                              f"{request.match_info['workspace']}")
        return None

    async def _version(self, request: web.Request) -> web.StreamResponse:
        early = await self._enter(request, "version", workspace=False)
        return early or _text(200, VERSION_TEXT)

    async def _run_script(self, request: web.Request) -> web.StreamResponse:
        return await self._run(request, "script")

    async def _run_flow(self, request: web.Request) -> web.StreamResponse:
        return await self._run(request, "flow")

    async def _run(self, request: web.Request, kind: str) -> web.StreamResponse:
        early = await self._enter(request, "run_script" if kind == "script" else "run_flow")
        if early is not None:
            return early
        path = request.match_info["path"]
        try:
            args = await request.json() if request.can_read_body else {}
        except ValueError:
            return _text(400, "Bad request: body is not valid JSON")
        if not isinstance(args, dict):
            return _text(400, "Bad request: args must be a JSON object")
        fn = (self.scripts if kind == "script" else self.flows).get(path)
        if fn is None:
            what = "Script" if kind == "script" else "Flow"
            return _text(404, f"Not found: {what} not found at path {path}")
        job_id = request.query.get("job_id")
        if job_id is not None:
            try:
                job_id = str(uuid.UUID(job_id))
            except ValueError:
                return _text(400, "Bad request: job_id is not a valid UUID")
        else:
            job_id = str(uuid.uuid4())
        with self._lock:
            if job_id in self.jobs:
                self.duplicates[job_id] += 1
                return _text(400, f"Bad request: Job with id {job_id} already exists")
            job = _Job(job_id, self.workspace, path, kind, args, self.user,
                       datetime.now(UTC))
            self.jobs[job_id] = job
            self.created[job_id] += 1
        job.task = asyncio.get_running_loop().create_task(self._execute(job, fn))
        return _text(201, job_id)

    async def _execute(self, job: _Job, fn: Script) -> None:
        await asyncio.sleep(0)
        job.started_at = datetime.now(UTC)
        try:
            if inspect.iscoroutinefunction(fn):
                result = await fn(dict(job.args))
            else:
                result = fn(dict(job.args))
                if inspect.isawaitable(result):
                    result = await result
            outcome: tuple[bool, Any] = (True, result)
        except asyncio.CancelledError:
            if self._closing or job.canceled:
                raise
            outcome = (False, {"error": {"name": "Canceled", "message": "Job canceled"}})
        except Exception as exc:
            outcome = (False, {"error": {"name": type(exc).__name__, "message": str(exc),
                                         "stack": traceback.format_exc(limit=5)}})
        self._complete(job, *outcome)

    def _complete(self, job: _Job, success: bool, result: Any) -> None:
        with self._lock:
            if job.completed:
                return
            now = datetime.now(UTC)
            start = job.started_at or job.created_at
            job.duration_ms = max(0, int((now - start).total_seconds() * 1000))
            job.success, job.result, job.completed = success, result, True

    def _job(self, request: web.Request) -> tuple[_Job | None, str]:
        job_id = request.match_info["id"]
        return self.jobs.get(job_id), job_id

    async def _get_job(self, request: web.Request) -> web.StreamResponse:
        early = await self._enter(request, "get_job")
        if early is not None:
            return early
        job, job_id = self._job(request)
        if job is None:
            return _text(404, f"Not found: Job {job_id} not found")
        with self._lock:
            return web.json_response(job.to_json())

    async def _result_maybe(self, request: web.Request) -> web.StreamResponse:
        early = await self._enter(request, "result_maybe")
        if early is not None:
            return early
        job, job_id = self._job(request)
        if job is None:
            return _text(404, f"Not found: Job {job_id} not found")
        with self._lock:
            body: dict[str, Any] = {"completed": job.completed,
                                    "result": job.result if job.completed else None}
            if job.completed:
                body["success"] = job.success
            if request.query.get("get_started") == "true":
                body["started"] = job.started_at is not None
        return web.json_response(body)

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        early = await self._enter(request, "cancel")
        if early is not None:
            return early
        job, job_id = self._job(request)
        if job is None or job.completed:
            return _text(404, f"Not found: queued job id {job_id} does not exist")
        try:
            body = await request.json()
        except ValueError:
            return _text(400, "Bad request: body is not valid JSON")
        reason = body.get("reason") if isinstance(body, dict) else None
        reason = reason if isinstance(reason, str) else None
        with self._lock:
            job.canceled, job.canceled_by, job.canceled_reason = True, self.user, reason
        if job.task is not None and not job.task.done():
            job.task.cancel()
        self._complete(job, False, {"error": {
            "name": "Canceled", "message": f"Job canceled: {reason or 'no reason given'} "
                                           f"by {self.user}",
            "reason": reason, "canceler": self.user}})
        return _text(200, f"job canceled {job_id}")


class StandInServer:
    """Serves a `WindmillStandIn` from a background thread with its own event loop, so
    synchronous tests (which drive real node processes) can use it."""

    def __init__(self, standin: WindmillStandIn, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.standin = standin
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        self._thread = threading.Thread(target=self._main, name="windmill-standin",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the Windmill stand-in did not start within 10 s")
        if self._error is not None:
            raise RuntimeError(f"the Windmill stand-in failed: {self._error}")
        return self.url

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start() or ignored at stop
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner = web.AppRunner(self.standin.app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            server = site._server
            if self.port == 0 and server is not None:
                sockets = getattr(server, "sockets", None) or []
                self.port = sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def call(self, fn: Callable[[], Coroutine[Any, Any, Any]], timeout: float = 10) -> Any:
        """Run ``await fn()`` on the server's loop and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(timeout)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> StandInServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- demo scripts and the CLI ----------------------------------------------------------------

def _echo(args: dict[str, Any]) -> Any:
    return args


async def _sleep(args: dict[str, Any]) -> Any:
    seconds = args.get("seconds", 1)
    await asyncio.sleep(float(seconds) if isinstance(seconds, int | float) else 1.0)
    return args


def _fail(args: dict[str, Any]) -> Any:
    raise RuntimeError(str(args.get("message", "the script failed")))


def with_demo_scripts(standin: WindmillStandIn) -> WindmillStandIn:
    standin.script("u/flexcore/echo", _echo)
    standin.script("u/flexcore/sleep", _sleep)
    standin.script("u/flexcore/fail", _fail)
    standin.flow("f/flexcore/echo", _echo)
    return standin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexcore.testing.windmill",
                                     description="Serve the Windmill stand-in.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", default="standin-token")
    parser.add_argument("--workspace", default="flexcore")
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args(argv)
    standin = with_demo_scripts(WindmillStandIn(token=args.token, workspace=args.workspace,
                                                latency=args.latency))
    web.run_app(standin.app(), host=args.host, port=args.port, access_log=None,
                print=lambda *a: print(f"Windmill stand-in (spec {SPEC_VERSION}) on "
                                       f"http://{args.host}:{args.port}", flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
