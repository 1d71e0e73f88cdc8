"""A test plugin (loader kind) whose execute can echo, crash or hang on request."""

from __future__ import annotations

import os
import time
from typing import Any

from flexcore.plugins.sdk import Plugin, serve


class TestPlug(Plugin):
    def info(self) -> dict[str, Any]:
        return {"name": "testplug", "version": "0.1", "kind": "loader"}

    def init(self, config: dict[str, Any]) -> None:
        self.config = config

    def execute(self, params: dict[str, Any]) -> Any:
        if params.get("crash"):
            os._exit(3)
        if params.get("hang"):
            time.sleep(3600)
        return {"echo": params, "pid": os.getpid(), "config": self.config}


if __name__ == "__main__":
    serve(TestPlug())
