"""An OTLP/gRPC trace collector for tests and benchmarks: opentelemetry-proto's TraceService on
a loopback port (an ephemeral one), keeping every span it is sent."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span it is sent, with its resource's service.name."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[tuple[str, trace_pb2.Span]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                service = attributes(rs.resource.attributes).get("service.name", "")
                for ss in rs.scope_spans:
                    self.received += [(service, s) for s in ss.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, trace_id: str = "") -> list[tuple[str, trace_pb2.Span]]:
        with self.lock:
            return [
                (svc, s) for svc, s in self.received if not trace_id or s.trace_id.hex() == trace_id
            ]

    def __enter__(self) -> Collector:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(0)


def attributes(kvs) -> dict:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in kvs}
