"""Scheduled batch scoring on a real hub and agent: jobs travel with the desired state."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq

from tests import models
from tests.procs import AgentProcess, HubProcess, agent_status, enroll_agent, wait_for

FAST = {"MODELFLEET_AGENT_REPORT_INTERVAL_S": "1", "MODELFLEET_AGENT_BACKOFF_MAX_S": "1"}


def runs(hub: HubProcess, job: str) -> list[dict]:
    return json.loads(hub.cli("jobs", "runs", job, "--json"))


def write_input(data: Path, rows: int) -> np.ndarray:
    """One Parquet file of ``rows`` (id, x: 4 floats) rows in ``data``; returns x."""
    x = np.random.default_rng(0).standard_normal((rows, 4)).astype(np.float32)
    data.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table({"id": np.arange(rows), "x": list(x)}).cast(
            pa.schema([("id", pa.int64()), ("x", pa.list_(pa.float32(), 4))])
        ),
        data / "part-0.parquet",
    )
    return x


def test_scheduled_job_fires_on_an_agent_and_reports_its_run(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub", log_path=tmp_path / "hub.log").start()
    agent = None
    try:
        config = enroll_agent(hub, tmp_path / "agent", "site=berlin", hostname="edge-1")
        agent = AgentProcess(
            tmp_path / "agent", fleet_config=config, env=FAST, log_path=tmp_path / "agent.log"
        ).start()
        onnx = models.mlp(tmp_path / "m.onnx", seed=0)
        hub.cli("publish", "mlp", str(onnx))
        hub.cli("deploy", "mlp", "1")
        wait_for(
            lambda: agent_status(agent.admin_socket).get("mlp", {}).get("active_version") == "1",
            60,
            "v1 active",
        )
        rows = 500
        data = tmp_path / "data"
        x = write_input(data, rows)
        out = tmp_path / "scores"
        bad = hub.cli(
            "jobs",
            "create",
            "nightly",
            "--model",
            "mlp",
            "--deployed",
            "--cron",
            "not a cron",
            "--input",
            str(data),
            "--output",
            str(out),
            check=False,
        )
        assert bad.returncode == 3 and "invalid cron schedule" in bad.stderr
        created = hub.cli(
            "jobs",
            "create",
            "nightly",
            "--model",
            "mlp",
            "--deployed",
            "--every",
            "2s",
            "--input",
            str(data),
            "--output",
            str(out),
            "--selector",
            "site=berlin",
            "--keys",
            "id",
        )
        assert "on 1 agent(s)" in created
        wait_for(
            lambda: any(r["status"] == "succeeded" for r in runs(hub, "nightly")),
            90,
            "a succeeded run at the hub",
        )
        run = next(r for r in runs(hub, "nightly") if r["status"] == "succeeded")
        assert run["rows_in"] == rows and run["rows_out"] == rows
        assert run["version"] == 1 and run["agent_id"].startswith("edge-1")
        # The output is the model's, exactly.
        table = pq.read_table(out / f"run-{run['run_id']}").sort_by("id")
        want = ort.InferenceSession(str(onnx)).run(None, {"x": x})[0]
        got = np.stack(table.column("y").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-6)
        assert "succeeded" in hub.cli("jobs", "runs", "nightly")
        # Pause stops it; a restarted agent keeps its jobs (from its desired state on disk).
        hub.cli("jobs", "pause", "nightly")
        time.sleep(3)
        count = len(runs(hub, "nightly"))
        time.sleep(4)
        assert len(runs(hub, "nightly")) <= count + 1  # at most one run that was in flight
        assert "paused" in hub.cli("jobs", "ls")
        agent.stop()
        agent = AgentProcess(
            tmp_path / "agent", fleet_config=config, env=FAST, log_path=tmp_path / "agent2.log"
        ).start()
        wait_for(lambda: "job nightly scheduled" in agent.logs(), 60, "job restored")
        before = len(runs(hub, "nightly"))
        hub.cli("jobs", "run-now", "nightly")
        wait_for(lambda: len(runs(hub, "nightly")) > before, 60, "run-now")
        hub.cli("jobs", "delete", "nightly")
        assert "nightly" not in hub.cli("jobs", "ls")
    finally:
        if agent is not None:
            agent.stop()
        hub.stop()
