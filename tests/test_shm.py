"""Issue 17, item 3: system shared memory, against a real agent process, with the unmodified
clients (tritonclient.utils.shared_memory, tritonclient.grpc, tritonclient.http, perf_analyzer):
tensors read from and written into regions the client created, and the faults a client can
cause (bad windows, unknown or doubled regions, a file destroyed or shrunk after registering)
each answered with an error while the agent goes on serving.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import queue
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from modelfleet.kernel.bundle import create_bundle
from tests import models
from tests.procs import AgentProcess, dev_shm, free_port, perf_analyzer, shm_leftovers

with warnings.catch_warnings():
    # It imports pkg_resources, which warns that it is deprecated.
    warnings.simplefilter("ignore")
    import tritonclient.utils.shared_memory as shm

pytestmark = pytest.mark.process

WIDTH = 4
X = np.arange(2 * WIDTH, dtype=np.float32).reshape(2, WIDTH)
NBYTES = X.nbytes
PREFIX = f"mf_shm_test_{os.getpid()}"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("shm")
    repo = root / "repo"
    create_bundle(
        models.identity(root / "src" / "id.onnx", "FP32", WIDTH),
        name="ident",
        version=1,
        out_dir=repo,
        samples={"x": X},
    )
    create_bundle(
        models.log_model(root / "src" / "log.onnx", WIDTH),
        name="logm",
        version=1,
        out_dir=repo,
        samples={"x": X + 1},
    )
    http_port = free_port()
    before = dev_shm()
    proc = AgentProcess(
        repo, "--http-listen", f"127.0.0.1:{http_port}", log_path=root / "agent.log"
    )
    proc.http_url = f"127.0.0.1:{http_port}"  # type: ignore[attr-defined]
    proc.start()
    try:
        proc.wait_model("ident", timeout=60)
        proc.wait_model("logm", timeout=60)
        yield proc
    finally:
        proc.stop()
    # The server creates nothing under /dev/shm (and every test destroys what it made).
    assert shm_leftovers(before) == set()


@pytest.fixture
def gc(agent):
    c = grpcclient.InferenceServerClient(agent.url)
    yield c
    c.unregister_system_shared_memory()
    c.close()


@pytest.fixture
def hc(agent):
    c = httpclient.InferenceServerClient(agent.http_url, connection_timeout=10, network_timeout=10)
    yield c
    c.unregister_system_shared_memory()
    c.close()


@pytest.fixture
def regions():
    """Creates regions as a client does; destroys whatever is left at the end."""
    made: list = []

    def make(name: str, size: int):
        h = shm.create_shared_memory_region(name, f"/{PREFIX}_{name}", size)
        made.append(h)
        return h, f"/{PREFIX}_{name}"

    yield make
    for h in made:
        with contextlib.suppress(Exception):  # already destroyed by the test
            shm.destroy_shared_memory_region(h)


def post(url: str, path: str, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(url, timeout=10)
    try:
        conn.request("POST", path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def grpc_infer(c, in_region="in", out_region="out", in_size=NBYTES, out_size=NBYTES, offset=0):
    inp = grpcclient.InferInput("x", list(X.shape), "FP32")
    inp.set_shared_memory(in_region, in_size, offset)
    out = grpcclient.InferRequestedOutput("y")
    out.set_shared_memory(out_region, out_size)
    return c.infer("ident", [inp], outputs=[out])


def grpc_serves(c) -> None:
    inp = grpcclient.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    np.testing.assert_array_equal(c.infer("ident", [inp]).as_numpy("y"), X)


def test_grpc_inputs_and_outputs_in_shared_memory(gc, regions) -> None:
    hin, kin = regions("in", NBYTES + 64)
    hout, kout = regions("out", NBYTES)
    shm.set_shared_memory_region(hin, [np.zeros(16, np.float32), X])
    gc.register_system_shared_memory("in", kin, NBYTES + 64)
    gc.register_system_shared_memory("out", kout, NBYTES)
    status = gc.get_system_shared_memory_status(as_json=True)["regions"]
    assert status["in"]["key"] == kin and int(status["in"]["byte_size"]) == NBYTES + 64
    assert set(status) == {"in", "out"}
    result = grpc_infer(gc, offset=64)
    out = result.get_output("y")
    assert list(out.shape) == list(X.shape) and out.datatype == "FP32"
    # As Triton: the response carries no data for an output placed in shared memory (an empty
    # entry keeps raw_output_contents in step with outputs).
    assert list(result.get_response().raw_output_contents) == [b""]
    np.testing.assert_array_equal(shm.get_contents_as_numpy(hout, np.float32, list(X.shape)), X)
    # A mix: input from shared memory, output in the response.
    inp = grpcclient.InferInput("x", list(X.shape), "FP32")
    inp.set_shared_memory("in", NBYTES, 64)
    np.testing.assert_array_equal(gc.infer("ident", [inp]).as_numpy("y"), X)
    gc.unregister_system_shared_memory("out")
    assert set(gc.get_system_shared_memory_status(as_json=True)["regions"]) == {"in"}


def test_grpc_faults_are_clear_errors_and_the_agent_keeps_serving(gc, regions) -> None:
    hin, kin = regions("fin", NBYTES)
    _, kout = regions("fout", NBYTES)
    shm.set_shared_memory_region(hin, [X])
    with pytest.raises(InferenceServerException, match="goes past the end"):
        gc.register_system_shared_memory("big", kin, NBYTES + 1)
    with pytest.raises(InferenceServerException, match="no shared-memory file"):
        gc.register_system_shared_memory("none", f"/{PREFIX}_absent", 8)
    with pytest.raises(InferenceServerException, match="not a POSIX shared-memory name"):
        gc.register_system_shared_memory("evil", "/../etc/passwd", 8)
    gc.register_system_shared_memory("in", kin, NBYTES)
    gc.register_system_shared_memory("out", kout, NBYTES)
    with pytest.raises(InferenceServerException, match="already registered"):
        gc.register_system_shared_memory("in", kin, NBYTES)
    with pytest.raises(InferenceServerException, match="'nope' is not registered"):
        grpc_infer(gc, in_region="nope")
    with pytest.raises(InferenceServerException, match="goes past the end of region 'in'"):
        grpc_infer(gc, offset=4)
    with pytest.raises(InferenceServerException, match="goes past the end of region 'out'"):
        grpc_infer(gc, out_size=NBYTES + 4)
    with pytest.raises(InferenceServerException, match="needs 32 bytes"):
        grpc_infer(gc, in_size=NBYTES - 4)
    with pytest.raises(InferenceServerException, match="result is 32 bytes"):
        grpc_infer(gc, out_size=NBYTES - 4)
    with pytest.raises(InferenceServerException, match=r"StatusCode\.UNIMPLEMENTED.*CUDA"):
        gc.get_cuda_shared_memory_status()
    grpc_serves(gc)
    grpc_infer(gc)  # both regions still good
    # The client destroys its input file while it is registered.
    shm.destroy_shared_memory_region(hin)
    with pytest.raises(InferenceServerException, match="was removed after it was registered"):
        grpc_infer(gc)
    grpc_serves(gc)


def test_grpc_shrunk_file_is_an_error_not_a_crash(gc, regions) -> None:
    _, kin = regions("shrink", NBYTES)
    _, kout = regions("shrout", NBYTES)
    gc.register_system_shared_memory("shrink", kin, NBYTES)
    gc.register_system_shared_memory("shrout", kout, NBYTES)
    os.truncate(f"/dev/shm/{kin[1:]}", 4)
    os.truncate(f"/dev/shm/{kout[1:]}", 0)
    with pytest.raises(InferenceServerException, match="shrank after it was registered"):
        grpc_infer(gc, in_region="shrink", out_region="shrout")
    gc.unregister_system_shared_memory("shrink")
    gc.unregister_system_shared_memory("shrout")
    grpc_serves(gc)


def test_http_inputs_and_outputs_in_shared_memory(agent, hc, regions) -> None:
    hin, kin = regions("hin", NBYTES)
    hout, kout = regions("hout", NBYTES)
    shm.set_shared_memory_region(hin, [X])
    hc.register_system_shared_memory("hin", kin, NBYTES)
    hc.register_system_shared_memory("hout", kout, NBYTES)
    status = {r["name"]: r for r in hc.get_system_shared_memory_status()}
    assert status["hin"]["key"] == kin and set(status) == {"hin", "hout"}
    inp = httpclient.InferInput("x", list(X.shape), "FP32")
    inp.set_shared_memory("hin", NBYTES)
    out = httpclient.InferRequestedOutput("y")
    out.set_shared_memory("hout", NBYTES)
    result = hc.infer("ident", [inp], outputs=[out])
    assert result.get_output("y")["shape"] == list(X.shape)
    assert "data" not in result.get_output("y")
    np.testing.assert_array_equal(shm.get_contents_as_numpy(hout, np.float32, list(X.shape)), X)
    with pytest.raises(InferenceServerException, match="already registered"):
        hc.register_system_shared_memory("hin", kin, NBYTES)
    bad = httpclient.InferInput("x", list(X.shape), "FP32")
    bad.set_shared_memory("hin", NBYTES, 8)
    with pytest.raises(InferenceServerException, match="goes past the end of region 'hin'"):
        hc.infer("ident", [bad])
    gone = httpclient.InferInput("x", list(X.shape), "FP32")
    gone.set_shared_memory("gone", NBYTES)
    with pytest.raises(InferenceServerException, match="'gone' is not registered"):
        hc.infer("ident", [gone])
    with pytest.raises(InferenceServerException, match="CUDA shared memory is not supported"):
        hc.get_cuda_shared_memory_status()
    shm.destroy_shared_memory_region(hin)
    with pytest.raises(InferenceServerException, match="was removed after it was registered"):
        hc.infer("ident", [inp])
    hc.unregister_system_shared_memory("hin")
    assert [r["name"] for r in hc.get_system_shared_memory_status()] == ["hout"]
    assert post(agent.http_url, "/v2/systemsharedmemory/region/b/register", b"[1]")[0] == 400
    assert (
        post(agent.http_url, "/v2/systemsharedmemory/region/b/register", b'{"key": "/x"}')[0] == 400
    )
    assert post(agent.http_url, "/v2/cudasharedmemory/region/c/register", b"{}")[0] == 400
    assert post(agent.http_url, "/v2/cudasharedmemory/unregister", b"")[0] == 200
    plain = httpclient.InferInput("x", list(X.shape), "FP32")
    plain.set_data_from_numpy(X)
    np.testing.assert_array_equal(hc.infer("ident", [plain]).as_numpy("y"), X)


def test_perf_analyzer_with_system_shared_memory(agent, tmp_path: Path) -> None:
    out = tmp_path / "pa.csv"
    before = dev_shm()
    _, rows = perf_analyzer(
        agent.url,
        "ident",
        out,
        "--shape",
        f"x:{WIDTH}",
        "-b",
        "2",
        "--shared-memory",
        "system",
        "--concurrency-range",
        "1",
    )
    assert len(rows) == 1 and float(rows[0]["Inferences/Second"]) > 10
    assert shm_leftovers(before, agent.proc.pid) == set()
    # perf_analyzer unregisters its regions when it is done.
    c = grpcclient.InferenceServerClient(agent.url)
    try:
        assert c.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}
    finally:
        c.close()


def host_address() -> str:
    """This machine's own non-loopback address (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))
        addr = s.getsockname()[0]
    assert not addr.startswith("127."), "this test needs a non-loopback IPv4 address"
    return addr


def test_clients_on_other_hosts_get_no_shared_memory(agent, tmp_path: Path, regions) -> None:
    """Seen from a non-loopback address a client is treated as remote: it may not name files in
    this machine's /dev/shm (the agent is bound to that one address only for this test)."""
    addr = host_address()
    remote = AgentProcess(agent.models, log_path=tmp_path / "agent.log")
    http_port = free_port()
    i = remote.args.index("--listen")
    remote.args[i + 1] = f"{addr}:{remote.port}"
    remote.args += ["--http-listen", f"{addr}:{http_port}"]
    remote.url = f"{addr}:{remote.port}"
    remote.start()
    try:
        remote.wait_model("ident", timeout=60)
        _, key = regions("rem", NBYTES)
        c = grpcclient.InferenceServerClient(remote.url)
        try:
            with pytest.raises(InferenceServerException, match="only to clients on this host"):
                c.register_system_shared_memory("rem", key, NBYTES)
            with pytest.raises(InferenceServerException, match="only to clients on this host"):
                grpc_infer(c, in_region="rem")
            grpc_serves(c)
        finally:
            c.close()
        status, body = post(
            f"{addr}:{http_port}", "/v2/systemsharedmemory/region/r/register", b"{}"
        )
        assert status == 403 and b"only to clients on this host" in body
    finally:
        remote.stop()


def test_grpc_stream_uses_shared_memory_too(gc, regions) -> None:
    hin, kin = regions("sin", NBYTES)
    hout, kout = regions("sout", NBYTES)
    shm.set_shared_memory_region(hin, [X])
    gc.register_system_shared_memory("in", kin, NBYTES)
    gc.register_system_shared_memory("out", kout, NBYTES)
    results: queue.Queue = queue.Queue()
    gc.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        inp = grpcclient.InferInput("x", list(X.shape), "FP32")
        inp.set_shared_memory("in", NBYTES)
        out = grpcclient.InferRequestedOutput("y")
        out.set_shared_memory("out", NBYTES)
        gc.async_stream_infer("ident", [inp], outputs=[out])
        bad = grpcclient.InferInput("x", list(X.shape), "FP32")
        bad.set_shared_memory("nope", NBYTES)
        gc.async_stream_infer("ident", [bad])
        first, second = results.get(timeout=10), results.get(timeout=10)
    finally:
        gc.stop_stream()
    assert first[1] is None
    np.testing.assert_array_equal(shm.get_contents_as_numpy(hout, np.float32, list(X.shape)), X)
    assert second[0] is None and "'nope' is not registered" in str(second[1])


def test_http_refusal_leaves_output_regions_untouched(hc, regions) -> None:
    """An output that cannot travel as JSON (NaN) refuses the request with a 400, and the
    outputs bound for shared memory in the same request are not written either: a refused
    request changes nothing the client sees, as every other refusal."""
    hout, kout = regions("refused", NBYTES)
    sentinel = np.full(X.shape, 7.0, np.float32)
    shm.set_shared_memory_region(hout, [sentinel])
    hc.register_system_shared_memory("refused", kout, NBYTES)
    inp = httpclient.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(-X - 1, binary_data=False)  # Log of negatives: NaN
    same = httpclient.InferRequestedOutput("same")
    same.set_shared_memory("refused", NBYTES)
    log = httpclient.InferRequestedOutput("log", binary_data=False)
    with pytest.raises(InferenceServerException, match=r"'log'.*binary_data"):
        hc.infer("logm", [inp], outputs=[same, log])
    got = shm.get_contents_as_numpy(hout, np.float32, list(X.shape))
    np.testing.assert_array_equal(got, sentinel)
    # The same request with the NaN output in binary writes the region.
    binary = httpclient.InferRequestedOutput("log", binary_data=True)
    hc.infer("logm", [inp], outputs=[same, binary])
    got = shm.get_contents_as_numpy(hout, np.float32, list(X.shape))
    np.testing.assert_array_equal(got, -X - 1)
