"""The one mapping from the project's error family to gRPC status codes, for every gRPC edge."""

from __future__ import annotations

import grpc

from kernel.errors import Status

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
STATUS_BY_CODE: dict[grpc.StatusCode, Status] = {code: s for s, code in GRPC_CODES.items()}
