"""HTTP/REST serving path (issue 17): p50 at concurrency 1 and throughput at concurrency 16 for
the small model, over HTTP (tritonclient.http, binary tensors as it sends by default, and JSON),
beside the agent's gRPC path and a bare aiohttp echo server (tests/benchmarks/http_echo_server.py),
all in the same run, interleaved so noise from neighbours hits every target alike.

``python -m tests.benchmarks.http_bench [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.benchmarks import servers
from tests.benchmarks.fixtures import SMALL, build_models, make_bundle
from tests.procs import ROOT, free_port, wait_for

TIMEOUT_S = 10.0
Call = Callable[[], object]


def grpc_call(url: str, x: np.ndarray) -> tuple[Call, Callable[[], None]]:
    client = grpcclient.InferenceServerClient(url)
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return (
        lambda: client.infer(SMALL, [inp], client_timeout=TIMEOUT_S).as_numpy("y"),
        client.close,
    )


def http_call(url: str, x: np.ndarray, binary: bool = True) -> tuple[Call, Callable[[], None]]:
    client = httpclient.InferenceServerClient(url, network_timeout=TIMEOUT_S)
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("y", binary_data=binary)]
    return lambda: client.infer(SMALL, [inp], outputs=outputs).as_numpy("y"), client.close


def sequential(targets: dict[str, Callable], x: np.ndarray, requests: int, block: int = 100):
    """Concurrency 1, in alternating blocks; latencies in ns per target."""
    made = {label: make(x) for label, make in targets.items()}
    try:
        for call, _ in made.values():
            for _ in range(200):
                call()
        out: dict[str, list[int]] = {label: [] for label in made}
        done = 0
        while done < requests:
            for label, (call, _) in made.items():
                lat = out[label]
                for _ in range(block):
                    t0 = time.perf_counter_ns()
                    call()
                    lat.append(time.perf_counter_ns() - t0)
            done += block
    finally:
        for _, close in made.values():
            close()
    return {k: np.asarray(v) for k, v in out.items()}


def closed_loop(make: Callable, x: np.ndarray, threads: int, seconds: float) -> float:
    """Requests per second from ``threads`` clients, each with its own connection."""
    stop = threading.Event()
    counts = [0] * threads
    errors: list[str] = []
    ready = threading.Barrier(threads + 1)

    def worker(i: int) -> None:
        call, close = make(x)
        try:
            call()
            ready.wait()
            while not stop.is_set():
                call()
                counts[i] += 1
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            close()

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    ready.wait(timeout=60)
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    elapsed = time.perf_counter() - t0
    for t in pool:
        t.join(TIMEOUT_S + 5)
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]}")
    return sum(counts) / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args(argv)
    requests, seconds, rounds = (300, 1.0, 1) if args.quick else (2000, 5.0, 2)
    work = Path(tempfile.mkdtemp(prefix="http-bench-"))
    echo = None
    agent = None
    try:
        small = build_models(work / "onnx")[SMALL]
        make_bundle(small, work / "repo")
        http_url = f"127.0.0.1:{free_port()}"
        print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
        agent, _ = servers.start_agent(
            work / "repo", [SMALL], "--http-listen", http_url, log_path=work / "agent.log"
        )
        wait_for(lambda: "HTTP/REST inference on" in agent.logs(), 30, "agent HTTP port")
        x = small.row()
        # The echo answers with the agent's own response to this row: same JSON, same bytes.
        probe = httpclient.InferenceServerClient(http_url)
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        head = json.dumps(probe.infer(SMALL, [inp]).get_response(), separators=(",", ":"))
        probe.close()
        echo_url = f"127.0.0.1:{free_port()}"
        with open(work / "echo.log", "wb") as log:
            echo = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.benchmarks.http_echo_server",
                    "--listen",
                    echo_url,
                    "--response-json",
                    head,
                    "--binary-bytes",
                    str(small.width_out * 4),
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(
            lambda: httpclient.InferenceServerClient(echo_url).is_server_live(), 30, "echo live"
        )
        targets: dict[str, Callable] = {
            "agent gRPC": lambda x: grpc_call(agent.url, x),
            "agent HTTP (binary)": lambda x: http_call(http_url, x),
            "agent HTTP (JSON)": lambda x: http_call(http_url, x, binary=False),
            "aiohttp echo (binary)": lambda x: http_call(echo_url, x),
        }
        lat = sequential(targets, x, requests)
        rps: dict[str, list[float]] = {label: [] for label in targets}
        for _ in range(rounds):
            for label, make in targets.items():
                rps[label].append(closed_loop(make, x, 16, seconds))
        load_end = os.getloadavg()[0]
    finally:
        if echo is not None:
            echo.terminate()
            try:
                echo.wait(10)
            except subprocess.TimeoutExpired:
                echo.kill()
                echo.wait(5)
        if agent is not None:
            agent.stop()
    shutil.rmtree(work, ignore_errors=True)
    p50 = {k: float(np.percentile(v, 50)) / 1e3 for k, v in lat.items()}
    p99 = {k: float(np.percentile(v, 99)) / 1e3 for k, v in lat.items()}
    thr = {k: float(np.median(v)) for k, v in rps.items()}
    print(
        f"\nsmall model, {requests} sequential requests per target, {rounds} x {seconds:g} s "
        "at concurrency 16 per target (median of rounds)"
    )
    print(f"{'target':24} {'p50 us':>8} {'p99 us':>8} {'req/s @16':>10}")
    for k in targets:
        print(f"{k:24} {p50[k]:8.0f} {p99[k]:8.0f} {thr[k]:10.0f}")
    h, g, e = "agent HTTP (binary)", "agent gRPC", "aiohttp echo (binary)"
    print(f"\nHTTP/gRPC: p50 {p50[h] / p50[g]:.2f}x, throughput {thr[h] / thr[g]:.2f}x")
    print(f"HTTP/echo: p50 {p50[h] / p50[e]:.2f}x, throughput {thr[h] / thr[e]:.2f}x")
    print(f"load average at end: {load_end:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
