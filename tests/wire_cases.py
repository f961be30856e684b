"""Random ModelInferResponses and ModelInferRequests for the hand-written wire format
(agent/serving/wire.py), shared by tests/test_converters_wire.py (checked against tritonclient
in the test process) and tests/wire_check.py (against the protobuf path, in a child process)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np

from modelfleet.agent.serving.dataplane import InferOutput, InferResponse
from modelfleet.agent.serving.shm import Placement
from modelfleet.kernel.datatypes import encode_bytes_tensor

NUMERIC = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
# Empty, short, non-ASCII, and lengths either side of one varint byte (127/128) and of two.
TEXTS = ["", "m", "y", "probs", "ü-模型", "x" * 127, "x" * 128, "n" * 20_000]
BYTES_ITEMS: list[Any] = [b"", b"a", "ü", b"\xff\x00", "long" * 50]


class Registry:
    """Records shared-memory writes instead of making them."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, bytes]] = []

    def write(self, p: Placement, raw: Any, where: str) -> None:
        self.writes.append((where, bytes(raw)))


def _shape(rng: random.Random) -> tuple[int, ...]:
    kind = rng.random()
    if kind < 0.1:
        return ()
    if kind < 0.2:
        return (rng.choice([0, 1, 3]), 0)
    dims = [rng.choice([1, 2, 3, 5]) for _ in range(rng.randint(1, 4))]
    if kind > 0.9:
        dims[-1] = rng.choice([130, 300])  # a dimension of two varint bytes, raw over 127 bytes
    return tuple(dims)


def _array(rng: random.Random, np_rng: np.random.Generator, datatype: str, shape: tuple) -> Any:
    if datatype == "BYTES":
        items = [rng.choice(BYTES_ITEMS) for _ in range(int(np.prod(shape, dtype=int)))]
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    arr = (np_rng.standard_normal(shape) * 100).astype(NUMERIC[datatype])
    if arr.ndim == 2 and rng.random() < 0.3:
        arr = arr.T  # not C-contiguous: must still go out in C order
    elif arr.ndim >= 1 and arr.shape[-1] > 1 and rng.random() < 0.2:
        arr = arr[..., ::2]  # strided
    return arr


def cases(n: int, seed: int = 17) -> Iterator[tuple[InferResponse, dict[str, Placement]]]:
    """``n`` responses, with the outputs of each that go to shared memory."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    for _ in range(n):
        outputs = []
        placements: dict[str, Placement] = {}
        for i in range(rng.choice([0, 1, 1, 1, 2, 3])):
            datatype = rng.choice([*NUMERIC, "BYTES"])
            arr = _array(rng, np_rng, datatype, _shape(rng))
            name = rng.choice(TEXTS[1:5]) + str(i)
            outputs.append(InferOutput(name, datatype, tuple(arr.shape), arr))
            # (A zero-size output in shared memory fails in shm.write_output either way.)
            if arr.size and rng.random() < 0.1:
                placements[name] = Placement("region", 1 << 20, 0)
        model = rng.choice(TEXTS)
        version = rng.choice(["", "1", "12", "ü"])
        yield InferResponse(model, version, rng.choice(TEXTS), outputs), placements


# -- requests -----------------------------------------------------------------------------------

DATATYPES = [*NUMERIC, "BYTES", "FOO"]


def _request_input(rng: random.Random, np_rng: np.random.Generator, msg: Any) -> None:
    tensor = msg.inputs.add()
    tensor.name = rng.choice(TEXTS[:5])
    tensor.datatype = rng.choice(DATATYPES)
    shape = list(_shape(rng))
    kind = rng.random()
    if kind < 0.05:
        shape = [1, -2]
    elif kind < 0.08:
        shape = [1] * 40  # more dimensions than numpy holds
    elif kind < 0.1:
        shape = [2**40, 2**40, 0]  # empty, but too large to hold
    tensor.shape.extend(shape)
    if tensor.datatype == "FOO" or min(shape, default=0) < 0 or len(shape) > 32:
        arr: Any = np.zeros(3, np.float32)
    elif 0 in shape and max(shape) > 2**20:
        arr = np.zeros(0, np.float32)
    else:
        arr = _array(rng, np_rng, tensor.datatype, tuple(shape))
    if tensor.datatype == "BYTES":
        raw = (
            encode_bytes_tensor(arr) if isinstance(arr, np.ndarray) and arr.dtype == object else b""
        )
    else:
        raw = np.ascontiguousarray(arr).tobytes()
    if rng.random() < 0.08:
        raw = raw[:-1] if raw else b"\x00"  # the wrong size (or a cut BYTES element)
    if rng.random() < 0.05:
        tensor.contents.fp32_contents.extend([1.0, 2.0])  # typed as well as raw
    if rng.random() < 0.04:
        tensor.parameters["shared_memory_region"].string_param = "r"
    msg.raw_input_contents.append(raw)


# Request parameters as clients send them: perf_analyzer's flag on every request, sequence
# controls, a routing key of each kind (a bool one is refused), and values of every kind.
PARAMETER_KEYS = [
    "triton_enable_empty_final_response",
    "sequence_id",
    "sequence_start",
    "routing_key",
    "priority",
    "ü",
    "",
]


def _request_parameters(rng: random.Random, msg: Any) -> None:
    for _ in range(rng.choice([1, 1, 2, 3])):
        param = msg.parameters[rng.choice(PARAMETER_KEYS)]
        kind = rng.choice(["bool", "int64", "string", "double", "uint64", "none"])
        if kind == "bool":
            param.bool_param = rng.random() < 0.5
        elif kind == "int64":
            param.int64_param = rng.choice([0, 1, -1, 127, 128, 2**40, -(2**63), 2**63 - 1])
        elif kind == "string":
            param.string_param = rng.choice(TEXTS[:6])
        elif kind == "double":
            param.double_param = rng.choice([0.0, -1.5, 1e300, float("inf")])
        elif kind == "uint64":
            param.uint64_param = rng.choice([0, 5, 2**64 - 1])


def requests(pb: Any, n: int, seed: int = 23) -> Iterator[bytes]:
    """``n`` serialized ModelInferRequests, built with ``pb`` (modelfleet's or tritonclient's
    compiled protocol): most in the plain form, some not, some malformed."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    for _ in range(n):
        msg = pb.ModelInferRequest(
            model_name=rng.choice(TEXTS), model_version=rng.choice(["", "1", "ü"])
        )
        if rng.random() < 0.3:
            msg.id = rng.choice(TEXTS)
        for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
            _request_input(rng, np_rng, msg)
        if rng.random() < 0.05:
            del msg.raw_input_contents[-1:]  # one raw entry short
        if rng.random() < 0.05 and len(msg.inputs):
            msg.ClearField("raw_input_contents")
            for tensor in msg.inputs:
                tensor.contents.fp32_contents.extend([0.5] * 3)
        for _ in range(rng.choice([0, 0, 1, 2])):
            out = msg.outputs.add()
            out.name = rng.choice(TEXTS[1:5])
            if rng.random() < 0.1:
                out.parameters["classification"].int64_param = 2
        if rng.random() < 0.05:
            msg.parameters["routing_key"].string_param = "k"
        if rng.random() < 0.3:
            _request_parameters(rng, msg)
        data = msg.SerializeToString()
        kind = rng.random()
        if kind < 0.05:
            data = data[: rng.randrange(len(data) + 1)]  # cut short
        elif kind < 0.1 and data:
            i = rng.randrange(len(data))
            data = data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]  # a byte changed
        elif kind < 0.13:
            data = data + data  # merged twice: names repeat, inputs and raws double
        elif kind < 0.15:
            data = b"\x18\x01" + data  # a field this decoder does not know
        yield data
