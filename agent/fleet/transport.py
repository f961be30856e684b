"""gRPC transport to the hub: mTLS channels, and the byte-fetching side of TUF verification."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from protos import fleet_pb2 as pb
from protos import fleet_pb2_grpc as pb_grpc
from protos.errors import ModelfleetError, ModelNotFoundError, Status
from protos.identity import CredentialsError

IDENTITY_DIR = "identity"


class HubError(ModelfleetError):
    """The hub refused a call; carries the hub's status."""

    def __init__(self, message: str, status: Status) -> None:
        super().__init__(message)
        self.status = status


def channel_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.keepalive_time_ms", 20000),
        ("grpc.keepalive_timeout_ms", 10000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Our own loop does the backing off, with jitter; keep gRPC's reconnects quick.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5000),
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


def rpc_error(exc: grpc.RpcError, what: str) -> Exception:
    """Transport trouble becomes OSError (retry later); a refusal becomes a HubError."""
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):  # fmt: skip
        return ConnectionError(f"{what}: hub unreachable ({code.name}: {exc.details()})")
    if code == grpc.StatusCode.NOT_FOUND:
        return ModelNotFoundError(f"{what}: {exc.details()}")
    status = {
        grpc.StatusCode.PERMISSION_DENIED: Status.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED: Status.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT: Status.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED: Status.RESOURCE_EXHAUSTED,
    }.get(code, Status.INTERNAL)
    return HubError(f"{what}: {exc.details()}", status)


class GrpcTransport:
    """Blocking fetches for the TUF verifier, which runs on a worker thread."""

    def __init__(self, address: str, creds: grpc.ChannelCredentials, timeout_s: float = 3600):
        self.channel = grpc.secure_channel(address, creds, options=channel_options())
        self.stub = pb_grpc.FleetStub(self.channel)
        self.timeout_s = timeout_s

    def _stream(self, method: Any, path: str, offset: int) -> Iterator[bytes]:
        try:
            for chunk in method(pb.FetchRequest(path=path, offset=offset), timeout=self.timeout_s):
                yield chunk.data
        except grpc.RpcError as exc:
            raise rpc_error(exc, f"fetching {path}") from None

    def fetch_metadata(self, filename: str) -> Iterator[bytes]:
        return self._stream(self.stub.FetchMetadata, filename, 0)

    def fetch_target(self, path: str, offset: int) -> Iterator[bytes]:
        return self._stream(self.stub.FetchTarget, path, offset)

    def close(self) -> None:
        self.channel.close()
