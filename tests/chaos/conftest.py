"""A real docker cluster (tests/support/docker_cluster.py); fails without docker."""

from collections.abc import Iterator

import pytest

from tests.support.docker_fixtures import (  # noqa: F401 - pytest fixtures
    docker_cluster3,
    docker_engine,
    make_docker_cluster,
)


@pytest.fixture
def chaos_report(capsys: pytest.CaptureFixture[str]) -> Iterator[list[str]]:
    """Lines of a test's history summary, printed past pytest's output capture at
    teardown (also when the test failed), so every CI log carries the figures."""
    lines: list[str] = []
    yield lines
    with capsys.disabled():
        for line in lines:
            print(f"[chaos] {line}")
