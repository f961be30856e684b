"""``fleet.v1`` messages <-> the control plane's domain types, for every adapter's edge.

One place, so the gRPC and MQTT adapters cannot drift apart: both carry the same messages.
"""

from __future__ import annotations

from modelfleet.agent.fleet.controlplane import DesiredModel, DesiredState
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
                m.capture_rate_bp,
                tuple(m.capture_exclude),
                tuple(m.capture_hash),
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
