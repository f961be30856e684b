"""The serialized ModelInferResponse of a unary ModelInfer, written straight from the domain
response (grpc_server.py registers the method without a response serializer).

Building the protobuf message and serializing it cost more than the run of a small model.
These bytes are the ones converters.response_to_proto's message serializes to (the stream path
still builds that message); tests/wire_check.py compares the two over many responses. No
protobuf import here, so tests can decode the bytes with tritonclient's copy of the protocol in
the same process.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modelfleet.agent.serving.dataplane import InferResponse
from modelfleet.agent.serving.shm import Placement, SharedMemoryRegistry, write_output
from modelfleet.kernel.datatypes import encode_bytes_tensor

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
