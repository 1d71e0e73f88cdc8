"""An aiohttp client for the part of Windmill's REST API that FlexCore uses.

Owns the HTTP shape of the calls (paths, Bearer auth, content types), the mapping of
Windmill's errors to typed exceptions and the retry policy. Endpoints (Windmill OpenAPI
spec ``backend/windmill-api/openapi.yaml``, info.version 1.458.3):

- ``POST /api/w/{ws}/jobs/run/p/{path}?job_id=`` (script) and ``.../jobs/run/f/{path}``
  (flow): body = the args object; 201 ``text/plain`` job UUID.
- ``GET /api/w/{ws}/jobs_u/get/{id}?no_logs=true``: a ``QueuedJob`` or ``CompletedJob``
  with ``type`` naming which.
- ``GET /api/w/{ws}/jobs_u/completed/get_result_maybe/{id}?get_started=true``:
  ``{completed, result, success?, started?}``.
- ``POST /api/w/{ws}/jobs_u/queue/cancel/{id}`` ``{reason}``: 200 ``text/plain``.
- ``GET /api/version``: ``text/plain``.

Errors: Windmill answers ``text/plain`` ``"<Kind>: <message>"`` (its ``Error`` enum's
Display) with 400 (Bad request), 401 (Not authorized), 403 (Require Admin ...), 404
(Not found) or 5xx. Each becomes a `WindmillError` subclass that keeps Windmill's text.
A 400 saying the job id already exists is `JobAlreadyExists`.

Retries: 5xx answers and connection errors (refused, reset, timeouts) are retried with
exponential backoff and jitter, up to ``retries`` extra attempts; 4xx never are. A run
request without ``job_id`` is never retried (a retry could start a second job); with a
``job_id`` it is, because a repeat is refused by Windmill as "already exists".
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

__all__ = [
    "JobAlreadyExists",
    "ResultMaybe",
    "WindmillBadRequest",
    "WindmillClient",
    "WindmillError",
    "WindmillForbidden",
    "WindmillNotFound",
    "WindmillServerError",
    "WindmillSettings",
    "WindmillUnauthorized",
    "WindmillUnavailable",
]

SPEC_VERSION = "1.458.3"
_KIND = re.compile(r"^([A-Z][A-Za-z ]{1,40}):\s(.*)$", re.S)
_ALREADY_EXISTS = re.compile(r"already exists", re.I)
_MAX_ERROR_TEXT = 4000


@dataclass(frozen=True)
class WindmillSettings:
    """Where Windmill is and who we are there."""

    base_url: str          # e.g. http://windmill:8000 (with or without a trailing /api)
    token: str
    workspace: str

    @property
    def api_url(self) -> str:
        """The base URL ending in ``/api`` (``wmill`` takes WM_BASE_URL without it)."""
        url = self.base_url.rstrip("/")
        return url if url.endswith("/api") else url + "/api"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WindmillSettings | None:
        """From ``WM_BASE_URL``, ``WM_TOKEN``, ``WM_WORKSPACE`` (as Windmill's ``wmill``
        client reads them); None when ``WM_BASE_URL`` is unset."""
        env = os.environ if env is None else env
        url = env.get("WM_BASE_URL")
        if not url:
            return None
        return cls(url, env.get("WM_TOKEN", ""), env.get("WM_WORKSPACE", ""))


# --- errors -------------------------------------------------------------------------------

class WindmillError(Exception):
    """Windmill refused or failed a request. ``text`` is Windmill's own message
    (``"Not found: ..."``), ``kind`` its prefix (``"Not found"``) and ``detail`` the rest."""

    retryable = False

    def __init__(self, status: int | None, text: str, *, operation: str = "") -> None:
        self.status = status
        self.text = text[:_MAX_ERROR_TEXT]
        self.operation = operation
        m = _KIND.match(self.text)
        self.kind = m.group(1) if m else ""
        self.detail = m.group(2) if m else self.text
        where = f" ({operation})" if operation else ""
        super().__init__(f"Windmill{where}: {status or 'no answer'}: {self.text}")


class WindmillBadRequest(WindmillError):
    """400: the request is wrong (bad args, bad job id, ...)."""


class JobAlreadyExists(WindmillBadRequest):
    """400 "Job with id ... already exists": a job with the requested ``job_id`` was
    already created (by an earlier attempt). Counts as submitted."""


class WindmillUnauthorized(WindmillError):
    """401: the token is missing, wrong or expired."""


class WindmillForbidden(WindmillError):
    """403: the token's user may not do this."""


class WindmillNotFound(WindmillError):
    """404: no such script, flow, job or workspace."""


class WindmillServerError(WindmillError):
    """5xx after every retry."""

    retryable = True


class WindmillUnavailable(WindmillError):
    """No answer (connection refused/reset, timeout) after every retry."""

    retryable = True


def error_for(status: int, text: str, operation: str = "") -> WindmillError:
    if status == 400:
        cls: type[WindmillError] = (JobAlreadyExists if _ALREADY_EXISTS.search(text)
                                    else WindmillBadRequest)
    elif status == 401:
        cls = WindmillUnauthorized
    elif status == 403:
        cls = WindmillForbidden
    elif status == 404:
        cls = WindmillNotFound
    elif status >= 500:
        cls = WindmillServerError
    else:
        cls = WindmillError
    return cls(status, text, operation=operation)


@dataclass(frozen=True)
class ResultMaybe:
    """``get_result_maybe``'s answer."""

    completed: bool
    result: Any
    success: bool | None
    started: bool | None


def _segment_path(path: str) -> str:
    return quote(path.strip("/"), safe="/@")


# --- the client -----------------------------------------------------------------------------

class WindmillClient:
    """``async with WindmillClient(settings) as wm: job = await wm.run_script(...)``.

    ``retries``: extra attempts after a 5xx or connection error; the n-th retry waits
    about ``backoff * 2**n`` seconds (capped at ``max_backoff``, jittered).
    """

    def __init__(self, settings: WindmillSettings, *, retries: int = 4,
                 backoff: float = 0.2, max_backoff: float = 5.0, timeout: float = 30.0,
                 max_connections: int = 32) -> None:
        if not settings.base_url.startswith(("http://", "https://")):
            raise ValueError("Windmill base URL must start with http:// or https://")
        self.settings = settings
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self.attempts = 0        # HTTP requests sent, retries included (for metrics)

    async def __aenter__(self) -> WindmillClient:
        self._open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                headers={"Authorization": f"Bearer {self.settings.token}"})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _ws(self, rest: str) -> str:
        ws = quote(self.settings.workspace, safe="")
        return f"{self.settings.api_url}/w/{ws}/{rest}"

    # -- calls --------------------------------------------------------------------------

    async def run_script(self, path: str, args: Mapping[str, Any] | None = None, *,
                         job_id: str | None = None) -> str:
        """Start the script at ``path``; returns the job UUID."""
        return await self._run("p", path, args, job_id)

    async def run_flow(self, path: str, args: Mapping[str, Any] | None = None, *,
                       job_id: str | None = None) -> str:
        """Start the flow at ``path``; returns the job UUID."""
        return await self._run("f", path, args, job_id)

    async def _run(self, kind: str, path: str, args: Mapping[str, Any] | None,
                   job_id: str | None) -> str:
        params = {"job_id": job_id} if job_id else None
        _, text = await self._request(
            "POST", self._ws(f"jobs/run/{kind}/{_segment_path(path)}"),
            operation=f"run {'script' if kind == 'p' else 'flow'} {path}",
            json_body=dict(args or {}), params=params, expect=(201,),
            retry=job_id is not None)
        return text.strip().strip('"')

    async def get_job(self, job_id: str) -> dict[str, Any]:
        """The job as Windmill reports it: ``type`` is ``QueuedJob`` or ``CompletedJob``."""
        _, body = await self._json("GET", self._ws(f"jobs_u/get/{quote(job_id, safe='')}"),
                                   operation=f"get job {job_id}",
                                   params={"no_logs": "true"})
        if not isinstance(body, dict) or body.get("type") not in ("QueuedJob",
                                                                   "CompletedJob"):
            raise WindmillError(200, "job answer is not a QueuedJob or CompletedJob",
                                operation=f"get job {job_id}")
        return body

    async def result_maybe(self, job_id: str, *, get_started: bool = True) -> ResultMaybe:
        """Whether the job completed, and its result if so."""
        _, body = await self._json(
            "GET", self._ws(f"jobs_u/completed/get_result_maybe/{quote(job_id, safe='')}"),
            operation=f"get result of {job_id}",
            params={"get_started": "true" if get_started else "false"})
        if not isinstance(body, dict) or not isinstance(body.get("completed"), bool):
            raise WindmillError(200, "get_result_maybe answer has no boolean 'completed'",
                                operation=f"get result of {job_id}")
        success, started = body.get("success"), body.get("started")
        return ResultMaybe(body["completed"], body.get("result"),
                           success if isinstance(success, bool) else None,
                           started if isinstance(started, bool) else None)

    async def cancel(self, job_id: str, reason: str = "") -> str:
        """Cancel a queued or running job; returns Windmill's text answer."""
        _, text = await self._request(
            "POST", self._ws(f"jobs_u/queue/cancel/{quote(job_id, safe='')}"),
            operation=f"cancel {job_id}", json_body={"reason": reason}, expect=(200,),
            retry=True)
        return text

    async def version(self) -> str:
        """The backend's version string (``GET /api/version``)."""
        _, text = await self._request("GET", f"{self.settings.api_url}/version",
                                      operation="version", expect=(200,), retry=True)
        return text.strip()

    # -- plumbing -----------------------------------------------------------------------

    async def _json(self, method: str, url: str, *, operation: str,
                    params: dict[str, str] | None = None) -> tuple[int, Any]:
        status, text = await self._request(method, url, operation=operation, params=params,
                                           expect=(200,), retry=True)
        try:
            return status, json.loads(text)
        except ValueError:
            raise WindmillError(status, f"answer is not JSON: {text[:200]}",
                                operation=operation) from None

    async def _request(self, method: str, url: str, *, operation: str,
                       json_body: Any = None, params: dict[str, str] | None = None,
                       expect: tuple[int, ...], retry: bool) -> tuple[int, str]:
        session = self._open()
        attempt = 0
        while True:
            self.attempts += 1
            try:
                async with session.request(method, url, json=json_body,
                                           params=params) as resp:
                    text = await resp.text(errors="replace")
                    status = resp.status
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                    TimeoutError) as exc:
                error: WindmillError = WindmillUnavailable(
                    None, f"{type(exc).__name__}: {exc}", operation=operation)
            else:
                if status in expect:
                    return status, text
                error = error_for(status, text or f"HTTP {status}", operation)
            if not (retry and error.retryable and attempt < self.retries):
                raise error
            delay = min(self.max_backoff, self.backoff * 2 ** attempt)
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            attempt += 1
