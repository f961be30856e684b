"""One error family for the whole project.

Every error carries a transport-neutral :class:`Status`. Each edge maps the status exactly once:
gRPC servicers to a status code, the CLIs to an exit code. Core code raises these and never
imports grpc.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Iterable


class Status(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    UNAVAILABLE = "unavailable"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    ALREADY_EXISTS = "already_exists"
    PERMISSION_DENIED = "permission_denied"
    INTERNAL = "internal"


# CLI exit codes, stable so scripts can branch on them (2 is argparse's usage error).
EXIT_CODES: dict[Status, int] = {
    Status.INVALID_ARGUMENT: 3,
    Status.NOT_FOUND: 4,
    Status.UNAVAILABLE: 5,
    Status.RESOURCE_EXHAUSTED: 6,
    Status.FAILED_PRECONDITION: 7,
    Status.ALREADY_EXISTS: 8,
    Status.PERMISSION_DENIED: 9,
    Status.INTERNAL: 10,
}

# Outcomes that are not errors get codes of their own, above EXIT_CODES (20-22 are rollout
# outcomes, hub/cli.py), so a script can tell "the agent answered: not ready" from "no agent
# there" (5).
EXIT_NOT_READY = 23
# stdout was closed early (`modelfleet-agent bundle inspect DIR | head`): what a shell reports
# for a tool that SIGPIPE ended (128 + 13); the CLIs leave without a message, as such tools do.
EXIT_BROKEN_PIPE = 141


# Reasons (ModelfleetError.reason, reported as ModelReport.error_reason) that say nothing about
# a version itself: the hub or the node's disk was in the way. Rollouts wait these out (agent
# timeout) instead of judging the version on them.
TRANSIENT_REASONS = frozenset({"unreachable", "transport", "cache_damaged"})


# Starts the message of a hub refusing one capture file for good (not the agent as a whole):
# the agent's shipper sets such a file aside and goes on with the next.
CAPTURE_REFUSED = "capture upload refused"


class ModelfleetError(Exception):
    """Base of every error the project raises on purpose."""

    status: Status = Status.INTERNAL
    # Short machine-readable reason used as a metrics label ("shape", "datatype", ...).
    reason: str = "internal"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return self.message


class InvalidRequestError(ModelfleetError):
    status = Status.INVALID_ARGUMENT
    reason = "invalid_request"


class ModelNotFoundError(ModelfleetError):
    status = Status.NOT_FOUND
    reason = "model_not_found"


class ModelNotReadyError(ModelfleetError):
    status = Status.UNAVAILABLE
    reason = "model_not_ready"


class ResourceExhaustedError(ModelfleetError):
    status = Status.RESOURCE_EXHAUSTED
    reason = "resource_exhausted"


class InferenceError(ModelfleetError):
    """The model itself failed while running a valid request."""

    status = Status.INTERNAL
    reason = "runtime"


class BundleError(ModelfleetError):
    """A bundle on disk is malformed, incomplete or does not match its manifest."""

    status = Status.INVALID_ARGUMENT
    reason = "bundle"


class BundleExistsError(ModelfleetError):
    """Bundle versions are immutable: the same name and version cannot be written twice."""

    status = Status.ALREADY_EXISTS
    reason = "bundle_exists"


class GateFailedError(ModelfleetError):
    """A candidate version did not pass the health gate and will not serve."""

    status = Status.FAILED_PRECONDITION
    reason = "gate"


class VerificationError(ModelfleetError):
    """Signature or hash verification failed; nothing unverified is ever loaded."""

    status = Status.PERMISSION_DENIED
    reason = "verification"


class ListenError(ModelfleetError):
    """A server cannot listen where it is told to (port or socket in use, address not local)."""

    status = Status.UNAVAILABLE
    reason = "listen"


class RemoteError(ModelfleetError):
    """The other side of a call (hub, agent) refused it; carries the status it answered with."""

    def __init__(self, message: str, status: Status) -> None:
        super().__init__(message)
        self.status = status


def remote_error(message: str, status: Status) -> ModelfleetError:
    """The error a caller raises for a refusal that arrived as ``status``, over any transport.

    NOT_FOUND becomes :class:`ModelNotFoundError`, which callers catch (the TUF fetcher turns it
    into "no such target"); every other status a :class:`RemoteError` that keeps it, and with it
    the CLI's exit code.
    """
    if status is Status.NOT_FOUND:
        return ModelNotFoundError(message)
    return RemoteError(message, status)


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'fraud'?)`` for the known names closest to a mistyped one, else ``""``.

    For "no such name" messages: the name the user meant is usually one typo away.
    """
    close = difflib.get_close_matches(name, sorted(set(known)), n=3, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)"
