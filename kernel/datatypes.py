"""Open Inference Protocol datatypes and their numpy / ONNX counterparts."""

from __future__ import annotations

import struct

import numpy as np

from modelfleet.kernel.errors import InvalidRequestError

# OIP datatype -> numpy dtype. BYTES is an object array of ``bytes`` (or ``str``).
NUMPY_BY_DATATYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

# ONNX TensorProto element types (onnx.TensorProto.DataType numbers) -> OIP datatype.
DATATYPE_BY_ONNX_ELEM: dict[int, str] = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
}

# onnxruntime's NodeArg.type strings -> OIP datatype.
DATATYPE_BY_ORT_TYPE: dict[str, str] = {
    "tensor(float)": "FP32",
    "tensor(uint8)": "UINT8",
    "tensor(int8)": "INT8",
    "tensor(uint16)": "UINT16",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(string)": "BYTES",
    "tensor(bool)": "BOOL",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
}

_DATATYPE_BY_NUMPY: dict[np.dtype, str] = {v: k for k, v in NUMPY_BY_DATATYPE.items()}


def numpy_dtype(datatype: str) -> np.dtype:
    try:
        return NUMPY_BY_DATATYPE[datatype]
    except KeyError:
        raise InvalidRequestError(
            f"unknown datatype {datatype!r}; expected one of {', '.join(NUMPY_BY_DATATYPE)}",
            reason="datatype",
        ) from None


def check_int_range(name: str, datatype: str, values: np.ndarray, reason: str) -> None:
    """Refuse integers that ``datatype`` cannot hold, instead of letting numpy wrap them (an INT8
    300 would become 44 without a word). ``values`` holds them in a wider integer type."""
    info = np.iinfo(numpy_dtype(datatype))
    flat = values.reshape(-1)
    bad = np.flatnonzero((flat < info.min) | (flat > info.max))
    if bad.size:
        i = int(bad[0])
        raise InvalidRequestError(
            f"input {name!r}: {datatype} value {int(flat[i])} at index {i} is out of range "
            f"({info.min}..{info.max})",
            reason=reason,
        )


def datatype_of(array: np.ndarray) -> str:
    """OIP datatype of a numpy array; unicode and bytes arrays are BYTES."""
    if array.dtype.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return _DATATYPE_BY_NUMPY[array.dtype]
    except KeyError:
        raise InvalidRequestError(
            f"numpy dtype {array.dtype} has no Open Inference Protocol datatype", reason="datatype"
        ) from None


def element_size(datatype: str) -> int:
    """Bytes per element for fixed-size datatypes (BYTES has no fixed size: 0)."""
    if datatype == "BYTES":
        return 0
    return numpy_dtype(datatype).itemsize


# BYTES tensors on the wire (gRPC raw contents and HTTP binary data alike): each element is a
# 4-byte little-endian length, then that many bytes.
_LEN = struct.Struct("<I")


# numpy holds at most 32 dimensions before 2.0 (64 after); one limit for both edges.
MAX_DIMS = 32


def shaped(name: str, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``data`` (already counted against ``shape``) in its shape, or a refusal: numpy cannot
    hold more than MAX_DIMS dimensions, nor an empty tensor whose dimensions multiply past
    2**63, and says so with a ValueError that would otherwise be an internal error."""
    if len(shape) > MAX_DIMS:
        raise InvalidRequestError(
            f"input {name!r}: shape has {len(shape)} dimensions; at most {MAX_DIMS}",
            reason="shape",
        )
    try:
        return data.reshape(shape)
    except ValueError as exc:
        raise InvalidRequestError(
            f"input {name!r}: shape {list(shape)} cannot be held ({exc})", reason="shape"
        ) from None


def decode_bytes_tensor(raw: bytes, name: str, count: int) -> np.ndarray:
    """BYTES raw layout: each element is a 4-byte little-endian length, then that many bytes."""
    items: list[bytes] = []
    offset, end = 0, len(raw)
    view = memoryview(raw)
    while offset < end:
        if offset + 4 > end:
            raise InvalidRequestError(
                f"input {name!r}: BYTES raw content ends inside a length prefix", reason="raw"
            )
        (length,) = _LEN.unpack_from(raw, offset)
        offset += 4
        if offset + length > end:
            raise InvalidRequestError(
                f"input {name!r}: BYTES element {len(items)} claims {length} bytes but only "
                f"{end - offset} remain",
                reason="raw",
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidRequestError(
            f"input {name!r}: shape needs {count} BYTES elements, raw content holds {len(items)}",
            reason="raw",
        )
    arr = np.empty(count, dtype=object)
    arr[:] = items
    return arr


def encode_bytes_tensor(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.reshape(-1):
        b = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)
