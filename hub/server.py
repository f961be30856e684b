"""gRPC edge of the hub: identity from the client certificate, conversion, one error mapping."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from modelfleet.hub.convert import (
    admin_to_proto,
    agent_to_proto,
    audit_entry_to_proto,
    backup_item_to_proto,
    change_to_proto,
    deployment_detail_to_proto,
    deployment_to_proto,
    deployment_view_to_proto,
    desired_to_proto,
    experiment_to_proto,
    feature_drift_to_proto,
    job_run_to_proto,
    job_runs_from_reports,
    job_spec_from_proto,
    job_to_proto,
    rollout_to_proto,
    rollout_view_to_proto,
    state_plan_to_proto,
    version_to_proto,
    window_stats_to_proto,
)
from modelfleet.hub.core import HubCore, PublishResult
from modelfleet.hub.governance import ADMIN, BUILT_IN
from modelfleet.hub.registry import PermissionDeniedError
from modelfleet.kernel import tracing
from modelfleet.kernel.errors import EXIT_CODES, InvalidRequestError, ModelfleetError
from modelfleet.kernel.grpc_status import GRPC_CODES
from modelfleet.kernel.identity import (
    IdentityError,
    admin_common_name,
    load_certificate,
    parse_identity,
)
from modelfleet.kernel.reports import report_from_proto
from modelfleet.protos import fleet_pb2 as pb
from modelfleet.protos import fleet_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

assert set(EXIT_CODES) == set(GRPC_CODES)

CHUNK = 1 << 20


def caller(context: grpc.aio.ServicerContext, kind: str) -> str:
    """The authenticated identity of the peer, which must be of ``kind`` (agent or admin)."""
    names = context.auth_context().get("x509_common_name") or []
    if not names:
        raise PermissionDeniedError("a client certificate issued by the hub's CA is required")
    try:
        got_kind, name = parse_identity(names[0].decode())
    except IdentityError as exc:
        raise PermissionDeniedError(str(exc)) from None
    if got_kind != kind:
        raise PermissionDeniedError(f"{got_kind} identities may not call this method")
    return name


def _carrier(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The admin CLI's W3C trace context (TRACEPARENT in its environment), if it sent one."""
    return tracing.carrier_of(context.invocation_metadata())


def _selector(selector: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(dict(selector).items()))


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, ModelfleetError):
        await context.abort(GRPC_CODES[exc.status], str(exc))
    log.exception("unexpected error", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")


def unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except Exception as exc:
            await _abort(context, exc)

    return wrapper


def streaming(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async for item in fn(self, request, context):
                yield item
        except Exception as exc:
            await _abort(context, exc)

    return wrapper


class FleetServicer(pb_grpc.FleetServicer):
    def __init__(self, core: HubCore) -> None:
        self.core = core

    @unary
    async def Enroll(self, request, context):
        agent_id, cert, labels = self.core.enroll(
            request.token_id, request.secret, request.csr_pem, request.hostname
        )
        return pb.EnrollResponse(
            agent_id=agent_id,
            certificate_pem=cert,
            ca_pem=self.core.ca.cert_pem,
            tuf_root=self.core.tuf.root_bytes(),
            hub_address=self.core.advertise,
            labels=labels,
            mqtt_address=self.core.cfg.advertise_mqtt or self.core.cfg.mqtt,
        )

    @streaming
    async def WatchDesired(self, request, context):
        agent_id = caller(context, "agent")
        last: pb.DesiredState | None = None
        while not self.core.closing:
            state = desired_to_proto(*self.core.watch(agent_id))
            if (
                last is None
                or list(state.models) != list(last.models)
                or list(state.jobs) != list(last.jobs)
            ):
                yield state
                last = state
            # Wake up on any deployment; otherwise re-check now and then so a revoked agent's
            # stream ends and last_seen stays fresh.
            await self.core.wait_changed(10)

    @unary
    async def ReportState(self, request, context):
        agent_id = caller(context, "agent")
        self.core.authorize_agent(agent_id)
        self.core.report(agent_id, report_from_proto(request))
        return pb.ReportAck()

    @streaming
    async def FetchMetadata(self, request, context):
        self.core.authorize_agent(caller(context, "agent"))
        data = self.core.metadata(request.path)
        yield pb.Chunk(data=data, total_size=len(data))

    @streaming
    async def FetchTarget(self, request, context):
        self.core.authorize_agent(caller(context, "agent"))
        size, chunks = self.core.target_chunks(request.path, request.offset)
        rate = self.core.cfg.transfer_rate_limit_mbps * 1e6
        started, sent, first = time.monotonic(), 0, True
        it = iter(chunks)
        while True:
            block = await asyncio.to_thread(next, it, None)
            if block is None:
                return
            yield pb.Chunk(data=block, total_size=size if first else 0)
            first = False
            sent += len(block)
            if rate > 0:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)

    @unary
    async def RenewCertificate(self, request, context):
        agent_id = caller(context, "agent")
        (peer,) = context.auth_context().get("x509_pem_cert") or [b""]
        cert = self.core.renew_certificate(agent_id, request.csr_pem, peer)
        return pb.RenewCertificateResponse(certificate_pem=cert, ca_pem=self.core.ca.cert_pem)

    @unary
    async def ReportTelemetry(self, request, context):
        agent_id = caller(context, "agent")
        self.core.authorize_agent(agent_id)
        # Acked only once stored (a replay is acked without being stored again).
        acked = await self.core.ingest_telemetry(
            agent_id, request.reports, job_runs_from_reports(request.reports)
        )
        return pb.TelemetryAck(acked=acked)


class JobServicerMixin:
    """HubAdmin's scheduled-job methods (the jobs core is hub.jobs)."""

    core: HubCore

    @unary
    async def CreateJob(self, request, context):
        caller(context, "admin")
        job = await self.core.jobs.create(job_spec_from_proto(request.spec), dict(request.selector))
        return job_to_proto(job)

    @unary
    async def ListJobs(self, request, context):
        caller(context, "admin")
        return pb.ListJobsResponse(jobs=[job_to_proto(j) for j in self.core.jobs.all_jobs()])

    @unary
    async def JobRuns(self, request, context):
        caller(context, "admin")
        runs = [job_run_to_proto(r) for r in self.core.jobs.runs(request.name)]
        return pb.JobRunsResponse(runs=runs)

    @unary
    async def ControlJob(self, request, context):
        caller(context, "admin")
        return job_to_proto(await self.core.jobs.control(request.name, request.action))


class RolloutServicerMixin:
    """HubAdmin's rollout methods; the engine lives in hub.rollouts / hub.rollout_manager."""

    core: HubCore

    @unary
    async def StartRollout(self, request, context):
        from modelfleet.hub.judge import DEFAULT_JUDGE
        from modelfleet.hub.rollouts import DEFAULT_MIN_LABELS, Spec

        caller(context, "admin")
        spec = Spec(
            model=request.model,
            version=request.version,
            selector=dict(request.selector),
            waves=list(request.waves) or ["100%"],
            bake_s=request.bake_s,
            gates=list(request.gates),
            min_requests=request.min_requests,
            max_failed_agents=request.max_failed_agents,
            agent_timeout_s=request.agent_timeout_s or 600.0,
            strategy=request.strategy or "canary",
            auto_switch=request.auto_switch,
            allow_downgrade=request.allow_downgrade,
            # The judge is the default comparison: a client that names no metric gets it.
            judge=[] if request.no_judge else list(request.judge) or list(DEFAULT_JUDGE),
            max_bake_s=request.max_bake_s,
            traffic=list(request.traffic),
            rate_base=request.rate_base,
            rate_factor=request.rate_factor or 2.0,
            rate_max=request.rate_max,
            abort_failed_pct=request.abort_failed_pct,
            abort_min_agents=request.abort_min_agents or 1,
            min_labels=request.min_labels or DEFAULT_MIN_LABELS,
        )
        with tracing.span(
            "hub.rollout.start",
            _carrier(context),
            {
                tracing.MODEL: spec.model,
                tracing.VERSION: spec.version,
                "modelfleet.selector": _selector(spec.selector),
                "modelfleet.strategy": spec.strategy,
            },
        ) as span:
            r = await self.core.rollouts.start(spec)
            span.set_attribute("modelfleet.rollout_id", r.id)
        return rollout_to_proto(r, time.time(), self.core.rollouts.facts(r))

    @unary
    async def GetRollout(self, request, context):
        caller(context, "admin")
        r = self.core.rollouts.get(request.model, request.id)
        return rollout_to_proto(r, time.time(), self.core.rollouts.facts(r))

    @unary
    async def ControlRollout(self, request, context):
        caller(context, "admin")
        with tracing.span(
            f"hub.rollout.{request.action or 'control'}",
            _carrier(context),
            {tracing.MODEL: request.model, "modelfleet.action": request.action},
        ) as span:
            r = await self.core.rollouts.control(request.model, request.action)
            span.set_attribute("modelfleet.rollout_id", r.id)
            span.set_attribute("modelfleet.state", r.state)
        return rollout_to_proto(r, time.time(), self.core.rollouts.facts(r))

    @unary
    async def RolloutHistory(self, request, context):
        caller(context, "admin")
        now = time.time()
        return pb.RolloutHistoryResponse(
            rollouts=[rollout_to_proto(r, now) for r in self.core.rollouts.history(request.model)]
        )


class ExperimentServicerMixin:
    """HubAdmin's experiment methods; the core is hub.experiments (HubCore.experiments)."""

    core: HubCore

    @unary
    async def StartExperiment(self, request, context):
        actor = caller(context, "admin")
        x = self.core.experiments
        with tracing.span(
            "hub.experiment.start",
            _carrier(context),
            {
                tracing.MODEL: request.model,
                tracing.VERSION: request.candidate,
                "modelfleet.selector": _selector(request.selector),
                "modelfleet.split_percent": request.split_percent,
                "modelfleet.shadow_percent": request.shadow_percent,
            },
        ):
            e = await x.start(
                request.model,
                request.candidate,
                dict(request.selector),
                split_percent=request.split_percent,
                shadow_percent=request.shadow_percent,
                sticky=request.sticky,
                duration_s=request.duration_s,
                actor=actor,
                judge_metrics=list(request.judge),
                gates=list(request.gates),
            )
        return experiment_to_proto(x.status(e))

    @unary
    async def GetExperiment(self, request, context):
        caller(context, "admin")
        x = self.core.experiments
        return experiment_to_proto(x.status(x.get(request.model, request.id)))

    @unary
    async def ListExperiments(self, request, context):
        caller(context, "admin")
        x = self.core.experiments
        return pb.ListExperimentsResponse(
            experiments=[experiment_to_proto(x.status(e)) for e in x.ls(request.model)]
        )

    @unary
    async def ControlExperiment(self, request, context):
        actor = caller(context, "admin")
        x = self.core.experiments
        if request.action not in ("stop", "promote"):
            raise InvalidRequestError(
                f"unknown experiment action {request.action!r} (stop or promote)"
            )
        with tracing.span(
            f"hub.experiment.{request.action}",
            _carrier(context),
            {tracing.MODEL: request.model, "modelfleet.experiment_id": request.id},
        ):
            if request.action == "stop":
                e = await x.stop(request.model, request.id, actor)
            else:
                e = await x.promote(request.model, request.id, actor)
        return experiment_to_proto(x.status(e))


class DeploymentServicerMixin:
    """HubAdmin's deployment methods; the core is hub.deployments (HubCore.deployments)."""

    core: HubCore

    @unary
    async def ListDeployments(self, request, context):
        caller(context, "admin")
        deployments, rollouts = self.core.deployments.ls(request.model)
        return pb.ListDeploymentsResponse(
            deployments=[deployment_view_to_proto(v) for v in deployments],
            rollouts=[rollout_view_to_proto(r) for r in rollouts],
        )

    @unary
    async def GetDeployment(self, request, context):
        caller(context, "admin")
        detail = self.core.deployments.show(request.model, dict(request.selector))
        return deployment_detail_to_proto(detail)

    @unary
    async def Undeploy(self, request, context):
        actor = caller(context, "admin")
        outcome = await self.core.deployments.undeploy(
            request.name, dict(request.selector), actor=actor, dry_run=request.dry_run
        )
        return pb.UndeployResponse(
            removed=[deployment_to_proto(r) for r in outcome.removed],
            changes=[change_to_proto(c) for c in outcome.changes],
            revision=outcome.revision,
            dry_run=request.dry_run,
            agents=outcome.matched,
        )


class BackupServicerMixin:
    """HubAdmin.Backup: the hub's state as one consistent copy (hub/backup.py)."""

    core: HubCore

    @streaming
    async def Backup(self, request, context):
        caller(context, "admin")
        async for item in self.core.backup():
            yield backup_item_to_proto(item)


class StateServicerMixin:
    """HubAdmin's desired-state-as-code methods; the core is hub.statefile."""

    core: HubCore

    def _statefiles(self) -> Any:
        from modelfleet.hub.statefile import StateFiles

        c = self.core
        return StateFiles(c.registry, c.deployments, c.rollouts, c.jobs)

    @unary
    async def PlanState(self, request, context):
        caller(context, "admin")
        plan = await self._statefiles().plan(request.document, prune=request.prune)
        return state_plan_to_proto(plan)

    @unary
    async def ApplyState(self, request, context):
        actor = caller(context, "admin")
        plan = await self._statefiles().apply(request.document, prune=request.prune, actor=actor)
        return state_plan_to_proto(plan)

    @unary
    async def ExportState(self, request, context):
        caller(context, "admin")
        from modelfleet.hub.deployments import current
        from modelfleet.hub.statefile import export

        state = self._statefiles().state()
        return pb.ExportStateResponse(
            document=export(state, self.core.advertise),
            deployments=len(current(state.rows, state.retired)),
            jobs=len(state.jobs),
        )


def _publish_response(result: PublishResult) -> pb.PublishResponse:
    return pb.PublishResponse(
        version=version_to_proto(result.version),
        staged_payload=result.staged_payload,
        targets_keyid=result.targets_keyid,
        base_targets=result.base_targets,
    )


class AdminServicer(
    StateServicerMixin,
    BackupServicerMixin,
    JobServicerMixin,
    RolloutServicerMixin,
    ExperimentServicerMixin,
    DeploymentServicerMixin,
    pb_grpc.HubAdminServicer,
):
    def __init__(self, core: HubCore) -> None:
        self.core = core

    @unary
    async def Publish(self, request_iterator, context):
        caller(context, "admin")
        with tracing.span("hub.publish", _carrier(context)) as span:
            result = await self._publish(request_iterator, span)
        return _publish_response(result)

    async def _publish(self, request_iterator: Any, span: Any) -> PublishResult:
        header = None
        path = self.core.new_upload()
        received = 0
        try:
            with open(path, "wb") as out:
                async for chunk in request_iterator:
                    if chunk.HasField("header"):
                        if header is not None:
                            raise InvalidRequestError("publish sent a second header")
                        header = chunk.header
                        span.set_attribute(tracing.MODEL, header.name)
                        self.core.admit_upload(
                            {
                                "name": header.name,
                                "version": header.version,
                                "notes": header.notes,
                                "size": header.size,
                            }
                        )
                        continue
                    if header is None:
                        raise InvalidRequestError("publish must start with a header")
                    received += len(chunk.data)
                    self.core.check_upload_size(received)
                    out.write(chunk.data)
                out.flush()
                import os

                os.fsync(out.fileno())
            if header is None:
                raise InvalidRequestError("publish sent no header")
            hdr = {
                "name": header.name,
                "version": header.version,
                "notes": header.notes,
                "size": header.size,
                "sha256": header.sha256,
            }
            verified = await asyncio.to_thread(self.core.verify_upload, hdr, path)
            result = self.core.register_upload(hdr, verified)
        finally:
            Path(path).unlink(missing_ok=True)
        span.set_attribute(tracing.VERSION, result.version.version)
        span.set_attribute("modelfleet.bytes", received)
        return result

    @unary
    async def CommitTargets(self, request, context):
        caller(context, "admin")
        if not request.signature:
            # No signature yet: answer with what has to be signed (publish, then sign later).
            return _publish_response(self.core.staged_for_signing(request.name, request.version))
        row = self.core.commit_targets(
            request.name, request.version, request.keyid, request.signature, request.signed_payload
        )
        return pb.PublishResponse(version=version_to_proto(row))

    @unary
    async def ListModels(self, request, context):
        caller(context, "admin")
        return pb.ListModelsResponse(
            models=[
                pb.ModelSummary(
                    name=m["name"],
                    latest_version=m["latest"],
                    version_count=m["count"],
                    production_version=m["production"],
                )
                for m in self.core.models()
            ]
        )

    @unary
    async def ListVersions(self, request, context):
        caller(context, "admin")
        rows = self.core.versions(request.name)
        return pb.ListVersionsResponse(versions=[version_to_proto(v) for v in rows])

    @unary
    async def SetStage(self, request, context):
        caller(context, "admin")
        row = await self.core.set_stage(request.name, request.version, request.stage, request.force)
        return version_to_proto(row)

    @unary
    async def Deploy(self, request, context):
        actor = caller(context, "admin")
        with tracing.span(
            "hub.deploy",
            _carrier(context),
            {
                tracing.MODEL: request.name,
                tracing.VERSION: request.version,
                "modelfleet.selector": _selector(request.selector),
                "modelfleet.dry_run": request.dry_run,
            },
        ) as span:
            outcome = await self.core.deployments.deploy(
                request.name,
                request.version,
                dict(request.selector),
                actor=actor,
                dry_run=request.dry_run,
                allow_empty=request.allow_empty,
            )
            span.set_attribute("modelfleet.agents", outcome.matched)
        return pb.DeployResponse(
            agents=outcome.matched,
            revision=outcome.revision,
            changes=[change_to_proto(c) for c in outcome.changes],
            dry_run=request.dry_run,
            notes=outcome.notes,
        )

    @unary
    async def CreateToken(self, request, context):
        caller(context, "admin")
        token = self.core.create_token(dict(request.labels), request.ttl_seconds or 3600)
        return pb.CreateTokenResponse(
            token=token.encode(), token_id=token.token_id, expires_at=token.expires_at
        )

    @unary
    async def ListAgents(self, request, context):
        caller(context, "admin")
        return pb.ListAgentsResponse(
            agents=[agent_to_proto(a) for a in self.core.list_agents()],
            rollouts=[rollout_view_to_proto(r) for r in self.core.deployments.active_rollouts()],
        )

    @unary
    async def RevokeAgent(self, request, context):
        caller(context, "admin")
        await self.core.revoke(request.agent_id)
        return pb.RevokeAgentResponse()

    @unary
    async def Drift(self, request, context):
        caller(context, "admin")
        stats, window = await self.core.drift(
            request.model,
            request.version,
            request.agent_id,
            dict(request.selector),
            request.since_s,
        )
        return pb.DriftResponse(
            fleet=[feature_drift_to_proto(f) for f in stats if not f.agent_id],
            agents=[feature_drift_to_proto(f) for f in stats if f.agent_id],
            window_s=window,
        )

    @unary
    async def AddAdmin(self, request, context):
        actor = caller(context, "admin")
        admins = self.core.admins
        admins.check_new(request.name, request.role, request.replace)
        cert_pem = self.core.ca.sign_csr(bytes(request.csr_pem), admin_common_name(request.name))
        cert = load_certificate(cert_pem)
        row = admins.add(
            request.name,
            request.role,
            cert.public_key(),
            cert.not_valid_after_utc.timestamp(),
            f"admin:{actor}",
            request.replace,
        )
        log.info("admin:%s added with the %s role by admin:%s", row.name, row.role, actor)
        return pb.AddAdminResponse(
            certificate_pem=cert_pem,
            ca_pem=self.core.ca.cert_pem,
            hub_address=self.core.advertise,
            admin=admin_to_proto(row),
        )

    @unary
    async def ListAdmins(self, request, context):
        caller(context, "admin")
        own = pb.AdminInfo(name=BUILT_IN, role=ADMIN, status="active", created_by="hub")
        return pb.ListAdminsResponse(
            admins=[own, *(admin_to_proto(r) for r in self.core.admins.all())]
        )

    @unary
    async def SetAdminRole(self, request, context):
        actor = caller(context, "admin")
        row = self.core.admins.set_role(request.name, request.role, f"admin:{actor}")
        log.info("admin:%s now has the %s role (by admin:%s)", row.name, row.role, actor)
        return admin_to_proto(row)

    @unary
    async def RevokeAdmin(self, request, context):
        actor = caller(context, "admin")
        row = self.core.admins.revoke(request.name, f"admin:{actor}")
        log.info("admin:%s revoked by admin:%s", row.name, actor)
        return admin_to_proto(row)

    @unary
    async def ListAudit(self, request, context):
        caller(context, "admin")
        entries = self.core.audit.query(
            since=request.since,
            identity=request.identity,
            method=request.method,
            failed_only=request.failed_only,
            limit=request.limit,
        )
        return pb.ListAuditResponse(entries=[audit_entry_to_proto(e) for e in entries])

    @unary
    async def Metrics(self, request, context):
        caller(context, "admin")
        stats, window = await self.core.metrics(
            request.model, request.version, request.agent_id, request.since_s
        )
        return pb.MetricsResponse(
            versions=[window_stats_to_proto(s) for s in stats], window_s=window
        )
