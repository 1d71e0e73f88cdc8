"""Waiting on pipeline runs through the HTTP API (integration, e2e and compose tests)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flexcore.cluster import http_json

FINAL = ("success", "failure")


def final_run(urls: Iterable[str], name: str, run_id: str, *, consistent: bool = False
              ) -> dict[str, Any] | None:
    """Run ``run_id`` of pipeline ``name`` as the first of ``urls`` (node or load
    balancer APIs) that answers reports it, once it is final; None until then (a node
    that does not answer is skipped). For `flexcore.cluster.wait_for`."""
    query = "?consistent=true" if consistent else ""
    for url in urls:
        try:
            code, body = http_json("GET", f"{url}/v1/pipelines/{name}/runs/{run_id}{query}",
                                   timeout=10)
        except OSError:
            continue
        if code == 200 and body["status"] in FINAL:
            return dict(body)
    return None
