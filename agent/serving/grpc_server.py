"""gRPC edge of the agent: the Open Inference Protocol, grpc.health.v1, and the local admin API.

Each handler converts, calls the core and converts back; errors from :mod:`kernel.errors` are
mapped to gRPC status codes in one place (:func:`_grpc_errors`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from modelfleet.agent import __version__
from modelfleet.agent.repository import ModelControl, compare_local
from modelfleet.agent.serving.admission import client_key
from modelfleet.agent.serving.capture import Capture, CaptureRule, LocalRules
from modelfleet.agent.serving.converters import request_from_proto, response_to_proto
from modelfleet.agent.serving.dataplane import DataPlane
from modelfleet.agent.serving.introspection import (
    extensions,
    model_config,
    model_metadata,
    repository_index,
    statistics,
)
from modelfleet.agent.serving.routing import ROUTING_KEY_HEADER, Comparison
from modelfleet.agent.serving.shm import (
    SharedMemoryRegistry,
    is_local_peer,
    output_placements,
    require_local,
)
from modelfleet.agent.serving.wire import decode_infer_request, encode_infer_response
from modelfleet.agent.slots import SlotManager
from modelfleet.kernel import tracing
from modelfleet.kernel.errors import (
    InvalidRequestError,
    ListenError,
    ModelfleetError,
    ModelNotFoundError,
    Status,
)
from modelfleet.kernel.grpc_options import server_options
from modelfleet.kernel.grpc_status import GRPC_CODES
from modelfleet.protos import agent_pb2, agent_pb2_grpc
from modelfleet.protos import inference_pb2 as pb
from modelfleet.protos import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


T = TypeVar("T")

# Requests of one ModelStreamInfer stream being answered at once. The reader stops taking
# messages beyond this, so a client that sends faster than the model answers is held back by
# gRPC flow control instead of growing a queue here.
STREAM_MAX_INFLIGHT = 32


def _grpc_errors(
    fn: Callable[..., Awaitable[T]],
) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await fn(self, request, context)
        except Exception as exc:
            await _abort(exc, context, fn.__name__)
            raise  # unreachable: _abort raises

    return wrapper


async def _abort(exc: Exception, context: grpc.aio.ServicerContext, method: str) -> NoReturn:
    """End the call with the status an error maps to (raises)."""
    if isinstance(exc, DecodeError):
        # A request that does not parse (ModelInfer parses its own): gRPC answers it as it
        # answers one its deserializer refuses (UNKNOWN, naming the error).
        raise exc
    if isinstance(exc, ModelfleetError):
        await context.abort(GRPC_CODES[exc.status], str(exc))
    else:
        log.exception("unexpected error in %s", method, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
    raise exc  # unreachable: abort raises


def _version_arg(version: str) -> str:
    return version.strip()


def _header_routing_key(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == ROUTING_KEY_HEADER:
            return value if isinstance(value, str) else value.decode()
    return ""


# Set by a client that waits for a flagged last response per request (tritonclient's
# enable_empty_final_response); each request here has exactly one response, so it is that one.
_WANTS_FINAL_FLAG = "triton_enable_empty_final_response"
_FINAL_FLAG = "triton_final_response"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        slots: SlotManager,
        dataplane: DataPlane,
        control: ModelControl | None = None,
        shm: SharedMemoryRegistry | None = None,
    ) -> None:
        self.slots = slots
        self.dataplane = dataplane
        self.control = control or ModelControl()
        self.shm = shm if shm is not None else SharedMemoryRegistry()
        # Set once at start (kernel/tracing.py); None: every request skips tracing with one check.
        self.tracing = tracing.current()

    @_grpc_errors
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @_grpc_errors
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.slots.all_ready())

    @_grpc_errors
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(
            ready=self.slots.is_ready(request.name, _version_arg(request.version))
        )

    @_grpc_errors
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name="modelfleet", version=__version__, extensions=extensions(self.control)
        )

    @_grpc_errors
    async def ModelMetadata(self, request, context):
        v = self.slots.resolve(request.name, _version_arg(request.version))
        return model_metadata(self.slots, v)

    @_grpc_errors
    async def ModelConfig(self, request, context):
        v = self.slots.resolve(request.name, _version_arg(request.version))
        return pb.ModelConfigResponse(config=model_config(v))

    @_grpc_errors
    async def ModelStatistics(self, request, context):
        return statistics(self.slots, request.name, _version_arg(request.version))

    @_grpc_errors
    async def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in repository_index(self.slots, request.ready)
            ]
        )

    @_grpc_errors
    async def RepositoryModelLoad(self, request, context):
        params = {k: v.WhichOneof("parameter_choice") for k, v in request.parameters.items()}
        await self.control.load(request.model_name, params)
        return pb.RepositoryModelLoadResponse()

    @_grpc_errors
    async def RepositoryModelUnload(self, request, context):
        # unload_dependents: no model here has dependents, so there is nothing more to unload.
        await self.control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One response per request, in request order; a failed request gets its error in
        ``error_message`` and the stream goes on. At most STREAM_MAX_INFLIGHT are answered at
        once (they batch together like unary requests)."""
        header_key = _header_routing_key(context)
        # One client for the whole stream: its requests share that client's rate-limit bucket.
        client = grpc_client_key(context) if self.dataplane.admission.clients is not None else ""
        shm = self._shm_for(context)
        # Trace context comes with the call's metadata: every message's span continues it.
        carrier = (
            tracing.carrier_of(context.invocation_metadata()) if self.tracing is not None else None
        )
        room = asyncio.Semaphore(STREAM_MAX_INFLIGHT)
        # Answers in request order; bounded by `room`, and None marks the end of the requests.
        pending: asyncio.Queue[asyncio.Future[pb.ModelStreamInferResponse] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for msg in request_iterator:
                    await room.acquire()
                    pending.put_nowait(
                        asyncio.ensure_future(
                            self._stream_one(msg, header_key, client, shm, carrier)
                        )
                    )
            finally:
                pending.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (answer := await pending.get()) is not None:
                try:
                    yield await answer
                finally:
                    room.release()
            await reader  # a broken request stream ends the call with its error
        finally:
            reader.cancel()
            while not pending.empty():
                left = pending.get_nowait()
                if left is not None:
                    left.cancel()

    async def _stream_one(
        self,
        msg: Any,
        header_key: str,
        client: str,
        shm: SharedMemoryRegistry | None,
        carrier: dict[str, str] | None = None,
    ) -> pb.ModelStreamInferResponse:
        try:
            req = request_from_proto(msg, shm)
            placed = output_placements(shm, req.output_parameters)
            if not req.routing_key:
                req.routing_key = header_key
            req.client = client
            if self.tracing is None:
                resp = response_to_proto(await self.dataplane.infer(req), shm, placed)
            else:
                resp = await self._traced(req, carrier, "ModelStreamInfer", shm, placed)
            out = pb.ModelStreamInferResponse(infer_response=resp)
        except ModelfleetError as exc:
            out = pb.ModelStreamInferResponse(
                error_message=str(exc),
                infer_response=pb.ModelInferResponse(
                    model_name=msg.model_name, model_version=msg.model_version, id=msg.id
                ),
            )
        except Exception as exc:
            log.exception("unexpected error in a ModelStreamInfer request")
            out = pb.ModelStreamInferResponse(
                error_message=f"internal error: {exc}",
                infer_response=pb.ModelInferResponse(model_name=msg.model_name, id=msg.id),
            )
        wants = msg.parameters.get(_WANTS_FINAL_FLAG) if msg.parameters else None
        if wants is not None and wants.bool_param:
            out.infer_response.parameters[_FINAL_FLAG].bool_param = True
        return out

    async def ModelInfer(self, request, context):
        # Registered without a request deserializer (add_inference_service): ``request`` is
        # the message's bytes, most often decoded here without protobuf. Errors are handled
        # here as _grpc_errors would, without its extra coroutine on every request.
        try:
            req = decode_infer_request(request)
            if req is not None:
                # The plain form places nothing in shared memory: no peer check needed.
                shm, placed = None, None
            else:
                # A DecodeError passes through _abort: gRPC answers it as it answered its own
                # deserializer's.
                msg = pb.ModelInferRequest.FromString(request)
                shm = self._shm_for(context)
                req = request_from_proto(msg, shm)
                placed = output_placements(shm, req.output_parameters)
            if not req.routing_key and self._compared(req.model_name):
                req.routing_key = _header_routing_key(context)
            if self.dataplane.admission.clients is not None:
                req.client = grpc_client_key(context)
            # The serialized response: the method is registered without a response serializer
            # (add_inference_service).
            if self.tracing is None:
                return encode_infer_response(await self.dataplane.infer(req), shm, placed)
            carrier = tracing.carrier_of(context.invocation_metadata())
            return await self._traced(
                req, carrier, "ModelInfer", shm, placed, encode_infer_response
            )
        except Exception as exc:
            await _abort(exc, context, "ModelInfer")

    def _shm_for(self, context: grpc.aio.ServicerContext) -> SharedMemoryRegistry | None:
        """The registry for a client on this host; None (shared memory refused) for others."""
        return self.shm if is_local_peer(context.peer()) else None

    @_grpc_errors
    async def SystemSharedMemoryRegister(self, request, context):
        require_local(context.peer())
        self.shm.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @_grpc_errors
    async def SystemSharedMemoryUnregister(self, request, context):
        require_local(context.peer())
        self.shm.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @_grpc_errors
    async def SystemSharedMemoryStatus(self, request, context):
        require_local(context.peer())
        out = pb.SystemSharedMemoryStatusResponse()
        for r in self.shm.status(request.name):
            out.regions[r.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size
                )
            )
        return out

    async def _no_cuda(self, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "CUDA shared memory is not supported: this agent runs models on the CPU; use "
            "system shared memory (register_system_shared_memory) or send tensors in the request",
        )

    async def CudaSharedMemoryRegister(self, request, context):
        return await self._no_cuda(context)

    async def CudaSharedMemoryUnregister(self, request, context):
        # No CUDA region can exist here, so there is nothing to unregister; clients clean up
        # with this after every run (perf_analyzer reports a failure otherwise).
        return pb.CudaSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request, context):
        return await self._no_cuda(context)

    def _compared(self, model: str) -> bool:
        """Whether the routing key matters: only a live comparison reads it (DataPlane._route,
        reached before the first await, so the answer still holds there). Reading the metadata
        on every request costs a few microseconds for nothing otherwise."""
        slot = self.slots.slots.get(model)
        return slot is not None and slot.comparison is not None

    async def _traced(
        self,
        req: Any,
        carrier: dict[str, str] | None,
        method: str,
        shm: SharedMemoryRegistry | None,
        placed: Any = None,
        encode: Callable[..., Any] = response_to_proto,
    ) -> Any:
        """One request's server span (a unary call, or one message of a stream), continuing
        the caller's W3C trace context from the call's metadata; the data plane adds the
        queue, inference and shadow spans under it (req.trace)."""
        assert self.tracing is not None
        with self.tracing.span(
            f"inference.GRPCInferenceService/{method}",
            carrier=carrier,
            kind="server",
            attributes={
                "rpc.system": "grpc",
                "rpc.service": "inference.GRPCInferenceService",
                "rpc.method": method,
                tracing.MODEL: req.model_name,
            },
        ) as span:
            req.trace = span
            return encode(await self.dataplane.infer(req), shm, placed)


def grpc_client_key(context: grpc.aio.ServicerContext) -> str:
    """Whom the per-client rate limit counts this call against (admission.client_key)."""
    identities = context.peer_identities()
    identity = identities[0].decode(errors="replace") if identities else ""
    return client_key(context.peer(), identity)


class AdminServicer(agent_pb2_grpc.AgentAdminServicer):
    def __init__(
        self,
        slots: SlotManager,
        listen: str,
        fleet_hub: str = "",
        models: Path | None = None,
        capture: Capture | None = None,
    ) -> None:
        self.slots = slots
        self.listen = listen
        self.fleet_hub = fleet_hub
        self.models = models
        self.capture = capture

    @_grpc_errors
    async def Status(self, request, context):
        return agent_pb2.StatusResponse(
            models=[_status_to_proto(s, self.slots) for s in self.slots.status()],
            ready=self.slots.all_ready(),
            listen=self.listen,
        )

    @_grpc_errors
    async def Compare(self, request, context):
        if self.fleet_hub or self.models is None:
            raise _FleetOwned(
                f"this agent follows the hub at {self.fleet_hub}: the hub decides what is "
                "compared (`modelfleet-hub experiment start MODEL --candidate V ...`)"
            )
        comparison = None
        if not request.off:
            try:
                comparison = Comparison(
                    request.candidate_version,
                    request.split_bp,
                    request.sticky,
                    request.shadow_bp,
                    "local",
                )
            except ValueError as exc:
                raise InvalidRequestError(f"compare: {exc}") from None
            if not comparison.active:
                raise InvalidRequestError(
                    "compare: give a share (--split PCT or --shadow PCT above 0), or --off"
                )
        status = await compare_local(self.slots, self.models, request.model, comparison)
        await self.slots.sync_replicas()  # every serving process splits the same way first
        return agent_pb2.CompareResponse(model=_status_to_proto(status, self.slots))

    @_grpc_errors
    async def Capture(self, request, context):
        if self.fleet_hub or self.capture is None:
            raise _FleetOwned(
                f"this agent follows the hub at {self.fleet_hub}: the hub decides what is "
                "captured (`modelfleet-hub capture set MODEL --rate PCT`)"
            )
        cap = self.capture
        if request.model not in self.slots.slots:
            raise ModelNotFoundError(
                f"capture: no model {request.model!r} here (models: "
                f"{', '.join(sorted(self.slots.slots)) or 'none'})"
            )
        if request.off:
            cap.set_rule(request.model, None)
        else:
            if request.rate_bp == 0:
                raise InvalidRequestError("capture: give --rate PCT above 0, or --off")
            cap.set_rule(
                request.model,
                CaptureRule(request.rate_bp, tuple(request.exclude), tuple(request.hash)),
            )
        await asyncio.to_thread(LocalRules(cap.limits.dir).save, dict(cap.rules))
        # Answered once every serving process captures by the new rule.
        await self.slots.sync_replicas()
        rule = cap.rules.get(request.model)
        files = [f for f in cap.files() if f.parent.name == request.model]
        return agent_pb2.CaptureResponse(
            model=request.model,
            rate_bp=rule.rate_bp if rule else 0,
            exclude=list(rule.exclude) if rule else [],
            hash=list(rule.hash) if rule else [],
            captured=cap.captured.get(request.model, 0),
            dropped=cap.dropped.get(request.model, 0),
            files=len(files),
        )

    @_grpc_errors
    async def Rollback(self, request, context):
        if self.fleet_hub:
            # The hub owns desired state in fleet mode; a local switch would be undone at the
            # next resync, so say where rollbacks are made instead.
            raise _FleetOwned(
                f"this agent follows the hub at {self.fleet_hub}: roll back with "
                "`modelfleet-hub rollout rollback MODEL` or `modelfleet-hub deploy MODEL VERSION`"
            )
        frm, to = self.slots.rollback(request.model)
        # Answered once every serving process has rolled back too.
        await self.slots.sync_replicas()
        return agent_pb2.RollbackResponse(from_version=frm, to_version=to)


def _gate_to_proto(g: Any) -> agent_pb2.GateResult:
    return agent_pb2.GateResult(
        version=g.version,
        passed=g.passed,
        reason=g.reason,
        kind=g.kind,
        p99_ms=g.p99_ms if g.p99_ms is not None else -1.0,
        at_unix=g.at,
        min_ms=g.min_ms if g.min_ms is not None else -1.0,
    )


def _comparison_to_proto(s: Any, slots: SlotManager) -> agent_pb2.Comparison:
    c = s.comparison
    msg = agent_pb2.Comparison(
        candidate_version=c.candidate,
        split_bp=c.split_bp,
        sticky=c.sticky,
        shadow_bp=c.shadow_bp,
        label=c.label,
        comparing=s.comparing,
    )
    if s.active is not None:
        for cells in slots.metrics.telemetry.shadow_cells(s.name):
            if (cells.version, cells.shadow_version) == (s.active, c.candidate):
                compared, dropped, failures, agree, total = cells.totals()
                msg.shadow_compared = compared
                msg.shadow_dropped = dropped
                msg.shadow_failures = failures
                msg.top1_agree = agree
                msg.top1_total = total
                msg.max_abs_diff = cells.max_abs
    return msg


def _status_to_proto(s: Any, slots: SlotManager | None = None) -> agent_pb2.ModelStatus:
    msg = agent_pb2.ModelStatus(
        name=s.name,
        active_version=s.active or 0,
        previous_version=s.previous or 0,
        loading_version=s.loading or 0,
        ready=s.ready,
        failed=[_gate_to_proto(r) for _, r in sorted(s.failed.items())],
        held_at_or_below=s.held_at_or_below or 0,
        active_provider=s.active_provider,
        previous_provider=s.previous_provider,
        active_path=s.active_path,
        previous_path=s.previous_path,
    )
    if s.last_gate is not None:
        msg.last_gate.CopyFrom(_gate_to_proto(s.last_gate))
    if s.comparison is not None and slots is not None:
        msg.comparison.CopyFrom(_comparison_to_proto(s, slots))
    return msg


class HealthReporter:
    """Keeps grpc.health.v1 in step with readiness: overall ("") and one entry per model."""

    def __init__(self, slots: SlotManager) -> None:
        self.slots = slots
        self.servicer = health.aio.HealthServicer()
        self._known: set[str] = set()
        self.draining = False

    async def refresh(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        overall = self.slots.all_ready() and not self.draining
        await self.servicer.set("", serving if overall else not_serving)
        names = set(self.slots.slots)
        for name in names:
            ok = self.slots.is_ready(name) and not self.draining
            await self.servicer.set(name, serving if ok else not_serving)
        for gone in self._known - names:
            await self.servicer.set(gone, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        self._known = names


INFERENCE_SERVICE = "inference.GRPCInferenceService"


class _HandlerTable:
    """Stands in for the server while the generated code registers the service, to keep the
    table of method handlers it builds."""

    handlers: dict[str, grpc.RpcMethodHandler] | None = None

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.handlers = dict(handlers)


def add_inference_service(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """The generated registration of the Open Inference Protocol service, except that
    ModelInfer has neither request deserializer nor response serializer: its handler takes the
    request's bytes and returns the response's (wire.decode_infer_request and
    encode_infer_response), which costs a fraction of going through protobuf messages. gRPC
    passes bytes as they are where a method has no (de)serializer."""
    table = _HandlerTable()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, table)
    handlers = table.handlers
    if handlers is None or "ModelInfer" not in handlers:
        raise RuntimeError(
            "the generated inference_pb2_grpc registers no ModelInfer handler table; "
            "regenerate it with the grpcio-tools in pyproject.toml (make protos)"
        )
    handlers["ModelInfer"] = handlers["ModelInfer"]._replace(
        request_deserializer=None, response_serializer=None
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(INFERENCE_SERVICE, handlers),)
    )
    server.add_registered_method_handlers(INFERENCE_SERVICE, handlers)


def build_server(
    slots: SlotManager,
    dataplane: DataPlane,
    health_reporter: HealthReporter,
    listen: str,
    max_message_bytes: int,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    control: ModelControl | None = None,
    shm: SharedMemoryRegistry | None = None,
    *,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int]:
    """The inference server; plaintext unless ``credentials`` (see agent.serving.security).

    ``reuse_port``: the port is shared with the agent's serving workers (agent/workers.py);
    otherwise a second server on a busy port fails to bind.
    """
    options = server_options(max_message_bytes)
    if reuse_port:
        options = [o for o in options if o[0] != "grpc.so_reuseport"] + [("grpc.so_reuseport", 1)]
    server = grpc.aio.server(options=options, interceptors=interceptors)
    add_inference_service(InferenceServicer(slots, dataplane, control, shm), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_reporter.servicer, server)
    # Reflection, so grpcurl and similar tools can list and call the services without the
    # .proto files; it describes only the public protocol (the admin API is on its own socket).
    reflection.enable_server_reflection(
        (
            pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise ListenError(f"cannot listen on {listen} (address in use or not local?)")
    return server, port


class _FleetOwned(ModelfleetError):
    status = Status.FAILED_PRECONDITION
    reason = "fleet_mode"


def claim_admin_socket(path: Path) -> None:
    """Refuse to start while another agent answers on ``path``; remove a stale socket.

    Binding would silently take the socket over (gRPC unlinks what is there), and the first
    agent would become unreachable for `status` and `rollback`, and lose its socket when the
    second one exits. A connection tells a live socket from one a killed agent left behind.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidRequestError(
            f"admin socket path {path} exists and is not a socket: move that file away, or "
            "give the agent another --admin-socket PATH (setting admin_socket)"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing the stale admin socket %s (no agent answers on it)", path)
            path.unlink(missing_ok=True)
            return
        except OSError as exc:
            raise ListenError(
                f"cannot tell whether another agent uses the admin socket {path}: {exc.strerror}; "
                "give this agent its own --admin-socket PATH (setting admin_socket)"
            ) from None
    raise ListenError(
        f"another agent is running on the admin socket {path}: stop it first, or give this one "
        "its own --admin-socket PATH (setting admin_socket; standalone, it defaults to "
        "MODELS/.modelfleet-admin.sock, so one agent per --models)"
    )


def build_admin_server(
    slots: SlotManager,
    socket_path: Path,
    listen: str,
    fleet_hub: str = "",
    models: Path | None = None,
    capture: Capture | None = None,
) -> grpc.aio.Server:
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentAdminServicer_to_server(
        AdminServicer(slots, listen, fleet_hub, models, capture), server
    )
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if socket_path.exists():
        socket_path.unlink()
    # Creating the socket under a 0077 umask makes it 0600 from the first instant.
    old = os.umask(0o077)
    try:
        server.add_insecure_port(f"unix:{socket_path}")
    finally:
        os.umask(old)
    return server
