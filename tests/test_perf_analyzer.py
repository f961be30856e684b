"""Triton's own load generator, unmodified, against the agent (installed by `make test`)."""

from __future__ import annotations

import os
import pstats
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.conftest import make_mlp_bundle
from tests.procs import (
    PERF_ANALYZER,
    AgentProcess,
    dev_shm,
    free_port,
    perf_analyzer,
    shm_leftovers,
)


def test_perf_analyzer_runs_as_installed_without_ld_library_path(tmp_path: Path) -> None:
    """`.venv/bin/perf_analyzer` works as it is: no activation, no LD_LIBRARY_PATH, any cwd."""
    assert PERF_ANALYZER.exists(), "perf_analyzer is missing: run `make perf-analyzer`"
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    r = subprocess.run(
        [str(PERF_ANALYZER), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    # Without the wrapper: "error while loading shared libraries: libcudart.so.12", exit 127.
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Perf Analyzer Version 2.51.0" in r.stdout + r.stderr


def test_perf_analyzer_drives_the_agent(repo: Path, agent_factory, tmp_path: Path) -> None:
    make_mlp_bundle(repo, 1)
    agent = agent_factory(repo)
    agent.wait_model("mlp")
    # As a user runs it: the installed wrapper finds the venv's CUDA runtime by itself.
    out = tmp_path / "pa.csv"
    r, rows = perf_analyzer(
        agent.url, "mlp", out, "--shape", "x:4", "-b", "2", "--concurrency-range", "2"
    )
    assert len(rows) == 1
    assert float(rows[0]["Inferences/Second"]) > 50
    assert int(rows[0]["p99 latency"]) > 0
    # perf_analyzer read server-side statistics (our ModelStatistics) between windows.
    assert "Server:" in r.stdout


def test_loop_profile_is_written_only_when_asked(repo: Path, tmp_path: Path) -> None:
    """MODELFLEET_PROFILE_LOOP (cpu_bench --profile): the event loop's cProfile holds the
    requests it served; without it the agent writes none."""
    make_mlp_bundle(repo, 1)
    prof = tmp_path / "loop.prof"
    for env in ({}, {"MODELFLEET_PROFILE_LOOP": str(prof)}):
        with AgentProcess(repo, log_path=tmp_path / "agent.log", env=env) as agent:
            agent.wait_model("mlp")
            client = agent.client()
            x = grpcclient.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(np.ones((1, 4), np.float32))
            for _ in range(5):
                client.infer("mlp", [x])
            client.close()
        assert agent.proc is not None and agent.proc.returncode == 0
        if not env:
            assert not prof.exists()
    calls = {
        func[2]: stat[1]
        for func, stat in pstats.Stats(str(prof)).stats.items()  # type: ignore[attr-defined]
    }
    assert calls.get("ModelInfer", 0) >= 5


@pytest.mark.parametrize("shared_memory", ["none", "system"])
def test_perf_analyzer_over_http(
    repo: Path, agent_factory, tmp_path: Path, shared_memory: str
) -> None:
    """`perf_analyzer -i http` against the agent's HTTP port, with tensors in the body and in
    system shared memory: real inferences, counted by the agent as successes, none failed."""
    make_mlp_bundle(repo, 1)
    http_url = f"127.0.0.1:{free_port()}"
    agent = agent_factory(repo, "--http-listen", http_url)
    agent.wait_model("mlp")
    before = dev_shm()
    # Regions the agent saw registered while perf_analyzer ran: proof the tensors went through
    # shared memory rather than the body.
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        with httpclient.InferenceServerClient(http_url) as c:
            while not done.is_set():
                seen.update(r["name"] for r in c.get_system_shared_memory_status())
                time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = tmp_path / "pa.csv"
    r, rows = perf_analyzer(
        http_url,
        "mlp",
        out,
        "--shape",
        "x:4",
        "-b",
        "2",
        "--concurrency-range",
        "2",
        "--shared-memory",
        shared_memory,
        protocol="http",
    )
    done.set()
    watcher.join(10)
    assert len(rows) == 1, r.stdout
    assert float(rows[0]["Inferences/Second"]) > 20
    assert int(rows[0]["p50 latency"]) > 0
    # Statistics came through the HTTP statistics extension between windows.
    assert "Server:" in r.stdout
    assert "error" not in (r.stdout + r.stderr).lower()
    with httpclient.InferenceServerClient(http_url) as c:
        stats = c.get_inference_statistics("mlp")["model_stats"][0]
        if shared_memory == "system":
            # perf_analyzer unregistered its regions when it was done.
            assert c.get_system_shared_memory_status() == []
    assert bool(seen) == (shared_memory == "system"), seen
    assert int(stats["inference_stats"]["success"]["count"]) > 50
    assert int(stats["inference_stats"]["fail"]["count"]) == 0
    assert shm_leftovers(before, agent.proc.pid) == set()
