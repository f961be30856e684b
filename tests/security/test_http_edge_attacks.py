"""Red-team pass on the HTTP/REST edge, against a real agent process with a bearer token.

The attacker can reach the HTTP port but has no token, or has one and sends hostile bodies.
Every hostile body must get a 4xx that says what was wrong (never a 500 with a traceback in the
agent's log, which an attacker could repeat to flood the log), and the agent keeps serving.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.conftest import make_mlp_bundle
from tests.procs import AgentProcess, free_port
from tests.security.test_inference_auth import TOKEN, wait_ready

pytestmark = pytest.mark.process

GOOD = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
).encode()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    root = tmp_path_factory.mktemp("http-attacks")
    make_mlp_bundle(root / "repo", 1)
    token = root / "inference.token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    port = free_port()
    proc = AgentProcess(
        root / "repo",
        "--model-control",
        "--http-listen",
        f"127.0.0.1:{port}",
        "--auth-token-file",
        str(token),
        log_path=root / "agent.log",
    )
    proc.http_port = port  # type: ignore[attr-defined]
    proc.start()
    try:
        wait_ready(proc)
        yield proc
    finally:
        proc.stop()


def post(
    agent: AgentProcess, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", agent.http_port, timeout=30)  # type: ignore[attr-defined]
    try:
        c.request(
            "POST",
            "/v2/models/mlp/infer",
            body=body,
            headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})},
        )
        r = c.getresponse()
        raw = r.read()
        return r.status, (json.loads(raw) if raw else {})
    finally:
        c.close()


def raw_status(agent: AgentProcess, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", agent.http_port), timeout=10) as s:  # type: ignore[attr-defined]
        s.sendall(request)
        out = b""
        while b"\r\n" not in out:
            chunk = s.recv(4096)
            if not chunk:
                break
            out += chunk
    return out.split(b"\r\n", 1)[0]


@pytest.mark.parametrize(
    "path",
    [
        "/v2/health/../models/mlp",
        "/v2/health/%2e%2e/models/mlp/config",
        "/v2/health/..%2fmodels%2fmlp",
        "/v2/health/live/../../repository/index",
        "//v2/models/mlp",
        "/./v2/models/mlp",
        "/V2/models/mlp",
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "POST"])
def test_no_path_spelling_skips_the_token(agent: AgentProcess, path: str, method: str) -> None:
    # Only /v2/health/* is open; a path that climbs out of it must not reach a model.
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n"
    line = raw_status(agent, (head + "\r\n").encode())
    assert line.split()[1] in (b"401", b"404"), (method, path, line)


def test_load_and_unload_need_the_token(agent: AgentProcess) -> None:
    for action in ("load", "unload"):
        line = raw_status(
            agent,
            f"POST /v2/repository/models/mlp/{action} HTTP/1.1\r\nHost: x\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode(),
        )
        assert line.split()[1] == b"401", line


def _gzip_bomb(decompressed_mib: int) -> bytes:
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = co.compress(GOOD[:-1] + b', "pad": "')
    block = b"0" * (1 << 20)
    for _ in range(decompressed_mib):
        out += co.compress(block)
    return out + co.compress(b'"}') + co.flush()


def _fp32(data: str) -> bytes:
    return (
        b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[' + data.encode() + b"]}]}"
    )


HOSTILE = [
    # Numbers RFC 8259 JSON does not have; Python's json would take them.
    ("NaN", _fp32("1, NaN, 3, 4"), {}, 400, "input 'x': 'data' holds NaN, which JSON"),
    ("Infinity", _fp32("1, 2, Infinity, 4"), {}, 400, "input 'x': 'data' holds Infinity"),
    ("-Infinity", _fp32("[-Infinity], 2, 3, 4"), {}, 400, "'data' holds -Infinity"),
    ("NaN in parameters", GOOD[:-1] + b', "parameters": {"p": NaN}}', {}, 400, "holds NaN"),
    ("1e999", _fp32("1, 2, 3, 1e999"), {}, 400, "input 'x': value 3 of 'data' is a literal past"),
    ("-1e999", _fp32("-1e999, 2, 3, 4"), {}, 400, "input 'x': value 0 of 'data' is a literal"),
    (
        "past FP32",
        _fp32("1, 1e39, 3, 4"),
        {},
        400,
        "value 1 of 'data', 1e+39, is past the range of FP32",
    ),
    ("nesting", b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400, "nest"),
    (
        "huge integer literal",
        b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":['
        + b"9" * 5000
        + b",1,1,1]}]}",
        {},
        400,
        "digits",
    ),
    (
        "dimension past int64",
        json.dumps(
            {"inputs": [{"name": "x", "shape": [0, 2**70], "datatype": "FP32", "data": []}]}
        ).encode(),
        {},
        400,
        "dimension",
    ),
    (
        "too many dimensions",
        json.dumps(
            {"inputs": [{"name": "x", "shape": [0] * 100, "datatype": "FP32", "data": []}]}
        ).encode(),
        {},
        400,
        "dimensions",
    ),
    (
        "empty tensor whose size overflows",
        json.dumps(
            {"inputs": [{"name": "x", "shape": [0, 2**62, 2**62], "datatype": "FP32", "data": []}]}
        ).encode(),
        {},
        400,
        "",
    ),
    ("not gzip", b"\x1f\x8b" + b"0" * 10, {"Content-Encoding": "gzip"}, 400, "gzip"),
    ("gzip bomb", _gzip_bomb(200), {"Content-Encoding": "gzip"}, 413, "http_max_request_bytes"),
    (
        "header length overflow",
        GOOD,
        {"Inference-Header-Content-Length": "9" * 40},
        400,
        "between 0 and",
    ),
]


@pytest.mark.parametrize(
    ("body", "headers", "status", "words"),
    [h[1:] for h in HOSTILE],
    ids=[h[0] for h in HOSTILE],
)
def test_hostile_bodies_get_a_clear_4xx_and_the_agent_serves_on(
    agent: AgentProcess, body: bytes, headers: dict, status: int, words: str
) -> None:
    before = agent.logs().count("unexpected error")
    got, doc = post(agent, body, headers)
    assert got == status, doc
    assert words in doc["error"], doc
    assert "internal error" not in doc["error"]
    assert agent.logs().count("unexpected error") == before, agent.logs()[-3000:]
    ok, doc = post(agent, GOOD)
    assert ok == 200 and doc["outputs"][0]["shape"] == [1, 3], doc


@pytest.mark.parametrize("shape", [[0] * 40, [0, 2**62, 2**62]], ids=["40 dims", "overflow"])
def test_grpc_shapes_numpy_cannot_hold_are_refused(agent: AgentProcess, shape: list[int]) -> None:
    # The same shapes over gRPC (int64 dims): INVALID_ARGUMENT, not an internal error.
    request = service_pb2.ModelInferRequest(model_name="mlp")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=shape)
    assert tensor.name == "x"
    request.raw_input_contents.append(b"")
    with grpc.insecure_channel(agent.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "shape" in (info.value.details() or "")


def test_log_has_no_token(agent: AgentProcess) -> None:
    assert TOKEN not in Path(agent.log_path).read_text()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_http_on_any_ipv6_address_takes_ipv4_clients_too(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """``--http-listen [::]:PORT`` is dual-stack, as the gRPC port on ``[::]`` is."""
    root = tmp_path_factory.mktemp("http-dual-stack")
    make_mlp_bundle(root / "repo", 1)
    port = free_port()
    hosts = ["127.0.0.1"] + (["::1"] if _ipv6_loopback() else [])
    with AgentProcess(
        root / "repo", "--http-listen", f"[::]:{port}", log_path=root / "agent.log"
    ) as proc:
        proc.wait_model("mlp")
        for host in hosts:
            c = http.client.HTTPConnection(host, port, timeout=30)
            try:
                c.request("POST", "/v2/models/mlp/infer", body=GOOD)
                r = c.getresponse()
                doc = json.loads(r.read())
            finally:
                c.close()
            assert r.status == 200 and doc["outputs"][0]["shape"] == [1, 3], (host, doc)


def _peak_rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM in /proc status")


def test_a_gzip_bomb_costs_memory_near_the_cap_not_several_times_it(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A ~0.5 MB gzip body inflating to 512 MiB is refused with the agent's peak RSS growing by
    about http_max_request_bytes (64 MiB), not the ~250 MiB aiohttp's request.read() let it grow.
    """
    root = tmp_path_factory.mktemp("http-bomb-rss")
    make_mlp_bundle(root / "repo", 1)
    port = free_port()
    with AgentProcess(
        root / "repo", "--http-listen", f"127.0.0.1:{port}", log_path=root / "agent.log"
    ) as proc:
        proc.wait_model("mlp")
        proc.http_port = port  # type: ignore[attr-defined]
        assert post(proc, GOOD)[0] == 200
        assert proc.proc is not None
        before = _peak_rss_mib(proc.proc.pid)
        # Gzip members concatenate; repeating one keeps the 512 MiB bomb quick to build.
        body = gzip.compress(GOOD[:-1] + b', "pad": "') + b"".join(
            [gzip.compress(b"0" * (64 << 20))] * 8
        )
        got, doc = post(proc, body, {"Content-Encoding": "gzip"})
        assert got == 413 and "http_max_request_bytes" in doc["error"], doc
        grew = _peak_rss_mib(proc.proc.pid) - before
        assert grew < 160, f"peak RSS grew {grew} MiB on a refused gzip bomb"
        ok, doc = post(proc, GOOD)
        assert ok == 200, doc
