"""`LeaderDuty`: work that runs only while this node leads, in sessions bound to a term.

The Windmill runner and the pipeline runner both drive replicated work from the
leader. They share this lifecycle: a watchdog, woken by the apply path (and at least
every `WATCHDOG_S`), starts a *session* when this node becomes leader with a quorum in
some term, and cancels every task of that session as soon as the node stops leading,
loses its quorum or the term changes. Subclasses say what a session starts
(`_begin_session`) and re-check `leads(term)` before every side effect; their state
transitions are idempotent, so a new leader simply resumes from the replicated state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from .raft import RaftNode

WATCHDOG_S = 0.1


class NotLeading(Exception):
    """Raised inside a session when the node no longer leads in the session's term."""


class LeaderDuty:
    """Base class: subclasses implement `_begin_session` and may extend `_end_session`."""

    duty = "leader duty"            # for log lines and task names

    def __init__(self, raft: RaftNode, log: logging.Logger) -> None:
        self.raft = raft
        self._log = log
        self._term: int | None = None
        self._session: set[asyncio.Task[Any]] = set()
        self._main_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self.raft.add_change_listener(self._poke)
        self._main_task = asyncio.create_task(self._main(), name=f"{self.duty}-watchdog")

    async def stop(self) -> None:
        """End the session and the watchdog; wait for their tasks to finish."""
        self._closed = True
        self._end_session("node stopping")
        tasks = [t for t in (self._main_task, *self._session) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _poke(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    @property
    def change_event(self) -> asyncio.Event:
        """Set at the next change; take it *before* reading state, then wait on it."""
        return self._changed

    async def wait_change(self, timeout: float) -> None:
        """Until the applied state or leadership changes, or ``timeout`` passes."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    # -- leadership --------------------------------------------------------------------

    def leading_term(self) -> int | None:
        st = self.raft.status()
        return st.term if st.role == "leader" and st.has_quorum else None

    def leads(self, term: int) -> bool:
        """Still leading (with a quorum) in ``term``: check before every side effect."""
        return not self._closed and self.leading_term() == term

    def check(self, term: int) -> None:
        if not self.leads(term):
            raise NotLeading(f"not leading in term {term}")

    async def _main(self) -> None:
        while not self._closed:
            term = self.leading_term()
            if term != self._term:
                self._end_session("leadership changed")
                if term is not None:
                    self._term = term
                    self._log.info("leading in term %d: %s", term, self.duty)
                    self._begin_session(term)
            await self.wait_change(WATCHDOG_S)

    def _begin_session(self, term: int) -> None:
        raise NotImplementedError

    def _end_session(self, why: str) -> None:
        if self._term is not None:
            self._log.info("stopped %s (term %d): %s", self.duty, self._term, why)
        self._term = None
        for task in self._session:
            task.cancel()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Start a task that belongs to the current session."""
        task = asyncio.create_task(coro, name=name)
        self._session.add(task)
        task.add_done_callback(self._session.discard)
        return task


class RunDriverDuty(LeaderDuty):
    """A `LeaderDuty` that keeps one driver task per active run of a state-machine
    component (workflow runs, pipeline runs).

    The component exposes ``revision`` (bumped on every change) and ``active_ids()``;
    subclasses implement `_drive(run_id, term)`, which ends when the run is final or the
    node stops leading. A new leader's session starts a driver for every active run, so
    runs in flight resume after a failover.
    """

    runs_component = ""             # key of the component in machine.COMPONENTS
    run_task_prefix = "run"

    def __init__(self, raft: RaftNode, machine: Any, log: logging.Logger) -> None:
        super().__init__(raft, log)
        self.machine = machine
        self._drivers: dict[str, asyncio.Task[None]] = {}

    def _end_session(self, why: str) -> None:
        super()._end_session(why)
        self._drivers.clear()

    async def _dispatch(self, term: int) -> None:
        """Start a driver for every run that is not final, and for each new one."""
        seen: tuple[int, int] | None = None
        while self.leads(term):
            wait = self.change_event
            with self.raft.lock:
                comp = self.machine.component(self.runs_component)
                marker = (id(comp), comp.revision)
                ids = comp.active_ids() if marker != seen else []
            if marker != seen:
                seen = marker
                for run_id in ids:
                    task = self._drivers.get(run_id)
                    if task is None or task.done():
                        self._drivers[run_id] = self.spawn(
                            self._drive(run_id, term), f"{self.run_task_prefix}-{run_id[:8]}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wait.wait(), 0.5)

    async def _drive(self, run_id: str, term: int) -> None:
        raise NotImplementedError
