"""A bare grpc.aio Open Inference Protocol server: the round-trip baseline for the agent.

It speaks the same generated service as the agent, on the same kind of event loop with the same
channel options, and answers ModelInfer with a prebuilt response of the same size as the agent's.
What remains between this and the agent is the agent's own work: decoding, validation, the hop to
the serving thread, onnxruntime, accounting and encoding.

Run as ``python -m tests.benchmarks.echo_server --listen HOST:PORT --spec JSON`` where the spec
maps model names to ``{"model_version": "1", "outputs": [{"name", "datatype", "shape"}]}``.

Only ever import this module in the server's own process: ``protos.inference_pb2`` and
tritonclient's generated code both define the ``inference`` protobuf package, and one process's
descriptor pool cannot hold both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from modelfleet.kernel.datatypes import NUMPY_BY_DATATYPE
from modelfleet.kernel.grpc_options import server_options
from modelfleet.protos import inference_pb2 as pb
from modelfleet.protos import inference_pb2_grpc as pb_grpc


def build_response(name: str, spec: dict[str, Any]) -> pb.ModelInferResponse:
    """The response the agent would send for one request, filled with zeros."""
    msg = pb.ModelInferResponse(model_name=name, model_version=spec["model_version"], id="")
    raws = []
    for out in spec["outputs"]:
        tensor = msg.outputs.add()
        tensor.name = out["name"]
        tensor.datatype = out["datatype"]
        tensor.shape.extend(out["shape"])
        count = 1
        for d in out["shape"]:
            count *= d
        raws.append(bytes(count * NUMPY_BY_DATATYPE[out["datatype"]].itemsize))
    msg.raw_output_contents.extend(raws)
    return msg


def build_metadata(name: str, spec: dict[str, Any]) -> pb.ModelMetadataResponse:
    """The signature, so a client that asks first (perf_analyzer) can drive the echo too."""
    msg = pb.ModelMetadataResponse(name=name, versions=[spec["model_version"]], platform="echo")
    for kind, items in (("inputs", spec.get("inputs", [])), ("outputs", spec["outputs"])):
        for t in items:
            getattr(msg, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
    return msg


def build_config(name: str, spec: dict[str, Any]) -> pb.ModelConfigResponse:
    batch = spec.get("max_batch_size", 0)
    config = pb.ModelConfig(name=name, max_batch_size=batch)
    for kind, items in (("input", spec.get("inputs", [])), ("output", spec["outputs"])):
        for t in items:
            dims = t["shape"][1:] if batch > 0 else t["shape"]
            getattr(config, kind).add(
                name=t["name"], data_type=pb.DataType.Value("TYPE_" + t["datatype"]), dims=dims
            )
    return pb.ModelConfigResponse(config=config)


def _nothing() -> None:
    return None


class EchoServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, responses: dict[str, pb.ModelInferResponse], hop: ThreadPoolExecutor | None = None
    ) -> None:
        self.responses = responses
        self.hop = hop
        self.specs: dict[str, dict[str, Any]] = {}

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="echo", version="0")

    async def ModelStatistics(self, request, context):
        # Nothing is counted here; perf_analyzer reads it between windows and copes with none.
        return pb.ModelStatisticsResponse()

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name in self.specs)

    async def ModelMetadata(self, request, context):
        if request.name not in self.specs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name!r}")
        return build_metadata(request.name, self.specs[request.name])

    async def ModelConfig(self, request, context):
        if request.name not in self.specs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name!r}")
        return build_config(request.name, self.specs[request.name])

    async def ModelInfer(self, request, context):
        # The request is still parsed and the response still serialised by grpc: only the
        # agent's work is left out.
        if self.hop is not None:
            # Diagnostic variant: the agent's round trip to a serving thread and back, alone.
            await asyncio.get_running_loop().run_in_executor(self.hop, _nothing)
        return self.responses[request.model_name]


async def serve(listen: str, spec: dict[str, dict[str, Any]], hop_threads: int = 0) -> None:
    responses = {name: build_response(name, s) for name, s in spec.items()}
    # Same options as the agent's server, at its default max_message_bytes.
    server = grpc.aio.server(options=server_options(64 * 1024 * 1024))
    hop = ThreadPoolExecutor(hop_threads) if hop_threads else None
    servicer = EchoServicer(responses, hop)
    servicer.specs = spec
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--spec", required=True, help="JSON: model name -> response layout")
    parser.add_argument(
        "--hop-threads",
        type=int,
        default=0,
        help="> 0: pass each request through a thread pool of this size, "
        "as the agent does for inference",
    )
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen, json.loads(args.spec), args.hop_threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
