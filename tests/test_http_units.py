"""The HTTP/REST converters and error mapping without sockets (and without the agent's protobuf
module, which cannot share a process with tritonclient's: proto_json is covered by the
statistics and config checks of tests/test_http.py): every form fault is a clear
InvalidRequestError, every error family has an HTTP status, and the metrics app answers 404
to everything but /metrics."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter

from modelfleet.agent.serving.dataplane import InferOutput, InferResponse
from modelfleet.agent.serving.rest_converters import (
    OutputForm,
    request_from_http,
    response_to_http,
    strict_dumps,
)
from modelfleet.kernel.errors import InvalidRequestError, Status
from modelfleet.kernel.http_status import HTTP_STATUS
from modelfleet.kernel.metrics_http import metrics_app


def test_every_error_family_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(Status)


def test_json_and_binary_inputs_decode_alike() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    doc = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": x.tolist()}]}
    req, form = request_from_http(json.dumps(doc).encode(), None, "m", "")
    np.testing.assert_array_equal(req.inputs[0].data, x)
    assert not form.is_binary("y")
    head = json.dumps(
        {
            "id": "7",
            "parameters": {"binary_data_output": True, "routing_key": 42, "other": 1},
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 3],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 24},
                },
            ],
            "outputs": [{"name": "z", "parameters": {"binary_data": False}}],
        }
    ).encode()
    req, form = request_from_http(head + x.tobytes(), str(len(head)), "m", "2")
    np.testing.assert_array_equal(req.inputs[0].data, x)
    assert (req.id, req.model_version, req.routing_key) == ("7", "2", "42")
    assert req.parameters == {"other": 1}
    assert form.is_binary("y") and not form.is_binary("z")


@pytest.mark.parametrize(
    ("datatype", "data", "words"),
    [
        ("INT8", [1, 2, 300], "out of range"),
        ("INT32", [1.5, 2, 3], "must be integers"),
        ("BOOL", [1, 0, 1], "must be true/false"),
        ("FP32", [True, False, True], "must be numbers"),
        ("BYTES", ["a", 1, "c"], "BYTES values in JSON are strings"),
    ],
)
def test_json_values_that_do_not_fit_the_datatype_are_refused(
    datatype: str, data: list, words: str
) -> None:
    doc = {"inputs": [{"name": "x", "shape": [3], "datatype": datatype, "data": data}]}
    with pytest.raises(InvalidRequestError, match=words):
        request_from_http(json.dumps(doc).encode(), None, "m", "")


def test_classification_travels_to_the_data_plane_without_binary_data() -> None:
    doc = {
        "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
        "outputs": [
            {"name": "y", "parameters": {"classification": 2, "binary_data": True}},
            {"name": "z", "parameters": {"binary_data": False}},
        ],
    }
    req, form = request_from_http(json.dumps(doc).encode(), None, "m", "")
    # The data plane judges the value (class_count), the same for gRPC and HTTP.
    assert req.output_parameters == {"y": {"classification": 2}}
    assert form.is_binary("y") and not form.is_binary("z")


def test_responses_json_and_binary() -> None:
    y = np.array([[1.5, -2.0]], np.float32)
    s = np.array([b"ok", b"\xff"], dtype=object)
    resp = InferResponse(
        "m", "1", "r", [InferOutput("y", "FP32", (1, 2), y), InferOutput("s", "BYTES", (2,), s)]
    )
    body, head = response_to_http(resp, OutputForm(binary={"s": True}))
    assert head is not None
    doc = json.loads(body[:head])
    assert doc["outputs"][0]["data"] == [1.5, -2.0]
    assert doc["outputs"][1]["parameters"] == {"binary_data_size": len(body) - head}
    # Non-UTF-8 bytes cannot travel in JSON: the client is told to ask for binary.
    with pytest.raises(InvalidRequestError, match="not UTF-8"):
        response_to_http(resp, OutputForm())


@pytest.mark.parametrize(
    ("datatype", "value", "spelled"),
    [("FP32", np.nan, "NaN"), ("FP64", np.inf, "Infinity"), ("FP16", -np.inf, "-Infinity")],
)
def test_non_finite_outputs_travel_in_binary_only(
    datatype: str, value: float, spelled: str
) -> None:
    dtype = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}[datatype]
    y = np.array([[1.0, value, value]], dtype)
    resp = InferResponse("m", "1", "", [InferOutput("y", datatype, (1, 3), y)])
    with pytest.raises(InvalidRequestError) as e:
        response_to_http(resp, OutputForm())
    assert e.value.status is Status.INVALID_ARGUMENT and e.value.reason == "non_finite_output"
    assert f"'y' holds {spelled} (at flat index 1, 2 of 3" in str(e.value)
    assert '"binary_data": true' in str(e.value)
    body, head = response_to_http(resp, OutputForm(binary_default=True))
    assert head is not None
    json.loads(body[:head], parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON"))
    np.testing.assert_array_equal(np.frombuffer(body[head:], dtype).reshape(1, 3), y)


def test_the_json_writer_refuses_non_finite_numbers() -> None:
    """A non-finite number that reaches the writer by another way fails loudly (a 500), never
    as a bare NaN in the body."""
    assert strict_dumps({"a": [1, 2.5]}) == '{"a":[1,2.5]}'
    with pytest.raises(ValueError):
        strict_dumps({"a": float("nan")})


def _call(app, path: str) -> tuple[str, bytes]:
    seen: list[str] = []
    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "QUERY_STRING": ""}
    body = b"".join(app(environ, lambda status, headers: seen.append(status)))
    return seen[0], body


def test_metrics_app_serves_metrics_only() -> None:
    registry = CollectorRegistry()
    Counter("probe_total", "a counter", registry=registry).inc()
    app = metrics_app(registry)
    status, body = _call(app, "/metrics")
    assert status.startswith("200") and b"probe_total 1.0" in body
    for path in ("/", "/v2/health/ready", "/metricsx"):
        status, body = _call(app, path)
        assert status.startswith("404") and b"/metrics only" in body


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "too deeply"),
        (
            b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":['
            + b"9" * 5000
            + b"]}]}",
            "too many digits",
        ),
        (b'{"inputs":[]}\x80\x81', "Inference-Header-Content-Length"),
    ],
    ids=["nesting", "long integer", "binary without the header"],
)
def test_hostile_json_is_an_invalid_request(body: bytes, words: str) -> None:
    with pytest.raises(InvalidRequestError, match=words):
        request_from_http(body, None, "m", "")


def test_deep_nesting_runs_no_other_finalizer_without_stack() -> None:
    # The C parser recurses to the recursion limit on a deeply nested body. A garbage
    # collection started down there runs whatever finalizers are due with no stack left: they
    # failed with RecursionError (a `make test` run saw four unraisable ones), and on the agent
    # those are other requests' objects. There is always a cycle with a finalizer waiting here
    # (each one leaves the next), and the collector runs at every allocation.
    no_stack: list[str] = []
    chain = [True]

    def depth(n: int) -> int:
        return 0 if n == 0 else 1 + depth(n - 1)

    class Cycle:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            try:
                depth(40)
            except RecursionError:
                no_stack.append("finalizer without stack")
            if chain[0]:
                Cycle()

    deep = b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    threshold = gc.get_threshold()
    Cycle()
    gc.set_threshold(1)
    try:
        with pytest.raises(InvalidRequestError, match="too deeply"):
            request_from_http(deep, None, "m", "")
    finally:
        chain[0] = False
        gc.set_threshold(*threshold)
        gc.collect()
    assert no_stack == []
