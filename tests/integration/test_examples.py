"""The programs in ``examples/`` run as real processes on loopback and do what their
docstrings say: invoices for billable orders, a timer's report, e-mails sent from a
queue with a dead letter for the bad address; each stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flexcore.cluster import LocalCluster, NodeProcess, free_ports, http_json, wait_for
from tests.support.workload import read_all

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def example(name: str, tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``examples/{name}.py`` as a single-node cluster; yield its API URL."""
    raft, api = free_ports(2)
    log = (tmp_path / f"{name}.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--self",
         f"127.0.0.1:{raft}", "--api", f"127.0.0.1:{api}", "--data-dir",
         str(tmp_path / name)], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{api}"
    try:
        wait_for(f"{name} ready", lambda: True if http_json("GET", f"{url}/ready")[0] == 200
                 else None, timeout=30)
        yield url
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        print((tmp_path / f"{name}.log").read_text()[-3000:])


def _events(url: str, type_: str) -> list[dict[str, Any]]:
    code, body = http_json("GET", f"{url}/v1/events?type={type_}&limit=1000")
    assert code == 200
    return list(body["events"])


def _until(what: str, probe: Callable[[], bool]) -> None:
    wait_for(what, lambda: True if probe() else None, timeout=20)


def test_order_service_invoices_billable_orders_once(tmp_path: Path) -> None:
    with example("order_service", tmp_path) as url:
        for key, total in (("o-1", 40), ("o-2", 0), ("o-3", 10)):
            code, _ = http_json("POST", f"{url}/v1/events", {
                "type": "order.created", "key": key,
                "payload": {"total": total, "customer": "c-7"}})
            assert code == 201
        _until("two invoices", lambda: len(_events(url, "invoice.*")) == 2)
        _until("billing drained", lambda: http_json("GET", f"{url}/v1/groups/billing")[1]
               ["lag"] == 0)
        invoices = [(e["key"], e["payload"]) for e in _events(url, "invoice.*")]
        assert invoices == [
            ("o-1", {"order": "o-1", "customer": "c-7", "gross": 48.0}),
            ("o-3", {"order": "o-3", "customer": "c-7", "gross": 12.0})]


def test_cron_report_publishes_order_counts(tmp_path: Path) -> None:
    with example("cron_report", tmp_path, {"REPORT_INTERVAL_S": "0.5"}) as url:
        for n in range(3):
            assert http_json("POST", f"{url}/v1/events",
                             {"type": "order.created", "payload": {"n": n}})[0] == 201
        _until("a report that counts 3 orders",
               lambda: any(e["payload"]["orders"] == 3 for e in _events(url, "report.*")))
        reports = _events(url, "report.*")
        assert len({e["payload"]["fire_time"] for e in reports}) == len(reports)
        code, fires = http_json("GET", f"{url}/v1/schedules/order-report/fires")
        assert code == 200 and all(f["status"] in ("ok", "claimed") for f in fires["fires"])


def test_queue_worker_sends_and_dead_letters(tmp_path: Path) -> None:
    with example("queue_worker", tmp_path) as url:
        for to in ("a@example.com", "b@example.com", "c@example.com", "x@invalid.example"):
            assert http_json("POST", f"{url}/v1/queues/emails/messages",
                             {"body": {"to": to}})[0] == 201
        _until("three sent, one dead", lambda: len(_events(url, "email.*")) == 3
               and http_json("GET", f"{url}/v1/queues/emails")[1]["dead"] == 1)
        assert sorted(e["payload"]["to"] for e in _events(url, "email.*")) == \
            ["a@example.com", "b@example.com", "c@example.com"]
        code, dead = http_json("GET", f"{url}/v1/queues/emails/dead")
        assert code == 200
        [letter] = dead["messages"]
        assert letter["body"] == {"to": "x@invalid.example"} and letter["attempt"] == 3
        assert "does not exist" in letter["error"]


class _OrderServiceCluster(LocalCluster):
    """Three ``examples/order_service.py`` processes forming one cluster."""

    def command(self, node: NodeProcess, peers: str | None = None) -> list[str]:
        node_cmd = super().command(node, peers)   # [python, -m, flexcore.node, flags...]
        return [sys.executable, str(ROOT / "examples" / "order_service.py"), *node_cmd[3:]]


def test_order_service_cluster_survives_kill9_of_the_leader(tmp_path: Path) -> None:
    """A consumer-group member process killed -9 mid-stream: its partitions move to the
    survivors, which pick up from the committed offsets; every billable order ends with
    exactly one invoice (at-least-once handling + the invoice's idempotent id)."""
    cluster = _OrderServiceCluster(3, tmp_path / "orders",
                                   extra_args=["--group-session", "2"])
    with cluster:
        cluster.wait_leader(timeout=30)
        cluster.wait_ready(timeout=30)
        orders = [f"o-{i}" for i in range(200)]

        def publish(i: int) -> None:
            def sent() -> bool | None:
                live = cluster.live()
                code, _ = http_json("POST", live[i % len(live)].url + "/v1/events",
                                    {"type": "order.created", "key": orders[i],
                                     "id": f"order:{orders[i]}",
                                     "payload": {"total": 10 + i, "customer": "c"}},
                                    timeout=10)
                return True if code == 201 else None
            wait_for(f"order {i} published", sent, 30)

        for i in range(80):
            publish(i)
        victim = cluster.leader_index()
        cluster.kill(victim)
        for i in range(80, 200):
            publish(i)
        survivor = next(n for n in cluster.nodes if n.index != victim)

        def invoices() -> list[dict[str, Any]] | None:
            found = [e for e in read_all(survivor.url, consistent=True)
                     if e["type"] == "invoice.issued"]
            return found if len(found) >= len(orders) else None
        issued = wait_for("an invoice for every order", invoices, 90, interval=0.5)
    ids = [e["id"] for e in issued]
    assert len(ids) == len(set(ids)) == len(orders)
    assert sorted(e["payload"]["order"] for e in issued) == sorted(orders)
    assert all(e["payload"]["gross"] == round((10 + int(e["payload"]["order"][2:])) * 1.2, 2)
               for e in issued)
