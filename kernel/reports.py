"""What an agent reports about itself: one typed report for both ends, and its wire form.

The agent builds an :class:`AgentReport` (agent/fleet/sync.py) and each control-plane adapter
sends it with :func:`report_to_proto`; each hub edge (the gRPC ReportState, the MQTT bridge)
reads it back with :func:`report_from_proto`, so the registry, the rollout engine and
ListAgents read fields, never protobuf names. One definition keeps the two ends from drifting:
a field added here reaches both, and the round-trip test in tests/test_hub_edges.py covers it.
The hub's registry stores the JSON of :meth:`AgentReport.to_json` and reads it back with
:meth:`AgentReport.from_json`, the one place that knows that layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from modelfleet.protos import fleet_pb2 as pb


@dataclass(frozen=True)
class ModelReport:
    name: str
    active_version: int = 0
    previous_version: int = 0
    loading_version: int = 0
    desired_version: int = 0
    # The last health-gate verdict on this model.
    gate_version: int = 0
    gate_passed: bool = False
    gate_kind: str = ""
    gate_reason: str = ""
    # Why the desired version is not active, in words, and the error family's reason for
    # classifying it ("verification", "unreachable", ...): the hub reads only the reason.
    error: str = ""
    error_reason: str = ""
    # The onnxruntime execution provider the active version serves on (docs/gpu.md).
    active_provider: str = ""


@dataclass(frozen=True)
class AgentReport:
    models: tuple[ModelReport, ...] = ()
    last_error: str = ""
    desired_revision: int = 0
    cache_bytes: int = 0
    disk_free_bytes: int = 0
    agent_version: str = ""
    inference_address: str = ""
    cert_expires_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "models": [asdict(m) for m in self.models]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AgentReport:
        """Read what :meth:`to_json` wrote, and the rows hubs before typed reports stored
        (``MessageToDict``: 64-bit integers as strings, default values left out)."""
        return cls(
            models=tuple(
                ModelReport(
                    name=str(m.get("name", "")),
                    active_version=_int(m.get("active_version")),
                    previous_version=_int(m.get("previous_version")),
                    loading_version=_int(m.get("loading_version")),
                    desired_version=_int(m.get("desired_version")),
                    gate_version=_int(m.get("gate_version")),
                    gate_passed=bool(m.get("gate_passed", False)),
                    gate_kind=str(m.get("gate_kind", "")),
                    gate_reason=str(m.get("gate_reason", "")),
                    error=str(m.get("error", "")),
                    error_reason=str(m.get("error_reason", "")),
                    active_provider=str(m.get("active_provider", "")),
                )
                for m in data.get("models", [])
            ),
            last_error=str(data.get("last_error", "")),
            desired_revision=_int(data.get("desired_revision")),
            cache_bytes=_int(data.get("cache_bytes")),
            disk_free_bytes=_int(data.get("disk_free_bytes")),
            agent_version=str(data.get("agent_version", "")),
            inference_address=str(data.get("inference_address", "")),
            cert_expires_at=float(data.get("cert_expires_at", 0.0) or 0.0),
        )


def report_from_proto(m: pb.AgentReport) -> AgentReport:
    return AgentReport(
        models=tuple(
            ModelReport(
                name=r.name,
                active_version=r.active_version,
                previous_version=r.previous_version,
                loading_version=r.loading_version,
                desired_version=r.desired_version,
                gate_version=r.gate_version,
                gate_passed=r.gate_passed,
                gate_kind=r.gate_kind,
                gate_reason=r.gate_reason,
                error=r.error,
                error_reason=r.error_reason,
                active_provider=r.active_provider,
            )
            for r in m.models
        ),
        last_error=m.last_error,
        desired_revision=m.desired_revision,
        cache_bytes=m.cache_bytes,
        disk_free_bytes=m.disk_free_bytes,
        agent_version=m.agent_version,
        inference_address=m.inference_address,
        cert_expires_at=m.cert_expires_at,
    )


def report_to_proto(r: AgentReport) -> pb.AgentReport:
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
                active_provider=m.active_provider,
            )
            for m in r.models
        ],
        last_error=r.last_error,
        desired_revision=r.desired_revision,
        cache_bytes=r.cache_bytes,
        disk_free_bytes=r.disk_free_bytes,
        agent_version=r.agent_version,
        inference_address=r.inference_address,
        cert_expires_at=r.cert_expires_at,
    )


# An agent that has not reported yet.
NO_REPORT = AgentReport()


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0
