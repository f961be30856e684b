"""The MQTT topic tree, shared by hub and agents (documented in docs/mqtt.md).

Everything lives under a versioned prefix, one subtree per identity. An identity is the client
certificate's CN (``agent:<id>``), which Mosquitto also uses as the username, so the broker's
ACL can confine each agent to its own subtree with a single ``%u`` pattern per topic.

    mf/v1/<identity>/desired          hub -> agent   retained, QoS 1 (fleet_pb2.DesiredState)
    mf/v1/<identity>/state            agent -> hub   QoS 1 (fleet_pb2.AgentReport)
    mf/v1/<identity>/telemetry        agent -> hub   QoS 1 (fleet_pb2.TelemetryBatch)
    mf/v1/<identity>/telemetry/ack    hub -> agent   QoS 1 (fleet_pb2.TelemetryAck)
    mf/v1/<identity>/presence         agent -> hub   retained "online"; last will "offline"
    mf/v1/<identity>/fetch/request    agent -> hub   QoS 1 (fleet_pb2.FetchRequest + properties)
    mf/v1/<identity>/fetch/response   hub -> agent   QoS 1 (fleet_pb2.Chunk + properties)

Besides fetches, the request/response pair carries the exchanges an agent without a gRPC route
starts: certificate renewal (kind ``certificate``) and capture shipping (``capture-offset``,
``capture``: a ``fleet_pb2.CapturePart`` in, one Chunk holding a ``CaptureFileState`` out).
"""

from __future__ import annotations

PREFIX = "mf/v1"

DESIRED = "desired"
STATE = "state"
TELEMETRY = "telemetry"
TELEMETRY_ACK = "telemetry/ack"
PRESENCE = "presence"
FETCH_REQUEST = "fetch/request"
FETCH_RESPONSE = "fetch/response"

# Leaves an agent may read and write; the ACL file is generated from these.
AGENT_READS = (DESIRED, FETCH_RESPONSE, TELEMETRY_ACK)
AGENT_WRITES = (STATE, TELEMETRY, PRESENCE, FETCH_REQUEST)

ONLINE = b"online"
OFFLINE = b"offline"

# MQTT v5 user properties on fetch messages.
PROP_KIND = "kind"  # "metadata", "target", "certificate", "capture-offset" or "capture"
PROP_LENGTH = "length"  # bytes wanted in this window
PROP_OFFSET = "offset"
PROP_EOF = "eof"
PROP_ERROR = "error"  # "<status>:<message>"

# Kinds of capture shipping requests (agent/fleet/mqtt_plane.py, hub/mqtt.py).
KIND_CAPTURE_OFFSET = "capture-offset"
KIND_CAPTURE = "capture"


def topic(identity: str, leaf: str) -> str:
    if not identity or any(c in identity for c in "/+#"):
        raise ValueError(f"invalid identity for a topic: {identity!r}")
    return f"{PREFIX}/{identity}/{leaf}"


def hub_subscriptions() -> list[str]:
    return [f"{PREFIX}/+/{leaf}" for leaf in AGENT_WRITES]


def parse(topic_name: str) -> tuple[str, str]:
    """(identity, leaf) of a topic in the tree; ValueError otherwise."""
    prefix = PREFIX + "/"
    if not topic_name.startswith(prefix):
        raise ValueError(f"topic {topic_name!r} is outside {PREFIX}/")
    identity, _, leaf = topic_name[len(prefix) :].partition("/")
    if not identity or not leaf:
        raise ValueError(f"topic {topic_name!r} has no identity/leaf")
    return identity, leaf
