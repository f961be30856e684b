"""The rest of the gRPC protocol surface (issue 17): streaming, sequence parameters, model
control, classification and reflection, driven by unmodified public clients against a real
agent process."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

# tritonclient's compiled copy of the protocol (see tests/test_serving.py).
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from modelfleet.kernel.bundle import create_bundle
from tests import models
from tests.conftest import make_mlp_bundle, mlp_samples
from tests.procs import (
    ROOT,
    AgentProcess,
    HubProcess,
    enroll_agent,
    free_port,
    perf_analyzer,
    wait_for,
)

pytestmark = pytest.mark.process

LABELS = ("cat", "dog", "fox", "owl", "yak")
CLASSES = len(LABELS)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("protocol")
    repo = root / "repo"
    make_mlp_bundle(repo, 1)
    src = root / "src"
    create_bundle(
        models.classifier(src / "cls.onnx", classes=CLASSES),
        name="cls",
        version=1,
        out_dir=repo,
        samples=mlp_samples(),
        labels={"probs": LABELS},
    )
    create_bundle(
        models.mlp(src / "spare.onnx", seed=3),
        name="spare",
        version=1,
        out_dir=repo,
        samples=mlp_samples(),
    )
    # A bundle that fails its health gate (expected outputs that the model does not give),
    # kept out of the repository until a test moves it in.
    create_bundle(
        models.mlp(src / "broken.onnx", seed=4),
        name="broken",
        version=1,
        out_dir=root / "outside",
        samples=mlp_samples(),
        expected={"y": np.full((4, 3), 1e6, np.float32)},
    )
    proc = AgentProcess(repo, "--model-control", log_path=root / "agent.log")
    proc.start()
    try:
        for name in ("mlp", "cls", "spare"):
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


def _inputs(x: np.ndarray) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def _expect(code: str, words: list[str], fn, *args, **kwargs) -> str:
    with pytest.raises(InferenceServerException) as info:
        fn(*args, **kwargs)
    assert info.value.status() == f"StatusCode.{code}", info.value
    for w in words:
        assert w in info.value.message(), info.value.message()
    return info.value.message()


def _x(rows: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)


# -- server metadata ----------------------------------------------------------------------------


def test_server_metadata_lists_only_working_extensions(client) -> None:
    ext = set(client.get_server_metadata().extensions)
    assert ext == {
        "classification",
        "model_configuration",
        "model_repository",
        "statistics",
        "system_shared_memory",
    }


# -- sequences ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sequence_id", [7, "session-a"])
def test_sequence_parameters_are_refused_on_a_stateless_model(client, sequence_id) -> None:
    msg = _expect(
        "INVALID_ARGUMENT",
        ["'sequence_id'", "stateless", "'mlp'"],
        client.infer,
        "mlp",
        _inputs(_x()),
        sequence_id=sequence_id,
        sequence_start=True,
    )
    assert "sequence_start" in msg
    # The refusal was for that request only.
    assert client.infer("mlp", _inputs(_x())).as_numpy("y").shape == (3, 3)


def test_sequence_end_alone_is_refused_too(stub) -> None:
    x = _x(1)
    req = pb.ModelInferRequest(model_name="mlp")
    t = req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    del t
    req.raw_input_contents.append(x.tobytes())
    req.parameters["sequence_end"].bool_param = True
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'sequence_end'" in info.value.details() and "stateless" in info.value.details()


# -- classification -----------------------------------------------------------------------------


def _reference(agent: AgentProcess, model: str, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(agent.models / model / "1" / "model.onnx"))
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"x": x}), strict=True))


def _parse(entry: bytes) -> tuple[float, int, str]:
    parts = entry.decode().split(":")
    return float(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else ""


def test_classification_returns_top_n_with_labels(client, agent: AgentProcess) -> None:
    x = _x(4, seed=2)
    outs = [
        grpcclient.InferRequestedOutput("probs", class_count=2),
        grpcclient.InferRequestedOutput("logits", class_count=3),
    ]
    result = client.infer("cls", _inputs(x), outputs=outs)
    ref = _reference(agent, "cls", x)
    probs = result.as_numpy("probs")
    assert probs.shape == (4, 2)
    for row, got in zip(ref["probs"], probs, strict=True):
        order = np.argsort(-row, kind="stable")[:2]
        parsed = [_parse(e) for e in got]
        assert [p[1] for p in parsed] == list(order)
        assert [p[2] for p in parsed] == [LABELS[i] for i in order]
        np.testing.assert_allclose([p[0] for p in parsed], row[order], atol=1e-5)
    # No labels in the bundle for logits: value:index only.
    logits = result.as_numpy("logits")
    assert logits.shape == (4, 3)
    assert all(len(e.decode().split(":")) == 2 for e in logits.ravel())


def test_class_count_above_the_classes_returns_every_class_ranked(client) -> None:
    out = grpcclient.InferRequestedOutput("probs", class_count=CLASSES + 20)
    result = client.infer("cls", _inputs(_x(2)), outputs=[out]).as_numpy("probs")
    assert result.shape == (2, CLASSES)
    for row in result:
        parsed = [_parse(e) for e in row]
        assert sorted(p[1] for p in parsed) == list(range(CLASSES))
        values = [p[0] for p in parsed]
        assert values == sorted(values, reverse=True)


def test_bad_class_counts_are_refused(stub) -> None:
    for bad in ("string", -1):
        req = pb.ModelInferRequest(model_name="cls")
        req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        req.raw_input_contents.append(_x(1).tobytes())
        out = req.outputs.add(name="probs")
        if isinstance(bad, str):
            out.parameters["classification"].string_param = bad
        else:
            out.parameters["classification"].int64_param = bad
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(req, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'classification' must be a positive integer" in info.value.details()


# -- streaming ----------------------------------------------------------------------------------


def test_stream_answers_in_order_with_one_bad_request(client, agent: AgentProcess) -> None:
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), answers))
    try:
        good = {}
        for i in range(7):
            if i == 3:
                bad = np.zeros((2, 5), np.float32)  # wrong width
                client.async_stream_infer("mlp", _inputs(bad), request_id=str(i))
                continue
            good[i] = _x(2, seed=i)
            client.async_stream_infer("mlp", _inputs(good[i]), request_id=str(i))
        got = [answers.get(timeout=30) for _ in range(7)]
    finally:
        client.stop_stream()
    errors = [(i, e) for i, (_, e) in enumerate(got) if e is not None]
    assert len(errors) == 1 and errors[0][0] == 3, errors
    assert "expected shape [-1,4], got [2,5]" in errors[0][1].message()
    results = [r for r, _ in got if r is not None]
    assert [r.get_response().id for r in results] == ["0", "1", "2", "4", "5", "6"]
    for r in results:
        i = int(r.get_response().id)
        np.testing.assert_allclose(
            r.as_numpy("y"), _reference(agent, "mlp", good[i])["y"], rtol=1e-5, atol=1e-6
        )


def test_stream_flags_the_final_response_when_asked(client) -> None:
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), answers))
    try:
        client.async_stream_infer(
            "mlp", _inputs(_x()), request_id="f", enable_empty_final_response=True
        )
        client.async_stream_infer(
            "nope", _inputs(_x()), request_id="g", enable_empty_final_response=True
        )
        (ok, err1), (bad, err2) = answers.get(timeout=30), answers.get(timeout=30)
    finally:
        client.stop_stream()
    assert err1 is None and ok.get_response().parameters["triton_final_response"].bool_param
    assert ok.as_numpy("y").shape == (3, 3)
    assert bad is None and "model 'nope' is not loaded" in err2.message()


def test_raw_stream_keeps_order_across_many_requests_and_models(stub) -> None:
    def requests():
        for i in range(200):
            req = pb.ModelInferRequest(model_name="mlp" if i % 2 else "nope", id=str(i))
            req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
            req.raw_input_contents.append(_x(1, seed=i).tobytes())
            yield req

    responses = list(stub.ModelStreamInfer(requests(), timeout=60))
    assert [r.infer_response.id for r in responses] == [str(i) for i in range(200)]
    for i, r in enumerate(responses):
        if i % 2:
            assert r.error_message == "" and r.infer_response.model_name == "mlp"
        else:
            assert "model 'nope' is not loaded" in r.error_message


def test_perf_analyzer_streaming(agent: AgentProcess, tmp_path: Path) -> None:
    out = tmp_path / "pa.csv"
    r, rows = perf_analyzer(
        agent.url, "mlp", out, "--streaming", "--shape", "x:4", "--concurrency-range", "4"
    )
    assert len(rows) == 1 and float(rows[0]["Inferences/Second"]) > 50, r.stdout


# -- model control ------------------------------------------------------------------------------


def test_unload_stops_serving_until_loaded_again(client, agent: AgentProcess) -> None:
    x = _x()
    client.infer("spare", _inputs(x))
    client.unload_model("spare")
    assert not client.is_model_ready("spare")
    msg = _expect(
        "NOT_FOUND", ["'spare' is not loaded", "unloaded"], client.infer, "spare", _inputs(x)
    )
    assert "RepositoryModelLoad" in msg
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["spare"].state == "UNAVAILABLE" and index["spare"].reason == "unloaded"
    # The watcher polls every 0.2 s: the bundle on disk is not loaded back behind our back.
    time.sleep(1.0)
    assert not client.is_model_ready("spare")
    assert client.is_model_ready("mlp")
    client.load_model("spare")
    assert client.is_model_ready("spare")
    client.infer("spare", _inputs(x))


def test_load_and_unload_of_unknown_models_are_refused(client) -> None:
    _expect("NOT_FOUND", ["no model 'nope' in the repository"], client.load_model, "nope")
    _expect("NOT_FOUND", ["did you mean 'spare'"], client.load_model, "spar")
    _expect("NOT_FOUND", ["'nope' is not loaded"], client.unload_model, "nope")
    _expect("INVALID_ARGUMENT", ["not valid"], client.load_model, "../etc")


def test_load_parameters_are_refused(client) -> None:
    _expect(
        "INVALID_ARGUMENT",
        ["parameters ['config'] are not supported", "signed bundles"],
        client.load_model,
        "spare",
        config='{"max_batch_size": 8}',
    )


def test_load_of_a_model_that_fails_its_gate(client, agent: AgentProcess) -> None:
    target = agent.models / "broken"
    shutil.copytree(agent.models.parent / "outside" / "broken", target)
    try:
        msg = _expect(
            "FAILED_PRECONDITION", ["refused by the health gate"], client.load_model, "broken"
        )
        assert "'broken' version 1" in msg
        assert not client.is_model_ready("broken")
        assert client.is_model_ready("mlp")
        client.infer("mlp", _inputs(_x()))
    finally:
        shutil.rmtree(target)
    wait_for(
        lambda: "broken" not in {m.name for m in client.get_model_repository_index().models},
        15,
        "the removed bundle forgotten",
    )


# -- reflection ---------------------------------------------------------------------------------


def test_reflection_lists_describes_and_calls(agent: AgentProcess) -> None:
    channel = grpc.insecure_channel(agent.url)
    try:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        assert not any("Admin" in s for s in services)
        pool = descriptor_pool.DescriptorPool(db)
        svc = pool.FindServiceByName("inference.GRPCInferenceService")
        methods = {m.name for m in svc.methods}
        assert {"ModelInfer", "ModelStreamInfer", "RepositoryModelLoad"} <= methods
        # A call built only from what reflection said, as grpcurl makes one.
        method = svc.methods_by_name["ModelMetadata"]
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelMetadata",
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        resp = call(req_cls(name="cls"), timeout=10)
        assert [o.name for o in resp.outputs] == ["logits", "probs"]
    finally:
        channel.close()


def test_model_control_is_off_unless_the_operator_turns_it_on(tmp_path: Path) -> None:
    # As Triton's default: otherwise any client allowed to infer could unload every model.
    make_mlp_bundle(tmp_path / "repo", 1)
    http_url = f"127.0.0.1:{free_port()}"
    agent = AgentProcess(tmp_path / "repo", "--http-listen", http_url)
    agent.start()
    try:
        agent.wait_model("mlp", timeout=60)
        c = agent.client()
        try:
            for fn in (c.load_model, c.unload_model):
                _expect(
                    "FAILED_PRECONDITION", ["model control is off", "--model-control"], fn, "mlp"
                )
            assert "model_repository" not in c.get_server_metadata().extensions
            assert c.is_model_ready("mlp")
        finally:
            c.close()
        h = httpclient.InferenceServerClient(http_url, network_timeout=10)
        try:
            with pytest.raises(InferenceServerException) as info:
                h.unload_model("mlp")
            assert info.value.status() == "409", info.value
            assert "--model-control" in info.value.message()
            assert "model_repository" not in h.get_server_metadata()["extensions"]
            assert h.is_model_ready("mlp")
        finally:
            h.close()
    finally:
        agent.stop()


# -- fleet mode ---------------------------------------------------------------------------------


def test_fleet_mode_refuses_model_control_naming_the_hub(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub", log_path=tmp_path / "hub.log").start()
    agent = None
    try:
        config = enroll_agent(hub, tmp_path / "a0", "site=x", hostname="edge-0")
        http_url = f"127.0.0.1:{free_port()}"
        agent = AgentProcess(
            tmp_path / "a0",
            "--http-listen",
            http_url,
            fleet_config=config,
            log_path=tmp_path / "a0.log",
        )
        agent.start()
        agent.wait_live()
        c = agent.client()
        try:
            for fn in (c.load_model, c.unload_model):
                msg = _expect(
                    "FAILED_PRECONDITION", ["follows the hub at", "modelfleet-hub"], fn, "mlp"
                )
                assert hub.url in msg, msg
            assert "model_repository" not in c.get_server_metadata().extensions
        finally:
            c.close()
        # HTTP: 409 (FAILED_PRECONDITION's status) with the same words, and the same list.
        h = httpclient.InferenceServerClient(http_url, network_timeout=10)
        try:
            for fn in (h.load_model, h.unload_model):
                with pytest.raises(InferenceServerException) as info:
                    fn("mlp")
                assert info.value.status() == "409", info.value
                assert "follows the hub at" in info.value.message()
                assert hub.url in info.value.message()
            ext = set(h.get_server_metadata()["extensions"])
            assert ext == {
                "binary_tensor_data",
                "classification",
                "model_configuration",
                "statistics",
                "system_shared_memory",
            }
        finally:
            h.close()
    finally:
        if agent is not None:
            agent.stop()
        hub.stop()


def test_stream_holds_at_most_the_bound_in_flight_and_answers_in_order() -> None:
    """The servicer reads no more than STREAM_MAX_INFLIGHT requests of a stream ahead, and
    answers in request order whatever order the answers complete in (tests/stream_bound.py)."""
    r = subprocess.run(
        [sys.executable, "-m", "tests.stream_bound"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["peak"] == got["bound"]
    # One more may have been taken from the iterator while it waited for room.
    assert got["read_ahead"] <= got["bound"] + 1
    assert got["ids"] == [str(i) for i in range(got["total"])]
