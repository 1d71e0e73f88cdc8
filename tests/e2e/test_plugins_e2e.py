"""Plugins and pipelines in the docker cluster: the image installs FlexCore with its
entry points, so every node discovers the shipped plugins; a pipeline reads a SQLite
file (copied into every container, since whichever node leads runs it) through
json-transformer and api-loader into a receiver in this process, which the containers
reach at their network's gateway address."""

from __future__ import annotations

import io
import sqlite3
import tarfile
from pathlib import Path

from flexcore.cluster import http_json, wait_for
from flexcore.testing.receiver import BatchReceiver
from tests.support.docker_cluster import DockerCluster
from tests.support.pipelines import final_run

SHIPPED = {"postgres-extractor": "extractor", "json-transformer": "transformer",
           "api-loader": "loader"}
ROWS = 500


def _copy_in(cluster: DockerCluster, src: Path, dest_dir: str) -> None:
    data = src.read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(src.name)
        info.size, info.mode, info.uid, info.gid = len(data), 0o644, 10001, 10001
        tar.addfile(info, io.BytesIO(data))
    for node in cluster.nodes:
        assert node.container is not None
        assert node.container.put_archive(dest_dir, buf.getvalue())


def test_plugins_listed_and_a_pipeline_runs(docker_cluster3: DockerCluster,
                                            tmp_path: Path) -> None:
    c = docker_cluster3
    for node in c.nodes:
        code, body = http_json("GET", node.url + "/v1/plugins", timeout=60)
        assert code == 200, body
        found = {p["name"]: p for p in body["plugins"]}
        for name, kind in SHIPPED.items():
            assert found[name]["source"] == "entry_point", found[name]
            assert found[name]["info"]["kind"] == kind, found[name]
            assert found[name]["error"] is None
    db = tmp_path / "events.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, kind TEXT, value INTEGER)")
        conn.executemany("INSERT INTO events VALUES (?, ?, ?)",
                         [(i, "click" if i % 2 else "view", i * 3) for i in range(1, ROWS + 1)])
    _copy_in(c, db, "/tmp")
    receiver = BatchReceiver(host=f"{c.subnet_prefix}.1").start()
    try:
        url = c.lb_url
        code, body = http_json("PUT", url + "/v1/pipelines/clicks", {
            "extractor": {"plugin": "postgres-extractor", "config": {
                "url": "sqlite:////tmp/events.db", "table": "events",
                "cursor_column": "seq", "batch_size": 50}},
            "transforms": [{"plugin": "json-transformer", "config": {
                "mapping": {"n": "seq", "v": "value"}, "filter": "kind == 'click'"}}],
            "loader": {"plugin": "api-loader", "config": {"url": receiver.url}}}, timeout=60)
        assert code == 201, body
        code, run = http_json("POST", url + "/v1/pipelines/clicks/runs", {}, timeout=30)
        assert code == 202, run

        done = wait_for("pipeline run final",
                        lambda: final_run([c.nodes[0].url], "clicks", run["id"],
                                          consistent=True), 120, interval=0.2)
        assert done["status"] == "success" and done["rows"] == ROWS, done
        assert sorted(r["n"] for r in receiver.rows()) == list(range(1, ROWS + 1, 2))
        assert len(receiver.accepted) == ROWS // 50
        code, body = http_json("GET", c.nodes[2].url + "/v1/pipelines/clicks?consistent=true")
        assert body["checkpoint"]["seq"] == ROWS // 50 and body["checkpoint"]["cursor"] == ROWS
    finally:
        receiver.stop()
