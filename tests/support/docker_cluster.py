"""A real FlexCore cluster in docker containers, and the faults the chaos suite injects.

Drives the engine through the docker SDK (compose v2 is not available in CI). Builds
the node image with ``docker/build-images.sh`` when the tag for the current sources is
missing. Every network gets an explicit subnet in 198.18.0.0/15; nodes get fixed
addresses the test process reaches directly on the bridge. Everything created is
removed by `close()`, which the fixtures call on every exit path.

Faults: ``kill`` (SIGKILL), ``stop``/``start``, ``pause``/``unpause`` (freeze),
``isolate``/``heal`` (network disconnect/connect: a node cut from everyone),
``cut``/``uncut`` (iptables inside a node with NET_ADMIN: drop traffic with chosen
peers, both ways or one way), ``slow``/``unslow`` (tc token-bucket rate limit plus random
loss of raft packets by iptables' statistic match), ``delay``/``undelay`` (a fixed
latency on every Raft connection the node opens, both ways: an iptables nat REDIRECT
through ``flexcore.testing.delay_proxy``). tc netem is not in our kernels.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container
from docker.models.networks import Network

from flexcore.cluster import ClusterObserver, http_json, wait_for

ROOT = Path(__file__).resolve().parents[2]
RAFT_PORT, API_PORT, LB_PORT = 7100, 8100, 8080
DELAY_PORT, DELAY_PIDFILE = 7199, "/tmp/fc-delay-proxy.pid"
NODE_UID = 10001   # the image's flexcore user (docker/Dockerfile)
# The node's own outgoing Raft connections (the delay proxy runs as root: not matched).
_NODE_RAFT_OUT = ["-p", "tcp", "--dport", str(RAFT_PORT), "-m", "owner",
                  "--uid-owner", str(NODE_UID)]
_DELAY_NAT = ["OUTPUT", *_NODE_RAFT_OUT, "-j", "REDIRECT", "--to-ports", str(DELAY_PORT)]
_DELAY_RESET = ["OUTPUT", *_NODE_RAFT_OUT, "-j", "REJECT", "--reject-with", "tcp-reset"]
WINDMILL_PORT, WINDMILL_TOKEN, WINDMILL_WORKSPACE = 8000, "standin-token", "flexcore"
LABEL = "flexcore.test"


class DockerUnavailable(RuntimeError):
    pass


def docker_client() -> docker.DockerClient:
    """A client for the local engine, or `DockerUnavailable` saying how to get one."""
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:
        raise DockerUnavailable(
            f"docker engine not reachable ({exc}). The e2e and chaos suites need it: "
            "install docker.io and start dockerd (see .ci/run), or deselect them with "
            "-m 'not docker'") from exc
    return client


def source_digest() -> str:
    """Hash of everything that goes into the node image."""
    h = hashlib.sha256()
    files = sorted([*ROOT.joinpath("flexcore").rglob("*.py"), ROOT / "pyproject.toml",
                    ROOT / "docker" / "Dockerfile", ROOT / "docker" / "build-images.sh"])
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def ensure_image(client: docker.DockerClient) -> str:
    """The node image for the current sources, built offline if missing."""
    tag = f"flexcore:src-{source_digest()}"
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    env = dict(os.environ, FLEXCORE_IMAGE=tag, PYTHON=sys.executable)
    proc = subprocess.run([str(ROOT / "docker" / "build-images.sh")], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"building {tag} failed:\n{proc.stderr[-4000:]}")
    for old in client.images.list(name="flexcore"):
        if all(t.startswith("flexcore:src-") and t != tag for t in old.tags):
            with contextlib.suppress(docker.errors.APIError):  # still used: keep it
                client.images.remove(str(old.id))
    return tag


@dataclass
class DockerNode:
    index: int
    name: str
    ip: str
    container: Container | None = None
    paused: bool = False
    running: bool = False
    isolated: bool = False
    # Network faults in force inside the container (its namespace lasts until a restart):
    cut_rules: list[list[str]] = field(default_factory=list)  # iptables chain + rule
    slow_entry: dict[str, Any] | None = None   # the fault-log entry of a `slow` link
    delay_ms: int = 0                          # latency added by the delay proxy

    @property
    def raft(self) -> str:
        return f"{self.ip}:{RAFT_PORT}"

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{API_PORT}"

    @property
    def alive(self) -> bool:
        return self.running


@dataclass
class FaultLog:
    """What the nemesis did, for the history summary."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def add(self, kind: str, target: str, **facts: Any) -> dict[str, Any]:
        entry = {"fault": kind, "target": target, "t": time.monotonic(), **facts}
        self.entries.append(entry)
        return entry

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for e in self.entries:
            kinds[e["fault"]] = kinds.get(e["fault"], 0) + 1
        recov = [e["recovery_s"] for e in self.entries if "recovery_s" in e]
        worst = f", recovery max {max(recov):.2f} s / median " \
                f"{sorted(recov)[len(recov) // 2]:.2f} s" if recov else ""
        dropped = [e["dropped"] for e in self.entries if "dropped" in e]
        lost = f", raft packets dropped on slow links {sum(dropped)}" if dropped else ""
        slowed = sorted(e["commit_ms"] for e in self.entries if "commit_ms" in e)
        lag = (f", writes over delayed links committed in {slowed[0]}-{slowed[-1]} ms"
               if slowed else "")
        return f"{len(self.entries)} faults {kinds}{worst}{lost}{lag}"


class DockerCluster(ClusterObserver):
    """N FlexCore containers (+ optional HAProxy) on their own docker network."""

    def __init__(self, size: int = 3, *, client: docker.DockerClient | None = None,
                 image: str | None = None, haproxy: bool = False,
                 env: dict[str, str] | None = None, name: str | None = None,
                 windmill: bool = False) -> None:
        self.client = client or docker_client()
        self.image = image or ensure_image(self.client)
        self.size = size
        self.run_id = name or f"fc{os.getpid()}x{random.randrange(16**4):04x}"
        self.env = env or {}
        self.want_haproxy = haproxy
        self.want_windmill = windmill
        self.windmill: Container | None = None
        self.network: Network | None = None
        self.subnet_prefix = ""
        self.nodes: list[DockerNode] = []
        self.haproxy: Container | None = None
        self.faults = FaultLog()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> DockerCluster:
        try:
            self._create_network()
            self.nodes = [DockerNode(i, f"{self.run_id}-node{i + 1}",
                                     f"{self.subnet_prefix}.{11 + i}") for i in range(self.size)]
            if self.want_windmill:
                self._create_windmill()
            for node in self.nodes:
                self._create_node(node)
            if self.want_haproxy:
                self._create_haproxy()
        except BaseException:
            self.close()
            raise
        return self

    def _create_network(self) -> None:
        ipam = docker.types.IPAMConfig
        pool = docker.types.IPAMPool
        last: Exception | None = None
        for _ in range(20):
            third = random.randrange(20, 250)
            self.subnet_prefix = f"198.18.{third}"
            try:
                self.network = self.client.networks.create(
                    self.run_id, driver="bridge", labels={LABEL: self.run_id},
                    ipam=ipam(pool_configs=[pool(subnet=f"{self.subnet_prefix}.0/24",
                                                 gateway=f"{self.subnet_prefix}.1")]))
                return
            except docker.errors.APIError as exc:  # subnet taken: try another
                last = exc
        raise RuntimeError(f"no free 198.18.x.0/24 subnet for the test network: {last}")

    @property
    def peers(self) -> str:
        return ",".join(n.raft for n in self.nodes)

    def _create_node(self, node: DockerNode, peers: str | None = None) -> None:
        assert self.network is not None
        env = {
            "FLEXCORE_SELF": node.raft,
            "FLEXCORE_PEERS": peers or self.peers,
            "FLEXCORE_API": f"0.0.0.0:{API_PORT}",
            "FLEXCORE_API_URL": node.url,
            **self.env,
        }
        container = self.client.containers.create(
            self.image, name=node.name, hostname=f"node{node.index + 1}",
            environment=env, labels={LABEL: self.run_id}, cap_add=["NET_ADMIN"],
            detach=True)
        self.client.api.disconnect_container_from_network(str(container.id), "bridge")
        self.network.connect(container, ipv4_address=node.ip,
                             aliases=[f"node{node.index + 1}"])
        container.start()
        node.container = container
        node.running = True

    def add_node(self) -> DockerNode:
        """One more container (not yet a member: add it through the API first)."""
        i = len(self.nodes)
        node = DockerNode(i, f"{self.run_id}-node{i + 1}", f"{self.subnet_prefix}.{11 + i}")
        self.nodes.append(node)
        return node

    def start_new_node(self, node: DockerNode) -> None:
        self._create_node(node, peers=self.peers)

    def _create_haproxy(self) -> None:
        assert self.network is not None
        servers = "\n".join(f"    server node{n.index + 1} {n.ip}:{API_PORT} check"
                            for n in self.nodes)
        cfg = (ROOT / "docker" / "haproxy.cfg").read_text()
        head = cfg[: cfg.index("    server node1")]
        config = head + servers + "\n"
        container = self.client.containers.create(
            self.image, name=f"{self.run_id}-haproxy", labels={LABEL: self.run_id},
            entrypoint=["sh", "-c", 'printf "%s" "$HAPROXY_CFG" > /tmp/haproxy.cfg && '
                        "exec haproxy -f /tmp/haproxy.cfg"],
            environment={"HAPROXY_CFG": config}, user="root", healthcheck={"test": ["NONE"]},
            detach=True)
        self.client.api.disconnect_container_from_network(str(container.id), "bridge")
        self.network.connect(container, ipv4_address=f"{self.subnet_prefix}.5")
        container.start()
        self.haproxy = container

    def _create_windmill(self) -> None:
        """The Windmill stand-in (flexcore.testing.windmill) in a container of the node
        image at .6; every node is pointed at it through WM_* variables."""
        assert self.network is not None
        container = self.client.containers.create(
            self.image, name=f"{self.run_id}-windmill", labels={LABEL: self.run_id},
            entrypoint=["python3", "-m", "flexcore.testing.windmill", "--host", "0.0.0.0",
                        "--port", str(WINDMILL_PORT), "--token", WINDMILL_TOKEN,
                        "--workspace", WINDMILL_WORKSPACE],
            healthcheck={"test": ["NONE"]}, detach=True)
        self.client.api.disconnect_container_from_network(str(container.id), "bridge")
        self.network.connect(container, ipv4_address=f"{self.subnet_prefix}.6",
                             aliases=["windmill"])
        container.start()
        self.windmill = container
        self.env = {"WM_BASE_URL": self.windmill_url, "WM_TOKEN": WINDMILL_TOKEN,
                    "WM_WORKSPACE": WINDMILL_WORKSPACE, **self.env}

    @property
    def windmill_url(self) -> str:
        return f"http://{self.subnet_prefix}.6:{WINDMILL_PORT}"

    @property
    def lb_url(self) -> str:
        return f"http://{self.subnet_prefix}.5:{LB_PORT}"

    def close(self) -> None:
        """Save each container's full log (to $FLEXCORE_TEST_LOGS or the temp folder),
        then remove every container and the network; safe to call more than once."""
        self._save_logs()
        for c in self.client.containers.list(all=True, filters={"label": f"{LABEL}={self.run_id}"}):
            with contextlib.suppress(docker.errors.APIError):
                c.remove(force=True, v=True)
        for n in self.client.networks.list(filters={"label": f"{LABEL}={self.run_id}"}):
            with contextlib.suppress(docker.errors.APIError):
                n.remove()
        self.network = None

    def _save_logs(self) -> None:
        folder = Path(os.environ.get("FLEXCORE_TEST_LOGS", "/tmp/flexcore-test-logs"))
        for node in self.nodes:
            if node.container is None:
                continue
            with contextlib.suppress(docker.errors.APIError, OSError):
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{node.name}.log").write_bytes(node.container.logs())

    def __enter__(self) -> DockerCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def logs(self, i: int, tail: int = 60) -> str:
        c = self.nodes[i].container
        if c is None:
            return ""
        try:
            out: bytes = c.logs(tail=tail)
            return out.decode(errors="replace")
        except docker.errors.APIError as exc:
            return f"(no logs: {exc})"

    # -- faults ------------------------------------------------------------------------

    def _c(self, i: int) -> Container:
        c = self.nodes[i].container
        assert c is not None, f"node {i} has no container"
        return c

    def kill(self, i: int) -> None:
        """SIGKILL the node's process (the container stops; its data stays)."""
        node = self.nodes[i]
        if node.paused:
            self.unpause(i)
        self._c(i).kill()
        self._c(i).wait(timeout=30)
        node.running = False
        self.faults.add("kill", node.name)

    def stop(self, i: int) -> None:
        node = self.nodes[i]
        if node.paused:
            self.unpause(i)
        self._c(i).stop(timeout=10)
        node.running = False

    def start_node(self, i: int) -> None:
        self._c(i).start()
        node = self.nodes[i]
        node.running = True
        # A new network namespace: no rules, no qdisc, no proxy.
        node.cut_rules, node.slow_entry, node.delay_ms = [], None, 0

    def pause(self, i: int) -> None:
        self._c(i).pause()
        self.nodes[i].paused = True
        self.faults.add("pause", self.nodes[i].name)

    def unpause(self, i: int) -> None:
        self._c(i).unpause()
        self.nodes[i].paused = False

    def isolate(self, i: int) -> None:
        """Cut the node off the network entirely (the test process loses it too)."""
        assert self.network is not None
        self.network.disconnect(self._c(i), force=True)
        self.nodes[i].isolated = True
        self.faults.add("isolate", self.nodes[i].name)

    def heal(self, i: int) -> None:
        assert self.network is not None
        node = self.nodes[i]
        self.network.connect(self._c(i), ipv4_address=node.ip,
                             aliases=[f"node{node.index + 1}"])
        node.isolated = False

    def _exec_root(self, i: int, cmd: Sequence[str]) -> str:
        code, out = self._c(i).exec_run(list(cmd), user="root")
        text = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
        if code != 0:
            raise RuntimeError(f"{' '.join(cmd)} on node {i} failed ({code}): {text}")
        return text

    def cut(self, i: int, peers: Iterable[int], direction: str = "both") -> None:
        """Drop traffic between node ``i`` and ``peers``, from inside ``i``: ``both``
        ways, only what ``i`` receives (``in``: it still sends, they do not hear back),
        or only what it sends (``out``). The API stays reachable from the test."""
        assert direction in ("both", "in", "out"), direction
        peers = list(peers)
        for j in peers:
            ip = self.nodes[j].ip
            if direction in ("both", "in"):
                self._add_cut_rule(i, ["INPUT", "-s", ip, "-j", "DROP"])
            if direction in ("both", "out"):
                self._add_cut_rule(i, ["OUTPUT", "-d", ip, "-j", "DROP"])
        self.faults.add("cut" if direction == "both" else f"cut-{direction}",
                        self.nodes[i].name, peers=[self.nodes[j].name for j in peers])

    def _add_cut_rule(self, i: int, rule: list[str]) -> None:
        self._exec_root(i, ["iptables", "-A", *rule])
        self.nodes[i].cut_rules.append(rule)

    def uncut(self, i: int) -> None:
        """Remove exactly the rules `cut` added (a slow or delayed link stays)."""
        node = self.nodes[i]
        for rule in node.cut_rules:
            self._exec_root(i, ["iptables", "-D", *rule])
        node.cut_rules = []

    def delay(self, i: int, ms: int = 100) -> None:
        """Add ``ms`` of latency each way to every Raft connection node ``i`` opens (a
        round trip costs ``2 x ms`` more). PySyncObj keeps one connection per pair,
        opened by one side, so delaying every node delays every link. Connections
        open before the rule bypass it: they are reset and the node reconnects through
        the proxy."""
        node = self.nodes[i]
        self._c(i).exec_run(["python3", "-m", "flexcore.testing.delay_proxy",
                             "--port", str(DELAY_PORT), "--delay-ms", str(ms),
                             "--pidfile", DELAY_PIDFILE, "--max-s", "300"],
                            user="root", detach=True)
        wait_for(f"the delay proxy on {node.name}",
                 lambda: self._c(i).exec_run(["test", "-f", DELAY_PIDFILE]).exit_code == 0
                 or None, 15, interval=0.05)
        self._exec_root(i, ["iptables", "-t", "nat", "-A", *_DELAY_NAT])
        self._exec_root(i, ["iptables", "-A", *_DELAY_RESET])
        node.delay_ms = ms
        self.faults.add("delay", node.name, ms=ms)

    def undelay(self, i: int) -> None:
        """Back to direct connections: the rules go, then the proxy, which closes the
        connections it carried (the node reconnects directly)."""
        node = self.nodes[i]
        if not node.delay_ms:
            return
        self._exec_root(i, ["iptables", "-D", *_DELAY_RESET])
        self._exec_root(i, ["iptables", "-t", "nat", "-D", *_DELAY_NAT])
        self._exec_root(i, ["sh", "-c", f"kill $(cat {DELAY_PIDFILE})"])
        # Gone (pid file removed on exit) before a later delay() may start another.
        wait_for(f"the delay proxy on {node.name} to exit",
                 lambda: self._c(i).exec_run(["test", "-f", DELAY_PIDFILE]).exit_code != 0
                 or None, 15, interval=0.05)
        node.delay_ms = 0

    @staticmethod
    def _loss_rules(loss: float) -> list[list[str]]:
        # Inbound raft packets, both on connections this node accepted (dport) and on
        # those it opened (sport): the API stays clean so the checker is unaffected.
        return [["INPUT", "-p", "tcp", port, str(RAFT_PORT), "-m", "statistic", "--mode",
                 "random", "--probability", f"{loss:g}", "-j", "DROP"]
                for port in ("--dport", "--sport")]

    def slow(self, i: int, rate: str = "512kbit", latency_ms: int = 300,
             loss: float = 0.1) -> None:
        """A slow, lossy link: a token-bucket rate limit with queueing delay on the
        node's egress, and ``loss`` of the raft packets it receives dropped at random
        (each costs a TCP retransmission, >= 200 ms). tc netem, which would add a
        fixed delay, is not in this kernel; tbf and iptables' statistic match are."""
        self._exec_root(i, ["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
                            "rate", rate, "burst", "16kbit", "latency", f"{latency_ms}ms"])
        for rule in self._loss_rules(loss):
            self._exec_root(i, ["iptables", "-I", *rule])
        self.nodes[i].slow_entry = self.faults.add("slow", self.nodes[i].name, rate=rate,
                                                   loss=loss)

    def unslow(self, i: int) -> None:
        """Heal a `slow` link; its fault entry gets ``dropped``: the raft packets lost."""
        self._exec_root(i, ["tc", "qdisc", "del", "dev", "eth0", "root"])
        entry = self.nodes[i].slow_entry
        if entry is None:
            return
        listing = self._exec_root(i, ["iptables", "-L", "INPUT", "-v", "-x", "-n"])
        entry["dropped"] = sum(int(line.split()[0]) for line in listing.splitlines()
                               if "statistic" in line)
        for rule in self._loss_rules(entry["loss"]):
            self._exec_root(i, ["iptables", "-D", *rule])
        self.nodes[i].slow_entry = None

    # -- observing helpers on top of ClusterObserver -----------------------------------

    def live(self) -> list[Any]:
        return [n for n in self.nodes if n.running and not n.paused and not n.isolated]

    def wait_lb(self, timeout: float = 60.0) -> None:
        """Until HAProxy forwards to every live node (it marks each up on its own)."""
        want = {n.raft for n in self.live()}
        seen: set[str] = set()

        def probe() -> bool | None:
            code, body = http_json("GET", self.lb_url + "/v1/cluster", timeout=2)
            if code == 200:
                seen.add(body["node"])
            return True if seen >= want else None
        wait_for("HAProxy forwarding to every node", probe, timeout, interval=0.02)
