"""A real docker cluster (tests/support/docker_cluster.py); fails without docker."""

from tests.support.docker_fixtures import (  # noqa: F401 - pytest fixtures
    docker_cluster3,
    docker_engine,
    make_docker_cluster,
)
