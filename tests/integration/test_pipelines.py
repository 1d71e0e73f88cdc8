"""ETL pipelines on a real 3-node cluster: SQLite -> json-transformer -> api-loader
posting to a receiver in this process; the leader is killed with SIGKILL mid-run.

The receiver deduplicates by Idempotency-Key, as the README asks of receivers: every
source row must arrive, and anything sent twice must be a whole batch re-sent under
its original key.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flexcore.cluster import LocalCluster, http_json, wait_for
from flexcore.testing.receiver import BatchReceiver
from tests.support.pipelines import final_run

from .conftest import ClusterFactory

ROWS = 3000
BATCH = 100


@pytest.fixture
def receiver() -> Iterator[BatchReceiver]:
    rec = BatchReceiver(latency=0.02).start()
    yield rec
    rec.stop()


def make_source(path: Path, rows: int) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT, "
                     "amount REAL, status TEXT)")
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)",
                         [(i, f"c{i % 17}", i * 1.5, "void" if i % 10 == 0 else "ok")
                          for i in range(1, rows + 1)])


def pipeline_body(db: Path, url: str) -> dict[str, Any]:
    return {
        "extractor": {"plugin": "postgres-extractor", "config": {
            "url": f"sqlite:///{db}", "table": "orders", "cursor_column": "id",
            "batch_size": BATCH}},
        "transforms": [{"plugin": "json-transformer", "config": {
            "mapping": {"order_id": "id", "who": "customer", "total": "amount"},
            "filter": "status == 'ok'"}}],
        "loader": {"plugin": "api-loader", "config": {"url": url, "backoff_s": 0.05}}}


def test_api_validation_and_plugins(cluster3: LocalCluster, receiver: BatchReceiver,
                                    tmp_path: Path) -> None:
    url = cluster3.nodes[1].url
    code, body = http_json("GET", url + "/v1/plugins", timeout=30)
    assert code == 200
    names = {p["name"]: p for p in body["plugins"]}
    assert {"postgres-extractor", "json-transformer", "api-loader"} <= set(names)
    assert names["api-loader"]["info"]["kind"] == "loader"
    assert names["api-loader"]["source"] == "entry_point"
    db = tmp_path / "src.db"
    make_source(db, 10)
    spec = pipeline_body(db, receiver.url)
    for bad, fragment in (
            ({**spec, "loader": {"plugin": "json-transformer", "config": {}}},
             "is a transformer, not a loader"),
            ({**spec, "loader": {"plugin": "nope", "config": {}}}, "no plugin named 'nope'"),
            ({**spec, "extra": 1}, "extra"),
            ({"extractor": spec["extractor"]}, "loader is required")):
        code, body = http_json("PUT", url + "/v1/pipelines/p1", bad)
        assert code == 400 and fragment in body["error"]["message"], body
    assert http_json("PUT", url + "/v1/pipelines/bad%20name", spec)[0] == 400
    assert http_json("GET", url + "/v1/pipelines/p1")[0] == 404
    assert http_json("POST", url + "/v1/pipelines/p1/runs", {})[0] == 404
    code, body = http_json("PUT", url + "/v1/pipelines/p1", spec)
    assert code == 201 and body["version"] == 1, body
    assert http_json("PUT", url + "/v1/pipelines/p1", spec)[0] == 200
    code, body = http_json("GET", cluster3.nodes[2].url + "/v1/pipelines?consistent=true")
    assert [p["name"] for p in body["pipelines"]] == ["p1"]
    assert http_json("GET", url + "/v1/pipelines/p1/runs/not-a-uuid")[0] == 400
    assert http_json("GET", url + "/v1/pipelines/p1/runs/" + "0" * 8 + "-0000-0000-0000-"
                     + "0" * 12)[0] == 404
    code, run = http_json("POST", url + "/v1/pipelines/p1/runs", {})
    assert code == 202 and run["status"] == "pending"
    done = wait_for("run final", lambda: final_run(cluster3.urls(), "p1", run["id"]), 60)
    assert done["status"] == "success" and done["rows"] == 10, done
    assert sorted(r["order_id"] for r in receiver.rows()) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    # A second run continues after the checkpoint: nothing new, nothing sent.
    code, run2 = http_json("POST", url + "/v1/pipelines/p1/runs", {})
    done2 = wait_for("run final", lambda: final_run(cluster3.urls(), "p1", run2["id"]), 60)
    assert done2["status"] == "success" and done2["rows"] == 0 and done2["start_seq"] == 1
    assert receiver.count() == 1
    # A timer `pipeline` action starts a run (its id derived from the fire).
    code, body = http_json("PUT", url + "/v1/schedules/nightly", {
        "trigger": {"interval_s": 3600}, "action": {"type": "pipeline", "name": "p1"}})
    assert code == 201, body
    assert http_json("POST", url + "/v1/schedules/nightly/trigger")[0] == 202

    def scheduled() -> dict[str, Any] | None:
        _, page = http_json("GET", url + "/v1/pipelines/p1/runs?consistent=true")
        runs = [r for r in page["runs"] if (r["source"] or {}).get("schedule") == "nightly"]
        return runs[0] if runs and runs[0]["status"] == "success" else None

    assert wait_for("scheduled run", scheduled, 60)["rows"] == 0
    assert http_json("DELETE", url + "/v1/schedules/nightly")[0] == 200
    code, body = http_json("DELETE", url + "/v1/pipelines/p1")
    assert code == 200 and body["deleted"] is True


def test_leader_kill9_mid_run_loses_no_row(make_cluster: ClusterFactory,
                                           receiver: BatchReceiver, tmp_path: Path) -> None:
    db = tmp_path / "orders.db"
    make_source(db, ROWS)
    cluster = make_cluster(3)
    cluster.wait_leader(timeout=30)
    cluster.wait_ready(timeout=30)
    leader = cluster.leader_index()
    others = [i for i in range(3) if i != leader]
    url = cluster.nodes[others[0]].url
    assert http_json("PUT", url + "/v1/pipelines/orders",
                     pipeline_body(db, receiver.url), timeout=30)[0] == 201
    t0 = time.monotonic()
    code, run = http_json("POST", url + "/v1/pipelines/orders/runs", {})
    assert code == 202, run
    wait_for("5 batches delivered", lambda: receiver.count() >= 5 or None, 60, interval=0.005)
    cluster.kill(leader)
    t_kill = time.monotonic()
    delivered_at_kill = receiver.count()
    new_leader = cluster.wait_leader(timeout=30, among=others)
    failover_s = time.monotonic() - t_kill
    done = wait_for("run final", lambda: final_run(cluster.urls(others), "orders", run["id"]), 90,
                    interval=0.1)
    total_s = time.monotonic() - t0
    assert done["status"] == "success", done
    expected = {i for i in range(1, ROWS + 1) if i % 10 != 0}
    delivered = [r["order_id"] for r in receiver.rows()]
    assert set(delivered) == expected                        # no row lost
    assert len(delivered) == len(expected)                   # none accepted twice
    keys = Counter(d.key for d in receiver.deliveries)
    duplicates = [d for d in receiver.deliveries if d.duplicate]
    for dup in duplicates:                                   # re-sends: same key, same rows
        assert dup.rows == receiver.accepted[dup.key]
    assert len(receiver.accepted) == ROWS // BATCH
    cp = http_json("GET", cluster.nodes[others[1]].url + "/v1/pipelines/orders"
                   "?consistent=true")[1]["checkpoint"]
    assert cp["seq"] == ROWS // BATCH and cp["cursor"] == ROWS and cp["rows"] == ROWS
    assert done["batches"] <= ROWS // BATCH and done["rows"] == ROWS
    print(f"\npipeline: {ROWS} rows in {ROWS // BATCH} batches; leader killed after "
          f"{delivered_at_kill} deliveries; new leader {new_leader} in {failover_s:.2f} s; "
          f"run final {total_s:.1f} s after it was created; {len(duplicates)} batch(es) "
          f"re-sent under their original key ({sum(keys.values())} POSTs in all); "
          f"checkpoint seq {cp['seq']} cursor {cp['cursor']}")
