"""Issue 12, item 5: a retired version never reaches a machine again.

Real hub and agents. Seen before the fix: `deploy fraud 1`, rollouts of v2 and v3 to every
agent, v1 retired; an agent enrolled afterwards installed retired v1, because the rollouts had
assigned agents one by one and the old fleet-wide deployment still decided for new agents.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.procs import HubProcess, wait_for
from tests.test_fleet import active, agents_ls, fleet  # noqa: F401  (fixture)


def _rollout_done(hub: HubProcess) -> bool:
    return json.loads(hub.cli("rollout", "status", "mlp", "--json"))["state"] == "done"


def test_an_agent_enrolled_after_completed_rollouts_gets_the_rolled_out_version(
    fleet,  # noqa: F811
) -> None:
    hub = fleet.hub()
    agents = [fleet.agent(hub, f"edge-{i}", "site=berlin") for i in range(2)]
    for seed in range(3):
        hub.cli("publish", "mlp", str(fleet.model(seed)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: all(active(a) == 1 for a in agents), 60, "v1 everywhere")
    for version in ("2", "3"):
        hub.cli(
            "rollout",
            "start",
            "mlp",
            version,
            "--waves",
            "50,100",
            "--bake",
            "1s",
            "--agent-timeout",
            "60s",
        )
        wait_for(lambda: _rollout_done(hub), 120, f"rollout of v{version} done")
    hub.cli("models", "stage", "mlp", "1", "retired")
    late = fleet.agent(hub, "edge-late", "site=berlin")
    wait_for(lambda: active(late) == 3, 60, "the late agent gets the rolled-out v3")
    assert "is now the desired version for selector" in hub.logs()
    # A hub restart keeps it so (the decision is a deployment, not rollout memory).
    hub = fleet.restart_hub(hub)
    later = fleet.agent(hub, "edge-later", "site=berlin")
    wait_for(lambda: active(later) == 3, 60, "v3 after a hub restart too")


def test_a_retired_version_is_dropped_from_desired_state(fleet, tmp_path: Path) -> None:  # noqa: F811
    hub = fleet.hub()
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("deploy", "mlp", "1", "--selector", "site=paris", "--allow-empty")
    hub.cli("models", "stage", "mlp", "1", "retired")
    refused = hub.cli("deploy", "mlp", "1", check=False)
    assert refused.returncode == 7 and "retired" in refused.stderr
    agent = fleet.agent(hub, "edge-paris", "site=paris")
    agent.wait_live(timeout=60)
    wait_for(lambda: "report" in agents_ls(hub)["edge-paris"], 30, "agent reported")
    time.sleep(2)  # a few reconcile rounds: nothing may be installed
    assert active(agent) == 0
    assert not (agent.models / "cache" / "bundles" / "mlp" / "1").exists()
    wait_for(lambda: "is retired; dropped from its desired state" in hub.logs(), 10, "hub says so")


def test_retiring_a_version_agents_still_want_needs_force(fleet) -> None:  # noqa: F811
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("publish", "mlp", str(fleet.model(1)))
    hub.cli("deploy", "mlp", "1")
    hub.cli("deploy", "mlp", "2")
    wait_for(lambda: active(agent) == 2, 60, "v2")
    refused = hub.cli("models", "stage", "mlp", "2", "retired", check=False)
    assert refused.returncode == 7 and "still the desired version of 1 agent(s) (edge-1)" in (
        refused.stderr
    )
    assert "staged" in hub.cli("models", "versions", "mlp").splitlines()[2]
    # Forced: the agent follows the deployment before it (v1), never keeps installing v2.
    hub.cli("models", "stage", "mlp", "2", "retired", "--force")
    wait_for(lambda: active(agent) == 1, 60, "back to v1, the deployment before the retired one")
