"""gRPC edge of inference capture (service ``HubCapture``): identity, conversion, nothing else."""

from __future__ import annotations

import asyncio

from modelfleet.hub.capture import CaptureService, UploadHeader
from modelfleet.hub.core import HubCore
from modelfleet.hub.registry import CaptureSetting
from modelfleet.hub.server import caller, streaming, unary
from modelfleet.kernel.errors import InvalidRequestError
from modelfleet.protos import fleet_pb2 as pb
from modelfleet.protos import fleet_pb2_grpc as pb_grpc

# Arrow IPC bytes per QueryCapture message: well under the gRPC message limits.
QUERY_CHUNK = 1024 * 1024


def setting_to_proto(s: CaptureSetting) -> pb.CaptureSetting:
    return pb.CaptureSetting(
        model=s.model,
        selector=dict(s.selector),
        rate_bp=s.rate_bp,
        exclude=list(s.exclude),
        hash=list(s.hash),
        created_at=s.created_at,
        actor=s.actor,
    )


def _header(f: pb.CaptureFile) -> UploadHeader:
    return UploadHeader(f.model, f.file_id, f.size, f.sha256, f.offset).check()


class CaptureServicer(pb_grpc.HubCaptureServicer):
    def __init__(self, core: HubCore, capture: CaptureService) -> None:
        self.core = core
        self.capture = capture

    @unary
    async def CaptureOffset(self, request, context):
        agent_id = caller(context, "agent")
        self.core.authorize_agent(agent_id)
        have, stored = self.capture.store.state(agent_id, _header(request))
        return pb.CaptureFileState(have=have, stored=stored)

    @unary
    async def UploadCapture(self, request_iterator, context):
        agent_id = caller(context, "agent")
        self.core.authorize_agent(agent_id)
        sink = None
        header = None
        try:
            async for chunk in request_iterator:
                if chunk.HasField("header"):
                    if header is not None:
                        raise InvalidRequestError("capture upload sent a second header")
                    header = _header(chunk.header)
                    sink = self.capture.store.open_upload(agent_id, header)
                    if sink is None:
                        break  # stored before: nothing is written twice
                    continue
                if header is None:
                    raise InvalidRequestError("capture upload must start with a header")
                if sink is not None:
                    sink.write(chunk.data)
            if header is None:
                raise InvalidRequestError("capture upload without a header")
            if sink is None:
                have, _ = self.capture.store.state(agent_id, header)
                return pb.CaptureFileState(have=have, stored=True)
            have, stored = await asyncio.to_thread(sink.finish)
            sink = None
            return pb.CaptureFileState(have=have, stored=stored)
        finally:
            if sink is not None:
                sink.close()

    @unary
    async def SetCapture(self, request, context):
        actor = caller(context, "admin")
        setting = self.capture.set(
            request.model,
            dict(request.selector),
            request.rate_bp,
            tuple(request.exclude),
            tuple(request.hash),
            actor,
        )
        await self.core.notify_changed()
        return setting_to_proto(setting)

    @unary
    async def RemoveCapture(self, request, context):
        caller(context, "admin")
        selector = dict(request.selector) if request.selector else None
        removed = self.capture.remove(request.model, selector)
        await self.core.notify_changed()
        return pb.RemoveCaptureResponse(removed=removed)

    @unary
    async def ListCapture(self, request, context):
        caller(context, "admin")
        stored = await asyncio.to_thread(self.capture.store.stored)
        return pb.ListCaptureResponse(
            settings=[setting_to_proto(s) for s in self.capture.registry.capture_settings()],
            stored=[
                pb.CaptureModelFiles(model=s.model, files=s.files, bytes=s.bytes) for s in stored
            ],
        )

    @streaming
    async def QueryCapture(self, request, context):
        caller(context, "admin")
        data = await asyncio.to_thread(_query_ipc, self.capture, request.model, request.sql)
        for start in range(0, max(len(data), 1), QUERY_CHUNK):
            yield pb.QueryCaptureChunk(data=data[start : start + QUERY_CHUNK])


def _query_ipc(capture: CaptureService, model: str, sql: str) -> bytes:
    import pyarrow as pa

    table = capture.store.query(model, sql)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


__all__ = ["CaptureServicer", "setting_to_proto"]
