"""The agent's port to the hub: what reconciliation needs, whatever carries it.

:class:`ControlPlane` is everything fleet mode asks of the hub: follow the desired state, send
state reports and telemetry, renew the certificate, and fetch TUF metadata and bundle bytes.
``FleetSync`` (agent/fleet/sync.py) holds one and never asks which transport it is. The
adapters are ``GrpcControlPlane`` (agent/fleet/grpc_plane.py), ``MqttControlPlane``
(agent/fleet/mqtt_plane.py) and :class:`SplitControlPlane`, which takes the desired state from
one plane and everything else from another (``transport = "both"``: desired state from the
broker, bytes and reports over gRPC). ``connect_control_plane`` in agent/app.py is the one
place that chooses.

What crosses the port is domain types (:class:`DesiredState`, :class:`AgentReport`); each
adapter converts to and from protobuf at its edge (agent/fleet/convert.py). One exception:
telemetry batches stay ``fleet.v1`` messages, because the outbox stores each report as the bytes
it sends (agent/fleet/outbox.py), so a resend after a crash is the same report, byte for byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from modelfleet.kernel.jobs import JobSpec
from modelfleet.kernel.reports import AgentReport, ModelReport
from modelfleet.protos import fleet_pb2 as pb


@dataclass(frozen=True)
class DesiredModel:
    name: str
    version: int
    target_path: str = ""
    sha256: str = ""
    size: int = 0
    # Blue/green: a version to load and gate beside the active one, without switching.
    prepare_version: int = 0
    prepare_size: int = 0
    # Live comparison of prepare_version against version (see fleet.proto DesiredModel):
    # basis points of requests answered by it (split) or copied to it (shadow).
    split_bp: int = 0
    sticky: bool = False
    shadow_bp: int = 0
    comparison: str = ""
    # Inference capture (fleet.proto DesiredModel): basis points of requests, and inputs
    # dropped or hashed.
    capture_rate_bp: int = 0
    capture_exclude: tuple[str, ...] = ()
    capture_hash: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # desired.json holds lists: equal states must compare equal after a restart.
        object.__setattr__(self, "capture_exclude", tuple(self.capture_exclude))
        object.__setattr__(self, "capture_hash", tuple(self.capture_hash))


@dataclass(frozen=True)
class CaptureFileInfo:
    """One complete capture file, as the hub names it (agent/fleet/capture_ship.py)."""

    model: str
    file_id: str
    size: int
    sha256: str


@dataclass(frozen=True)
class DesiredState:
    """What the hub wants this agent to run, as of ``revision``."""

    revision: int
    models: list[DesiredModel] = field(default_factory=list)
    jobs: list[JobSpec] = field(default_factory=list)


# Called on the event loop with each desired state received (the full state every time).
OnDesired = Callable[[DesiredState], None]
# Called on the event loop when the hub cannot be reached for the desired state; the text
# starts with "hub:" and is what `agents ls` shows until the next desired state arrives.
OnTrouble = Callable[[str], None]
# Called on the event loop with seqs the hub acknowledged after send_telemetry gave up.
OnLateAcks = Callable[[Sequence[int]], None]


class ControlPlane(Protocol):
    """The hub, as fleet mode sees it. Async methods run on the agent's event loop.

    Errors: ``OSError`` (``ConnectionError``) when the hub cannot be reached, so the caller
    retries later; a ``kernel.errors`` error when the hub refuses.
    """

    async def watch_desired(
        self, on_desired: OnDesired, on_trouble: OnTrouble, stop: asyncio.Event
    ) -> None:
        """Deliver every desired state until ``stop`` is set.

        Reconnects with backoff on its own, and gets the full state again at least every
        ``resync_interval_s`` (a periodic resync repairs anything missed).
        """
        ...

    async def send_report(self, report: AgentReport) -> None:
        """Send one state report; a later one supersedes it."""
        ...

    async def send_final_report(self, report: AgentReport) -> None:
        """The last report before stopping: best effort, bounded to a few seconds, never
        raises."""
        ...

    async def send_telemetry(self, batch: pb.TelemetryBatch) -> Sequence[int]:
        """Send a batch from the outbox; return the seqs the hub acknowledged (stored)."""
        ...

    def set_late_ack_handler(self, handler: OnLateAcks) -> None:
        """Where acknowledgements go that arrive after ``send_telemetry`` stopped waiting."""
        ...

    @property
    def final_telemetry_timeout_s(self) -> float:
        """How long one last telemetry send may take while stopping; 0: none is tried (what
        is not acknowledged waits in the outbox for the next start either way)."""
        ...

    async def renew_certificate(self, csr_pem: bytes) -> bytes:
        """Ask the hub to certify the key in ``csr_pem`` (PEM); returns the certificate PEM,
        which the caller checks before using it (agent/fleet/renew.py)."""
        ...

    async def use_identity(self) -> None:
        """Connections made from now on use the identity on disk (after a renewal); calls in
        flight finish on the old ones."""
        ...

    def fetch_metadata(self, filename: str) -> Iterator[bytes]:
        """The TUF metadata file ``filename``, in chunks. Blocking: the TUF verifier calls it
        on a worker thread (agent/fleet/verify.py, ``Transport``)."""
        ...

    def fetch_target(self, path: str, offset: int) -> Iterator[bytes | memoryview]:
        """Bytes of target ``path`` from ``offset`` to the end, in chunks. Blocking, like
        :meth:`fetch_metadata`."""
        ...

    async def capture_offset(self, file: CaptureFileInfo) -> tuple[int, bool]:
        """(bytes of ``file`` the hub holds, whether it stored the whole file)."""
        ...

    async def upload_capture(
        self, file: CaptureFileInfo, path: Path, offset: int
    ) -> tuple[int, bool]:
        """Send ``path`` from ``offset`` on; the hub's answer as for :meth:`capture_offset`."""
        ...

    async def close(self) -> None:
        """Release every connection (after :meth:`send_final_report`)."""
        ...


class SplitControlPlane:
    """The desired state from one plane, everything else from another.

    ``transport = "both"``: the broker pushes desired states (many agents, one retained message
    each) while bundles, reports, telemetry and renewals go over gRPC. The final report goes
    out over both, as it did before this port existed.
    """

    def __init__(self, desired: ControlPlane, rest: ControlPlane) -> None:
        self.desired = desired
        self.rest = rest

    async def watch_desired(
        self, on_desired: OnDesired, on_trouble: OnTrouble, stop: asyncio.Event
    ) -> None:
        await self.desired.watch_desired(on_desired, on_trouble, stop)

    async def send_report(self, report: AgentReport) -> None:
        await self.rest.send_report(report)

    async def send_final_report(self, report: AgentReport) -> None:
        await self.rest.send_final_report(report)
        await self.desired.send_final_report(report)

    async def send_telemetry(self, batch: pb.TelemetryBatch) -> Sequence[int]:
        return await self.rest.send_telemetry(batch)

    def set_late_ack_handler(self, handler: OnLateAcks) -> None:
        self.rest.set_late_ack_handler(handler)

    @property
    def final_telemetry_timeout_s(self) -> float:
        return self.rest.final_telemetry_timeout_s

    async def renew_certificate(self, csr_pem: bytes) -> bytes:
        return await self.rest.renew_certificate(csr_pem)

    async def use_identity(self) -> None:
        await self.desired.use_identity()
        await self.rest.use_identity()

    def fetch_metadata(self, filename: str) -> Iterator[bytes]:
        return self.rest.fetch_metadata(filename)

    def fetch_target(self, path: str, offset: int) -> Iterator[bytes | memoryview]:
        return self.rest.fetch_target(path, offset)

    async def capture_offset(self, file: CaptureFileInfo) -> tuple[int, bool]:
        return await self.rest.capture_offset(file)

    async def upload_capture(
        self, file: CaptureFileInfo, path: Path, offset: int
    ) -> tuple[int, bool]:
        return await self.rest.upload_capture(file, path, offset)

    async def close(self) -> None:
        await self.rest.close()
        await self.desired.close()


__all__ = [
    "AgentReport",
    "CaptureFileInfo",
    "ControlPlane",
    "DesiredModel",
    "DesiredState",
    "ModelReport",
    "OnDesired",
    "OnLateAcks",
    "OnTrouble",
    "SplitControlPlane",
]
