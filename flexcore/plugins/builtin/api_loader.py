"""``api-loader``: POST each batch to an HTTP endpoint, with an idempotency key.

Config: ``{url, headers?, timeout_s?, max_attempts?, backoff_s?, backoff_max_s?}``.

``execute {rows, key, meta?}`` sends one request::

    POST <url>
    Content-Type: application/json
    Idempotency-Key: <key>
    {"key": <key>, "meta": <meta>, "rows": [...]}

The pipeline derives ``key`` from the batch's position in the source (pipeline,
checkpoint epoch, batch sequence, cursor range), so a batch sent again - a retry here,
or a new leader resuming after a failover - carries the same key, and a receiver that
remembers keys it has accepted loads each batch once.

Retry policy (`classify`): 2xx is done; 5xx, a connection error or a timeout is retried
up to ``max_attempts`` (default 5) with exponential backoff from ``backoff_s``
(default 0.2 s) up to ``backoff_max_s`` (default 5 s), with jitter; every 4xx is final
(``rejected``): a request the receiver refused will be refused again. Retry sleeps are
plain ``asyncio.sleep`` on the plugin's loop, so ``shutdown`` (and a cancelled call)
ends them at once.
"""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any

import aiohttp

from flexcore.plugins.sdk import Plugin, PluginError, check_config_fields, serve

NAME = "api-loader"
VERSION = "1.0.0"
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}")

CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["url"],
    "properties": {
        "url": {"type": "string"},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
        "timeout_s": {"type": "number", "minimum": 0.1, "maximum": 300},
        "max_attempts": {"type": "integer", "minimum": 1, "maximum": 20},
        "backoff_s": {"type": "number", "minimum": 0, "maximum": 60},
        "backoff_max_s": {"type": "number", "minimum": 0, "maximum": 600},
    },
}


def classify(status: int | None) -> str:
    """``"ok"``, ``"retry"`` or ``"fail"`` for an HTTP status (None: no response:
    connection error or timeout)."""
    if status is None or 500 <= status <= 599:
        return "retry"
    if 200 <= status <= 299:
        return "ok"
    return "fail"


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before attempt ``attempt + 1`` (attempt counts from 1): ``base * 2**(n-1)``
    capped at ``cap``, with up to 25 % jitter below it."""
    delay = min(cap, base * 2 ** (attempt - 1))
    return float(delay * (0.75 + 0.25 * (rng or random).random()))


def _number(config: dict[str, Any], key: str, default: float, low: float, high: float
            ) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not low <= value <= high:
        raise PluginError("bad_config", f"{key} must be a number from {low:g} to {high:g}")
    return float(value)


class Loader(Plugin):
    def __init__(self) -> None:
        self.url: str | None = None
        self.headers: dict[str, str] = {}
        self.timeout_s = 10.0
        self.max_attempts = 5
        self.backoff_s = 0.2
        self.backoff_max_s = 5.0
        self.session: aiohttp.ClientSession | None = None

    def info(self) -> dict[str, Any]:
        return {"name": NAME, "version": VERSION, "kind": "loader",
                "config_schema": CONFIG_SCHEMA}

    def init(self, config: dict[str, Any]) -> None:
        check_config_fields(config, CONFIG_SCHEMA["properties"])
        url = config.get("url")
        if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
            raise PluginError("bad_config", "url must be an http(s) URL")
        headers = config.get("headers") or {}
        if not isinstance(headers, dict) or not all(
                isinstance(k, str) and _HEADER_NAME.fullmatch(k) and isinstance(v, str)
                and "\n" not in v and "\r" not in v for k, v in headers.items()):
            raise PluginError("bad_config", "headers must map header names to one-line "
                                            "string values")
        attempts = config.get("max_attempts", 5)
        if type(attempts) is not int or not 1 <= attempts <= 20:
            raise PluginError("bad_config", "max_attempts must be an integer from 1 to 20")
        self.url, self.headers, self.max_attempts = url, dict(headers), attempts
        self.timeout_s = _number(config, "timeout_s", 10.0, 0.1, 300)
        self.backoff_s = _number(config, "backoff_s", 0.2, 0, 60)
        self.backoff_max_s = _number(config, "backoff_max_s", 5.0, 0, 600)

    async def execute(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.url is None:
            raise PluginError("not_initialized", "call init first")
        rows, key = params.get("rows"), params.get("key")
        if not isinstance(rows, list) or not isinstance(key, str) or not 1 <= len(key) <= 200:
            raise PluginError("bad_request", "execute needs {rows: [...], key: str}")
        if self.session is None:
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        body = {"key": key, "meta": params.get("meta"), "rows": rows}
        headers = {**self.headers, "Idempotency-Key": key}
        last = ""
        for attempt in range(1, self.max_attempts + 1):
            status: int | None = None
            try:
                async with self.session.post(self.url, json=body, headers=headers) as resp:
                    status = resp.status
                    text = (await resp.text())[:300] if status >= 300 else ""
            except (aiohttp.ClientError, TimeoutError) as exc:
                text = f"{type(exc).__name__}: {exc}"[:300]
            verdict = classify(status)
            if verdict == "ok":
                return {"loaded": len(rows), "attempts": attempt, "status": status}
            last = f"HTTP {status}: {text}" if status is not None else text
            if verdict == "fail":
                raise PluginError("rejected", f"the receiver refused the batch ({last}); "
                                              "4xx answers are not retried")
            if attempt < self.max_attempts:
                await asyncio.sleep(backoff(attempt, self.backoff_s, self.backoff_max_s))
        raise PluginError("retryable", f"gave up after {self.max_attempts} attempts: {last}")

    async def shutdown(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


if __name__ == "__main__":
    serve(Loader())
