"""The one mapping between the project's error family and HTTP status codes (the agent's
HTTP/REST inference port answers with these and ``{"error": "..."}``)."""

from __future__ import annotations

from modelfleet.kernel.errors import Status

HTTP_STATUS: dict[Status, int] = {
    Status.INVALID_ARGUMENT: 400,
    Status.NOT_FOUND: 404,
    Status.UNAVAILABLE: 503,
    Status.RESOURCE_EXHAUSTED: 429,
    Status.FAILED_PRECONDITION: 409,
    Status.ALREADY_EXISTS: 409,
    Status.PERMISSION_DENIED: 403,
    Status.INTERNAL: 500,
}
