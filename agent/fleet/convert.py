"""``fleet.v1`` messages <-> the control plane's domain types, for every adapter's edge.

One place, so the gRPC and MQTT adapters cannot drift apart: both carry the same messages.
"""

from __future__ import annotations

from modelfleet.agent.fleet.controlplane import AgentReport, DesiredModel, DesiredState
from modelfleet.kernel.jobs import JobSpec
from modelfleet.protos import fleet_pb2 as pb


def desired_state(message: pb.DesiredState) -> DesiredState:
    return DesiredState(
        revision=message.revision,
        models=[
            DesiredModel(
                m.name,
                m.version,
                m.target_path,
                m.sha256,
                m.size,
                m.prepare_version,
                m.prepare_size,
                m.split_bp,
                m.sticky,
                m.shadow_bp,
                m.comparison,
            )
            for m in message.models
        ],
        jobs=[
            JobSpec(
                j.name,
                j.model,
                j.version,
                j.schedule,
                j.input,
                j.output,
                j.sql,
                j.paused,
                j.run_now,
                j.keys,
            )
            for j in message.jobs
        ],
    )


def agent_report(report: AgentReport) -> pb.AgentReport:
    return pb.AgentReport(
        models=[
            pb.ModelReport(
                name=m.name,
                active_version=m.active_version,
                previous_version=m.previous_version,
                loading_version=m.loading_version,
                desired_version=m.desired_version,
                gate_version=m.gate_version,
                gate_passed=m.gate_passed,
                gate_kind=m.gate_kind,
                gate_reason=m.gate_reason,
                error=m.error,
                error_reason=m.error_reason,
            )
            for m in report.models
        ],
        last_error=report.last_error,
        desired_revision=report.desired_revision,
        cache_bytes=report.cache_bytes,
        disk_free_bytes=report.disk_free_bytes,
        agent_version=report.agent_version,
        inference_address=report.inference_address,
        cert_expires_at=report.cert_expires_at,
    )
