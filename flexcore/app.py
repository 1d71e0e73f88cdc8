"""`FlexCore`: the library facade. Embed a node in your own asyncio program.

    app = FlexCore(Settings(self_addr="10.0.0.1:7100", peers=(...), api="10.0.0.1:8100"))

    async with app:                    # starts Raft and the admin API in-process
        await app.publish("order.created", {"id": 42})

``app.run()`` does the same until SIGINT/SIGTERM; ``python -m flexcore.node`` is exactly
``FlexCore(settings_from_flags).run()``. Feature modules (queues, timers, handlers)
register what they need on this object before it starts; `FlexNode` (the composition
root in `flexcore.node`) builds the running parts.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from .api.protocol import EventIn, EventPage, EventQuery, PublishOutcome
from .config import Settings
from .node import FlexNode

log = logging.getLogger("flexcore")

StartHook = Callable[["FlexCore"], Awaitable[None]]


class FlexCore:
    """One FlexCore node inside this process, with the library API on top."""

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        if settings is None:
            settings = Settings(**overrides)
        elif overrides:
            from dataclasses import replace
            settings = replace(settings, **overrides)
        self.settings = settings.validate()
        self._node: FlexNode | None = None
        self._on_start: list[StartHook] = []
        self._on_stop: list[StartHook] = []

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def node(self) -> FlexNode:
        if self._node is None:
            raise RuntimeError("FlexCore is not started: use 'async with app' or app.run()")
        return self._node

    @property
    def started(self) -> bool:
        return self._node is not None

    def on_start(self, hook: StartHook) -> StartHook:
        """Run ``await hook(app)`` after the node started (decorator)."""
        self._on_start.append(hook)
        return hook

    def on_stop(self, hook: StartHook) -> StartHook:
        """Run ``await hook(app)`` before the node stops (decorator)."""
        self._on_stop.append(hook)
        return hook

    async def start(self) -> None:
        if self._node is not None:
            return
        node = FlexNode(self.settings)
        await node.start()
        self._node = node
        for hook in self._on_start:
            await hook(self)

    async def stop(self) -> None:
        node = self._node
        if node is None:
            return
        for hook in reversed(self._on_stop):
            try:
                await hook(self)
            except Exception:
                log.exception("stop hook %r failed", hook)
        await node.stop()
        self._node = None

    async def __aenter__(self) -> FlexCore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve(self) -> int:
        """Start, wait for SIGINT/SIGTERM (or a fatal error), stop. Returns an exit code."""
        loop = asyncio.get_running_loop()
        try:
            await self.start()
        except OSError as exc:
            log.error("%s", exc)
            return 1
        node = self.node
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, node.request_stop)
        try:
            await node.wait_stopped()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("shutting down")
        fatal = node.fatal_error
        await self.stop()
        if fatal:
            log.error("stopped on a fatal error: %s", fatal)
            return 1
        return 0

    def run(self) -> int:
        """Blocking: serve until SIGINT/SIGTERM; returns the process exit code."""
        return asyncio.run(self.serve())

    # -- events ------------------------------------------------------------------------

    async def publish(self, type: str, payload: Any = None, *, key: str | None = None,
                      id: str | None = None) -> PublishOutcome:
        """Append one event to the replicated log (idempotent when ``id`` is given)."""
        return await self.node.services.publish([EventIn(type, payload, key, id)])

    async def publish_many(self, events: list[EventIn]) -> PublishOutcome:
        return await self.node.services.publish(events)

    async def read_events(self, after: int = 0, *, type: str | None = None, limit: int = 100,
                          consistent: bool = False) -> EventPage:
        return await self.node.services.read_events(
            EventQuery(after=after, type=type, limit=limit, consistent=consistent))
