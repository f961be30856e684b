"""Rollouts on a real hub with ten real agent processes."""

from __future__ import annotations

import json

import pytest

from tests import models
from tests.procs import AgentProcess, HubProcess, agent_status, enroll_agent, wait_for

N_AGENTS = 10
FAST = {"MODELFLEET_AGENT_REPORT_INTERVAL_S": "0.5", "MODELFLEET_AGENT_BACKOFF_MAX_S": "1",
        "MODELFLEET_AGENT_TELEMETRY_INTERVAL_S": "1"}  # fmt: skip


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("rollouts")
    hub = HubProcess(root / "hub", log_path=root / "hub.log").start()
    agents: list[AgentProcess] = []
    try:
        for i in range(N_AGENTS):
            config = enroll_agent(hub, root / f"a{i}", f"site={'berlin' if i < 5 else 'paris'}",
                                  hostname=f"edge-{i}")  # fmt: skip
            agents.append(AgentProcess(root / f"a{i}", fleet_config=config, env=FAST,
                                       log_path=root / f"a{i}.log").start())  # fmt: skip
        src = root / "onnx"
        hub.cli("publish", "mlp", str(models.mlp(src / "v1.onnx", seed=0)))
        hub.cli("publish", "mlp", str(models.mlp(src / "v2.onnx", seed=1)))
        hub.cli("publish", "mlp", str(models.nan_model(src / "v3.onnx", width=4)),
                "--max-batch-size", "0")  # fmt: skip
        hub.cli("deploy", "mlp", "1")
        wait_for(lambda: all(active(a) == 1 for a in agents), 120, "v1 everywhere")
        yield hub, agents
    finally:
        for a in agents:
            a.stop()
        hub.stop()


def active(agent: AgentProcess) -> int:
    try:
        return int(agent_status(agent.admin_socket).get("mlp", {}).get("active_version", 0))
    except Exception:
        return -1


def status(hub: HubProcess) -> dict:
    return json.loads(hub.cli("rollout", "status", "mlp", "--json"))


def test_healthy_version_goes_through_all_waves(fleet) -> None:
    hub, agents = fleet
    out = hub.cli("rollout", "start", "mlp", "2", "--waves", "10,50,100", "--bake", "1s",
                  "--agent-timeout", "60s")  # fmt: skip
    assert "wave 1/3" in out
    wait_for(lambda: status(hub)["state"] == "done", 120, "rollout done")
    assert all(active(a) == 2 for a in agents)
    s = status(hub)
    texts = [e["text"] for e in s["events"]]
    assert any("wave 2/3" in t for t in texts) and any("wave 3/3" in t for t in texts)
    assert "done" in hub.cli("rollout", "history", "mlp")


def test_refused_version_is_stopped_in_the_first_wave_and_rolled_back(fleet) -> None:
    hub, agents = fleet
    hub.cli("rollout", "start", "mlp", "3", "--waves", "10,50,100", "--bake", "1s",
            "--agent-timeout", "60s")  # fmt: skip
    wait_for(lambda: status(hub)["state"] == "rolled_back", 120, "automatic rollback")
    s = status(hub)
    assert "health gate (non_finite)" in s["reason"]
    assert s["assigned"] == 1  # stopped in the first wave
    wait_for(lambda: all(active(a) == 2 for a in agents), 60, "everyone back on v2")
