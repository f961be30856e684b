"""Triton's own load generator, unmodified, against the agent (installed by `make test`)."""

from __future__ import annotations

import csv
import glob
import os
import subprocess
from pathlib import Path

from tests.conftest import make_mlp_bundle
from tests.procs import ROOT

PERF_ANALYZER = ROOT / ".venv" / "bin" / "perf_analyzer"


def test_perf_analyzer_drives_the_agent(repo: Path, agent_factory, tmp_path: Path) -> None:
    assert PERF_ANALYZER.exists(), "perf_analyzer is missing: run `make perf-analyzer`"
    make_mlp_bundle(repo, 1)
    agent = agent_factory(repo)
    agent.wait_model("mlp")
    libs = glob.glob(str(ROOT / ".venv/lib/python3*/site-packages/nvidia/cuda_runtime/lib"))
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(libs)}
    out = tmp_path / "pa.csv"
    r = subprocess.run(
        [
            str(PERF_ANALYZER),
            "-i",
            "grpc",
            "-u",
            agent.url,
            "-m",
            "mlp",
            "--shape",
            "x:4",
            "-b",
            "2",
            "--concurrency-range",
            "2",
            "-p",
            "1000",
            "--max-trials",
            "5",
            "-s",
            "50",
            "-f",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1
    assert float(rows[0]["Inferences/Second"]) > 50
    assert int(rows[0]["p99 latency"]) > 0
    # perf_analyzer read server-side statistics (our ModelStatistics) between windows.
    assert "Server:" in r.stdout
