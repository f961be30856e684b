"""The unary ModelInfer request and response without protobuf messages (agent/serving/wire.py):
here against tritonclient's copy of the protocol; in a child process (tests/wire_check.py)
against the protobuf path they replace (converters.request_from_proto, response_to_proto)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

# tritonclient's compiled copy of the protocol (see tests/test_serving.py).
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc._utils import _get_inference_request

from modelfleet.agent.serving import wire
from modelfleet.agent.serving.wire import decode_infer_request, encode_infer_response
from modelfleet.kernel.datatypes import encode_bytes_tensor
from modelfleet.kernel.errors import InvalidRequestError
from tests.procs import ROOT
from tests.wire_cases import Registry, cases, requests


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


@pytest.mark.parametrize("request_id", ["", "req-7"])
@pytest.mark.parametrize("outputs", [[], ["y"], ["y", "z"]])
def test_what_tritonclient_sends_is_decoded_without_protobuf(
    request_id: str, outputs: list[str]
) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    words = np.array([b"a", "ü".encode(), b""], dtype=object).reshape(1, 3)
    tensors = []
    for name, arr, datatype in (("x", x, "FP32"), ("w", words, "BYTES")):
        tensor = grpcclient.InferInput(name, list(arr.shape), datatype)
        tensor.set_data_from_numpy(arr)
        tensors.append(tensor)
    msg = _get_inference_request(
        model_name="small",
        inputs=tensors,
        model_version="2",
        request_id=request_id,
        outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=None,
    )
    req = decode_infer_request(msg.SerializeToString())
    assert req is not None
    assert (req.model_name, req.model_version, req.id, req.outputs) == (
        "small",
        "2",
        request_id,
        outputs,
    )
    assert [(i.name, i.datatype, i.shape) for i in req.inputs] == [
        ("x", "FP32", (2, 4)),
        ("w", "BYTES", (1, 3)),
    ]
    assert np.array_equal(req.inputs[0].data, x)
    assert req.inputs[1].data.tolist() == words.tolist()
    assert (req.parameters, req.output_parameters, req.routing_key) == ({}, {}, "")


def test_decoded_requests_say_what_protobuf_reads() -> None:
    """Random requests, plain or not: whatever is decoded by hand matches tritonclient's parse;
    what is not plain is left to protobuf (None)."""
    decoded = 0
    for data in requests(tpb, 1500):
        try:
            req = decode_infer_request(data)
        except InvalidRequestError:
            continue  # the same refusal as the protobuf path's: tests/wire_check.py
        if req is None:
            continue
        decoded += 1
        msg = tpb.ModelInferRequest.FromString(data)
        params = {}
        for key, param in msg.parameters.items():
            kind = param.WhichOneof("parameter_choice")
            params[key] = getattr(param, kind) if kind else None
        assert req.parameters == params
        key = params.get("routing_key", "")
        assert req.routing_key == (key if isinstance(key, str) else str(key))
        assert (req.model_name, req.model_version, req.id) == (
            msg.model_name,
            msg.model_version,
            msg.id,
        )
        assert req.outputs == [o.name for o in msg.outputs]
        assert all(not o.parameters for o in msg.outputs)
        assert len(req.inputs) == len(msg.inputs) == len(msg.raw_input_contents)
        for inp, tensor, raw in zip(req.inputs, msg.inputs, msg.raw_input_contents, strict=True):
            assert not tensor.parameters and not tensor.HasField("contents")
            assert (inp.name, inp.datatype, inp.shape) == (
                tensor.name,
                tensor.datatype,
                tuple(tensor.shape),
            )
            if inp.datatype == "BYTES":
                assert encode_bytes_tensor(inp.data) == raw
            else:
                assert inp.data.tobytes() == raw
    assert decoded > 300


def test_requests_that_share_a_header_prefix_decode_each_as_sent() -> None:
    """The decoder tries the last request's header first: a request that starts the same way
    but goes on otherwise (an output asked for, another shape) is still read as sent."""
    x = np.arange(4, dtype=np.float32).reshape(1, 4)

    def request(outputs: list[str], rows: int = 1) -> bytes:
        msg = tpb.ModelInferRequest(model_name="small")
        msg.inputs.add(name="x", datatype="FP32", shape=[rows, 4])
        for o in outputs:
            msg.outputs.add(name=o)
        msg.raw_input_contents.append(np.repeat(x, rows, axis=0).tobytes())
        return msg.SerializeToString()

    plain, asks, two_rows = request([]), request(["y"]), request([], rows=2)
    for data, outputs, shape in [
        (plain, [], (1, 4)),
        (plain, [], (1, 4)),
        (asks, ["y"], (1, 4)),
        (plain, [], (1, 4)),
        (two_rows, [], (2, 4)),
        (asks, ["y"], (1, 4)),
    ]:
        req = decode_infer_request(data)
        assert req is not None
        assert req.outputs == outputs
        assert req.inputs[0].shape == shape == req.inputs[0].data.shape


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
    assert got["requests_decoded"] > 1000
    assert got["model_infer_serializer"] == got["model_infer_deserializer"] == "None"
    # What gRPC answered when its own deserializer refused the bytes.
    assert [code for code, _ in got["garbage"]] == ["UNKNOWN", "UNKNOWN"]
    assert got["garbage"][0][1].startswith(
        "Unexpected <class 'google.protobuf.message.DecodeError'>: Error parsing message"
    )
    assert got["garbage"][1][1].endswith("String field had bad UTF-8")
    assert got["stream_serializer_is_generated"]


def test_what_perf_analyzer_sends_is_decoded_without_protobuf() -> None:
    # The bytes perf_analyzer 2.41 sent for `-m small --shape x:4 -b 1` (captured): with a
    # request parameter, triton_enable_empty_final_response, on every request. Before the
    # decoder read request parameters, all of its requests went through protobuf.
    data = (
        b'\n\x05small"(\n"triton_enable_empty_final_response\x12\x02\x08\x01*\r\n\x01x\x12\x04'
        b"FP32\x1a\x02\x01\x042\x03\n\x01y:\x10g\xc6isQ\xffJ\xec)\xcd\xba\xab\xf2\xfb\xe3F"
    )
    req = decode_infer_request(data)
    assert req is not None
    assert (req.model_name, req.outputs, req.routing_key) == ("small", ["y"], "")
    assert req.parameters == {"triton_enable_empty_final_response": True}
    assert [(i.name, i.datatype, i.shape) for i in req.inputs] == [("x", "FP32", (1, 4))]
    msg = tpb.ModelInferRequest.FromString(data)
    assert req.inputs[0].data.tobytes() == msg.raw_input_contents[0]
