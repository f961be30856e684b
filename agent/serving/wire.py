"""The serialized ModelInferResponse of a unary ModelInfer, written straight from the domain
response (grpc_server.py registers the method without a response serializer).

Building the protobuf message and serializing it cost more than the run of a small model.
These bytes are the ones converters.response_to_proto's message serializes to (the stream path
still builds that message); tests/wire_check.py compares the two over many responses. No
protobuf import here, so tests can decode the bytes with tritonclient's copy of the protocol in
the same process.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from modelfleet.agent.serving.dataplane import InferInput, InferRequest, InferResponse
from modelfleet.agent.serving.routing import ROUTING_KEY_PARAMETER
from modelfleet.agent.serving.shm import Placement, SharedMemoryRegistry, write_output
from modelfleet.kernel.datatypes import (
    MAX_DIMS,
    NUMPY_BY_DATATYPE,
    decode_bytes_tensor,
    encode_bytes_tensor,
    numpy_dtype,
    shaped,
)
from modelfleet.kernel.errors import InvalidRequestError

_LEN_BYTE = [bytes((n,)) for n in range(0x80)]


def _varint(n: int) -> bytes:
    if n < 0x80:
        if n >= 0:
            return _LEN_BYTE[n]
        n += 1 << 64  # int64 on the wire: two's complement, ten bytes
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _text_field(key: bytes, text: str) -> bytes:
    """A string field: nothing when empty (proto3 leaves defaults out)."""
    if not text:
        return b""
    b = text.encode()
    return key + _varint(len(b)) + b


# Field keys (number << 3 | wire type 2, length-delimited) of ModelInferResponse ...
_MODEL_NAME, _MODEL_VERSION, _ID, _OUTPUTS, _RAW = b"\x0a", b"\x12", b"\x1a", b"\x2a", b"\x32"
# ... and of its InferOutputTensor (shape is packed int64).
_T_NAME, _T_DATATYPE, _T_SHAPE = b"\x0a", b"\x12", b"\x1a"


# Encoded pieces by what they encode: the model name and version that open a response, and
# the InferOutputTensor entries, (name, datatype, shape). A model answers with the same few, so
# most responses are made of cached bytes; each function call and str.encode() here costs as
# much as a protobuf field. Bounded: emptied when a client's many batch sizes fill them.
_HEADS: dict[tuple[str, str], bytes] = {}
_TENSORS: dict[tuple[str, str, tuple[int, ...]], bytes] = {}
_CACHE_MAX = 1024


def _head(key: tuple[str, str]) -> bytes:
    head = _text_field(_MODEL_NAME, key[0]) + _text_field(_MODEL_VERSION, key[1])
    if len(_HEADS) >= _CACHE_MAX:
        _HEADS.clear()
    _HEADS[key] = head
    return head


def _output_tensor(key: tuple[str, str, tuple[int, ...]]) -> bytes:
    name, datatype, shape = key
    body = _text_field(_T_NAME, name) + _text_field(_T_DATATYPE, datatype)
    if shape:
        dims = b"".join([_varint(d) for d in shape])
        body += _T_SHAPE + _varint(len(dims)) + dims
    entry = _OUTPUTS + _varint(len(body)) + body
    if len(_TENSORS) >= _CACHE_MAX:
        _TENSORS.clear()
    _TENSORS[key] = entry
    return entry


def encode_infer_response(
    resp: InferResponse,
    shm: SharedMemoryRegistry | None = None,
    placements: dict[str, Placement] | None = None,
) -> bytes:
    """The serialized ModelInferResponse that ``response_to_proto(resp, shm, placements)``
    would give, written without a protobuf message (outputs in ``placements`` are written to
    shared memory the same way)."""
    key = (resp.model_name, resp.model_version)
    parts: list[Any] = [_HEADS.get(key) or _head(key)]
    if resp.id:
        parts.append(_text_field(_ID, resp.id))
    # raw_output_contents come after every output (field 6 after field 5), one per output.
    raws: list[Any] = []
    for out in resp.outputs:
        tensor = (out.name, out.datatype, out.shape)
        parts.append(_TENSORS.get(tensor) or _output_tensor(tensor))
        if placements and out.name in placements:
            assert shm is not None
            write_output(shm, out, placements[out.name])
            raws += (_RAW, _LEN_BYTE[0])
        elif out.datatype == "BYTES":
            raw = encode_bytes_tensor(out.data)
            raws += (_RAW, _varint(len(raw)), raw)
        else:
            # The array itself: join() reads its buffer, in C order as tobytes() would give
            # and little-endian on x86 and ARM as the protocol wants, with no copy of its own.
            n = out.data.nbytes
            raws += (_RAW, _LEN_BYTE[n] if n < 0x80 else _varint(n), out.data)
    parts += raws
    try:
        return b"".join(parts)
    except TypeError:
        # An array that is not C-contiguous has no flat buffer to read (not from onnxruntime,
        # whose outputs are): copy those into C order, as tobytes() would.
        flat: list[Any] = [
            np.ascontiguousarray(p) if isinstance(p, np.ndarray) else p for p in parts
        ]
        return b"".join(flat)


# -- inputs (shared with converters.request_from_proto) ----------------------------------------


def element_count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_dims(name: str, shape: tuple[int, ...]) -> None:
    if shape and min(shape) < 0:
        raise InvalidRequestError(
            f"input {name!r}: shape {list(shape)} has a negative dimension", reason="shape"
        )


def raw_input(
    name: str, datatype: str, shape: tuple[int, ...], dtype: np.dtype, count: int, raw: bytes
) -> InferInput:
    """An input sent in raw_input_contents: ``count`` elements of ``dtype`` in ``shape``."""
    if datatype == "BYTES":
        data = decode_bytes_tensor(raw, name, count)
    else:
        need = count * dtype.itemsize
        if len(raw) != need:
            raise InvalidRequestError(
                f"input {name!r}: raw content is {len(raw)} bytes, but shape {list(shape)} "
                f"x {datatype} needs {need} bytes",
                reason="raw",
            )
        if len(shape) <= MAX_DIMS:
            try:
                # One call where frombuffer + reshape are two (0.4 against 1.2 us).
                array = np.ndarray(shape, dtype, raw)
            except ValueError:
                pass  # shaped() below words the refusal
            else:
                return InferInput(name, datatype, shape, array)
        data = np.frombuffer(raw, dtype=dtype)
    return InferInput(name, datatype, shape, shaped(name, data, shape))


# -- ModelInferRequest -------------------------------------------------------------------------

# Field keys of ModelInferRequest, InferInputTensor and InferRequestedOutputTensor that the
# plain form uses: every one length-delimited, each key one byte.
_R_MODEL_NAME, _R_MODEL_VERSION, _R_ID, _R_PARAMETERS = 0x0A, 0x12, 0x1A, 0x22
_R_INPUTS, _R_OUTPUTS, _R_RAW = 0x2A, 0x32, 0x3A
# A parameters map entry (key, value), and the InferParameter oneof of its value: bool, int64,
# string, double, uint64 (varint, varint, length-delimited, fixed64, varint).
_P_KEY, _P_VALUE = 0x0A, 0x12
_V_BOOL, _V_INT64, _V_STRING, _V_DOUBLE, _V_UINT64 = 0x08, 0x10, 0x1A, 0x21, 0x28
_I_NAME, _I_DATATYPE, _I_SHAPE = 0x0A, 0x12, 0x1A
_O_NAME = 0x0A


class _NotPlain(Exception):
    """The request is not in the plain form: protobuf parses it (and words any refusal)."""


def _dims(packed: bytes) -> tuple[int, ...]:
    """A packed int64 shape."""
    if packed.isascii():  # every dimension under 128, one byte each
        return tuple(packed)
    dims = []
    n = shift = 0
    for b in packed:
        n |= (b & 0x7F) << shift
        if b < 0x80:
            # int64: the low 64 bits, two's complement, as protobuf reads them.
            n &= (1 << 64) - 1
            dims.append(n - (1 << 64) if n >> 63 else n)
            n = shift = 0
        else:
            shift += 7
            if shift > 63:
                raise _NotPlain
    if shift:
        raise _NotPlain  # ends inside a varint
    return tuple(dims)


def _varint_at(data: bytes, i: int, max_shift: int = 63) -> tuple[int, int]:
    """A varint at ``i``, its low 64 bits as protobuf keeps them: (value, index after it).
    Up to ten bytes for a number; a length prefix passes ``max_shift=_LENGTH_SHIFT``."""
    n = shift = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n & ((1 << 64) - 1), i
        shift += 7
        if shift > max_shift:
            raise _NotPlain


# A length prefix of more than five bytes is no request this decoder takes.
_LENGTH_SHIFT = 28


def _parameter(value: bytes) -> tuple[int, Any]:
    """An InferParameter: (the key byte of the choice it holds, its value); (0, None) when it
    holds none. Last one wins, as protobuf reads a oneof set twice."""
    kind = 0
    out: Any = None
    i, end = 0, len(value)
    while i < end:
        key = value[i]
        if key == _V_STRING:
            n, i = _varint_at(value, i + 1, _LENGTH_SHIFT)
            if i + n > end:
                raise _NotPlain
            kind, out = key, value[i : i + n].decode()
            i += n
        elif key == _V_DOUBLE:
            if i + 9 > end:
                raise _NotPlain
            kind, out = key, struct.unpack_from("<d", value, i + 1)[0]
            i += 9
        elif key in (_V_BOOL, _V_INT64, _V_UINT64):
            n, i = _varint_at(value, i + 1)
            if key == _V_BOOL:
                out = n != 0
            elif key == _V_INT64:
                out = n - (1 << 64) if n >> 63 else n
            else:
                out = n
            kind = key
        else:
            raise _NotPlain  # a field InferParameter does not have
    return kind, out


def _parameters(entries: list[bytes]) -> tuple[dict[str, Any], str]:
    """The request's parameter map as converters.parameters_from_proto gives it, and the
    routing key it carries (converters._routing_key). A routing key of another kind than a
    string or an integer is left to protobuf, which words the refusal."""
    params: dict[str, Any] = {}
    kinds: dict[str, int] = {}
    for entry in entries:
        name, value = "", b""
        for k, v in _fields(entry):
            if k == _P_KEY:
                name = v.decode()
            elif k == _P_VALUE:
                value = v
            else:
                raise _NotPlain
        kinds[name], params[name] = _parameter(value)  # a key given twice: the last one
    routing_key = ""
    if ROUTING_KEY_PARAMETER in params:
        kind, key = kinds[ROUTING_KEY_PARAMETER], params[ROUTING_KEY_PARAMETER]
        if kind == _V_STRING:
            routing_key = key
        elif kind in (_V_INT64, _V_UINT64):
            routing_key = str(key)
        else:
            raise _NotPlain
    return params, routing_key


def _fields(data: bytes) -> list[tuple[int, bytes]]:
    """(key byte, contents) of every field of a message whose fields are all length-delimited
    with one-byte keys; anything else is not the plain form."""
    out = []
    i, end = 0, len(data)
    while i < end:
        key = data[i]
        if key & 0x87 != 0x02:  # wire type 2, field 1..15
            raise _NotPlain
        n = data[i + 1]
        if n < 0x80:
            i += 2
        else:
            n, i = _varint_at(data, i + 1, _LENGTH_SHIFT)
        if i + n > end:
            raise _NotPlain
        out.append((key, data[i : i + n]))
        i += n
    return out


# What a request says before its raw_input_contents, parsed, by those bytes: a client sends the
# same names, shapes and outputs request after request, so most requests are parsed only from
# their raw_input_contents on. Bounded like the response caches, and only for headers of a
# usual size: clients choose these bytes.
_Header = tuple[
    str, str, str, list[tuple[str, str, tuple[int, ...], Any, int]], list[str], dict[str, Any], str
]
_HEADERS: dict[bytes, _Header] = {}
_HEADER_MAX_BYTES = 512
# The last cached header and its parse.
_last: tuple[bytes, _Header] = (b"", ("", "", "", [], [], {}, ""))


def _header(head: bytes) -> _Header:
    """Parse the fields before raw_input_contents (raises _NotPlain and the decoding errors)."""
    model_name = model_version = request_id = ""
    tensors = []
    outputs: list[str] = []
    entries: list[bytes] = []
    for key, value in _fields(head):
        if key == _R_INPUTS:
            name = datatype = ""
            shape: tuple[int, ...] = ()
            for k, v in _fields(value):
                if k == _I_NAME:
                    name = v.decode()
                elif k == _I_DATATYPE:
                    datatype = v.decode()
                elif k == _I_SHAPE:
                    shape = shape + _dims(v) if shape else _dims(v)
                else:
                    raise _NotPlain
            # dtype None: the input is refused, by check_dims or numpy_dtype, when its turn comes.
            dtype = None
            if not shape or min(shape) >= 0:
                dtype = NUMPY_BY_DATATYPE.get(datatype)
            tensors.append((name, datatype, shape, dtype, element_count(shape)))
        elif key == _R_OUTPUTS:
            name = ""
            for k, v in _fields(value):
                if k != _O_NAME:
                    raise _NotPlain
                name = v.decode()
            outputs.append(name)
        elif key == _R_MODEL_NAME:
            model_name = value.decode()
        elif key == _R_MODEL_VERSION:
            model_version = value.decode()
        elif key == _R_ID:
            request_id = value.decode()
        elif key == _R_PARAMETERS:
            # perf_analyzer sends triton_enable_empty_final_response with every request.
            entries.append(value)
        else:
            raise _NotPlain
    params, routing_key = _parameters(entries) if entries else ({}, "")
    header = (model_name, model_version, request_id, tensors, outputs, params, routing_key)
    if len(head) <= _HEADER_MAX_BYTES:
        if len(_HEADERS) >= _CACHE_MAX:
            _HEADERS.clear()
        _HEADERS[head] = header
    return header


def decode_infer_request(data: bytes) -> InferRequest | None:
    """The ModelInferRequest in ``data`` as converters.request_from_proto would give it, when
    it is in the plain form most clients send: names, request parameters, inputs with only a
    name, datatype and shape, each in raw_input_contents (which come last, as every protobuf
    library writes them), and outputs with only a name. None for anything else (tensor
    parameters, typed contents, shared memory, fields this does not know, malformed bytes):
    the caller then parses it with protobuf, which accepts or refuses it as before.

    Parsing the message with protobuf and reading its fields cost three times this."""
    global _last
    try:
        end = len(data)
        head, header = _last
        i = len(head)
        # The header of the last request again (one client, most often), then its raw inputs:
        # the header is made of whole fields, so the key after it starts the next field.
        if not (i and data.startswith(head) and data[i] == _R_RAW):
            # Up to the first raw_input_contents entry.
            i = 0
            while i < end:
                key = data[i]
                if key == _R_RAW:
                    break
                if key & 0x87 != 0x02:
                    return None
                n = data[i + 1]
                if n < 0x80:
                    i += 2
                else:
                    n, i = _varint_at(data, i + 1, _LENGTH_SHIFT)
                i += n
            head = data[:i]
            header = _HEADERS.get(head) or _header(head)
            if head in _HEADERS:
                _last = (head, header)
        raws = []
        while i < end:
            if data[i] != _R_RAW:
                return None
            n = data[i + 1]
            if n < 0x80:
                i += 2
            else:
                n, i = _varint_at(data, i + 1, _LENGTH_SHIFT)
            raws.append(data[i : i + n])
            i += n
        if i != end:
            return None  # the last field runs past the end
    except (_NotPlain, IndexError, UnicodeDecodeError):
        return None
    model_name, model_version, request_id, tensors, outputs, params, routing_key = header
    if not raws or len(raws) != len(tensors):
        return None  # typed contents, or a count request_from_proto refuses in its words
    inputs = []
    for (name, datatype, shape, dtype, count), raw in zip(tensors, raws, strict=True):
        if dtype is None:
            check_dims(name, shape)
            dtype = numpy_dtype(datatype)
        inputs.append(raw_input(name, datatype, shape, dtype, count, raw))
    # Lists and maps of their own: the data plane may not change the cached ones, but nothing
    # shares these.
    req = InferRequest(model_name, model_version, request_id, inputs, list(outputs))
    if params:
        req.parameters = dict(params)
        req.routing_key = routing_key
    return req
