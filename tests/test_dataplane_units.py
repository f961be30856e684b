"""dataplane.validate_inputs remembering one-input signatures it accepted: the same answer the
second time, and every refusal still made."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from modelfleet.agent.serving import dataplane
from modelfleet.agent.serving.dataplane import InferInput, validate_inputs
from modelfleet.agent.slots import batch_tail
from modelfleet.kernel.bundle import TensorSpec
from modelfleet.kernel.errors import InvalidRequestError


def _version(max_batch: int = 8) -> Any:
    spec = TensorSpec("x", "FP32", (-1, 4))
    return SimpleNamespace(
        input_specs={"x": spec},
        input_tails={"x": batch_tail(spec.shape)},
        max_batch_size=max_batch,
        accepted={},
        manifest=SimpleNamespace(name="m", version=1),
    )


def _input(rows: int, width: int = 4, datatype: str = "FP32", name: str = "x") -> InferInput:
    arr = np.zeros((rows, width), np.float32)
    return InferInput(name, datatype, arr.shape, arr)


def test_an_accepted_signature_gives_the_same_feed_and_rows_again() -> None:
    version = _version()
    first = _input(3)
    assert validate_inputs(version, [first]) == ({"x": first.data}, 3)
    again = _input(3)
    feed, rows = validate_inputs(version, [again])
    assert rows == 3 and feed["x"] is again.data
    assert len(version.accepted) == 1


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (_input(3, width=5), "expected shape"),
        (_input(3, datatype="FP64"), "expected datatype"),
        (_input(3, name="y"), "has no input 'y'"),
        (_input(9), "exceeds the max batch size"),
        (_input(0), "at least 1"),
    ],
)
def test_refusals_are_made_after_a_signature_was_accepted(bad: InferInput, message: str) -> None:
    version = _version()
    validate_inputs(version, [_input(3)])
    with pytest.raises(InvalidRequestError, match=message):
        validate_inputs(version, [bad])
    with pytest.raises(InvalidRequestError, match=message):
        validate_inputs(version, [bad])  # refusals are never remembered


def test_data_of_another_shape_than_declared_is_validated_afresh() -> None:
    version = _version()
    validate_inputs(version, [_input(3)])
    odd = InferInput("x", "FP32", (3, 4), np.zeros((2, 4), np.float32))
    assert validate_inputs(version, [odd])[1] == 2  # rows come from the data, as before


def test_the_memory_is_bounded() -> None:
    version = _version(max_batch=1000)
    for rows in range(1, dataplane.ACCEPTED_MAX + 20):
        assert validate_inputs(version, [_input(rows)])[1] == rows
    assert len(version.accepted) <= dataplane.ACCEPTED_MAX
