"""Conversions between the hub's domain types and protobuf messages, shared by every edge.

The gRPC servicers (hub/server.py) and the MQTT bridge (hub/mqtt.py) both send desired states,
versions and rollout states and both receive agent reports; they convert here, once, and
neither edge imports the other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from modelfleet.hub.audit import AuditEntry
from modelfleet.hub.backup import BackupFile, BackupSummary
from modelfleet.hub.core import AgentStatus
from modelfleet.hub.deployments import (
    AgentDesired,
    DeploymentDetail,
    DeploymentView,
    DesiredChange,
    RolloutView,
)
from modelfleet.hub.experiments import ExperimentStatus
from modelfleet.hub.jobs import Job
from modelfleet.hub.judge import verdict_to_json
from modelfleet.hub.registry import AdminRow, DeploymentRow, Desired, VersionRow
from modelfleet.hub.rollouts import AgentFacts
from modelfleet.kernel.jobs import JobRun, JobSpec
from modelfleet.kernel.reports import report_to_proto
from modelfleet.protos import fleet_pb2 as pb

if TYPE_CHECKING:
    from modelfleet.hub.statefile import Plan as StatePlanType
    from modelfleet.hub.telemetry import FeatureDrift, WindowStats


def desired_to_proto(
    revision: int, desired: list[Desired], jobs: list[JobSpec] | None = None
) -> pb.DesiredState:
    return pb.DesiredState(
        revision=revision,
        models=[
            pb.DesiredModel(
                name=d.name,
                version=d.version,
                target_path=d.target_path,
                sha256=d.sha256,
                size=d.size,
                prepare_version=d.prepare_version,
                prepare_size=d.prepare_size,
                split_bp=d.split_bp,
                sticky=d.sticky,
                shadow_bp=d.shadow_bp,
                comparison=d.comparison,
                capture_rate_bp=d.capture_rate_bp,
                capture_exclude=list(d.capture_exclude),
                capture_hash=list(d.capture_hash),
            )
            for d in desired
        ],
        jobs=[job_spec_to_proto(spec) for spec in (jobs or [])],
    )


def admin_to_proto(row: AdminRow) -> pb.AdminInfo:
    # Every field but the key binding, which stays on the hub.
    fields = dataclasses.asdict(row)
    del fields["key_sha256"]
    return pb.AdminInfo(**fields)


def audit_entry_to_proto(e: AuditEntry) -> pb.AuditEntry:
    return pb.AuditEntry(**dataclasses.asdict(e))  # the same fields, one to one


def version_to_proto(v: VersionRow) -> pb.ModelVersion:
    return pb.ModelVersion(
        name=v.name,
        version=v.version,
        stage=v.stage,
        sha256=v.sha256,
        size=v.size,
        notes=v.notes,
        created_at=v.created_at,
        same_content_as=v.same_content_as,
        signed=v.signed,
        target_path=v.target_path,
    )


def rollout_to_proto(
    r: Any, now: float, facts: Mapping[str, AgentFacts] | None = None
) -> pb.RolloutStatus:
    """A rollout's status; ``facts`` (per agent, from the fleet) adds the per-agent view."""
    d = r.summary(now, facts)
    status = pb.RolloutStatus(
        id=d["id"],
        model=d["model"],
        version=d["version"],
        state=d["state"],
        wave=d["wave"],
        waves=d["waves"],
        agents=d["agents"],
        assigned=d["assigned"],
        switched=d["switched"],
        prepared=d["prepared"],
        strategy=d["strategy"],
        failed=d["failed"],
        bake_left_s=d["bake_left_s"],
        reason=d["reason"],
        gates=d["gates"],
        events=[pb.RolloutEvent(at=e["at"], text=e["text"]) for e in d["events"]],
        per_agent=[pb.RolloutAgent(**a) for a in d["per_agent"]],
        warnings=d["warnings"],
        selector=d["selector"],
        bake_s=d["bake_s"],
        min_requests=d["min_requests"],
        max_failed_agents=d["max_failed_agents"],
        agent_timeout_s=d["agent_timeout_s"],
        auto_switch=d["auto_switch"],
        allow_downgrade=d["allow_downgrade"],
        judge=d.get("judge", []),
        max_bake_s=d.get("max_bake_s", 0.0),
        traffic=d["traffic"],
        traffic_percent=d["traffic_percent"],
        queued=d["queued"],
        rate_base=d["rate_base"],
        rate_factor=d["rate_factor"],
        rate_max=d["rate_max"],
        abort_failed_pct=d["abort_failed_pct"],
        abort_min_agents=d["abort_min_agents"],
        min_labels=d.get("min_labels", 0),
    )
    ev = d["last_evaluation"]
    if ev:
        status.last_evaluation.CopyFrom(
            pb.GateEvaluation(
                wave=ev["wave"],
                at=ev["at"],
                canary_requests=ev["canary_requests"],
                baseline_requests=ev["baseline_requests"],
                # Evaluations saved before these were recorded read as 0.
                canary_failures=ev.get("canary_failures", 0),
                baseline_failures=ev.get("baseline_failures", 0),
                canary_agents=ev.get("canary_agents", 0),
                baseline_agents=ev.get("baseline_agents", 0),
                baseline_version=ev.get("baseline_version", 0),
                since=ev.get("since", 0.0),
                gates=[
                    pb.GateValue(
                        gate=g["gate"],
                        value=g.get("value"),
                        ok=g.get("ok"),
                        note=g.get("note", ""),
                        canary=g.get("canary"),
                        baseline=g.get("baseline"),
                    )
                    for g in ev["gates"]
                ],
                # Evaluations saved before the judge existed carry none of these.
                verdicts=[verdict_to_proto(v) for v in ev.get("verdicts", [])],
                looks=ev.get("looks", 0),
                final=ev.get("final", True),
                judge_note=ev.get("judge_note", ""),
            )
        )
    return status


def verdict_to_proto(v: Mapping[str, Any]) -> pb.MetricVerdict:
    """A judged metric as saved (hub.judge.verdict_to_json: None where not a number)."""
    return pb.MetricVerdict(
        metric=v["metric"],
        verdict=v["verdict"],
        canary=v.get("canary"),
        baseline=v.get("baseline"),
        effect=v.get("effect"),
        low=v.get("low"),
        high=v.get("high"),
        tolerance=v.get("tolerance", 0.0),
        canary_samples=v.get("canary_samples", 0),
        baseline_samples=v.get("baseline_samples", 0),
        canary_requests=v.get("canary_requests", 0),
        baseline_requests=v.get("baseline_requests", 0),
        looks=v.get("looks", 0),
        unit=v.get("unit", ""),
        why=v.get("why", ""),
    )


def agent_to_proto(s: AgentStatus) -> pb.AgentInfo:
    a = s.agent
    return pb.AgentInfo(
        agent_id=a.agent_id,
        hostname=a.hostname,
        labels=a.labels,
        enrolled_at=a.enrolled_at,
        last_seen=a.last_seen,
        status=a.status,
        report=report_to_proto(a.report),
        desired=desired_to_proto(0, s.desired).models,
        presence=s.presence,
        cert_expires_at=s.cert_expires_at,
        desired_by=[deployment_to_proto(row) for row in s.origins.values()],
    )


def job_spec_from_proto(spec: pb.JobSpec) -> JobSpec:
    return JobSpec(
        name=spec.name,
        model=spec.model,
        version=spec.version,
        schedule=spec.schedule,
        input=spec.input,
        output=spec.output,
        sql=spec.sql,
        paused=spec.paused,
        run_now=spec.run_now,
        keys=spec.keys,
    )


def job_spec_to_proto(spec: JobSpec) -> pb.JobSpec:
    return pb.JobSpec(
        name=spec.name,
        model=spec.model,
        version=spec.version,
        schedule=spec.schedule,
        input=spec.input,
        output=spec.output,
        sql=spec.sql,
        paused=spec.paused,
        run_now=spec.run_now,
        keys=spec.keys,
    )


def job_to_proto(job: Job) -> pb.JobInfo:
    return pb.JobInfo(
        spec=job_spec_to_proto(job.spec),
        selector=job.selector,
        created_at=job.created_at,
        agents=job.agents,
    )


def job_runs_from_reports(reports: Iterable[pb.TelemetryReport]) -> list[JobRun]:
    """The job runs riding in an agent's telemetry (the hub sets agent_id, not the agent)."""
    return [
        JobRun(
            job=r.job,
            run_id=r.run_id,
            model=r.model,
            version=r.version,
            status=r.status,
            rows_in=r.rows_in,
            rows_out=r.rows_out,
            rows_rejected=r.rows_rejected,
            duration_s=r.duration_s,
            error=r.error,
            started_at=r.started_at,
            finished_at=r.finished_at,
        )
        for report in reports
        for r in report.job_runs
    ]


def job_run_to_proto(run: JobRun) -> pb.JobRun:
    return pb.JobRun(
        job=run.job,
        run_id=run.run_id,
        model=run.model,
        version=run.version,
        status=run.status,
        rows_in=run.rows_in,
        rows_out=run.rows_out,
        rows_rejected=run.rows_rejected,
        duration_s=run.duration_s,
        error=run.error,
        started_at=run.started_at,
        finished_at=run.finished_at,
        agent_id=run.agent_id,
    )


def window_stats_to_proto(s: WindowStats) -> pb.VersionMetrics:
    return pb.VersionMetrics(
        model=s.model,
        version=s.version,
        requests=s.requests,
        failures=s.failures,
        request_rate=s.request_rate,
        error_rate=s.error_rate,
        p50_ms=s.p50_ms,
        p95_ms=s.p95_ms,
        p99_ms=s.p99_ms,
        failures_by_reason=s.failures_by_reason,
        agents=s.agents,
    )


def feature_drift_to_proto(f: FeatureDrift) -> pb.FeatureDriftStats:
    msg = pb.FeatureDriftStats(
        version=f.version,
        agent_id=f.agent_id,
        tensor=f.tensor,
        feature=f.feature,
        role=f.role,
        windows=f.windows,
        rows=f.rows,
        psi_max=f.psi_max,
        psi_mean=f.psi_mean,
        psi_last=f.psi_last,
        js_max=f.js_max,
        agents=f.agents,
    )
    if f.ks_max is not None:
        msg.ks_max = f.ks_max
    return msg


def deployment_to_proto(row: DeploymentRow) -> pb.Deployment:
    return pb.Deployment(
        id=row.id,
        model=row.name,
        version=row.version,
        selector=row.labels,
        created_at=row.created_at,
        source=row.source,
        rollout_id=row.rollout_id,
        actor=row.actor,
        agent_id=row.agent_id,
        removed_at=row.removed_at,
        removed_by=row.removed_by,
    )


def _deployment_or_none(row: DeploymentRow | None) -> pb.Deployment | None:
    return deployment_to_proto(row) if row is not None else None


def change_to_proto(c: DesiredChange) -> pb.DesiredChange:
    return pb.DesiredChange(
        agent_id=c.agent_id,
        hostname=c.hostname,
        from_version=c.before,
        to_version=c.after,
        active_version=c.active,
        decided_by=_deployment_or_none(c.decided_by),
    )


def deployment_view_to_proto(v: DeploymentView) -> pb.DeploymentInfo:
    return pb.DeploymentInfo(
        deployment=deployment_to_proto(v.row),
        agents=v.agents,
        deciding=v.deciding,
        per_agent=v.per_agent,
    )


def experiment_to_proto(st: ExperimentStatus) -> pb.ExperimentStatus:
    """An experiment with its arms (``status`` from :meth:`Experiments.status`)."""
    e = st.experiment
    out = pb.ExperimentStatus(
        id=e.id,
        model=e.model,
        candidate=e.candidate,
        selector=e.selector,
        mode=e.mode,
        share_percent=e.share_bp / 100,
        sticky=e.sticky,
        duration_s=e.duration_s,
        state=e.state,
        created_at=e.created_at,
        ends_at=e.ends_at,
        finished_at=e.finished_at,
        reason=e.reason,
        actor=e.actor,
        arms=[
            pb.ExperimentArm(
                arm=a.arm,
                version=a.version,
                requests=a.requests,
                failures=a.failures,
                error_rate=a.error_rate,
                p50_ms=a.p50_ms,
                p95_ms=a.p95_ms,
                p99_ms=a.p99_ms,
                agents=a.agents,
            )
            for a in st.arms
        ],
        verdict=st.verdict,
        agents_in=st.agents_in,
        agents_out=st.agents_out,
        since=st.since,
        until=st.until,
        events=[pb.RolloutEvent(at=x["at"], text=x["text"]) for x in e.events[-20:]],
        judge=e.judge,
        gates=e.gates,
        verdicts=[verdict_to_proto(verdict_to_json(v)) for v in st.verdicts],
        shadow_gates=[
            pb.ShadowGateResult(gate=g.gate, value=g.value, ok=g.ok, why=g.why)
            for g in st.shadow_gates
        ],
    )
    if st.shadow is not None:
        s = st.shadow
        out.shadow.CopyFrom(
            pb.ShadowDivergence(
                available=s.available,
                note=s.note,
                compared=s.compared,
                dropped=s.dropped,
                shadow_failures=s.shadow_failures,
                top1_agreement=s.top1_agreement,
                abs_diff_p50=s.abs_diff_p50,
                abs_diff_p99=s.abs_diff_p99,
                rel_diff_p99=s.rel_diff_p99,
                js_p99=s.js_p99,
                shadow_latency_p99_ms=s.shadow_latency_p99_ms,
            )
        )
    return out


def rollout_view_to_proto(r: RolloutView) -> pb.RolloutInProgress:
    return pb.RolloutInProgress(
        id=r.id,
        model=r.model,
        version=r.version,
        state=r.state,
        selector=r.selector,
        wave=r.wave,
        waves=r.waves,
        assigned=r.assigned,
        agents=r.agents,
        from_versions=r.from_versions,
        new_agents=_deployment_or_none(r.new_agents),
    )


def _agent_desired_to_proto(a: AgentDesired) -> pb.DeploymentAgent:
    return pb.DeploymentAgent(
        agent_id=a.agent_id,
        hostname=a.hostname,
        desired_version=a.desired,
        active_version=a.active,
        decided_by=_deployment_or_none(a.decided_by),
    )


def deployment_detail_to_proto(d: DeploymentDetail) -> pb.DeploymentDetail:
    return pb.DeploymentDetail(
        info=deployment_view_to_proto(d.view),
        agents=[_agent_desired_to_proto(a) for a in d.agents],
        history=[deployment_to_proto(r) for r in d.history],
        rollouts=[rollout_view_to_proto(r) for r in d.rollouts],
    )


def backup_item_to_proto(item: BackupFile | bytes | BackupSummary) -> pb.BackupChunk:
    if isinstance(item, BackupFile):
        return pb.BackupChunk(
            file=pb.BackupFile(path=item.path, size=item.size, sha256=item.sha256)
        )
    if isinstance(item, BackupSummary):
        return pb.BackupChunk(
            summary=pb.BackupSummary(
                created_at=item.created_at,
                hub=item.hub,
                tuf_versions=item.tuf_versions,
                models=item.models,
                versions=item.versions,
                agents=item.agents,
                blobs=item.blobs,
                files=item.files,
                bytes=item.bytes,
                pause_ms=item.pause_ms,
            )
        )
    return pb.BackupChunk(data=item)


def backup_item_from_proto(chunk: pb.BackupChunk) -> BackupFile | bytes | BackupSummary:
    kind = chunk.WhichOneof("kind")
    if kind == "file":
        return BackupFile(chunk.file.path, chunk.file.size, chunk.file.sha256)
    if kind == "summary":
        s = chunk.summary
        return BackupSummary(
            created_at=s.created_at,
            hub=s.hub,
            tuf_versions=dict(s.tuf_versions),
            models=s.models,
            versions=s.versions,
            agents=s.agents,
            blobs=s.blobs,
            files=s.files,
            bytes=s.bytes,
            pause_ms=s.pause_ms,
        )
    return bytes(chunk.data)


# -- desired state as code (hub/statefile.py) ----------------------------------------------------


def state_plan_to_proto(plan: StatePlanType) -> pb.StatePlan:
    return pb.StatePlan(
        problems=[
            pb.StateProblem(where=p.where, line=p.line, message=p.message) for p in plan.problems
        ],
        deployments=[
            pb.StateDeploymentAction(
                entry=a.entry,
                line=a.line,
                model=a.model,
                selector=a.selector,
                version=a.version,
                strategy=a.strategy,
                action=a.action,
                reason=a.reason,
                current_version=a.current,
                changes=[change_to_proto(c) for c in a.changes],
                rollout_id=a.rollout_id,
                revision=a.revision,
            )
            for a in plan.deployments
        ],
        jobs=[
            pb.StateJobAction(
                entry=j.entry,
                line=j.line,
                name=j.name,
                action=j.action,
                reason=j.reason,
                fields=j.fields,
            )
            for j in plan.jobs
        ],
        applied=plan.applied,
        changes=plan.changes,
    )
