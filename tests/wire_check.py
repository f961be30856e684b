"""Run as ``python -m tests.wire_check``: the hand-written ModelInferResponse bytes
(wire.encode_infer_response) against the message converters.response_to_proto builds, over
tests/wire_cases.py's random responses and classification outputs; requests decoded by hand
(wire.decode_infer_request) against protobuf's parse and converters.request_from_proto, over
its random requests (plain or not, refused, malformed); and ModelInfer registered without
(de)serializers, answering bytes that do not parse as before. Prints JSON; exits 1 on the
first difference.

A child process because converters needs modelfleet's compiled protocol, which cannot share a
process with tritonclient's copy (see tests/test_serving.py); tests/test_converters_wire.py
runs it.
"""

from __future__ import annotations

import asyncio
import json
import sys
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from modelfleet.agent.serving import grpc_server, wire
from modelfleet.agent.serving.converters import request_from_proto, response_to_proto
from modelfleet.agent.serving.dataplane import InferOutput, InferResponse, classify
from modelfleet.protos import inference_pb2 as pb
from tests.wire_cases import Registry, cases, requests

CASES = 600


def same(resp: InferResponse, placements: dict | None = None) -> str:
    """Empty when both paths agree, else what differs."""
    old_shm, new_shm = Registry(), Registry()
    msg = response_to_proto(resp, old_shm, placements)  # type: ignore[arg-type]
    got = wire.encode_infer_response(resp, new_shm, placements)  # type: ignore[arg-type]
    if not isinstance(got, bytes):
        return f"not bytes: {type(got).__name__}"
    if pb.ModelInferResponse.FromString(got) != msg:
        return f"parses to another message: {pb.ModelInferResponse.FromString(got)} != {msg}"
    if got != msg.SerializeToString():
        return "other bytes for the same message"
    if new_shm.writes != old_shm.writes:
        return "other shared-memory writes"
    return ""


def classification() -> list[InferResponse]:
    manifest = SimpleNamespace(labels={"probs": ("cat", "dog", "fox")}, max_batch_size=8)
    version = SimpleNamespace(manifest=manifest, name="m", version=1)
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.4, 0.1]], dtype=np.float32)
    return [
        InferResponse("m", "1", "req-1", [classify(version, "probs", scores, k)])  # type: ignore[arg-type]
        for k in (1, 2, 5)
    ]


def past_the_caches() -> list[InferResponse]:
    """More distinct heads and output tensors than the caches hold."""
    out = []
    for i in range(wire._CACHE_MAX + 10):
        arr = np.zeros((i + 1, 2), dtype=np.float32)
        out.append(InferResponse(f"m{i}", "1", "", [InferOutput("y", "FP32", arr.shape, arr)]))
    return out


def _outcome(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


def _request_fields(req: Any) -> Any:
    if not hasattr(req, "inputs"):
        return req
    inputs = [
        (i.name, i.datatype, i.shape, i.data.dtype.str, i.data.shape, i.data.tolist())
        for i in req.inputs
    ]
    return (
        req.model_name,
        req.model_version,
        req.id,
        inputs,
        req.outputs,
        req.parameters,
        req.routing_key,
        req.trace,
        req.output_parameters,
        req.client,
    )


def request_differs(data: bytes) -> tuple[str, bool]:
    """(what differs, or empty; whether the hand decoder took the request)."""

    def reference() -> Any:
        try:
            msg = pb.ModelInferRequest.FromString(data)
        except DecodeError:
            return None  # the decoder must leave it to protobuf
        return request_from_proto(msg, None)

    want = _request_fields(_outcome(reference))
    got = _outcome(wire.decode_infer_request, data)
    if got is None:
        return "", False
    got = _request_fields(got)
    if got != want:
        return f"{data!r}: decoded {got!r}, protobuf path {want!r}", True
    return "", True


async def _garbage() -> list[Any]:
    """What a client gets for bytes that do not parse, from a server with this registration."""
    server = grpc.aio.server()
    servicer = grpc_server.InferenceServicer(None, SimpleNamespace(admission=None))  # type: ignore[arg-type]
    grpc_server.add_inference_service(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    out = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            for payload in (b"\xff\xff\xff", b"\x0a\x02\xff\xfe"):
                try:
                    await call(payload, timeout=10)
                    out.append("answered")
                except grpc.aio.AioRpcError as exc:
                    out.append([exc.code().name, exc.details()])
    finally:
        await server.stop(None)
    return out


async def _handlers() -> dict[str, Any]:
    server = grpc.aio.server()
    captured: dict[str, Any] = {}
    register = server.add_registered_method_handlers

    def keep(service: str, handlers: Any) -> None:
        captured.update(handlers)
        register(service, handlers)

    server.add_registered_method_handlers = keep  # type: ignore[method-assign]
    servicer = grpc_server.InferenceServicer(None, None)  # type: ignore[arg-type]
    grpc_server.add_inference_service(servicer, server)
    await server.stop(None)
    return captured


def main() -> int:
    checked = 0
    for resp, placements in cases(CASES):
        # Twice: the second time from the cached pieces.
        for args in ((resp, placements), (resp, placements), (resp,)):
            why = same(*args)
            if why:
                print(json.dumps({"failed": repr(resp), "why": why}))
                return 1
            checked += 1
    for resp in classification() + past_the_caches():
        why = same(resp)
        if why:
            print(json.dumps({"failed": repr(resp), "why": why}))
            return 1
        checked += 1
    decoded = 0
    requests_checked = 0
    previous = b""
    for data in requests(pb, 3000):
        # Each after the one before, then again: the decoder first tries the last header.
        for one in (data, data, previous + data[len(previous) :]):
            why, took = request_differs(one)
            if why:
                print(json.dumps({"failed": why}))
                return 1
            decoded += took
            requests_checked += 1
        previous = data
    handlers = asyncio.run(_handlers())
    garbage = asyncio.run(_garbage())
    print(
        json.dumps(
            {
                "checked": checked,
                "requests_checked": requests_checked,
                "requests_decoded": decoded,
                "garbage": garbage,
                "cache_sizes": [len(wire._HEADS), len(wire._TENSORS)],
                "cache_max": wire._CACHE_MAX,
                "model_infer_serializer": repr(handlers["ModelInfer"].response_serializer),
                "model_infer_deserializer": repr(handlers["ModelInfer"].request_deserializer),
                "stream_serializer_is_generated": (
                    handlers["ModelStreamInfer"].response_serializer
                    == pb.ModelStreamInferResponse.SerializeToString
                ),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
