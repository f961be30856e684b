"""The control plane through an MQTT v5 broker, for agents that can reach a broker only.

Desired states arrive as a retained message (re-delivered by subscribing again: the periodic
resync), reports and telemetry are published with QoS 1, and metadata, bundle bytes,
certificate renewals and capture files are request/response exchanges (agent/fleet/mqtt.py).
paho runs its own network thread; everything handed to the event loop crosses with
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from modelfleet.agent.fleet import renew as renewal
from modelfleet.agent.fleet.controlplane import (
    AgentReport,
    CaptureFileInfo,
    OnDesired,
    OnLateAcks,
    OnTrouble,
)
from modelfleet.agent.fleet.convert import desired_state
from modelfleet.agent.fleet.mqtt import MqttLink, MqttTransport
from modelfleet.agent.fleet.transport import IDENTITY_DIR
from modelfleet.kernel import mqtt_topics as t
from modelfleet.kernel.reports import report_to_proto
from modelfleet.protos import fleet_pb2 as pb

log = logging.getLogger(__name__)

TELEMETRY_ACK_TIMEOUT_S = 15.0
# Data bytes per capture chunk message (capture_mqtt_chunk_bytes): small next to what a broker
# takes in one message, and the most an interrupted upload sends again.
CAPTURE_CHUNK_BYTES = 256 * 1024
# Answers in a row that move an upload no further before it is left to the shipper's backoff.
CAPTURE_MAX_STALLS = 3


class MqttSender:
    """Publish a batch on ``telemetry`` (QoS 1) and wait for the hub's ``telemetry/ack``.

    An ack that arrives after its send timed out still lets those reports leave the outbox: they
    are stored at the hub, whichever copy got there. It goes to ``on_late``.
    """

    def __init__(
        self,
        link: MqttLink,
        loop: asyncio.AbstractEventLoop,
        timeout_s: float = TELEMETRY_ACK_TIMEOUT_S,
    ) -> None:
        self.link = link
        self.loop = loop
        self.timeout_s = timeout_s
        self.on_late: OnLateAcks | None = None
        self._waiting: tuple[set[int], asyncio.Future[list[int]]] | None = None
        link.on_telemetry_ack = self._from_paho

    async def __call__(self, batch: pb.TelemetryBatch) -> Sequence[int]:
        if not self.link.connected.is_set():
            # Publishing now would only pile copies up in paho's memory until it reconnects.
            raise ConnectionError(f"MQTT broker {self.link.address} not connected")
        fut: asyncio.Future[list[int]] = self.loop.create_future()
        self._waiting = ({r.seq for r in batch.reports}, fut)
        try:
            self.link.publish_telemetry(batch)
            return await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            raise ConnectionError(
                f"no telemetry ack from the hub over MQTT within {self.timeout_s:.0f}s"
            ) from None
        finally:
            self._waiting = None

    def _from_paho(self, payload: bytes) -> None:
        try:
            acked = list(pb.TelemetryAck.FromString(payload).acked)
        except Exception:
            log.warning("ignoring an undecodable telemetry ack from the broker")
            return
        self.loop.call_soon_threadsafe(self._on_ack, acked)

    def _on_ack(self, acked: list[int]) -> None:
        waiting = self._waiting
        if waiting is not None and not waiting[1].done() and waiting[0] & set(acked):
            waiting[1].set_result(acked)
            return
        if self.on_late is not None:
            self.on_late(acked)


class MqttControlPlane:
    def __init__(
        self,
        address: str,
        data_dir: Path,
        agent_id: str,
        *,
        resync_interval_s: float,
        capture_chunk_bytes: int = CAPTURE_CHUNK_BYTES,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.ident = Path(data_dir) / IDENTITY_DIR
        self.resync_interval_s = resync_interval_s
        self.capture_chunk_bytes = capture_chunk_bytes
        self._loop = loop or asyncio.get_running_loop()
        self._on_desired: OnDesired | None = None
        self.link = MqttLink(address, Path(data_dir), agent_id, self._desired_from_broker)
        self._bytes = MqttTransport(self.link)
        self._telemetry = MqttSender(self.link, self._loop)

    # No last try while stopping: the ack would come back on another topic just as the session
    # ends. What is not acknowledged is sent at the next start.
    final_telemetry_timeout_s = 0.0

    async def watch_desired(
        self, on_desired: OnDesired, on_trouble: OnTrouble, stop: asyncio.Event
    ) -> None:
        # on_trouble is never called: the broker does not tell whether the hub is up, and
        # MqttLink logs its own connection trouble.
        self._on_desired = on_desired
        self.link.start()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.resync_interval_s)
            self.link.resync()

    def _desired_from_broker(self, payload: bytes) -> None:
        """paho's thread -> the event loop. An empty retained message means "revoked"."""
        try:
            message = pb.DesiredState.FromString(payload)
        except Exception:
            log.warning("ignoring an undecodable desired state from the broker")
            return
        if not payload:
            log.warning("the hub cleared this agent's desired state (revoked?); keeping what runs")
            return
        deliver = self._on_desired
        if deliver is not None:  # always: the link starts in watch_desired
            self._loop.call_soon_threadsafe(deliver, desired_state(message))

    async def send_report(self, report: AgentReport) -> None:
        # QoS 1: paho keeps it while the broker is away; the next one supersedes.
        self.link.publish_report(report_to_proto(report))

    async def send_final_report(self, report: AgentReport) -> None:
        with contextlib.suppress(Exception):
            self.link.publish_report(report_to_proto(report))

    async def send_telemetry(self, batch: pb.TelemetryBatch) -> Sequence[int]:
        return await self._telemetry(batch)

    def set_late_ack_handler(self, handler: OnLateAcks) -> None:
        self._telemetry.on_late = handler

    async def renew_certificate(self, csr_pem: bytes) -> bytes:
        # The broker ends TLS: the request carries the certificate in use and a signature.
        cert_pem, signature = renewal.proof(self.ident, csr_pem)
        request = pb.RenewCertificateRequest(
            csr_pem=csr_pem, certificate_pem=cert_pem, signature=signature
        )
        answer = await asyncio.to_thread(self.link.renew_certificate, request)
        return bytes(answer.certificate_pem)

    async def use_identity(self) -> None:
        self.link.reload_identity()

    def fetch_metadata(self, filename: str) -> Iterator[bytes]:
        return self._bytes.fetch_metadata(filename)

    def fetch_target(self, path: str, offset: int) -> Iterator[bytes | memoryview]:
        return self._bytes.fetch_target(path, offset)

    async def capture_offset(self, file: CaptureFileInfo) -> tuple[int, bool]:
        return await asyncio.to_thread(self._capture, t.KIND_CAPTURE_OFFSET, file, 0, b"")

    async def upload_capture(
        self, file: CaptureFileInfo, path: Path, offset: int
    ) -> tuple[int, bool]:
        # A worker thread: each chunk waits for the hub's answer, never on the event loop.
        return await asyncio.to_thread(self._upload, file, path, offset)

    def _upload(self, file: CaptureFileInfo, path: Path, offset: int) -> tuple[int, bool]:
        """One chunk message at a time, each sent from where the hub's last answer says it
        is (which is also how a duplicate or a restarted hub is caught up with)."""
        have, stored, stalls = offset, False, 0
        with path.open("rb") as f:
            while not stored and stalls < CAPTURE_MAX_STALLS and 0 <= have <= file.size:
                f.seek(have)
                data = f.read(self.capture_chunk_bytes)
                before = have
                have, stored = self._capture(t.KIND_CAPTURE, file, have, data)
                stalls = 0 if have > before else stalls + 1
        return have, stored

    def _capture(
        self, kind: str, file: CaptureFileInfo, offset: int, data: bytes
    ) -> tuple[int, bool]:
        header = pb.CaptureFile(
            model=file.model,
            file_id=file.file_id,
            size=file.size,
            sha256=file.sha256,
            offset=offset,
        )
        payload = pb.CapturePart(file=header, data=data).SerializeToString()
        answer = b"".join(self.link.request(kind, f"capture file {file.file_id}", payload=payload))
        state = pb.CaptureFileState.FromString(answer)
        return int(state.have), bool(state.stored)

    async def close(self) -> None:
        self.link.stop()
        self._bytes.close()
