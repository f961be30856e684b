"""Open Inference Protocol messages <-> domain types. Protobuf stops here.

Inputs are accepted as ``raw_input_contents`` or typed ``contents``; outputs always go back as
``raw_output_contents`` (tritonclient decodes only raw outputs).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modelfleet.agent.serving.dataplane import InferInput, InferRequest, InferResponse
from modelfleet.agent.serving.routing import ROUTING_KEY_PARAMETER
from modelfleet.agent.serving.shm import (
    Placement,
    SharedMemoryRegistry,
    placement,
    read_input,
    write_output,
)
from modelfleet.agent.serving.wire import check_dims, element_count, raw_input
from modelfleet.kernel.datatypes import (
    check_int_range,
    encode_bytes_tensor,
    numpy_dtype,
    shaped,
)
from modelfleet.kernel.errors import InvalidRequestError
from modelfleet.protos import inference_pb2 as pb

# Which InferTensorContents field carries each datatype when inputs are typed.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


# Typed integer fields are wider than the datatypes they carry (int_contents is int32 for INT8
# and INT16, uint_contents is uint32 for UINT8 and UINT16): values are range-checked, never
# wrapped (numpy would turn an INT8 300 into 44 without a word).
_WIDE = {"int_contents": np.int64, "uint_contents": np.uint64}


def _typed_values(name: str, datatype: str, field: str, values: Any, dtype: np.dtype) -> np.ndarray:
    if datatype == "BYTES":
        data = np.empty(len(values), dtype=object)
        data[:] = list(values)
        return data
    wide = _WIDE.get(field)
    if wide is None or np.dtype(wide) == dtype:
        return np.array(values, dtype=dtype)
    arr = np.array(values, dtype=wide)
    check_int_range(name, datatype, arr, "contents")
    return arr.astype(dtype)


def _check_typed_fields(name: str, datatype: str, contents: Any) -> str:
    """The one contents field that carries ``datatype``; values in any other field are refused."""
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidRequestError(
            f"input {name!r}: datatype {datatype} must be sent as raw_input_contents",
            reason="datatype",
        )
    for fd, _ in contents.ListFields():
        if fd.name != field:
            raise InvalidRequestError(
                f"input {name!r}: contents.{fd.name} is set, but {datatype} goes in "
                f"contents.{field}",
                reason="contents",
            )
    return field


def _decode_input(tensor: Any, raw: bytes | None) -> InferInput:
    name, datatype = tensor.name, tensor.datatype
    # A slice copies the repeated field in one call; iterating it builds each int in turn
    # (0.3 against 1.1 us, and this runs for every input of every request).
    shape = tuple(tensor.shape[:])
    check_dims(name, shape)
    dtype = numpy_dtype(datatype)
    count = element_count(shape)
    if raw is not None:
        # HasField first: building the contents view to size it is most of this check's cost.
        if tensor.HasField("contents") and tensor.contents.ByteSize():
            # The protocol gives a request one form or the other; taking either one silently
            # would run the model on data the client may not have meant.
            raise InvalidRequestError(
                f"input {name!r}: has typed contents while the request also carries "
                "raw_input_contents; send every input raw or every input typed, not both",
                reason="contents",
            )
        return raw_input(name, datatype, shape, dtype, count, raw)
    else:
        field = _check_typed_fields(name, datatype, tensor.contents)
        values = getattr(tensor.contents, field)
        if len(values) != count:
            raise InvalidRequestError(
                f"input {name!r}: shape {list(shape)} needs {count} values, "
                f"contents.{field} holds {len(values)}",
                reason="contents",
            )
        data = _typed_values(name, datatype, field, values, dtype)
    return InferInput(name, datatype, shape, shaped(name, data, shape))


def request_from_proto(
    msg: pb.ModelInferRequest, shm: SharedMemoryRegistry | None = None
) -> InferRequest:
    """``shm``: where inputs placed in system shared memory are read from (agent/serving/shm.py);
    such inputs have no entry in raw_input_contents, which holds the others in order (Triton).

    Every field access on a protobuf message builds a wrapper object, so each field is read
    once here: this runs for every request."""
    raws = msg.raw_input_contents
    tensors = list(msg.inputs)
    placed: dict[int, Placement] = {}
    for i, tensor in enumerate(tensors):
        if tensor.parameters:
            p = placement(parameters_from_proto(tensor.parameters), f"input {tensor.name!r}")
            if p is not None:
                placed[i] = p
    in_band = len(tensors) - len(placed)
    if raws and len(raws) != in_band:
        raise InvalidRequestError(
            f"raw_input_contents has {len(raws)} entries for {in_band} inputs not in shared "
            "memory; send all of those raw or none",
            reason="raw",
        )
    inputs = []
    if placed:
        next_raw = 0
        for i, tensor in enumerate(tensors):
            if i in placed:
                raw: bytes | None = read_input(shm, placed[i], tensor.name)
            elif raws:
                raw = raws[next_raw]
                next_raw += 1
            else:
                raw = None
            inputs.append(_decode_input(tensor, raw))
    elif raws:
        for tensor, raw in zip(tensors, raws, strict=True):
            inputs.append(_decode_input(tensor, raw))
    else:
        for tensor in tensors:
            inputs.append(_decode_input(tensor, None))
    outputs = list(msg.outputs)
    req = InferRequest(
        model_name=msg.model_name,
        model_version=msg.model_version,
        id=msg.id,
        inputs=inputs,
        outputs=[o.name for o in outputs],
    )
    params = msg.parameters
    if params:
        req.routing_key = _routing_key(params)
        req.parameters = parameters_from_proto(params)
    for o in outputs:
        if o.parameters:
            req.output_parameters[o.name] = parameters_from_proto(o.parameters)
    return req


def parameters_from_proto(params: Any) -> dict[str, Any]:
    """InferParameter map -> plain values, so the data plane judges them for every transport."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, kind) if kind is not None else None
    return out


def _routing_key(params: Any) -> str:
    """From the request's parameter map."""
    if ROUTING_KEY_PARAMETER not in params:
        return ""
    param = params[ROUTING_KEY_PARAMETER]
    kind = param.WhichOneof("parameter_choice")
    if kind == "string_param":
        return param.string_param
    if kind in ("int64_param", "uint64_param"):
        # Numeric ids are common keys; their decimal form hashes like the string would.
        return str(getattr(param, kind))
    raise InvalidRequestError(
        f"request parameter {ROUTING_KEY_PARAMETER!r} must be a string (or an integer), not {kind}",
        reason="routing_key",
    )


def response_to_proto(
    resp: InferResponse,
    shm: SharedMemoryRegistry | None = None,
    placements: dict[str, Placement] | None = None,
) -> pb.ModelInferResponse:
    """Outputs in ``placements`` are written to shared memory; their raw_output_contents entry
    is empty, kept (as Triton does) so that entries pair with ``outputs`` by position, which
    clients rely on (perf_analyzer crashes on a shorter list)."""
    msg = pb.ModelInferResponse(
        model_name=resp.model_name, model_version=resp.model_version, id=resp.id
    )
    raws = []
    for out in resp.outputs:
        tensor = msg.outputs.add()
        tensor.name = out.name
        tensor.datatype = out.datatype
        tensor.shape.extend(out.shape)
        if placements and out.name in placements:
            assert shm is not None
            write_output(shm, out, placements[out.name])
            raws.append(b"")
        elif out.datatype == "BYTES":
            raws.append(encode_bytes_tensor(out.data))
        else:
            # The protocol is little-endian; tobytes() of a native array is on x86 and ARM.
            raws.append(np.ascontiguousarray(out.data).tobytes())
    msg.raw_output_contents.extend(raws)
    return msg
