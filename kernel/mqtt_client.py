"""paho-mqtt (MQTT v5) clients configured the same way for hub and agents."""

from __future__ import annotations

import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def tls_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Verify the broker against the hub's CA (and its name); present our certificate.

    Kept by the caller: ``context.load_cert_chain`` with a renewed certificate makes every
    later (re)connection use it, without a new client.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return context


def make_client(
    client_id: str,
    ca: Path,
    cert: Path,
    key: Path,
    *,
    will: tuple[str, bytes] | None = None,
    context: ssl.SSLContext | None = None,
) -> mqtt.Client:
    """TLS with a client certificate from the hub's CA; the CN is the MQTT username."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
    client.tls_set_context(context or tls_context(ca, cert, key))
    # paho retries with its own bounded backoff; jitter comes from the randomised min delay.
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    client.max_queued_messages_set(0)
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    return client


def session_properties(expiry_s: int = 7 * 86400) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    # A persistent session: QoS 1 messages for a disconnected client wait at the broker.
    props.SessionExpiryInterval = expiry_s
    return props


def publish_properties(
    correlation: bytes = b"", response_topic: str = "", **user: str
) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    if correlation:
        props.CorrelationData = correlation
    if response_topic:
        props.ResponseTopic = response_topic
    if user:
        props.UserProperty = list(user.items())
    return props
