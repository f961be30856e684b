"""Inference inputs an attacker (or a sloppy client) sends: they reach the model exactly as sent,
or are refused with INVALID_ARGUMENT naming the tensor and the value; nothing is silently altered.

A real agent process, real ONNX models built here with onnx.helper, tritonclient where it can
express the request and raw gRPC stubs (tritonclient's compiled protocol) where it cannot.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient

# tritonclient's own compiled copy of the protocol: protos.inference_pb2 registers the same
# `inference.*` symbols, so only one of the two can live in a process (the agent runs apart).
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from modelfleet.kernel.bundle import create_bundle
from tests import models
from tests.procs import AgentProcess

# Bytes that are not UTF-8, of different lengths, none holding a NUL. The model compares its
# input with exactly these, so any change on the way (U+FFFD, a repr, a cut) shows as False.
PROBE = [b"\xff\xfe", b"\x80abc\xc0", b"\xc3("]
# The same, as the agent used to alter them: decoded with errors="replace", or str() of bytes.
REPLACED = [b.decode("utf-8", "replace").encode() for b in PROBE]
REPR = [str(b).encode() for b in PROBE]

INT_DATATYPES = ["INT8", "INT16", "UINT8", "UINT16"]


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    # Equal on strings needs opset 19 (ir_version 9).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def match_model(path: Path, probe: list[bytes]) -> Path:
    """s[N, len(probe)] (string) -> hit = Equal(s, probe): which elements arrived byte for byte."""
    width = len(probe)
    # Filled by hand: helper.make_tensor goes through numpy 'S' and drops trailing NUL bytes.
    const = TensorProto(name="probe", data_type=TensorProto.STRING, dims=[width])
    const.string_data.extend(probe)
    graph = helper.make_graph(
        [helper.make_node("Equal", ["s", "probe"], ["hit"])],
        "match",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["N", width])],
        [helper.make_tensor_value_info("hit", TensorProto.BOOL, ["N", width])],
        initializer=[const],
    )
    return _save(graph, path)


def echo_model(path: Path) -> Path:
    """s[N, 3] (string) -> y = Identity(s)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["y"])],
        "echo",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, ["N", 3])],
    )
    return _save(graph, path)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("inputs")
    repo, src = root / "repo", root / "src"
    text = np.array([["a", "b", "c"]], dtype=object)
    create_bundle(
        match_model(src / "match.onnx", PROBE),
        name="match",
        version=1,
        out_dir=repo,
        samples={"s": text},
    )
    # Equal-length elements with NUL bytes: the other form onnxruntime can take unchanged.
    create_bundle(
        match_model(src / "match_nul.onnx", [b"\x00\xff", b"\xfe\x00"]),
        name="match_nul",
        version=1,
        out_dir=repo,
        samples={"s": np.array([["a", "b"]], dtype=object)},
    )
    create_bundle(
        echo_model(src / "echo.onnx"), name="echo", version=1, out_dir=repo, samples={"s": text}
    )
    for dt in INT_DATATYPES:
        create_bundle(
            models.identity(src / f"id-{dt}.onnx", dt),
            name=f"id_{dt.lower()}",
            version=1,
            out_dir=repo,
            samples={"x": models.sample_array(dt)},
        )
    proc = AgentProcess(repo, log_path=root / "agent.log")
    proc.start()
    try:
        for name in ("match", "match_nul", "echo", *(f"id_{d.lower()}" for d in INT_DATATYPES)):
            proc.wait_model(name, timeout=60)
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(agent: AgentProcess):
    c = agent.client()
    yield c
    c.close()


@pytest.fixture
def stub(agent: AgentProcess):
    channel = grpc.insecure_channel(agent.url)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def bytes_input(name: str, rows: list[list[bytes]]) -> grpcclient.InferInput:
    arr = np.array(rows, dtype=object)
    inp = grpcclient.InferInput(name, list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    return inp


def refused(stub, req: pb.ModelInferRequest) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return info.value.details()


# -- BYTES are arbitrary bytes ----------------------------------------------------------------


def test_bytes_tensor_non_utf8_passes_unchanged(client) -> None:
    """raw_input_contents (what tritonclient sends): the model sees exactly the bytes sent."""
    hits = client.infer("match", [bytes_input("s", [PROBE, REPLACED, REPR])]).as_numpy("hit")
    assert hits.tolist() == [[True] * 3, [False] * 3, [False] * 3]


def test_bytes_tensor_non_utf8_typed_contents_pass_unchanged(stub) -> None:
    req = pb.ModelInferRequest(model_name="match")
    t = req.inputs.add(name="s", datatype="BYTES", shape=[2, 3])
    t.contents.bytes_contents.extend([*PROBE, *REPLACED])
    resp = stub.ModelInfer(req, timeout=10)
    assert list(resp.raw_output_contents[0]) == [1, 1, 1, 0, 0, 0]


def test_bytes_tensor_non_utf8_with_nul_bytes_passes_unchanged(client) -> None:
    rows = [[b"\x00\xff", b"\xfe\x00"], [b"\xff", b"\xfe"], [b"\x00\xff\x00", b"\xfe\x00\x00"]]
    for row, want in zip(rows, ([True, True], [False, False], [False, False]), strict=True):
        hits = client.infer("match_nul", [bytes_input("s", [row])]).as_numpy("hit")
        assert hits.tolist() == [want], row


def test_bytes_tensor_non_utf8_that_onnxruntime_cannot_take_refused(client) -> None:
    """Bytes that are not UTF-8, NUL bytes and unequal lengths in one tensor: onnxruntime's
    Python binding has no form that carries them unchanged, so the agent refuses instead of
    altering them."""
    with pytest.raises(InferenceServerException) as info:
        client.infer("match_nul", [bytes_input("s", [[b"\x00\xff", b"\xfe\x00\x00"]])])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    msg = info.value.message()
    assert "input 's'" in msg and "not UTF-8" in msg and "NUL" in msg, msg


def test_bytes_tensor_utf8_text_round_trips_exactly(client) -> None:
    row = ["h\u00e9llo".encode(), b"nul\x00inside", "\U0001f600".encode()]
    out = client.infer("echo", [bytes_input("s", [row])]).as_numpy("y")
    assert out.tolist() == [row]


def test_bytes_tensor_non_utf8_echo_refused_not_altered(client) -> None:
    """onnxruntime returns string outputs only as UTF-8 text: bytes that are not UTF-8 cannot
    come back from a string output, so the client gets a clear refusal, never U+FFFD."""
    with pytest.raises(InferenceServerException) as info:
        client.infer("echo", [bytes_input("s", [PROBE])])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    msg = info.value.message()
    assert "not UTF-8" in msg and "model echo v1" in msg, msg


# -- typed integer contents out of range -------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "field", "bad", "allowed"),
    [
        ("INT8", "int_contents", 300, "-128..127"),
        ("INT8", "int_contents", -129, "-128..127"),
        ("INT16", "int_contents", 40000, "-32768..32767"),
        ("UINT8", "uint_contents", 256, "0..255"),
        ("UINT16", "uint_contents", 70000, "0..65535"),
    ],
)
def test_int8_out_of_range_refused(stub, datatype, field, bad, allowed) -> None:
    req = pb.ModelInferRequest(model_name=f"id_{datatype.lower()}")
    t = req.inputs.add(name="x", datatype=datatype, shape=[1, 3])
    getattr(t.contents, field).extend([1, bad, 2])
    msg = refused(stub, req)
    assert f"input 'x': {datatype} value {bad} at index 1 is out of range ({allowed})" in msg, msg


@pytest.mark.parametrize("datatype", INT_DATATYPES)
def test_int_contents_at_the_limits_accepted(stub, datatype) -> None:
    info = np.iinfo(np.dtype(datatype.lower()))
    req = pb.ModelInferRequest(model_name=f"id_{datatype.lower()}")
    t = req.inputs.add(name="x", datatype=datatype, shape=[1, 3])
    field = "uint_contents" if datatype.startswith("U") else "int_contents"
    getattr(t.contents, field).extend([int(info.min), 0, int(info.max)])
    resp = stub.ModelInfer(req, timeout=10)
    got = np.frombuffer(resp.raw_output_contents[0], np.dtype(datatype.lower()))
    assert got.tolist() == [info.min, 0, info.max]


def test_typed_contents_in_the_wrong_field_refused(stub) -> None:
    req = pb.ModelInferRequest(model_name="id_uint16")
    t = req.inputs.add(name="x", datatype="UINT16", shape=[1, 3])
    t.contents.int_contents.extend([-1, 2, 3])
    msg = refused(stub, req)
    assert "input 'x'" in msg and "contents.int_contents" in msg, msg
    assert "UINT16 goes in contents.uint_contents" in msg, msg


# -- typed and raw in one request ---------------------------------------------------------------


def test_typed_and_raw_contents_together_refused(stub) -> None:
    req = pb.ModelInferRequest(model_name="id_int8")
    t = req.inputs.add(name="x", datatype="INT8", shape=[1, 3])
    t.contents.int_contents.extend([7, 8, 9])
    req.raw_input_contents.append(np.array([1, 2, 3], np.int8).tobytes())
    msg = refused(stub, req)
    assert "input 'x'" in msg and "raw_input_contents" in msg and "contents" in msg, msg


def test_bytes_tensor_forms_never_merged_into_one_run(tmp_path: Path) -> None:
    """Requests that each reach the model unchanged alone must do so when the dynamic batcher
    could merge them: bytes with NULs (equal lengths) and bytes without (unequal lengths)
    would, merged into one tensor, have no exact form left."""
    repo = tmp_path / "repo"
    create_bundle(
        match_model(tmp_path / "m.onnx", [b"\x00\xff", b"\xfe\x00"]),
        name="match_nul",
        version=1,
        out_dir=repo,
        max_batch_size=8,
        samples={"s": np.array([["a", "b"]], dtype=object)},
    )
    # A long queue delay: concurrent requests wait for each other and would share a run.
    with AgentProcess(
        repo,
        "--inline-max-us",
        "0",
        "--max-queue-delay-us",
        "300000",
        log_path=tmp_path / "agent.log",
    ) as agent:
        agent.wait_model("match_nul", timeout=60)
        rows = {
            "nul": [b"\x00\xff", b"\xfe\x00"],
            "no_nul": [b"\xff", b"\xfe\xfd\xfc"],
            "text": [b"ab", b"c"],
        }

        def one(key: str) -> list[bool]:
            c = agent.client()
            try:
                return c.infer("match_nul", [bytes_input("s", [rows[key]])]).as_numpy("hit")[0]
            finally:
                c.close()

        with ThreadPoolExecutor(len(rows)) as pool:
            got = dict(zip(rows, pool.map(one, rows), strict=True))
    assert {k: list(v) for k, v in got.items()} == {
        "nul": [True, True],
        "no_nul": [False, False],
        "text": [False, False],
    }
