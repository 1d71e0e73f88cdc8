"""``python -m flexcore.healthcheck``: exit 0 when this node's ``/ready`` answers 200.

For container health checks: reads the API address from ``FLEXCORE_API`` (a wildcard
host such as 0.0.0.0 is checked on 127.0.0.1).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    api = os.environ.get("FLEXCORE_API", "127.0.0.1:8100")
    host, _, port = api.rpartition(":")
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/ready", timeout=2) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
