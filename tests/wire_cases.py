"""Random ModelInferResponse cases for the hand-written wire encoding (agent/serving/wire.py),
shared by tests/test_converters_wire.py (decoded with tritonclient in the test process) and
tests/wire_check.py (compared with converters.response_to_proto in a child process)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np

from modelfleet.agent.serving.dataplane import InferOutput, InferResponse
from modelfleet.agent.serving.shm import Placement

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
