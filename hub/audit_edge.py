"""The admin services' gate: a gRPC server interceptor that checks the caller's role and
writes the audit trail.

One place rather than a line in each of fifty handlers, so a method added later is checked and
audited without anyone remembering to: its kind must be named in ``METHOD_KINDS`` and the role
it needs in ``METHOD_ROLES`` (a test checks that every method of the admin services is); an
unnamed one counts as a change that needs the admin role.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor

from modelfleet.hub.audit import AuditStore
from modelfleet.hub.governance import ADMIN, OPERATOR, VIEWER, Admins, allows
from modelfleet.kernel.errors import ModelfleetError
from modelfleet.kernel.identity import IdentityError, parse_identity

log = logging.getLogger(__name__)

PACKAGE = "modelfleet.fleet.v1"
AUDITED_SERVICES = ("HubAdmin", "HubAlerts", "HubCapture", "HubOutcomes")

# What each call is, for what is recorded:
# - change: recorded before it runs and completed after (an UNFINISHED entry if the hub stops);
# - export: a read that takes data out (recorded always);
# - read: recorded when it does not end OK, or always with audit_reads;
# - routine: agents' and applications' data traffic (capture uploads, outcome labels), recorded
#   when it does not end OK.
CHANGE, EXPORT, READ, ROUTINE = "change", "export", "read", "routine"
METHOD_KINDS: dict[str, str] = {
    # HubAdmin
    "Publish": CHANGE,
    "CommitTargets": CHANGE,
    "ListModels": READ,
    "ListVersions": READ,
    "SetStage": CHANGE,
    "Deploy": CHANGE,
    "CreateToken": CHANGE,
    "ListAgents": READ,
    "RevokeAgent": CHANGE,
    "Metrics": READ,
    "Drift": READ,
    "StartRollout": CHANGE,
    "GetRollout": READ,
    "ControlRollout": CHANGE,
    "RolloutHistory": READ,
    "StartExperiment": CHANGE,
    "GetExperiment": READ,
    "ListExperiments": READ,
    "ControlExperiment": CHANGE,
    "CreateJob": CHANGE,
    "ListJobs": READ,
    "JobRuns": READ,
    "ControlJob": CHANGE,
    "ListDeployments": READ,
    "GetDeployment": READ,
    "Undeploy": CHANGE,
    "Backup": EXPORT,
    "PlanState": READ,
    "ApplyState": CHANGE,
    "ExportState": EXPORT,
    "ListAudit": READ,
    "AddAdmin": CHANGE,
    "ListAdmins": READ,
    "SetAdminRole": CHANGE,
    "RevokeAdmin": CHANGE,
    # HubAlerts
    "ListAlerts": READ,
    "AlertHistory": READ,
    "SetAlertRule": CHANGE,
    "RemoveAlertRule": CHANGE,
    "AddWebhook": CHANGE,
    "ListWebhooks": READ,
    "RemoveWebhook": CHANGE,
    # HubCapture
    "CaptureOffset": ROUTINE,
    "UploadCapture": ROUTINE,
    "SetCapture": CHANGE,
    "RemoveCapture": CHANGE,
    "ListCapture": READ,
    "QueryCapture": EXPORT,
    # HubOutcomes
    "ReportOutcomes": ROUTINE,
    "Accuracy": READ,
    "SetAccuracyBaseline": CHANGE,
}

# The least role (hub/governance.py) each method needs from an admin identity. Agents' own
# methods (capture shipping) name ADMIN: their handlers refuse admin identities anyway.
METHOD_ROLES: dict[str, str] = {
    **{
        m: VIEWER
        for m in (
            "ListModels",
            "ListVersions",
            "ListAgents",
            "Metrics",
            "Drift",
            "GetRollout",
            "RolloutHistory",
            "GetExperiment",
            "ListExperiments",
            "ListJobs",
            "JobRuns",
            "ListDeployments",
            "GetDeployment",
            "PlanState",
            "ListAlerts",
            "AlertHistory",
            "ListCapture",
            "Accuracy",
        )
    },
    **{
        m: OPERATOR
        for m in (
            "Publish",
            "CommitTargets",
            "SetStage",
            "Deploy",
            "Undeploy",
            "StartRollout",
            "ControlRollout",
            "StartExperiment",
            "ControlExperiment",
            "CreateJob",
            "ControlJob",
            "ApplyState",
            "ExportState",
            "SetAlertRule",
            "RemoveAlertRule",
            "SetAccuracyBaseline",
            "ReportOutcomes",
        )
    },
    **{
        m: ADMIN
        for m in (
            "CreateToken",
            "RevokeAgent",
            "Backup",
            "ListAudit",
            "AddAdmin",
            "ListAdmins",
            "SetAdminRole",
            "RevokeAdmin",
            "AddWebhook",
            "ListWebhooks",
            "RemoveWebhook",
            "SetCapture",
            "RemoveCapture",
            "QueryCapture",
            "CaptureOffset",
            "UploadCapture",
        )
    },
}

# Agents' own methods among the admin services (capture shipping): the only ones an agent
# identity gets past the gate with.
AGENT_METHODS = ("CaptureOffset", "UploadCapture")

# Fields whose values are never recorded, only their size: their names say they may hold a
# secret (a webhook's signing secret, a token, a key, a password).
SECRET_WORDS = ("secret", "token", "password", "key")
# Names with those words that hold public values an auditor needs: the key id that signed a
# targets commit, a job's id columns.
PUBLIC_FIELDS = ("keyid", "keys")
# Items of a repeated field or map written out before the rest is only counted.
SHOWN_ITEMS = 20
# A longer string is written as its start, its length and its SHA-256, so that one long field
# (publish notes, a padded state file) cannot push the rest of the request out of the entry,
# and the digest still ties the entry to the file that was sent.
STRING_CHARS = 200
# Credentials inside strings whatever the field's name: the user:password@ of a URL (a webhook,
# a job's input) and query parameters named like secrets (?token=...). Every request is
# described on the event loop, so both patterns take linear time on any string: each starts at
# a literal ("://", or one of ? & ;) and scans a class that excludes what starts the next match.
_URL_USERINFO = re.compile(r"://[^/@\s\"']{1,256}@")
_PARAM = re.compile(r"([?&;][^=&#\s\"'?;]{1,64}=)[^&#\s\"'?;]*")
SECRET_PARAM_WORDS = ("secret", "token", "password", "passwd", "key", "sig", "auth")

# Refusals at the gate are recorded within a budget per identity (every caller without a
# certificate shares one): the enrollment port answers anyone who reaches it, and each entry is
# a synced write on the event loop. Over the budget they are counted, and the next entry that is
# written says how many were left out.
REFUSALS_BURST = 100
REFUSALS_PER_S = 0.2


def describe(message: Any) -> str:
    """A request on one line in protobuf's text form, with bytes fields and fields that may
    hold secrets given by their size only."""
    parts = []
    for field, value in message.ListFields():
        name = field.name.lower()
        secret = name not in PUBLIC_FIELDS and any(word in name for word in SECRET_WORDS)
        parts.append(f"{field.name}: {_field_text(field, value, secret)}")
    return " ".join(parts)


def _field_text(field: FieldDescriptor, value: Any, secret: bool) -> str:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        items = list(value.items())
        shown = [
            f"{json.dumps(str(k), ensure_ascii=False)}: {_one(value_field, v, secret)}"
            for k, v in items[:SHOWN_ITEMS]
        ]
        return "{" + ", ".join(shown) + _more(len(items)) + "}"
    if field.is_repeated:
        items = list(value)
        shown = [_one(field, v, secret) for v in items[:SHOWN_ITEMS]]
        return "[" + ", ".join(shown) + _more(len(items)) + "]"
    return _one(field, value, secret)


def _more(n: int) -> str:
    return f", ... {n - SHOWN_ITEMS} more" if n > SHOWN_ITEMS else ""


def _one(field: FieldDescriptor, value: Any, secret: bool) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return "{" + (f"<redacted, {value.ByteSize()} bytes>" if secret else describe(value)) + "}"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return f"<{'redacted, ' if secret else ''}{len(value)} bytes>"
    if secret:
        return "<redacted>"
    if field.type == FieldDescriptor.TYPE_STRING:
        return _string(value)
    if field.enum_type is not None:
        named = field.enum_type.values_by_number.get(value)
        return named.name if named is not None else str(value)
    return str(value)


def redact(text: str) -> str:
    """``text`` without the credentials a URL in it may carry."""
    text = _URL_USERINFO.sub("://<redacted>@", text)
    return _PARAM.sub(_param, text)


def _param(match: re.Match[str]) -> str:
    name = match.group(1).lower()
    secret = any(word in name for word in SECRET_PARAM_WORDS)
    return match.group(1) + "<redacted>" if secret else match.group(0)


def _string(value: str) -> str:
    clean = redact(value)
    if len(clean) <= STRING_CHARS:
        return json.dumps(clean, ensure_ascii=False)
    # The digest of what was sent, unless something was redacted from it: a digest of the
    # original would let a guess at the removed secret be checked.
    of = "" if clean == value else " of the redacted text"
    digest = hashlib.sha256(clean.encode()).hexdigest()
    return (
        json.dumps(clean[:STRING_CHARS], ensure_ascii=False)
        + f"... <{len(value)} chars, sha256{of} {digest}>"
    )


def _identity(context: grpc.aio.ServicerContext) -> str:
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode(errors="replace") if names else ""


def _status(context: grpc.aio.ServicerContext, exc: BaseException | None) -> tuple[str, str]:
    """(status name, detail) of a call that has ended."""
    # A stream the client cancels is closed at its yield (GeneratorExit), not cancelled.
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED", "the client went away or the hub is stopping"
    code = context.code()
    detail = context.details() or ""
    if isinstance(detail, bytes):
        detail = detail.decode(errors="replace")
    if code is None:
        if exc is None:
            return "OK", ""
        return "UNKNOWN", f"{type(exc).__name__}: {exc}"
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    return name, detail


class RefusalBudget:
    """How many refusals per identity are recorded: ``burst`` at once, then ``per_s``."""

    def __init__(
        self,
        burst: int = REFUSALS_BURST,
        per_s: float = REFUSALS_PER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst, self.per_s, self.clock = burst, per_s, clock
        # identity -> (tokens, when counted, refusals not recorded since the last entry)
        self._left: dict[str, tuple[float, float, int]] = {}

    def take(self, identity: str) -> int | None:
        """None when this refusal is over the budget (it is counted instead); otherwise how
        many refusals of ``identity`` were not recorded before it."""
        now = self.clock()
        tokens, then, skipped = self._left.get(identity, (float(self.burst), now, 0))
        tokens = min(float(self.burst), tokens + (now - then) * self.per_s)
        if tokens < 1.0:
            if not skipped:
                log.warning(
                    "audit: refused calls by %s over %d at once or %g a second are not "
                    "recorded, only counted in the next entry",
                    identity or "callers without a certificate",
                    self.burst,
                    self.per_s,
                )
            self._left[identity] = (tokens, now, skipped + 1)
            return None
        self._left[identity] = (tokens - 1.0, now, 0)
        return skipped


class _Call:
    """One audited call: writes its entry at the start (changes) and at the end."""

    def __init__(
        self,
        store: AuditStore,
        service: str,
        method: str,
        kind: str,
        context: grpc.aio.ServicerContext,
        request: str,
        reads: bool,
    ) -> None:
        self.store, self.service, self.method, self.kind = store, service, method, kind
        self.context, self.request, self.reads = context, request, reads
        self.identity = _identity(context)
        self.peer = context.peer()
        self.started_at = time.time()
        self.t0 = time.perf_counter()
        self.entry = 0

    def begin(self) -> None:
        if self.kind == CHANGE:
            self.entry = self._safely(
                self.store.begin,
                self.identity,
                self.peer,
                self.service,
                self.method,
                self.request,
            )

    def _safely(self, fn: Callable[..., Any], *args: Any) -> Any:
        # The trail must not take the hub down with it (a full disk): the call goes on, the
        # failure is logged where operators look.
        try:
            return fn(*args)
        except Exception:
            log.exception(
                "audit: cannot record %s.%s by %r", self.service, self.method, self.identity
            )
            return 0

    def described(self, request: str) -> None:
        # Written at once: a hub killed during a long upload still shows what was uploaded.
        self.request = request
        if self.entry:
            self._safely(self.store.set_request, self.entry, request)

    def refused(self, why: str, budget: RefusalBudget) -> None:
        """The entry of a call the gate refused before anything ran, within the budget."""
        skipped = budget.take(self.identity)
        if skipped is None:
            return
        if skipped:
            why += (
                f" ({skipped} more refused calls by this identity were not recorded before "
                f"this one: over {budget.burst} at once or {budget.per_s:g} a second)"
            )
        ms = (time.perf_counter() - self.t0) * 1000.0
        self._safely(
            self.store.record,
            self.identity,
            self.peer,
            self.service,
            self.method,
            self.request,
            "PERMISSION_DENIED",
            why,
            ms,
            self.started_at,
        )

    def done(self, exc: BaseException | None) -> None:
        code, detail = _status(self.context, exc)
        ms = (time.perf_counter() - self.t0) * 1000.0
        if self.entry:
            self._safely(self.store.end, self.entry, code, detail, ms, self.request)
        elif self.kind in (CHANGE, EXPORT) or code != "OK" or self.reads:
            self._safely(
                self.store.record,
                self.identity,
                self.peer,
                self.service,
                self.method,
                self.request,
                code,
                detail,
                ms,
                self.started_at,
            )


# Worded as the handlers' own check (hub/server.py caller()) words them.
NO_CERTIFICATE = "a client certificate issued by the hub's CA is required"


def refusal(admins: Admins | None, context: grpc.aio.ServicerContext, method: str) -> str:
    """Why this caller may not make this call; empty when it may. Checked before anything is
    recorded as begun or runs: callers without a certificate (the enrollment port), identities
    that are neither admins nor agents, agents outside their own methods or not active (revoked),
    and admins whose role is too low, whose name is unknown or revoked, or whose key is not the
    one bound to the name. The handlers check again."""
    identity = _identity(context)
    if not identity:
        return NO_CERTIFICATE
    try:
        kind, name = parse_identity(identity)
    except IdentityError as exc:
        return str(exc)
    if kind != "admin":
        if kind != "agent" or method not in AGENT_METHODS:
            return f"{kind} identities may not call this method"
        if admins is None:
            return ""
        # mTLS still accepts a revoked agent's certificate; the registry does not.
        try:
            status = admins.registry.agent(name).status
        except ModelfleetError as exc:
            return str(exc)
        return "" if status == "active" else f"agent {name} is {status}"
    if admins is None:
        return ""
    (cert_pem,) = context.auth_context().get("x509_pem_cert") or [b""]
    try:
        role = admins.role_of(name, cert_pem)
    except ModelfleetError as exc:
        return str(exc)
    needed = METHOD_ROLES.get(method, ADMIN)
    if allows(role, needed):
        return ""
    return (
        f"admin:{name} has the {role} role; {method} needs {needed} or higher (an admin "
        f"changes it: modelfleet-hub admins set-role {name} {needed})"
    )


def _refused_request(context: grpc.aio.ServicerContext, message: Any) -> str:
    # A caller without a certificate can be anyone: what it sent is counted, not written out.
    if message is None:
        return "(stream)"
    if not _identity(context):
        return f"<{message.ByteSize()} bytes, not described: no client certificate>"
    return describe(message)


class AuditInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, store: AuditStore, settings: Any, admins: Admins | None = None) -> None:
        # ``settings.audit_reads`` is read at every call: a reload (SIGHUP) changes it.
        self.store = store
        self.settings = settings
        self.admins = admins
        self.budget = RefusalBudget()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        path = handler_call_details.method or ""
        service, _, method = path.lstrip("/").rpartition("/")
        if handler is None or service.rpartition(".")[2] not in AUDITED_SERVICES:
            return handler
        if not service.startswith(PACKAGE + "."):
            return handler
        kind = METHOD_KINDS.get(method, CHANGE)
        return self._wrap(handler, service, method, kind)

    def _wrap(self, handler: Any, service: str, method: str, kind: str) -> Any:
        store, settings, admins, budget = self.store, self.settings, self.admins, self.budget

        def start(context: Any, request: str) -> _Call:
            return _Call(store, service, method, kind, context, request, settings.audit_reads)

        async def gate(context: Any, message: Any) -> None:
            # Before a change's entry is begun and before the handler sees anything.
            why = refusal(admins, context, method)
            if why:
                start(context, _refused_request(context, message)).refused(why, budget)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                await gate(context, request)
                call = start(context, describe(request))
                call.begin()
                try:
                    answer = await inner_uu(request, context)
                except BaseException as exc:
                    call.done(exc)
                    raise
                call.done(None)
                return answer

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                await gate(context, request)
                call = start(context, describe(request))
                call.begin()
                try:
                    async for item in inner_us(request, context):
                        yield item
                except BaseException as exc:
                    call.done(exc)
                    raise
                call.done(None)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: Any, context: Any) -> Any:
                # Refused before the first message is read: nothing of the stream is taken in.
                await gate(context, None)
                # The first message of a stream says what it is (publish: the header), the rest
                # is data: only that one is described, once it has come.
                call = start(context, "(stream)")
                call.begin()

                async def first_described() -> AsyncIterator[Any]:
                    first = True
                    async for message in requests:
                        if first:
                            first = False
                            call.described(f"(stream) first message: {describe(message)}")
                        yield message

                try:
                    answer = await inner_su(first_described(), context)
                except BaseException as exc:
                    call.done(exc)
                    raise
                call.done(None)
                return answer

            return grpc.stream_unary_rpc_method_handler(
                stream_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no bidirectional streams among the admin services
