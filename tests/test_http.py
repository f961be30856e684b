"""Issue 17, items 1 and 8: the Open Inference Protocol over HTTP/REST, against a real agent
process, with unmodified public clients (tritonclient.http, curl) and raw requests for the
malformed cases; and the metrics port, which serves /metrics and nothing else.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from modelfleet.kernel.bundle import create_bundle
from tests import models
from tests.conftest import make_mlp_bundle, mlp_samples
from tests.procs import AgentProcess, free_port, wait_for
from tests.security.test_inference_auth import TOKEN, Pki, wait_ready

MAX_BODY = 64 * 1024
LABELS = ("cat", "dog", "fox", "owl", "yak")
DATATYPES = ["BOOL", "INT8", "INT64", "UINT16", "FP16", "FP32", "FP64", "BYTES"]
X = np.arange(8, dtype=np.float32).reshape(2, 4)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("http")
    repo = root / "repo"
    make_mlp_bundle(repo, 1)
    for dt in DATATYPES:
        create_bundle(
            models.identity(root / "src" / f"id-{dt}.onnx", dt),
            name=f"id_{dt.lower()}",
            version=1,
            out_dir=repo,
            samples={"x": models.sample_array(dt)},
        )
    create_bundle(
        models.classifier(root / "src" / "cls.onnx", classes=len(LABELS)),
        name="cls",
        version=1,
        out_dir=repo,
        samples=mlp_samples(),
        labels={"probs": LABELS},
    )
    create_bundle(
        models.log_model(root / "src" / "log.onnx"),
        name="logm",
        version=1,
        out_dir=repo,
        # Positive samples: the health gate sees finite outputs; clients can get NaN.
        samples={"x": np.arange(1, 9, dtype=np.float32).reshape(2, 4)},
    )
    http_port = free_port()
    proc = AgentProcess(
        repo,
        "--model-control",
        "--http-listen",
        f"127.0.0.1:{http_port}",
        "--http-max-request-bytes",
        str(MAX_BODY),
        log_path=root / "agent.log",
    )
    proc.http_url = f"127.0.0.1:{http_port}"  # type: ignore[attr-defined]
    proc.start()
    try:
        proc.wait_model("mlp", timeout=60)
        proc.wait_model("cls")
        proc.wait_model("logm")
        for dt in DATATYPES:
            proc.wait_model(f"id_{dt.lower()}")
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(agent: AgentProcess):
    c = httpclient.InferenceServerClient(agent.http_url, connection_timeout=10, network_timeout=10)
    yield c
    c.close()


_SESSION: list = []


def expected_y(x: np.ndarray) -> np.ndarray:
    """What the bundle's model answers, computed here with onnxruntime."""
    return _SESSION[0].run(None, {"x": x})[0]


@pytest.fixture(autouse=True, scope="module")
def _reference(agent: AgentProcess) -> None:
    import onnxruntime as ort

    model = agent.models / "mlp" / "1" / "model.onnx"
    _SESSION[:] = [ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])]


def post(agent: AgentProcess, path: str, body: bytes, headers: dict | None = None):
    """(status, headers, body) of a raw POST: for requests no client library would send."""
    conn = http.client.HTTPConnection(agent.http_url, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def assert_still_serves(client: httpclient.InferenceServerClient) -> None:
    inp = httpclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(X)
    np.testing.assert_allclose(
        client.infer("mlp", [inp]).as_numpy("y"), expected_y(X), rtol=1e-5, atol=1e-6
    )


def test_tritonclient_http_health_metadata_config(client) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready("mlp", "9")
    meta = client.get_server_metadata()
    assert meta["name"] == "modelfleet"
    # The same list as gRPC's (one helper), plus what HTTP alone serves.
    assert set(meta["extensions"]) == {
        "binary_tensor_data",
        "classification",
        "model_configuration",
        "model_repository",
        "statistics",
        "system_shared_memory",
    }
    model = client.get_model_metadata("mlp")
    assert model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert model["outputs"][0]["name"] == "y"
    assert client.get_model_metadata("mlp", "1")["name"] == "mlp"
    config = client.get_model_config("mlp")
    assert config["name"] == "mlp" and config["max_batch_size"] > 0
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["input"][0]["dims"] == [4]
    with pytest.raises(InferenceServerException, match="'nope' is not loaded"):
        client.get_model_metadata("nope")


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_http_infer_json_and_binary(client, binary: bool) -> None:
    inp = httpclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(X, binary_data=binary)
    out = httpclient.InferRequestedOutput("y", binary_data=binary)
    result = client.infer("mlp", [inp], outputs=[out], request_id="r-1")
    np.testing.assert_allclose(result.as_numpy("y"), expected_y(X), rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response["id"] == "r-1" and response["model_version"] == "1"
    # JSON outputs carry data; binary ones say how many bytes follow the JSON.
    assert ("data" in response["outputs"][0]) is not binary


@pytest.mark.parametrize(
    ("datatype", "binary"),
    # tritonclient sends FP16 in binary only; FP16 in JSON is tested with a raw request below.
    [(dt, b) for dt in DATATYPES for b in (False, True) if dt != "FP16" or b],
)
def test_every_datatype_round_trips(client, datatype: str, binary: bool) -> None:
    x = models.sample_array(datatype, rows=2)
    inp = httpclient.InferInput("x", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("y", binary_data=binary)
    got = client.infer(f"id_{datatype.lower()}", [inp], outputs=[out]).as_numpy("y")
    if datatype == "BYTES":
        assert [bytes(v) if not isinstance(v, str) else v.encode() for v in got.ravel()] == [
            v.encode() for v in x.ravel()
        ]
    else:
        np.testing.assert_array_equal(got, x)


def test_statistics_and_repository_index(client) -> None:
    assert_still_serves(client)
    stats = client.get_inference_statistics("mlp")["model_stats"]
    assert [s["name"] for s in stats] == ["mlp"]
    success = stats[0]["inference_stats"]["success"]
    assert isinstance(success["count"], int) and success["count"] >= 1
    assert success["ns"] > 0
    everything = client.get_inference_statistics()["model_stats"]
    assert {s["name"] for s in everything} >= {"mlp", "id_fp32"}
    with pytest.raises(InferenceServerException, match="not loaded"):
        client.get_inference_statistics("nope")
    index = client.get_model_repository_index()
    assert {"name": "mlp", "version": "1", "state": "READY"} in index


def test_routing_key_and_nested_data(agent: AgentProcess, client) -> None:
    body = {
        "parameters": {"routing_key": "user-7"},
        "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.tolist()}],
    }
    status, _, raw = post(agent, "/v2/models/mlp/infer", json.dumps(body).encode())
    assert status == 200, raw
    doc = json.loads(raw)
    y = np.array(doc["outputs"][0]["data"], np.float32).reshape(doc["outputs"][0]["shape"])
    np.testing.assert_allclose(y, expected_y(X), rtol=1e-5, atol=1e-6)
    status, _, raw = post(
        agent,
        "/v2/models/mlp/versions/1/infer",
        json.dumps(body).encode(),
        {"x-routing-key": "u" * 300},
    )
    assert status == 200, raw
    # FP16 in JSON (tritonclient sends it in binary only): numbers, as for the other floats.
    half = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP16", "data": [0.5, -2, 3]}]}
    status, _, raw = post(agent, "/v2/models/id_fp16/infer", json.dumps(half).encode())
    assert status == 200, raw
    assert json.loads(raw)["outputs"][0]["data"] == [0.5, -2.0, 3.0]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(agent: AgentProcess) -> None:
    base = f"http://{agent.http_url}"

    def curl(*args: str) -> tuple[str, str]:
        out = subprocess.run(
            ["curl", "-s", "-m", "10", "-w", "\n%{http_code}", *args],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        body, _, code = out.rpartition("\n")
        return code, body

    assert curl(f"{base}/v2/health/live")[0] == "200"
    assert curl(f"{base}/v2/health/ready")[0] == "200"
    assert curl(f"{base}/v2/models/mlp/ready")[0] == "200"
    request = '{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,1,1,1]}]}'
    code, body = curl(
        "-H", "Content-Type: application/json", "-d", request, f"{base}/v2/models/mlp/infer"
    )
    assert code == "200", body
    out = json.loads(body)["outputs"][0]
    assert out["name"] == "y" and out["shape"] == [1, 3]
    np.testing.assert_allclose(
        out["data"], expected_y(np.ones((1, 4), np.float32)).ravel(), rtol=1e-5, atol=1e-6
    )
    code, body = curl("-d", request, f"{base}/v2/models/nope/infer")
    assert code == "404" and "'nope' is not loaded" in json.loads(body)["error"]
    code, body = curl(f"{base}/v2/nothing/here")
    assert code == "404" and "no such endpoint" in json.loads(body)["error"]


def _infer_json(**tensor: object) -> bytes:
    base = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    return json.dumps({"inputs": [{**base, **tensor}]}).encode()


BINARY_X = np.ones((1, 4), np.float32).tobytes()
BINARY_HEAD = json.dumps(
    {
        "inputs": [
            {
                "name": "x",
                "shape": [1, 4],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 16},
            }
        ]
    }
).encode()
H = "Inference-Header-Content-Length"

BAD = {
    "malformed JSON": (b'{"inputs": [', {}, 400, "not valid JSON"),
    "not an object": (b"[1, 2]", {}, 400, "must be a JSON object"),
    "no inputs": (b"{}", {}, 400, "'inputs' must be a non-empty list"),
    "wrong shape": (_infer_json(shape=[1, 5], data=[1] * 5), {}, 400, "expected shape [-1,4]"),
    "data does not fill the shape": (_infer_json(data=[1, 2, 3]), {}, 400, "needs 4 values"),
    "ragged data": (_infer_json(data=[[1, 2], [3]]), {}, 400, "regular"),
    "wrong datatype": (
        _infer_json(datatype="INT32"),
        {},
        400,
        "expected datatype FP32, got INT32",
    ),
    "unknown datatype": (_infer_json(datatype="FLOAT"), {}, 400, "unknown datatype 'FLOAT'"),
    "strings for numbers": (_infer_json(data=["a", "b", "c", "d"]), {}, 400, "must be numbers"),
    "unknown input": (_infer_json(name="z"), {}, 400, "has no input 'z'"),
    "negative dimension": (_infer_json(shape=[-1, 4]), {}, 400, "negative dimension"),
    "header length beyond the body": (
        BINARY_HEAD + BINARY_X,
        {H: str(len(BINARY_HEAD) + 17)},
        400,
        "must be between 0 and the body's length",
    ),
    "negative header length": (BINARY_HEAD + BINARY_X, {H: "-5"}, 400, "between 0 and"),
    "header length not a number": (BINARY_HEAD + BINARY_X, {H: "ten"}, 400, "whole number"),
    "binary size larger than what follows": (
        BINARY_HEAD + BINARY_X[:12],
        {H: str(len(BINARY_HEAD))},
        400,
        "goes past the end of the body",
    ),
    "binary bytes left over": (
        BINARY_HEAD + BINARY_X + b"xxxx",
        {H: str(len(BINARY_HEAD))},
        400,
        "4 binary bytes that no input",
    ),
    "binary size does not fit the shape": (
        BINARY_HEAD.replace(b"[1, 4]", b"[1, 3]") + BINARY_X,
        {H: str(len(BINARY_HEAD))},
        400,
        "needs 12 bytes",
    ),
    "binary tensor without the header": (
        BINARY_HEAD + BINARY_X,
        {},
        400,
        "Inference-Header-Content-Length",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_get_a_clear_error_and_the_agent_keeps_serving(
    agent: AgentProcess, client, case: str
) -> None:
    body, headers, status, words = BAD[case]
    got, resp_headers, raw = post(agent, "/v2/models/mlp/infer", body, headers)
    assert got == status, raw
    assert resp_headers["Content-Type"].startswith("application/json")
    error = json.loads(raw)["error"]
    assert words in error, error
    assert_still_serves(client)


def test_unknown_model_and_version_are_404(agent: AgentProcess, client) -> None:
    status, _, raw = post(agent, "/v2/models/nope/infer", _infer_json())
    assert status == 404 and "'nope' is not loaded" in json.loads(raw)["error"]
    status, _, raw = post(agent, "/v2/models/mlp/versions/7/infer", _infer_json())
    assert status == 404, raw
    assert get(f"http://{agent.http_url}/v2/models/nope/config")[0] == 404
    assert get(f"http://{agent.http_url}/v2/models/mlp/versions/7/ready")[0] == 404
    assert_still_serves(client)


def test_too_large_body_is_413(agent: AgentProcess, client) -> None:
    big = np.ones((MAX_BODY // 16 + 1, 4), np.float32)
    inp = httpclient.InferInput("x", list(big.shape), "FP32")
    inp.set_data_from_numpy(big)
    with pytest.raises(InferenceServerException, match="at most 65536"):
        client.infer("mlp", [inp])
    status, _, raw = post(agent, "/v2/models/mlp/infer", b" " * (MAX_BODY + 1))
    assert status == 413 and "http_max_request_bytes" in json.loads(raw)["error"]
    # Without a Content-Length (chunked), the limit holds while reading.
    conn = http.client.HTTPConnection(agent.http_url, timeout=10)
    try:
        chunks = (b" " * 4096 for _ in range(MAX_BODY // 4096 + 2))
        conn.request("POST", "/v2/models/mlp/infer", body=chunks, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413, resp.read()
    finally:
        conn.close()
    assert_still_serves(client)


def test_metrics_port_serves_metrics_only(agent: AgentProcess) -> None:
    base = f"http://127.0.0.1:{agent.metrics_port}"
    status, body = get(f"{base}/metrics")
    assert status == 200 and b"modelfleet_requests_total" in body
    for path in ("/v2/health/ready", "/", "/healthz"):
        status, body = get(base + path)
        assert status == 404, path
        assert b"/metrics only" in body


def test_http_port_in_use_is_refused_at_start(tmp_path: Path) -> None:
    import socket

    repo = tmp_path / "repo"
    make_mlp_bundle(repo, 1)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        agent = AgentProcess(repo, "--http-listen", f"127.0.0.1:{port}")
        agent.start()
        try:
            assert agent.proc is not None
            agent.proc.wait(30)
        finally:
            agent.stop()
        assert agent.proc.returncode != 0
        assert f"port {port} is in use" in agent.logs() and "--http-listen" in agent.logs()


# -- TLS, mutual TLS and the bearer token: the same settings as the gRPC port ---------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _tls_agent(tmp_path: Path, pki: Pki, *extra: str) -> AgentProcess:
    repo = tmp_path / "repo"
    make_mlp_bundle(repo, 1)
    port = free_port()
    agent = AgentProcess(
        repo,
        "--http-listen",
        f"127.0.0.1:{port}",
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        *extra,
    )
    agent.http_url = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    return agent


def _tls_client(agent: AgentProcess, pki: Pki, cert: Path | None = None, key: Path | None = None):
    ca = pki.root / "ca1" / "ca.crt"
    ssl_options = {"ca_certs": str(ca)}
    if cert is not None:
        ssl_options |= {"certfile": str(cert), "keyfile": str(key)}
    return httpclient.InferenceServerClient(
        agent.http_url, ssl=True, ssl_options=ssl_options, connection_timeout=5, network_timeout=5
    )


def _infer_tls(c) -> np.ndarray:
    inp = httpclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    return c.infer("mlp", [inp]).as_numpy("y")


def test_mutual_tls_over_http(tmp_path: Path, pki: Pki) -> None:
    agent = _tls_agent(tmp_path, pki, "--tls-client-ca", str(pki.root / "ca1" / "ca.crt"))
    agent.start()
    try:
        wait_ready(agent)
        wait_for(lambda: "HTTP/REST inference on https://" in agent.logs(), 10, "HTTP up")
        c = _tls_client(agent, pki, pki.client_cert, pki.client_key)
        try:
            assert c.is_server_ready()
            assert _infer_tls(c).shape == (1, 3)
        finally:
            c.close()
        # No client certificate, or one from another CA: the handshake fails.
        for cert, key in ((None, None), (pki.foreign_cert, pki.foreign_key)):
            c = _tls_client(agent, pki, cert, key)
            try:
                with pytest.raises(Exception):  # noqa: B017 - refused at the TLS layer
                    c.is_server_live()
            finally:
                c.close()
        if shutil.which("curl"):
            ca = str(pki.root / "ca1" / "ca.crt")
            url = f"https://{agent.http_url}/v2/health/live"
            refused = subprocess.run(
                ["curl", "-sS", "-m", "5", "--cacert", ca, url], capture_output=True, timeout=20
            )
            assert refused.returncode != 0
            ok = subprocess.run(
                [
                    "curl",
                    "-sS",
                    "-m",
                    "5",
                    "--cacert",
                    ca,
                    "--cert",
                    str(pki.client_cert),
                    "--key",
                    str(pki.client_key),
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    url,
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert ok.stdout == "200", ok.stderr
        # Plain HTTP on the TLS port gets nowhere either.
        with pytest.raises(Exception):  # noqa: B017
            get(f"http://{agent.http_url}/v2/health/live")
        # And the port still serves the right client after all that.
        c = _tls_client(agent, pki, pki.client_cert, pki.client_key)
        try:
            assert _infer_tls(c).shape == (1, 3)
        finally:
            c.close()
    finally:
        agent.stop()


def test_bearer_token_over_http(tmp_path: Path, pki: Pki) -> None:
    token_file = tmp_path / "inference.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    agent = _tls_agent(tmp_path, pki, "--auth-token-file", str(token_file))
    agent.start()
    try:
        wait_ready(agent)
        wait_for(lambda: "HTTP/REST inference on https://" in agent.logs(), 10, "HTTP up")
        c = _tls_client(agent, pki)
        try:
            # Health stays open to probes, as grpc.health.v1 does.
            assert c.is_server_live() and c.is_server_ready()
            with pytest.raises(InferenceServerException, match="missing bearer token"):
                _infer_tls(c)
            with pytest.raises(InferenceServerException, match="missing bearer token"):
                c.get_model_metadata("mlp")
            inp = httpclient.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(np.ones((1, 4), np.float32))
            with pytest.raises(InferenceServerException, match="invalid bearer token"):
                c.infer("mlp", [inp], headers={"Authorization": "Bearer wrong-token-000000"})
            got = c.infer("mlp", [inp], headers={"Authorization": f"Bearer {TOKEN}"})
            assert got.as_numpy("y").shape == (1, 3)
        finally:
            c.close()
    finally:
        agent.stop()
    assert TOKEN not in agent.logs()


def test_http_infer_continues_the_callers_trace(tmp_path: Path) -> None:
    from tests.otlp_collector import Collector
    from tests.test_tracing import FAST_EXPORT, by_name, traceparent

    repo = tmp_path / "repo"
    make_mlp_bundle(repo, 1)
    port = free_port()
    with Collector() as collector:
        env = {"MODELFLEET_AGENT_TRACING_ENDPOINT": collector.endpoint, **FAST_EXPORT}
        agent = AgentProcess(repo, "--http-listen", f"127.0.0.1:{port}", env=env)
        with agent:
            agent.wait_model("mlp", timeout=60)
            c = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=10)
            try:
                header, trace_id, caller_span = traceparent()
                inp = httpclient.InferInput("x", [1, 4], "FP32")
                inp.set_data_from_numpy(np.ones((1, 4), np.float32))
                c.infer("mlp", [inp], headers={"traceparent": header})
            finally:
                c.close()
            name = "POST /v2/models/{model}/infer"
            wait_for(
                lambda: {name, "modelfleet.inference"} <= set(by_name(collector.spans(trace_id))),
                20,
                "the HTTP request's spans",
            )
            spans = by_name(collector.spans(trace_id))
            assert spans[name].parent_span_id.hex() == caller_span
            assert spans["modelfleet.inference"].parent_span_id == spans[name].span_id


# -- classification and model control, as on gRPC (tests/test_protocol_grpc.py) ----------------


@pytest.mark.parametrize("binary", [False, True])
def test_classification_over_http(agent: AgentProcess, client, binary: bool) -> None:
    import onnxruntime as ort

    x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    inp = httpclient.InferInput("x", [3, 4], "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [
        httpclient.InferRequestedOutput("probs", binary_data=binary, class_count=2),
        httpclient.InferRequestedOutput("logits", binary_data=binary, class_count=3),
    ]
    result = client.infer("cls", [inp], outputs=outs)
    sess = ort.InferenceSession(str(agent.models / "cls" / "1" / "model.onnx"))
    names = [o.name for o in sess.get_outputs()]
    ref = dict(zip(names, sess.run(None, {"x": x}), strict=True))
    probs = result.as_numpy("probs")
    assert probs.shape == (3, 2)
    assert result.get_output("probs")["datatype"] == "BYTES"
    for row, got in zip(ref["probs"], probs, strict=True):
        order = np.argsort(-row, kind="stable")[:2]
        # JSON carries BYTES as strings, the binary extension as bytes.
        parsed = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in got]
        assert [int(p[1]) for p in parsed] == list(order)
        assert [p[2] for p in parsed] == [LABELS[i] for i in order]
        np.testing.assert_allclose([float(p[0]) for p in parsed], row[order], atol=1e-5)
    logits = result.as_numpy("logits")
    assert logits.shape == (3, 3)
    assert all(
        len((e.decode() if isinstance(e, bytes) else e).split(":")) == 2 for e in logits.ravel()
    )


def test_bad_class_count_over_http_is_400(agent: AgentProcess, client) -> None:
    body = json.dumps(
        {
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}],
            "outputs": [{"name": "probs", "parameters": {"classification": 0}}],
        }
    ).encode()
    status, _, raw = post(agent, "/v2/models/cls/infer", body)
    assert status == 400, raw
    assert "'classification' must be a positive integer" in json.loads(raw)["error"]
    assert_still_serves(client)


def test_unload_and_load_over_http(agent: AgentProcess, client) -> None:
    name = "id_int8"
    client.unload_model(name)
    assert not client.is_model_ready(name)
    inp = httpclient.InferInput("x", [1, 3], "INT8")
    inp.set_data_from_numpy(np.array([[1, 2, 3]], np.int8))
    with pytest.raises(InferenceServerException, match="unloaded") as info:
        client.infer(name, [inp])
    assert info.value.status() == "404"
    index = client.get_model_repository_index()
    assert {"name": name, "state": "UNAVAILABLE", "reason": "unloaded"} in index
    assert all(e.get("version") for e in index if e["name"] != name)
    client.load_model(name)
    assert client.is_model_ready(name)
    np.testing.assert_array_equal(client.infer(name, [inp]).as_numpy("y"), [[1, 2, 3]])


def test_model_control_errors_over_http(agent: AgentProcess, client) -> None:
    with pytest.raises(InferenceServerException, match="no model 'nope' in the repository") as e:
        client.load_model("nope")
    assert e.value.status() == "404"
    with pytest.raises(InferenceServerException, match="'nope' is not loaded"):
        client.unload_model("nope")
    with pytest.raises(InferenceServerException, match="not supported") as e:
        client.load_model("mlp", config='{"max_batch_size": 1}')
    assert e.value.status() == "400"
    status, _, raw = post(agent, "/v2/repository/models/mlp/load", b"[1, 2]")
    assert status == 400 and "JSON object" in json.loads(raw)["error"], raw
    assert_still_serves(client)


# Log of these: NaN, -Infinity, then finite values.
NON_FINITE_X = np.array([[-1, 0, 1, 2], [3, 4, 5, 6]], dtype=np.float32)


def non_finite_body(outputs: list[dict] | None = None) -> bytes:
    """A raw JSON request for logm with NON_FINITE_X; ``outputs``: none named (all, as JSON)."""
    doc: dict = {
        "inputs": [
            {
                "name": "x",
                "shape": [2, 4],
                "datatype": "FP32",
                "data": NON_FINITE_X.ravel().tolist(),
            }
        ]
    }
    if outputs is not None:
        doc["outputs"] = outputs
    return json.dumps(doc).encode()


def strict_json(raw: bytes) -> object:
    """RFC 8259 only: NaN, Infinity and -Infinity are refused, as JavaScript's JSON.parse and
    Go's encoding/json refuse them."""

    def refuse(literal: str) -> None:
        raise AssertionError(f"not JSON: {literal} in {raw[:200]!r}")

    return json.loads(raw, parse_constant=refuse)


def test_non_finite_output_as_json_is_a_clear_error(agent: AgentProcess, client) -> None:
    inp = httpclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(NON_FINITE_X, binary_data=True)
    with pytest.raises(InferenceServerException, match=r"'log'.*binary_data") as e:
        client.infer("logm", [inp], outputs=[httpclient.InferRequestedOutput("log", False)])
    assert e.value.status() == "400"
    # Raw JSON, outputs not named (all of them as JSON): the error itself is strict JSON.
    body = non_finite_body()
    status, headers, raw = post(agent, "/v2/models/logm/infer", body)
    assert status == 400, raw
    assert headers["Content-Type"].startswith("application/json")
    error = strict_json(raw)["error"]  # type: ignore[index]
    assert "'log'" in error and "NaN" in error and '"binary_data": true' in error, error
    assert "'same'" not in error
    # The model ran: its statistics count both requests as successes.
    stats = client.get_inference_statistics("logm")["model_stats"][0]["inference_stats"]
    assert int(stats["success"]["count"]) >= 2 and int(stats["fail"]["count"]) == 0
    # The refusals show on the server: counted by reason.
    _, text = get(f"http://127.0.0.1:{agent.metrics_port}/metrics")
    series = (
        'modelfleet_refused_responses_total{model="logm",reason="non_finite_output",version="1"}'
    )
    counted = [ln for ln in text.decode().splitlines() if ln.startswith(series)]
    assert counted and float(counted[0].split()[-1]) >= 2, counted
    assert_still_serves(client)


def test_non_finite_output_in_binary_works(agent: AgentProcess, client) -> None:
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.log(NON_FINITE_X)
    inp = httpclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(NON_FINITE_X, binary_data=False)
    result = client.infer(
        "logm",
        [inp],
        outputs=[
            httpclient.InferRequestedOutput("log", binary_data=True),
            httpclient.InferRequestedOutput("same", binary_data=False),
        ],
    )
    np.testing.assert_array_equal(result.as_numpy("log"), want)
    np.testing.assert_array_equal(result.as_numpy("same"), NON_FINITE_X)
    # Raw: the JSON part before the binary data is strict JSON.
    body = non_finite_body([{"name": "log", "parameters": {"binary_data": True}}, {"name": "same"}])
    status, headers, raw = post(agent, "/v2/models/logm/infer", body)
    assert status == 200, raw
    head = int(headers["Inference-Header-Content-Length"])
    doc = strict_json(raw[:head])
    assert [o["name"] for o in doc["outputs"]] == ["log", "same"]  # type: ignore[index]
    np.testing.assert_array_equal(np.frombuffer(raw[head:], np.float32).reshape(2, 4), want)
