"""Pytest fixtures shared by tests/e2e and tests/chaos (imported by their conftest)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import docker
import pytest

from tests.support.docker_cluster import DockerCluster, docker_client, ensure_image


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[tuple[docker.DockerClient, str]]:
    """The engine and the node image. Fails (never skips) when docker is missing:
    deselect these suites explicitly with -m 'not docker'."""
    try:
        client = docker_client()
    except Exception as exc:
        pytest.fail(str(exc), pytrace=False)
    image = ensure_image(client)
    yield client, image
    client.close()


DockerFactory = Callable[..., DockerCluster]


@pytest.fixture
def make_docker_cluster(docker_engine: tuple[docker.DockerClient, str],
                        request: pytest.FixtureRequest) -> Iterator[DockerFactory]:
    client, image = docker_engine
    made: list[DockerCluster] = []

    def factory(size: int = 3, **kwargs: object) -> DockerCluster:
        cluster = DockerCluster(size, client=client, image=image, **kwargs)  # type: ignore[arg-type]
        made.append(cluster)
        cluster.start()
        return cluster

    yield factory
    for cluster in made:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            for i in range(len(cluster.nodes)):
                print(f"--- {cluster.nodes[i].name}\n{cluster.logs(i)}")
        cluster.close()


@pytest.fixture
def docker_cluster3(make_docker_cluster: DockerFactory) -> DockerCluster:
    cluster = make_docker_cluster(3, haproxy=True)
    cluster.wait_leader(timeout=60)
    cluster.wait_ready(timeout=60)
    cluster.wait_lb(timeout=30)
    return cluster
