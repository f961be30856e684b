"""Guardrails on a real agent: load shedding, per-client rate limits and request size limits,
driven by tritonclient against a deliberately slow ONNX model (docs/operations.md#guardrails)."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from modelfleet.kernel.bundle import create_bundle
from tests import models
from tests.conftest import make_mlp_bundle
from tests.procs import AgentProcess, free_port
from tests.security.test_inference_auth import Pki, client, infer_ok, wait_ready

pytestmark = pytest.mark.process

WIDTH = 256  # input features of the slow model: 1 KiB per row
CONCURRENT = 4
QUEUED_ROWS = 40
REQUEST_BYTES = 20_000
MESSAGE_BYTES = 1 << 20


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("guardrails")
    repo = root / "repo"
    # About 70 ms per 8-row request on one thread: a handful of requests keeps it busy.
    onnx = models.slow_mlp(root / "src" / "slow.onnx", inputs=WIDTH, width=2048, repeats=64)
    create_bundle(
        onnx,
        name="slow",
        version=1,
        out_dir=repo,
        samples={"x": np.ones((1, WIDTH), np.float32)},
        max_batch_size=32,
        latency_budget_ms=10_000,
        warmup_runs=1,
    )
    http_port = free_port()
    proc = AgentProcess(
        repo,
        "--http-listen",
        f"127.0.0.1:{http_port}",
        "--serving-threads",
        "1",
        "--intra-op-threads",
        "1",
        "--batching",
        "off",
        "--max-concurrent-requests",
        str(CONCURRENT),
        "--max-queued-rows",
        str(QUEUED_ROWS),
        "--max-request-bytes",
        str(REQUEST_BYTES),
        "--max-message-bytes",
        str(MESSAGE_BYTES),
        log_path=root / "agent.log",
    )
    proc.http_url = f"127.0.0.1:{http_port}"  # type: ignore[attr-defined]
    proc.start()
    try:
        proc.wait_model("slow", timeout=90)
        yield proc
    finally:
        proc.stop()


def rows(n: int) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("x", [n, WIDTH], "FP32")
    inp.set_data_from_numpy(np.ones((n, WIDTH), np.float32))
    return [inp]


def shed_counts(agent: AgentProcess) -> dict[str, float]:
    found = re.findall(
        r'modelfleet_requests_shed_total\{model="slow",reason="(\w+)"\} (\S+)', agent.metrics()
    )
    return {reason: float(value) for reason, value in found}


def overload(agent: AgentProcess, n: int, per_request_rows: int) -> tuple[int, list[str], float]:
    """``n`` requests sent at once; returns (successes, messages of the refusals, the slowest
    ServerReady/ModelReady answer seen while some of them were still unanswered)."""
    c = agent.client()
    done = threading.Semaphore(0)
    results: list[object] = []
    lock = threading.Lock()

    def callback(result: object, error: InferenceServerException | None) -> None:
        with lock:
            results.append(error if error is not None else result)
        done.release()

    try:
        for _ in range(n):
            c.async_infer("slow", rows(per_request_rows), callback, client_timeout=60)
        slowest = 0.0
        probe = agent.client()
        try:
            for _ in range(5):
                start = time.perf_counter()
                assert probe.is_server_ready(client_timeout=5)
                assert probe.is_model_ready("slow", client_timeout=5)
                slowest = max(slowest, time.perf_counter() - start)
            with lock:
                unanswered = n - len(results)
            # The probes ran during the overload, not after it.
            assert unanswered > 0, "every request was answered before the probes ended"
        finally:
            probe.close()
        for _ in range(n):
            assert done.acquire(timeout=60), "a request got no answer within 60 s"
    finally:
        c.close()
    ok = 0
    refused: list[str] = []
    for r in results:
        if isinstance(r, InferenceServerException):
            assert r.status() == "StatusCode.RESOURCE_EXHAUSTED", r
            refused.append(r.message())
        else:
            assert r.as_numpy("y").shape == (per_request_rows, 3)
            ok += 1
    return ok, refused, slowest


def test_overload_sheds_beyond_the_concurrency_limit(agent: AgentProcess) -> None:
    before = shed_counts(agent)
    ok, refused, slowest = overload(agent, 24, 8)
    assert ok >= CONCURRENT, (ok, refused)
    assert refused, "nothing was shed"
    for message in refused:
        assert f"limit of {CONCURRENT} concurrent requests" in message, message
        assert "max_concurrent_requests" in message and "retry" in message, message
    # Readiness answers at once while the model is saturated, and stays true.
    assert slowest < 2.0, slowest
    after = shed_counts(agent)
    assert after.get("concurrency", 0) - before.get("concurrency", 0) == len(refused)
    # The agent serves normally once the burst is over.
    c = agent.client()
    try:
        assert c.infer("slow", rows(1), client_timeout=30).as_numpy("y").shape == (1, 3)
        assert c.is_server_ready()
    finally:
        c.close()


def test_overload_sheds_beyond_the_queued_rows_limit(agent: AgentProcess) -> None:
    before = shed_counts(agent)
    # Two 16-row requests hold 32 rows; a third would make 48 > 40, before the request limit.
    ok, refused, _ = overload(agent, 12, 16)
    assert ok >= 2 and refused, (ok, refused)
    for message in refused:
        assert f"limit of {QUEUED_ROWS} (max_queued_rows)" in message, message
    after = shed_counts(agent)
    assert after.get("queued_rows", 0) - before.get("queued_rows", 0) == len(refused)
    assert after.get("concurrency", 0) == before.get("concurrency", 0)


def test_request_size_limits(agent: AgentProcess) -> None:
    c = agent.client()
    try:
        # 32 rows x 1 KiB: within the batch size and the message limit, over max_request_bytes.
        with pytest.raises(InferenceServerException) as info:
            c.infer("slow", rows(32), client_timeout=30)
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        message = info.value.message()
        assert f"at most {REQUEST_BYTES} (max_request_bytes)" in message, message
        assert "32768 bytes" in message, message
        # Beyond the gRPC message limit: refused by gRPC before it is decoded.
        with pytest.raises(InferenceServerException) as info:
            c.infer("slow", rows(1100), client_timeout=30)
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        # Still serving; a size refusal is not shedding.
        assert c.infer("slow", rows(16), client_timeout=30).as_numpy("y").shape == (16, 3)
        assert c.is_server_ready()
    finally:
        c.close()
    text = agent.metrics()
    assert 'reason="request_too_large"' in text
    assert "request_too_large" not in "".join(shed_counts(agent))


def http_infer(url: str, model: str, n: int, width: int) -> tuple[int, dict[str, str], str]:
    """(status, headers, error message or "") of one raw OIP HTTP inference of ``n`` rows."""
    doc = {
        "inputs": [
            {"name": "x", "shape": [n, width], "datatype": "FP32", "data": [1.0] * n * width}
        ]
    }
    conn = http.client.HTTPConnection(url, timeout=60)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body=json.dumps(doc).encode())
        resp = conn.getresponse()
        body = resp.read()
        error = json.loads(body).get("error", "") if resp.status != 200 else ""
        return resp.status, dict(resp.getheaders()), error
    finally:
        conn.close()


def assert_retry_after(headers: dict[str, str]) -> int:
    value = headers.get("Retry-After", "")
    assert value.isdigit() and int(value) >= 1, headers
    return int(value)


def test_overload_over_http_is_429_with_retry_after(agent: AgentProcess) -> None:
    before = sum(shed_counts(agent).values())
    answers: list[tuple[int, dict[str, str], str]] = []
    lock = threading.Lock()

    def one() -> None:
        answer = http_infer(agent.http_url, "slow", 8, WIDTH)  # type: ignore[attr-defined]
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=one) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert len(answers) == 24, "a request got no answer within 90 s"
    statuses = sorted(status for status, _, _ in answers)
    assert set(statuses) <= {200, 429}, statuses
    refused = [(h, e) for status, h, e in answers if status == 429]
    assert statuses.count(200) >= CONCURRENT and refused, statuses
    for headers, error in refused:
        assert_retry_after(headers)
        assert f"limit of {CONCURRENT} concurrent requests" in error, error
    assert sum(shed_counts(agent).values()) - before == len(refused)
    status, _, error = http_infer(agent.http_url, "slow", 1, WIDTH)  # type: ignore[attr-defined]
    assert status == 200, error


def test_request_too_large_over_http_is_413(agent: AgentProcess) -> None:
    # Under http_max_request_bytes (the body limit of the HTTP edge), over max_request_bytes.
    status, headers, error = http_infer(agent.http_url, "slow", 32, WIDTH)  # type: ignore[attr-defined]
    assert status == 413, (status, error)
    assert f"at most {REQUEST_BYTES} (max_request_bytes)" in error, error
    assert "Retry-After" not in headers
    status, _, error = http_infer(agent.http_url, "slow", 16, WIDTH)  # type: ignore[attr-defined]
    assert status == 200, error


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pki, Path, Path]:
    """The CA and its first client ("app"), and a second client certificate ("app-two")."""
    p = Pki(tmp_path_factory.mktemp("pki"))
    cert, key = p.pair("client2", p.ca, "app-two", server=False)
    return p, cert, key


def test_rate_limit_is_per_client_certificate(pki: tuple[Pki, Path, Path], tmp_path: Path) -> None:
    ca, second_cert, second_key = pki
    repo = tmp_path / "repo"
    make_mlp_bundle(repo, 1)
    agent = AgentProcess(
        repo,
        "--tls-cert",
        str(ca.server_cert),
        "--tls-key",
        str(ca.server_key),
        "--tls-client-ca",
        str(ca.root / "ca1" / "ca.crt"),
        "--rate-limit-per-s",
        "2",
        "--rate-limit-burst",
        "3",
        "--http-listen",
        f"127.0.0.1:{(http_port := free_port())}",
        log_path=tmp_path / "agent.log",
    )
    agent.start()
    try:
        wait_ready(agent)
        greedy = client(agent, root=ca.ca_pem, cert=ca.client_cert, key=ca.client_key)
        polite = client(agent, root=ca.ca_pem, cert=second_cert, key=second_key)
        with greedy, polite:
            start = time.monotonic()
            ok, refused = 0, []
            for _ in range(12):
                try:
                    infer_ok(greedy)
                    ok += 1
                except InferenceServerException as exc:
                    assert exc.status() == "StatusCode.RESOURCE_EXHAUSTED", exc
                    refused.append(exc.message())
            elapsed = time.monotonic() - start
            # The burst, plus what the rate refilled meanwhile.
            assert 3 <= ok <= 3 + int(2 * elapsed) + 1, (ok, elapsed)
            assert refused
            for message in refused:
                assert "cert:app is over its rate limit of 2 requests/s (burst 3)" in message
                assert "retry after" in message and "rate_limit_per_s" in message
            # Health and metadata are never limited, and the other client has its own bucket.
            assert greedy.is_server_ready(client_timeout=5)
            for _ in range(3):
                infer_ok(polite)
            # Over HTTP the same certificate draws from the same bucket (cert:app), now empty.
            ssl_options = {
                "ca_certs": str(ca.root / "ca1" / "ca.crt"),
                "certfile": str(ca.client_cert),
                "keyfile": str(ca.client_key),
            }
            greedy_http = httpclient.InferenceServerClient(
                f"127.0.0.1:{http_port}", ssl=True, ssl_options=ssl_options, network_timeout=10
            )
            try:
                inp = httpclient.InferInput("x", [1, 4], "FP32")
                inp.set_data_from_numpy(np.ones((1, 4), np.float32))
                with pytest.raises(InferenceServerException) as info:
                    for _ in range(4):
                        greedy_http.infer("mlp", [inp])
                assert info.value.status() == "429", info.value
                assert "cert:app is over its rate limit" in info.value.message()
                refused.append(info.value.message())
            finally:
                greedy_http.close()
        text = agent.metrics()
        seen = re.search(
            r'modelfleet_requests_shed_total\{model="mlp",reason="rate_limit"\} (\S+)', text
        )
        assert seen is not None and float(seen.group(1)) == len(refused)
    finally:
        agent.stop()


def test_rate_limit_by_address_is_not_escaped_by_new_connections(tmp_path: Path) -> None:
    """Without client certificates the address is the key: a client opening a new connection
    (a new source port) per request still draws from one bucket."""
    repo = tmp_path / "repo"
    make_mlp_bundle(repo, 1)
    http_url = f"127.0.0.1:{free_port()}"
    agent = AgentProcess(
        repo,
        "--rate-limit-per-s",
        "1",
        "--rate-limit-burst",
        "2",
        "--http-listen",
        http_url,
        log_path=tmp_path / "a.log",
    )
    agent.start()
    try:
        agent.wait_model("mlp", timeout=60)
        start = time.monotonic()
        ok, refused = 0, []
        for _ in range(8):
            with agent.client() as fresh:
                try:
                    infer_ok(fresh)
                    ok += 1
                except InferenceServerException as exc:
                    assert exc.status() == "StatusCode.RESOURCE_EXHAUSTED", exc
                    refused.append(exc.message())
        elapsed = time.monotonic() - start
        assert 2 <= ok <= 2 + int(elapsed) + 1, (ok, elapsed)
        assert refused and all("client ipv4:127.0.0.1 is over" in m for m in refused), refused
        # HTTP counts the same address against the same bucket, which gRPC has just emptied.
        answers = [http_infer(http_url, "mlp", 1, 4) for _ in range(4)]
        limited = [(h, e) for status, h, e in answers if status == 429]
        assert limited, answers
        for headers, error in limited:
            assert_retry_after(headers)
            assert "client ipv4:127.0.0.1 is over its rate limit" in error, error
        with agent.client() as probe:
            assert probe.is_server_ready() and probe.is_model_ready("mlp")
    finally:
        agent.stop()
