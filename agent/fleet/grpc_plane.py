"""The control plane over the hub's gRPC ``Fleet`` service (mutual TLS).

Two kinds of channel: a ``grpc.aio`` one on the event loop for the desired-state stream,
reports, telemetry and renewals, and the blocking :class:`GrpcTransport` the TUF verifier uses
on its worker thread for metadata and bundle bytes. A renewed certificate replaces both; the
replaced channels stay open while calls started on them may still run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from modelfleet.agent.fleet.backoff import Backoff
from modelfleet.agent.fleet.controlplane import (
    AgentReport,
    CaptureFileInfo,
    OnDesired,
    OnLateAcks,
    OnTrouble,
)
from modelfleet.agent.fleet.convert import desired_state
from modelfleet.agent.fleet.transport import (
    GrpcTransport,
    RetiredChannels,
    capture_stub,
    channel_options,
    credentials,
    fleet_stub,
    rpc_error,
)
from modelfleet.kernel.reports import report_to_proto
from modelfleet.protos import fleet_pb2 as pb

log = logging.getLogger(__name__)

REPORT_TIMEOUT_S = 10.0
FINAL_REPORT_TIMEOUT_S = 2.0
TELEMETRY_TIMEOUT_S = 10.0
RENEW_TIMEOUT_S = 30.0
CAPTURE_OFFSET_TIMEOUT_S = 10.0
# A whole capture file (capture_rotate_bytes, 16 MiB by default) on a slow link; a cut upload
# resumes from what the hub holds.
CAPTURE_UPLOAD_TIMEOUT_S = 600.0
CAPTURE_CHUNK = 512 * 1024


class GrpcControlPlane:
    def __init__(
        self, address: str, data_dir: Path, *, resync_interval_s: float, backoff_max_s: float
    ) -> None:
        self.address = address
        self.data_dir = Path(data_dir)
        self.resync_interval_s = resync_interval_s
        self.backoff_max_s = backoff_max_s
        creds = credentials(self.data_dir)
        self._channel: Any = grpc.aio.secure_channel(address, creds, options=channel_options())
        self._stub: Any = fleet_stub(self._channel)
        self._capture: Any = capture_stub(self._channel)
        # A watch stream on a replaced channel lasts up to resync_interval_s.
        self._retired = RetiredChannels(resync_interval_s + 60.0)
        self._bytes = GrpcTransport(address, creds)

    # The hub answers ReportTelemetry once the batch is stored: a quick last try is worth it.
    final_telemetry_timeout_s = 2.0

    async def watch_desired(
        self, on_desired: OnDesired, on_trouble: OnTrouble, stop: asyncio.Event
    ) -> None:
        backoff = Backoff(cap=self.backoff_max_s)
        while not stop.is_set():
            try:
                # The deadline ends the stream now and then: reconnecting gets the full state
                # again, a resync that repairs anything a broken stream might have missed.
                call = self._stub.WatchDesired(
                    pb.WatchDesiredRequest(), timeout=self.resync_interval_s
                )
                async for message in call:
                    backoff.reset()
                    on_desired(desired_state(message))
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue
                err = rpc_error(exc, "hub")
                on_trouble(str(err))  # already reads "hub: ..."
                delay = backoff.next()
                log.warning("%s; retrying in %.1fs", err, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    async def send_report(self, report: AgentReport) -> None:
        await self._report(report, REPORT_TIMEOUT_S)

    async def send_final_report(self, report: AgentReport) -> None:
        with contextlib.suppress(Exception):
            await self._report(report, FINAL_REPORT_TIMEOUT_S)

    async def _report(self, report: AgentReport, timeout_s: float) -> None:
        try:
            await self._stub.ReportState(report_to_proto(report), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, "report") from None

    async def send_telemetry(self, batch: pb.TelemetryBatch) -> Sequence[int]:
        try:
            ack = await self._stub.ReportTelemetry(batch, timeout=TELEMETRY_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, "telemetry") from None
        return list(ack.acked)

    def set_late_ack_handler(self, handler: OnLateAcks) -> None:
        """Acks come back in the answer to the call: never late."""

    async def renew_certificate(self, csr_pem: bytes) -> bytes:
        try:
            answer = await self._stub.RenewCertificate(
                pb.RenewCertificateRequest(csr_pem=csr_pem), timeout=RENEW_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, "hub") from None
        return bytes(answer.certificate_pem)

    async def use_identity(self) -> None:
        creds = credentials(self.data_dir)
        for old in self._retired.retire(self._channel):
            await old.close()
        self._channel = grpc.aio.secure_channel(self.address, creds, options=channel_options())
        self._stub = fleet_stub(self._channel)
        self._capture = capture_stub(self._channel)
        self._bytes.reconnect(creds)

    def fetch_metadata(self, filename: str) -> Iterator[bytes]:
        return self._bytes.fetch_metadata(filename)

    def fetch_target(self, path: str, offset: int) -> Iterator[bytes | memoryview]:
        return self._bytes.fetch_target(path, offset)

    async def capture_offset(self, file: CaptureFileInfo) -> tuple[int, bool]:
        try:
            state = await self._capture.CaptureOffset(
                _capture_file(file, 0), timeout=CAPTURE_OFFSET_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, "capture upload") from None
        return int(state.have), bool(state.stored)

    async def upload_capture(
        self, file: CaptureFileInfo, path: Path, offset: int
    ) -> tuple[int, bool]:
        async def chunks() -> Any:
            yield pb.CaptureChunk(header=_capture_file(file, offset))
            with path.open("rb") as f:
                f.seek(offset)
                while True:
                    # Small reads of a local file: cheap enough for the loop between sends.
                    data = f.read(CAPTURE_CHUNK)
                    if not data:
                        return
                    yield pb.CaptureChunk(data=data)

        try:
            state = await self._capture.UploadCapture(chunks(), timeout=CAPTURE_UPLOAD_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, "capture upload") from None
        return int(state.have), bool(state.stored)

    async def close(self) -> None:
        await self._channel.close()
        for old in self._retired.all():
            await old.close()
        self._bytes.close()


def _capture_file(file: CaptureFileInfo, offset: int) -> pb.CaptureFile:
    return pb.CaptureFile(
        model=file.model, file_id=file.file_id, size=file.size, sha256=file.sha256, offset=offset
    )
