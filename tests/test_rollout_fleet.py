"""Rollouts on a real hub with ten real agent processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import models
from tests.procs import AgentProcess, HubProcess, agent_status, enroll_agents, traffic, wait_for

N_AGENTS = 10
FAST = {
    "MODELFLEET_AGENT_REPORT_INTERVAL_S": "0.5",
    "MODELFLEET_AGENT_BACKOFF_MAX_S": "1",
    "MODELFLEET_AGENT_TELEMETRY_INTERVAL_S": "1",
}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("rollouts")
    hub = HubProcess(root / "hub", log_path=root / "hub.log").start()
    agents: list[AgentProcess] = []
    try:
        configs = enroll_agents(
            hub,
            [
                (root / f"a{i}", f"site={'berlin' if i < 5 else 'paris'}", f"edge-{i}")
                for i in range(N_AGENTS)
            ],
        )
        for i, config in enumerate(configs):
            agents.append(
                AgentProcess(
                    root / f"a{i}", fleet_config=config, env=FAST, log_path=root / f"a{i}.log"
                ).start()
            )
        src = root / "onnx"
        hub.cli("publish", "mlp", str(models.mlp(src / "v1.onnx", seed=0)))
        hub.cli("publish", "mlp", str(models.mlp(src / "v2.onnx", seed=1)))
        hub.cli(
            "publish",
            "mlp",
            str(models.nan_model(src / "v3.onnx", width=4)),
            "--max-batch-size",
            "0",
        )
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
    out = hub.cli(
        "rollout",
        "start",
        "mlp",
        "2",
        "--waves",
        "10,50,100",
        "--bake",
        "1s",
        "--agent-timeout",
        "60s",
    )
    assert "wave 1/3" in out
    wait_for(lambda: status(hub)["state"] == "done", 120, "rollout done")
    assert all(active(a) == 2 for a in agents)
    s = status(hub)
    texts = [e["text"] for e in s["events"]]
    assert any("wave 2/3" in t for t in texts) and any("wave 3/3" in t for t in texts)
    assert "done" in hub.cli("rollout", "history", "mlp")


def test_refused_version_is_stopped_in_the_first_wave_and_rolled_back(fleet) -> None:
    hub, agents = fleet
    hub.cli(
        "rollout",
        "start",
        "mlp",
        "3",
        "--waves",
        "10,50,100",
        "--bake",
        "1s",
        "--agent-timeout",
        "60s",
    )
    wait_for(lambda: status(hub)["state"] == "rolled_back", 120, "automatic rollback")
    s = status(hub)
    assert "health gate (non_finite)" in s["reason"]
    assert s["assigned"] == 1  # stopped in the first wave
    wait_for(lambda: all(active(a) == 2 for a in agents), 60, "everyone back on v2")


def agent_ids(hub: HubProcess) -> dict[str, str]:
    """agent id -> hostname."""
    return {a["agent_id"]: a["hostname"] for a in json.loads(hub.cli("agents", "ls", "--json"))}


def test_hub_killed_mid_bake_then_restarted_continues(fleet) -> None:
    hub, agents = fleet
    hub.cli("publish", "mlp", str(models.mlp(hub.data.parent / "onnx" / "v4.onnx", seed=4)))
    hub.cli(
        "rollout",
        "start",
        "mlp",
        "4",
        "--waves",
        "10,100",
        # Long enough to be killed in (the kill follows the first look at "baking"); a restart
        # that outlasts it resumes at the bake's end, still once.
        "--bake",
        "4s",
        "--agent-timeout",
        "60s",
    )
    wait_for(lambda: status(hub)["state"] == "baking", 60, "baking")
    hub.kill()
    restarted = HubProcess(hub.data, log_path=hub.log_path.with_name("hub-restarted.log"))
    restarted.port, restarted.enroll_port, restarted.url = hub.port, hub.enroll_port, hub.url
    fleet[0].proc = restarted.start().proc  # the fixture stops whatever runs at the end
    fleet[0]._log = restarted._log
    wait_for(lambda: status(restarted)["state"] == "done", 120, "done after the restart")
    wait_for(lambda: all(active(a) == 4 for a in agents), 60, "everyone on v4")
    events = [e["text"] for e in status(restarted)["events"]]
    assert sum("wave 1/2" in t for t in events) == 1  # resumed, not restarted


def test_agent_killed_during_a_wave_times_out(fleet) -> None:
    hub, agents = fleet
    from modelfleet.hub.rollouts import stable_order

    hub.cli("publish", "mlp", str(models.mlp(hub.data.parent / "onnx" / "v5.onnx", seed=5)))
    ids = agent_ids(hub)
    first = stable_order(list(ids), "mlp", 5)[0]
    victim = next(a for a in agents if a.models.name == "a" + ids[first].split("-")[1])
    victim.kill()
    try:
        hub.cli(
            "rollout",
            "start",
            "mlp",
            "5",
            "--waves",
            "10,100",
            "--bake",
            "1s",
            "--agent-timeout",
            "4s",
        )
        wait_for(lambda: status(hub)["state"] == "rolled_back", 60, "timeout -> rollback")
        assert "no switch within 4s" in status(hub)["reason"]
    finally:
        restarted = AgentProcess(
            victim.models,
            fleet_config=victim.models / "agent.toml",
            env=FAST,
            log_path=victim.log_path.with_name("victim.log"),
        )
        # The restarted agent listens on new ports: later tests must reach it, not the old one.
        agents[agents.index(victim)] = restarted.start()
    wait_for(lambda: active(restarted) == 4, 60, "the victim converges to the outcome (v4)")


def test_worse_error_rate_is_stopped_in_the_first_wave_without_a_command(fleet) -> None:
    hub, agents = fleet
    # v6 passes its health gate (3-row samples) but fails every single-row request at run time.
    v6 = models.reshape_model(hub.data.parent / "onnx" / "v6.onnx")
    hub.cli(
        "publish",
        "mlp",
        str(v6),
        "--max-batch-size",
        "0",
        "--samples",
        str(_reshape_samples(hub.data.parent)),
    )
    # Failures are the point: the canary's runtime errors feed its telemetry.
    with traffic(agents):
        hub.cli(
            "rollout",
            "start",
            "mlp",
            "6",
            "--waves",
            "10,100",
            "--bake",
            "4s",
            "--gate",
            "error_rate<0.05",
            "--gate",
            "p99_vs_baseline<5",
            "--min-requests",
            "20",
            "--agent-timeout",
            "60s",
        )
        wait_for(lambda: status(hub)["state"] == "rolled_back", 120, "automatic rollback")
    s = status(hub)
    assert "error_rate=1" in s["reason"] and s["assigned"] == 1
    gates = {g["gate"]: g for g in s["last_evaluation"]["gates"]}
    assert gates["error_rate<0.05"]["ok"] is False
    wait_for(lambda: all(active(a) == 4 for a in agents), 60, "everyone back on v4")


def _reshape_samples(root: Path) -> Path:
    import numpy as np

    path = root / "reshape-samples.npz"
    np.savez(path, x=np.ones((3, 4), np.float32))
    return path


def test_blue_green_prepares_all_then_switches_on_one_command(fleet) -> None:
    hub, agents = fleet
    hub.cli("publish", "mlp", str(models.mlp(hub.data.parent / "onnx" / "v7.onnx", seed=7)))
    hub.cli(
        "rollout",
        "start",
        "mlp",
        "7",
        "--strategy",
        "blue-green",
        "--bake",
        "1s",
        "--agent-timeout",
        "60s",
    )
    wait_for(lambda: status(hub)["state"] == "ready", 120, "every agent prepared")
    # Prepared beside the serving version: v4 still answers everywhere, v7 is loaded and gated.
    assert all(active(a) == 4 for a in agents)
    st = agent_status(agents[0].admin_socket)["mlp"]
    assert st["previous_version"] == "7" and st["active_version"] == "4"
    assert status(hub)["prepared"] == len(agents)
    hub.cli("rollout", "promote", "mlp")
    wait_for(lambda: status(hub)["state"] == "done", 120, "switched and baked")
    assert all(active(a) == 7 for a in agents)
