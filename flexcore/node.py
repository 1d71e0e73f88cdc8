"""`python -m flexcore.node`: the composition root, and the only place things are wired.

Start order: 1. the state machine; 2. the Raft node (opens the journal, loads the
snapshot, binds the Raft port); 3. the services; 4. the admin API; 5. background
tasks (register this node's API address; the timer runner, which fires schedules
while this node leads). Shutdown runs in reverse: end long-polls and event streams,
stop accepting HTTP, stop background tasks and the timer runner, then stop Raft (the
journal is flushed on close).

Components (`flexcore.di`): the clock, the state machine and the Windmill client are
built through ``components.provide(Type, factory)``, so a caller's override replaces
them; everything built here is registered too, so handlers can ask for any of them
by type (``RaftNode``, ``NodeServices``, ``QueueService``, ``GroupService``, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from .api.app import create_app
from .api.groups import add_group_routes
from .api.pipelines import add_pipeline_routes
from .api.queues import add_queue_routes
from .api.schedules import add_schedule_routes
from .api.stream import add_stream_routes
from .api.workflows import add_workflow_routes
from .config import Settings, SettingsError, check_hostport, load_settings
from .di import Clock, Components
from .events import EventFeed
from .groups import GroupService
from .plugins.host import PluginHost
from .plugins.runner import PipelineRunner
from .plugins.service import PipelineService
from .queues import QueueService
from .raft import RaftConfig, RaftNode
from .service import NodeServices
from .statemachine import StateMachine
from .timers import ScheduleService, TimerRunner
from .windmill.client import WindmillClient, WindmillSettings
from .windmill.runner import WorkflowRunner
from .windmill.service import WorkflowService

log = logging.getLogger("flexcore.node")


class FlexNode:
    """One running FlexCore node: Raft member + admin API, in this process."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] | None = None,
                 components: Mapping[type[Any], object] | None = None) -> None:
        self.settings = settings.validate()
        self.components = c = Components(components)
        if clock is None:
            clock = c.provide(Clock, Clock)
        # 1. The state machine: pure, fed only by Raft.
        self.machine = c.provide(StateMachine, StateMachine)
        # 2. The Raft node that replicates commands into it.
        self.raft = RaftNode(
            RaftConfig(
                self_addr=settings.self_addr,
                peers=tuple(settings.peers),
                data_dir=settings.data_dir,
                secret=settings.secret,
                fsync=settings.fsync,
                election_timeout=settings.election_timeout,
                propose_timeout=settings.propose_timeout,
                compaction_min_entries=settings.compaction_min_entries,
                max_batch_commands=settings.max_batch,
            ),
            self.machine, clock=clock, on_fatal=self._fatal)
        # 3. The services the API and library call.
        self.services = NodeServices(self.raft, self.machine,
                                     api_url=settings.advertised_api, clock=clock)
        self.queues = QueueService(self.services, clock=clock)
        self.app = create_app(self.services, api_token=settings.api_token,
                              max_body_bytes=settings.max_body_bytes)
        add_queue_routes(self.app, self.queues)
        # Consumer groups and the live event tail (SSE), both fed by the apply path.
        self.feed = EventFeed(self.raft, self.machine)
        self.groups = GroupService(self.services)
        add_group_routes(self.app, self.groups)
        add_stream_routes(self.app, self.feed)
        # Timer singletons: the runner fires schedules while this node owns them.
        self.timers = TimerRunner(self.raft, self.machine, self.services, clock=clock)
        self.schedules = ScheduleService(self.services, self.timers, clock=clock)
        add_schedule_routes(self.app, self.schedules)
        # Windmill workflows: the runner submits, polls and routes while this node leads.
        wm_client = (c.provide(WindmillClient, lambda: WindmillClient(WindmillSettings(
            settings.windmill_url or "", settings.windmill_token or "",
            settings.windmill_workspace or "")))
            if settings.windmill_url or c.overridden(WindmillClient) else None)
        self.workflow_runner = WorkflowRunner(self.raft, self.machine, self.services,
                                              wm_client)
        self.workflows = WorkflowService(self.services, configured=wm_client is not None)
        add_workflow_routes(self.app, self.workflows)
        if wm_client is not None:
            self.timers.register_action("workflow", self.workflow_runner.run_for_fire)
        # Plugins and ETL pipelines: the runner executes runs batch by batch while leading.
        self.plugins = PluginHost(settings.plugins_dir)
        self.pipeline_runner = PipelineRunner(self.raft, self.machine, self.services,
                                              self.plugins)
        self.pipelines = PipelineService(self.services, self.plugins)
        add_pipeline_routes(self.app, self.pipelines)
        self.timers.register_action("pipeline", self.pipeline_runner.run_for_fire)
        for kind, value in ((RaftNode, self.raft), (NodeServices, self.services),
                            (QueueService, self.queues), (GroupService, self.groups),
                            (EventFeed, self.feed), (TimerRunner, self.timers),
                            (ScheduleService, self.schedules),
                            (WorkflowService, self.workflows), (PluginHost, self.plugins),
                            (PipelineService, self.pipelines)):
            c.set(kind, value)
        self._runner: web.AppRunner | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.fatal_error: str | None = None

    async def start(self) -> None:
        await self.raft.start()
        # 4. The admin API.
        host, port = check_hostport("--api", self.settings.api)
        debug = self.settings.log_level == "debug"
        self._runner = web.AppRunner(self.app, access_log=logging.getLogger("aiohttp.access")
                                     if debug else None, handle_signals=False)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, host.strip("[]"), port).start()
        except OSError as exc:
            await self._runner.cleanup()
            await self.raft.stop()
            raise OSError(f"cannot listen for the API on {self.settings.api}: "
                          f"{exc.strerror or exc}") from exc
        # 5. Background tasks.
        self._tasks.append(asyncio.create_task(self.services.register_self(self._stop)))
        await self.timers.start()
        await self.workflow_runner.start()
        await self.pipeline_runner.start()
        log.info("node %s up: API %s", self.settings.self_addr, self.settings.advertised_api)
        for warning in exposure_warnings(self.settings, host):
            log.warning("%s", warning)

    def request_stop(self) -> None:
        self._stop.set()

    def _fatal(self, message: str) -> None:
        self.fatal_error = message
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        self._stop.set()
        self.queues.close()   # long-polling leases answer now, not at their wait_s
        self.feed.close()     # event streams (SSE) end now
        if self._runner is not None:
            await self._runner.cleanup()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.timers.stop()
        await self.workflow_runner.stop()
        await self.pipeline_runner.stop()   # also shuts the plugin processes down
        await self.raft.stop()
        log.info("node %s stopped", self.settings.self_addr)

    async def __aenter__(self) -> FlexNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level != "debug":
        logging.getLogger("pysyncobj").setLevel(logging.WARNING)
        logging.getLogger("apscheduler").setLevel(logging.WARNING)  # a line per job run


def exposure_warnings(settings: Settings, api_host: str) -> list[str]:
    """What an operator should hear at start-up about an open door (README: Security)."""
    out: list[str] = []
    others = [p for p in settings.peers if p != settings.self_addr]
    if others and not settings.secret:
        out.append("no --secret: anyone who can reach the Raft port "
                   f"{settings.self_addr} can disrupt the cluster; set --secret "
                   "(FLEXCORE_SECRET) unless that port is on a private network")
    loopback = api_host.strip("[]") in ("127.0.0.1", "::1", "localhost")
    if not loopback and not settings.api_token:
        out.append(f"no --api-token: the API on {settings.api} accepts writes from anyone "
                   "who can reach it; set --api-token (FLEXCORE_API_TOKEN)")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        print(f"flexcore.node: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    from .app import FlexCore  # the facade wraps this module: import at use
    return FlexCore(settings).run()


if __name__ == "__main__":
    sys.exit(main())

