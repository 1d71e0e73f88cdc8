"""Write a FlexCore plugin in Python: a class with four methods and ``serve(plugin)``.

    from flexcore.plugins.sdk import Plugin, PluginError, serve

    class Upper(Plugin):
        def info(self):
            return {"name": "upper", "version": "1.0", "kind": "transformer"}
        def init(self, config):
            self.field = config["field"]
        def execute(self, params):
            return {"rows": [{**r, self.field: r[self.field].upper()} for r in params["rows"]]}

    if __name__ == "__main__":
        serve(Upper())

Run by a FlexCore node as ``python -m your.module`` (an entry point in the
``flexcore.plugins`` group) or as a file in ``--plugins-dir``. ``serve`` speaks
`flexcore.plugins.protocol`: it listens on the socket the host names, prints the
handshake line, then answers requests until ``shutdown``, until the host closes the
connection, or until its stdin (a pipe from the host) closes because the host died.

Methods may be plain functions (run in a worker thread, so blocking I/O is fine) or
coroutines (run on the loop; they are cancelled by ``shutdown``, so ``asyncio.sleep``
in a retry loop ends promptly). Raise `PluginError(code, message)` for an answer with
that code (``bad_config``, ``retryable``, ``failed``, ...); any other exception answers
``failed`` with its type and message. ``python -m flexcore.plugins.sdk pkg.mod:attr``
serves the plugin object (or class, instantiated) named there.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import stat
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import protocol


class PluginError(Exception):
    """An error answer with a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_config_fields(config: dict[str, Any], allowed: Iterable[str]) -> None:
    """Refuse config fields a plugin does not know, with a ``bad_config`` error."""
    unknown = set(config) - set(allowed)
    if unknown:
        raise PluginError("bad_config",
                          f"unknown config field(s): {', '.join(sorted(unknown))}")


class Plugin:
    """Base class with the protocol's four methods; override what you need."""

    def info(self) -> dict[str, Any]:
        raise NotImplementedError

    def init(self, config: dict[str, Any]) -> None:
        """Configure the plugin (called after every start, before any execute)."""

    def execute(self, params: dict[str, Any]) -> Any:
        raise NotImplementedError

    def shutdown(self) -> Any:
        """Release resources (may be a coroutine); the process exits after it returns."""


async def _call(fn: Any, *args: Any) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    out = await asyncio.to_thread(fn, *args)
    if inspect.isawaitable(out):
        out = await out
    return out


class _Server:
    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin
        self.done = asyncio.Event()
        self.connected = False
        self.inflight: set[asyncio.Task[None]] = set()
        self.initialized = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        if self.connected:   # one host, one connection
            writer.close()
            return
        self.connected = True
        lock = asyncio.Lock()
        try:
            while not self.done.is_set():
                try:
                    msg = await protocol.read_frame(reader)
                except asyncio.CancelledError:   # the server is closing: we are done
                    break
                except protocol.ProtocolError as exc:
                    print(f"plugin: protocol error from the host: {exc}", file=sys.stderr)
                    break
                if msg is None:
                    break
                if "method" not in msg:
                    continue
                task = asyncio.create_task(self.answer(msg, writer, lock))
                self.inflight.add(task)
                task.add_done_callback(self.inflight.discard)
        finally:
            for task in list(self.inflight):
                task.cancel()
            self.done.set()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def answer(self, msg: dict[str, Any], writer: asyncio.StreamWriter,
                     lock: asyncio.Lock) -> None:
        msg_id, method, params = msg["id"], msg["method"], msg.get("params") or {}
        try:
            value = await self.dispatch(method, params)
            reply = protocol.result(msg_id, value)
        except asyncio.CancelledError:
            reply = protocol.error(msg_id, "failed", "canceled: the plugin is shutting down")
        except PluginError as exc:
            reply = protocol.error(msg_id, exc.code, exc.message)
        except Exception as exc:
            reply = protocol.error(msg_id, "failed", f"{type(exc).__name__}: {exc}")
        try:
            frame = protocol.encode(reply)
        except protocol.ProtocolError as exc:
            frame = protocol.encode(protocol.error(msg_id, "failed", str(exc)))
        async with lock:
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.write(frame)
                await writer.drain()
        if method == "shutdown":
            self.done.set()

    async def dispatch(self, method: str, params: dict[str, Any]) -> Any:
        if method == "info":
            return protocol.check_info(await _call(self.plugin.info))
        if method == "init":
            config = params.get("config")
            if not isinstance(config, dict):
                raise PluginError("bad_config", "init needs {config: map}")
            await _call(self.plugin.init, config)
            self.initialized = True
            return {}
        if method == "execute":
            if not self.initialized:
                raise PluginError("not_initialized", "call init before execute")
            return await _call(self.plugin.execute, params)
        if method == "shutdown":
            current = asyncio.current_task()
            for task in list(self.inflight):
                if task is not current:
                    task.cancel()
            await _call(self.plugin.shutdown)
            return {}
        raise PluginError("unknown_method", f"unknown method {method[:64]!r}")


async def _watch_stdin(done: asyncio.Event) -> None:
    """End when stdin (the host's pipe) closes: the host died without a word."""
    try:
        if not stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode):
            return
    except (OSError, ValueError, AttributeError):
        return
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while await reader.read(4096):
            pass
        done.set()
    finally:
        transport.close()


async def _serve(plugin: Any) -> None:
    server_state = _Server(plugin)
    transport = os.environ.get(protocol.ENV_TRANSPORT, "unix")
    tmp: str | None = None
    path = ""
    if transport == "tcp":
        server = await asyncio.start_server(server_state.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        line = protocol.handshake_line("tcp", f"127.0.0.1:{port}")
    else:
        path = os.environ.get(protocol.ENV_SOCKET) or ""
        if not path:
            tmp = tempfile.mkdtemp(prefix="flexcore-plugin-")
            path = str(Path(tmp) / "plugin.sock")
        server = await asyncio.start_unix_server(server_state.handle, path)
        line = protocol.handshake_line("unix", path)
    watcher = asyncio.create_task(_watch_stdin(server_state.done))
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        await server_state.done.wait()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1)
        if transport != "tcp":
            with contextlib.suppress(OSError):
                os.unlink(path)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.rmdir(tmp)


def serve(plugin: Any) -> None:
    """Serve ``plugin`` until the host says ``shutdown`` or goes away; then exit."""
    if os.environ.get(protocol.ENV_MAGIC) != "1":
        print("This is a FlexCore plugin: a FlexCore node starts it (see 'Plugins and "
              "pipelines' in FlexCore's README). It is not meant to be run by hand.",
              file=sys.stderr)
        sys.exit(2)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(plugin))
    sys.exit(0)


def load(target: str) -> Any:
    """The plugin object named ``pkg.module:attr`` (a class is instantiated)."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected pkg.module:attr, got {target!r}")
    obj = getattr(importlib.import_module(module_name), attr)
    return obj() if inspect.isclass(obj) else obj


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m flexcore.plugins.sdk pkg.module:attr", file=sys.stderr)
        sys.exit(2)
    serve(load(sys.argv[1]))
