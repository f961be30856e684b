"""The one mapping between the project's error family and gRPC status codes, both ways.

Servicers map an error's :class:`Status` to a code (``GRPC_CODES``); clients map the code they
get back to a :class:`Status` (:func:`error_from_rpc`), so a refusal keeps its family, and the CLI
its exit code, across the wire.
"""

from __future__ import annotations

import grpc

from modelfleet.kernel.errors import ModelfleetError, Status, remote_error

GRPC_CODES: dict[Status, grpc.StatusCode] = {
    Status.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Status.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Status.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Status.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Status.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Status.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Status.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Status.INTERNAL: grpc.StatusCode.INTERNAL,
}
STATUS_BY_CODE: dict[grpc.StatusCode, Status] = {
    **{code: s for s, code in GRPC_CODES.items()},
    # Sent by gRPC itself, not by our servicers: a deadline is the other side not answering in
    # time, and a refused credential a denial like any other.
    grpc.StatusCode.DEADLINE_EXCEEDED: Status.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED: Status.PERMISSION_DENIED,
}


def error_from_rpc(exc: grpc.RpcError, what: str = "") -> ModelfleetError:
    """The error family's member for a failed call (see :func:`kernel.errors.remote_error`).

    ``what`` prefixes the message (``"hub: ..."``). Codes no servicer of ours sends (CANCELLED,
    UNKNOWN, ...) become INTERNAL.
    """
    code = exc.code()
    message = exc.details() or str(code)
    if what:
        message = f"{what}: {message}"
    return remote_error(message, STATUS_BY_CODE.get(code, Status.INTERNAL))
