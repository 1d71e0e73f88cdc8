"""Windmill workflows in the docker cluster: 3 node containers configured only through
the WM_* environment variables Windmill's own client reads, and the Windmill stand-in
(flexcore.testing.windmill) in its own container."""

from __future__ import annotations

from typing import Any

from flexcore.cluster import http_json, wait_for
from tests.support.docker_fixtures import DockerFactory


def test_run_and_route_through_the_docker_cluster(make_docker_cluster: DockerFactory) -> None:
    c = make_docker_cluster(3, windmill=True)
    c.wait_leader(timeout=60)
    c.wait_ready(timeout=60)
    url = c.nodes[0].url
    code, body = http_json("POST", url + "/v1/workflows/runs",
                           {"path": "u/flexcore/echo", "kind": "script", "args": {"x": 1}})
    assert code == 202, body
    run_id = body["id"]
    code, body = http_json("PUT", url + "/v1/workflows/routes/pings", {
        "event_type": "ping", "path": "f/flexcore/echo", "kind": "flow",
        "args_from": {"seen": "payload.n"}})
    assert code == 201, body
    assert http_json("POST", c.nodes[1].url + "/v1/events",
                     {"type": "ping", "payload": {"n": 7}})[0] == 201

    def final(n: int) -> list[dict[str, Any]] | None:
        code, page = http_json("GET", c.nodes[2].url + "/v1/workflows/runs?consistent=true")
        runs = page["runs"] if code == 200 else []
        done = [r for r in runs if r["status"] == "success"]
        return runs if len(done) == n == len(runs) else None

    runs = {r["id"]: r for r in wait_for("two successful runs", lambda: final(2), 60)}
    assert runs[run_id]["result"] == {"x": 1} and runs[run_id]["job_id"] == run_id
    routed = [r for r in runs.values() if r["id"] != run_id]
    assert routed[0]["kind"] == "flow" and routed[0]["result"] == {"seen": 7}
