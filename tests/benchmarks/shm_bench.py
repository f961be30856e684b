"""System shared memory (issue 17, item 3): p50 at concurrency 1 of an identity model with a
1 MB and a 16 MB FP32 input, over gRPC with raw tensors, over HTTP with binary tensors, and
over gRPC with input and output in system shared memory, all in the same run against the same
agent, in alternating blocks so noise from neighbours hits every path alike.

Every call includes putting the input where its path needs it (serialising it into the request,
or copying it into the region) and getting the output as a numpy array, as a client would.

``python -m tests.benchmarks.shm_bench [--quick]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from modelfleet.kernel.bundle import create_bundle
from tests import models
from tests.benchmarks import servers
from tests.procs import free_port, wait_for

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # it imports the deprecated pkg_resources
    import tritonclient.utils.shared_memory as shm

TIMEOUT_S = 30.0
SIZES = {"1 MB": 1 << 18, "16 MB": 1 << 22}  # FP32 elements
Call = Callable[[], np.ndarray]


def grpc_raw(url: str, model: str, x: np.ndarray) -> tuple[Call, Callable[[], None]]:
    client = grpcclient.InferenceServerClient(url)

    def call() -> np.ndarray:
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(model, [inp], client_timeout=TIMEOUT_S).as_numpy("y")

    return call, client.close


def http_binary(url: str, model: str, x: np.ndarray) -> tuple[Call, Callable[[], None]]:
    client = httpclient.InferenceServerClient(url, network_timeout=TIMEOUT_S)
    outputs = [httpclient.InferRequestedOutput("y", binary_data=True)]

    def call() -> np.ndarray:
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        return client.infer(model, [inp], outputs=outputs).as_numpy("y")

    return call, client.close


def grpc_shm(url: str, model: str, x: np.ndarray) -> tuple[Call, Callable[[], None]]:
    client = grpcclient.InferenceServerClient(url)
    tag = f"mf_shm_bench_{os.getpid()}_{model}"
    hin = shm.create_shared_memory_region(f"{tag}_in", f"/{tag}_in", x.nbytes)
    hout = shm.create_shared_memory_region(f"{tag}_out", f"/{tag}_out", x.nbytes)
    client.register_system_shared_memory(f"{tag}_in", f"/{tag}_in", x.nbytes)
    client.register_system_shared_memory(f"{tag}_out", f"/{tag}_out", x.nbytes)
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_shared_memory(f"{tag}_in", x.nbytes)
    out = grpcclient.InferRequestedOutput("y")
    out.set_shared_memory(f"{tag}_out", x.nbytes)

    def call() -> np.ndarray:
        shm.set_shared_memory_region(hin, [x])
        client.infer(model, [inp], outputs=[out], client_timeout=TIMEOUT_S)
        return shm.get_contents_as_numpy(hout, np.float32, list(x.shape))

    def close() -> None:
        client.unregister_system_shared_memory()
        client.close()
        shm.destroy_shared_memory_region(hin)
        shm.destroy_shared_memory_region(hout)

    return call, close


TARGETS = {"gRPC raw": grpc_raw, "HTTP binary": http_binary, "gRPC + system shm": grpc_shm}


def measure(
    grpc_url: str, http_url: str, model: str, x: np.ndarray, requests: int, block: int
) -> dict[str, np.ndarray]:
    made = {}
    try:
        for label, make in TARGETS.items():
            made[label] = make(http_url if label.startswith("HTTP") else grpc_url, model, x)
        for label, (call, _) in made.items():
            np.testing.assert_array_equal(call(), x, err_msg=label)  # right answer, warm
            for _ in range(3):
                call()
        lat: dict[str, list[int]] = {label: [] for label in made}
        done = 0
        while done < requests:
            for label, (call, _) in made.items():
                for _ in range(block):
                    t0 = time.perf_counter_ns()
                    call()
                    lat[label].append(time.perf_counter_ns() - t0)
            done += block
    finally:
        for _, close in made.values():
            close()
    return {k: np.asarray(v) for k, v in lat.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="shm-bench-"))
    agent = None
    results: dict[str, dict[str, np.ndarray]] = {}
    plan = {
        "1 MB": (40, 10) if args.quick else (300, 25),
        "16 MB": (8, 4) if args.quick else (60, 10),
    }
    try:
        xs = {}
        for size, n in SIZES.items():
            name = "id" + size.replace(" ", "").lower()
            x = np.random.default_rng(0).standard_normal((1, n)).astype(np.float32)
            create_bundle(
                models.identity(work / "onnx" / f"{name}.onnx", "FP32", n),
                name=name,
                version=1,
                out_dir=work / "repo",
                samples={"x": x},
            )
            xs[size] = (name, x)
        http_url = f"127.0.0.1:{free_port()}"
        print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
        agent, _ = servers.start_agent(
            work / "repo",
            [name for name, _ in xs.values()],
            "--http-listen",
            http_url,
            log_path=work / "agent.log",
        )
        wait_for(lambda: "HTTP/REST inference on" in agent.logs(), 30, "agent HTTP port")
        for size, (name, x) in xs.items():
            requests, block = plan[size]
            results[size] = measure(agent.url, http_url, name, x, requests, block)
        load_end = os.getloadavg()[0]
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'input':8} {'path':20} {'p50 ms':>8} {'p90 ms':>8} {'n':>5}")
    for size, lat in results.items():
        for label, v in lat.items():
            print(
                f"{size:8} {label:20} {np.percentile(v, 50) / 1e6:8.2f} "
                f"{np.percentile(v, 90) / 1e6:8.2f} {len(v):5d}"
            )
        base = float(np.percentile(lat["gRPC raw"], 50))
        shm_p50 = float(np.percentile(lat["gRPC + system shm"], 50))
        http_p50 = float(np.percentile(lat["HTTP binary"], 50))
        print(
            f"{size:8} shm / gRPC raw p50 {shm_p50 / base:.2f}x, HTTP / gRPC {http_p50 / base:.2f}x"
        )
    print(f"load average at end: {load_end:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
