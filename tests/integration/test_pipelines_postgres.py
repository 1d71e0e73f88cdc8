"""The shipped extractor against a real PostgreSQL: more than 10,000 rows read in full,
in batches (the Go extractor cut silently at 10,000), a timestamp cursor, and a
PostgreSQL -> json-transformer -> api-loader pipeline on a real node.

Needs a running PostgreSQL reachable through its local socket; the test FAILS (never
skips) without one. Start it with ``pg_ctlcluster 15 main start`` (Debian: ``apt-get
install -y postgresql``) and give the OS user a role (as root: ``runuser -u postgres
-- createuser --superuser root``), or point ``FLEXCORE_TEST_PG_URL`` at a server
(a SQLAlchemy URL of a database the user may CREATE DATABASE from). ``.ci/run`` does
all of this. Each run creates a fresh database and drops it afterwards.
"""

from __future__ import annotations

import datetime
import getpass
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import sqlalchemy as sa

from flexcore.cluster import http_json, wait_for
from flexcore.plugins.host import PluginHost
from flexcore.testing.receiver import BatchReceiver
from tests.support.pipelines import final_run

from .conftest import ClusterFactory

ROWS = 12_345
BASE_URL = os.environ.get(
    "FLEXCORE_TEST_PG_URL",
    f"postgresql+psycopg://{getpass.getuser()}@/postgres?host=/var/run/postgresql")


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    admin = sa.create_engine(BASE_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        admin.dispose()
        pytest.fail(f"PostgreSQL is not reachable at {BASE_URL} ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0]}). Start it: 'pg_ctlcluster 15 main start' "
                    "(install: apt-get install -y postgresql), create a role for this user "
                    "('runuser -u postgres -- createuser --superuser root'), or set "
                    "FLEXCORE_TEST_PG_URL. .ci/run does this.", pytrace=False)
    name = f"flexcore_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(BASE_URL).set(database=name)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text('CREATE TABLE "order" (id BIGSERIAL PRIMARY KEY, '
                             'customer TEXT NOT NULL, amount NUMERIC(10, 2), '
                             'created TIMESTAMP NOT NULL)'))
        start = datetime.datetime(2024, 1, 1)
        conn.execute(sa.text('INSERT INTO "order" (customer, amount, created) '
                             "SELECT 'c' || (g % 100), g * 1.25, "
                             ":start + (g / 3) * interval '1 second' "
                             "FROM generate_series(1, :n) AS g"),
                     {"start": start, "n": ROWS})
    engine.dispose()
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
async def host() -> AsyncIterator[PluginHost]:
    h = PluginHost(None)
    yield h
    await h.close()


async def test_more_than_10000_rows_in_batches(pg_url: str, host: PluginHost) -> None:
    proc = await host.open("postgres-extractor", "pg", {
        "url": pg_url, "table": "public.order", "cursor_column": "id", "batch_size": 2000})
    ids: list[int] = []
    cursor = None
    batches = 0
    while True:
        got = await proc.call("execute", {"checkpoint": cursor})
        if not got["rows"]:
            break
        batches += 1
        assert len(got["rows"]) <= 2000
        ids.extend(r["id"] for r in got["rows"])
        cursor = got["cursor"]
        if got["done"]:
            break
    assert ids == list(range(1, ROWS + 1))
    assert batches == -(-ROWS // 2000)
    print(f"\npostgres: {len(ids)} rows in {batches} batches of <= 2000")


async def test_timestamp_cursor_with_ties(pg_url: str, host: PluginHost) -> None:
    # Three rows share each second: a batch never ends inside a group of ties.
    proc = await host.open("postgres-extractor", "pg-ts", {
        "url": pg_url, "table": "order", "cursor_column": "created",
        "columns": ["id", "amount"], "batch_size": 1000})
    seen: list[int] = []
    cursor = None
    while True:
        got = await proc.call("execute", {"checkpoint": cursor})
        seen.extend(r["id"] for r in got["rows"])
        if not got["rows"] or got["done"]:
            break
        assert isinstance(got["cursor"], str)   # ISO 8601, converted back for the query
        cursor = got["cursor"]
    assert sorted(seen) == list(range(1, ROWS + 1))
    row = (await proc.call("execute", {"checkpoint": None, "limit": 1}))["rows"][0]
    assert row == {"id": 1, "amount": "1.25", "created": "2024-01-01T00:00:00"}


def test_postgres_pipeline_on_a_node(pg_url: str, make_cluster: ClusterFactory) -> None:
    receiver = BatchReceiver().start()
    try:
        cluster = make_cluster(1)
        cluster.wait_leader(timeout=30)
        cluster.wait_ready(timeout=30)
        url = cluster.nodes[0].url
        code, body = http_json("PUT", url + "/v1/pipelines/pg-orders", {
            "extractor": {"plugin": "postgres-extractor", "config": {
                "url": pg_url, "table": "order", "cursor_column": "id", "batch_size": 2500}},
            "transforms": [{"plugin": "json-transformer", "config": {
                "mapping": {"id": "id", "customer": "customer"}}}],
            "loader": {"plugin": "api-loader", "config": {"url": receiver.url}}}, timeout=30)
        assert code == 201, body
        code, run = http_json("POST", url + "/v1/pipelines/pg-orders/runs", {})
        assert code == 202, run
        done = wait_for("run final", lambda: final_run(cluster.urls([0]), "pg-orders", run["id"]),
                        120, interval=0.1)
        assert done["status"] == "success" and done["rows"] == ROWS, done
        assert sorted(r["id"] for r in receiver.rows()) == list(range(1, ROWS + 1))
        assert done["batches"] == len(receiver.accepted) == -(-ROWS // 2500)
    finally:
        receiver.stop()
