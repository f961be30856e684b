"""Run as ``python -m tests.wire_check``: the hand-written ModelInferResponse bytes
(wire.encode_infer_response) against the message converters.response_to_proto builds, over
tests/wire_cases.py's random responses and classification outputs; and ModelInfer registered
without a response serializer. Prints JSON; exits 1 on the first difference.

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

from modelfleet.agent.serving import grpc_server, wire
from modelfleet.agent.serving.converters import response_to_proto
from modelfleet.agent.serving.dataplane import InferOutput, InferResponse, classify
from modelfleet.protos import inference_pb2 as pb
from tests.wire_cases import Registry, cases

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
    handlers = asyncio.run(_handlers())
    print(
        json.dumps(
            {
                "checked": checked,
                "cache_sizes": [len(wire._HEADS), len(wire._TENSORS)],
                "cache_max": wire._CACHE_MAX,
                "model_infer_serializer": repr(handlers["ModelInfer"].response_serializer),
                "model_infer_deserializer_is_generated": (
                    handlers["ModelInfer"].request_deserializer == pb.ModelInferRequest.FromString
                ),
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
