"""Scheduled batch jobs, the hub's side: kept in the registry, sent to agents inside their
desired state (the agents schedule and run them, and report runs with their telemetry).

The admin edge converts the messages and calls these methods; nothing here knows gRPC.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace

from modelfleet.hub.ports import RegistryPort
from modelfleet.hub.registry import JobRow, selector_matches
from modelfleet.kernel.errors import InvalidRequestError
from modelfleet.kernel.jobs import JobRun, JobSpec


@dataclass(frozen=True)
class Job:
    spec: JobSpec
    selector: dict[str, str]
    created_at: float
    agents: int  # active agents the selector matches now


class Jobs:
    def __init__(self, registry: RegistryPort, changed: Callable[[], Awaitable[None]]) -> None:
        self.registry = registry
        # Wakes the watch streams and the MQTT bridge: jobs travel in desired state.
        self.changed = changed

    async def create(self, spec: JobSpec, selector: Mapping[str, str]) -> Job:
        # APScheduler is loaded when a job is made, not by every hub start.
        from modelfleet.kernel.schedule import trigger_for

        if not spec.name or not spec.model or not spec.input or not spec.output:
            raise InvalidRequestError("a job needs a name, a model, an input and an output")
        trigger_for(spec.schedule)  # a bad schedule is refused here, not on every agent
        if spec.version:
            self.registry.get_version(spec.model, spec.version)
        self.registry.put_job(spec, dict(selector), create=True)
        await self.changed()
        return self._job(self.registry.job(spec.name))

    async def put(self, spec: JobSpec, selector: Mapping[str, str]) -> Job:
        """Replace an existing job's spec and selector (``apply`` of a state file), checked as
        :meth:`create` checks a new one."""
        from modelfleet.kernel.schedule import trigger_for

        if not spec.name or not spec.model or not spec.input or not spec.output:
            raise InvalidRequestError("a job needs a name, a model, an input and an output")
        trigger_for(spec.schedule)
        if spec.version:
            self.registry.get_version(spec.model, spec.version)
        self.registry.put_job(spec, dict(selector))
        await self.changed()
        return self._job(self.registry.job(spec.name))

    def all_jobs(self) -> list[Job]:
        return [self._job(j) for j in self.registry.jobs()]

    def runs(self, name: str) -> list[JobRun]:
        self.registry.job(name)  # an unknown job is an error, not an empty history
        return self.registry.job_runs(name)

    def record_runs(self, agent_id: str, runs: list[JobRun]) -> None:
        """Runs an agent reported; the agent is the caller's identity, never the report's."""
        for run in runs:
            self.registry.add_job_run(replace(run, agent_id=agent_id))

    async def control(self, name: str, action: str) -> Job:
        """pause, resume, run-now or delete; answers the job as it is now (or was, deleted)."""
        job = self.registry.job(name)
        spec = job.spec
        if action == "delete":
            self.registry.delete_job(name)
            await self.changed()
            return self._job(job)
        if action == "pause":
            spec = replace(spec, paused=True)
        elif action == "resume":
            spec = replace(spec, paused=False)
        elif action == "run-now":
            spec = replace(spec, run_now=spec.run_now + 1)
        else:
            raise InvalidRequestError(f"unknown job action {action!r}")
        self.registry.put_job(spec, job.selector)
        await self.changed()
        return self._job(self.registry.job(name))

    def _job(self, row: JobRow) -> Job:
        agents = sum(
            1
            for a in self.registry.agents()
            if a.status == "active" and selector_matches(row.selector, a.labels)
        )
        return Job(row.spec, row.selector, row.created_at, agents)
