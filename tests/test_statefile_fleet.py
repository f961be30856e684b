"""Desired state as code on a real hub with real agents: `apply`, `diff`, `export` (issue 14: 14).

One hub and three agents for the module; the tests run in order, each starting from the state
the one before left.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from modelfleet.hub.cli import EXIT_STATE_DIFFERS
from tests import models
from tests.procs import ROOT, AgentProcess, HubProcess, agent_status, enroll_agent, wait_for

pytestmark = pytest.mark.process

FAST = {
    "MODELFLEET_AGENT_REPORT_INTERVAL_S": "0.5",
    "MODELFLEET_AGENT_BACKOFF_MAX_S": "1",
    "MODELFLEET_AGENT_TELEMETRY_INTERVAL_S": "1",
}
SITES = {"b1": "site=berlin", "b2": "site=berlin", "p1": "site=paris"}

STATE = """\
version = 1

[[deployment]]
model = "mlp"
version = 1

[[deployment]]
model = "mlp"
version = 2
selector = { site = "berlin" }

[[job]]
name = "nightly"
model = "mlp"
version = "deployed"
cron = "0 2 * * *"
input = "/srv/in/*.parquet"
output = "/srv/out"
selector = { site = "paris" }
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("statefile")
    hub = HubProcess(root / "hub", log_path=root / "hub.log").start()
    agents: dict[str, AgentProcess] = {}
    try:
        for host, labels in SITES.items():
            config = enroll_agent(hub, root / host, labels, hostname=host)
            agent = AgentProcess(
                root / host, fleet_config=config, env=FAST, log_path=root / f"{host}.log"
            )
            agents[host] = agent.start()
        src = root / "onnx"
        hub.cli("publish", "mlp", str(models.mlp(src / "v1.onnx", seed=0)))
        hub.cli("publish", "mlp", str(models.mlp(src / "v2.onnx", seed=1)))
        yield root, hub, agents
    finally:
        for a in agents.values():
            a.stop()
        hub.stop()


def run(hub: HubProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modelfleet.hub.cli", "--data", str(hub.data), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
    )


def active(agent: AgentProcess) -> int:
    try:
        return int(agent_status(agent.admin_socket).get("mlp", {}).get("active_version", 0))
    except Exception:
        return -1


def deployment_rows(hub: HubProcess) -> list[dict]:
    return json.loads(hub.cli("deployments", "ls", "--json"))["deployments"]


def test_a_file_naming_a_missing_version_is_refused_and_changes_nothing(fleet) -> None:
    root, hub, _ = fleet
    bad = root / "bad.toml"
    bad.write_text(STATE.replace("version = 2\n", "version = 9\n") + "retries = 3\n")
    for command in ("apply", "diff"):
        r = run(hub, command, "-f", str(bad))
        assert r.returncode == 3, r.stdout + r.stderr
        assert f"{bad}:7: deployment[2]: mlp has no version 9 (its versions: 1, 2)" in r.stderr
        assert "unknown key 'retries'" in r.stderr
        assert "refused: 2 problem(s); nothing changed" in r.stderr
    assert deployment_rows(hub) == []
    assert json.loads(hub.cli("jobs", "ls", "--json")) == []


def test_diff_shows_the_change_per_agent_then_apply_makes_it_once(fleet) -> None:
    root, hub, agents = fleet
    path = root / "state.toml"
    path.write_text(STATE)
    diff = run(hub, "diff", "-f", str(path))
    assert diff.returncode == EXIT_STATE_DIFFERS, diff.stdout + diff.stderr
    assert "deployment[1] mlp v1 for the whole fleet, now none: would deploy" in diff.stdout
    for host in SITES:
        assert f"({host}): none -> v1" in diff.stdout
    assert "(b1): v1 -> v2" in diff.stdout and "(b2): v1 -> v2" in diff.stdout
    assert "job[1] nightly: would create" in diff.stdout
    as_json = json.loads(run(hub, "diff", "-f", str(path), "--json").stdout)
    assert as_json["changes"] is True and not as_json["problems"]
    assert [d["action"] for d in as_json["deployments"]] == ["deploy", "deploy"]
    assert deployment_rows(hub) == []  # diff wrote nothing

    out = hub.cli("apply", "-f", str(path))
    assert "applied 3 change(s)" in out
    wait_for(lambda: [active(agents[h]) for h in ("b1", "b2", "p1")] == [2, 2, 1], 120, "versions")
    [job] = json.loads(hub.cli("jobs", "ls", "--json"))
    assert job["name"] == "nightly" and job["selector"] == {"site": "paris"}

    rows = deployment_rows(hub)
    again = run(hub, "apply", "-f", str(path))
    assert again.returncode == 0 and "nothing to change" in again.stdout
    assert deployment_rows(hub) == rows
    assert run(hub, "diff", "-f", str(path)).returncode == 0


def test_export_then_apply_from_stdin_is_a_no_op(fleet) -> None:
    _, hub, _ = fleet
    exported = hub.cli("export")
    assert 'model = "mlp"' in exported and "[[job]]" in exported
    rows = deployment_rows(hub)
    r = run(hub, "apply", "-f", "-", "--prune", stdin=exported)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing to change" in r.stdout
    assert run(hub, "diff", "-f", "-", "--prune", stdin=exported).returncode == 0
    assert deployment_rows(hub) == rows
    as_json = json.loads(hub.cli("export", "--json"))
    assert as_json["version"] == 1 and len(as_json["deployment"]) == 2


def test_prune_removes_what_the_file_no_longer_names(fleet) -> None:
    root, hub, agents = fleet
    path = root / "smaller.toml"
    path.write_text('version = 1\n\n[[deployment]]\nmodel = "mlp"\nversion = 1\n')
    kept = run(hub, "diff", "-f", str(path))
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "not in file: mlp v2 for site=berlin: kept" in kept.stdout
    assert "not in file: job nightly: kept" in kept.stdout
    pruned = run(hub, "diff", "-f", str(path), "--prune")
    assert pruned.returncode == EXIT_STATE_DIFFERS and "(b1): v2 -> v1" in pruned.stdout
    hub.cli("apply", "-f", str(path), "--prune")
    wait_for(lambda: all(active(a) == 1 for a in agents.values()), 120, "v1 everywhere")
    assert [d["selector"] for d in deployment_rows(hub)] == [{}]
    assert json.loads(hub.cli("jobs", "ls", "--json")) == []


def test_a_file_naming_a_retired_version_is_refused_and_changes_nothing(fleet) -> None:
    root, hub, _ = fleet
    hub.cli("models", "stage", "mlp", "2", "retired")
    rows = deployment_rows(hub)
    path = root / "state.toml"
    r = run(hub, "apply", "-f", str(path), "--prune")
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"{path}:7: deployment[2]: mlp v2 is retired" in r.stderr
    assert deployment_rows(hub) == rows
    assert json.loads(hub.cli("jobs", "ls", "--json")) == []


def test_a_canary_entry_rolls_out_once(fleet) -> None:
    root, hub, agents = fleet
    hub.cli("publish", "mlp", str(models.mlp(root / "onnx" / "v3.onnx", seed=3)))
    path = root / "canary.toml"
    path.write_text(
        'version = 1\n\n[[deployment]]\nmodel = "mlp"\nversion = 3\nstrategy = "canary"\n'
        'waves = ["34%", "100%"]\nbake = "1s"\nagent_timeout = "60s"\n'
    )
    diff = run(hub, "diff", "-f", str(path))
    assert diff.returncode == EXIT_STATE_DIFFERS, diff.stdout + diff.stderr
    assert "(canary), now v1: would start a rollout" in diff.stdout
    out = hub.cli("apply", "-f", str(path))
    assert "rollout started [rollout " in out
    again = hub.cli("apply", "-f", str(path))  # while it runs, or once it is done
    assert "rollout in progress" in again or "in force" in again
    wait_for(lambda: all(active(a) == 3 for a in agents.values()), 120, "v3 everywhere")
    wait_for(
        lambda: json.loads(hub.cli("rollout", "status", "mlp", "--json"))["state"] == "done",
        60,
        "rollout done",
    )
    done = run(hub, "apply", "-f", str(path))
    assert done.returncode == 0 and "nothing to change" in done.stdout
    assert len(json.loads(hub.cli("rollout", "history", "mlp", "--json"))) == 1
