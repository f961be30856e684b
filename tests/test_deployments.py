"""Deployments and the production rule on a real registry, without processes (hub/deployments.py).

The process tests (tests/test_deployments_fleet.py) drive the same code through the CLI and the
admin API; these pin the rules: what decides for whom, what a dry run predicts, what an
undeploy falls back to, when a version may be production.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from modelfleet.hub.deployments import Deployments, current, views
from modelfleet.hub.registry import AGENT_KEY, FailedPreconditionError, Registry
from modelfleet.kernel.errors import InvalidRequestError, ModelNotFoundError


async def _noop() -> None:
    return None


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "r.db", clock=lambda: 1000.0)
    for v in (1, 2, 3):
        reg.add_version(
            name="m",
            version=v,
            sha256=f"{v:064x}",
            size=10,
            notes="",
            target_path=f"m/{v}/bundle.tar",
            signed=True,
            manifest={"model": {"sha256": str(v)}},
        )
    for agent, site in (("b1", "berlin"), ("b2", "berlin"), ("p1", "paris")):
        reg.add_agent(agent, agent, {"site": site}, "fp")
    return reg


def fleet(reg: Registry, rollouts: list[Any] | None = None) -> Deployments:
    return Deployments(reg, _noop, lambda: list(rollouts or []))


def desired(reg: Registry) -> dict[str, int]:
    return {
        a.agent_id: next((d.version for d in reg.desired_for(a.labels, a.agent_id)), 0)
        for a in reg.agents()
    }


def test_views_say_what_decides_for_whom(registry: Registry) -> None:
    registry.deploy("m", 1, {}, actor="admin")
    registry.deploy("m", 2, {"site": "berlin"}, actor="ops")
    registry.deploy_many("m", [("b1", 3)], rollout_id=7)
    rows = registry.deployment_rows()
    shown = views(rows, registry.agents(), registry.retired_versions())
    by = {(v.per_agent, v.row.version): v for v in shown}
    whole, berlin, canary = by[(False, 1)], by[(False, 2)], by[(True, 3)]
    assert whole.agents == ("b1", "b2", "p1") and whole.deciding == ("p1",)
    assert berlin.agents == ("b1", "b2") and berlin.deciding == ("b2",)
    assert berlin.row.actor == "ops" and berlin.row.source == "deploy"
    assert canary.deciding == ("b1",) and canary.row.rollout_id == 7
    assert canary.row.source == "rollout"
    origin = registry.decided_for({"site": "berlin"}, "b1")["m"]
    assert (origin.source, origin.rollout_id, origin.agent_id) == ("rollout", 7, "b1")


def test_deploy_refuses_a_selector_matching_nothing_and_dry_run_writes_nothing(
    registry: Registry,
) -> None:
    d = fleet(registry)
    asyncio.run(d.deploy("m", 1, {}, actor="admin"))
    with pytest.raises(InvalidRequestError, match=r"did you mean site=paris\?.*--allow-empty"):
        asyncio.run(d.deploy("m", 2, {"site": "pariss"}))
    with pytest.raises(InvalidRequestError, match="no active agent has a label 'zone'"):
        asyncio.run(d.deploy("m", 2, {"zone": "a"}))
    revision = registry.revision()
    dry = asyncio.run(d.deploy("m", 2, {"site": "berlin"}, dry_run=True))
    assert dry.revision == 0 and registry.revision() == revision
    assert sorted((c.agent_id, c.before, c.after) for c in dry.changes) == [
        ("b1", 1, 2),
        ("b2", 1, 2),
    ]
    assert desired(registry) == {"b1": 1, "b2": 1, "p1": 1}
    real = asyncio.run(d.deploy("m", 2, {"site": "berlin"}))
    assert [(c.agent_id, c.before, c.after) for c in real.changes] == [
        (c.agent_id, c.before, c.after) for c in dry.changes
    ]
    assert desired(registry) == {"b1": 2, "b2": 2, "p1": 1}
    empty = asyncio.run(d.deploy("m", 3, {"site": "tokyo"}, allow_empty=True))
    assert empty.matched == [] and empty.changes == []


def test_undeploy_falls_back_and_takes_finished_rollout_assignments_along(
    registry: Registry,
) -> None:
    d = fleet(registry)
    asyncio.run(d.deploy("m", 1, {}))
    registry.deploy_many("m", [("b1", 2)], rollout_id=4)  # a finished rollout's wave ...
    registry.deploy("m", 2, {"site": "berlin"}, source="rollout", rollout_id=4)  # ... and end
    assert desired(registry) == {"b1": 2, "b2": 2, "p1": 1}
    revision = registry.revision()
    out = asyncio.run(d.undeploy("m", {"site": "berlin"}, actor="admin"))
    assert out.revision > revision  # a change of desired state like any other
    assert desired(registry) == {"b1": 1, "b2": 1, "p1": 1}  # b1's assignment went too
    assert {(c.agent_id, c.before, c.after) for c in out.changes} == {("b1", 2, 1), ("b2", 2, 1)}
    assert all(c.decided_by is not None and c.decided_by.selector == {} for c in out.changes)
    history = registry.deployment_rows(include_removed=True)
    assert {r.removed_by for r in history if r.removed_at} == {"admin"}
    with pytest.raises(ModelNotFoundError, match=r"no deployment for site=berlin.*\(whole fleet\)"):
        asyncio.run(d.undeploy("m", {"site": "berlin"}))
    gone = asyncio.run(d.undeploy("m", {}))
    assert {c.after for c in gone.changes} == {0} and desired(registry) == dict.fromkeys(
        ("b1", "b2", "p1"), 0
    )
    registry.deploy("m", 3, {})  # the next id is above the removal's revision
    assert registry.revision() == max(r.id for r in registry.deployment_rows())


def test_undeploy_is_refused_while_a_rollout_of_the_model_runs(registry: Registry) -> None:
    registry.deploy("m", 1, {})
    running = SimpleNamespace(id=3, state="baking", spec=SimpleNamespace(model="m", version=2))
    with pytest.raises(FailedPreconditionError, match="rollout 3 of m is in progress"):
        asyncio.run(fleet(registry, [running]).undeploy("m", {}))


def test_production_is_the_version_the_fleet_desires(registry: Registry) -> None:
    d = fleet(registry)
    registry.deploy("m", 1, {})
    registry.set_stage("m", 1, "production")
    registry.deploy("m", 2, {"site": "berlin"})
    with pytest.raises(FailedPreconditionError, match=r"v1 on 1 agent\(s\) \(p1\).*--force"):
        d.check_production("m", 2)
    # A rollout on berlin alone completes: paris still desires v1, so nothing is promoted.
    assert "not marked production" in d.promote_completed("m", 2, {1})
    assert registry.get_version("m", 2).stage == "staged"  # type: ignore[union-attr]
    registry.deploy("m", 2, {})
    d.check_production("m", 2)
    assert d.promote_completed("m", 2, {1}) == "v2 is now production; v1 deprecated"
    assert [v.stage for v in registry.versions("m")] == ["deprecated", "production", "staged"]


def test_rows_from_before_the_hub_recorded_their_source_still_read(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "r.db")
    db.execute(
        "CREATE TABLE deployments (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, "
        "version INTEGER NOT NULL, selector TEXT NOT NULL, created_at REAL NOT NULL)"
    )
    db.execute(
        "INSERT INTO deployments (name, version, selector, created_at) VALUES ('m', 1, '{}', 5)"
    )
    db.execute(
        "INSERT INTO deployments (name, version, selector, created_at) VALUES (?, 2, ?, 6)",
        ("m", f'{{"{AGENT_KEY}": "b1"}}'),
    )
    db.commit()
    db.close()
    reg = Registry(tmp_path / "r.db")
    rows = reg.deployment_rows()
    assert [(r.source, r.agent_id) for r in rows] == [("deploy", ""), ("rollout", "b1")]
    assert reg.revision() == 2 and [r.version for r in current(rows, set())] == [1]


def test_deploy_output_says_none_where_no_version_is_desired_or_served(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """docs/cli.md's `deploy` sample (`none -> v1; serving none`): the rollout view's own
    formatter, which prints `-`, once shadowed this one under the same name."""
    from modelfleet.hub.cli import _print_changes
    from modelfleet.protos import fleet_pb2 as pb

    change = pb.DesiredChange(agent_id="edge-1-abc123", hostname="edge-1", to_version=1)
    _print_changes("fraud", [change], fallback=False)
    assert capsys.readouterr().out == "  edge-1-abc123 (edge-1): none -> v1; serving none\n"


def test_a_comparison_travels_from_the_deployments_log_to_the_agent(registry: Registry) -> None:
    """The contract of a live comparison (issue 15): a prepare row's split and shadow shares
    reach the agent's DesiredModel unchanged, through the hub's and the agent's converters."""
    from modelfleet.agent.fleet.convert import desired_state
    from modelfleet.hub.convert import desired_to_proto

    registry.deploy("m", 1, {})
    registry.deploy(
        "m",
        2,
        {"site": "berlin"},
        kind="prepare",
        split_bp=500,
        sticky=True,
        comparison="experiment 1",
    )
    registry.deploy_many("m", [("p1", 3)], "prepare", shadow_bp=10000, comparison="rollout 4")
    by_agent = {a.agent_id: registry.desired_for(a.labels, a.agent_id) for a in registry.agents()}
    wire = {a: desired_state(desired_to_proto(1, d)).models[0] for a, d in by_agent.items()}
    b1 = wire["b1"]
    assert (b1.version, b1.prepare_version, b1.split_bp, b1.sticky, b1.shadow_bp) == (
        1,
        2,
        500,
        True,
        0,
    )
    assert b1.comparison == "experiment 1"
    p1 = wire["p1"]
    assert (p1.prepare_version, p1.split_bp, p1.shadow_bp, p1.comparison) == (
        3,
        0,
        10000,
        "rollout 4",
    )
    # A newer serve decision ends the comparison.
    registry.deploy("m", 2, {"site": "berlin"})
    after = registry.desired_for({"site": "berlin"}, "b1")[0]
    assert (after.version, after.prepare_version, after.split_bp) == (2, 0, 0)
    with pytest.raises(ValueError, match="basis points"):
        registry.deploy("m", 2, {}, kind="prepare", split_bp=10001)
    with pytest.raises(ValueError, match="kind='prepare'"):
        registry.deploy("m", 2, {}, split_bp=10)
