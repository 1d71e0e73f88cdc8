"""``/v1/workflows`` on a real node: runs and routing rules as commands and reads.

`WorkflowService` implements `flexcore.api.workflows.WorkflowBackend`: it turns requests
into ``workflow.*`` commands (choosing each run's UUID before anything reaches Windmill)
and renders the replicated state from this node's applied log.

A node started without Windmill settings refuses new runs and routing rules with 503
``windmill_not_configured``: accepting them would leave runs pending with nobody to
submit them. Reads, cancels and deletes work on every node. Windmill settings should
be the same on every node, since whichever node leads submits the runs.
"""

from __future__ import annotations

import uuid
from typing import Any

from ..api.workflows import RouteInput, RunRequest
from ..errors import FlexCoreError, NotFound
from ..service import NodeServices


class WindmillNotConfigured(FlexCoreError):
    code = "windmill_not_configured"
    status = 503


class WorkflowService:
    """Runs and routes for the admin API and the library."""

    def __init__(self, services: NodeServices, *, configured: bool) -> None:
        self.services = services
        self.raft = services.raft
        self.machine = services.machine
        self.configured = configured

    def _require_windmill(self) -> None:
        if not self.configured:
            raise WindmillNotConfigured(
                "this node has no Windmill configured: start the nodes with "
                "--windmill-url, --windmill-token and --windmill-workspace (or WM_BASE_URL, "
                "WM_TOKEN, WM_WORKSPACE)")

    async def _fresh(self, consistent: bool, min_index: int | None = None) -> None:
        if consistent:
            await self.services.barrier()
        if min_index is not None:
            await self.raft.wait_applied(min_index, self.raft.config.propose_timeout)

    def _wf(self) -> Any:
        return self.machine.component("workflows")

    # -- runs ------------------------------------------------------------------------------

    async def create_run(self, request: RunRequest) -> dict[str, Any]:
        self._require_windmill()
        run_id = request.id or str(uuid.uuid4())
        value, index = await self.services.propose("workflow.run.create", {
            "id": run_id, "path": request.path, "kind": request.kind,
            "args": request.args})
        return {**value, "index": index}

    async def get_run(self, run_id: str, *, consistent: bool = False,
                      min_index: int | None = None) -> dict[str, Any]:
        await self._fresh(consistent, min_index)
        with self.raft.lock:
            run: dict[str, Any] | None = self._wf().get(run_id)
        if run is None:
            raise NotFound(f"no workflow run {run_id}")
        return run

    async def list_runs(self, *, status: str | None, after: int, limit: int,
                        consistent: bool = False) -> dict[str, Any]:
        await self._fresh(consistent)
        with self.raft.lock:
            runs, nxt = self._wf().list_runs(status=status, after=after, limit=limit)
            counts = self._wf().counts()
        return {"runs": runs, "next": nxt, "counts": counts}

    async def cancel_run(self, run_id: str, reason: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"id": run_id}
        if reason is not None:
            body["reason"] = reason
        value, index = await self.services.propose("workflow.run.cancel", body)
        return {**value, "index": index}

    # -- routes ----------------------------------------------------------------------------

    async def put_route(self, route_id: str, spec: RouteInput) -> dict[str, Any]:
        self._require_windmill()
        with self.raft.lock:
            # The rule applies to events after the newest one this node has applied.
            start_after = self.machine.event_stats()["last_offset"]
        body: dict[str, Any] = {
            "id": route_id, "event_type": spec.event_type, "path": spec.path,
            "kind": spec.kind, "args": spec.args, "args_from": spec.args_from,
            "enabled": spec.enabled, "start_after": start_after}
        if spec.condition is not None:
            body["condition"] = spec.condition
        value, index = await self.services.propose("workflow.route.put", body)
        with self.raft.lock:
            route = self._wf().route(route_id)
        return {**(route or {}), **value, "index": index}

    async def get_route(self, route_id: str, *, consistent: bool = False) -> dict[str, Any]:
        await self._fresh(consistent)
        with self.raft.lock:
            route: dict[str, Any] | None = self._wf().route(route_id)
        if route is None:
            raise NotFound(f"no routing rule {route_id}")
        return route

    async def list_routes(self, *, consistent: bool = False) -> dict[str, Any]:
        await self._fresh(consistent)
        with self.raft.lock:
            return {"routes": self._wf().routes(), "cursor": self._wf().cursor}

    async def delete_route(self, route_id: str) -> dict[str, Any]:
        value, index = await self.services.propose("workflow.route.delete", {"id": route_id})
        return {**value, "index": index}
