"""The admin services' gate: a gRPC server interceptor that checks the caller's role and
writes the audit trail.

One place rather than a line in each of fifty handlers, so a method added later is checked and
audited without anyone remembering to: its kind must be named in ``METHOD_KINDS`` and the role
it needs in ``METHOD_ROLES`` (a test checks that every method of the admin services is); an
unnamed one counts as a change that needs the admin role.
"""

from __future__ import annotations

import asyncio
import json
import logging
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

# Fields whose values are never recorded, only their size: their names say they may hold a
# secret (a webhook's signing secret, a token, a key, a password).
SECRET_WORDS = ("secret", "token", "password", "key")
# Items of a repeated field or map written out before the rest is only counted.
SHOWN_ITEMS = 20


def describe(message: Any) -> str:
    """A request on one line in protobuf's text form, with bytes fields and fields that may
    hold secrets given by their size only."""
    parts = []
    for field, value in message.ListFields():
        secret = any(word in field.name.lower() for word in SECRET_WORDS)
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
        return json.dumps(value, ensure_ascii=False)
    if field.enum_type is not None:
        named = field.enum_type.values_by_number.get(value)
        return named.name if named is not None else str(value)
    return str(value)


def _identity(context: grpc.aio.ServicerContext) -> str:
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode(errors="replace") if names else ""


def _status(context: grpc.aio.ServicerContext, exc: BaseException | None) -> tuple[str, str]:
    """(status name, detail) of a call that has ended."""
    if isinstance(exc, asyncio.CancelledError):
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
        if kind == CHANGE:
            self.entry = self._safely(
                store.begin, self.identity, self.peer, service, method, request
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


def refusal(admins: Admins | None, context: grpc.aio.ServicerContext, method: str) -> str:
    """Why an admin identity may not make this call; empty when it may (or when the caller is
    not an admin: the handler decides for agents and for callers without a certificate)."""
    if admins is None:
        return ""
    try:
        kind, name = parse_identity(_identity(context))
    except IdentityError:
        return ""
    if kind != "admin":
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


class AuditInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, store: AuditStore, settings: Any, admins: Admins | None = None) -> None:
        # ``settings.audit_reads`` is read at every call: a reload (SIGHUP) changes it.
        self.store = store
        self.settings = settings
        self.admins = admins

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
        store, settings, admins = self.store, self.settings, self.admins

        def start(context: Any, request: str) -> _Call:
            return _Call(store, service, method, kind, context, request, settings.audit_reads)

        async def check(context: Any) -> None:
            why = refusal(admins, context, method)
            if why:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                call = start(context, describe(request))
                try:
                    await check(context)
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
                call = start(context, describe(request))
                try:
                    await check(context)
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
                # The first message of a stream says what it is (publish: the header), the rest
                # is data: only that one is described, once it has come.
                call = start(context, "(stream)")

                async def first_described() -> AsyncIterator[Any]:
                    first = True
                    async for message in requests:
                        if first:
                            first = False
                            call.described(f"(stream) first message: {describe(message)}")
                        yield message

                try:
                    await check(context)
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
