"""The rollout state machine with a fake fleet: every transition, timeouts, inconclusive bake."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import pytest

from modelfleet.hub.rollouts import Gate, Rollout, Spec, Stats, stable_order, wave_sizes
from modelfleet.kernel.errors import InvalidRequestError


@dataclass
class FakeFleet:
    """Agents switch when assigned (unless told otherwise); telemetry per version is scripted."""

    active: dict[str, int]
    refuse: dict[str, str] = field(default_factory=dict)
    silent: set[str] = field(default_factory=set)
    per_version: dict[int, Stats] = field(default_factory=dict)
    asked: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)
    ready: dict[str, int] = field(default_factory=dict)

    def apply_prepare(self, requests: list[tuple[str, int]]) -> None:
        for agent, version in requests:
            if agent not in self.refuse and agent not in self.silent:
                self.ready[agent] = version

    def prepared(self, agent_id: str, version: int) -> bool:
        return self.ready.get(agent_id) == version

    def apply(self, assignments: list[tuple[str, int]]) -> None:
        for agent, version in assignments:
            if agent not in self.refuse and agent not in self.silent:
                self.active[agent] = version

    def active_version(self, agent_id: str) -> int | None:
        return self.active.get(agent_id)

    def refusal(self, agent_id: str, version: int) -> str | None:
        return self.refuse.get(agent_id)

    def stats(self, version: int, agents: Collection[str], since: float, until: float) -> Stats:
        self.asked.append((version, tuple(sorted(agents))))
        return self.per_version.get(version, Stats())


def spec(**kw: object) -> Spec:
    base = dict(
        model="m",
        version=2,
        selector={},
        waves=["10%", "50%", "100%"],
        bake_s=60,
        gates=["error_rate<0.01", "p99_ms<100", "p99_vs_baseline<1.2"],
        min_requests=100,
        max_failed_agents=0,
        agent_timeout_s=300,
    )
    base.update(kw)
    return Spec(**base)  # type: ignore[arg-type]


AGENTS = [f"a{i}" for i in range(10)]
GOOD = Stats(requests=1000, failures=2, p50_ms=5, p95_ms=8, p99_ms=10)
BASE = Stats(requests=5000, failures=10, p50_ms=5, p95_ms=8, p99_ms=10)


def run(r: Rollout, fleet: FakeFleet, now: float) -> None:
    fleet.apply(r.step(now, fleet))


def test_wave_sizes_and_stable_order() -> None:
    assert wave_sizes(["1%", "10%", "50%", "100%"], 10) == [1, 1, 5, 10]
    assert wave_sizes(["2", "5"], 10) == [2, 5, 10]  # the last wave always takes everyone
    assert stable_order(AGENTS, "m", 2) == stable_order(list(reversed(AGENTS)), "m", 2)
    assert stable_order(AGENTS, "m", 2) != stable_order(AGENTS, "m", 3)


def test_healthy_version_goes_through_every_wave() -> None:
    fleet = FakeFleet({a: 1 for a in AGENTS}, per_version={2: GOOD, 1: BASE})
    r = Rollout.new(1, spec(), AGENTS, {a: 1 for a in AGENTS}, now=0)
    run(r, fleet, 0)
    assert r.state == "switching" and len(r.assigned) == 1
    run(r, fleet, 1)
    assert r.state == "baking"
    run(r, fleet, 30)
    assert r.state == "baking"  # bake not over
    run(r, fleet, 61)
    assert r.wave == 1 and len(r.assigned) == 5
    run(r, fleet, 62)
    run(r, fleet, 123)
    assert r.wave == 2 and len(r.assigned) == 10
    run(r, fleet, 124)
    run(r, fleet, 185)
    assert r.state == "done" and sorted(r.switched) == sorted(AGENTS)
    assert all(v == 2 for v in fleet.active.values())
    # The baseline is the agents still on the previous version.
    assert fleet.asked[1][0] == 1 and len(fleet.asked[1][1]) == 9
    assert r.gate_values[0]["gates"][0] == {
        "gate": "error_rate<0.01",
        "value": 0.002,
        "ok": True,
        "canary": 0.002,
        "baseline": 0.002,
    }


def test_bad_error_rate_is_rolled_back_in_the_first_wave() -> None:
    bad = Stats(requests=500, failures=50, p99_ms=10)
    fleet = FakeFleet({a: 1 for a in AGENTS}, per_version={2: bad, 1: BASE})
    r = Rollout.new(1, spec(), AGENTS, {a: 1 for a in AGENTS}, now=0)
    run(r, fleet, 0)
    run(r, fleet, 1)
    run(r, fleet, 61)
    assert r.state == "rolling_back" and "error_rate=0.1" in r.reason
    canary = r.assigned[0]
    assert fleet.active[canary] == 1  # assigned back to its previous version
    run(r, fleet, 62)
    assert r.state == "rolled_back" and r.finished_at == 62
    assert len(r.assigned) == 1  # never went past the first wave


def test_latency_relative_to_baseline() -> None:
    slow = Stats(requests=1000, failures=0, p99_ms=30)  # 3x the baseline, under 100 ms
    fleet = FakeFleet({a: 1 for a in AGENTS}, per_version={2: slow, 1: BASE})
    r = Rollout.new(1, spec(), AGENTS, {a: 1 for a in AGENTS}, now=0)
    for t in (0, 1, 61):
        run(r, fleet, t)
    assert r.state == "rolling_back" and "p99_vs_baseline=3" in r.reason


def test_too_few_requests_pauses_as_inconclusive_then_resume_bakes_again() -> None:
    quiet = Stats(requests=20, failures=0, p99_ms=5)
    fleet = FakeFleet({a: 1 for a in AGENTS}, per_version={2: quiet, 1: BASE})
    r = Rollout.new(1, spec(), AGENTS, {a: 1 for a in AGENTS}, now=0)
    for t in (0, 1, 61):
        run(r, fleet, t)
    assert r.state == "paused" and r.reason.startswith("inconclusive")
    run(r, fleet, 500)
    assert r.state == "paused"  # waits for the operator, never guesses
    fleet.per_version[2] = GOOD
    r.resume(600)
    assert r.state == "baking" and r.bake_started == 600
    run(r, fleet, 661)
    assert r.wave == 1


def test_agent_refusal_and_timeout_count_against_the_budget() -> None:
    first = stable_order(AGENTS, "m", 2)[0]
    fleet = FakeFleet(
        {a: 1 for a in AGENTS}, refuse={first: "gate: non_finite"}, per_version={2: GOOD, 1: BASE}
    )
    r = Rollout.new(1, spec(), AGENTS, {a: 1 for a in AGENTS}, now=0)
    run(r, fleet, 0)
    run(r, fleet, 1)
    # Nobody switched, so there is nothing to wait for: rolled back at once.
    assert r.state == "rolled_back" and "non_finite" in r.reason
    # A silent agent: nothing for agent_timeout_s, then it counts as failed.
    fleet = FakeFleet({a: 1 for a in AGENTS}, silent={first}, per_version={2: GOOD, 1: BASE})
    r = Rollout.new(
        2, spec(max_failed_agents=0, agent_timeout_s=100), AGENTS, {a: 1 for a in AGENTS}, now=0
    )
    run(r, fleet, 0)
    run(r, fleet, 50)
    assert r.state == "switching"
    run(r, fleet, 101)
    assert r.state == "rolled_back" and "no switch within 100s" in r.reason
    # Within budget: the wave goes on without the silent agent.
    fleet = FakeFleet({a: 1 for a in AGENTS}, silent={first}, per_version={2: GOOD, 1: BASE})
    r = Rollout.new(
        3, spec(max_failed_agents=1, agent_timeout_s=100), AGENTS, {a: 1 for a in AGENTS}, now=0
    )
    for t in (0, 101, 161):
        run(r, fleet, t)
    assert r.wave == 1 and r.failed == {first: "no switch within 100s"}


def test_rollback_completes_even_if_an_agent_never_switches_back() -> None:
    fleet = FakeFleet({a: 1 for a in AGENTS}, per_version={2: Stats(1000, 500, 1, 1, 1)})
    r = Rollout.new(1, spec(agent_timeout_s=50), AGENTS, {a: 1 for a in AGENTS}, now=0)
    for t in (0, 1, 61):
        run(r, fleet, t)
    assert r.state == "rolling_back"
    fleet.active[r.assigned[0]] = 2  # offline agent stuck on v2
    run(r, fleet, 70)
    assert r.state == "rolling_back"
    run(r, fleet, 112)
    assert r.state == "rolled_back" and "had not switched back" in r.events[-1]["text"]


def test_operator_commands() -> None:
    fleet = FakeFleet({a: 1 for a in AGENTS}, per_version={2: GOOD, 1: BASE})
    r = Rollout.new(1, spec(), AGENTS, {a: 1 for a in AGENTS}, now=0)
    run(r, fleet, 0)
    r.pause(5)
    run(r, fleet, 1000)
    assert r.state == "paused"
    r.resume(1000)
    run(r, fleet, 1001)
    assert r.state == "baking"
    fleet.apply(r.promote(1002))
    assert len(r.assigned) == 10 and r.state == "switching"
    run(r, fleet, 1003)
    run(r, fleet, 1064)
    assert r.state == "done"
    with pytest.raises(InvalidRequestError):
        r.abort(1065)
    r2 = Rollout.new(2, spec(), AGENTS, {a: 1 for a in AGENTS}, now=0)
    run(r2, fleet, 0)
    assignments = r2.abort(3)
    assert assignments == [(r2.assigned[0], 1)] and r2.state == "rolling_back"


def test_state_round_trips_through_json() -> None:
    import json

    fleet = FakeFleet({a: 1 for a in AGENTS}, per_version={2: GOOD, 1: BASE})
    r = Rollout.new(1, spec(), AGENTS, {a: 1 for a in AGENTS}, now=0)
    run(r, fleet, 0)
    run(r, fleet, 1)
    again = Rollout.from_json(json.loads(json.dumps(r.to_json())))
    assert again == r
    run(again, fleet, 61)  # a restarted hub continues where it was
    assert again.wave == 1


def test_invalid_specs() -> None:
    with pytest.raises(InvalidRequestError, match="invalid gate"):
        Gate.parse("recall>0.9")
    with pytest.raises(InvalidRequestError, match="invalid wave"):
        Rollout.new(1, spec(waves=["ten"]), AGENTS, {}, now=0)
    with pytest.raises(InvalidRequestError, match="no enrolled agent"):
        Rollout.new(1, spec(), [], {}, now=0)


def test_blue_green_prepares_everyone_then_switches_on_promote() -> None:
    fleet = FakeFleet({a: 1 for a in AGENTS}, per_version={2: GOOD, 1: BASE})
    r = Rollout.new(
        1,
        spec(strategy="blue-green", gates=["error_rate<0.01"]),
        AGENTS,
        {a: 1 for a in AGENTS},
        now=0,
    )

    def tick(t: float) -> None:
        fleet.apply(r.step(t, fleet))
        fleet.apply_prepare(r.prepare_out)
        r.prepare_out = []

    tick(0)
    assert r.state == "preparing" and all(v == 1 for v in fleet.active.values())
    tick(1)
    assert r.state == "ready" and len(r.prepared) == 10
    tick(100)
    assert r.state == "ready"  # waits for the operator
    fleet.apply(r.promote(101))
    assert all(v == 2 for v in fleet.active.values())  # all at once
    tick(102)
    tick(163)
    assert r.state == "done"


def test_blue_green_refused_preparation_rolls_back_without_switching() -> None:
    first = AGENTS[3]
    fleet = FakeFleet({a: 1 for a in AGENTS}, refuse={first: "gate: mismatch"})
    r = Rollout.new(
        1, spec(strategy="blue-green", auto_switch=True), AGENTS, {a: 1 for a in AGENTS}, now=0
    )
    fleet.apply(r.step(0, fleet))
    assert r.state == "rolled_back" and "failed to prepare" in r.reason
    # Preparation was asked for, then withdrawn: the prepared copies are dropped again.
    assert r.prepare_out == [(a, 2) for a in r.agents] + [(a, 0) for a in r.agents]
    assert all(v == 1 for v in fleet.active.values())


def test_refusals_are_classified_by_reported_reason_not_by_text() -> None:
    """An agent's error counts against the version unless its reason is transient (hub
    unreachable, transfer broken, local cache damaged): the words are never read."""
    from types import SimpleNamespace

    from modelfleet.hub.rollout_manager import FleetObserver
    from modelfleet.kernel.errors import TRANSIENT_REASONS
    from modelfleet.kernel.reports import AgentReport, ModelReport

    def observer(error: str, reason: str) -> FleetObserver:
        m = ModelReport("m", desired_version=2, error=error, error_reason=reason)
        report = AgentReport(models=(m,))
        agent = SimpleNamespace(agent_id="a1", report=report)
        core = SimpleNamespace(registry=SimpleNamespace(agents=lambda: [agent]))
        return FleetObserver(core, "m")

    for reason in TRANSIENT_REASONS:
        assert observer("anything at all", reason).refusal("a1", 2) is None
    # Text that mentions "unreachable" but is a verification failure still counts.
    assert observer("signature unreachable?", "verification").refusal("a1", 2)
    assert observer("disk full", "resource_exhausted").refusal("a1", 2) == "disk full"


def test_rollout_status_is_typed_on_the_wire_and_round_trips() -> None:
    """The admin API carries the rollout state as typed fields (no JSON inside protobuf); the
    CLI's one conversion gives back exactly what the engine summarised."""
    from types import SimpleNamespace

    from modelfleet.hub.cli import rollout_dict
    from modelfleet.hub.convert import rollout_to_proto
    from modelfleet.protos import fleet_pb2 as pb

    summary = {
        "id": 3,
        "model": "m",
        "version": 2,
        "state": "baking",
        "wave": 2,
        "waves": [1, 5, 10],
        "agents": 10,
        "assigned": 5,
        "switched": 4,
        "prepared": 0,
        "strategy": "canary",
        "failed": {"edge-9": "did not switch within 600s"},
        "bake_left_s": 12.5,
        "reason": "",
        "gates": ["error_rate<0.01", "p99_vs_baseline<2"],
        "last_evaluation": {
            "wave": 1,
            "at": 1000.0,
            "canary_requests": 40,
            "baseline_requests": 0,
            "gates": [
                {"gate": "error_rate<0.01", "value": 0.0, "ok": True},
                {
                    "gate": "p99_vs_baseline<2",
                    "value": None,
                    "ok": None,
                    "note": "no baseline traffic",
                },
            ],
        },
        "events": [{"at": 990.0, "text": "wave 1/3: 1 agent(s)"}],
        "per_agent": [
            {
                "agent_id": "edge-9",
                "hostname": "edge",
                "role": "canary",
                "wave": 1,
                "previous_version": 1,
                "active_version": 1,
                "state": "failed",
                "last_error": "did not switch within 600s",
            }
        ],
        "warnings": [],
        "selector": {"site": "berlin"},
        "bake_s": 60.0,
        "min_requests": 10,
        "max_failed_agents": 1,
        "agent_timeout_s": 600.0,
        "auto_switch": False,
        "allow_downgrade": True,
        "judge": ["latency", "errors"],
        "max_bake_s": 180.0,
        "traffic": [5, 50, 100],
        "traffic_percent": 50,
        "queued": 2,
        "rate_base": 2.0,
        "rate_factor": 1.5,
        "rate_max": 8.0,
        "abort_failed_pct": 10.0,
        "abort_min_agents": 3,
        "min_labels": 50,
    }
    evaluation = summary["last_evaluation"]
    assert isinstance(evaluation, dict)
    evaluation.update(
        since=940.0,
        canary_failures=0,
        baseline_failures=0,
        canary_agents=4,
        baseline_agents=5,
        baseline_version=1,
        # The statistical judge's verdicts, typed too (None: not a number, e.g. unbounded).
        verdicts=[
            {
                "metric": "latency_p99",
                "verdict": "inconclusive",
                "canary": 12.5,
                "baseline": 11.0,
                "effect": 1.5,
                "low": None,
                "high": None,
                "tolerance": 1.1,
                "canary_samples": 4,
                "baseline_samples": 0,
                "canary_requests": 40,
                "baseline_requests": 0,
                "looks": 3,
                "unit": "ms",
                "why": "interval unbounded straddles the tolerance 1.1 ms: more samples needed",
            }
        ],
        looks=3,
        final=False,
        judge_note="",
    )
    evaluation["gates"][0].update(canary=0.0, baseline=None)
    evaluation["gates"][1].update(canary=12.5, baseline=None)

    def fake(d: dict) -> SimpleNamespace:
        return SimpleNamespace(summary=lambda now, facts: d)

    status = rollout_to_proto(fake(summary), 0.0)
    wire = pb.RolloutStatus.FromString(status.SerializeToString())
    assert rollout_dict(wire) == summary
    fresh = dict(summary, last_evaluation=None, events=[], failed={}, per_agent=[])
    wire = pb.RolloutStatus.FromString(rollout_to_proto(fake(fresh), 0.0).SerializeToString())
    assert rollout_dict(wire) == fresh
