"""A real 3-node cluster of ``python -m flexcore.node`` processes on loopback."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from flexcore.cluster import LocalCluster, http_json, wait_for
from tests.support.workload import Writers, check_logs, read_all

from .conftest import ClusterFactory


def test_one_leader_elected(cluster3: LocalCluster) -> None:
    views = [cluster3.status(i) for i in range(3)]
    assert all(v is not None for v in views)
    leaders = {v["leader"] for v in views if v}
    assert len(leaders) == 1
    leader = leaders.pop()
    assert leader in {n.raft for n in cluster3.nodes}
    for v in views:
        assert v is not None
        roles = [m["role"] for m in v["members"]]
        assert roles.count("leader") == 1
        assert {m["id"] for m in v["members"]} == {n.raft for n in cluster3.nodes}
        assert v["term"] >= 1 and v["ready"] is True
    # Every node learned every node's API address through the replicated state.
    def registered() -> bool | None:
        v = cluster3.status(0)
        apis = {m["id"]: m["api"] for m in v["members"]} if v else {}
        want = {n.raft: n.url for n in cluster3.nodes}
        return True if apis == want else None
    wait_for("all API addresses registered", registered, 15)


def test_300_events_round_robin_identical_everywhere(cluster3: LocalCluster) -> None:
    def post(i: int) -> tuple[int, dict[str, object]]:
        node = cluster3.nodes[i % 3]
        return http_json("POST", node.url + "/v1/events",
                         {"type": "rr.test", "id": f"rr-{i}", "key": f"k{i % 7}",
                          "payload": {"i": i}})
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(post, range(300)))
    assert all(code == 201 for code, _ in answers), [a for a in answers if a[0] != 201][:3]
    max_index = max(int(body["index"]) for _, body in answers)  # type: ignore[call-overload]
    logs = [read_all(n.url, min_index=max_index) for n in cluster3.nodes]
    assert len(logs[0]) == 300
    assert [e["offset"] for e in logs[0]] == list(range(1, 301))
    assert logs[0] == logs[1] == logs[2]
    by_id = {e["id"]: e for e in logs[0]}
    for _code, body in answers:
        event = by_id[str(body["id"])]
        assert event["offset"] == body["offset"]
        assert event["payload"] == {"i": int(str(body["id"]).split("-")[1])}


def test_idempotent_publish_by_id(cluster3: LocalCluster) -> None:
    a, b = cluster3.nodes[0].url, cluster3.nodes[2].url
    code1, first = http_json("POST", a + "/v1/events", {"type": "t", "id": "same"})
    code2, again = http_json("POST", b + "/v1/events", {"type": "t", "id": "same",
                                                         "payload": {"other": 1}})
    assert (code1, code2) == (201, 201)
    assert again["offset"] == first["offset"] and again["duplicate"] is True
    events = read_all(b, consistent=True)
    assert [e["id"] for e in events].count("same") == 1


def test_read_your_writes_from_any_node(cluster3: LocalCluster) -> None:
    for i in range(20):
        writer, reader = cluster3.nodes[i % 3], cluster3.nodes[(i + 1) % 3]
        code, body = http_json("POST", writer.url + "/v1/events",
                               {"type": "ryw", "id": f"ryw-{i}"})
        assert code == 201
        code, page = http_json(
            "GET", f"{reader.url}/v1/events?after={body['offset'] - 1}&min_index={body['index']}")
        assert code == 200 and page["events"][0]["id"] == f"ryw-{i}"
        code, page = http_json(
            "GET", f"{reader.url}/v1/events?after={body['offset'] - 1}&consistent=true")
        assert code == 200 and page["events"][0]["id"] == f"ryw-{i}"


@pytest.mark.parametrize("mode", ["default", "fsync"])
def test_leader_kill9_under_load_loses_no_acknowledged_write(make_cluster: ClusterFactory,
                                                             mode: str) -> None:
    cluster3 = make_cluster(3, extra_args=["--fsync"] if mode == "fsync" else [])
    killed = cluster3.leader_index()
    cluster3.wait_ready(timeout=30)
    with Writers(cluster3, n=4) as writers:
        wait_for("100 acknowledged writes", lambda: writers.count() >= 100 or None, 30)
        cluster3.kill(killed)
        t_kill = time.monotonic()
        survivors = [i for i in range(3) if i != killed]
        new_leader = cluster3.wait_leader(timeout=30, among=survivors)
        failover_s = time.monotonic() - t_kill
        before = writers.count()
        wait_for("writes under the new leader", lambda: writers.count() >= before + 100 or None,
                 30)
    history = writers.history
    print(f"[{mode}] failover to {new_leader} in {failover_s:.2f} s; {history.summary()}")
    assert new_leader != cluster3.nodes[killed].raft
    logs = [read_all(cluster3.nodes[i].url, min_index=history.max_index) for i in survivors]
    check_logs(logs, history)

    # The killed node restarts from its data folder and catches up.
    cluster3.start_node(killed)
    cluster3.wait_ready(timeout=30)
    logs.append(read_all(cluster3.nodes[killed].url, min_index=history.max_index))
    check_logs(logs, history)


def test_whole_cluster_kill9_and_restart_keeps_every_acked_event(
        make_cluster: ClusterFactory) -> None:
    # Small compaction threshold: the restart goes through snapshot + journal replay.
    cluster = make_cluster(3, extra_args=["--compaction-min-entries", "60"])
    cluster.wait_leader(timeout=30)
    cluster.wait_ready(timeout=30)
    with Writers(cluster, n=4) as writers:
        wait_for("400 acknowledged writes", lambda: writers.count() >= 400 or None, 60)
    history = writers.history
    assert any((n.data_dir / "raft.snapshot").exists() for n in cluster.nodes), \
        "no snapshot written: compaction path not exercised"
    for i in range(3):
        cluster.kill(i)
    cluster.start()
    cluster.wait_leader(timeout=30)
    cluster.wait_ready(timeout=30)
    logs = [read_all(n.url, consistent=True) for n in cluster.nodes]
    print(history.summary(), "events after restart:", len(logs[0]))
    check_logs(logs, history)
    # Restored from snapshots, each node still counts exactly the three members.
    for i in range(3):
        view = cluster.status(i)
        assert view is not None
        assert sorted(m["id"] for m in view["members"]) == sorted(n.raft for n in cluster.nodes)


def test_node_restored_from_snapshot_still_elects_with_one_node_frozen(
        make_cluster: ClusterFactory) -> None:
    """Regression: a node that loaded a snapshot counted itself as a peer (4 members of
    3), so once any other node was down no election could reach a majority."""
    cluster = make_cluster(3, extra_args=["--compaction-min-entries", "50"])
    cluster.wait_ready(timeout=30)
    with Writers(cluster, n=3) as writers:
        wait_for("snapshots on every node", lambda: all(
            (n.data_dir / "raft.snapshot").exists() for n in cluster.nodes) or None, 60)
        for i in range(3):          # every node restarts from its snapshot
            cluster.kill(i)
            cluster.start_node(i)
            cluster.wait_ready(timeout=30)
        leader = cluster.leader_index()
        cluster.pause(leader)
        others = [i for i in range(3) if i != leader]
        t0 = time.monotonic()
        new_leader = cluster.wait_leader(timeout=20, among=others)
        print(f"elected {new_leader} {time.monotonic() - t0:.2f} s after freezing the leader")
        cluster.resume(leader)
        cluster.wait_ready(timeout=30)
    logs = [read_all(n.url, consistent=True) for n in cluster.nodes]
    check_logs(logs, writers.history)


def test_no_quorum_write_fails_promptly_with_503(cluster3: LocalCluster) -> None:
    leader = cluster3.leader_index()
    survivor = (leader + 1) % 3
    for i in range(3):
        if i != survivor:
            cluster3.kill(i)
    url = cluster3.nodes[survivor].url
    t0 = time.monotonic()
    code, body = http_json("POST", url + "/v1/events", {"type": "lonely"}, timeout=30)
    elapsed = time.monotonic() - t0
    assert code == 503, body
    assert body["error"]["code"] in ("no_quorum", "timeout")
    assert elapsed < 7.0, f"took {elapsed:.1f} s"
    # Once the node knows it is alone, refusals are immediate.
    wait_for("survivor to see no leader",
             lambda: (cluster3.status(survivor) or {"leader": 1})["leader"] is None or None, 15)
    t0 = time.monotonic()
    code, body = http_json("POST", url + "/v1/events", {"type": "lonely"}, timeout=30)
    assert code == 503 and body["error"]["code"] == "no_quorum"
    assert time.monotonic() - t0 < 1.0
    code, ready = http_json("GET", url + "/ready")
    assert code == 503 and ready["ready"] is False


def test_dynamic_membership_add_and_remove(cluster3: LocalCluster) -> None:
    for i in range(50):
        assert http_json("POST", cluster3.nodes[i % 3].url + "/v1/events",
                         {"type": "pre", "id": f"pre-{i}"})[0] == 201
    new = cluster3.add_node()
    code, body = http_json("POST", cluster3.nodes[1].url + "/v1/cluster/members",
                           {"raft": new.raft, "api": new.url})
    assert code == 201, body
    code, body = http_json("POST", cluster3.nodes[1].url + "/v1/cluster/members",
                           {"raft": new.raft, "api": new.url})
    assert code == 409, body
    cluster3.start_node(new.index, peers=",".join(n.raft for n in cluster3.nodes))
    cluster3.wait_ready(timeout=30)
    events = read_all(new.url, consistent=True)
    assert [e["id"] for e in events] == [f"pre-{i}" for i in range(50)]
    view = cluster3.status(0)
    assert view is not None and new.raft in {m["id"] for m in view["members"]}

    code, body = http_json("DELETE", f"{cluster3.nodes[0].url}/v1/cluster/members/{new.raft}")
    assert code == 200, body
    cluster3.stop_node(new.index)
    cluster3.wait_leader(timeout=30)

    def gone() -> bool | None:
        v = cluster3.status(0)
        return True if v and new.raft not in {m["id"] for m in v["members"]} else None
    wait_for("member removed everywhere", gone, 15)
    assert http_json("POST", cluster3.nodes[0].url + "/v1/events", {"type": "after"})[0] == 201
    code, body = http_json("DELETE", f"{cluster3.nodes[0].url}/v1/cluster/members/{new.raft}")
    assert code == 404 and body["error"]["code"] == "not_member"
