"""FlexCore embedded in this test's own event loop (no subprocess)."""

from __future__ import annotations

from pathlib import Path

from flexcore import FlexCore, Settings
from flexcore.cluster import free_ports, http_json


async def test_embedded_node_publishes_and_reads(tmp_path: Path) -> None:
    raft, api = free_ports(2)
    app = FlexCore(Settings(self_addr=f"127.0.0.1:{raft}", api=f"127.0.0.1:{api}",
                            data_dir=tmp_path / "d"))
    async with app:
        first = await app.publish("lib.hello", {"n": 1}, key="k", id="lib-1")
        again = await app.publish("lib.hello", {"n": 2}, id="lib-1")
        assert first.offsets == again.offsets == [1] and again.duplicates == [True]
        page = await app.read_events(type="lib.*", consistent=True)
        assert [(e["id"], e["payload"], e["key"]) for e in page.events] == \
            [("lib-1", {"n": 1}, "k")]
        # The same node serves the admin API from inside this process.
        import asyncio
        code, body = await asyncio.to_thread(http_json, "GET", f"http://127.0.0.1:{api}/v1/events")
        assert code == 200 and body["events"][0]["id"] == "lib-1"
    assert not app.started
    # Data survives: a new FlexCore on the same folder sees the event.
    async with FlexCore(Settings(self_addr=f"127.0.0.1:{raft}", api=f"127.0.0.1:{api}",
                                 data_dir=tmp_path / "d")) as again_app:
        page = await again_app.read_events(consistent=True)
        assert [e["id"] for e in page.events] == ["lib-1"]
