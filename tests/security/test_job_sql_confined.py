"""A job's SQL runs on agents; the operator role may create jobs, but only the admin role may
touch trust and personal data (docs/security.md#admin-roles). So a job's SQL reads the job's
input and nothing else on the agent: not the agent's private key, not its capture files. Real
hub and agent: an operator's job that tries, and a viewer reading the run's error."""

from __future__ import annotations

import json
from pathlib import Path

from tests import models
from tests.procs import AgentProcess, HubProcess, agent_status, enroll_agent, wait_for
from tests.test_jobs import FAST, write_input


def runs(hub: HubProcess, admin: Path, job: str) -> list[dict]:
    return json.loads(hub.cli("--admin-dir", str(admin), "jobs", "runs", job, "--json"))


def test_an_operators_job_sql_cannot_read_the_agents_files(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub", log_path=tmp_path / "hub.log").start()
    agent = None
    try:
        config = enroll_agent(hub, tmp_path / "agent", "site=lab", hostname="edge-1")
        agent = AgentProcess(
            tmp_path / "agent", fleet_config=config, env=FAST, log_path=tmp_path / "agent.log"
        ).start()
        hub.cli("publish", "mlp", str(models.mlp(tmp_path / "m.onnx", seed=0)))
        hub.cli("deploy", "mlp", "1")
        wait_for(
            lambda: agent_status(agent.admin_socket).get("mlp", {}).get("active_version") == "1",
            60,
            "v1 active",
        )
        operator, viewer = tmp_path / "otto", tmp_path / "vera"
        hub.cli("admins", "add", "otto", "--role", "operator", "--out", str(operator))
        hub.cli("admins", "add", "vera", "--role", "viewer", "--out", str(viewer))
        key = tmp_path / "agent" / "identity" / "agent.key"
        secret_line = key.read_text().splitlines()[1]
        data = tmp_path / "data"
        write_input(data, 20)
        # The cast fails with the file's text in DuckDB's message, which the agent reports as
        # the run's error: readable by any viewer.
        peek = f"(SELECT content FROM read_text('{key}'))"
        sql = f"SELECT * FROM input WHERE id = CAST({peek} AS BIGINT)"
        hub.cli(
            "--admin-dir",
            str(operator),
            "jobs",
            "create",
            "peek",
            "--model",
            "mlp",
            "--deployed",
            "--every",
            "2s",
            "--input",
            str(data),
            "--output",
            str(tmp_path / "out"),
            "--sql",
            sql,
        )
        wait_for(lambda: runs(hub, viewer, "peek"), 90, "a run of the job at the hub")
        [run, *_] = runs(hub, viewer, "peek")
        assert run["status"] == "failed", run
        assert secret_line not in run["error"], run["error"]
        assert "BEGIN PRIVATE KEY" not in run["error"], run["error"]
        assert "disabled" in run["error"] or "Permission" in run["error"], run["error"]
        # Nor may a job read the agent's folders as its input (captured data is Parquet: it
        # would be scored, its key columns copied, its values quoted in errors).
        # (The agent ships and deletes what is under capture/: a file of its own elsewhere.)
        write_input(tmp_path / "agent" / "kept" / "mlp", 20)
        for name, source in (("whole", tmp_path / "agent"), ("glob", tmp_path / "agent" / "**")):
            hub.cli(
                "--admin-dir",
                str(operator),
                "jobs",
                "create",
                name,
                "--model",
                "mlp",
                "--deployed",
                "--every",
                "2s",
                "--input",
                str(source),
                "--output",
                str(tmp_path / "out"),
            )
        for name in ("whole", "glob"):
            wait_for(lambda n=name: runs(hub, viewer, n), 90, f"a run of job {name}")
            [run, *_] = runs(hub, viewer, name)
            assert run["status"] == "failed" and run["rows_in"] == 0, run
            assert "this agent's own folder" in run["error"], run["error"]
    finally:
        if agent is not None:
            agent.stop()
        hub.stop()
