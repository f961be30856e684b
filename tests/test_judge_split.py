"""The judge on a split (a traffic canary's step, an A/B experiment): both arms served by the same
agents at the same moments, compared pair by pair (``judge(paired=True)``).

Simulated fleets go through the hub's own histogram bounds and quantile code, so a window's
p99 is what the hub would compute from an agent's report. Every agent-window carries a load
factor shared by both arms (the device's speed, and the moment's load on it: a scheduler's bad
second slows both arms of that agent alike); the pairing must cancel it.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import numpy as np
import pytest

from modelfleet.hub.judge import (
    DEFAULT_JUDGE,
    METRICS,
    AgentWindow,
    combined,
    judge,
    parse_metrics,
    sign_test_bound,
)
from modelfleet.hub.telemetry import TelemetryStore, percentile
from modelfleet.kernel.telemetry_bounds import LATENCY_BOUNDS

BOUNDS = np.array(LATENCY_BOUNDS)
SPECS = parse_metrics(list(DEFAULT_JUDGE))
P50, P99, ERRORS = METRICS["latency_p50"], METRICS["latency_p99"], METRICS["errors"]


def _arm(
    rng: np.random.Generator, requests: int, median_ms: float, factor: float, error_rate: float
) -> tuple[int, dict[str, float]]:
    lat = rng.lognormal(math.log(median_ms / 1000), 0.35, requests)
    tail = rng.random(requests) < 0.03
    lat[tail] *= 1 + rng.pareto(2.5, int(tail.sum()))
    lat *= factor
    failures = int(rng.binomial(requests, error_rate))
    counts = list(
        np.bincount(np.searchsorted(BOUNDS, lat[: requests - failures]), minlength=len(BOUNDS) + 1)
    )
    q = {
        name: percentile(counts, LATENCY_BOUNDS, p) * 1000
        for name, p in (("latency_p50", 0.5), ("latency_p99", 0.99))
    }
    return failures, q


def split_windows(
    rng: np.random.Generator,
    *,
    agents: int = 4,
    windows: int = 30,
    requests: int = 200,
    median_ms: float = 20.0,
    scale: float = 1.0,
    candidate_errors: float = 0.005,
    active_errors: float = 0.005,
    load_sd: float = 0.3,
) -> list[tuple[AgentWindow, AgentWindow]]:
    """Per window, in time order, every agent's (candidate, active) pair over the same span."""
    speeds = np.exp(rng.normal(0, 0.3, agents))
    out = []
    for t in range(windows):
        for a in range(agents):
            load = float(speeds[a]) * math.exp(rng.normal(0, load_sd))
            cf, cq = _arm(rng, requests, median_ms, load * scale, candidate_errors)
            bf, bq = _arm(rng, requests, median_ms, load, active_errors)
            out.append(
                (
                    AgentWindow(f"d{a}", t, t + 1, requests, cf, cq),
                    AgentWindow(f"d{a}", t, t + 1, requests, bf, bq),
                )
            )
    return out


def sequential(
    pairs: list[tuple[AgentWindow, AgentWindow]], per_look: int = 4
) -> tuple[str, int, list[str]]:
    """Look after every ``per_look`` pairs, as the rollout engine does every few seconds: the
    first combined verdict that is not inconclusive, the pairs it took, per-metric verdicts."""
    verdicts: list[str] = []
    for n in range(per_look, len(pairs) + 1, per_look):
        c = [p[0] for p in pairs[:n]]
        b = [p[1] for p in pairs[:n]]
        got = judge(c, b, SPECS, looks=n // per_look, paired=True)
        verdicts = [f"{v.metric} {v.verdict}" for v in got]
        if combined(got) != "inconclusive":
            return combined(got), n, verdicts
    return "inconclusive", len(pairs), verdicts


# -- the always-valid sign test ----------------------------------------------------------------


def test_sign_test_needs_eight_pairs_and_stays_valid_over_every_look() -> None:
    # 2**n / (n + 1) < 20 below eight pairs: nothing can be excluded, whatever they say.
    assert [sign_test_bound(n, 0.05) for n in range(8)] == [0] * 8
    assert sign_test_bound(8, 0.05) == 1 and sign_test_bound(12, 0.05) == 2
    bounds = [sign_test_bound(n, 0.05) for n in range(1, 400)]
    assert all(b2 >= b1 for b1, b2 in itertools.pairwise(bounds))
    assert 0.35 < bounds[-1] / 399 < 0.5  # the interval narrows towards the median
    # Under the hypothesis (fair signs), looking after every pair up to 400: the share of runs
    # in which the median is ever excluded stays under alpha.
    rng = np.random.default_rng(3)
    above = np.cumsum(rng.random((4000, 399)) < 0.5, axis=1)
    n = np.arange(1, 400)
    j = np.array(bounds)
    excluded = ((above < j) | (n - above < j)).any(axis=1)
    assert excluded.mean() <= 0.05


@pytest.mark.parametrize("noise", ["normal", "stalls"])
def test_a_candidate_at_the_tolerance_fails_no_more_often_than_alpha(noise: str) -> None:
    """The hardest case for a false rollback: the candidate truly slower by exactly the
    tolerance (no histogram here: the ratio is exact). Looked at every 4 pairs up to 160, a
    fail must come in at most alpha of the runs, with log ratios normal or, as a p99 on a busy
    machine, mostly close with a fifth of them caught by stalls (either arm's)."""
    rng = np.random.default_rng(4)
    spec = P50
    runs, fails = 200, 0
    for _ in range(runs):
        level = 20.0
        ratio = 1 + spec.tolerance(level) / level
        if noise == "normal":
            d = rng.normal(0, 0.1, 160)
        else:
            d = np.where(rng.random(160) < 0.2, rng.normal(0, 1.0, 160), rng.normal(0, 0.03, 160))
        b = level * np.exp(rng.normal(0, 0.3, 160))  # the moment's load, on both arms
        c = b * ratio * np.exp(d)
        cw = [AgentWindow("d", t, t + 1, 200, 0, {"latency_p50": c[t]}) for t in range(160)]
        bw = [AgentWindow("d", t, t + 1, 200, 0, {"latency_p50": b[t]}) for t in range(160)]
        for n in range(4, 161, 4):
            (v,) = judge(cw[:n], bw[:n], [spec], paired=True)
            if v.verdict == "fail":
                fails += 1
                break
    assert fails / runs <= spec.alpha, fails


# -- A/A, regressions, small samples ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("p50 20 ms", {}),
        ("sub-millisecond", {"median_ms": 0.3}),
        ("a load that swings 2x between windows", {"load_sd": 0.7}),
    ],
)
def test_an_a_a_split_passes_within_a_bake_and_never_fails(name: str, kw: dict) -> None:
    """100 seeded A/A splits of 4 agents, judged after every window: none fails, and at least
    95% pass within 20 windows (a 20 s bake at the process test's pace) and all within 40."""
    rng = np.random.default_rng(5)
    outcomes = [sequential(split_windows(rng, windows=40, **kw)) for _ in range(100)]
    assert not [o for o in outcomes if o[0] == "fail"], name
    assert all(o[0] == "pass" for o in outcomes), [o for o in outcomes if o[0] != "pass"]
    assert sum(o[1] <= 4 * 20 for o in outcomes) >= 95, name


@pytest.mark.parametrize(
    ("name", "kw", "metric"),
    [
        ("p50 +30%", {"scale": 1.3}, "latency_p50 fail"),
        ("p50 +30%, sub-millisecond", {"scale": 1.3, "median_ms": 8.0}, "latency_p50 fail"),
        ("5% errors", {"candidate_errors": 0.05}, "errors fail"),
        ("+1 pp errors", {"candidate_errors": 0.015}, "errors fail"),
    ],
)
def test_a_worse_candidate_fails_on_a_split(name: str, kw: dict, metric: str) -> None:
    rng = np.random.default_rng(6)
    outcomes = [sequential(split_windows(rng, **kw)) for _ in range(50)]
    assert all(o[0] == "fail" for o in outcomes), (name, [o for o in outcomes if o[0] != "fail"])
    assert sum(metric in o[2] for o in outcomes) >= 48, name


def test_a_better_candidate_passes_and_says_so_in_its_effect() -> None:
    rng = np.random.default_rng(7)
    pairs = split_windows(rng, scale=0.7, windows=10)
    got = judge([p[0] for p in pairs], [p[1] for p in pairs], [P50], paired=True)
    assert got[0].verdict == "pass" and got[0].effect < 0 and got[0].high < got[0].tolerance


def test_few_pairs_stay_inconclusive_however_clear() -> None:
    """Seven pairs, the candidate ten times slower in every one, failing half its requests:
    latency needs eight pairs before it has an interval at all, errors need their interval."""
    c = [AgentWindow("d", t, t + 1, 100, 50, {"latency_p50": 200.0}) for t in range(7)]
    b = [AgentWindow("d", t, t + 1, 100, 0, {"latency_p50": 20.0}) for t in range(7)]
    (lat,) = judge(c, b, [P50], paired=True)
    assert lat.verdict == "inconclusive" and math.isnan(lat.high) and "(7; at least 8)" in lat.why
    few = judge(c[:2], b[:2], [P50, ERRORS], paired=True)
    assert [v.verdict for v in few] == ["inconclusive", "inconclusive"]
    assert "too few" in few[0].why and "too few" in few[1].why
    (eight,) = judge([*c, c[0]], [*b, b[0]], [P50], paired=True)
    assert eight.verdict == "inconclusive"  # a repeated key is one pair, not eight
    c8 = [*c, AgentWindow("d", 7, 8, 100, 50, {"latency_p50": 200.0})]
    b8 = [*b, AgentWindow("d", 7, 8, 100, 0, {"latency_p50": 20.0})]
    (lat8,) = judge(c8, b8, [P50], paired=True)
    assert lat8.verdict == "fail" and lat8.low > lat8.tolerance


def test_zero_latencies_and_zero_requests_divide_nothing_by_zero() -> None:
    zero = {"latency_p50": 0.0, "latency_p99": 0.0}
    c = [AgentWindow("d", t, t + 1, 100, 0, zero) for t in range(12)]
    b = [AgentWindow("d", t, t + 1, 100, 0, zero) for t in range(12)]
    for v in judge(c, b, SPECS, paired=True):
        assert v.verdict == "pass", v.why
        assert all(math.isfinite(x) for x in (v.effect, v.low, v.high)), v
    # A candidate at zero beside an active arm at 3 ms: better, and finite.
    (faster,) = judge(
        c,
        [AgentWindow("d", t, t + 1, 100, 0, {"latency_p50": 3.0}) for t in range(12)],
        [P50],
        paired=True,
    )
    assert faster.verdict == "pass" and math.isfinite(faster.effect) and faster.effect < 0
    # No requests at all on either arm, or on one: inconclusive, never an exception.
    empty = [AgentWindow("d", t, t + 1, 0, 0, {}) for t in range(12)]
    assert [v.verdict for v in judge(empty, empty, SPECS, paired=True)] == ["inconclusive"] * 3
    assert [v.verdict for v in judge(c, empty, SPECS, paired=True)] == ["inconclusive"] * 3
    assert [v.verdict for v in judge([], [], SPECS, paired=True)] == ["inconclusive"] * 3
    # Zero failures on both arms over many requests: errors pass (Agresti-Caffo keeps a width).
    (err,) = judge(c, b, [ERRORS], paired=True)
    assert err.verdict == "pass" and err.high > 0


def test_a_window_without_its_partner_counts_for_errors_only() -> None:
    c = [AgentWindow("d", t, t + 1, 100, 0, {"latency_p50": 5.0}) for t in range(10)]
    b = [AgentWindow("d", t, t + 1, 100, 0, {"latency_p50": 5.0}) for t in range(9)]
    b.append(AgentWindow("e", 9, 10, 100, 0, {"latency_p50": 5.0}))  # another agent's window
    p50, err = judge(c, b, [P50, ERRORS], paired=True)
    assert "in 0 of 9" in p50.why and p50.canary_samples == 10
    assert err.canary_requests == 1000 and err.baseline_requests == 1000


def test_a_burst_on_both_arms_of_one_agent_cancels_in_the_pair() -> None:
    """One agent fails 30% of everything for a while, both arms alike (a disk filling up):
    paired, the candidate is not blamed; the arms' rates are equal."""
    c, b = [], []
    for t in range(40):
        for a in range(4):
            f = 30 if (a == 0 and t < 20) else 0
            c.append(AgentWindow(f"d{a}", t, t + 1, 100, f, {}))
            b.append(AgentWindow(f"d{a}", t, t + 1, 100, f, {}))
    (paired,) = judge(c, b, [ERRORS], paired=True)
    (unpaired,) = judge(c, b, [ERRORS])
    assert paired.verdict == "pass", paired.why
    assert paired.high - paired.low < unpaired.high - unpaired.low


def test_higher_is_better_metrics_flip_the_sign() -> None:
    from dataclasses import replace

    spec = replace(P50, direction="higher")
    c = [AgentWindow("d", t, t + 1, 100, 0, {"latency_p50": 10.0}) for t in range(12)]
    b = [AgentWindow("d", t, t + 1, 100, 0, {"latency_p50": 20.0}) for t in range(12)]
    (v,) = judge(c, b, [spec], paired=True)
    assert v.verdict == "fail" and v.effect == pytest.approx(10.0, rel=0.01)


# -- the store cuts the pairs ---------------------------------------------------------------------


def both_arms(agent_seq: int, end: float, active: int, candidate: int) -> object:
    """One agent report holding both arms of a split, as an agent sends it."""
    from modelfleet.agent.telemetry import TelemetryAggregator

    agg = TelemetryAggregator(clock=lambda: end)
    a, c = agg.version("mlp", 1), agg.version("mlp", 2)
    for _ in range(active):
        a.ok(0.004, 0.0)
    for _ in range(candidate):
        c.ok(0.006, 0.0)
    c.failed("shape")
    r = agg.snapshot(serving=[("mlp", 1), ("mlp", 2)])
    r.seq, r.start_unix = agent_seq, end - 1
    return r


def test_store_cuts_both_arms_of_a_split_over_the_same_spans(tmp_path: Path) -> None:
    from tests.test_telemetry import synthetic

    store = TelemetryStore(tmp_path / "t.duckdb")
    now = time.time()
    # Agent "s": each report holds both arms, 10% of requests on the candidate.
    store.ingest("s", [both_arms(s, now - 50 + s, 90, 10) for s in range(1, 13)])
    # Agent "o": the arms in reports of their own (the experiments' fake agents send them so).
    rows = []
    for s in range(1, 7):
        rows.append(synthetic("o", 2 * s, now - 40 + 2 * s, np.full(60, 0.004), version=1))
        rows.append(synthetic("o", 2 * s + 1, now - 39 + 2 * s, np.full(60, 0.004), version=2))
    store.ingest("o", rows)
    c, b = store.paired_samples("mlp", 2, [1], None, now - 100, now, min_requests=50)
    assert [(w.agent_id, w.start, w.end) for w in c] == [(w.agent_id, w.start, w.end) for w in b]
    s_c = [w for w in c if w.agent_id == "s"]
    s_b = [w for w in b if w.agent_id == "s"]
    # Pooled until the 10% arm holds 50 requests (five reports), its partner over the same five;
    # the remainder keeps its counts, without latency.
    assert [(w.requests, w.failures) for w in s_c] == [(55, 5), (55, 5), (22, 2)]
    assert [w.requests for w in s_b] == [450, 450, 180]
    # 6 ms and 4 ms requests, read back through the histogram buckets (5-10 ms, 2.5-5 ms).
    assert 5 <= s_c[0].value("latency_p50") <= 10 and 2.5 <= s_b[0].value("latency_p50") <= 5
    assert math.isnan(s_c[-1].value("latency_p50")) and math.isnan(s_b[-1].value("latency_p50"))
    o_c = [w for w in c if w.agent_id == "o"]
    assert [w.requests for w in o_c] == [60] * 6  # one report of each arm per pair
    assert store.paired_samples("mlp", 2, [2], None, now - 100, now) == ([], [])
    assert store.paired_samples("mlp", 2, [1], [], now - 100, now) == ([], [])
    store.close()


# -- the rollout rule on a traffic canary ---------------------------------------------------------


def judged_split_fleet(rng: np.random.Generator, **kw: object) -> object:
    """The traffic canaries' fake fleet (tests/test_rollout_traffic.py), whose telemetry is a
    simulated split: every agent's pair of windows every 5 s for 10 minutes."""
    from tests.test_rollout_traffic import AGENTS, BASE, GOOD, SplitFleet

    per_agent = split_windows(rng, agents=len(AGENTS), windows=120, **kw)  # type: ignore[arg-type]
    pairs = [
        (
            AgentWindow(
                AGENTS[int(c.agent_id[1:])],
                c.start * 5,
                c.end * 5,
                c.requests,
                c.failures,
                c.latency_ms,
            ),
            AgentWindow(
                AGENTS[int(b.agent_id[1:])],
                b.start * 5,
                b.end * 5,
                b.requests,
                b.failures,
                b.latency_ms,
            ),
        )
        for c, b in per_agent
    ]

    class Judged(SplitFleet):
        def paired_samples(
            self, version: int, baseline_version: int, agents: object, since: float, until: float
        ) -> tuple[list[AgentWindow], list[AgentWindow]]:
            chosen = [p for p in pairs if p[0].agent_id in agents and since < p[0].end <= until]  # type: ignore[operator]
            return [p[0] for p in chosen], [p[1] for p in chosen]

    return Judged({a: 1 for a in AGENTS}, per_version={2: GOOD, 1: BASE})


@pytest.mark.parametrize(
    ("kw", "state", "says"),
    [
        ({}, "done", "passed early"),
        ({"scale": 1.3}, "rolled_back", "failed the judge: latency_p50 FAIL"),
        ({"candidate_errors": 0.05}, "rolled_back", "failed the judge: errors FAIL"),
    ],
)
def test_a_traffic_canary_is_judged_pair_by_pair(kw: dict, state: str, says: str) -> None:
    from modelfleet.hub.rollouts import Rollout, Spec
    from tests.test_rollout_traffic import AGENTS

    fleet = judged_split_fleet(np.random.default_rng(8), **kw)
    spec = Spec(
        model="m",
        version=2,
        selector={},
        waves=["100%"],
        bake_s=60,
        gates=[],
        min_requests=100,
        agent_timeout_s=300,
        traffic=[50, 100],
        judge=["latency", "errors"],
    )
    r = Rollout.new(1, spec, AGENTS, {a: 1 for a in AGENTS}, now=0)
    t = 0.0
    while t < 600 and r.active and r.state != "paused":
        fleet.apply(r, r.step(t, fleet))  # type: ignore[attr-defined]
        t += 1
    texts = [e["text"] for e in r.events]
    assert r.state == state, (r.reason, texts)
    assert any(says in x for x in [*texts, r.reason]), texts
    judged = r.gate_values[0]
    assert judged["at"] - judged["since"] < 60  # decided before the bake ended
    assert all(
        "paired on the split" in v["why"] or "failed" in v["why"] for v in judged["verdicts"]
    )
