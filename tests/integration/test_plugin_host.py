"""The plugin host with real plugin processes: handshake, execute, crash and restart
with backoff, hang and kill, a bad handshake refused, discovery from entry points and
a plugins dir, and the shipped extractor on SQLite."""

from __future__ import annotations

import shutil
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flexcore.plugins.host import (
    PluginCrashed,
    PluginFailure,
    PluginHost,
    PluginTimeout,
    PluginUnavailable,
    discover,
)

PLUGINS = Path(__file__).resolve().parents[1] / "support" / "plugins"
SHIPPED = {"postgres-extractor", "json-transformer", "api-loader"}


@pytest.fixture
def plugins_dir(tmp_path: Path) -> Path:
    d = tmp_path / "plugins"
    d.mkdir()
    for name in ("testplug.py", "badshake.py", "misnamed.py"):
        shutil.copy(PLUGINS / name, d / name)
    script = d / "shellplug"   # an executable in any language: here a shell wrapper
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {d / 'testplug.py'} \"$@\"\n")
    script.chmod(0o755)
    (d / "notes.txt").write_text("not a plugin")
    return d


@pytest.fixture
async def host(plugins_dir: Path) -> AsyncIterator[PluginHost]:
    h = PluginHost(plugins_dir, handshake_timeout=10, call_timeout=10, backoff_min=0.3)
    yield h
    await h.close()


def test_discovery_from_entry_points_and_the_plugins_dir(plugins_dir: Path) -> None:
    found = discover(plugins_dir)
    assert set(found) >= SHIPPED
    assert {n for n, s in found.items() if s.source == "entry_point"} == SHIPPED
    assert found["postgres-extractor"].command[1:] == (
        "-m", "flexcore.plugins.builtin.postgres_extractor")
    assert found["testplug"].source == "plugins_dir"
    assert found["testplug"].command == (sys.executable, str(plugins_dir / "testplug.py"))
    assert found["shellplug"].command == (str(plugins_dir / "shellplug"),)
    assert "notes" not in found and "notes.txt" not in found
    assert set(discover(None)) == SHIPPED


async def test_info_status_handshake_refusals(host: PluginHost) -> None:
    plugins = {p["name"]: p for p in await host.status()}
    for name, kind in (("postgres-extractor", "extractor"), ("json-transformer",
                                                             "transformer"),
                       ("api-loader", "loader"), ("testplug", "loader")):
        assert plugins[name]["info"]["kind"] == kind, plugins[name]
        assert plugins[name]["error"] is None
    assert plugins["badshake"]["info"] is None
    assert "refused handshake" in plugins["badshake"]["error"]
    assert "HELLO I AM A PLUGIN" in plugins["badshake"]["error"]
    assert "calls itself 'someone-else'" in plugins["misnamed"]["error"]
    # The executable wrapper runs testplug, which names itself testplug: refused.
    assert "calls itself 'testplug'" in plugins["shellplug"]["error"]
    with pytest.raises(PluginUnavailable, match="refused handshake"):
        await host.open("badshake", "k", {})


async def test_execute_crash_restart_with_backoff(host: PluginHost) -> None:
    proc = await host.open("testplug", "crashy", {"greeting": "hi"})
    first = await proc.call("execute", {"n": 1})
    assert first["echo"] == {"n": 1} and first["config"] == {"greeting": "hi"}
    pid = first["pid"]
    t0 = time.monotonic()
    with pytest.raises(PluginCrashed, match="exited with code 3"):
        await proc.call("execute", {"crash": True})
    assert proc.state in ("backoff", "starting")
    await proc.ensure()          # restarted (eagerly) after the backoff
    waited = time.monotonic() - t0
    again = await proc.call("execute", {"n": 2})
    assert again["pid"] != pid and again["config"] == {"greeting": "hi"}   # re-initialised
    assert proc.restarts == 1 and waited >= 0.3 * 0.75
    # Two crashes in a row double the backoff.
    with pytest.raises(PluginCrashed):
        await proc.call("execute", {"crash": True})
    t1 = time.monotonic()
    with pytest.raises(PluginCrashed):
        await proc.call("execute", {"crash": True})
    await proc.ensure()
    assert time.monotonic() - t1 >= 0.6 * 0.9 and proc.restarts == 3
    print(f"\nrestart after a crash: {waited:.2f} s (backoff 0.3 s); restarts {proc.restarts}")


async def test_a_hung_plugin_is_killed_after_its_timeout(host: PluginHost) -> None:
    proc = await host.open("testplug", "hangs", {}, call_timeout=1)
    pid = proc.pid
    t0 = time.monotonic()
    with pytest.raises(PluginTimeout, match="within 1 s"):
        await proc.call("execute", {"hang": True})
    took = time.monotonic() - t0
    assert 1 <= took < 3
    await proc.ensure()
    assert proc.pid != pid and proc.restarts == 1
    assert (await proc.call("execute", {"ok": 1}))["echo"] == {"ok": 1}
    await host.release(proc)
    assert proc.state == "closed" and proc.pid is None


async def test_init_refusal_is_a_clear_non_retryable_error(host: PluginHost) -> None:
    with pytest.raises(PluginFailure) as info:
        await host.open("json-transformer", "bad", {"mapping": {"a": "[["}})
    assert info.value.code == "bad_config" and not info.value.retryable
    assert "mapping.a is not valid JMESPath" in info.value.message


async def test_sqlite_extraction_in_batches_with_ties(host: PluginHost, tmp_path: Path
                                                      ) -> None:
    db = tmp_path / "src.db"
    with pytest.raises(PluginFailure, match="identifier"):
        await host.open("postgres-extractor", "inj", {
            "url": f"sqlite:///{db}", "table": "x; DROP TABLE y", "cursor_column": "id"})
    with pytest.raises(PluginFailure, match="no table"):
        await host.open("postgres-extractor", "missing", {
            "url": f"sqlite:///{db}", "table": "nope", "cursor_column": "id"})
    # A reserved word as table and column name: quoted by SQLAlchemy. grp has ties (5
    # rows per value), and batches of 7 would end inside a group.
    with sqlite3.connect(db) as conn:
        conn.execute('CREATE TABLE "order" (id INTEGER, grp INTEGER, "select" TEXT)')
        conn.executemany('INSERT INTO "order" VALUES (?, ?, ?)',
                         [(i, i // 5, f"v{i}") for i in range(1, 101)])
    proc = await host.open("postgres-extractor", "ties", {
        "url": f"sqlite:///{db}", "table": "order", "cursor_column": "grp",
        "columns": ["id", "select"], "batch_size": 7})
    seen: list[int] = []
    cursor = None
    batches = 0
    while True:
        got = await proc.call("execute", {"checkpoint": cursor})
        if not got["rows"]:
            break
        batches += 1
        seen.extend(r["id"] for r in got["rows"])
        assert set(got["rows"][0]) == {"id", "select", "grp"}
        cursor = got["cursor"]
        if got["done"]:
            break
    assert sorted(seen) == list(range(1, 101)) and len(seen) == 100   # none lost, none twice
    assert batches >= 100 // 10
