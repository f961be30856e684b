"""gRPC transport to the hub: mTLS channels, and the byte-fetching side of TUF verification."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from modelfleet.kernel.grpc_options import (
    FLEET_MESSAGE_BYTES,
    keepalive_options,
    message_size_options,
)
from modelfleet.kernel.grpc_status import error_from_rpc
from modelfleet.kernel.identity import CredentialsError
from modelfleet.protos import fleet_pb2 as pb
from modelfleet.protos import fleet_pb2_grpc as pb_grpc

IDENTITY_DIR = "identity"
FETCH_TARGET_METHOD = "/modelfleet.fleet.v1.Fleet/FetchTarget"


def channel_options() -> list[tuple[str, Any]]:
    return [
        *message_size_options(FLEET_MESSAGE_BYTES),
        *keepalive_options(),
        # Our own loop does the backing off, with jitter; keep gRPC's reconnects quick.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5000),
        # Bundles arrive as 1 MiB messages: read the socket in large pieces from the start
        # instead of growing from 8 KiB (measured: about 1.5x the bytes per CPU-second).
        ("grpc.experimental.tcp_min_read_chunk_size", 256 << 10),
    ]


def credentials(data_dir: Path) -> grpc.ChannelCredentials:
    ident = Path(data_dir) / IDENTITY_DIR
    try:
        return grpc.ssl_channel_credentials(
            root_certificates=(ident / "ca.crt").read_bytes(),
            private_key=(ident / "agent.key").read_bytes(),
            certificate_chain=(ident / "agent.crt").read_bytes(),
        )
    except OSError as exc:
        raise CredentialsError(
            f"cannot read the agent identity in {ident} (enrolled?): {exc}"
        ) from None


def fleet_stub(channel: Any) -> Any:
    """A ``Fleet`` stub on ``channel`` (sync or aio); typed ``Any``, as the generated stubs are."""
    return pb_grpc.FleetStub(channel)


def capture_stub(channel: Any) -> Any:
    """A ``HubCapture`` stub on ``channel``, typed ``Any`` like :func:`fleet_stub`."""
    return pb_grpc.HubCaptureStub(channel)


def rpc_error(exc: grpc.RpcError, what: str) -> Exception:
    """Transport trouble becomes OSError (retry later); a refusal, the error family's member."""
    code = exc.code()
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    ):
        return ConnectionError(f"{what}: hub unreachable ({code.name}: {exc.details()})")
    return error_from_rpc(exc, what)


def chunk_data(raw: bytes) -> memoryview:
    """The ``data`` field of a serialized ``Chunk``, as a view into ``raw`` (no copy).

    Bundles are hundreds of MB: parsing each 1 MiB message into a ``Chunk`` and reading
    ``.data`` would copy every byte twice more on a path that is CPU-bound on small nodes.
    """
    view, pos, data = memoryview(raw), 0, memoryview(b"")
    while pos < len(view):
        key, pos = _varint(view, pos)
        field, wire = key >> 3, key & 7
        if wire == 2:
            size, pos = _varint(view, pos)
            if pos + size > len(view):
                raise ValueError("truncated Chunk message")
            if field == 1:
                data = view[pos : pos + size]
            pos += size
        elif wire == 0:
            _, pos = _varint(view, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > len(view):
                raise ValueError("truncated Chunk message")
        else:
            raise ValueError(f"unexpected wire type {wire} in a Chunk message")
    return data


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise ValueError("bad varint in a Chunk message")
        byte = view[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


class RetiredChannels:
    """Channels replaced after a certificate renewal, kept open while calls started on them may
    still run (closing a channel cancels its calls), then handed back to be closed."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._held: list[tuple[float, Any]] = []

    def retire(self, channel: Any) -> list[Any]:
        """Hold ``channel``; return the held channels whose grace has passed (to close now)."""
        now = time.monotonic()
        due = [c for t, c in self._held if now - t > self.grace_s]
        self._held = [(t, c) for t, c in self._held if now - t <= self.grace_s]
        self._held.append((now, channel))
        return due

    def all(self) -> list[Any]:
        """Every held channel, for shutdown."""
        return [c for _, c in self._held]


class GrpcTransport:
    """Blocking fetches for the TUF verifier, which runs on a worker thread."""

    def __init__(self, address: str, creds: grpc.ChannelCredentials, timeout_s: float = 3600):
        self.address = address
        self.timeout_s = timeout_s
        # A download on a replaced channel may last as long as its call's deadline.
        self._retired = RetiredChannels(timeout_s)
        self._connect(creds)

    def _connect(self, creds: grpc.ChannelCredentials) -> None:
        channel = grpc.secure_channel(self.address, creds, options=channel_options())
        # FetchTarget with the raw message bytes: chunk_data() takes the payload without a copy.
        raw = channel.unary_stream(
            FETCH_TARGET_METHOD, request_serializer=pb.FetchRequest.SerializeToString
        )
        # One assignment, so a fetch starting on another thread sees the old trio or the new.
        self._conn = (channel, pb_grpc.FleetStub(channel), raw)

    @property
    def channel(self) -> grpc.Channel:
        return self._conn[0]

    def reconnect(self, creds: grpc.ChannelCredentials) -> None:
        """New calls use ``creds`` (a renewed certificate) from now on.

        The previous channel stays open while a download on it may run (``timeout_s``), then is
        closed at a later reconnect or at close().
        """
        for old in self._retired.retire(self._conn[0]):
            old.close()
        self._connect(creds)

    def fetch_metadata(self, filename: str) -> Iterator[bytes]:
        try:
            request = pb.FetchRequest(path=filename)
            for chunk in self._conn[1].FetchMetadata(request, timeout=self.timeout_s):
                yield chunk.data
        except grpc.RpcError as exc:
            raise rpc_error(exc, f"fetching {filename}") from None

    def fetch_target(self, path: str, offset: int) -> Iterator[memoryview]:
        request = pb.FetchRequest(path=path, offset=offset)
        call = self._conn[2](request, timeout=self.timeout_s)
        try:
            for raw in call:
                yield chunk_data(raw)
        except grpc.RpcError as exc:
            raise rpc_error(exc, f"fetching {path}") from None
        except ValueError as exc:
            raise ConnectionError(
                f"fetching {path}: malformed message from the hub: {exc}"
            ) from None
        finally:
            call.cancel()  # a consumer that stops early ends the stream now (no-op once done)

    def close(self) -> None:
        for channel in [*self._retired.all(), self._conn[0]]:
            channel.close()
