"""Conversions from the hub's domain types to protobuf messages, shared by every edge.

The gRPC servicers (hub/server.py) and the MQTT bridge (hub/mqtt.py) both send desired states,
versions and rollout states; they convert here, once, and neither edge imports the other.
"""

from __future__ import annotations

from typing import Any

from hub.registry import Desired, VersionRow
from protos import fleet_pb2 as pb


def desired_to_proto(
    revision: int, desired: list[Desired], jobs: list[dict[str, Any]] | None = None
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
            )
            for d in desired
        ],
        jobs=[pb.JobSpec(**spec) for spec in (jobs or [])],
    )


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


def rollout_to_proto(r: Any, now: float) -> pb.RolloutStatus:
    d = r.summary(now)
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
    )
    ev = d["last_evaluation"]
    if ev:
        status.last_evaluation.CopyFrom(
            pb.GateEvaluation(
                wave=ev["wave"],
                at=ev["at"],
                canary_requests=ev["canary_requests"],
                baseline_requests=ev["baseline_requests"],
                gates=[
                    pb.GateValue(
                        gate=g["gate"], value=g.get("value"), ok=g.get("ok"), note=g.get("note", "")
                    )
                    for g in ev["gates"]
                ],
            )
        )
    return status
