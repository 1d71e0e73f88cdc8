"""Real node processes on loopback, driven through `flexcore.cluster.LocalCluster`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flexcore.cluster import LocalCluster

ClusterFactory = Callable[..., LocalCluster]


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[ClusterFactory]:
    """Start ``LocalCluster(size, ...)``; every cluster is stopped at teardown, and the
    node logs are printed when a test fails (pytest shows captured output)."""
    made: list[LocalCluster] = []

    def factory(size: int = 3, **kwargs: object) -> LocalCluster:
        cluster = LocalCluster(size, tmp_path / f"cluster{len(made)}", **kwargs)  # type: ignore[arg-type]
        made.append(cluster)
        return cluster.start()

    yield factory
    for cluster in made:
        cluster.close()
        for node in cluster.nodes:
            if node.log_path.exists():
                tail = node.log_path.read_text(errors="replace").splitlines()[-40:]
                print(f"--- {node.log_path.name} (last {len(tail)} lines)")
                print("\n".join(tail))


@pytest.fixture
def cluster3(make_cluster: ClusterFactory) -> LocalCluster:
    cluster = make_cluster(3)
    cluster.wait_leader(timeout=30)
    cluster.wait_ready(timeout=30)
    return cluster
