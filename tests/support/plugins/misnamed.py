"""A test plugin whose info names another plugin."""

from __future__ import annotations

from typing import Any

from flexcore.plugins.sdk import Plugin, serve


class Misnamed(Plugin):
    def info(self) -> dict[str, Any]:
        return {"name": "someone-else", "version": "0.1", "kind": "transformer"}


if __name__ == "__main__":
    serve(Misnamed())
