"""The agent as a real process, driven by tritonclient and a raw gRPC stub."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

# tritonclient's own compiled copy of the protocol: it registers the same `inference.*` symbols
# as protos.inference_pb2, so only one of the two can live in a process (the agent runs apart).
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from modelfleet.kernel.bundle import create_bundle
from tests import models
from tests.conftest import make_mlp_bundle, mlp_samples
from tests.procs import AgentProcess

DATATYPES = ["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]
MAX_MESSAGE = 1 << 20


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("serving")
    repo = root / "repo"
    make_mlp_bundle(repo, 1)
    src = root / "src"
    ones = np.ones((2, 2), np.float32)
    create_bundle(
        models.two_inputs(src / "two.onnx"),
        name="two",
        version=1,
        out_dir=repo,
        samples={"a": ones, "b": ones},
    )
    create_bundle(
        models.reshape_model(src / "reshape.onnx"),
        name="reshape",
        version=1,
        out_dir=repo,
        max_batch_size=0,
        samples={"x": np.ones((3, 4), np.float32)},
    )
    for dt in DATATYPES:
        create_bundle(
            models.identity(src / f"id-{dt}.onnx", dt),
            name=f"id_{dt.lower()}",
            version=1,
            out_dir=repo,
            samples={"x": models.sample_array(dt)},
        )
    # Batching stays on for tiny models here, so ModelConfig reports dynamic batching.
    proc = AgentProcess(
        repo,
        "--max-message-bytes",
        str(MAX_MESSAGE),
        "--inline-max-us",
        "0",
        log_path=root / "agent.log",
    )
    proc.start()
    try:
        proc.wait_model("mlp", timeout=60)
        for dt in DATATYPES:
            proc.wait_model(f"id_{dt.lower()}")
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


def infer(
    client,
    model: str,
    arrays: dict[str, np.ndarray],
    version: str = "",
    datatype: str | None = None,
):
    inputs = []
    for name, arr in arrays.items():
        dt = datatype or (
            "BYTES"
            if arr.dtype == object
            else {np.dtype(np.float32): "FP32"}.get(arr.dtype, "FP32")
        )
        inp = grpcclient.InferInput(name, list(arr.shape), dt)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return client.infer(model, inputs, model_version=version)


def expect_error(code: str, words: str, fn, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        fn(*args, **kwargs)
    assert info.value.status() == f"StatusCode.{code}", info.value
    assert words in info.value.message(), info.value.message()
    return info.value


# -- correct answers -------------------------------------------------------------------------


def test_outputs_match_in_process_onnxruntime(client, agent: AgentProcess) -> None:
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    result = infer(client, "mlp", {"x": x})
    sess = ort.InferenceSession(str(agent.models / "mlp" / "1" / "model.onnx"))
    np.testing.assert_array_equal(result.as_numpy("y"), sess.run(None, {"x": x})[0])
    assert result.get_response().model_version == "1"


@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_round_trips(client, datatype: str) -> None:
    x = models.sample_array(datatype, rows=3, seed=5)
    inp = grpcclient.InferInput("x", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    out = client.infer(f"id_{datatype.lower()}", [inp]).as_numpy("y")
    if datatype == "BYTES":
        assert [v.decode() for v in out.ravel()] == list(x.ravel())
    else:
        assert out.dtype == x.dtype
        np.testing.assert_array_equal(out, x)


def test_two_inputs_and_requested_outputs(client) -> None:
    a = np.array([[1, 2], [3, 4]], np.float32)
    b = np.array([[10, 20], [30, 40]], np.float32)
    ins = []
    for name, arr in (("a", a), ("b", b)):
        i = grpcclient.InferInput(name, [2, 2], "FP32")
        i.set_data_from_numpy(arr)
        ins.append(i)
    r = client.infer("two", ins, outputs=[grpcclient.InferRequestedOutput("prod")])
    np.testing.assert_array_equal(r.as_numpy("prod"), a * b)
    assert r.as_numpy("sum") is None
    r = client.infer("two", ins)
    np.testing.assert_array_equal(r.as_numpy("sum"), a + b)


def test_typed_inputs_are_accepted(stub) -> None:
    req = pb.ModelInferRequest(model_name="mlp")
    t = req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    t.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    resp = stub.ModelInfer(req, timeout=10)
    assert len(resp.raw_output_contents) == 1  # always raw, even for typed requests
    y = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(1, 3)
    assert np.all(np.isfinite(y))


def test_typed_int_and_bytes_inputs(stub) -> None:
    req = pb.ModelInferRequest(model_name="id_int16")
    req.inputs.add(name="x", datatype="INT16", shape=[1, 3]).contents.int_contents.extend(
        [1, -2, 3]
    )
    resp = stub.ModelInfer(req, timeout=10)
    assert np.frombuffer(resp.raw_output_contents[0], np.int16).tolist() == [1, -2, 3]
    req = pb.ModelInferRequest(model_name="id_bytes")
    req.inputs.add(name="x", datatype="BYTES", shape=[1, 3]).contents.bytes_contents.extend(
        [b"a", b"bc", b""]
    )
    resp = stub.ModelInfer(req, timeout=10)
    raw = resp.raw_output_contents[0]
    assert raw == b"\x01\x00\x00\x00a\x02\x00\x00\x00bc\x00\x00\x00\x00"


# -- metadata, config, readiness, statistics -------------------------------------------------


def test_metadata_and_config(client) -> None:
    md = client.get_model_metadata("mlp", as_json=True)
    assert md["platform"] == "onnxruntime_onnx" and md["versions"] == ["1"]
    assert md["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]
    cfg = client.get_model_config("mlp", as_json=True)["config"]
    assert cfg["max_batch_size"] == 32
    assert cfg["input"][0]["data_type"] == "TYPE_FP32" and cfg["input"][0]["dims"] == ["4"]
    assert "dynamic_batching" in cfg
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "modelfleet" and "statistics" in server["extensions"]


def test_readiness_and_health(agent: AgentProcess, client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("mlp", "7") and not client.is_model_ready("nope")
    with grpc.insecure_channel(agent.url) as channel:
        h = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert h.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == serving
        assert h.Check(health_pb2.HealthCheckRequest(service="mlp"), timeout=5).status == serving


def test_statistics_and_repository_index(client) -> None:
    infer(client, "mlp", {"x": mlp_samples(rows=2)["x"]})
    stats = client.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
    assert stats["name"] == "mlp" and stats["version"] == "1"
    assert int(stats["inference_stats"]["success"]["count"]) >= 1
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {"name": "mlp", "version": "1", "state": "READY"} in index


# -- bad input: a clear status, naming the tensor and both values ----------------------------


def test_unknown_model_and_version(client) -> None:
    x = {"x": mlp_samples(rows=1)["x"]}
    expect_error("NOT_FOUND", "model 'nope' is not loaded", infer, client, "nope", x)
    expect_error("NOT_FOUND", "version '9' is not loaded (loaded: 1)", infer, client, "mlp", x, "9")


def test_wrong_input_name_missing_input_datatype_shape(client) -> None:
    x = mlp_samples(rows=1)["x"]
    expect_error("INVALID_ARGUMENT", "has no input 'z' (inputs: x)", infer, client, "mlp", {"z": x})
    a = np.ones((1, 2), np.float32)
    expect_error("INVALID_ARGUMENT", "missing input(s) 'b'", infer, client, "two", {"a": a})
    inp = grpcclient.InferInput("x", [1, 4], "FP64")
    inp.set_data_from_numpy(x.astype(np.float64))
    expect_error(
        "INVALID_ARGUMENT",
        "input 'x': expected datatype FP32, got FP64",
        client.infer,
        "mlp",
        [inp],
    )
    bad = np.ones((1, 5), np.float32)
    expect_error(
        "INVALID_ARGUMENT",
        "input 'x': expected shape [-1,4], got [1,5]",
        infer,
        client,
        "mlp",
        {"x": bad},
    )


def test_batch_larger_than_allowed(client) -> None:
    x = np.ones((33, 4), np.float32)
    expect_error(
        "INVALID_ARGUMENT",
        "batch of 33 exceeds the max batch size 32",
        infer,
        client,
        "mlp",
        {"x": x},
    )


def test_raw_bytes_that_do_not_match_shape(stub) -> None:
    req = pb.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(b"\x00" * 12)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x': raw content is 12 bytes, but shape [1, 4] x FP32 needs 16 bytes" in (
        info.value.details()
    )


def test_typed_contents_with_wrong_count(stub) -> None:
    req = pb.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([1.0])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 4 values, contents.fp32_contents holds 1" in info.value.details()


def test_oversized_message(client) -> None:
    x = np.ones((32, (MAX_MESSAGE // 4 // 32) + 64), np.float32)
    with pytest.raises(InferenceServerException) as info:
        infer(client, "mlp", {"x": x})
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"


def test_runtime_failure_is_internal_and_counted(client, agent: AgentProcess) -> None:
    ok = infer(client, "reshape", {"x": np.ones((3, 4), np.float32)})
    assert ok.as_numpy("y").shape == (4, 3)
    expect_error(
        "INTERNAL", "model reshape v1", infer, client, "reshape", {"x": np.ones((1, 4), np.float32)}
    )
    metrics = agent.metrics()
    assert (
        'modelfleet_requests_total{model="reshape",outcome="failure",reason="runtime",version="1"}'
        in metrics
    )


def test_agent_keeps_serving_after_all_that(client) -> None:
    assert infer(client, "mlp", {"x": mlp_samples(rows=1)["x"]}).as_numpy("y").shape == (1, 3)


def test_metrics_exposed(agent: AgentProcess, client) -> None:
    infer(client, "mlp", {"x": mlp_samples(rows=3)["x"]})
    text = agent.metrics()
    for series in (
        'modelfleet_requests_total{model="mlp",outcome="success",reason="",version="1"}',
        'modelfleet_request_duration_seconds_bucket{le="0.001",model="mlp",version="1"}',
        "modelfleet_queue_duration_seconds_count",
        "modelfleet_compute_duration_seconds_count",
        "modelfleet_batch_size_bucket",
        'modelfleet_loaded_versions{model="mlp",role="active",version="1"} 1.0',
        'modelfleet_requests_total{model="mlp",outcome="failure",reason="shape",version="1"}',
    ):
        assert series in text, series


def test_status_cli(agent: AgentProcess) -> None:
    out = agent.cli("status")
    assert out.returncode == 0, out.stderr
    assert "READY" in out.stdout and "mlp" in out.stdout and "passed" in out.stdout
    missing = agent.cli("rollback", "mlp")
    assert missing.returncode == 7
    assert "no previous version loaded" in missing.stderr


def test_unknown_config_key_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\nlisten = "127.0.0.1:1"\nlisten_port = 3\n')
    r = subprocess.run(
        [sys.executable, "-m", "modelfleet.agent.cli", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 3 and "unknown key(s) listen_port" in r.stderr
