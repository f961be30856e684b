"""The agent's MQTT link: desired state in (retained), reports out, bundles by request/response.

One MQTT v5 connection with a persistent session. Presence is a retained "online" with a last
will of "offline". Fetches are windowed request/response exchanges (response topic and
correlation data), so the broker never holds more than one window per transfer and a broken
transfer resumes from the last byte written, through the same TUF verifier as gRPC.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from modelfleet.agent.fleet.transport import IDENTITY_DIR
from modelfleet.kernel import mqtt_topics as t
from modelfleet.kernel.errors import Status, remote_error
from modelfleet.kernel.mqtt_client import (
    make_client,
    publish_properties,
    session_properties,
    tls_context,
)
from modelfleet.kernel.settings import split_hostport
from modelfleet.protos import fleet_pb2 as pb

log = logging.getLogger(__name__)

# Bytes asked for per request: the unit of flow control and of work lost on a disconnect.
WINDOW = 8 * 1024 * 1024
CHUNK_TIMEOUT_S = 30.0


class MqttLink:
    def __init__(
        self,
        address: str,
        data_dir: Path,
        agent_id: str,
        on_desired: Callable[[bytes], None],
    ) -> None:
        self.address = address
        self.identity = f"agent:{agent_id}"
        self.on_desired = on_desired
        ident = Path(data_dir) / IDENTITY_DIR
        self.presence_topic = t.topic(self.identity, t.PRESENCE)
        self.ident = ident
        self.tls = tls_context(ident / "ca.crt", ident / "agent.crt", ident / "agent.key")
        self.client = make_client(
            self.identity,
            ident / "ca.crt",
            ident / "agent.crt",
            ident / "agent.key",
            will=(self.presence_topic, t.OFFLINE),
            context=self.tls,
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.connected = threading.Event()
        # Called on paho's thread with each TelemetryAck payload (set by the telemetry shipper).
        self.on_telemetry_ack: Callable[[bytes], None] | None = None
        self._pending: dict[bytes, queue.Queue] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        host, port = split_hostport(self.address, "mqtt")
        self.client.connect_async(
            host, port, keepalive=20, clean_start=False, properties=session_properties()
        )
        self.client.loop_start()

    def stop(self) -> None:
        # A clean goodbye: say offline ourselves (the will only fires on unexpected loss).
        if self.connected.is_set():
            self.client.publish(self.presence_topic, t.OFFLINE, qos=1, retain=True)
        self.client.disconnect()
        self.client.loop_stop()

    def reload_identity(self) -> None:
        """Use the (renewed) certificate on disk for every later connection to the broker.

        The session in progress stays up: the broker checked the old certificate when it
        connected, and MQTT does not ask again.
        """
        self.tls.load_cert_chain(self.ident / "agent.crt", self.ident / "agent.key")

    def renew_certificate(self, req: pb.RenewCertificateRequest) -> pb.RenewCertificateResponse:
        """Fleet.RenewCertificate through the broker, for agents without a gRPC route."""
        data = b"".join(self.request("certificate", "", payload=req.SerializeToString()))
        return pb.RenewCertificateResponse.FromString(data)

    def resync(self) -> None:
        """Subscribing again makes the broker deliver the retained desired state again."""
        if self.connected.is_set():
            self.client.subscribe(t.topic(self.identity, t.DESIRED), qos=1)

    # -- paho callbacks (network thread) ---------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT broker %s refused this agent: %s", self.address, reason)
            return
        log.info("connected to MQTT broker %s as %s", self.address, self.identity)
        client.subscribe(t.topic(self.identity, t.FETCH_RESPONSE), qos=1)
        client.subscribe(t.topic(self.identity, t.DESIRED), qos=1)
        client.subscribe(t.topic(self.identity, t.TELEMETRY_ACK), qos=1)
        client.publish(self.presence_topic, t.ONLINE, qos=1, retain=True)
        self.connected.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if self.connected.is_set():
            log.warning("disconnected from MQTT broker %s: %s", self.address, reason)
        self.connected.clear()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            _, leaf = t.parse(msg.topic)
        except ValueError:
            return
        if leaf == t.DESIRED:
            self.on_desired(bytes(msg.payload))
        elif leaf == t.TELEMETRY_ACK:
            if self.on_telemetry_ack is not None:
                self.on_telemetry_ack(bytes(msg.payload))
        elif leaf == t.FETCH_RESPONSE:
            props = msg.properties
            corr = bytes(getattr(props, "CorrelationData", b"") or b"") if props else b""
            with self._lock:
                q = self._pending.get(corr)
            if q is not None:
                user = dict(getattr(props, "UserProperty", []) or []) if props else {}
                q.put((bytes(msg.payload), user))

    # -- outgoing ---------------------------------------------------------------------------------

    def publish_report(self, report: pb.AgentReport) -> None:
        self.client.publish(t.topic(self.identity, t.STATE), report.SerializeToString(), qos=1)

    def publish_telemetry(self, batch: pb.TelemetryBatch) -> None:
        # QoS 1; the hub answers on telemetry/ack once stored. Resends are safe (idempotent).
        self.client.publish(t.topic(self.identity, t.TELEMETRY), batch.SerializeToString(), qos=1)

    def request(
        self, kind: str, path: str, offset: int = 0, length: int = 0, payload: bytes | None = None
    ) -> Iterator[bytes]:
        """Chunks of one window (or one metadata file, or one answer), in order.

        The request body is a FetchRequest for ``path`` and ``offset`` unless ``payload``
        gives another message (the hub reads it according to ``kind``).
        """
        if not self.connected.wait(CHUNK_TIMEOUT_S):
            raise ConnectionError(f"MQTT broker {self.address} not connected")
        corr = secrets.token_bytes(12)
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._pending[corr] = q
        try:
            props = publish_properties(
                corr,
                t.topic(self.identity, t.FETCH_RESPONSE),
                **{t.PROP_KIND: kind, t.PROP_LENGTH: str(length)},
            )
            req = payload
            if req is None:
                req = pb.FetchRequest(path=path, offset=offset).SerializeToString()
            self.client.publish(
                t.topic(self.identity, t.FETCH_REQUEST), req, qos=1, properties=props
            )
            while True:
                try:
                    payload, user = q.get(timeout=CHUNK_TIMEOUT_S)
                except queue.Empty:
                    raise ConnectionError(
                        f"no answer from the hub over MQTT for {path} within {CHUNK_TIMEOUT_S:.0f}s"
                    ) from None
                if t.PROP_ERROR in user:
                    status, _, message = user[t.PROP_ERROR].partition(":")
                    try:
                        known = Status(status)
                    except ValueError:
                        known = Status.INTERNAL  # a status this agent does not know of
                    raise remote_error(message, known)
                chunk = pb.Chunk.FromString(payload)
                if chunk.data:
                    yield chunk.data
                if user.get(t.PROP_EOF) == "1":
                    self.last_total = chunk.total_size
                    return
        finally:
            with self._lock:
                self._pending.pop(corr, None)


class MqttTransport:
    """TUF fetcher transport over MQTT, for agents that can only reach a broker."""

    def __init__(self, link: MqttLink, window: int = WINDOW) -> None:
        self.link = link
        self.window = window

    def fetch_metadata(self, filename: str) -> Iterator[bytes]:
        return self.link.request("metadata", filename)

    def fetch_target(self, path: str, offset: int) -> Iterator[bytes]:
        while True:
            self.link.last_total = -1
            got = 0
            for data in self.link.request("target", path, offset, self.window):
                got += len(data)
                yield data
            offset += got
            total = self.link.last_total
            if got == 0 or (total >= 0 and offset >= total):
                return

    def close(self) -> None:
        pass
