"""Raft-port and API hardening, against real node processes."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import time
import zlib
from pathlib import Path

from flexcore.cluster import LocalCluster, http_json, wait_for
from tests.support.workload import read_all

from .conftest import ClusterFactory


def _frame(obj: object, protocol: int = 2) -> bytes:
    data = zlib.compress(pickle.dumps(obj, protocol), 3)
    return struct.pack("i", len(data)) + data


def _send_and_collect(addr: str, frame: bytes, wait: float = 3.0) -> tuple[bytes, bool]:
    """Send one frame; return (bytes received, whether the server closed the socket)."""
    host, port = addr.rsplit(":", 1)
    received = b""
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(frame)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                return received, False
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += chunk
    return received, False


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_executes_nothing(cluster3: LocalCluster, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    leader = cluster3.leader_index()
    for node in cluster3.nodes:
        for protocol in (2, 5):
            _, closed = _send_and_collect(node.raft, _frame(_Exploit(marker), protocol))
            assert closed, "the node kept a connection that sent a hostile frame"
    assert not marker.exists(), "a pickle sent to the Raft port ran code"
    for node in cluster3.nodes:
        assert http_json("GET", node.url + "/health")[0] == 200
    assert cluster3.leader_index() == leader
    code, _ = http_json("POST", cluster3.nodes[0].url + "/v1/events", {"type": "still.ok"})
    assert code == 201


def test_unknown_peers_and_utility_commands_are_refused(cluster3: LocalCluster) -> None:
    leader = cluster3.nodes[cluster3.leader_index()]
    # Stock PySyncObj streams the whole log to a connection that says 'readonly', and
    # answers add/remove/status utility commands from anyone.
    for hello in ("readonly", ["status"], ["add", "127.0.0.1:1"], "127.0.0.1:1"):
        received, closed = _send_and_collect(leader.raft, _frame(hello, 5))
        assert closed and received == b"", f"{hello!r} was answered"
    view = cluster3.status(0)
    assert view is not None and len(view["members"]) == 3


def test_wrong_secret_cannot_join_or_read(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(3, secret="right-secret-123")
    cluster.wait_leader(timeout=30, among=[0, 1, 2])
    # Node 3 comes back with a fresh data folder and the wrong secret.
    cluster.kill(2)
    outsider = cluster.nodes[2]
    for f in outsider.data_dir.iterdir():
        f.unlink()
    cluster.start_node(2, extra=["--secret", "wrong-secret-456"])
    wait_for("outsider API", lambda: http_json("GET", outsider.url + "/health")[0] == 200
             or None, 15)
    for i in range(20):
        code, _ = http_json("POST", cluster.nodes[i % 2].url + "/v1/events",
                            {"type": "secret.data", "id": f"s-{i}"})
        assert code == 201
    assert len(read_all(cluster.nodes[0].url, consistent=True)) == 20
    view = cluster.status(2)
    assert view is not None and view["leader"] is None and view["ready"] is False
    assert read_all(outsider.url) == []
    insider = cluster.status(0)
    assert insider is not None
    status = {m["id"]: m["status"] for m in insider["members"]}
    assert status[outsider.raft] == "unreachable"
    code, _body = http_json("POST", outsider.url + "/v1/events", {"type": "x"}, timeout=15)
    assert code == 503


def test_api_token_and_client_errors_on_a_real_node(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(1, api_token="tok-123")
    cluster.wait_ready(timeout=30)
    url = cluster.nodes[0].url
    code, body = http_json("POST", url + "/v1/events", {"type": "a"})
    assert code == 401 and body["error"]["code"] == "unauthorized"
    code, body = http_json("POST", url + "/v1/events", {"type": "a"}, token="wrong")
    assert code == 401
    code, body = http_json("POST", url + "/v1/events", {"type": "a"}, token="tok-123")
    assert code == 201
    assert http_json("GET", url + "/v1/events")[0] == 200       # reads stay open
    # Wrong types, bad JSON, oversize: 4xx with the envelope, never 500.
    for bad in ({"type": 5}, {"type": "a", "key": []}, {"events": 1}, [1, 2], {"type": ""}):
        code, body = http_json("POST", url + "/v1/events", bad, token="tok-123")
        assert code == 400 and body["error"]["code"] == "bad_request", (bad, body)
    import urllib.request
    req = urllib.request.Request(url + "/v1/events", data=b"{not json", method="POST",
                                 headers={"Authorization": "Bearer tok-123"})
    try:
        urllib.request.urlopen(req, timeout=5)
        raise AssertionError("bad JSON accepted")
    except urllib.error.HTTPError as exc:
        assert exc.code == 400 and b"bad_json" in exc.read()
    code, body = http_json("POST", url + "/v1/events",
                           {"type": "big", "payload": "x" * (2 * 1024 * 1024)}, token="tok-123")
    assert code == 413 and body["error"]["code"] == "payload_too_large"
    code, body = http_json("GET", url + "/v1/events?limit=abc")
    assert code == 400 and "limit" in body["error"]["message"]
    code, body = http_json("GET", url + "/v1/nope")
    assert code == 404 and body["error"]["code"] == "not_found"
