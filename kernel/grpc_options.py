"""gRPC channel and server options, in one place because each side's must fit the other's.

A message larger than the receiver's limit fails the call, and a client that pings more often
than the server allows is cut off with GOAWAY ``too_many_pings``: the hub's server, the agent's
channels to it, the admin CLI's channel and the agent's inference server take their options
from here.
"""

from __future__ import annotations

from typing import Any

# The largest message the agent's and the admin CLI's channels to the hub send or take (bundle
# chunks are 1 MiB; desired states, reports and metadata are far smaller).
FLEET_MESSAGE_BYTES = 64 << 20
# Clients ping every KEEPALIVE_TIME_MS so a dead peer (and a dead agent's watch stream on the
# hub) is noticed without waiting for TCP timeouts. The hub accepts pings down to
# MIN_PING_INTERVAL_MS apart, below the clients' interval, so it never answers them with GOAWAY.
KEEPALIVE_TIME_MS = 20000
KEEPALIVE_TIMEOUT_MS = 10000
MIN_PING_INTERVAL_MS = 5000

Options = list[tuple[str, Any]]


def message_size_options(max_message_bytes: int) -> Options:
    """Both directions limited to ``max_message_bytes``."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def keepalive_options() -> Options:
    return [
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def server_options(max_message_bytes: int, *, keepalive: bool = False) -> Options:
    """A server's options; ``keepalive`` for one that holds long streams (the hub's watches)."""
    # so_reuseport off: a second server on a busy port must fail to bind, not share it.
    options = [*message_size_options(max_message_bytes), ("grpc.so_reuseport", 0)]
    if keepalive:
        options += keepalive_options()
        options.append(("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS))
    return options
