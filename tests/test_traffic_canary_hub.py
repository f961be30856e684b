"""A traffic canary through the hub's real rollout manager, registry and telemetry store, in
process: agents are played by reports that follow each agent's desired state (what a real agent
with traffic split does), and their telemetry by reports into the real DuckDB store. The process
test with real agents is tests/test_experiments_fleet.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from modelfleet.hub.deployments import Deployments
from modelfleet.hub.experiments import Experiments
from modelfleet.hub.registry import FailedPreconditionError, Registry
from modelfleet.hub.rollout_manager import RolloutManager
from modelfleet.hub.rollouts import Spec
from modelfleet.hub.telemetry import TelemetryStore
from modelfleet.kernel.reports import AgentReport, ModelReport
from modelfleet.protos import fleet_pb2 as pb

AGENTS = [f"agent-{i}" for i in range(4)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _noop() -> None:
    return None


@pytest.fixture
def hub(tmp_path: Path) -> Any:
    clock = Clock()
    reg = Registry(tmp_path / "registry.db", clock=clock)
    store = TelemetryStore(tmp_path / "telemetry.duckdb", retention_s=86400, clock=clock)
    for v in (1, 2):
        reg.add_version(
            name="m",
            version=v,
            sha256=f"{v:064x}",
            size=1,
            notes="",
            target_path=f"m/{v}/bundle.tar",
            signed=True,
            manifest={"model": {"sha256": str(v)}},
        )
    for a in AGENTS:
        reg.add_agent(a, a, {"site": "x"}, "fp")
    reg.deploy("m", 1, {})
    core = SimpleNamespace(registry=reg, changed=asyncio.Condition(), telemetry=store)
    core.rollouts = RolloutManager(core, clock=clock)
    core.deployments = Deployments(reg, _noop, core.rollouts.active, clock=clock)
    core.experiments = Experiments(reg, _noop, core.rollouts.active, store, clock=clock)
    h = SimpleNamespace(core=core, reg=reg, store=store, clock=clock, seq={a: 0 for a in AGENTS})
    follow(h)
    yield h
    store.close()
    reg.close()


def desired(h: Any, agent: str) -> Any:
    row = h.reg.agent(agent)
    return next(d for d in h.reg.desired_for(row.labels, agent) if d.name == "m")


def follow(h: Any) -> None:
    """Each agent does what its desired state says and reports it: serve ``version``, hold
    ``prepare_version`` loaded beside it (what the hub reads as prepared)."""
    for a in AGENTS:
        d = desired(h, a)
        h.reg.touch(
            a,
            AgentReport(
                models=(
                    ModelReport(
                        "m",
                        active_version=d.version,
                        previous_version=d.prepare_version,
                        desired_version=d.version,
                    ),
                )
            ),
        )
    h.reg.flush_seen()


def traffic(h: Any, error_rate: dict[int, float], requests: int = 200) -> None:
    """One telemetry interval ending now: each agent's requests split between its versions by
    the share its desired state gives the candidate."""
    for a in AGENTS:
        d = desired(h, a)
        share = d.split_bp / 10000 if d.prepare_version else 0.0
        h.seq[a] += 1
        r = pb.TelemetryReport(seq=h.seq[a], start_unix=h.clock.now - 1, end_unix=h.clock.now)
        for version, n in (
            (d.version, round(requests * (1 - share))),
            (d.prepare_version, round(requests * share)),
        ):
            if not version or not n:
                continue
            failures = round(n * error_rate.get(version, 0.0))
            v = r.versions.add(model="m", version=version, requests=n, failures=failures)
            v.request_latency.bounds.extend([0.001, 0.01])
            v.request_latency.counts.extend([n - failures, 0, 0])
            v.request_latency.count = n - failures
        h.store.ingest(a, [r])


def tick(h: Any, seconds: float = 0.0) -> Any:
    h.clock.now += seconds
    asyncio.run(h.core.rollouts.tick())
    follow(h)
    return h.core.rollouts.get("m")


def start(h: Any, **kw: Any) -> Any:
    base: dict[str, Any] = dict(
        model="m",
        version=2,
        selector={},
        waves=["50%", "100%"],
        bake_s=10,
        gates=["error_rate<0.05"],
        min_requests=5,
        agent_timeout_s=60,
        traffic=[5, 50, 100],
    )
    base.update(kw)
    r = asyncio.run(h.core.rollouts.start(Spec(**base)))
    follow(h)
    return r


def test_higher_error_rate_at_5_percent_rolls_every_agent_back_at_once(hub: Any) -> None:
    r = start(hub)
    wave = list(r.assigned)
    assert len(wave) == 2
    for a in wave:
        d = desired(hub, a)
        assert (d.version, d.prepare_version, d.split_bp) == (1, 2, 500)
        assert d.comparison == f"rollout {r.id}"
    assert all(desired(hub, a).prepare_version == 0 for a in AGENTS if a not in wave)
    r = tick(hub, 1)
    assert r.state == "baking" and r.share() == 5
    for _ in range(5):
        tick(hub, 2)
        traffic(hub, {2: 0.2})  # the candidate fails a fifth of its requests
    r = tick(hub, 1)
    assert r.state in ("rolling_back", "rolled_back") and "error_rate=0.2" in r.reason
    # 0% everywhere at once: no agent is desired to prepare v2 any more.
    for a in AGENTS:
        d = desired(hub, a)
        assert (d.version, d.prepare_version, d.split_bp) == (1, 0, 0)
    assert tick(hub, 1).state == "rolled_back"
    ev = r.gate_values[-1]
    # The baseline is v1 on every agent: the two not assigned and the wave's 95%.
    assert ev["baseline_version"] == 1 and ev["baseline_agents"] == 4


def test_good_version_steps_through_5_50_100_in_two_waves_and_is_deployed(hub: Any) -> None:
    r = start(hub)
    shares = []
    for _ in range(60):  # bounded: 2 waves x 3 steps, a few ticks each
        traffic(hub, {})
        r = tick(hub, 3)
        if r.state == "baking":
            shares.append((r.wave + 1, r.share()))
        if r.state == "done":
            break
    assert r.state == "done", r.events
    assert sorted(set(shares)) == [(1, 5), (1, 50), (1, 100), (2, 5), (2, 50), (2, 100)]
    for a in AGENTS:
        d = desired(hub, a)
        assert (d.version, d.prepare_version) == (2, 0)


def test_rollback_now_from_the_manager(hub: Any) -> None:
    start(hub)
    tick(hub, 1)
    r = asyncio.run(hub.core.rollouts.control("m", "rollback_now"))
    assert r.state == "rolled_back"
    assert all(desired(hub, a).prepare_version == 0 for a in AGENTS)


def test_rollout_and_experiment_refuse_each_other(hub: Any) -> None:
    asyncio.run(hub.core.experiments.start("m", 2, {}, split_percent=10))
    with pytest.raises(FailedPreconditionError, match="experiment 1 of m"):
        start(hub)
    asyncio.run(hub.core.experiments.stop("m"))
    start(hub)
    with pytest.raises(FailedPreconditionError, match="rollout 1 of m is in progress"):
        asyncio.run(hub.core.experiments.start("m", 2, {}, split_percent=10))
