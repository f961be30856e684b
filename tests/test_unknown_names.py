"""A name that does not exist is an error that says so and suggests the close one (issue 14,
item 9). A real hub with a published model and an enrolled agent."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests import models
from tests.procs import HubProcess, enroll_agent

pytestmark = pytest.mark.process

NOT_FOUND = 4


def refused(hub: HubProcess, *args: str) -> str:
    r: subprocess.CompletedProcess = hub.cli(*args, check=False)  # type: ignore[assignment]
    lines = r.stderr.strip().splitlines()
    assert r.returncode == NOT_FOUND and len(lines) == 1, f"{args}: {r.returncode}\n{r.stderr}"
    return lines[0]


def test_unknown_models_versions_and_agents(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub", log_path=tmp_path / "hub.log").start()
    try:
        hub.cli("publish", "fraud", str(models.mlp(tmp_path / "fraud.onnx")))
        enroll_agent(hub, tmp_path / "berlin-1", "site=berlin", hostname="berlin-1")
        agent_id = hub.cli("agents", "ls", "--json").split('"agent_id": "')[1].split('"')[0]
        assert agent_id.startswith("berlin-1-")

        typo = "no model named 'frud' (did you mean 'fraud'?)"
        assert typo in refused(hub, "metrics", "frud")
        assert typo in refused(hub, "deploy", "frud", "1")
        assert typo in refused(hub, "rollout", "status", "frud")
        assert "no model named 'nosuch'" in refused(hub, "rollout", "history", "nosuch")
        assert "model 'fraud' has no version 7 (its versions: 1)" in refused(
            hub, "deploy", "fraud", "7"
        )
        assert hub.cli("rollout", "history", "fraud") == ""  # known, no rollout yet: not an error

        # A hostname where an agent id belongs: the error names the id to use instead.
        line = refused(hub, "agents", "revoke", "berlin-1")
        assert f"'berlin-1' is the hostname of agent {agent_id}" in line
        assert "active" in hub.cli("agents", "ls")  # nothing was revoked
        line = refused(hub, "agents", "revoke", agent_id[:-1])
        assert f"no agent with id '{agent_id[:-1]}' (did you mean '{agent_id}'?)" in line
        assert "revoked" in hub.cli("agents", "revoke", agent_id)
    finally:
        hub.stop()


def test_did_you_mean() -> None:
    from modelfleet.kernel.errors import did_you_mean

    assert did_you_mean("frud", ["fraud", "churn"]) == " (did you mean 'fraud'?)"
    assert did_you_mean("zzz", ["fraud", "churn"]) == ""
    assert did_you_mean("mlp", []) == ""
