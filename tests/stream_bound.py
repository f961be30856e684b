"""Run as ``python -m tests.stream_bound``: the ModelStreamInfer servicer with a data plane that
blocks until released, printing JSON (peak requests in flight, requests read ahead, answer ids).

A child process because the servicer needs modelfleet's compiled protocol, which cannot share a
process with tritonclient's copy (see tests/test_serving.py); tests/test_protocol_grpc.py runs it.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

from modelfleet.agent.serving import grpc_server
from modelfleet.agent.serving.dataplane import InferResponse
from modelfleet.protos import inference_pb2 as ipb

BOUND = grpc_server.STREAM_MAX_INFLIGHT
TOTAL = BOUND * 3


class Plane:
    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.release = asyncio.Event()
        # No per-client rate limit: the servicer then asks nothing of the gRPC context.
        self.admission = SimpleNamespace(clients=None)

    async def infer(self, req: Any) -> InferResponse:
        self.running += 1
        self.peak = max(self.peak, self.running)
        await self.release.wait()
        # Later requests finish first: the order must come from the stream, not from them.
        await asyncio.sleep(0.001 * (TOTAL - int(req.id)) / TOTAL)
        self.running -= 1
        return InferResponse(req.model_name, "1", req.id, [])


class Context:
    def invocation_metadata(self) -> tuple:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"


async def scenario() -> dict[str, Any]:
    plane = Plane()
    servicer = grpc_server.InferenceServicer(None, plane)  # type: ignore[arg-type]
    sent = 0

    async def requests():
        nonlocal sent
        for i in range(TOTAL):
            sent += 1
            yield ipb.ModelInferRequest(model_name="m", id=str(i))

    stream = servicer.ModelStreamInfer(requests(), Context())  # type: ignore[arg-type]
    first = asyncio.ensure_future(stream.__anext__())
    for _ in range(200):
        await asyncio.sleep(0.005)
        if plane.running == BOUND:
            break
    read_ahead = sent
    plane.release.set()
    ids = [(await first).infer_response.id]
    ids += [r.infer_response.id async for r in stream]
    return {
        "bound": BOUND,
        "total": TOTAL,
        "peak": plane.peak,
        "read_ahead": read_ahead,
        "ids": ids,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(scenario())))
