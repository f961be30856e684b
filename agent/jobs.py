"""Scheduled batch jobs on the agent: APScheduler triggers, batch.engine does the scoring.

Jobs come with the desired state (so they survive restarts with it) and score with the model
version this agent has verified and loaded: the job's pinned version, or the active one for
``--deployed`` jobs. One instance per job at a time; missed runs are coalesced into one run
within the misfire grace time. Scoring threads are capped so online serving keeps its cores.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from modelfleet.agent.slots import SlotManager
from modelfleet.kernel.errors import InvalidRequestError, ModelfleetError, ModelNotFoundError
from modelfleet.kernel.jobs import JobRun, JobSpec
from modelfleet.kernel.schedule import trigger_for

log = logging.getLogger(__name__)


Reporter = Callable[[JobRun], Awaitable[None]]


def _under(path: Path, roots: Sequence[Path]) -> Path | None:
    for root in roots:
        if path.is_relative_to(root):
            return root
    return None


class JobRunner:
    def __init__(
        self,
        slots: SlotManager,
        report: Reporter,
        *,
        threads: int = 1,
        misfire_s: int = 300,
        private: Sequence[Path] = (),
    ) -> None:
        self.slots = slots
        # The agent's own folders (its key, capture files and capture.key): a job comes from
        # the hub, written by an operator, who may not read them (only admins see captured
        # data) and whose run errors any viewer reads.
        self.private = [Path(p).resolve() for p in private]
        self.report = report
        self.threads = threads
        self.misfire_s = misfire_s
        self.scheduler = AsyncIOScheduler()
        self.specs: dict[str, JobSpec] = {}
        self.running: set[str] = set()

    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def apply(self, jobs: list[JobSpec]) -> None:
        """Level-triggered: make the scheduler hold exactly these jobs."""
        wanted = {j.name: j for j in jobs}
        for name in list(self.specs):
            if name not in wanted:
                self._remove(name)
        for name, spec in wanted.items():
            old = self.specs.get(name)
            if old == spec:
                continue
            run_now = old is not None and spec.run_now != old.run_now
            self._remove(name)
            self.specs[name] = spec
            if not spec.paused:
                try:
                    self.scheduler.add_job(
                        self._fire,
                        trigger_for(spec.schedule),
                        args=[name],
                        id=name,
                        coalesce=True,
                        max_instances=1,
                        misfire_grace_time=self.misfire_s,
                    )
                except ModelfleetError as exc:
                    log.warning("job %s not scheduled: %s", name, exc)
                    continue
            log.info(
                "job %s scheduled (%s)%s", name, spec.schedule, " [paused]" if spec.paused else ""
            )
            if run_now:
                asyncio.get_running_loop().create_task(self._fire(name))

    def _remove(self, name: str) -> None:
        self.specs.pop(name, None)
        if self.scheduler.get_job(name) is not None:
            self.scheduler.remove_job(name)

    def _check_paths(self, spec: JobSpec) -> None:
        """Refuse a job whose input files (a folder is searched recursively, a glob expanded:
        each file is checked) or output folder lie in the agent's own folders."""
        from modelfleet.batch.source import find_files

        found = [(f"input file {f}", f) for f in find_files(spec.input)]
        for what, path in [*found, ("output", Path(spec.output).resolve())]:
            root = _under(path, self.private)
            if root is not None:
                raise InvalidRequestError(
                    f"job {spec.name}: its {what} is in this agent's own folder {root} (its "
                    "keys and captured data), which jobs may not use: point the job at data "
                    "elsewhere"
                )

    def _bundle_for(self, spec: JobSpec) -> tuple[str, int]:
        slot = self.slots.slots.get(spec.model)
        if slot is None or not slot.loaded():
            raise ModelNotFoundError(f"model {spec.model!r} is not loaded on this agent")
        if spec.version == 0:
            if slot.active is None:
                raise ModelNotFoundError(f"model {spec.model!r} has no active version")
            chosen = slot.active
        else:
            match = [v for v in slot.loaded() if v.version == spec.version]
            if not match:
                raise ModelNotFoundError(
                    f"model {spec.model!r} version {spec.version} is not loaded here"
                )
            chosen = match[0]
        return str(chosen.bundle.path), chosen.version

    async def _fire(self, name: str) -> None:
        spec = self.specs.get(name)
        if spec is None or name in self.running:
            return  # one instance at a time, also for run-now during a scheduled run
        self.running.add(name)
        started = time.time()
        result = JobRun(
            name, uuid.uuid4().hex[:12], spec.model, spec.version, "failed", started_at=started
        )
        try:
            await asyncio.to_thread(self._check_paths, spec)
            bundle, version = self._bundle_for(spec)
            result.version = version
            summary = await asyncio.to_thread(self._score, spec, bundle, result.run_id)
            result.status = "succeeded"
            result.rows_in = summary.rows_in
            result.rows_out = summary.rows_out
            result.rows_rejected = summary.rows_rejected
        except ModelfleetError as exc:
            result.error = str(exc)
        except Exception as exc:  # the scheduler must survive any job failure
            log.exception("job %s crashed", name)
            result.error = f"internal: {exc}"
        finally:
            self.running.discard(name)
        result.finished_at = time.time()
        result.duration_s = result.finished_at - started
        log.info(
            "job %s run %s %s: %d rows in, %d out (%.2fs)%s",
            name,
            result.run_id,
            result.status,
            result.rows_in,
            result.rows_out,
            result.duration_s,
            f": {result.error}" if result.error else "",
        )
        try:
            await self.report(result)
        except Exception:
            log.warning("job %s: run report not delivered", name)

    def _score(self, spec: JobSpec, bundle: str, run_id: str) -> Any:
        from modelfleet.batch.engine import ScoreConfig, score

        return score(
            ScoreConfig(
                model=bundle,
                input=spec.input,
                output=spec.output,
                sql=spec.sql or None,
                threads=self.threads,
                run_id=run_id,
                progress=False,
                keys=tuple(k for k in spec.keys.split(",") if k),
            )
        )
