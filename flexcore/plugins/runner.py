"""The leader's side of pipelines: run them batch by batch, commit the checkpoint.

`PipelineRunner` runs on every node and acts only while this node is the Raft leader
with a quorum. For the term it leads in, it keeps one driver task per run that is not
final, so a new leader resumes every run a previous one left behind. A driver:

1. commits ``pipeline.run.start`` for a ``pending`` run;
2. starts the run's plugin processes (extractor, transforms, loader), each
   initialised with its stage's config;
3. per batch: reads the **committed** checkpoint ``(epoch, seq, cursor)`` from this
   node's applied state; asks the extractor for the rows after ``cursor``; passes them
   through the transforms; re-checks leadership and hands them to the loader with the
   idempotency key `batch_key` (pipeline, epoch, seq + 1, cursor range); re-checks
   leadership and commits ``pipeline.checkpoint`` with seq + 1 and the new cursor;
4. finishes the run ``success`` when the extractor reports ``done`` (or returns no
   rows), or ``failure`` on an error that cannot succeed on retry (a ``bad_config``,
   a 4xx from the receiver) or after ``max_attempts`` failed tries of one batch
   (retryable errors: a plugin crash or timeout, a 5xx after the loader's own retries,
   a database error), each retry after a backoff, with ``last_error`` committed.

Delivery to the loader's receiver is **at least once per batch**: a leader that dies
after the loader posted a batch but before its checkpoint committed leaves the
checkpoint before that batch, so the next leader extracts and sends the same rows again
under the same key; the receiver deduplicates by ``Idempotency-Key``. No row is lost:
the checkpoint moves only after the batch was loaded.

Leadership is re-checked before every side effect, and the watchdog (Raft change
listener plus a 0.1 s tick) cancels every task of a term once this node stops leading
in it; a deposed leader's late checkpoint is a no-op (compare-and-set on seq).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from typing import Any

import msgpack
from prometheus_client import Counter

from ..errors import CommandRejected, ConsensusError
from ..leadership import NotLeading, RunDriverDuty
from ..raft import RaftNode
from ..service import NodeServices
from ..statemachine import StateMachine
from .host import PluginFailure, PluginHost, PluginProcess

log = logging.getLogger("flexcore.pipelines")

FINAL = frozenset({"success", "failure"})
MAX_ERROR_CHARS = 2000
_SCHEDULE_NS = uuid.UUID("0c3e0d7e-6d2a-4f1e-9a43-5b1f7a9e2c61")


def batch_key(pipeline: str, epoch: int, seq: int, start: Any, end: Any) -> str:
    """The idempotency key of batch ``seq``: the rows after cursor ``start`` up to
    ``end`` in checkpoint epoch ``epoch``. The same batch always gets the same key,
    whichever leader sends it; another batch never does."""
    digest = hashlib.sha256(msgpack.packb([pipeline, epoch, seq, start, end],
                                          use_bin_type=True)).hexdigest()[:16]
    return f"{pipeline}-e{epoch}-b{seq}-{digest}"


def schedule_run_id(fire_key: str) -> str:
    """The run id of a schedule fire: the same fire always names the same run."""
    return str(uuid.uuid5(_SCHEDULE_NS, fire_key))


class _Stop(Exception):
    """End the driver without an outcome: the run is already final."""


class PipelineRunner(RunDriverDuty):
    """Drives pipeline runs while this node leads."""

    duty = "driving pipeline runs"
    runs_component = "pipelines"
    run_task_prefix = "pipeline-run"

    def __init__(self, raft: RaftNode, machine: StateMachine, services: NodeServices,
                 host: PluginHost, *, retry_min: float = 0.2, retry_max: float = 10.0,
                 max_attempts: int = 5) -> None:
        super().__init__(raft, machine, log)
        self.services = services
        self.host = host
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.max_attempts = max_attempts
        self._releases: set[asyncio.Task[None]] = set()
        reg = services.registry
        self.batches = Counter("flexcore_pipeline_batches",
                               "Pipeline batches loaded and checkpointed by this node",
                               registry=reg)
        self.rows = Counter("flexcore_pipeline_rows",
                            "Source rows in batches checkpointed by this node", registry=reg)
        self.outcomes = Counter("flexcore_pipeline_outcomes",
                                "Pipeline run outcomes committed by this node", ["status"],
                                registry=reg)

    # -- lifecycle ---------------------------------------------------------------------

    async def stop(self) -> None:
        await super().stop()
        for task in list(self._releases):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.host.close()

    def _begin_session(self, term: int) -> None:
        self.spawn(self._dispatch(term), "pipelines-dispatch")

    # -- state ---------------------------------------------------------------------------

    def _component(self) -> Any:
        return self.machine.component("pipelines")

    def _read(self, run_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None,
                                          dict[str, Any] | None]:
        with self.raft.lock:
            comp = self._component()
            run: dict[str, Any] | None = comp.run(run_id)
            if run is None:
                return None, None, None
            return run, comp.spec(run["pipeline"]), comp.checkpoint(run["pipeline"])

    async def _propose(self, type_: str, body: dict[str, Any]) -> dict[str, Any]:
        value, _ = await self.services.propose(type_, body)
        return value

    # -- runs ----------------------------------------------------------------------------

    async def _drive(self, run_id: str, term: int) -> None:
        procs: list[PluginProcess] = []
        try:
            await self._drive_run(run_id, term, procs)
        except (NotLeading, _Stop):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("pipeline run %s: driver failed; the next leader term retries",
                          run_id)
        finally:
            if procs:
                task = asyncio.create_task(self._release(procs))
                self._releases.add(task)
                task.add_done_callback(self._releases.discard)
            if self._drivers.get(run_id) is asyncio.current_task():
                del self._drivers[run_id]

    async def _release(self, procs: list[PluginProcess]) -> None:
        await asyncio.gather(*(self.host.release(p) for p in procs), return_exceptions=True)

    async def _drive_run(self, run_id: str, term: int, procs: list[PluginProcess]) -> None:
        run, spec, _ = self._read(run_id)
        if run is None or run["status"] in FINAL or spec is None:
            return
        if run["status"] == "pending":
            self.check(term)
            await self._propose("pipeline.run.start", {"id": run_id})
        name = run["pipeline"]
        attempts = 0
        delay = self.retry_min
        last_note: str | None = None
        while True:
            self.check(term)
            try:
                if not procs:
                    procs.extend(await self._open(name, run_id, spec))
                if await self._batch(run_id, term, procs):
                    await self._finish(run_id, "success", term)
                    return
                attempts, delay = 0, self.retry_min
                continue
            except PluginFailure as exc:
                if not exc.retryable:
                    await self._finish(run_id, "failure", term, error=exc.message)
                    return
                attempts += 1
                note = f"{exc.code}: {exc.message}"
                log.warning("pipeline run %s: attempt %d/%d failed: %s", run_id, attempts,
                            self.max_attempts, note)
                if attempts >= self.max_attempts:
                    await self._finish(run_id, "failure", term, error=(
                        f"gave up after {attempts} attempts: {note}"))
                    return
            except (ConsensusError, CommandRejected) as exc:
                note = None
                log.info("pipeline run %s: commit failed (%s); re-reading the checkpoint",
                         run_id, exc.message)
            if note is not None and note != last_note and self.leads(term):
                with contextlib.suppress(ConsensusError, CommandRejected):
                    await self._propose("pipeline.run.note",
                                        {"id": run_id, "error": note[:MAX_ERROR_CHARS]})
                    last_note = note
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max)

    async def _open(self, name: str, run_id: str, spec: dict[str, Any]
                    ) -> list[PluginProcess]:
        stages = [("extract", spec["extractor"])]
        stages += [(f"transform{i}", t) for i, t in enumerate(spec["transforms"])]
        stages.append(("load", spec["loader"]))
        opened: list[PluginProcess] = []
        try:
            for label, stage in stages:
                try:
                    self.host.spec(stage["plugin"])
                except LookupError as exc:
                    raise PluginFailure(str(exc), code="bad_config") from None
                opened.append(await self.host.open(
                    stage["plugin"], f"{name}/{run_id[:8]}/{label}", stage["config"],
                    call_timeout=stage.get("timeout_s")))
        except BaseException:
            await self._release(opened)
            raise
        return opened

    async def _batch(self, run_id: str, term: int, procs: list[PluginProcess]) -> bool:
        """One batch; True when the source is exhausted (the run is done)."""
        run, _, cp = self._read(run_id)
        if run is None or run["status"] in FINAL or cp is None:
            raise _Stop("run final")
        extractor, *transforms, loader = procs
        start = cp["cursor"]
        got = await extractor.call("execute", {"checkpoint": start})
        if not isinstance(got, dict) or not isinstance(got.get("rows"), list):
            raise PluginFailure("the extractor answered without rows", code="failed")
        source_rows: list[Any] = got["rows"]
        if not source_rows:
            return True
        end = got.get("cursor")
        rows = source_rows
        for proc in transforms:
            out = await proc.call("execute", {"rows": rows})
            if not isinstance(out, dict) or not isinstance(out.get("rows"), list):
                raise PluginFailure(f"transform {proc.spec.name} answered without rows",
                                    code="failed")
            rows = out["rows"]
        seq = cp["seq"] + 1
        name = run["pipeline"]
        key = batch_key(name, cp["epoch"], seq, start, end)
        if rows:
            self.check(term)
            await loader.call("execute", {"rows": rows, "key": key, "meta": {
                "pipeline": name, "run": run_id, "epoch": cp["epoch"], "batch": seq,
                "from": start, "to": end}})
        self.check(term)
        out = await self._propose("pipeline.checkpoint", {
            "pipeline": name, "run": run_id, "epoch": cp["epoch"], "seq": seq,
            "cursor": end, "rows": len(source_rows)})
        if out.get("changed"):
            self.batches.inc()
            self.rows.inc(len(source_rows))
        return bool(got.get("done"))

    async def _finish(self, run_id: str, status: str, term: int, *,
                      error: str | None = None) -> None:
        self.check(term)
        body: dict[str, Any] = {"id": run_id, "status": status}
        if error is not None:
            body["error"] = error[:MAX_ERROR_CHARS]
        out = await self._propose("pipeline.run.finish", body)
        if out.get("changed"):
            self.outcomes.labels(status).inc()
            log.info("pipeline run %s: %s%s", run_id, status, f" ({error})" if error else "")

    # -- schedules ---------------------------------------------------------------------------

    async def run_for_fire(self, action: dict[str, Any], fire: Any) -> dict[str, Any]:
        """The timer hook for ``{type: "pipeline", name}``: starts a run whose id is
        derived from the fire. A run of the pipeline still in progress is not doubled:
        the fire is recorded as done with ``skipped`` set."""
        body = {"id": schedule_run_id(fire.key), "pipeline": action["name"],
                "source": {"schedule": fire.schedule_id, "fire_time": fire.fire_time_ms}}
        try:
            return await self._propose("pipeline.run.create", body)
        except CommandRejected as exc:
            if exc.code == "run_active":
                log.info("schedule %s: pipeline %s is still running; fire skipped",
                         fire.schedule_id, action["name"])
                return {"skipped": exc.message}
            raise
