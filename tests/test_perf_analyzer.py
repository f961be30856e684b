"""Triton's own load generator, unmodified, against the agent (installed by `make test`)."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

from tests.conftest import make_mlp_bundle
from tests.procs import ROOT

PERF_ANALYZER = ROOT / ".venv" / "bin" / "perf_analyzer"


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
    assert PERF_ANALYZER.exists(), "perf_analyzer is missing: run `make perf-analyzer`"
    make_mlp_bundle(repo, 1)
    agent = agent_factory(repo)
    agent.wait_model("mlp")
    # As a user runs it: the installed wrapper finds the venv's CUDA runtime by itself.
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
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
