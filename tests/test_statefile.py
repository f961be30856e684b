"""Desired state as code on a real registry, without processes (hub/statefile.py).

The process tests (tests/test_statefile_fleet.py) drive the same code through the CLI and the
admin API with real agents; these pin the rules: every problem of a file at once, with its
line; nothing changed by a refused file; what the plan does per entry; idempotence; export.
"""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from modelfleet.hub.deployments import Deployments
from modelfleet.hub.jobs import Jobs
from modelfleet.hub.registry import Registry
from modelfleet.hub.rollout_manager import RolloutManager
from modelfleet.hub.statefile import (
    CREATE,
    DELETE,
    DEPLOY,
    HELD,
    IN_PROGRESS,
    KEPT,
    NONE,
    ROLLOUT,
    UNDEPLOY,
    UPDATE,
    Plan,
    StateFiles,
    export,
    parse,
    parse_duration,
)


async def _noop() -> None:
    return None


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "r.db", clock=lambda: 1000.0)
    for name in ("m", "fraud"):
        for v in (1, 2, 3):
            reg.add_version(
                name=name,
                version=v,
                sha256=f"{v:064x}",
                size=10,
                notes="",
                target_path=f"{name}/{v}/bundle.tar",
                signed=True,
                manifest={"model": {"sha256": str(v)}},
            )
    reg.add_version(
        name="m",
        version=4,
        sha256=f"{4:064x}",
        size=10,
        notes="",
        target_path="m/4/bundle.tar",
        signed=False,
        manifest={"model": {"sha256": "4"}},
    )
    reg.set_stage("fraud", 1, "retired")
    for agent, site in (("b1", "berlin"), ("b2", "berlin"), ("p1", "paris")):
        reg.add_agent(agent, agent, {"site": site}, "fp")
    return reg


def files(reg: Registry) -> StateFiles:
    rollouts: list[RolloutManager] = []
    core = SimpleNamespace(registry=reg, changed=asyncio.Condition(), telemetry=None)
    manager = RolloutManager(core, clock=lambda: 1000.0)
    rollouts.append(manager)
    deployments = Deployments(reg, _noop, manager.active)
    core.deployments = deployments
    return StateFiles(reg, deployments, manager, Jobs(reg, _noop))


def plan(reg: Registry, text: str, prune: bool = False) -> Plan:
    return asyncio.run(files(reg).plan(text, prune=prune))


def apply(reg: Registry, text: str, prune: bool = False) -> Plan:
    return asyncio.run(files(reg).apply(text, prune=prune, actor="admin"))


def problems(result: Plan) -> list[str]:
    return [p.text("state.toml") for p in result.problems]


def desired(reg: Registry, model: str = "m") -> dict[str, int]:
    return {
        a.agent_id: next(
            (d.version for d in reg.desired_for(a.labels, a.agent_id) if d.name == model), 0
        )
        for a in reg.agents()
    }


# -- refusals first ---------------------------------------------------------------------------

BAD_FILE = """\
verison = 1

[[deployment]]
model = "m"
version = 2
stratgy = "canary"

[[deployment]]
model = "m"
version = 2
strategy = "canary"
bake = 300
waves = ["50%", "10%"]

[[deployment]]
model = "m"
version = 3
selector = { site = "berlin" }
waves = [1, 2]

[[deployment]]
model = "m"
version = 3
selector = { site = "berlin" }

[[deploymnt]]
model = "x"

[[job]]
name = "nightly"
model = "m"
version = 2
cron = "0 2 * * *"
every = "1h"
input = "/in"
"""


def test_a_bad_file_is_refused_with_every_problem_and_its_line(registry: Registry) -> None:
    before = registry.revision()
    result = apply(registry, BAD_FILE)
    text = "\n".join(problems(result))
    assert not result.applied and not result.deployments and not result.jobs
    # Unknown keys with the close match, on their lines.
    assert "state.toml:1: file: unknown key 'verison' (did you mean 'version'?)" in text
    assert "state.toml:6: deployment[1]: unknown key 'stratgy' (did you mean 'strategy'?)" in text
    assert "state.toml:26: file: unknown key 'deploymnt' (did you mean 'deployment'?)" in text
    assert "no format version: add `version = 1` at the top" in text
    # Durations need a unit, waves must increase, as on the command line.
    assert 'state.toml:12: deployment[2]: bake: 300 has no unit: write "300s"' in text
    assert "state.toml:13: deployment[2]: waves must increase" in text
    # Rollout options on a direct entry, duplicates, and a job with two schedules, no output.
    assert "state.toml:19: deployment[3]: waves is a rollout option" in text
    assert "deployment[4]: m for site=berlin is already declared by deployment[3]" in text
    assert "job[1]: a job needs exactly one of cron" in text
    assert "job[1]: output is required" in text
    assert registry.revision() == before and registry.jobs() == []


def test_a_file_naming_missing_retired_or_unsigned_versions_changes_nothing(
    registry: Registry,
) -> None:
    registry.deploy("m", 1, {})
    before = registry.revision()
    text = """\
version = 1

[[deployment]]
model = "m"
version = 9

[[deployment]]
model = "fraud"
version = 1

[[deployment]]
model = "m"
version = 4
selector = { site = "paris" }

[[deployment]]
model = "frud"
version = 2
selector = { site = "tokyo" }

[[deployment]]
model = "fraud"
version = 2
selector = { site = "berln" }

[[job]]
name = "ok"
model = "m"
version = 2
every = "1h"
input = "/in"
output = "/out"
"""
    result = apply(registry, text)
    got = "\n".join(problems(result))
    assert "state.toml:3: deployment[1]: m has no version 9 (its versions: 1, 2, 3, 4)" in got
    assert "state.toml:7: deployment[2]: fraud v1 is retired" in got
    assert "state.toml:11: deployment[3]: m v4 is not signed yet" in got
    assert "no model named 'frud' (did you mean 'fraud'?)" in got
    assert "did you mean site=berlin?" in got and "allow_empty = true" in got
    assert not result.applied
    # Nothing at all changed, not even the valid job.
    assert registry.revision() == before and registry.jobs() == []
    assert desired(registry) == {"b1": 1, "b2": 1, "p1": 1}


def test_a_downgrade_by_rollout_needs_allow_downgrade(registry: Registry) -> None:
    registry.deploy("m", 3, {})
    text = 'version = 1\n[[deployment]]\nmodel = "m"\nversion = 2\nstrategy = "canary"\n'
    got = "\n".join(problems(plan(registry, text)))
    assert "m v2 is a downgrade" in got and "Set allow_downgrade = true" in got
    ok = plan(registry, text + "allow_downgrade = true\n")
    assert not ok.problems and [a.action for a in ok.deployments] == [ROLLOUT]


def test_durations_need_a_unit() -> None:
    assert parse_duration("90s") == 90 and parse_duration("5m") == 300
    assert parse_duration("1h") == 3600 and parse_duration("1d") == 86400
    for bad in (300, "300", "5 minutes", "5x", True):
        with pytest.raises(ValueError):
            parse_duration(bad)
    _, found = parse(
        'version = 1\n[[deployment]]\nmodel = "m"\nversion = 2\nstrategy = "canary"\n'
        'waves = ["10", "50%"]\n'
    )
    assert 'wave "10" is ambiguous: write "10%"' in found[0].message


# -- plans and idempotence --------------------------------------------------------------------

DIRECT = """\
version = 1

[[deployment]]
model = "m"
version = 1

[[deployment]]
model = "m"
version = 2
selector = { site = "berlin" }

[[job]]
name = "nightly"
model = "m"
version = "deployed"
cron = "0 2 * * *"
input = "/data/in/*.parquet"
output = "/data/out"
selector = { site = "paris" }
"""


def test_apply_deploys_what_the_file_declares_and_twice_changes_nothing(
    registry: Registry,
) -> None:
    planned = plan(registry, DIRECT)
    assert not planned.problems and planned.changes
    whole, berlin = planned.deployments
    assert whole.action == berlin.action == DEPLOY
    # Each entry's per-agent changes, as the entries before it leave the fleet.
    assert {(c.agent_id, c.before, c.after) for c in whole.changes} == {
        ("b1", 0, 1),
        ("b2", 0, 1),
        ("p1", 0, 1),
    }
    assert {(c.agent_id, c.before, c.after) for c in berlin.changes} == {("b1", 1, 2), ("b2", 1, 2)}
    assert [j.action for j in planned.jobs] == [CREATE]
    assert registry.revision() == 0  # a plan writes nothing

    done = apply(registry, DIRECT)
    assert done.applied and all(a.revision for a in done.deployments)
    assert desired(registry) == {"b1": 2, "b2": 2, "p1": 1}
    [job] = registry.jobs()
    assert (job.spec.version, job.spec.schedule, job.selector) == (
        0,
        "0 2 * * *",
        {"site": "paris"},
    )

    revision = registry.revision()
    again = apply(registry, DIRECT)
    assert not again.changes and not again.applied
    assert [a.action for a in again.deployments] == [NONE, NONE]
    assert [j.action for j in again.jobs] == [NONE]
    assert registry.revision() == revision and len(registry.deployment_rows()) == 2


def test_later_entries_win_where_selectors_overlap(registry: Registry) -> None:
    # The log has berlin v2, then whole-fleet v1 (which now decides berlin too); the file says
    # berlin v2 comes after: the berlin entry is written again, so it decides.
    registry.deploy("m", 2, {"site": "berlin"})
    registry.deploy("m", 1, {})
    assert desired(registry) == {"b1": 1, "b2": 1, "p1": 1}
    result = plan(registry, DIRECT.split("[[job]]")[0])
    assert [a.action for a in result.deployments] == [NONE, DEPLOY]
    apply(registry, DIRECT.split("[[job]]")[0])
    assert desired(registry) == {"b1": 2, "b2": 2, "p1": 1}
    assert not plan(registry, DIRECT.split("[[job]]")[0]).changes


CANARY = """\
version = 1

[[deployment]]
model = "m"
version = 2
strategy = "canary"
waves = ["50%", "100%"]
bake = "1m"
gates = ["error_rate<0.01"]
min_requests = 10
agent_timeout = "2m"
"""


def test_a_canary_entry_starts_one_rollout_and_leaves_it_alone(registry: Registry) -> None:
    registry.deploy("m", 1, {})
    first = apply(registry, CANARY)
    [action] = first.deployments
    assert action.action == ROLLOUT and action.rollout_id
    [row] = registry.rollouts("m")
    assert row["data"]["spec"]["waves"] == ["50%", "100%"]
    assert row["data"]["spec"]["bake_s"] == 60 and row["data"]["spec"]["min_requests"] == 10
    # Applied again while it runs: left alone, no second rollout.
    again = apply(registry, CANARY)
    assert [a.action for a in again.deployments] == [IN_PROGRESS] and not again.changes
    assert len(registry.rollouts("m")) == 1
    # Another version for the model while it runs: refused, nothing changes.
    other = apply(registry, CANARY.replace("version = 2", "version = 3"))
    assert "rollout 1 of m (v2 to the whole fleet) is in progress" in problems(other)[0]


def test_a_canary_entry_whose_version_is_desired_is_not_rolled_out(registry: Registry) -> None:
    registry.deploy("m", 2, {"site": "berlin"})
    registry.deploy("m", 2, {"site": "paris"})
    result = apply(registry, CANARY)
    action, *kept = result.deployments
    assert [k.action for k in kept] == [KEPT, KEPT]
    assert action.action == DEPLOY and "no rollout needed" in action.reason
    assert registry.rollouts("m") == []
    assert not plan(registry, CANARY).changes


def test_a_rolled_back_rollout_is_not_restarted(registry: Registry) -> None:
    registry.deploy("m", 1, {})
    apply(registry, CANARY)
    fs = files(registry)
    asyncio.run(fs.rollouts.control("m", "abort"))
    result = plan(registry, CANARY)
    [action] = result.deployments
    assert action.action == HELD and "rolled back" in action.reason and not result.changes


def test_prune_removes_what_the_file_no_longer_names(registry: Registry) -> None:
    apply(registry, DIRECT)
    registry.deploy("fraud", 2, {"site": "paris"})
    smaller = 'version = 1\n[[deployment]]\nmodel = "m"\nversion = 1\n'
    kept = plan(registry, smaller)
    assert [a.action for a in kept.deployments] == [NONE, KEPT, KEPT]
    assert [j.action for j in kept.jobs] == [KEPT] and not kept.changes
    pruned = plan(registry, smaller, prune=True)
    assert [a.action for a in pruned.deployments] == [NONE, UNDEPLOY, UNDEPLOY]
    berlin = pruned.deployments[1]
    assert {(c.agent_id, c.before, c.after) for c in berlin.changes} == {("b1", 2, 1), ("b2", 2, 1)}
    assert [j.action for j in pruned.jobs] == [DELETE]
    apply(registry, smaller, prune=True)
    assert desired(registry) == {"b1": 1, "b2": 1, "p1": 1}
    assert desired(registry, "fraud") == {"b1": 0, "b2": 0, "p1": 0}
    assert registry.jobs() == []
    assert not plan(registry, smaller, prune=True).changes


def test_a_changed_job_is_updated(registry: Registry) -> None:
    apply(registry, DIRECT)
    changed = DIRECT.replace('cron = "0 2 * * *"', 'every = "30m"') + "paused = true\n"
    result = plan(registry, changed)
    [job] = result.jobs
    assert job.action == UPDATE and job.fields == ["schedule", "paused"]
    apply(registry, changed)
    [row] = registry.jobs()
    assert (row.spec.schedule, row.spec.paused) == ("every 1800s", True)


def test_export_then_apply_changes_nothing(registry: Registry) -> None:
    apply(registry, DIRECT)
    registry.deploy("fraud", 3, {"site": "tokyo", "rack": 'a "b"'})  # matches no agent
    asyncio.run(
        files(registry).jobs.create(
            replace_spec(name="odd", sql="SELECT *\nFROM input WHERE s = 'x\"y'", every=90),
            {"site": "berlin"},
        )
    )
    fs = files(registry)
    text = export(fs.state(), "hub:7443")
    tomllib.loads(text)
    revision = registry.revision()
    result = apply(registry, text, prune=True)
    assert not result.problems, problems(result)
    assert not result.changes and registry.revision() == revision
    assert "allow_empty = true" in text and 'every = "90s"' in text


def replace_spec(name: str, sql: str, every: int):
    from modelfleet.kernel.jobs import JobSpec

    return JobSpec(
        name=name,
        model="m",
        version=2,
        schedule=f"every {every}s",
        input="/in",
        output="/out",
        sql=sql,
        keys="id",
    )


def test_one_rollout_per_model_and_no_prune_while_one_runs(registry: Registry) -> None:
    registry.deploy("m", 1, {})
    registry.deploy("fraud", 2, {"site": "paris"})
    entry = CANARY.split("\n", 2)[2]
    two = "version = 1\n" + "".join(
        entry.replace("version = 2", f'version = 2\nselector = {{ site = "{site}" }}')
        for site in ("berlin", "paris")
    )
    got = "\n".join(problems(plan(registry, two)))
    assert "deployment[2]: deployment[1] already starts a rollout of m" in got
    got = "\n".join(problems(plan(registry, CANARY + entry.replace("version = 2", "version = 3"))))
    assert "deployment[2]: this entry would change agents of the rollout deployment[1]" in got
    direct_after = (
        CANARY + '\n[[deployment]]\nmodel = "m"\nversion = 3\nselector = { site = "paris" }\n'
    )
    got = "\n".join(problems(plan(registry, direct_after)))
    assert "would change agents of the rollout deployment[1] starts" in got
    apply(registry, CANARY)
    running = plan(registry, CANARY.replace('model = "m"', 'model = "fraud"'), prune=True)
    assert "not in the file, but rollout 1 of m is in progress" in "\n".join(problems(running))


def test_an_unreadable_file_exits_3_before_any_connection(tmp_path: Path, capsys) -> None:
    from modelfleet.hub.cli import main

    code = main(["--data", str(tmp_path), "diff", "-f", str(tmp_path / "missing.toml")])
    assert code == 3
    assert "cannot read the state file" in capsys.readouterr().err
