"""Deployments, rollouts and stages on a real hub with real agent processes (issue 14: 1, 2, 4).

One hub and three agents for the module; the tests run in order and each leaves the fleet
without deployments or with v1 everywhere, as the next one expects.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import models
from tests.procs import AgentProcess, HubProcess, agent_status, enroll_agent, traffic, wait_for

pytestmark = pytest.mark.process

FAST = {
    "MODELFLEET_AGENT_REPORT_INTERVAL_S": "0.5",
    "MODELFLEET_AGENT_BACKOFF_MAX_S": "1",
    "MODELFLEET_AGENT_TELEMETRY_INTERVAL_S": "1",
}
SITES = {"b1": "site=berlin", "b2": "site=berlin", "p1": "site=paris"}


class Fleet:
    def __init__(self, root: Path, hub: HubProcess) -> None:
        self.root, self.hub = root, hub
        self.agents: dict[str, AgentProcess] = {}

    def add(self, host: str, labels: str) -> AgentProcess:
        config = enroll_agent(self.hub, self.root / host, labels, hostname=host)
        agent = AgentProcess(
            self.root / host, fleet_config=config, env=FAST, log_path=self.root / f"{host}.log"
        )
        self.agents[host] = agent.start()
        return agent


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("deployments")
    hub = HubProcess(root / "hub", log_path=root / "hub.log").start()
    f = Fleet(root, hub)
    try:
        for host, labels in SITES.items():
            f.add(host, labels)
        src = root / "onnx"
        hub.cli("publish", "mlp", str(models.mlp(src / "v1.onnx", seed=0)))
        hub.cli("publish", "mlp", str(models.mlp(src / "v2.onnx", seed=1)))
        yield f
    finally:
        for a in f.agents.values():
            a.stop()
        hub.stop()


def active(agent: AgentProcess) -> int:
    try:
        return int(agent_status(agent.admin_socket).get("mlp", {}).get("active_version", 0))
    except Exception:
        return -1


def agents_json(hub: HubProcess) -> dict[str, dict]:
    """hostname -> AgentInfo as `agents ls --json` prints it."""
    return {a["hostname"]: a for a in json.loads(hub.cli("agents", "ls", "--json"))}


def desired_by(hub: HubProcess) -> dict[str, dict]:
    """hostname -> the deployment that decides its desired version of mlp."""
    out = {}
    for host, info in agents_json(hub).items():
        for d in info.get("desired_by", []):
            if d["model"] == "mlp":
                out[host] = d
    return out


def deployments(hub: HubProcess) -> list[dict]:
    return json.loads(hub.cli("deployments", "ls", "--json"))["deployments"]


def test_deployments_are_listed_previewed_refused_when_empty_and_removed(fleet: Fleet) -> None:
    hub, agents = fleet.hub, fleet.agents
    out = hub.cli("deploy", "mlp", "1")
    assert "no --selector: mlp v1 targets the whole fleet" in out
    assert "desired on 3 agent(s)" in out
    wait_for(lambda: all(active(a) == 1 for a in agents.values()), 120, "v1 everywhere")

    # A typo in a selector is refused, and says which labels exist.
    typo = hub.cli("deploy", "mlp", "2", "--selector", "site=berln", check=False)
    assert typo.returncode == 3, typo.stderr
    assert "matches no active agent" in typo.stderr
    assert "did you mean site=berlin?" in typo.stderr and "--allow-empty" in typo.stderr
    [whole] = deployments(hub)
    assert (whole["version"], whole["selector"], whole["source"]) == (1, {}, "deploy")
    assert whole["actor"] == "admin" and len(whole["agents"]) == len(whole["deciding"]) == 3

    # --dry-run names each agent's change and writes nothing.
    dry = hub.cli("deploy", "mlp", "2", "--selector", "site=berlin", "--dry-run")
    assert "dry run, nothing written" in dry
    assert "change the desired version of 2 of 2 matching agent(s)" in dry
    changes = [line for line in dry.splitlines() if "v1 -> v2" in line]
    assert len(changes) == 2 and all("(b1)" in c or "(b2)" in c for c in changes)
    assert len(deployments(hub)) == 1
    assert {h: d["version"] for h, d in desired_by(hub).items()} == dict.fromkeys(SITES, 1)

    out = hub.cli("deploy", "mlp", "2", "--selector", "site=berlin")
    assert "desired on 2 agent(s) matching site=berlin" in out and "v1 -> v2" in out
    wait_for(lambda: active(agents["b1"]) == active(agents["b2"]) == 2, 120, "v2 in berlin")
    assert active(agents["p1"]) == 1
    listed = {json.dumps(d["selector"]): d for d in deployments(hub)}
    berlin, whole = listed['{"site": "berlin"}'], listed["{}"]
    assert berlin["version"] == 2 and len(berlin["agents"]) == len(berlin["deciding"]) == 2
    assert len(whole["agents"]) == 3 and len(whole["deciding"]) == 1  # paris only
    by = desired_by(hub)
    # agents ls --json prints int64 fields as strings (as every --json of AgentInfo).
    assert by["b1"]["id"] == berlin["id"] and by["p1"]["id"] == whole["id"]
    assert by["b1"]["source"] == "deploy" and by["b1"]["actor"] == "admin"
    table = hub.cli("deployments", "ls")
    assert "site=berlin" in table and "(whole fleet)" in table and "deploy by admin" in table
    assert "deploy by admin" in hub.cli("agents", "ls")

    shown = json.loads(hub.cli("deployments", "show", "mlp", "--selector", "site=berlin", "--json"))
    assert shown["deployment"]["id"] == berlin["id"]
    assert {a["hostname"] for a in shown["agents"]} == {"b1", "b2"}
    assert [h["version"] for h in shown["history"]] == [2]
    assert "this deployment" in hub.cli("deployments", "show", "mlp", "--selector", "site=berlin")

    # --allow-empty keeps a deployment for agents yet to enroll.
    later = hub.cli("deploy", "mlp", "2", "--selector", "site=tokyo", "--allow-empty")
    assert "no active agent matches now" in later

    # undeploy says what the agents fall back to, and they do.
    dry = hub.cli("undeploy", "mlp", "--selector", "site=berlin", "--dry-run")
    assert "dry run, nothing written" in dry and "would fall back" in dry
    assert dry.count(f"v2 -> v1, by deployment {whole['id']} for the whole fleet") == 2
    assert len(deployments(hub)) == 3
    out = hub.cli("undeploy", "mlp", "--selector", "site=berlin")
    assert f"removed the deployment of mlp for site=berlin (deployment {berlin['id']}" in out
    wait_for(lambda: all(active(a) == 1 for a in agents.values()), 120, "berlin back on v1")
    again = hub.cli("undeploy", "mlp", "--selector", "site=berlin", check=False)
    assert again.returncode == 4 and "mlp has no deployment for site=berlin" in again.stderr
    hub.cli("undeploy", "mlp", "--selector", "site=tokyo")
    out = hub.cli("undeploy", "mlp")
    assert out.count("v1 -> none: nothing matches it any more, it drops mlp") == 3
    wait_for(lambda: all(active(a) == 0 for a in agents.values()), 60, "mlp unloaded")
    assert deployments(hub) == [] and "no deployments" in hub.cli("deployments", "ls")


def rollout(hub: HubProcess) -> dict:
    return json.loads(hub.cli("rollout", "status", "mlp", "--json"))


def stages(hub: HubProcess) -> dict[int, str]:
    out = {}
    for line in hub.cli("models", "versions", "mlp").splitlines()[1:]:
        version, stage = line.split()[:2]
        out[int(version)] = stage
    return out


def test_rollouts_show_in_desired_state_and_set_the_production_stage(fleet: Fleet) -> None:
    hub, agents = fleet.hub, fleet.agents
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: all(active(a) == 1 for a in agents.values()), 120, "v1 everywhere")
    assert "is now production" in hub.cli("models", "stage", "mlp", "1", "production")
    refused = hub.cli("models", "stage", "mlp", "2", "production", check=False)
    assert refused.returncode == 7 and "desire v1 on 3 agent(s)" in refused.stderr
    assert "--force" in refused.stderr

    # No traffic, at least one request wanted: the first wave's bake ends inconclusive and the
    # rollout waits, paused, with one canary on v2.
    hub.cli(
        "rollout",
        "start",
        "mlp",
        "2",
        "--waves",
        "1,100",
        "--waves-are-counts",
        "--bake",
        "2s",
        "--min-requests",
        "1",
        "--agent-timeout",
        "60s",
        # Desired state is the point here, not judging: 2 s bakes are too short for the judge.
        "--judge",
        "none",
    )
    wait_for(lambda: rollout(hub)["state"] == "paused", 120, "wave 1 inconclusive")
    rid = rollout(hub)["id"]
    by = desired_by(hub)
    canaries = [h for h, d in by.items() if d["source"] == "rollout"]
    assert len(canaries) == 1 and by[canaries[0]]["rollout_id"] == rid
    assert by[canaries[0]]["version"] == 2
    assert all(
        d["source"] == "deploy" and d["actor"] == "admin"
        for h, d in by.items()
        if h not in canaries
    )
    table = hub.cli("agents", "ls")
    assert f"rollout {rid}, in progress" in table and "deploy by admin" in table
    assert f"rollout {rid} of mlp in progress (paused, wave 1/2" in table
    assert "agents enrolled now get v1" in table
    listing = json.loads(hub.cli("deployments", "ls", "--json"))
    per_agent = [d for d in listing["deployments"] if d["per_agent"]]
    assert [(d["rollout_id"], d["version"], len(d["deciding"])) for d in per_agent] == [(rid, 2, 1)]
    [running] = listing["rollouts"]
    assert running["id"] == rid and running["from_versions"] == [1]
    assert running["new_agents"]["version"] == 1 and running["new_agents"]["selector"] == {}
    assert "v2 once it completes" in hub.cli("deployments", "ls")
    # ... and so they do: an agent enrolled now is not part of the rollout.
    late = fleet.add("p2", "site=paris")
    wait_for(lambda: active(late) == 1, 120, "the late agent on v1")
    assert hub.cli("models", "stage", "mlp", "2", "production", check=False).returncode == 7

    # A version switching under the load is fine.
    with traffic(agents.values(), interval_s=0.05):

        def done() -> bool:
            state = rollout(hub)["state"]
            if state == "paused":  # a bake that ended before telemetry arrived: bake again
                hub.cli("rollout", "resume", "mlp")
            assert state != "rolled_back", rollout(hub)["reason"]
            return state == "done"

        wait_for(done, 180, "rollout done", interval=1)

    # Completed: the rollout's version is the desired version of its selector, for agents
    # enrolled during it too, and it says so.
    wait_for(lambda: all(active(a) == 2 for a in agents.values()), 120, "v2 everywhere")
    by = desired_by(hub)
    assert {(d["source"], d["rollout_id"], d["version"]) for d in by.values()} == {
        ("rollout", rid, 2)
    }
    [whole] = deployments(hub)
    assert (whole["source"], whole["rollout_id"], len(whole["deciding"])) == ("rollout", rid, 4)
    assert f"rollout {rid} at" in hub.cli("deployments", "ls")

    # Stages follow: v2 production, v1 deprecated; v1 cannot be production while v2 is desired.
    assert stages(hub) == {1: "deprecated", 2: "production"}
    assert any("v2 is now production; v1 deprecated" in e["text"] for e in rollout(hub)["events"])
    refused = hub.cli("models", "stage", "mlp", "1", "production", check=False)
    assert refused.returncode == 7 and "desire v2 on 4 agent(s)" in refused.stderr
    hub.cli("models", "stage", "mlp", "1", "production", "--force")
    assert stages(hub) == {1: "production", 2: "deprecated"}
