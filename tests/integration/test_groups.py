"""Consumer groups on a 3-node cluster of in-process `FlexCore` nodes on loopback (one
event loop, so every handler call lands in one shared, ordered record): each event
handled once per group, in order per key, spread over the nodes; broadcast handlers
on every node; filters and transforms; retries, dead letters and redrive through the
HTTP API; redelivery after a node dies mid-handler."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from flexcore import Event, FlexCore, Retry, Settings
from flexcore.cluster import free_ports
from flexcore.di import Clock
from flexcore.events import EventFeed
from flexcore.statemachine import StateMachine

SESSION_S = 1.5


@asynccontextmanager
async def cluster(tmp_path: Path, setup: Callable[[FlexCore, int], None],
                  n: int = 3) -> AsyncIterator[list[FlexCore]]:
    ports = free_ports(2 * n)
    rafts = [f"127.0.0.1:{p}" for p in ports[:n]]
    apps = [FlexCore(Settings(self_addr=rafts[i], peers=tuple(rafts),
                              api=f"127.0.0.1:{ports[n + i]}", data_dir=tmp_path / f"n{i}",
                              group_session=SESSION_S)) for i in range(n)]
    for i, app in enumerate(apps):
        setup(app, i)
    await asyncio.gather(*(app.start() for app in apps))
    try:
        yield apps
    finally:
        await asyncio.gather(*(app.stop() for app in apps))


async def until(what: str, probe: Callable[[], Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _stable(app: FlexCore, group: str, members: int) -> bool:
    """The group has ``members`` members and no partition is being handed over."""
    try:
        info = app.groups.info(group)
    except Exception:
        return False
    return len(info["members"]) == members and all(
        a["owner"] == a["target"] is not None for a in info["assignment"])


def _drained(app: FlexCore, group: str) -> bool:
    try:
        return bool(app.groups.info(group)["lag"] == 0)
    except Exception:
        return False


async def test_each_event_once_per_group_in_key_order_broadcast_on_all(
        tmp_path: Path) -> None:
    billing: list[tuple[int, str, int, Any]] = []     # (node, key, seq, transformed)
    late: list[int] = []
    broadcast: dict[int, list[int]] = defaultdict(list)
    cut = time.time() + 3600 * 24 * 365               # a window no event reaches

    def setup(app: FlexCore, i: int) -> None:
        @app.on_event("order.*", group="billing", where="payload.total > `0`",
                      transform=["payload", lambda ev: {**ev.payload, "node": i}])
        async def bill(event: Event, attempt: int) -> None:
            assert attempt == 1
            billing.append((i, event.key or "", event.payload["seq"], event.payload))

        @app.on_event("order.*", group="future", since=cut)
        def never(event: Event) -> None:               # plain function: a worker thread
            late.append(event.offset)

        @app.on_event("order.created")
        async def everywhere(event: Event, app: FlexCore) -> None:
            assert app.settings.self_addr == app_addr[i]
            broadcast[i].append(event.offset)

    app_addr: dict[int, str] = {}
    async with cluster(tmp_path, setup) as apps:
        app_addr.update({i: a.settings.self_addr for i, a in enumerate(apps)})
        await until("billing balanced over 3 nodes",
                    lambda: _stable(apps[0], "billing", 3))
        keys = [f"customer-{k}" for k in range(30)]
        sent: dict[str, list[int]] = defaultdict(list)
        t0 = time.monotonic()
        for seq in range(300):
            key = keys[seq % len(keys)]
            total = 0 if seq % 10 == 3 else seq        # every 10th-ish is filtered out
            await apps[seq % 3].publish("order.created" if seq % 2 else "order.paid",
                                        {"seq": seq, "total": total}, key=key)
            if total > 0:
                sent[key].append(seq)
        expected = sum(len(v) for v in sent.values())
        await until("all billed", lambda: len(billing) >= expected)
        await until("billing committed", lambda: all(_drained(a, "billing") for a in apps))
        elapsed = time.monotonic() - t0
        # Exactly once per group, nothing filtered let through, transforms applied.
        assert Counter((k, s) for _, k, s, _ in billing) == \
            Counter((k, s) for k, seqs in sent.items() for s in seqs)
        assert all(p["node"] == i and "total" in p for i, _, _, p in billing)
        # In order per key, and spread over the nodes.
        by_key: dict[str, list[int]] = defaultdict(list)
        for _, key, seq, _ in billing:
            by_key[key].append(seq)
        assert by_key == sent
        assert len({i for i, _, _, _ in billing}) == 3
        # A key stays on one node while membership is stable.
        assert all(len({i for i, k, _, _ in billing if k == key}) == 1 for key in sent)
        # Broadcast: every node saw every order.created once, in log order.
        created = sorted(o for o in broadcast[0])
        assert len(created) == 150
        await until("broadcast drained", lambda: all(len(broadcast[i]) == 150
                                                     for i in range(3)))
        assert all(broadcast[i] == created for i in range(3))
        assert late == []
        await until("future group drained", lambda: _drained(apps[0], "future"))
        info = apps[1].groups.info("billing")
        assert info["partitions"] == 16 and info["lag"] == 0
        names = {g["name"] for g in apps[2].groups.list_groups()}
        assert {"billing", "future"} <= names
        assert sum(name.startswith("everywhere@") for name in names) == 3
        print(f"\n300 events: {expected} billed once each over 3 nodes "
              f"({Counter(i for i, *_ in billing)}), 150 broadcast x 3, "
              f"{elapsed:.2f} s to drain")


async def test_retries_dead_letters_and_redrive_through_the_api(tmp_path: Path) -> None:
    calls: list[tuple[str, int]] = []                  # (event id, attempt)
    broken = {"poison": True}

    def setup(app: FlexCore, i: int) -> None:
        @app.on_event("pay.*", group="pay", retry=Retry(max_attempts=3, backoff=0.05))
        async def charge(event: Event, attempt: int) -> None:
            calls.append((event.id, attempt))
            if event.payload.get("fail_until", 0) >= attempt:
                raise RuntimeError(f"card declined (attempt {attempt})")
            if event.payload.get("poison") and broken["poison"]:
                raise ValueError("poison")

        # Another type, another policy: one attempt, straight to the dead letters.
        @app.on_event("refund.*", group="pay", retry=Retry(max_attempts=1))
        async def refund(event: Event) -> None:
            calls.append((event.id, 0))
            raise RuntimeError("refunds are off")

    async with cluster(tmp_path, setup) as apps:
        await until("pay balanced", lambda: _stable(apps[0], "pay", 3))
        for n in range(10):
            await apps[0].publish("pay.card", {"n": n}, key=f"c{n}", id=f"ok-{n}")
        await apps[1].publish("pay.card", {"fail_until": 1}, key="c1", id="flaky")
        await apps[2].publish("pay.card", {"poison": True}, key="c2", id="poison")
        await apps[2].publish("refund.card", {}, key="c3", id="refund")
        await until("pay drained", lambda: all(_drained(a, "pay") for a in apps))
        attempts = defaultdict(list)
        for event_id, attempt in calls:
            attempts[event_id].append(attempt)
        assert all(attempts[f"ok-{n}"] == [1] for n in range(10))
        assert attempts["flaky"] == [1, 2]
        assert attempts["poison"] == [1, 2, 3]
        assert attempts["refund"] == [0]
        url = apps[0].settings.advertised_api
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/v1/groups/pay/dead") as resp:
                assert resp.status == 200
                dead = (await resp.json())["dead"]
            assert sorted((d["id"], d["handler"], d["attempts"], d["error"])
                          for d in dead) == [
                ("poison", "charge", 3, "ValueError: poison"),
                ("refund", "refund", 1, "RuntimeError: refunds are off")]
            async with http.get(f"{url}/v1/groups/pay") as resp:
                info = await resp.json()
            assert info["lag"] == 0 and info["dead"] == 2 and len(info["members"]) == 3
            async with http.get(f"{url}/metrics") as resp:
                metrics = await resp.text()
            for line in ('flexcore_group_lag{group="pay"} 0.0',
                         'flexcore_group_members{group="pay"} 3.0',
                         'flexcore_group_dead_letters{group="pay"} 2.0'):
                assert line in metrics.splitlines(), line
            assert sum(len(m["partitions"]) for m in info["members"]) == 16
            broken["poison"] = False
            async with http.post(f"{url}/v1/groups/pay/dead/redrive", json={"max": 5}) \
                    as resp:
                assert resp.status == 200
                assert (await resp.json())["redriven"] == 2
            # Redelivered to their partitions' owners: poison now succeeds, the refund
            # fails again and is a dead letter once more.
            await until("redrive finished", lambda: attempts_of(calls, "poison") == 4
                        and attempts_of(calls, "refund") == 2
                        and len(apps[0].groups.dead("pay")) == 1
                        and not any(a["redrive"] for a in
                                    apps[0].groups.info("pay")["assignment"]))
            async with http.get(f"{url}/v1/groups/pay/dead") as resp:
                assert [d["id"] for d in (await resp.json())["dead"]] == ["refund"]
            async with http.get(f"{url}/v1/groups/nope") as resp:
                assert resp.status == 404
            async with http.get(f"{url}/v1/groups/pay/dead?limit=0") as resp:
                assert resp.status == 400
        assert attempts_of(calls, "poison") == 4       # once more, and it succeeded


def attempts_of(calls: list[tuple[str, int]], event_id: str) -> int:
    return sum(1 for e, _ in calls if e == event_id)


async def test_redelivered_in_order_after_a_node_dies_mid_handler(tmp_path: Path) -> None:
    started: list[tuple[int, str]] = []                # (node, event id)
    done: list[tuple[int, str]] = []
    first = asyncio.Event()

    def setup(app: FlexCore, i: int) -> None:
        @app.on_event("ship.*", group="ship")
        async def ship(event: Event, machine: StateMachine, feed: EventFeed,
                       clock: Clock) -> None:
            assert machine is app.node.machine and feed is app.node.feed and clock() > 0
            started.append((i, event.id))
            if event.id == "slow" and not first.is_set():
                first.set()
                await asyncio.Event().wait()           # hangs until its node dies
            done.append((i, event.id))

    async with cluster(tmp_path, setup) as apps:
        await until("ship balanced", lambda: _stable(apps[0], "ship", 3))
        await apps[0].publish("ship.order", {}, key="k", id="slow")
        await asyncio.wait_for(first.wait(), 10)
        victim = started[0][0]
        for n in range(5):                             # queued behind it (same key)
            await apps[0].publish("ship.order", {}, key="k", id=f"after-{n}")
        survivors = [a for i, a in enumerate(apps) if i != victim]
        t_kill = time.monotonic()
        # A crash as the group sees it: handlers cancelled, nothing committed, no leave,
        # no more heartbeats; then the node itself goes.
        consumer = apps[victim].consumer
        assert consumer is not None
        await consumer.stop(leave=False)
        await apps[victim].stop()
        await until("slow redelivered", lambda: sum(e == "after-4" for _, e in done) == 1,
                    timeout=30)
        took = time.monotonic() - t_kill
        assert [e for _, e in started] == ["slow", "slow", *[f"after-{n}" for n in range(5)]]
        assert started[1][0] != victim
        assert [e for _, e in done] == ["slow", *[f"after-{n}" for n in range(5)]]
        await until("survivors own everything", lambda: _stable(survivors[0], "ship", 2))
        print(f"\nnode killed mid-handler: event redelivered and its key's queue "
              f"drained on node {started[1][0]} {took:.2f} s later "
              f"(session {SESSION_S} s)")
