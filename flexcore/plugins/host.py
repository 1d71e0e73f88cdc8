"""The plugin host: finds plugins, runs them as child processes, calls them, restarts them.

Discovery (`discover`):

- entry points in the ``flexcore.plugins`` group (``importlib.metadata``): the entry
  point's name is the plugin's name; its value is a module run as ``python -m module``
  (the module calls ``flexcore.plugins.sdk.serve``) or ``module:attr``, served by
  ``python -m flexcore.plugins.sdk module:attr``. FlexCore registers its three shipped
  plugins this way (see ``pyproject.toml``).
- ``--plugins-dir DIR``: every file directly in DIR whose name is a plugin name
  (``[a-z0-9][a-z0-9._-]{0,63}``, no leading dot) and that is either executable (run
  as is: any language that prints the handshake) or ends in ``.py`` (run with this
  node's Python; the name is the file name without ``.py``). Other files are ignored
  with a log line; a name an entry point already uses keeps the entry point.

A plugin's ``info`` must name it as discovered (a mismatch is refused), so the name in
a pipeline definition always means the same program.

`PluginProcess` is one running child: started with ``asyncio`` subprocesses in its own
session (so a terminal's Ctrl-C reaches the node, which shuts plugins down in order),
stdin a pipe (the SDK exits when it closes: a node killed with SIGKILL leaves no
plugin behind), the handshake line awaited for at most ``handshake_timeout`` seconds,
then ``info`` and ``init(config)``. Every call has a timeout: a plugin that does not
answer in time is killed (SIGKILL) and the call fails with `PluginTimeout`. A plugin
that exits unexpectedly fails its calls with `PluginCrashed` and is restarted after
an exponential backoff (``backoff_min`` doubling to ``backoff_max``; reset by a call
that succeeds), re-initialised with the same config. ``close()`` sends ``shutdown``,
then SIGTERM, then SIGKILL, each after a grace period.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.metadata
import itertools
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import protocol
from .protocol import HandshakeError, ProtocolError, RemoteError

log = logging.getLogger("flexcore.plugins")

ENTRY_POINT_GROUP = "flexcore.plugins"
PLUGIN_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


class PluginFailure(Exception):
    """A plugin call did not produce a result. ``code`` is the protocol error code or
    ``crashed`` / ``timeout`` / ``unavailable``; ``retryable`` says whether trying the
    same call again may succeed."""

    code = "failed"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
            self.retryable = code in ("retryable", "crashed", "timeout", "unavailable")


class PluginCrashed(PluginFailure):
    code = "crashed"
    retryable = True


class PluginTimeout(PluginFailure):
    code = "timeout"
    retryable = True


class PluginUnavailable(PluginFailure):
    """The plugin could not be started (bad handshake, bad info, init refused...)."""

    code = "unavailable"
    retryable = True


class PluginClosed(PluginFailure):
    code = "closed"


# --- discovery ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PluginSpec:
    """How to start one discovered plugin."""

    name: str
    source: str                 # "entry_point" | "plugins_dir"
    origin: str                 # the entry point's value, or the file's path
    command: tuple[str, ...]

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "origin": self.origin}


def _entry_point_spec(name: str, value: str) -> PluginSpec | None:
    module, _, attr = value.partition(":")
    if not _MODULE.fullmatch(module) or (attr and not _MODULE.fullmatch(attr)):
        log.warning("plugin entry point %s = %r is not module or module:attr: ignored",
                    name, value)
        return None
    command = ((sys.executable, "-m", "flexcore.plugins.sdk", value) if attr
               else (sys.executable, "-m", module))
    return PluginSpec(name, "entry_point", value, command)


def discover(plugins_dir: Path | None = None) -> dict[str, PluginSpec]:
    """Every plugin this node can start, by name (entry points first, then the dir)."""
    found: dict[str, PluginSpec] = {}
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP),
                     key=lambda e: e.name):
        if not PLUGIN_NAME.fullmatch(ep.name):
            log.warning("plugin entry point name %r is not a valid plugin name: ignored",
                        ep.name)
            continue
        if ep.name in found:
            continue
        spec = _entry_point_spec(ep.name, ep.value)
        if spec is not None:
            found[ep.name] = spec
    if plugins_dir is None:
        return found
    if not plugins_dir.is_dir():
        log.warning("--plugins-dir %s is not a directory: no plugins from it", plugins_dir)
        return found
    for path in sorted(plugins_dir.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        command: tuple[str, ...]
        if path.suffix == ".py":
            name, command = path.stem, (sys.executable, str(path))
        elif os.access(path, os.X_OK):
            name, command = path.name, (str(path),)
        else:
            log.info("plugins dir: %s is neither executable nor .py: ignored", path.name)
            continue
        if not PLUGIN_NAME.fullmatch(name):
            log.warning("plugins dir: %r is not a valid plugin name: ignored", path.name)
            continue
        if name in found:
            log.warning("plugins dir: %s: the name %s is taken by %s: ignored", path.name,
                        name, found[name].origin)
            continue
        found[name] = PluginSpec(name, "plugins_dir", str(path), command)
    return found


# --- one process ------------------------------------------------------------------------------

class PluginProcess:
    """One child process running a plugin, with its RPC connection."""

    def __init__(self, spec: PluginSpec, key: str, config: dict[str, Any] | None, *,
                 socket_dir: Path, handshake_timeout: float = 10.0,
                 call_timeout: float = 60.0, backoff_min: float = 0.1,
                 backoff_max: float = 30.0, grace: float = 2.0,
                 restart: bool = True, transport: str = "unix") -> None:
        self.spec = spec
        self.key = key
        self.config = config
        self.socket_dir = socket_dir
        self.handshake_timeout = handshake_timeout
        self.call_timeout = call_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.grace = grace
        self.restart = restart
        self.transport = transport
        self.state = "stopped"        # starting | running | backoff | failed | closed
        self.pid: int | None = None
        self.starts = 0
        self.restarts = 0
        self.failures = 0             # consecutive failures (drives the backoff)
        self.last_error: str | None = None
        self.info: dict[str, Any] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._starter: asyncio.Task[None] | None = None
        self._restart_at = 0.0
        self._closing = False
        self._stderr: collections.deque[str] = collections.deque(maxlen=20)
        self._exited = asyncio.Event()
        self._serial = 0

    # -- views -----------------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        return {"key": self.key, "state": self.state, "pid": self.pid,
                "starts": self.starts, "restarts": self.restarts,
                "last_error": self.last_error}

    def stderr_tail(self) -> str:
        return " | ".join(self._stderr)

    # -- start -----------------------------------------------------------------------------

    async def ensure(self) -> None:
        """Return once the plugin runs (starting it, or waiting out its backoff)."""
        while True:
            if self._closing:
                raise PluginClosed(f"plugin {self.spec.name} ({self.key}) is closed")
            if self.state == "running":
                return
            if self._starter is None or self._starter.done():
                self._starter = self._spawn_task(self._start_when_due())
            starter = self._starter
            try:
                await asyncio.shield(starter)
            except PluginFailure:
                raise
            except asyncio.CancelledError:
                if starter.cancelled() and not self._closing:
                    continue
                raise

    async def _start_when_due(self) -> None:
        delay = self._restart_at - time.monotonic()
        if delay > 0:
            self.state = "backoff"
            await asyncio.sleep(delay)
        try:
            await self._start()
        except PluginFailure as exc:
            self._failed(exc.message)
            raise

    def _failed(self, message: str) -> None:
        self.last_error = message
        self.failures += 1
        self._restart_at = time.monotonic() + self._backoff()
        self.state = "failed" if not self.restart else "backoff"
        log.warning("plugin %s (%s): %s", self.spec.name, self.key, message)
        if self.restart and not self._closing:
            # Restart eagerly (not only when the next call comes).
            self._starter = self._spawn_task(self._start_when_due())
            self._starter.add_done_callback(_quiet)

    def _backoff(self) -> float:
        return float(min(self.backoff_max, self.backoff_min * 2 ** max(self.failures - 1, 0)))

    async def _start(self) -> None:
        self.state = "starting"
        self._serial += 1
        env = dict(os.environ)
        env[protocol.ENV_MAGIC] = "1"
        env[protocol.ENV_TRANSPORT] = self.transport
        sock = self.socket_dir / f"p{id(self) % 100000}-{self._serial}.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        env[protocol.ENV_SOCKET] = str(sock)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.spec.command, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
                start_new_session=True)
        except OSError as exc:
            raise PluginUnavailable(f"cannot start {' '.join(self.spec.command)}: "
                                    f"{exc.strerror or exc}") from None
        self._proc, self.pid = proc, proc.pid
        self._exited = asyncio.Event()
        self.starts += 1
        if self.starts > 1:
            self.restarts += 1
        assert proc.stdout is not None and proc.stderr is not None
        self._spawn_task(self._drain_stderr(proc.stderr))
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), self.handshake_timeout)
        except TimeoutError:
            await self._kill_quietly(proc)
            raise PluginUnavailable(f"no handshake line within {self.handshake_timeout:g} s"
                                    f"{self._stderr_note()}") from None
        except ValueError:   # a line longer than the stream limit
            await self._kill_quietly(proc)
            raise PluginUnavailable("refused handshake: the first stdout line is too long") \
                from None
        try:
            if not line:
                await asyncio.wait_for(proc.wait(), self.grace)
                raise HandshakeError(f"the plugin exited with code {proc.returncode} before "
                                     f"its handshake{self._stderr_note()}")
            transport, address = protocol.parse_handshake(line)
        except (HandshakeError, TimeoutError) as exc:
            await self._kill_quietly(proc)
            raise PluginUnavailable(f"refused handshake: {exc}") from None
        self._spawn_task(self._drain_stdout(proc.stdout))
        try:
            if transport == "unix":
                assert isinstance(address, str)
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(address), self.handshake_timeout)
            else:
                assert isinstance(address, tuple)
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(*address), self.handshake_timeout)
        except (OSError, TimeoutError) as exc:
            await self._kill_quietly(proc)
            raise PluginUnavailable(f"cannot connect to the plugin at {address}: {exc}") \
                from None
        self._writer = writer
        self._spawn_task(self._read_answers(reader, proc))
        self._spawn_task(self._watch_exit(proc))
        try:
            info = protocol.check_info(await self.call("info", timeout=self.handshake_timeout))
            if info["name"] != self.spec.name:
                raise PluginUnavailable(f"the plugin calls itself {info['name']!r}, but was "
                                        f"discovered as {self.spec.name!r}")
            self.info = info
            if self.config is not None:
                await self.call("init", {"config": self.config})
        except ProtocolError as exc:
            await self._kill_quietly(proc)
            raise PluginUnavailable(f"bad info answer: {exc}") from None
        except PluginFailure as exc:
            await self._kill_quietly(proc)
            if isinstance(exc, PluginUnavailable):
                raise
            raise PluginUnavailable(f"{'init' if self.info else 'info'} failed: "
                                    f"{exc.message}", code=exc.code if exc.code ==
                                    "bad_config" else None) from None
        self.state = "running"
        log.info("plugin %s (%s) running, pid %d", self.spec.name, self.key, proc.pid)

    def _stderr_note(self) -> str:
        tail = self.stderr_tail()
        return f" (stderr: {tail[-500:]})" if tail else ""

    # -- I/O tasks ---------------------------------------------------------------------------

    def _spawn_task(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _drain_stderr(self, stream: asyncio.StreamReader) -> None:
        with contextlib.suppress(ValueError, ConnectionError):
            while line := await stream.readline():
                text = line.decode("utf-8", errors="replace").rstrip()
                self._stderr.append(text[:500])
                log.info("plugin %s: %s", self.spec.name, text[:500])

    async def _drain_stdout(self, stream: asyncio.StreamReader) -> None:
        with contextlib.suppress(ValueError, ConnectionError):
            while line := await stream.readline():
                log.debug("plugin %s stdout: %s", self.spec.name,
                          line.decode("utf-8", errors="replace").rstrip()[:500])

    async def _read_answers(self, reader: asyncio.StreamReader,
                            proc: asyncio.subprocess.Process) -> None:
        why = "the plugin closed its connection"
        try:
            while True:
                msg = await protocol.read_frame(reader)
                if msg is None:
                    break
                fut = self._pending.pop(msg["id"], None)
                if fut is None or fut.done():
                    continue
                if "error" in msg:
                    fut.set_exception(RemoteError(msg["error"]["code"],
                                                  msg["error"]["message"]))
                elif "result" in msg:
                    fut.set_result(msg["result"])
        except ProtocolError as exc:
            why = f"protocol error: {exc}"
        except (ConnectionError, OSError) as exc:
            why = f"connection lost: {exc}"
        if proc.returncode is not None or self._closing:
            return
        with contextlib.suppress(TimeoutError):   # a crashing plugin: let it finish exiting
            await asyncio.wait_for(asyncio.shield(proc.wait()), 0.5)
        if proc.returncode is None:
            log.warning("plugin %s (%s): %s; killing it", self.spec.name, self.key, why)
            await self._kill_quietly(proc)

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        self._exited.set()
        was_running = self.state == "running" and self._proc is proc
        if self._proc is proc:
            self._proc = None
            self.pid = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        message = f"the plugin exited with code {code}{self._stderr_note()}"
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PluginCrashed(message))
        self._pending.clear()
        if self._closing:
            self.state = "closed"
            return
        if was_running:   # a failed start is reported by the start path
            self._failed(message)

    async def _kill_quietly(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(Exception):
            await proc.wait()

    # -- calls -------------------------------------------------------------------------------

    async def call(self, method: str, params: dict[str, Any] | None = None, *,
                   timeout: float | None = None) -> Any:
        """One RPC; starts the plugin first if needed (outside ``info``/``init``)."""
        if method not in ("info", "init", "shutdown"):
            await self.ensure()
        writer, proc = self._writer, self._proc
        if writer is None or proc is None:
            raise PluginCrashed(f"plugin {self.spec.name} is not running")
        limit = self.call_timeout if timeout is None else timeout
        msg_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        try:
            try:
                writer.write(protocol.encode(protocol.request(msg_id, method, params)))
                await writer.drain()
            except protocol.FrameTooLarge as exc:
                raise PluginFailure(f"request too large: {exc}", code="bad_request") from None
            except (ConnectionError, OSError) as exc:
                raise PluginCrashed(f"cannot send to the plugin: {exc}") from None
            try:
                value = await asyncio.wait_for(fut, limit)
            except TimeoutError:
                log.warning("plugin %s (%s): %s did not answer within %g s: killing it",
                            self.spec.name, self.key, method, limit)
                await self._kill_quietly(proc)
                raise PluginTimeout(f"{method} did not answer within {limit:g} s; the "
                                    "plugin was killed and is restarted") from None
            except RemoteError as exc:
                raise PluginFailure(exc.message, code=exc.code) from None
        finally:
            self._pending.pop(msg_id, None)
        if method == "execute":
            self.failures = 0
        return value

    # -- stop --------------------------------------------------------------------------------

    async def close(self) -> None:
        """``shutdown`` RPC, then SIGTERM, then SIGKILL; idempotent."""
        self._closing = True
        if self._starter is not None and not self._starter.done():
            self._starter.cancel()
            with contextlib.suppress(BaseException):
                await self._starter
        proc = self._proc
        if proc is not None and proc.returncode is None:
            if self._writer is not None:
                with contextlib.suppress(PluginFailure, ProtocolError, OSError):
                    await self.call("shutdown", timeout=self.grace)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    await asyncio.wait_for(asyncio.shield(proc.wait()), self.grace)
                    break
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
            with contextlib.suppress(Exception):
                await proc.wait()
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for task in list(self._tasks):
            if not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), self.grace)
                except (TimeoutError, Exception):
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
        self.state = "closed"


def _quiet(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()   # retrieved: the failure is already recorded in last_error


# --- the host ---------------------------------------------------------------------------------

class PluginHost:
    """The node's plugins: discovery, ``info`` probes and running instances."""

    def __init__(self, plugins_dir: Path | None = None, *, handshake_timeout: float = 10.0,
                 call_timeout: float = 60.0, backoff_min: float = 0.1,
                 backoff_max: float = 30.0) -> None:
        self.plugins_dir = plugins_dir
        self.handshake_timeout = handshake_timeout
        self.call_timeout = call_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.specs = discover(plugins_dir)
        self._socket_dir: Path | None = None
        self._info: dict[str, dict[str, Any]] = {}
        self._info_error: dict[str, str] = {}
        self._probes: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._instances: dict[str, PluginProcess] = {}

    @property
    def socket_dir(self) -> Path:
        if self._socket_dir is None:   # short: unix socket paths are limited to ~100 bytes
            self._socket_dir = Path(tempfile.mkdtemp(prefix="fcp-"))
        return self._socket_dir

    def spec(self, name: str) -> PluginSpec:
        spec = self.specs.get(name)
        if spec is None:
            raise LookupError(f"no plugin named {name!r} on this node (known: "
                              f"{', '.join(sorted(self.specs)) or 'none'})")
        return spec

    def process(self, name: str, key: str, config: dict[str, Any] | None, *,
                call_timeout: float | None = None, restart: bool = True) -> PluginProcess:
        return PluginProcess(self.spec(name), key, config, socket_dir=self.socket_dir,
                             handshake_timeout=self.handshake_timeout,
                             call_timeout=call_timeout or self.call_timeout,
                             backoff_min=self.backoff_min, backoff_max=self.backoff_max,
                             restart=restart)

    async def info(self, name: str) -> dict[str, Any]:
        """The plugin's ``info`` (started once, asked, shut down; cached)."""
        if name in self._info:
            return self._info[name]
        task = self._probes.get(name)
        if task is None or task.done():
            task = self._probes[name] = asyncio.create_task(self._probe(name))
        return await asyncio.shield(task)

    async def _probe(self, name: str) -> dict[str, Any]:
        proc = self.process(name, "info", None, restart=False)
        try:
            await proc.ensure()
            assert proc.info is not None
            self._info[name] = proc.info
            self._info_error.pop(name, None)
            return proc.info
        except PluginFailure as exc:
            self._info_error[name] = exc.message
            raise
        finally:
            await proc.close()

    async def open(self, name: str, key: str, config: dict[str, Any], *,
                   call_timeout: float | None = None) -> PluginProcess:
        """Start an instance of plugin ``name`` configured with ``config``; the caller
        closes it with `release`."""
        proc = self.process(name, key, config, call_timeout=call_timeout)
        old = self._instances.pop(key, None)
        if old is not None:
            await old.close()
        self._instances[key] = proc
        try:
            await proc.ensure()
        except BaseException:
            await self.release(proc)
            raise
        if proc.info is not None:
            self._info.setdefault(name, proc.info)
        return proc

    async def release(self, proc: PluginProcess) -> None:
        if self._instances.get(proc.key) is proc:
            del self._instances[proc.key]
        await proc.close()

    async def status(self, *, probe: bool = True) -> list[dict[str, Any]]:
        """Every discovered plugin with its info (probed when ``probe``) and processes."""
        if probe:
            names = [n for n in self.specs if n not in self._info]
            await asyncio.gather(*(self.info(n) for n in names), return_exceptions=True)
        out = []
        for name, spec in sorted(self.specs.items()):
            out.append({**spec.view(), "info": self._info.get(name),
                        "error": self._info_error.get(name),
                        "processes": [p.view() for p in self._instances.values()
                                      if p.spec.name == name]})
        return out

    async def close(self) -> None:
        for task in self._probes.values():
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await asyncio.gather(*(p.close() for p in list(self._instances.values())),
                             return_exceptions=True)
        self._instances.clear()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
