"""An MLServer inference runtime that serves one .onnx file with onnxruntime, and the launcher
that starts ``mlserver start`` with it.

Only ``tests/benchmarks/mlserver_bench.py`` uses this file, and only inside MLServer's own
virtual environment (``build/mlserver-venv``): the bench copies it into a folder of its own, puts
that folder on MLServer's ``PYTHONPATH``, names ``mlserver_runtime.OnnxModel`` as the model's
``implementation`` and runs ``python mlserver_runtime.py start FOLDER``. The project's venv has
no ``mlserver`` (its pins clash with ours), so the project never imports this module; mypy does
not read ``tests/`` and ruff needs no import, which keeps both clean without exclusions.

The session is built as the agent builds its own by default (``kernel/runtime.py``): CPU
provider, onnxruntime's own thread counts, spinning left on. Tensors go through MLServer's numpy
codec, as MLServer's packaged runtimes do, so requests and responses take MLServer's ordinary
path; the blocking ``run`` inside ``predict`` is also how those runtimes call their frameworks.

perf_analyzer asks a server for Triton's ``ModelConfig`` before it sends anything, and for
``ModelStatistics`` around every measurement window; MLServer 1.7.1 implements neither. The
launcher therefore adds those two RPCs to MLServer's gRPC server, with constant answers (the
configuration the agent reports for the same model, passed in by the bench; empty statistics, as
the echo server gives). ``ModelInfer`` and every other RPC are left exactly as MLServer serves
them; the two extra methods are not on the measured path.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from typing import Any

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

# JSON {model name: base64 of a serialised inference.ModelConfigResponse}, set by the bench.
MODEL_CONFIGS_ENV = "MODELFLEET_BENCH_MODEL_CONFIGS"
SERVICE = "inference.GRPCInferenceService"


class OnnxModel(MLModel):
    async def load(self) -> bool:
        uri = self.settings.parameters.uri if self.settings.parameters else None
        if not uri:
            raise ValueError(f"model {self.name}: parameters.uri must name the .onnx file")
        so = ort.SessionOptions()
        so.intra_op_num_threads = 0
        so.inter_op_num_threads = 0
        so.log_severity_level = 3
        self._session = ort.InferenceSession(uri, so, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {inp.name: NumpyCodec.decode_input(inp) for inp in payload.inputs}
        values = self._session.run(self._outputs, feed)
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output(name, value)
                for name, value in zip(self._outputs, values, strict=True)
            ],
        )


def _requested_name(request: bytes) -> str:
    """Field 1 (``name``, a string) of a ModelConfigRequest, read off the wire: MLServer's
    generated protobuf modules have no Triton messages, and this is all the handler needs."""
    i = 0
    while i < len(request):
        tag, i = _varint(request, i)
        field, wire = tag >> 3, tag & 7
        if wire == 2:
            size, i = _varint(request, i)
            if field == 1:
                return request[i : i + size].decode()
            i += size
        elif wire == 0:
            _, i = _varint(request, i)
        else:
            break  # ModelConfigRequest has only strings; anything else ends the scan
    return ""


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7


def install_perf_analyzer_rpcs(configs: dict[str, bytes]) -> None:
    """Register ModelConfig and ModelStatistics on every gRPC server MLServer creates."""
    import grpc
    from mlserver.grpc import server as grpc_server

    async def model_config(request: bytes, context: Any) -> bytes:
        name = _requested_name(request)
        if name not in configs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no configuration for {name!r}")
        return configs[name]

    async def model_statistics(request: bytes, context: Any) -> bytes:
        return b""  # an empty ModelStatisticsResponse

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ModelConfig": grpc.unary_unary_rpc_method_handler(model_config),
            "ModelStatistics": grpc.unary_unary_rpc_method_handler(model_statistics),
        },
    )
    create = grpc_server.GRPCServer._create_server

    def create_with_extras(self: Any) -> Any:
        server = create(self)
        server.add_generic_rpc_handlers((handler,))
        return server

    grpc_server.GRPCServer._create_server = create_with_extras


def main() -> None:
    """``python mlserver_runtime.py start FOLDER``: MLServer's own CLI, with the two extra RPCs."""
    raw = json.loads(os.environ.get(MODEL_CONFIGS_ENV, "{}"))
    install_perf_analyzer_rpcs({name: base64.b64decode(b64) for name, b64 in raw.items()})
    from mlserver.cli import main as mlserver_main

    sys.argv[0] = "mlserver"
    mlserver_main()


if __name__ == "__main__":
    main()
