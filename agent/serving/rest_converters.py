"""Open Inference Protocol over HTTP/REST (JSON, and Triton's binary tensor extension) <->
domain types. JSON stops here, as protobuf stops in converters.py.

Only the message's form is checked here (is it JSON, is a shape a list of sizes, do the values
and bytes add up to the shape); whether the model takes these inputs is the data plane's
question (dataplane.validate_inputs), asked once for every transport.

The binary extension: when the ``Inference-Header-Content-Length`` header is present, the body
is that many bytes of JSON followed by the binary tensors, in input order, each input that has
a ``binary_data_size`` parameter taking that many bytes. Responses do the same for outputs asked
for in binary (``binary_data`` on an output, or ``binary_data_output`` on the request).
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelfleet.agent.serving.dataplane import InferInput, InferOutput, InferRequest, InferResponse
from modelfleet.agent.serving.routing import ROUTING_KEY_PARAMETER
from modelfleet.agent.serving.shm import (
    Placement,
    SharedMemoryRegistry,
    placement,
    read_input,
    write_output,
)
from modelfleet.kernel.datatypes import (
    check_int_range,
    decode_bytes_tensor,
    encode_bytes_tensor,
    numpy_dtype,
    shaped,
)
from modelfleet.kernel.errors import InvalidRequestError

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_SIZE = "binary_data_size"
BINARY_OUTPUT = "binary_data_output"
BINARY = "binary_data"
# gRPC's dims are int64; JSON integers have no bound of their own.
MAX_DIM = 2**63 - 1
# Parameters this edge consumes; the rest travel on in InferRequest.parameters.
_EDGE_PARAMETERS = frozenset({BINARY_OUTPUT, ROUTING_KEY_PARAMETER})


def strict_dumps(doc: Any) -> str:
    """Every JSON document this edge writes: RFC 8259 only (a non-finite number raises rather
    than becoming a bare ``NaN`` that most parsers refuse), no spaces."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


@dataclass
class OutputForm:
    """How the client wants outputs back: per named output, else the request's default."""

    binary_default: bool = False
    binary: dict[str, bool] = field(default_factory=dict)

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


def _bad(message: str, reason: str = "json") -> InvalidRequestError:
    return InvalidRequestError(message, reason=reason)


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON part, binary part) of a request body."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length.strip())
    except ValueError:
        raise _bad(
            f"{HEADER_LENGTH} header must be a whole number of bytes, got {header_length!r}",
            "binary",
        ) from None
    if n < 0 or n > len(body):
        raise _bad(
            f"{HEADER_LENGTH} header says the JSON part is {n} bytes, but the body has "
            f"{len(body)}: it must be between 0 and the body's length",
            "binary",
        )
    view = memoryview(body)
    return bytes(view[:n]), view[n:]


class _NotJsonNumber(float):
    """``NaN``, ``Infinity`` or ``-Infinity``, which RFC 8259 JSON does not have, kept with its
    text so the refusal can quote it. Python's json takes them, and so has Triton's rapidjson
    parser since its PR 3870; this edge refuses them, as JSON parsers in most other languages
    do, so that what it takes is what any client can write. (A literal past float64 such as
    ``1e999`` parses as infinity; _json_values refuses it by value, without a per-number parse
    hook that would slow every large tensor down.)"""

    literal: str

    def __new__(cls, literal: str) -> _NotJsonNumber:
        made = super().__new__(cls, float(literal.replace("Infinity", "inf")))
        made.literal = literal
        return made


def _first_not_json(data: Any) -> str | None:
    if isinstance(data, _NotJsonNumber):
        return data.literal
    items = data.values() if isinstance(data, dict) else data if isinstance(data, list) else ()
    for item in items:
        found = _first_not_json(item)
        if found is not None:
            return found
    return None


def _refuse_not_json(doc: Any, what: str) -> None:
    """Called only when the parser met such a number: says in which input, else where."""
    tail = (
        "which JSON (RFC 8259) cannot carry; send finite numbers, or send the tensor in "
        f"binary (the {HEADER_LENGTH} header) if it must hold non-finite values"
    )
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    for tensor in inputs if isinstance(inputs, list) else ():
        literal = _first_not_json(tensor.get("data")) if isinstance(tensor, dict) else None
        if literal is not None:
            raise _bad(f"input {tensor.get('name')!r}: 'data' holds {literal}, {tail}", "data")
    raise _bad(f"{what} holds {_first_not_json(doc)}, {tail}")


def _loads(raw: bytes, what: str) -> Any:
    """json.loads, with the ways a hostile body gets past JSONDecodeError turned into a
    refusal: nesting deeper than the parser's recursion limit, an integer literal longer
    than Python converts (4300 digits), and the constants JSON does not have (NaN, Infinity).
    """
    met: list[str] = []

    def constant(text: str) -> float:
        met.append(text)
        return _NotJsonNumber(text)

    # A deeply nested body takes the C parser down to the recursion limit, and a garbage
    # collection that starts down there runs every finalizer then due with no stack left (other
    # requests' objects: they fail with RecursionError). Collections wait for the parse; only
    # a caller that found the collector on turns it back on, so concurrent parses cannot leave
    # it off.
    collecting = gc.isenabled()
    gc.disable()
    try:
        doc = json.loads(raw, parse_constant=constant)
    except RecursionError:
        raise _bad(f"{what} nests arrays or objects too deeply to parse") from None
    except ValueError as exc:
        if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
            raise
        raise _bad(f"{what} holds a number with too many digits: {exc}") from None
    finally:
        if collecting:
            gc.enable()
    if met:
        _refuse_not_json(doc, what)
    return doc


def _parse_json(raw: bytes, has_header: bool) -> dict[str, Any]:
    # Binary bytes after JSON without the header look like trailing data or bad UTF-8.
    hint = "" if has_header else f" (binary tensors after the JSON need the {HEADER_LENGTH} header)"
    try:
        doc = _loads(raw, "request body")
    except UnicodeDecodeError:
        raise _bad(f"request body is not UTF-8 JSON{hint}") from None
    except json.JSONDecodeError as exc:
        raise _bad(
            f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            + (hint if exc.msg == "Extra data" else "")
        ) from None
    if not isinstance(doc, dict):
        raise _bad(f"request body must be a JSON object, not {type(doc).__name__}")
    return doc


def object_body(body: bytes, what: str, example: str) -> dict[str, Any]:
    """The optional JSON object body of a control request (empty counts as ``{}``)."""
    if not body.strip():
        return {}
    try:
        doc = _loads(body, what)
    except (json.JSONDecodeError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict):
        raise _bad(f"{what}: body must be empty or a JSON object like {example}")
    return doc


def parameters_of(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise _bad(f"{where}: 'parameters' must be a JSON object")
    return params


def _shape(tensor: dict[str, Any], name: str) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise _bad(
            f"input {name!r}: 'shape' must be a list of whole numbers, got {shape!r}", "shape"
        )
    if any(d < 0 for d in shape):
        raise _bad(f"input {name!r}: shape {shape} has a negative dimension", "shape")
    if any(d > MAX_DIM for d in shape):
        raise _bad(f"input {name!r}: a dimension of shape {shape} is past {MAX_DIM}", "shape")
    return tuple(shape)


def _flatten(data: Any, out: list[Any]) -> None:
    if isinstance(data, list):
        for item in data:
            _flatten(item, out)
    else:
        out.append(data)


def _json_bytes(name: str, data: Any, count: int) -> np.ndarray:
    flat: list[Any] = []
    _flatten(data, flat)
    if len(flat) != count:
        raise _bad(f"input {name!r}: shape needs {count} values, 'data' holds {len(flat)}", "data")
    arr = np.empty(count, dtype=object)
    for i, item in enumerate(flat):
        if not isinstance(item, str):
            raise _bad(
                f"input {name!r}: BYTES values in JSON are strings; value {i} is "
                f"{type(item).__name__} (send other bytes with the binary extension)",
                "data",
            )
        arr[i] = item.encode("utf-8")
    return arr


# Which JSON number kinds (numpy's dtype.kind of the parsed list) each datatype accepts: a float
# for an integer input would be truncated, a bool for a number is almost surely a mistake.
_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


def _json_values(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    dtype = numpy_dtype(datatype)
    count = _count(shape)
    if datatype == "BYTES":
        return _json_bytes(name, data, count)
    try:
        parsed = np.array(data)
    except (ValueError, OverflowError):
        raise _bad(
            f"input {name!r}: 'data' is not a list of numbers in a regular (non-ragged) layout",
            "data",
        ) from None
    if parsed.size != count:
        raise _bad(
            f"input {name!r}: shape {list(shape)} needs {count} values, 'data' holds {parsed.size}",
            "data",
        )
    if count == 0:
        return np.empty(0, dtype=dtype)
    if parsed.dtype.kind not in _KINDS[dtype.kind]:
        what = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers"}[dtype.kind]
        got = {"b": "booleans", "f": "fractional numbers", "U": "strings", "O": "mixed values"}
        raise _bad(
            f"input {name!r}: {datatype} values must be {what}, 'data' holds "
            f"{got.get(parsed.dtype.kind, 'other values')}",
            "datatype",
        )
    if dtype.kind in "iu":
        check_int_range(name, datatype, parsed, "data")
    with np.errstate(over="ignore"):
        values = parsed.astype(dtype, copy=False).reshape(-1)
    if dtype.kind == "f" and not np.isfinite(values).all():
        _refuse_out_of_range(name, datatype, parsed.reshape(-1), values)
    return values


def _refuse_out_of_range(name: str, datatype: str, parsed: np.ndarray, values: np.ndarray) -> None:
    """NaN and Infinity were refused at parsing, so what is left here is a literal past
    float64 (``1e999`` parses as infinity) or a finite number past a narrower float type."""
    i = int(np.flatnonzero(~np.isfinite(values))[0])
    if math.isfinite(float(parsed[i])):
        why = f", {float(parsed[i])!r}, is past the range of {datatype}"
    else:
        why = " is a literal past the range of JSON numbers (float64), like 1e999"
    raise _bad(f"input {name!r}: value {i} of 'data'{why}; send finite numbers in range", "data")


def _binary_values(
    name: str, datatype: str, shape: tuple[int, ...], chunk: memoryview
) -> np.ndarray:
    count = _count(shape)
    if datatype == "BYTES":
        return decode_bytes_tensor(bytes(chunk), name, count)
    dtype = numpy_dtype(datatype)
    need = count * dtype.itemsize
    if len(chunk) != need:
        raise _bad(
            f"input {name!r}: {BINARY_SIZE} is {len(chunk)} bytes, but shape {list(shape)} x "
            f"{datatype} needs {need} bytes",
            "binary",
        )
    return np.frombuffer(chunk, dtype=dtype)


def request_from_http(
    body: bytes,
    header_length: str | None,
    model_name: str,
    model_version: str,
    shm: SharedMemoryRegistry | None = None,
) -> tuple[InferRequest, OutputForm]:
    """``shm``: where inputs placed in system shared memory are read from; outputs placed there
    keep their shared_memory_* parameters in ``output_parameters`` (shm.output_placements)."""
    raw_json, binary = split_body(body, header_length)
    doc = _parse_json(raw_json, header_length is not None)
    params = dict(parameters_of(doc, "request"))
    inputs_doc = doc.get("inputs")
    if not isinstance(inputs_doc, list) or not inputs_doc:
        raise _bad("request: 'inputs' must be a non-empty list of tensors")
    offset = 0
    inputs: list[InferInput] = []
    for i, tensor in enumerate(inputs_doc):
        if not isinstance(tensor, dict):
            raise _bad(f"request: inputs[{i}] must be a JSON object")
        name = tensor.get("name")
        datatype = tensor.get("datatype")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise _bad(f"request: inputs[{i}] needs a string 'name' and 'datatype'")
        shape = _shape(tensor, name)
        iparams = parameters_of(tensor, f"input {name!r}")
        size = iparams.get(BINARY_SIZE)
        placed = placement(iparams, f"input {name!r}")
        if placed is not None:
            if size is not None or "data" in tensor:
                raise _bad(f"input {name!r}: is in shared memory and also carries data", "data")
            raw = read_input(shm, placed, name)
            data = _binary_values(name, datatype, shape, memoryview(raw))
        elif size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise _bad(f"input {name!r}: {BINARY_SIZE} must be a whole number >= 0", "binary")
            if "data" in tensor:
                raise _bad(
                    f"input {name!r}: has both 'data' and {BINARY_SIZE}; send one or the other",
                    "binary",
                )
            if offset + size > len(binary):
                raise _bad(
                    f"input {name!r}: {BINARY_SIZE} {size} goes past the end of the body "
                    f"({len(binary) - offset} binary bytes left after the inputs before it"
                    + ("" if header_length is not None else f"; no {HEADER_LENGTH} header")
                    + ")",
                    "binary",
                )
            data = _binary_values(name, datatype, shape, binary[offset : offset + size])
            offset += size
        elif "data" in tensor:
            data = _json_values(name, datatype, shape, tensor["data"])
        else:
            raise _bad(f"input {name!r}: has neither 'data' nor a {BINARY_SIZE} parameter", "data")
        inputs.append(InferInput(name, datatype, shape, shaped(name, data, shape)))
    if offset != len(binary):
        raise _bad(
            f"the body has {len(binary) - offset} binary bytes that no input's {BINARY_SIZE} "
            "accounts for",
            "binary",
        )
    form = OutputForm(binary_default=_flag(params, BINARY_OUTPUT, "request"))
    outputs: list[str] = []
    output_parameters: dict[str, dict[str, Any]] = {}
    outputs_doc = doc.get("outputs", [])
    if not isinstance(outputs_doc, list):
        raise _bad("request: 'outputs' must be a list")
    for i, out in enumerate(outputs_doc):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise _bad(f"request: outputs[{i}] must be an object with a string 'name'")
        oparams = parameters_of(out, f"output {out['name']!r}")
        if BINARY in oparams:
            form.binary[out["name"]] = _flag(oparams, BINARY, f"output {out['name']!r}")
        # The rest (classification) is the data plane's to judge, as for gRPC.
        rest = {k: v for k, v in oparams.items() if k != BINARY}
        if rest:
            output_parameters[out["name"]] = rest
        outputs.append(out["name"])
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise _bad("request: 'id' must be a string")
    return (
        InferRequest(
            model_name=model_name,
            model_version=model_version,
            id=request_id,
            inputs=inputs,
            outputs=outputs,
            parameters={k: v for k, v in params.items() if k not in _EDGE_PARAMETERS},
            routing_key=_routing_key(params),
            output_parameters=output_parameters,
        ),
        form,
    )


def _flag(params: dict[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise _bad(f"{where}: parameter {key!r} must be true or false")
    return value


def _routing_key(params: dict[str, Any]) -> str:
    value = params.get(ROUTING_KEY_PARAMETER)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        # As on gRPC: numeric ids hash like their decimal form.
        return str(value)
    raise _bad(
        f"request parameter {ROUTING_KEY_PARAMETER!r} must be a string (or an integer)",
        "routing_key",
    )


def _refuse_non_finite(name: str, flat: np.ndarray) -> None:
    """JSON (RFC 8259) has no NaN or Infinity. Triton writes them as bare ``NaN`` /
    ``Infinity`` literals, which Python's and rapidjson's parsers take but JavaScript's
    JSON.parse, Go's encoding/json and most others refuse for the whole response; writing
    null or a string instead would hand the client a value the model did not produce."""
    if flat.dtype.kind != "f":
        return
    bad = ~np.isfinite(flat)
    if not bad.any():
        return
    i = int(np.flatnonzero(bad)[0])
    value = float(flat[i])
    spelled = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    raise _bad(
        f"output {name!r} holds {spelled} (at flat index {i}, {int(bad.sum())} of "
        f"{flat.size} values not finite), which JSON cannot carry: ask for this output as "
        f'binary data ("parameters": {{"binary_data": true}} on the output, or '
        f"binary_data=True in tritonclient's InferRequestedOutput)",
        "non_finite_output",
    )


def _json_data(name: str, arr: np.ndarray) -> list[Any]:
    flat = arr.reshape(-1)
    if arr.dtype.kind not in ("O", "S", "U"):
        _refuse_non_finite(name, flat)
        return flat.tolist()
    out = []
    for item in flat:
        if isinstance(item, str):
            out.append(item)
            continue
        try:
            out.append(bytes(item).decode("utf-8"))
        except UnicodeDecodeError:
            raise _bad(
                f"output {name!r} holds bytes that are not UTF-8 text, which JSON cannot carry: "
                f"ask for it in binary (parameter {BINARY}: true on the output)",
                "data",
            ) from None
    return out


def response_to_http(
    resp: InferResponse,
    form: OutputForm,
    shm: SharedMemoryRegistry | None = None,
    placements: dict[str, Placement] | None = None,
) -> tuple[bytes, int | None]:
    """(body, length of its JSON part when binary outputs follow it, else None). Outputs in
    ``placements`` are written to shared memory and listed without data."""
    outputs = []
    chunks: list[bytes] = []
    # Shared-memory outputs are written last: an output refused below (not finite as JSON)
    # must leave the client's regions as they were, as every other refusal does.
    writes: list[tuple[InferOutput, Placement]] = []
    for out in resp.outputs:
        tensor: dict[str, Any] = {
            "name": out.name,
            "datatype": out.datatype,
            "shape": list(out.shape),
        }
        if placements and out.name in placements:
            writes.append((out, placements[out.name]))
        elif form.is_binary(out.name):
            if out.datatype == "BYTES":
                raw = encode_bytes_tensor(out.data)
            else:
                # The protocol is little-endian; tobytes() of a native array is on x86 and ARM.
                raw = np.ascontiguousarray(out.data).tobytes()
            tensor["parameters"] = {BINARY_SIZE: len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = _json_data(out.name, out.data)
        outputs.append(tensor)
    doc: dict[str, Any] = {
        "model_name": resp.model_name,
        "model_version": resp.model_version,
        "outputs": outputs,
    }
    if resp.id:
        doc["id"] = resp.id
    # Strict: a non-finite number that got past _json_data is a 500, never bad JSON.
    head = strict_dumps(doc).encode()
    for out, place in writes:
        assert shm is not None
        write_output(shm, out, place)
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)
