"""Cluster metadata: which Raft node serves its admin API where.

Owns the ``cluster.register`` and ``cluster.unregister`` commands. This is metadata
only: Raft membership itself is changed by ``flexcore.raft``; this map lets any node
find a peer's API (for the dashboard, for forwarding reads). Pure data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flexcore.statemachine.component import Handler
from flexcore.statemachine.validation import Invalid, check_keys, require_str

MAX_NODE_LENGTH = 256
MAX_API_LENGTH = 1024


def _check_node(node: str) -> None:
    host, sep, port = node.rpartition(":")
    if (not sep or not host or not (port.isascii() and port.isdigit())
            or not 1 <= int(port) <= 65535 or any(ch.isspace() for ch in node)):
        raise Invalid("body.node must be a Raft address 'host:port' (port 1-65535)")


def _check_api(api: str) -> None:
    scheme_ok = api.startswith(("http://", "https://"))
    rest = api.split("://", 1)[-1]
    if not scheme_ok or not rest or any(ch.isspace() or not ch.isprintable() for ch in api):
        raise Invalid("body.api must be an http:// or https:// URL without spaces")


class ClusterRegistry:
    """Raft address -> (API URL, effective time of its latest registration)."""

    def __init__(self) -> None:
        self._nodes: dict[str, tuple[str, int]] = {}

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {node: {"api": api, "registered_ts": ts}
                for node, (api, ts) in self._nodes.items()}

    def commands(self) -> Mapping[str, Handler]:
        return {
            "cluster.register": lambda body, ctx: self.register(body, ctx.now_ms),
            "cluster.unregister": lambda body, ctx: self.unregister(body),
        }

    def register(self, body: Mapping[str, Any], now: int) -> dict[str, Any]:
        """Add a node, or update its API URL (and registration time) if present."""
        check_keys(body, "body", required=("node", "api"))
        node = require_str(body, "node", "body", max_len=MAX_NODE_LENGTH)
        api = require_str(body, "api", "body", max_len=MAX_API_LENGTH)
        _check_node(node)
        _check_api(api)
        self._nodes[node] = (api, now)
        return {"node": node, "api": api}

    def unregister(self, body: Mapping[str, Any]) -> dict[str, Any]:
        check_keys(body, "body", required=("node",))
        node = require_str(body, "node", "body", max_len=MAX_NODE_LENGTH)
        return {"removed": self._nodes.pop(node, None) is not None}

    def to_snapshot(self) -> list[list[Any]]:
        return [[node, api, ts] for node, (api, ts) in self._nodes.items()]

    @classmethod
    def from_snapshot(cls, obj: object) -> ClusterRegistry:
        if not isinstance(obj, list):
            raise ValueError("nodes section must be a list")
        registry = cls()
        for row in obj:
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                    and isinstance(row[1], str) and type(row[2]) is int):
                raise ValueError("each node must be [node, api, registered_ts]")
            if row[0] in registry._nodes:
                raise ValueError("nodes section repeats a node")
            registry._nodes[row[0]] = (row[1], row[2])
        return registry
