"""HTTP/REST edge of the agent: the Open Inference Protocol (KServe v2) with Triton's binary
tensor, classification, statistics and model repository extensions, on aiohttp in the agent's
event loop. What it says about the server and its models comes from introspection.py, as gRPC's.

Each handler converts (rest_converters.py), calls the same core as gRPC (DataPlane, SlotManager)
and converts back; errors from :mod:`kernel.errors` become an HTTP status and
``{"error": "..."}`` in one place (:meth:`OipHttp._guard`, by ``HTTP_STATUS``).
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from modelfleet.agent import __version__
from modelfleet.agent.repository import ModelControl
from modelfleet.agent.serving.admission import RequestTooLargeError, ShedError, client_key
from modelfleet.agent.serving.dataplane import DataPlane, InferResponse
from modelfleet.agent.serving.http_body import read_body
from modelfleet.agent.serving.introspection import (
    Draining,
    extensions,
    model_config,
    model_metadata,
    repository_index,
    statistics,
)
from modelfleet.agent.serving.rest_converters import (
    HEADER_LENGTH,
    OutputForm,
    object_body,
    parameters_of,
    request_from_http,
    response_to_http,
    strict_dumps,
)
from modelfleet.agent.serving.routing import ROUTING_KEY_HEADER
from modelfleet.agent.serving.security import BearerTokenInterceptor
from modelfleet.agent.serving.shm import (
    Placement,
    SharedMemoryRegistry,
    is_local_peer,
    output_placements,
)
from modelfleet.agent.serving.shm_http import routes as shm_routes
from modelfleet.agent.slots import LoadedVersion, SlotManager
from modelfleet.kernel import tracing
from modelfleet.kernel.errors import InvalidRequestError, ListenError, ModelfleetError
from modelfleet.kernel.http_status import HTTP_STATUS
from modelfleet.kernel.settings import split_hostport

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
# What this edge serves beyond the extensions both edges share (introspection.extensions).
HTTP_EXTENSIONS = ("binary_tensor_data",)
_JSON = "application/json"
_HEALTH_PREFIX = "/v2/health/"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=strict_dumps({"error": message}).encode(), content_type=_JSON
    )


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=strict_dumps(doc).encode(), content_type=_JSON)


def proto_json(msg: Message) -> dict[str, Any]:
    """A protobuf message as Triton's HTTP API spells it: field names as in the .proto, enums
    by name, and 64-bit integers as JSON numbers (protobuf's own JSON mapping makes them
    strings, which clients of Triton's statistics do not expect)."""
    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        if fd.is_repeated:
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                vfd = fd.message_type.fields_by_name["value"]
                out[fd.name] = {k: _field_value(vfd, v) for k, v in value.items()}
            else:
                out[fd.name] = [_field_value(fd, v) for v in value]
        elif fd.type == FieldDescriptor.TYPE_MESSAGE or fd.containing_oneof is not None:
            if msg.HasField(fd.name):
                out[fd.name] = _field_value(fd, value)
        else:
            out[fd.name] = _field_value(fd, value)
    return out


def _field_value(fd: FieldDescriptor, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return proto_json(value)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return fd.enum_type.values_by_number[value].name
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return value.hex()
    return value


class OipHttp:
    """The routes; ``slots``, ``dataplane``, ``health`` and ``control`` are the ones gRPC serves
    from."""

    def __init__(
        self,
        slots: SlotManager,
        dataplane: DataPlane,
        health: Draining,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        token: BearerTokenInterceptor | None = None,
        control: ModelControl | None = None,
        shm: SharedMemoryRegistry | None = None,
    ) -> None:
        # The registry gRPC serves from, so a region registered on either edge serves both.
        self.shm = shm if shm is not None else SharedMemoryRegistry()
        self.slots = slots
        self.dataplane = dataplane
        self.health = health
        self.control = control or ModelControl()
        self.max_request_bytes = max_request_bytes
        self.token = token
        self.tracing = tracing.current()

    def app(self) -> web.Application:
        # client_max_size also bounds bodies without a Content-Length (chunked uploads).
        app = web.Application(client_max_size=self.max_request_bytes, middlewares=[self._guard])
        get, post = web.get, web.post
        model = "/v2/models/{model}"
        versioned = "/v2/models/{model}/versions/{version}"
        routes = [
            get("/v2", self.server_metadata),
            get("/v2/health/live", self.live),
            get("/v2/health/ready", self.ready),
            get("/v2/models/stats", self.statistics),
            post("/v2/repository/index", self.repository_index),
            post("/v2/repository/models/{model}/load", self.load),
            post("/v2/repository/models/{model}/unload", self.unload),
        ]
        for base in (model, versioned):
            routes += [
                get(base, self.model_metadata),
                get(base + "/ready", self.model_ready),
                get(base + "/config", self.model_config),
                get(base + "/stats", self.statistics),
                post(base + "/infer", self.infer),
            ]
        routes += shm_routes(self.shm, self.max_request_bytes)
        app.add_routes(routes)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Size and token before a handler reads anything; then every error becomes a status
        and ``{"error": ...}`` here, the one place this edge maps them."""
        size = request.content_length
        if size is not None and size > self.max_request_bytes:
            return error_response(
                413,
                f"request body is {size} bytes; this agent accepts at most "
                f"{self.max_request_bytes} (setting http_max_request_bytes)",
            )
        if self.token is not None and not request.path.startswith(_HEALTH_PREFIX):
            why = self.token.refusal(
                [("authorization", v) for v in request.headers.getall("Authorization", [])],
                f"HTTP {request.path}",
            )
            if why:
                resp = error_response(
                    401,
                    why.replace("gRPC metadata", "the HTTP header").replace("metadata", "header"),
                )
                resp.headers["WWW-Authenticate"] = "Bearer"
                return resp
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                413,
                f"request body is larger than the {self.max_request_bytes} bytes this agent "
                "accepts (setting http_max_request_bytes)",
            )
        except web.RequestPayloadError as exc:
            # A body that is not in the Content-Encoding it names (aiohttp decodes gzip/deflate).
            why = " ".join(str(exc).split())
            return error_response(
                400, f"cannot read the request body (check its Content-Encoding): {why}"
            )
        except web.HTTPNotFound:
            return error_response(
                404,
                f"no such endpoint: {request.method} {request.path} (the Open Inference Protocol "
                "endpoints are under /v2; see docs/protocol.md)",
            )
        except web.HTTPMethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.allowed_methods))
            return error_response(
                405, f"{request.method} is not allowed on {request.path}; use {allowed}"
            )
        except RequestTooLargeError as exc:
            # RESOURCE_EXHAUSTED on gRPC, but a retry of the same request cannot succeed.
            return error_response(413, str(exc))
        except ShedError as exc:
            resp = error_response(429, str(exc))
            resp.headers["Retry-After"] = str(math.ceil(exc.retry_after_s))
            return resp
        except ModelfleetError as exc:
            return error_response(HTTP_STATUS[exc.status], str(exc))
        except Exception as exc:
            log.exception("unexpected error in HTTP %s %s", request.method, request.path)
            return error_response(500, f"internal error: {exc}")

    def _resolve(self, request: web.Request) -> LoadedVersion:
        info = request.match_info
        return self.slots.resolve(info["model"], info.get("version", "").strip())

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(
            {
                "name": "modelfleet",
                "version": __version__,
                "extensions": extensions(self.control, HTTP_EXTENSIONS),
            }
        )

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        if self.health.draining:
            return error_response(503, "shutting down: finishing in-flight requests")
        if not self.slots.all_ready():
            names = [s.name for s in self.slots.status() if s.active is None]
            why = (
                f"no version serves yet for {', '.join(names)}" if names else "no model loaded yet"
            )
            return error_response(503, f"not ready: {why}")
        return web.Response(status=200)

    async def model_ready(self, request: web.Request) -> web.Response:
        self._resolve(request)
        if self.health.draining:
            return error_response(503, "shutting down: finishing in-flight requests")
        return web.Response(status=200)

    async def model_metadata(self, request: web.Request) -> web.Response:
        return _json(proto_json(model_metadata(self.slots, self._resolve(request))))

    async def model_config(self, request: web.Request) -> web.Response:
        return _json(proto_json(model_config(self._resolve(request))))

    async def statistics(self, request: web.Request) -> web.Response:
        info = request.match_info
        stats = statistics(self.slots, info.get("model", ""), info.get("version", "").strip())
        return _json(proto_json(stats))

    async def repository_index(self, request: web.Request) -> web.Response:
        doc = object_body(
            await read_body(request, self.max_request_bytes), "repository index", '{"ready": true}'
        )
        ready_only = doc.get("ready", False)
        if not isinstance(ready_only, bool):
            raise InvalidRequestError(
                'repository index: "ready" must be true or false, as in {"ready": true}'
            )
        models: list[dict[str, str]] = []
        for e in repository_index(self.slots, ready_only):
            entry = {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
            models.append({k: v for k, v in entry.items() if v})
        return _json(models)

    async def load(self, request: web.Request) -> web.Response:
        doc = object_body(
            await read_body(request, self.max_request_bytes), "load", '{"parameters": {}}'
        )
        await self.control.load(request.match_info["model"], parameters_of(doc, "load"))
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        doc = object_body(
            await read_body(request, self.max_request_bytes),
            "unload",
            '{"parameters": {"unload_dependents": false}}',
        )
        # unload_dependents: no model here has dependents, so there is nothing more to unload.
        parameters_of(doc, "unload")
        await self.control.unload(request.match_info["model"])
        return web.Response(status=200)

    async def infer(self, request: web.Request) -> web.Response:
        body = await read_body(request, self.max_request_bytes)
        info = request.match_info
        # Shared memory only for clients on this host (agent/serving/shm.py).
        shm = self.shm if is_local_peer(request.remote) else None
        req, form = request_from_http(
            body,
            request.headers.get(HEADER_LENGTH),
            info["model"],
            info.get("version", "").strip(),
            shm,
        )
        placed = output_placements(shm, req.output_parameters)
        if not req.routing_key:
            req.routing_key = request.headers.get(ROUTING_KEY_HEADER, "")
        if self.dataplane.admission.clients is not None:
            req.client = http_client_key(request)
        if self.tracing is None:
            resp = await self.dataplane.infer(req)
            payload, json_length = self._encode(resp, form, shm, placed)
        else:
            with self.tracing.span(
                "POST /v2/models/{model}/infer",
                carrier=tracing.carrier_of((k.lower(), v) for k, v in request.headers.items()),
                kind="server",
                attributes={
                    "http.request.method": "POST",
                    "url.path": request.path,
                    tracing.MODEL: req.model_name,
                },
            ) as span:
                req.trace = span
                resp = await self.dataplane.infer(req)
                payload, json_length = self._encode(resp, form, shm, placed)
        if json_length is None:
            return web.Response(body=payload, content_type=_JSON)
        out = web.Response(body=payload, content_type="application/octet-stream")
        out.headers[HEADER_LENGTH] = str(json_length)
        return out

    def _encode(
        self,
        resp: InferResponse,
        form: OutputForm,
        shm: SharedMemoryRegistry | None,
        placed: dict[str, Placement] | None,
    ) -> tuple[bytes, int | None]:
        try:
            return response_to_http(resp, form, shm, placed)
        except InvalidRequestError as exc:
            # The model ran (a success in its statistics), but the answer cannot travel as the
            # client asked (NaN as JSON, bytes that are not UTF-8): counted here, or the 400
            # would show nowhere on the server.
            self.dataplane.metrics.refused_responses.labels(
                resp.model_name, resp.model_version, exc.reason
            ).inc()
            raise


def http_client_key(request: web.Request) -> str:
    """Whom the per-client rate limit counts this request against: the same key gRPC would give
    the same client (admission.client_key; the peer written as gRPC writes it)."""
    transport = request.transport
    peername = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        peer = f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
    else:
        peer = f"unix:{peername}" if peername else ""
    cert = transport.get_extra_info("peercert") if transport is not None else None
    return client_key(peer, cert_identity(cert) if cert else "")


def cert_identity(cert: dict[str, Any]) -> str:
    """A verified client certificate's identity as gRPC reports it (peer_identities): its first
    subject alternative name, else its common name."""
    for _kind, value in cert.get("subjectAltName", ()):
        return str(value)
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


class HttpServer:
    """Runs :class:`OipHttp` on ``listen`` until :meth:`stop`."""

    def __init__(
        self,
        routes: OipHttp,
        listen: str,
        ssl_context: ssl.SSLContext | None = None,
        drain_timeout_s: float = 10.0,
        *,
        reuse_port: bool = False,
    ) -> None:
        self.routes = routes
        self.listen = listen
        self.ssl_context = ssl_context
        # Shared with the agent's serving workers (agent/workers.py).
        self.reuse_port = reuse_port
        self.drain_timeout_s = drain_timeout_s
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> int:
        host, port = split_hostport(self.listen, "http_listen")
        # No access log: one line per request would cost more than the request on small models.
        runner = web.AppRunner(
            self.routes.app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.drain_timeout_s,
        )
        await runner.setup()
        try:
            site: web.BaseSite
            if host == "::":
                sock = dual_stack_socket(port, reuse_port=self.reuse_port)
                site = web.SockSite(runner, sock, ssl_context=self.ssl_context)
            else:
                site = web.TCPSite(
                    runner,
                    host,
                    port,
                    ssl_context=self.ssl_context,
                    reuse_port=self.reuse_port or None,
                )
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ListenError(
                f"cannot serve HTTP on {self.listen}: {exc.strerror or exc}; set another port "
                "with --http-listen"
            ) from None
        self.runner = runner
        self.port = runner.addresses[0][1] if runner.addresses else port
        return self.port

    async def stop(self) -> None:
        """Stop accepting; in-flight requests get up to drain_timeout_s, then all is closed."""
        if self.runner is None:
            return
        await self.runner.cleanup()
        self.runner = None


def dual_stack_socket(port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening socket on ``[::]:port`` that takes IPv4 clients too (as mapped addresses),
    as gRPC's ``[::]`` does. asyncio would set IPV6_V6ONLY and leave IPv4 clients refused."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
