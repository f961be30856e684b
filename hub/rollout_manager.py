"""The I/O shell around :mod:`hub.rollouts`: observations from the registry and telemetry,
assignments into desired state, durable state in SQLite, a timer that drives it all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from modelfleet.hub.judge import AgentWindow
from modelfleet.hub.registry import selector_matches
from modelfleet.hub.rollouts import ACTIVE_STATES, AgentFacts, Rollout, Spec, Stats, check_target
from modelfleet.kernel import tracing
from modelfleet.kernel.errors import (
    TRANSIENT_REASONS,
    InvalidRequestError,
    ModelfleetError,
    ModelNotFoundError,
)
from modelfleet.kernel.reports import AgentReport, ModelReport

log = logging.getLogger(__name__)


class FleetObserver:
    """What the fleet says right now, read once per tick."""

    def __init__(self, core: Any, model: str) -> None:
        self.core = core
        self.model = model
        self.reports: dict[str, ModelReport] = {}
        for agent in core.registry.agents():
            report: AgentReport = agent.report
            for m in report.models:
                if m.name == model:
                    self.reports[agent.agent_id] = m

    def active_version(self, agent_id: str) -> int | None:
        m = self.reports.get(agent_id)
        return m.active_version or None if m else None

    def refusal(self, agent_id: str, version: int) -> str | None:
        m = self.reports.get(agent_id)
        if not m:
            return None
        if m.gate_version == version and not m.gate_passed:
            return f"health gate ({m.gate_kind or '?'}): {m.gate_reason}"
        # Transport or local-disk trouble is not a verdict on the version; time will tell
        # (agent timeout). Classified by the reported reason, never by the words.
        if m.error and m.desired_version == version and m.error_reason not in TRANSIENT_REASONS:
            return m.error
        return None

    def prepared(self, agent_id: str, version: int) -> bool:
        m = self.reports.get(agent_id)
        return m is not None and m.previous_version == version

    def stats(self, version: int, agents: Collection[str], since: float, until: float) -> Stats:
        store = getattr(self.core, "telemetry", None)
        if store is None or not agents:
            return Stats()
        rows = store.window(self.model, version, list(agents), since, until)
        if not rows:
            return Stats()
        s = rows[0]

        def ms(v: float) -> float:
            # No successful request means no latency sample: the error-rate gate judges that.
            return 0.0 if math.isnan(v) else v

        return Stats(s.requests, s.failures, ms(s.p50_ms), ms(s.p95_ms), ms(s.p99_ms))

    def samples(
        self, version: int, agents: Collection[str], since: float, until: float
    ) -> Sequence[AgentWindow]:
        store = getattr(self.core, "telemetry", None)
        if store is None or not agents:
            return []
        result: list[AgentWindow] = store.samples(self.model, version, list(agents), since, until)
        return result

    def accuracy(self, version: int, since: float) -> tuple[int, float | None]:
        outcomes = getattr(self.core, "outcomes", None)
        if outcomes is None:
            return 0, None
        q = outcomes.accuracy(self.model, since=since).version(version)
        if q is None or q.accuracy is None:
            return (q.labelled if q is not None else 0), None
        return q.labelled, q.accuracy.value

    def accuracy_baseline(self) -> float | None:
        outcomes = getattr(self.core, "outcomes", None)
        return outcomes.store.baseline(self.model) if outcomes is not None else None

    def paired_samples(
        self,
        version: int,
        baseline_version: int,
        agents: Collection[str],
        since: float,
        until: float,
    ) -> tuple[Sequence[AgentWindow], Sequence[AgentWindow]]:
        store = getattr(self.core, "telemetry", None)
        if store is None or not agents:
            return [], []
        pairs: tuple[list[AgentWindow], list[AgentWindow]] = store.paired_samples(
            self.model, version, [baseline_version], list(agents), since, until
        )
        return pairs


class _StepTrace:
    """Spans for what one step of a rollout did (tracing on only): a wave started, an
    evaluation and its verdict, a rollback, completion. Under the operator's span when a
    command took the step; the timer's steps are traces of their own."""

    def __init__(self, r: Rollout, state_before: str) -> None:
        self.state, self.wave = state_before, r.wave
        self.evaluations = len(r.gate_values)
        self.start_ns = time.time_ns()

    def record(self, r: Rollout) -> None:
        attrs: dict[str, Any] = {
            tracing.MODEL: r.spec.model,
            tracing.VERSION: r.spec.version,
            "modelfleet.rollout_id": r.id,
        }
        ended = ("rolling_back", "rolled_back")
        for values in r.gate_values[self.evaluations :]:
            if r.state in ended and self.state not in ended:
                verdict = "fail"
            elif r.state == "paused":
                verdict = "inconclusive"
            else:
                verdict = "pass"
            tracing.event(
                "hub.rollout.evaluate",
                self.start_ns,
                {
                    **attrs,
                    "modelfleet.wave": values.get("wave", r.wave + 1),
                    "modelfleet.verdict": verdict,
                    "modelfleet.canary_requests": values.get("canary_requests", 0),
                    "modelfleet.baseline_requests": values.get("baseline_requests", 0),
                },
            )
        if r.state == "switching" and (
            r.wave != self.wave or self.state not in ("switching", "paused")
        ):
            tracing.event(
                "hub.rollout.wave",
                self.start_ns,
                {
                    **attrs,
                    "modelfleet.wave": r.wave + 1,
                    "modelfleet.agents": r.sizes[min(r.wave, len(r.sizes) - 1)],
                },
            )
        if r.state in ended and self.state not in ended:
            tracing.event(
                "hub.rollout.rollback", self.start_ns, {**attrs, "modelfleet.reason": r.reason}
            )
        if r.state == "done" and self.state != "done":
            tracing.event("hub.rollout.done", self.start_ns, attrs)


class RolloutManager:
    def __init__(self, core: Any, clock: Callable[[], float] = time.time) -> None:
        self.core = core
        self.clock = clock
        self.lock = asyncio.Lock()

    def _load(self, row: dict[str, Any]) -> Rollout:
        return Rollout.from_json(row["data"])

    def _rows(self, model: str) -> list[dict[str, Any]]:
        # Hubs before check_target recorded a start refused for an empty selector as a row
        # without data; it never ran, so it is not shown.
        return [r for r in self.core.registry.rollouts(model) if r["data"]]

    def get(self, model: str, rollout_id: int = 0) -> Rollout:
        rows = self._rows(model)
        if rollout_id:
            rows = [r for r in rows if r["id"] == rollout_id]
        if not rows:
            self.core.registry.versions(model)  # an unknown model says so, with close names
            raise ModelNotFoundError(f"no rollout of {model!r}")
        active = [r for r in rows if r["state"] in ACTIVE_STATES]
        return self._load((active or rows)[-1])

    def history(self, model: str) -> list[Rollout]:
        rows = self._rows(model)
        if not rows:
            self.core.registry.versions(model)  # an unknown model is an error, not "none yet"
        return [self._load(r) for r in rows]

    def facts(self, r: Rollout) -> dict[str, AgentFacts]:
        """Per agent of ``r``: hostname, the version it reports serving, its last error for the
        model (a refused health gate of the rolled-out version counts)."""
        out = {}
        for agent in self.core.registry.agents():
            if agent.agent_id not in r.previous:
                continue
            m = next((m for m in agent.report.models if m.name == r.spec.model), None)
            error = ""
            if m is not None:
                error = m.error
                if not error and m.gate_version == r.spec.version and not m.gate_passed:
                    error = f"health gate ({m.gate_kind or '?'}): {m.gate_reason}"
            out[agent.agent_id] = AgentFacts(
                hostname=agent.hostname,
                active_version=m.active_version if m is not None else 0,
                last_error=error,
            )
        return out

    def active(self) -> list[Rollout]:
        """Every rollout in progress (a row whose start failed holds no state: skipped)."""
        rows = self.core.registry.rollouts(states=ACTIVE_STATES)
        return [self._load(r) for r in rows if r["data"]]

    async def start(self, spec: Spec) -> Rollout:
        async with self.lock:
            reg = self.core.registry
            if reg.rollouts(spec.model, ACTIVE_STATES):
                raise InvalidRequestError(
                    f"{spec.model} already has an active rollout: finish, abort or roll it back"
                )
            row = reg.get_version(spec.model, spec.version)
            if row.stage == "retired":
                raise InvalidRequestError(f"{spec.model} v{spec.version} is retired")
            if not row.signed:
                raise InvalidRequestError(f"{spec.model} v{spec.version} is not signed yet")
            for key in spec.selector:
                if key.startswith("_"):
                    raise InvalidRequestError(f"selector key {key!r} is reserved")
            agents = [
                a
                for a in reg.agents()
                if a.status == "active" and selector_matches(spec.selector, a.labels)
            ]
            previous, current = {}, {}
            for a in agents:
                desired = {d.name: d.version for d in reg.desired_for(a.labels, a.agent_id)}
                previous[a.agent_id] = desired.get(spec.model, 0)
                active = next(
                    (m.active_version for m in a.report.models if m.name == spec.model), 0
                )
                current[a.agent_id] = (previous[a.agent_id], active)
            spec.validate()
            experiments = getattr(self.core, "experiments", None)
            if experiments is not None:
                experiments.check_overlap(
                    spec.model, [a.agent_id for a in agents], f"a rollout of v{spec.version}"
                )
            # Before the rollout gets a row: a refused start leaves nothing in its history.
            check_target(spec, current)
            rollout_id = reg.create_rollout(spec.model, spec.version)
            try:
                r = Rollout.new(
                    rollout_id, spec, [a.agent_id for a in agents], previous, self.clock()
                )
            except InvalidRequestError:
                reg.save_rollout(rollout_id, "rolled_back", {})
                raise
            await self._advance(r)
            log.info(
                "rollout %d of %s v%d started on %d agent(s)",
                r.id,
                spec.model,
                spec.version,
                len(r.agents),
            )
            return r

    async def control(self, model: str, action: str) -> Rollout:
        async with self.lock:
            r = self.get(model)
            state_before = r.state
            now = self.clock()
            if action == "pause":
                r.pause(now)
                assignments: list[tuple[str, int]] = []
            elif action == "resume":
                r.resume(now)
                assignments = []
            elif action in ("abort", "rollback"):
                assignments = r.abort(now, f"{action} by operator")
            elif action == "rollback_now":
                assignments = r.rollback_now(now)
            elif action == "promote":
                assignments = r.promote(now)
            else:
                raise InvalidRequestError(f"unknown rollout action {action!r}")
            await self._apply(r, assignments)
            # The command itself changed the state: save it even if the step changes nothing.
            await self._advance(r, force_save=True, state_before=state_before)
            log.info("rollout %d of %s: %s -> %s", r.id, model, action, r.state)
            return r

    async def _apply(self, r: Rollout, assignments: list[tuple[str, int]]) -> None:
        prepare, r.prepare_out = r.prepare_out, []
        splits, r.split_out = r.split_out, []
        if prepare:
            self.core.registry.deploy_many(r.spec.model, prepare, kind="prepare", rollout_id=r.id)
        # Traffic canary: one prepare row per agent carrying the share (grouped by share, as
        # deploy_many writes one share for all its rows). Before the serve rows: a rollback's
        # serve row of the previous version then supersedes the split.
        by_share: dict[int, list[tuple[str, int]]] = {}
        for agent, version, bp in splits:
            by_share.setdefault(bp, []).append((agent, version))
        for bp, rows in sorted(by_share.items()):
            self.core.registry.deploy_many(
                r.spec.model,
                rows,
                kind="prepare",
                rollout_id=r.id,
                split_bp=bp,
                comparison=f"rollout {r.id}" if bp else "",
            )
        if assignments:
            self.core.registry.deploy_many(r.spec.model, assignments, rollout_id=r.id)
        if prepare or splits or assignments:
            async with self.core.changed:
                self.core.changed.notify_all()

    async def _advance(
        self, r: Rollout, force_save: bool = False, state_before: str | None = None
    ) -> None:
        before = json.dumps(r.to_json(), sort_keys=True)
        state_before = state_before or r.state
        step = _StepTrace(r, state_before) if tracing.current() is not None else None
        outcomes = getattr(self.core, "outcomes", None)
        if outcomes is not None and r.state == "baking" and r.has_accuracy_gates:
            # The join reads captured files: done off the event loop, so the step's own
            # questions are answered from the cache (hub.outcomes).
            await asyncio.to_thread(outcomes.accuracy, r.spec.model, since=r.created_at)
            await asyncio.to_thread(outcomes.accuracy, r.spec.model)
        assignments = r.step(self.clock(), FleetObserver(self.core, r.spec.model))
        changed = bool(r.prepare_out or r.split_out)
        await self._apply(r, assignments)
        if r.state == "done" and state_before != "done":
            # Before the state is saved: a crash in between deploys again on restart (harmless)
            # instead of never.
            await self._make_fleet_default(r)
        after = json.dumps(r.to_json(), sort_keys=True)
        if force_save or changed or after != before or r.state == "pending":
            self.core.registry.save_rollout(r.id, r.state, r.to_json())
            if r.events:
                log.info("rollout %d of %s: %s", r.id, r.spec.model, r.events[-1]["text"])
        if step is not None:
            step.record(r)

    async def _make_fleet_default(self, r: Rollout) -> None:
        """A completed rollout's version becomes the desired version of its selector.

        The waves assigned agents one by one; without this, the last fleet-wide ``deploy``
        would still decide what an agent enrolled later gets (an older, maybe retired, one).
        """
        try:
            self.core.registry.deploy(
                r.spec.model, r.spec.version, r.spec.selector, source="rollout", rollout_id=r.id
            )
        except ModelfleetError as exc:
            log.error(
                "rollout %d of %s v%d is done but could not become the desired version "
                "of its selector %s: %s",
                r.id,
                r.spec.model,
                r.spec.version,
                r.spec.selector,
                exc,
            )
            return
        where = r.spec.selector or "(whole fleet)"
        log.info(
            "rollout %d: %s v%d is now the desired version for selector %s",
            r.id,
            r.spec.model,
            r.spec.version,
            where,
        )
        async with self.core.changed:
            self.core.changed.notify_all()
        # Stages follow the fleet (hub.deployments: the production rule).
        try:
            stages = self.core.deployments.promote_completed(
                r.spec.model, r.spec.version, set(r.previous.values())
            )
        except ModelfleetError as exc:
            stages = f"stages unchanged: {exc}"
        r.note(self.clock(), stages)
        log.info("rollout %d of %s: %s", r.id, r.spec.model, stages)

    async def tick(self) -> None:
        async with self.lock:
            for row in self.core.registry.rollouts(states=ACTIVE_STATES):
                try:
                    await self._advance(self._load(row))
                except Exception:
                    log.exception("rollout %d: step failed; will retry", row["id"])

    async def run(self, stop: asyncio.Event, interval_s: float = 1.0) -> None:
        while not stop.is_set():
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
