"""Windmill workflows on a real 3-node cluster, against the stand-in on loopback.

The stand-in runs in this process (a background thread); the nodes are real
``python -m flexcore.node`` processes pointed at it with ``--windmill-url``. Every wait
is on observable state with a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from flexcore.cluster import LocalCluster, http_json, wait_for
from flexcore.testing.windmill import StandInServer, WindmillStandIn
from tests.support.workload import read_all

from .conftest import ClusterFactory

TOKEN, WS = "integration-token", "flexcore"


async def _work(args: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(float(args["sleep"]))
    return {"n": args["n"], "square": args["n"] * args["n"]}


def _route(args: dict[str, Any]) -> dict[str, Any]:
    return {"order": args["order"], "total": args["total"], "via": "route"}


@pytest.fixture
def standin() -> Iterator[StandInServer]:
    fake = WindmillStandIn(token=TOKEN, workspace=WS, latency=0.02)
    fake.script("u/test/work", _work)
    fake.script("u/test/route", _route)
    server = StandInServer(fake)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _cluster(make_cluster: ClusterFactory, standin: StandInServer) -> LocalCluster:
    cluster = make_cluster(3, extra_args=["--windmill-url", standin.url,
                                          "--windmill-token", TOKEN,
                                          "--windmill-workspace", WS])
    cluster.wait_leader(timeout=30)
    cluster.wait_ready(timeout=30)
    return cluster


def _runs(url: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        code, page = http_json("GET", f"{url}/v1/workflows/runs?after={after}&limit=1000"
                                      "&consistent=true", timeout=10)
        assert code == 200, page
        out.extend(page["runs"])
        if not page["runs"]:
            return out
        after = page["next"]


def _all_final(url: str, n: int) -> list[dict[str, Any]] | None:
    try:
        runs = _runs(url)
    except (OSError, AssertionError):
        return None
    final = [r for r in runs if r["status"] in ("success", "failure", "canceled")]
    return runs if len(runs) >= n and len(final) == len(runs) else None


def test_50_runs_survive_leader_kill9_each_job_created_once(
        make_cluster: ClusterFactory, standin: StandInServer) -> None:
    fake = standin.standin
    cluster = _cluster(make_cluster, standin)
    leader = cluster.leader_index()
    others = [i for i in range(3) if i != leader]

    def submit(i: int) -> tuple[str, int]:
        node = cluster.nodes[others[i % 2]]
        code, body = http_json("POST", node.url + "/v1/workflows/runs", {
            "path": "u/test/work", "kind": "script",
            "args": {"n": i, "sleep": 0.3 + (i % 5) * 0.2}})
        assert code == 202, body
        assert body["status"] == "pending" and body["duplicate"] is False
        return str(body["id"]), i

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        submitted = dict(pool.map(submit, range(50)))
    # Kill the leader once Windmill has some of the jobs: mid-flight.
    wait_for("10 jobs created in Windmill", lambda: len(fake.creations()) >= 10 or None, 30,
             interval=0.005)
    cluster.kill(leader)
    t_kill = time.monotonic()
    created_at_kill = len(fake.creations())
    done_at_kill = sum(1 for j in list(fake.jobs.values()) if j.completed)
    new_leader = cluster.wait_leader(timeout=30, among=others)
    failover_s = time.monotonic() - t_kill
    runs = wait_for("all 50 runs final", lambda: _all_final(cluster.nodes[others[0]].url, 50),
                    90, interval=0.2)
    total_s = time.monotonic() - t0
    duplicates = sum(fake.duplicate_attempts().values())
    print(f"\n50 runs: leader killed with {created_at_kill} jobs created and {done_at_kill} "
          f"finished in Windmill; new leader {new_leader} after {failover_s:.2f} s; all "
          f"final {total_s:.1f} s after the first submit; {duplicates} re-submissions "
          "answered 'already exists'")

    assert new_leader != cluster.nodes[leader].raft
    assert len(runs) == 50 and {r["id"] for r in runs} == set(submitted)
    # Windmill created every run's job exactly once, under the run's own id.
    assert fake.creations() == {run_id: 1 for run_id in submitted}
    for run in runs:
        n = submitted[run["id"]]
        assert run["status"] == "success", run
        assert run["job_id"] == run["id"]
        assert run["result"] == {"n": n, "square": n * n}
        assert isinstance(run["duration_ms"], int) and run["duration_ms"] >= 300
    # Both survivors hold identical run records.
    assert _runs(cluster.nodes[others[1]].url) == runs


def test_routing_100_matching_events_start_exactly_100_runs_across_failover(
        make_cluster: ClusterFactory, standin: StandInServer) -> None:
    fake = standin.standin
    cluster = _cluster(make_cluster, standin)
    code, body = http_json("PUT", cluster.nodes[0].url + "/v1/workflows/routes/big-orders", {
        "event_type": "order.*", "condition": "payload.total >= `100`",
        "path": "u/test/route", "kind": "script", "args": {"source": "flexcore"},
        "args_from": {"order": "payload.id", "total": "payload.total"}})
    assert code == 201, body
    events: list[dict[str, Any]] = []
    for i in range(100):
        events.append({"type": "order.created", "id": f"big-{i}",
                       "payload": {"id": f"o{i}", "total": 100 + i}})
        if i % 2 == 0:   # interleave events the rule must not match
            events.append({"type": "order.created", "id": f"small-{i}",
                           "payload": {"id": f"s{i}", "total": 5}})
            events.append({"type": "user.created", "id": f"user-{i}",
                           "payload": {"id": f"u{i}", "total": 1000}})
    leader = cluster.leader_index()
    live = [i for i in range(3) if i != leader]
    url = cluster.nodes[live[0]].url
    half = len(events) // 2
    for number, start in enumerate(range(0, len(events), 25)):
        if start >= half and cluster.nodes[leader].alive:
            # Kill the leader once it has routed some events: the next one resumes.
            wait_for("some routed runs", lambda: len(fake.creations()) >= 10 or None, 30,
                     interval=0.005)
            cluster.kill(leader)
            routed_at_kill = len(fake.creations())
            cluster.wait_leader(timeout=30, among=live)
        node = cluster.nodes[live[number % 2]]
        code, body = http_json("POST", node.url + "/v1/events/batch",
                               {"events": events[start:start + 25]}, timeout=15)
        assert code == 201, body
    runs = wait_for("100 routed runs final", lambda: _all_final(url, 100), 60, interval=0.2)
    logged = read_all(url, consistent=True)
    offsets = {e["id"]: e["offset"] for e in logged}
    print(f"\nrouting: {len(logged)} events published, leader killed after {routed_at_kill} "
          f"runs reached Windmill; {len(runs)} runs started, {len(fake.creations())} "
          f"Windmill jobs, {sum(fake.duplicate_attempts().values())} 'already exists'")

    assert len(runs) == 100
    assert {r["source"]["offset"] for r in runs} == {offsets[f"big-{i}"] for i in range(100)}
    assert all(r["source"]["rule"] == "big-orders" for r in runs)
    assert fake.creations() == {r["id"]: 1 for r in runs}
    for run in runs:
        i = int(run["source"]["event_id"].split("-")[1])
        assert run["status"] == "success", run
        assert run["args"] == {"source": "flexcore", "order": f"o{i}", "total": 100 + i}
        assert run["result"] == {"order": f"o{i}", "total": 100 + i, "via": "route"}
    code, routes = http_json("GET", url + "/v1/workflows/routes?consistent=true")
    assert code == 200 and routes["cursor"] == len(logged)


def test_unknown_script_fails_with_windmill_message_and_cancel(
        make_cluster: ClusterFactory, standin: StandInServer) -> None:
    cluster = _cluster(make_cluster, standin)
    url = cluster.nodes[1].url
    code, body = http_json("POST", url + "/v1/workflows/runs",
                           {"path": "u/test/missing", "kind": "script"})
    assert code == 202
    missing = body["id"]
    code, body = http_json("POST", url + "/v1/workflows/runs",
                           {"path": "u/test/work", "args": {"n": 1, "sleep": 30}})
    slow = body["id"]

    def status(run_id: str, want: str) -> dict[str, Any] | None:
        code, run = http_json("GET", f"{url}/v1/workflows/runs/{run_id}?consistent=true")
        return run if code == 200 and run["status"] == want else None

    run = wait_for("missing script failed", lambda: status(missing, "failure"), 30)
    assert run["error"] == "Not found: Script not found at path u/test/missing"
    wait_for("slow run running", lambda: status(slow, "running"), 30)
    code, body = http_json("POST", f"{url}/v1/workflows/runs/{slow}/cancel",
                           {"reason": "test over"})
    assert code == 202 and body["cancel_requested"] is True
    run = wait_for("slow run canceled", lambda: status(slow, "canceled"), 30)
    assert "test over" in run["error"]
    code, body = http_json("POST", f"{url}/v1/workflows/runs/{slow}/cancel", {})
    assert code == 409
    code, body = http_json("GET", f"{url}/v1/workflows/runs/{uuid.uuid4()}")
    assert code == 404 and body["error"]["code"] == "not_found"


def test_timer_workflow_action_starts_runs(make_cluster: ClusterFactory,
                                           standin: StandInServer) -> None:
    cluster = _cluster(make_cluster, standin)
    url = cluster.nodes[0].url
    code, body = http_json("PUT", url + "/v1/schedules/every-second", {
        "trigger": {"interval_s": 1},
        "action": {"type": "workflow", "path": "u/test/route", "kind": "script",
                   "args": {"order": "tick", "total": 0}}})
    assert code == 201, body

    def two_done() -> list[dict[str, Any]] | None:
        runs = [r for r in _runs(url) if r["status"] == "success"]
        return runs if len(runs) >= 2 else None

    runs = wait_for("two scheduled runs", two_done, 30, interval=0.2)
    assert all(r["source"]["schedule"] == "every-second" for r in runs)
    assert len({r["source"]["fire_time"] for r in runs}) == len(runs)
    assert runs[0]["result"] == {"order": "tick", "total": 0, "via": "route"}
    code, fires = http_json("GET", url + "/v1/schedules/every-second/fires")
    assert code == 200 and any(f["status"] == "ok" for f in fires["fires"]), fires
