"""A local cluster of real node processes on loopback.

``python -m flexcore.cluster up --nodes 3`` starts N ``python -m flexcore.node``
processes with their own data folders, prints each API URL and the leader, and stops
them all on Ctrl-C (or SIGTERM). `LocalCluster` is the same thing as a Python object;
the integration tests and benchmarks drive it to kill, pause and restart nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def http_json(method: str, url: str, body: Any = None, *, timeout: float = 5.0,
              token: str | None = None) -> tuple[int, Any]:
    """One JSON request with the standard library; returns (status, decoded body)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw) if raw else None
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float,
             interval: float = 0.05) -> T:
    """Poll ``probe`` until it returns something other than None; TimeoutError after."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = probe()
            if value is not None:
                return value
        except (OSError, ValueError) as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            suffix = f" (last error: {last_exc})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}{suffix}")
        time.sleep(interval)


@dataclass
class NodeProcess:
    index: int
    raft: str
    api: str
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def url(self) -> str:
        return f"http://{self.api}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class NodeLike(Protocol):
    index: int
    paused: bool

    @property
    def raft(self) -> str: ...

    @property
    def url(self) -> str: ...

    @property
    def alive(self) -> bool: ...


class ClusterObserver:
    """Waits on observable cluster state through each node's API (no sleeps-and-hope).
    Subclasses provide ``nodes``: real processes (`LocalCluster`) or containers."""

    nodes: Sequence[NodeLike]

    def status(self, i: int, timeout: float = 2.0) -> dict[str, Any] | None:
        node = self.nodes[i]
        if not node.alive or node.paused:
            return None
        try:
            code, body = http_json("GET", node.url + "/v1/cluster", timeout=timeout)
        except OSError:
            return None
        return body if code == 200 and isinstance(body, dict) else None

    def live(self) -> list[NodeLike]:
        return [n for n in self.nodes if n.alive and not n.paused]

    def urls(self, among: Sequence[int] | None = None) -> list[str]:
        """API URLs of every node, or of the nodes at indices ``among``."""
        return [self.nodes[i].url for i in (among if among is not None
                                           else range(len(self.nodes)))]

    def wait_leader(self, timeout: float = 30.0, among: Sequence[int] | None = None) -> str:
        """Wait until every live node (or those in ``among``) names the same leader and
        that leader is one of them; return its Raft address."""
        def probe() -> str | None:
            idx = list(among) if among is not None else [n.index for n in self.live()]
            views = [self.status(i) for i in idx]
            if not views or any(v is None for v in views):
                return None
            leaders = {v["leader"] for v in views if v is not None}
            addrs = {self.nodes[i].raft for i in idx}
            if len(leaders) == 1:
                leader = leaders.pop()
                if leader in addrs:
                    return str(leader)
            return None
        return wait_for("a leader all live nodes agree on", probe, timeout)

    def leader_index(self, timeout: float = 30.0) -> int:
        leader = self.wait_leader(timeout)
        return next(n.index for n in self.nodes if n.raft == leader)

    def wait_ready(self, timeout: float = 30.0, among: Sequence[int] | None = None) -> None:
        def probe() -> bool | None:
            idx = list(among) if among is not None else [n.index for n in self.live()]
            for i in idx:
                code, _ = http_json("GET", self.nodes[i].url + "/ready", timeout=2)
                if code != 200:
                    return None
            return True
        wait_for("all live nodes ready", probe, timeout)

    def wait_applied(self, index: int, timeout: float = 30.0,
                     among: Sequence[int] | None = None) -> None:
        def probe() -> bool | None:
            idx = list(among) if among is not None else [n.index for n in self.live()]
            for i in idx:
                st = self.status(i)
                if st is None or st["applied_index"] < index:
                    return None
            return True
        wait_for(f"applied index {index} on live nodes", probe, timeout)



@dataclass
class LocalCluster(ClusterObserver):
    """N real ``flexcore.node`` processes on one host."""

    size: int
    base_dir: Path
    host: str = "127.0.0.1"
    raft_ports: Sequence[int] | None = None
    api_ports: Sequence[int] | None = None
    secret: str | None = None
    api_token: str | None = None
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    nodes: list[NodeProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        raft_ports = list(self.raft_ports or [])
        api_ports = list(self.api_ports or [])
        if not raft_ports or not api_ports:
            ports = free_ports(2 * self.size, self.host)
            raft_ports = raft_ports or ports[: self.size]
            api_ports = api_ports or ports[self.size:]
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.nodes = [
            NodeProcess(i, f"{self.host}:{raft_ports[i]}", f"{self.host}:{api_ports[i]}",
                        self.base_dir / f"node{i + 1}", self.base_dir / f"node{i + 1}.log")
            for i in range(self.size)
        ]

    @property
    def peers(self) -> str:
        return ",".join(n.raft for n in self.nodes)

    def command(self, node: NodeProcess, peers: str | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "flexcore.node", "--self", node.raft,
               "--peers", peers or self.peers, "--api", node.api,
               "--data-dir", str(node.data_dir)]
        if self.secret:
            cmd += ["--secret", self.secret]
        if self.api_token:
            cmd += ["--api-token", self.api_token]
        return cmd + list(self.extra_args)

    def start(self) -> LocalCluster:
        for node in self.nodes:
            self.start_node(node.index)
        return self

    def start_node(self, i: int, *, peers: str | None = None,
                   extra: Sequence[str] = ()) -> NodeProcess:
        node = self.nodes[i]
        if node.alive:
            return node
        node.data_dir.mkdir(parents=True, exist_ok=True)
        logf = node.log_path.open("ab")
        env = dict(os.environ, **self.env)
        node.proc = subprocess.Popen(self.command(node, peers) + list(extra), stdout=logf,
                                     stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL)
        logf.close()
        node.paused = False
        return node

    def add_node(self) -> NodeProcess:
        """Create (but do not start) one more node slot with fresh ports."""
        raft_port, api_port = free_ports(2, self.host)
        i = len(self.nodes)
        node = NodeProcess(i, f"{self.host}:{raft_port}", f"{self.host}:{api_port}",
                           self.base_dir / f"node{i + 1}", self.base_dir / f"node{i + 1}.log")
        self.nodes.append(node)
        return node

    def signal(self, i: int, sig: int) -> None:
        node = self.nodes[i]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(sig)

    def kill(self, i: int) -> None:
        """SIGKILL: no shutdown code runs (as a crash or OOM kill)."""
        node = self.nodes[i]
        if node.paused:
            self.signal(i, signal.SIGCONT)
        self.signal(i, signal.SIGKILL)
        if node.proc is not None:
            node.proc.wait(timeout=10)
        node.paused = False

    def stop_node(self, i: int, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        node = self.nodes[i]
        if node.proc is None:
            return None
        if node.paused:
            self.resume(i)
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
            try:
                node.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=10)
        return node.proc.returncode

    def pause(self, i: int) -> None:
        self.signal(i, signal.SIGSTOP)
        self.nodes[i].paused = True

    def resume(self, i: int) -> None:
        self.signal(i, signal.SIGCONT)
        self.nodes[i].paused = False

    def close(self) -> None:
        for node in self.nodes:
            if node.alive:
                self.stop_node(node.index, timeout=5)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

# -- CLI -------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexcore.cluster",
                                     description="Run a local FlexCore cluster on loopback.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start N nodes and keep them running until Ctrl-C")
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (1-7)")
    up.add_argument("--raft-port", type=int, default=7101, help="first Raft port")
    up.add_argument("--api-port", type=int, default=8101, help="first API port")
    up.add_argument("--data-dir", type=Path, default=Path(".flexcore-cluster"),
                    help="folder holding each node's data and log")
    up.add_argument("--secret", help="cluster secret for Raft traffic")
    up.add_argument("--api-token", help="bearer token for API writes")
    args = parser.parse_args(argv)
    if not 1 <= args.nodes <= 7:
        parser.error("--nodes must be between 1 and 7")
    for flag, port in (("--raft-port", args.raft_port), ("--api-port", args.api_port)):
        if not 1 <= port <= 65535 - args.nodes:
            parser.error(f"{flag} must leave room for {args.nodes} ports below 65536")
    cluster = LocalCluster(
        args.nodes, args.data_dir,
        raft_ports=[args.raft_port + i for i in range(args.nodes)],
        api_ports=[args.api_port + i for i in range(args.nodes)],
        secret=args.secret, api_token=args.api_token)
    stop = {"now": False}

    def on_signal(_sig: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cluster.start()
    try:
        try:
            leader = cluster.wait_leader(timeout=30)
            cluster.wait_ready(timeout=30)
        except TimeoutError as exc:
            print(f"flexcore.cluster: {exc}; see the logs in {args.data_dir}", file=sys.stderr)
            return 1
        print(f"FlexCore cluster of {args.nodes} up (data and logs in {args.data_dir}):")
        for node in cluster.nodes:
            mark = "  <- leader" if node.raft == leader else ""
            print(f"  node{node.index + 1}: API {node.url}  raft {node.raft}{mark}")
        print(f"try: curl -s {cluster.nodes[0].url}/v1/cluster")
        print("Ctrl-C stops every node.", flush=True)
        while not stop["now"]:
            for node in cluster.nodes:
                if node.proc is not None and node.proc.poll() is not None:
                    print(f"node{node.index + 1} exited with code {node.proc.returncode}; "
                          f"see {node.log_path}", file=sys.stderr)
                    node.proc = None
            time.sleep(0.2)
    finally:
        print("stopping...", flush=True)
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
