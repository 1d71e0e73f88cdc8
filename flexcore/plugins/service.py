"""``/v1/plugins`` and ``/v1/pipelines`` on a real node: commands and reads.

`PipelineService` implements `flexcore.api.pipelines.PipelineBackend`: it checks a
definition's plugins against this node's discovery (each named plugin must exist and
be of the stage's kind, asked through ``info``), turns requests into ``pipeline.*``
commands (choosing each run's UUID) and renders the replicated state from this node's
applied log. Every node should have the same plugins: whichever node leads runs them.
"""

from __future__ import annotations

import uuid
from typing import Any

from ..api.pipelines import PipelineInput
from ..errors import BadRequest, NotFound
from ..service import NodeServices
from .host import PluginFailure, PluginHost

_KIND = {"extractor": "extractor", "loader": "loader", "transforms": "transformer"}


class PipelineService:
    """Pipelines and plugins for the admin API and the library."""

    def __init__(self, services: NodeServices, host: PluginHost) -> None:
        self.services = services
        self.raft = services.raft
        self.machine = services.machine
        self.host = host

    async def _fresh(self, consistent: bool) -> None:
        if consistent:
            await self.services.barrier()

    def _comp(self) -> Any:
        return self.machine.component("pipelines")

    async def plugins(self, *, probe: bool = True) -> dict[str, Any]:
        return {"plugins": await self.host.status(probe=probe),
                "plugins_dir": str(self.host.plugins_dir) if self.host.plugins_dir else None}

    async def _check_plugin(self, stage: dict[str, Any], where: str, kind: str) -> None:
        name = stage["plugin"]
        try:
            self.host.spec(name)
        except LookupError as exc:
            raise BadRequest(f"{where}.plugin: {exc}") from None
        try:
            info = await self.host.info(name)
        except PluginFailure as exc:
            raise BadRequest(f"{where}.plugin {name!r} does not start: {exc.message}") \
                from None
        if info["kind"] != kind:
            raise BadRequest(f"{where}.plugin {name!r} is a {info['kind']}, not a {kind}")

    async def put(self, name: str, spec: PipelineInput) -> dict[str, Any]:
        await self._check_plugin(spec.extractor, "extractor", "extractor")
        for i, stage in enumerate(spec.transforms):
            await self._check_plugin(stage, f"transforms[{i}]", "transformer")
        await self._check_plugin(spec.loader, "loader", "loader")
        value, index = await self.services.propose("pipeline.put",
                                                   {"name": name, **spec.body()})
        with self.raft.lock:
            current = self._comp().get(name) or {}
        return {**current, **value, "index": index}

    async def get(self, name: str, *, consistent: bool = False) -> dict[str, Any]:
        await self._fresh(consistent)
        with self.raft.lock:
            found: dict[str, Any] | None = self._comp().get(name)
        if found is None:
            raise NotFound(f"no pipeline {name}")
        return found

    async def list(self, *, consistent: bool = False) -> dict[str, Any]:
        await self._fresh(consistent)
        with self.raft.lock:
            return {"pipelines": self._comp().list_pipelines()}

    async def delete(self, name: str) -> dict[str, Any]:
        value, index = await self.services.propose("pipeline.delete", {"name": name})
        return {**value, "index": index}

    async def create_run(self, name: str, run_id: str | None) -> dict[str, Any]:
        value, index = await self.services.propose("pipeline.run.create", {
            "id": run_id or str(uuid.uuid4()), "pipeline": name})
        return {**value, "index": index}

    async def get_run(self, name: str, run_id: str, *, consistent: bool = False
                      ) -> dict[str, Any]:
        await self._fresh(consistent)
        with self.raft.lock:
            run: dict[str, Any] | None = self._comp().run(run_id)
        if run is None or run["pipeline"] != name:
            raise NotFound(f"no run {run_id} of pipeline {name}")
        return run

    async def list_runs(self, name: str, *, after: int, limit: int,
                        consistent: bool = False) -> dict[str, Any]:
        await self._fresh(consistent)
        with self.raft.lock:
            if self._comp().get(name) is None:
                raise NotFound(f"no pipeline {name}")
            runs, nxt = self._comp().runs(name, after=after, limit=limit)
        return {"runs": runs, "next": nxt}
