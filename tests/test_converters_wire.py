"""The unary ModelInfer response written by hand (agent/serving/wire.py): decoded by
tritonclient here, compared byte for byte with the protobuf message of the stream path
(converters.response_to_proto) in a child process (tests/wire_check.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

# tritonclient's compiled copy of the protocol (see tests/test_serving.py).
from tritonclient.grpc import service_pb2 as tpb

from modelfleet.agent.serving import wire
from modelfleet.agent.serving.wire import encode_infer_response
from modelfleet.kernel.datatypes import encode_bytes_tensor
from tests.procs import ROOT
from tests.wire_cases import Registry, cases


def test_tritonclient_decodes_the_responses_it_is_sent() -> None:
    for resp, placements in cases(300):
        shm = Registry()
        msg = tpb.ModelInferResponse.FromString(
            encode_infer_response(resp, shm, placements)  # type: ignore[arg-type]
        )
        assert (msg.model_name, msg.model_version, msg.id) == (
            resp.model_name,
            resp.model_version,
            resp.id,
        )
        assert len(msg.parameters) == 0
        assert [(o.name, o.datatype, tuple(o.shape)) for o in msg.outputs] == [
            (o.name, o.datatype, o.shape) for o in resp.outputs
        ]
        assert len(msg.raw_output_contents) == len(resp.outputs)
        result = grpcclient.InferResult(msg)
        for i, out in enumerate(resp.outputs):
            if out.name in placements:
                assert msg.raw_output_contents[i] == b""
                continue
            if out.datatype == "BYTES":
                assert msg.raw_output_contents[i] == encode_bytes_tensor(out.data)
                continue
            assert msg.raw_output_contents[i] == out.data.tobytes()
            got = result.as_numpy(out.name)
            assert got.dtype == out.data.dtype
            assert np.array_equal(got, out.data)
        assert [w for w, _ in shm.writes] == [f"output {n!r}" for n in placements]


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16_383, 16_384, 2**31, 2**63 - 1, -1, -(2**63)])
def test_shape_dimensions_are_protobufs_int64(n: int) -> None:
    # Outputs never have negative dimensions, but the encoding of one must still be protobuf's.
    body = tpb.ModelInferResponse.InferOutputTensor(shape=[n]).SerializeToString()
    assert wire._output_tensor(("", "", (n,))) == b"\x2a" + bytes([len(body)]) + body


def test_hand_encoded_responses_are_the_protobuf_messages_bytes() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "tests.wire_check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout)
    assert got["checked"] > 1800
    assert max(got["cache_sizes"]) <= got["cache_max"]
    assert got["model_infer_serializer"] == "None"
    assert got["model_infer_deserializer_is_generated"]
    assert got["stream_serializer_is_generated"]
