"""Jepsen-style chaos against a real 3-node docker cluster.

A workload of writers publishes events with unique ids to random live nodes while a
nemesis injects faults one after another: kill -9 of the leader and of a follower,
the leader frozen for 5 s, the leader cut from the majority, a 1|2 split, a slow
network, and the whole cluster killed and restarted. After healing, a checker reads
every node and asserts the invariants: every acknowledged write present exactly once
on every node, identical logs, and no write acknowledged by a minority side.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable

from flexcore.cluster import http_json, wait_for
from tests.support.docker_cluster import DockerCluster
from tests.support.workload import History, Writers, check_logs, read_all

ROUNDS = int(os.environ.get("FLEXCORE_CHAOS_ROUNDS", "5"))


class Nemesis:
    """Injects one fault at a time, heals it, and measures recovery."""

    def __init__(self, cluster: DockerCluster, history: History) -> None:
        self.c = cluster
        self.history = history
        self.rng = random.Random(7)
        self.minority_windows: list[tuple[int, float, float]] = []  # node, cut, heal

    # -- helpers -------------------------------------------------------------------------

    def leader(self) -> int:
        return self.c.leader_index(timeout=60)

    def followers(self, leader: int) -> list[int]:
        return [i for i in range(len(self.c.nodes)) if i != leader]

    def recovered(self, t0: float, entry: dict[str, object],
                  among: list[int] | None = None) -> None:
        """Wait for one agreed leader and a write that commits; record the time."""
        self.c.wait_leader(timeout=60, among=among)

        def probe() -> bool | None:
            idx = among if among is not None else [n.index for n in self.c.live()]
            node = self.c.nodes[self.rng.choice(idx)]
            code, _ = http_json("POST", node.url + "/v1/events", {"type": "nemesis.probe"},
                                timeout=5)
            return True if code == 201 else None
        wait_for("a committed probe write", probe, 60, interval=0.1)
        entry["recovery_s"] = round(time.monotonic() - t0, 3)

    def all_ready(self) -> None:
        self.c.wait_leader(timeout=60)
        self.c.wait_ready(timeout=60)

    # -- faults ----------------------------------------------------------------------

    def kill_leader(self) -> None:
        leader = self.leader()
        t0 = time.monotonic()
        self.c.kill(leader)
        entry = self.c.faults.entries[-1]
        self.recovered(t0, entry, among=self.followers(leader))
        self.c.start_node(leader)
        self.all_ready()

    def kill_follower(self) -> None:
        victim = self.rng.choice(self.followers(self.leader()))
        t0 = time.monotonic()
        self.c.kill(victim)
        entry = self.c.faults.entries[-1]
        self.recovered(t0, entry, among=self.followers(victim))
        self.c.start_node(victim)
        self.all_ready()

    def pause_leader(self) -> None:
        leader = self.leader()
        t0 = time.monotonic()
        self.c.pause(leader)
        entry = self.c.faults.entries[-1]
        self.recovered(t0, entry, among=self.followers(leader))
        wait_for("5 s of freeze", lambda: time.monotonic() - t0 >= 5 or None, 10)
        self.c.unpause(leader)
        self.all_ready()

    def partition_leader(self) -> None:
        self._cut(self.leader(), hold=4.0)

    def split_1_2(self) -> None:
        self._cut(self.rng.choice(self.followers(self.leader())), hold=3.0)

    def _cut(self, victim: int, hold: float) -> None:
        others = self.followers(victim)
        t0 = time.monotonic()
        self.c.cut(victim, others)
        entry = self.c.faults.entries[-1]
        t_cut = time.monotonic()
        self.recovered(t0, entry, among=others)
        # The minority side keeps serving its API: it must refuse, never acknowledge.
        wait_for(f"{hold:g} s of partition", lambda: time.monotonic() - t_cut >= hold or None,
                 hold + 5)
        t_heal = time.monotonic()
        self.c.uncut(victim)
        self.minority_windows.append((victim, t_cut, t_heal))
        self.all_ready()

    def slow_network(self) -> None:
        t0 = time.monotonic()
        for i in range(len(self.c.nodes)):
            self.c.slow(i)
        entry = self.c.faults.entries[-1]
        self.recovered(t0, entry)
        wait_for("4 s of slow network", lambda: time.monotonic() - t0 >= 4 or None, 10)
        for i in range(len(self.c.nodes)):
            self.c.unslow(i)
        self.all_ready()

    def full_restart(self) -> None:
        t0 = time.monotonic()
        for i in range(len(self.c.nodes)):
            self.c.kill(i)
        entry = self.c.faults.entries[-1]
        for i in range(len(self.c.nodes)):
            self.c.start_node(i)
        self.recovered(t0, entry)
        self.all_ready()

    def check_minority(self) -> None:
        for node, t_cut, t_heal in self.minority_windows:
            acked = self.history.acked_by(node, t_cut, t_heal)
            assert not acked, (f"node {node} acknowledged {len(acked)} writes while cut off "
                               f"from the majority, e.g. {acked[:3]}")


def _wait_more_writes(writers: Writers, n: int, what: str) -> None:
    base = writers.count()
    wait_for(what, lambda: writers.count() >= base + n or None, 60)


def _final_check(cluster: DockerCluster, writers: Writers, nemesis: Nemesis) -> None:
    history = writers.history
    nemesis.all_ready()
    logs = [read_all(n.url, consistent=True) for n in cluster.nodes]
    print(f"history: {history.summary()}; events in log: {len(logs[0])}")
    print(f"faults: {cluster.faults.summary()}")
    print(f"minority windows checked: {len(nemesis.minority_windows)}")
    check_logs(logs, history)
    nemesis.check_minority()
    assert len(history.acked) > 0


def test_events_survive_a_nemesis_sequence(docker_cluster3: DockerCluster) -> None:
    cluster = docker_cluster3
    with Writers(cluster, n=4, timeout=8) as writers:
        nemesis = Nemesis(cluster, writers.history)
        plan: list[Callable[[], None]] = [
            nemesis.kill_leader, nemesis.kill_follower, nemesis.pause_leader,
            nemesis.partition_leader, nemesis.split_1_2, nemesis.slow_network]
        for _ in range(ROUNDS):
            for fault in plan:
                fault()
                # Progress between faults: the workload commits again.
                _wait_more_writes(writers, 1, "writes after healing")
    _final_check(cluster, writers, nemesis)
    assert len(cluster.faults.entries) >= 6 * ROUNDS


def test_whole_cluster_killed_and_restarted_twice(docker_cluster3: DockerCluster) -> None:
    cluster = docker_cluster3
    with Writers(cluster, n=4, timeout=8) as writers:
        nemesis = Nemesis(cluster, writers.history)
        for _ in range(2):
            _wait_more_writes(writers, 50, "writes before the crash")
            nemesis.full_restart()
        _wait_more_writes(writers, 50, "writes after the last restart")
    _final_check(cluster, writers, nemesis)
