"""A TCP proxy that holds every byte for a fixed time, each way: the chaos suite's
stand-in for ``tc qdisc ... netem delay``, which the kernels we run on do not have.

Runs as root inside a node container; an iptables ``nat OUTPUT ... REDIRECT`` rule
sends the node's outgoing Raft connections to it, and it reads each connection's
original destination with ``SO_ORIGINAL_DST`` and connects there itself (as root, so
its own connections are not redirected: the rule matches the node's user only). Data
keeps its order; each chunk is written ``delay_ms`` after it was read, in both
directions, so a round trip over a proxied connection costs ``2 x delay_ms`` more.

    python -m flexcore.testing.delay_proxy --port 7199 --delay-ms 100 \\
        --pidfile /tmp/fc-delay.pid --max-s 120

The pid file is written once the port listens; the proxy exits by itself after
``--max-s`` seconds (a harness that died does not leave it running) or on SIGTERM,
closing every connection it holds. Test tooling, not part of a node.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import sys

log = logging.getLogger("flexcore.testing.delay_proxy")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a REDIRECTed IPv4 connection was headed before the nat rule."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(addr), port


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        try:
            while data := await reader.read(65536):
                queue.put_nowait((loop.time() + delay, data))
        finally:
            queue.put_nowait((loop.time() + delay, b""))

    reading = asyncio.create_task(read())
    try:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                return
            writer.write(data)
            await writer.drain()
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
            await reading


class DelayProxy:
    def __init__(self, delay_ms: int) -> None:
        self.delay = delay_ms / 1000
        self.connections = 0

    async def handle(self, client_r: asyncio.StreamReader,
                     client_w: asyncio.StreamWriter) -> None:
        sock = client_w.get_extra_info("socket")
        try:
            host, port = original_destination(sock)
            upstream_r, upstream_w = await asyncio.open_connection(host, port)
        except OSError as exc:
            log.info("cannot proxy a connection: %s", exc)
            client_w.close()
            return
        self.connections += 1
        pumps = [asyncio.create_task(_pump(client_r, upstream_w, self.delay)),
                 asyncio.create_task(_pump(upstream_r, client_w, self.delay))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            for w in (client_w, upstream_w):
                w.close()
            for task in pumps:
                with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                    await task


def _write_pidfile(path: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(path + ".tmp", path)


async def serve(port: int, delay_ms: int, pidfile: str | None, max_s: float) -> None:
    proxy = DelayProxy(delay_ms)
    server = await asyncio.start_server(proxy.handle, "0.0.0.0", port)
    if pidfile:
        _write_pidfile(pidfile)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    log.info("delaying proxied connections by %d ms each way on port %d", delay_ms, port)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max_s)
    server.close()
    log.info("stopping after %d connections", proxy.connections)
    if pidfile:
        with contextlib.suppress(OSError):
            os.unlink(pidfile)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=7199)
    parser.add_argument("--delay-ms", type=int, required=True)
    parser.add_argument("--pidfile")
    parser.add_argument("--max-s", type=float, default=120.0)
    args = parser.parse_args(argv)
    if not 0 <= args.delay_ms <= 60_000:
        parser.error("--delay-ms must be from 0 to 60000")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    asyncio.run(serve(args.port, args.delay_ms, args.pidfile, args.max_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
