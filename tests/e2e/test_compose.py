"""docker/compose.yml, the file users run, brought up for real.

The other docker suites drive the engine directly; this one runs the user-facing compose
file with docker-compose (v2 `docker compose` when present, else Debian's 1.29) and
images built offline: the node image, `flexcore-base:bookworm` for HAProxy (Debian's
haproxy) and `flexcore-postgres:15` for the ETL source (Debian's PostgreSQL behind the
official image's POSTGRES_* contract; docker/build-postgres-image.sh). Then, through
HAProxy's published port: all three nodes serve, a write is read back from every node,
a workflow runs on the Windmill stand-in, and the ETL demo of README "Docker" loads
every PostgreSQL row into the sink exactly once.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest

from flexcore.cluster import http_json, wait_for
from tests.support.docker_cluster import ROOT
from tests.support.pipelines import final_run

COMPOSE_FILE = ROOT / "docker" / "compose.yml"
ROWS = 1000          # docker/etl-demo.sql
BATCH = 250


def _compose_command() -> list[str]:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run([*cmd, "version"], capture_output=True,
                              timeout=30).returncode == 0:
                return cmd
    pytest.fail("neither `docker compose` nor `docker-compose` works: install one "
                "(apt-get install docker-compose; .ci/run does), or deselect the docker "
                "suites with -m 'not docker'", pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_subnet(client: docker.DockerClient) -> str:
    taken = []
    for net in client.networks.list():
        for pool in (net.attrs.get("IPAM") or {}).get("Config") or []:
            with contextlib.suppress(KeyError, ValueError):
                taken.append(ipaddress.ip_network(pool["Subnet"]))
    for third in range(10, 250):
        candidate = ipaddress.ip_network(f"198.18.{third}.0/24")
        if not any(candidate.overlaps(t) for t in taken):
            return str(candidate)
    raise RuntimeError("no free 198.18.x.0/24 subnet for the compose network")


def _build(script: str, env: dict[str, str]) -> None:
    proc = subprocess.run([str(ROOT / "docker" / script)], env=env, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"docker/{script} failed:\n{proc.stderr[-4000:]}")


@dataclass
class ComposeStack:
    client: docker.DockerClient
    cmd: list[str]
    project: str
    env: dict[str, str]
    lb_url: str

    def run(self, *args: str, timeout: float = 300) -> str:
        proc = subprocess.run([*self.cmd, "-p", self.project, "-f", str(COMPOSE_FILE),
                               *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(self.cmd)} {' '.join(args)} failed "
                               f"({proc.returncode}):\n{proc.stderr[-4000:]}")
        return proc.stdout

    def container(self, service: str) -> Any:
        found = self.client.containers.list(all=True, filters={"label": [
            f"com.docker.compose.project={self.project}",
            f"com.docker.compose.service={service}"]})
        assert len(found) == 1, f"{service}: {len(found)} containers"
        return found[0]

    def ip(self, service: str) -> str:
        c = self.container(service)
        c.reload()
        nets = c.attrs["NetworkSettings"]["Networks"]
        return str(next(iter(nets.values()))["IPAddress"])

    def health(self, service: str) -> str:
        c = self.container(service)
        c.reload()
        return str(c.attrs["State"].get("Health", {}).get("Status", "none"))

    def save_logs(self) -> Path:
        folder = Path(os.environ.get("FLEXCORE_TEST_LOGS", "/tmp/flexcore-test-logs"))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.project}.log"
        with contextlib.suppress(Exception):
            path.write_text(self.run("logs", "--no-color", "--timestamps", timeout=120))
        return path


@pytest.fixture
def compose_stack(docker_engine: tuple[docker.DockerClient, str],
                  request: pytest.FixtureRequest) -> Iterator[ComposeStack]:
    client, image = docker_engine
    cmd = _compose_command()
    env = dict(os.environ, FLEXCORE_IMAGE=image, PYTHON=sys.executable)
    try:
        client.images.get("flexcore-base:bookworm")
    except docker.errors.ImageNotFound:
        _build("build-images.sh", env)
    _build("build-postgres-image.sh", env)
    port = _free_port()
    project = f"fccompose{uuid.uuid4().hex[:8]}"
    env.update(HAPROXY_IMAGE="flexcore-base:bookworm",
               POSTGRES_IMAGE="flexcore-postgres:15", FLEXCORE_LB_PORT=str(port),
               FLEXCORE_SUBNET=_free_subnet(client),
               FLEXCORE_SECRET=uuid.uuid4().hex, ETL_DB_PASSWORD=uuid.uuid4().hex)
    stack = ComposeStack(client, cmd, project, env, f"http://127.0.0.1:{port}")
    try:
        stack.run("up", "-d")
        yield stack
    finally:
        report = getattr(request.node, "rep_call", None)
        path = stack.save_logs()
        if report is None or report.failed:
            print(f"--- compose logs saved to {path}")
        stack.run("down", "-v", "--remove-orphans", "--timeout", "5")
        # A network the compose project made must not outlive it either.
        for net in client.networks.list(filters={"label": [
                f"com.docker.compose.project={project}"]}):
            with contextlib.suppress(docker.errors.APIError):
                net.remove()


def _lb_nodes(stack: ComposeStack, want: int) -> set[str] | None:
    seen: set[str] = set()
    for _ in range(4 * want):
        code, body = http_json("GET", stack.lb_url + "/v1/cluster", timeout=3)
        if code != 200:
            return None
        seen.add(body["node"])
    return seen if len(seen) == want else None


def test_compose_stack_serves_writes_workflows_and_the_etl_demo(
        compose_stack: ComposeStack) -> None:
    stack = compose_stack
    nodes = ["node1", "node2", "node3"]
    # The cluster forms, every node reports healthy, HAProxy forwards to all three.
    wait_for("every node container healthy",
             lambda: all(stack.health(n) == "healthy" for n in nodes) or None, 120,
             interval=0.5)
    served = wait_for("HAProxy forwarding to three nodes", lambda: _lb_nodes(stack, 3), 60,
                      interval=0.2)
    assert served == {f"{n}:7100" for n in nodes}
    # The compose file sets a cluster secret but no API token, and the API listens on
    # 0.0.0.0: each node's start-up warning says exactly that (README: Security).
    logs = stack.run("logs", "--no-color", *nodes, timeout=60)
    assert logs.count("no --api-token: the API on 0.0.0.0:8100") == 3, logs[-3000:]
    assert "no --secret" not in logs

    # A write through HAProxy is read back, at once and consistently, on every node.
    code, event = http_json("POST", stack.lb_url + "/v1/events",
                            {"type": "compose.hello", "payload": {"n": 1}}, timeout=10)
    assert code == 201, event
    for n in nodes:
        url = f"http://{stack.ip(n)}:8100"
        code, body = http_json("GET", f"{url}/v1/events?type=compose.hello&consistent=true",
                               timeout=10)
        assert code == 200, body
        assert [e["id"] for e in body["events"]] == [event["id"]], (n, body)

    # Workflows: the nodes' default WM_* point at the stand-in service.
    code, run = http_json("POST", stack.lb_url + "/v1/workflows/runs",
                          {"path": "u/flexcore/echo", "args": {"greeting": "hi"}},
                          timeout=10)
    assert code == 202, run

    def workflow_done() -> dict[str, Any] | None:
        code, body = http_json("GET", f"{stack.lb_url}/v1/workflows/runs/{run['id']}"
                               "?consistent=true", timeout=10)
        return body if code == 200 and body["status"] in ("success", "failure") else None
    done = wait_for("the workflow run final", workflow_done, 60, interval=0.2)
    assert done["status"] == "success", done
    assert done["result"] == {"greeting": "hi"}, done

    # The ETL demo exactly as README "Docker" shows it.
    wait_for("postgres healthy", lambda: stack.health("postgres") == "healthy" or None,
             120, interval=0.5)
    password = stack.env["ETL_DB_PASSWORD"]
    code, body = http_json("PUT", stack.lb_url + "/v1/pipelines/orders", {
        "extractor": {"plugin": "postgres-extractor", "config": {
            "url": f"postgresql+psycopg://etl:{password}@postgres/shop",
            "table": "orders", "cursor_column": "id", "batch_size": BATCH}},
        "transforms": [{"plugin": "json-transformer", "config": {
            "mapping": {"order_id": "id", "who": "customer", "total": "amount"}}}],
        "loader": {"plugin": "api-loader", "config": {"url": "http://etl_sink:8200/batches"}},
    }, timeout=30)
    assert code == 201, body
    code, started = http_json("POST", stack.lb_url + "/v1/pipelines/orders/runs", {},
                              timeout=10)
    assert code == 202, started

    final = wait_for("the pipeline run final",
                     lambda: final_run([stack.lb_url], "orders", started["id"]), 120,
                     interval=0.2)
    assert final["status"] == "success" and final["rows"] == ROWS, final
    code, sink = http_json("GET", f"http://{stack.ip('etl_sink')}:8200/batches?rows=true",
                           timeout=10)
    assert code == 200, sink
    assert sink["rows"] == ROWS and sink["batches"] == ROWS // BATCH, \
        {k: v for k, v in sink.items() if k != "accepted"}
    assert sorted(r["order_id"] for r in sink["accepted"]) == list(range(1, ROWS + 1))
    assert {r["who"] for r in sink["accepted"]} == {f"customer-{i}" for i in range(37)}

    # HAProxy stops sending to a node that is gone; writes keep working through it.
    stack.run("kill", "node1", timeout=60)
    remaining = wait_for("HAProxy forwarding to the two survivors",
                         lambda: _lb_nodes(stack, 2), 60, interval=0.2)
    assert remaining == {"node2:7100", "node3:7100"}
    code, body = http_json("POST", stack.lb_url + "/v1/events", {"type": "compose.after"},
                           timeout=10)
    assert code == 201, body
