"""Traffic canaries, pacing and abort criteria of the rollout state machine (fake fleet, fake
clock): failures first, then the paths that complete."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import pytest

from modelfleet.hub.rollouts import Rollout, Spec, Stats, parse_traffic
from modelfleet.kernel.errors import InvalidRequestError

AGENTS = [f"a{i}" for i in range(10)]
GOOD = Stats(requests=1000, failures=2, p50_ms=5, p95_ms=8, p99_ms=10)
BASE = Stats(requests=5000, failures=10, p50_ms=5, p95_ms=8, p99_ms=10)
BAD = Stats(requests=500, failures=50, p50_ms=5, p95_ms=8, p99_ms=10)


@dataclass
class SplitFleet:
    """Agents load a split candidate and switch on a serve row, unless told otherwise; the
    fleet keeps the share each agent was last given (what the registry's rows would say)."""

    active: dict[str, int]
    refuse: dict[str, str] = field(default_factory=dict)
    silent: set[str] = field(default_factory=set)
    per_version: dict[int, Stats] = field(default_factory=dict)
    loaded: dict[str, int] = field(default_factory=dict)
    split: dict[str, int] = field(default_factory=dict)  # agent -> basis points
    serve_rows: list[tuple[str, int]] = field(default_factory=list)
    asked: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)

    def apply(self, r: Rollout, assignments: list[tuple[str, int]]) -> None:
        splits, r.split_out = r.split_out, []
        for agent, version, bp in splits:
            self.split[agent] = bp
            if agent not in self.refuse and agent not in self.silent:
                self.loaded[agent] = version
        for agent, version in assignments:
            self.serve_rows.append((agent, version))
            # A serve row supersedes the split (hub.registry.decide).
            self.split[agent] = 0
            if agent not in self.refuse and agent not in self.silent:
                self.active[agent] = version

    def active_version(self, agent_id: str) -> int | None:
        return self.active.get(agent_id)

    def refusal(self, agent_id: str, version: int) -> str | None:
        return self.refuse.get(agent_id)

    def prepared(self, agent_id: str, version: int) -> bool:
        return self.loaded.get(agent_id) == version

    def stats(self, version: int, agents: Collection[str], since: float, until: float) -> Stats:
        self.asked.append((version, tuple(sorted(agents))))
        return self.per_version.get(version, Stats())


def spec(**kw: object) -> Spec:
    base = dict(
        model="m",
        version=2,
        selector={},
        waves=["100%"],
        bake_s=60,
        gates=["error_rate<0.01"],
        min_requests=100,
        agent_timeout_s=300,
        traffic=[5, 25, 50, 100],
    )
    base.update(kw)
    return Spec(**base)  # type: ignore[arg-type]


def run(r: Rollout, fleet: SplitFleet, now: float) -> None:
    fleet.apply(r, r.step(now, fleet))


def roundtrip(r: Rollout) -> Rollout:
    """What the manager does between ticks: the state lives as JSON in the registry."""
    return Rollout.from_json(r.to_json())


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5,25,50", "must end at 100"),
        ("25,5,100", "must increase"),
        ("5,5,100", "must increase"),
        ("0,100", "from 1 to 100"),
        ("5,150", "from 1 to 100"),
        ("five,100", "invalid traffic step 'five'"),
        ("", "at least one step"),
    ],
)
def test_invalid_traffic_steps_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        parse_traffic(text)


def test_traffic_with_blue_green_and_bad_pacing_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="blue-green"):
        spec(strategy="blue-green").validate()
    with pytest.raises(InvalidRequestError, match=r"--rate-factor 0\.5 must be >= 1"):
        spec(rate_base=1, rate_factor=0.5).validate()
    with pytest.raises(InvalidRequestError, match="--rate-base and --rate-max must be >= 0"):
        spec(rate_base=-1).validate()
    with pytest.raises(InvalidRequestError, match="--abort-failed-pct 120 is out of range"):
        spec(abort_failed_pct=120).validate()
    with pytest.raises(InvalidRequestError, match="--abort-min-agents must be >= 1"):
        spec(abort_failed_pct=10, abort_min_agents=0).validate()
    assert parse_traffic("5%, 25,100") == [5, 25, 100]


# -- traffic canary: failures -----------------------------------------------------------------


def test_worse_error_rate_at_5_percent_returns_every_agent_to_0_percent_at_once() -> None:
    fleet = SplitFleet({a: 1 for a in AGENTS}, per_version={2: BAD, 1: BASE})
    r = Rollout.new(1, spec(waves=["20%", "100%"]), AGENTS, {a: 1 for a in AGENTS}, now=0)
    run(r, fleet, 0)
    wave = list(r.assigned)
    assert len(wave) == 2 and r.state == "switching"
    assert all(fleet.split[a] == 500 for a in wave)  # 5% in basis points
    assert fleet.serve_rows == []  # the candidate is loaded beside v1, not switched to
    run(r, fleet, 1)
    assert r.state == "baking" and r.summary(1)["traffic_percent"] == 5
    r = roundtrip(r)
    run(r, fleet, 61)
    # The agents never served v2 alone: back at once, nothing to wait for.
    assert r.state == "rolled_back" and "error_rate=0.1" in r.reason
    # At once: serve rows of v1 for the wave's agents, no waiting for another analysis.
    assert sorted(fleet.serve_rows) == sorted((a, 1) for a in wave)
    assert all(fleet.split[a] == 0 for a in wave)
    # The baseline was v1 on the agents not assigned and on the wave's own agents (their 95%).
    assert fleet.asked[-1] == (1, tuple(sorted(AGENTS)))
    assert all(v == 1 for v in fleet.active.values())


def test_agent_that_cannot_load_the_candidate_fails_the_split() -> None:
    order = Rollout.new(1, spec(), AGENTS, {a: 1 for a in AGENTS}, now=0).agents
    fleet = SplitFleet({a: 1 for a in AGENTS}, refuse={order[0]: "health gate (non_finite): y"})
    r = Rollout.new(
        1, spec(waves=["1", "10"], traffic=[10, 100]), AGENTS, {a: 1 for a in AGENTS}, 0
    )
    run(r, fleet, 0)
    run(r, fleet, 1)
    assert r.state == "rolled_back"
    assert "1 agent(s) failed (budget 0)" in r.reason and "non_finite" in r.reason


def test_silent_agent_times_out_as_not_loaded() -> None:
    order = Rollout.new(1, spec(), AGENTS, {a: 1 for a in AGENTS}, now=0).agents
    fleet = SplitFleet({a: 1 for a in AGENTS}, silent={order[0]})
    r = Rollout.new(1, spec(waves=["1", "10"]), AGENTS, {a: 1 for a in AGENTS}, now=0)
    run(r, fleet, 0)
    run(r, fleet, 200)
    assert r.state == "switching"
    run(r, fleet, 301)
    assert r.state == "rolled_back" and "not loaded within 300s" in r.reason


def test_rollback_now_ends_at_once_without_waiting_for_agents() -> None:
    fleet = SplitFleet({a: 1 for a in AGENTS}, per_version={2: GOOD, 1: BASE})
    r = Rollout.new(1, spec(waves=["20%", "100%"]), AGENTS, {a: 1 for a in AGENTS}, now=0)
    run(r, fleet, 0)
    run(r, fleet, 1)
    run(r, fleet, 61)  # 5% passed: 25% now
    assert r.state == "baking" and r.share() == 25
    wave = list(r.assigned)
    assert all(fleet.split[a] == 2500 for a in wave)
    fleet.apply(r, r.rollback_now(70))
    assert r.state == "rolled_back" and r.finished_at == 70
    assert all(fleet.split[a] == 0 for a in wave)
    assert sorted(fleet.serve_rows) == sorted((a, 1) for a in wave)
    with pytest.raises(InvalidRequestError, match="already rolled_back"):
        r.rollback_now(71)


# -- traffic canary: success ------------------------------------------------------------------


def test_good_version_steps_5_25_50_100_in_each_wave_then_completes() -> None:
    fleet = SplitFleet({a: 1 for a in AGENTS}, per_version={2: GOOD, 1: BASE})
    r = Rollout.new(1, spec(waves=["20%", "100%"]), AGENTS, {a: 1 for a in AGENTS}, now=0)
    shares = []
    t = 0.0
    for _ in range(40):  # bounded: two waves of four steps, two ticks a step
        run(r, fleet, t)
        r = roundtrip(r)
        if r.state == "baking":
            shares.append((r.wave + 1, r.share()))
        if r.state == "done":
            break
        t += 31
    assert r.state == "done"
    assert sorted(set(shares)) == [(w, s) for w in (1, 2) for s in (5, 25, 50, 100)]
    assert all(v == 2 for v in fleet.active.values())
    # Each agent got one serve row of v2 (at its wave's 100%), never a rollback.
    assert sorted(fleet.serve_rows) == sorted((a, 2) for a in AGENTS)
    texts = [e["text"] for e in r.events]
    assert any("answers 25% of requests" in x for x in texts)
    assert any("100% of requests: switching" in x for x in texts)


def test_promote_during_a_split_switches_the_wave_and_the_rest() -> None:
    fleet = SplitFleet({a: 1 for a in AGENTS}, per_version={2: GOOD, 1: BASE})
    r = Rollout.new(1, spec(waves=["20%", "100%"]), AGENTS, {a: 1 for a in AGENTS}, now=0)
    run(r, fleet, 0)
    run(r, fleet, 1)
    fleet.apply(r, r.promote(10))
    assert sorted(fleet.serve_rows) == sorted((a, 2) for a in AGENTS)
    run(r, fleet, 11)
    run(r, fleet, 72)
    assert r.state == "done"


def test_inconclusive_step_pauses_and_resumes_on_the_same_share() -> None:
    fleet = SplitFleet({a: 1 for a in AGENTS}, per_version={2: Stats(requests=3), 1: BASE})
    r = Rollout.new(1, spec(), AGENTS, {a: 1 for a in AGENTS}, now=0)
    run(r, fleet, 0)
    run(r, fleet, 1)
    run(r, fleet, 62)
    assert r.state == "paused" and "inconclusive" in r.reason and r.share() == 5
    r.resume(100)
    fleet.per_version[2] = GOOD
    run(r, fleet, 161)
    assert r.state == "baking" and r.share() == 25


def test_status_shows_the_step_and_per_agent_split() -> None:
    fleet = SplitFleet({a: 1 for a in AGENTS}, per_version={2: GOOD, 1: BASE})
    r = Rollout.new(1, spec(waves=["20%", "100%"]), AGENTS, {a: 1 for a in AGENTS}, now=0)
    run(r, fleet, 0)
    states = {a["agent_id"]: a["state"] for a in r.per_agent({})}
    assert sorted(states.values()).count("loading") == 2
    run(r, fleet, 1)
    d = r.summary(1, {})
    assert d["traffic"] == [5, 25, 50, 100] and d["traffic_percent"] == 5
    assert sorted(a["state"] for a in d["per_agent"]).count("split 5%") == 2


# -- pacing and abort criteria ----------------------------------------------------------------


def test_abort_when_failed_share_passes_the_threshold_after_the_minimum() -> None:
    order = Rollout.new(1, spec(), AGENTS, {a: 1 for a in AGENTS}, now=0).agents
    refuse = {a: "health gate (non_finite): y" for a in order[:4]}
    fleet = SplitFleet({a: 1 for a in AGENTS}, refuse=refuse)
    s = spec(traffic=[], gates=[], abort_failed_pct=30, abort_min_agents=5, max_failed_agents=0)
    r = Rollout.new(1, s, AGENTS, {a: 1 for a in AGENTS}, now=0)
    run(r, fleet, 0)
    run(r, fleet, 1)
    assert r.state == "rolling_back"  # the six that switched are sent back to v1
    assert "4 of 10 agent(s) failed (40% > --abort-failed-pct 30" in r.reason


def test_failed_share_under_the_threshold_goes_on() -> None:
    order = Rollout.new(1, spec(), AGENTS, {a: 1 for a in AGENTS}, now=0).agents
    fleet = SplitFleet({a: 1 for a in AGENTS}, refuse={order[0]: "gate"}, per_version={2: GOOD})
    s = spec(traffic=[], gates=[], min_requests=0, abort_failed_pct=20, abort_min_agents=3)
    r = Rollout.new(1, s, AGENTS, {a: 1 for a in AGENTS}, now=0)
    run(r, fleet, 0)
    run(r, fleet, 1)
    assert r.state == "baking"  # 1 of 10 failed: 10% <= 20%
    run(r, fleet, 62)
    assert r.state == "done"


def test_below_the_minimum_count_no_abort_yet() -> None:
    order = Rollout.new(1, spec(), AGENTS, {a: 1 for a in AGENTS}, now=0).agents
    fleet = SplitFleet({a: 1 for a in AGENTS}, refuse={order[0]: "gate"}, silent=set(order[1:]))
    s = spec(traffic=[], gates=[], abort_failed_pct=10, abort_min_agents=5)
    r = Rollout.new(1, s, AGENTS, {a: 1 for a in AGENTS}, now=0)
    run(r, fleet, 0)
    run(r, fleet, 1)
    assert r.state == "switching"  # 1 of 1 resolved failed, but fewer than 5 resolved


def test_exponential_rate_assigns_batches_a_minute_apart() -> None:
    agents = [f"a{i}" for i in range(20)]
    fleet = SplitFleet({a: 1 for a in agents}, per_version={2: GOOD})
    s = spec(traffic=[], gates=[], min_requests=0, rate_base=2, rate_factor=2, rate_max=5)
    r = Rollout.new(1, s, agents, {a: 1 for a in agents}, now=0)
    run(r, fleet, 0)
    assert len(r.assigned) == 2 and len(r.queued) == 18  # batch 1: 2 agents
    run(r, fleet, 30)
    assert len(r.assigned) == 2  # a minute between batches
    r = roundtrip(r)
    run(r, fleet, 60)
    assert len(r.assigned) == 6  # batch 2: 2 * 2
    run(r, fleet, 120)
    assert len(r.assigned) == 11  # batch 3: min(8, max 5)
    assert r.state == "switching"
    for t in (180, 240, 300):
        run(r, fleet, t)
    assert len(r.assigned) == 20 and not r.queued
    assert r.state == "baking"
    assert {a["state"] for a in r.per_agent({})} == {"switched"}


def test_paced_agents_time_out_from_their_own_assignment() -> None:
    agents = [f"a{i}" for i in range(4)]
    s = spec(traffic=[], gates=[], agent_timeout_s=90, rate_base=1, rate_factor=1)
    r = Rollout.new(1, s, agents, {a: 1 for a in agents}, now=0)
    fleet = SplitFleet({a: 1 for a in agents}, silent={r.agents[3]})
    for t in (0, 60, 120, 180):
        run(r, fleet, t)
    assert r.state == "switching"  # the last one was assigned at 180: not late at 180 + 60
    run(r, fleet, 240)
    assert r.state == "switching"
    run(r, fleet, 271)
    assert r.state == "rolling_back" and "no switch within 90s" in r.reason


def test_old_rollout_json_without_the_new_fields_loads() -> None:
    r = Rollout.new(1, spec(traffic=[]), AGENTS, {a: 1 for a in AGENTS}, now=0)
    data = r.to_json()
    for key in ("traffic_step", "split_out", "queued", "batches", "batch_at", "assigned_at"):
        data.pop(key)
    for key in ("traffic", "rate_base", "rate_factor", "rate_max", "abort_failed_pct"):
        data["spec"].pop(key)
    data["spec"].pop("abort_min_agents")
    old = Rollout.from_json(data)
    assert old.share() == 100 and old.summary(0)["traffic_percent"] == 0


def test_status_message_and_text_show_the_traffic_step() -> None:
    from modelfleet.hub.cli import _render_rollout, rollout_dict
    from modelfleet.hub.convert import rollout_to_proto

    fleet = SplitFleet({a: 1 for a in AGENTS}, per_version={2: GOOD, 1: BASE})
    s = spec(waves=["20%", "100%"], rate_base=5, rate_max=50, abort_failed_pct=10)
    r = Rollout.new(1, s, AGENTS, {a: 1 for a in AGENTS}, now=0)
    run(r, fleet, 0)
    run(r, fleet, 1)
    msg = rollout_to_proto(r, 1, {})
    d = rollout_dict(msg)
    assert d["traffic"] == [5, 25, 50, 100] and d["traffic_percent"] == 5
    assert d["rate_base"] == 5 and d["abort_failed_pct"] == 10
    text = _render_rollout(msg)
    assert "traffic canary 5,25,50,100: wave 1 at 5% of its requests on v2" in text
    assert "pacing 5 agent(s) in the first minute, x2 each minute, at most 50/min" in text
    assert "abort when more than 10% of the agents failed, after 1 resolved" in text


def test_traffic_canary_on_agents_without_the_model_is_refused() -> None:
    from modelfleet.hub.rollouts import RolloutRefusedError, check_target

    with pytest.raises(RolloutRefusedError, match=r"1 of the 2 agent\(s\) of the fleet run no"):
        check_target(spec(), {"a1": (1, 1), "a2": (0, 0)})
    check_target(spec(traffic=[]), {"a1": (1, 1), "a2": (0, 0)})  # a plain rollout installs it
