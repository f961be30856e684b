"""Judge quality on a simulated fleet with known truth, today's ratio gates beside it.

Each run simulates one canary wave: AGENTS agents (CANARY of them on the new version, the rest
the baseline), each reporting one window of WINDOW_S seconds at a time. A window replays
REQUESTS request latencies drawn from a heavy-tailed distribution (lognormal body, a Pareto tail
on 3% of requests) scaled by the device's own speed (lognormal, DEVICE_SD) and, for the canary
of a latency scenario, by the regression; failures are binomial at the scenario's error rate.
The latencies go through the hub's own histogram bounds and quantile code
(``kernel.telemetry_bounds``, ``hub.telemetry.percentile``), so a window's p99 is what the hub
would compute from the agent's report.

- **The judge** (``hub.judge``, the default ``--judge latency,errors``) looks after every window,
  as the rollout engine does: the first failing metric rolls back, all metrics passing with the
  canary past --min-requests passes early; still inconclusive after MAX_BAKE windows pauses.
- **Ratio gates** (today's ``--gate``): the pooled canary p99 and error rate against the pooled
  baseline at the end of the bake (BAKE windows), ``p99_vs_baseline<1.2`` and
  ``error_rate_vs_baseline<2`` (what an operator writes), and the looser ``p99_vs_baseline<2``.

Scenarios: A/A (no difference; any rollback is false), the same with sub-millisecond latencies
(the case behind issue 15), a 20% latency regression, and +1 percentage point of errors
(0.5% -> 1.5%); then the same on a traffic split (``split 50%``): the CANARY agents answer half
of their requests with each version, under a load that moves from window to window (LOAD_SD)
and slows both arms of an agent-window alike, judged pair by pair (``judge(paired=True)``); its
ratio gates compare the arms' pooled figures. Figures: the share of runs rolled back (false
rollbacks for A/A, detection otherwise), passed, and paused, and the median looks (and seconds)
to the judge's verdict.

Run: .venv/bin/python -m tests.benchmarks.judge_bench   (JUDGE_BENCH_RUNS scales the runs)
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

from modelfleet.hub.judge import DEFAULT_JUDGE, AgentWindow, combined, judge, parse_metrics
from modelfleet.hub.telemetry import percentile
from modelfleet.kernel.telemetry_bounds import LATENCY_BOUNDS

AGENTS = 100
CANARY = 10  # the first wave
WINDOW_S = 10.0
REQUESTS = 300  # per agent-window: 30 requests/s per device
BAKE = 12  # windows: a 2-minute bake
MAX_BAKE = 36  # 3 bakes, the engine's default limit
BEFORE = 12  # windows of every agent on the old version before the rollout started
DEVICE_SD = 0.10  # devices differ by about 10% in speed
MEDIAN_MS = 20.0
BASE_ERRORS = 0.005
MIN_REQUESTS = 1000
RUNS = int(os.environ.get("JUDGE_BENCH_RUNS", "200"))
BOUNDS = np.array(LATENCY_BOUNDS)
SPECS = parse_metrics(list(DEFAULT_JUDGE))


@dataclass(frozen=True)
class Scenario:
    name: str
    median_ms: float = MEDIAN_MS
    latency_scale: float = 1.0
    canary_errors: float = BASE_ERRORS
    # True: any rollback is false; False: a rollback is the detection.
    null: bool = True
    runs: int = RUNS
    canary: int = CANARY
    # A traffic split: the canary agents answer half of their requests with each version,
    # judged pair by pair (judge(paired=True)); the other agents take no part.
    split: bool = False


SCENARIOS = (
    Scenario("A/A, p50 20 ms"),
    Scenario("A/A, sub-ms (p50 0.15 ms)", median_ms=0.15),
    # The case behind issue 15: a first wave of one agent, sub-millisecond latencies.
    Scenario("A/A, sub-ms, 1 canary agent", median_ms=0.15, canary=1),
    Scenario("latency +20%", latency_scale=1.2, null=False, runs=max(20, RUNS // 2)),
    Scenario(
        "errors +1 pp (0.5% -> 1.5%)", canary_errors=0.015, null=False, runs=max(20, RUNS // 2)
    ),
    Scenario("split 50%, A/A, p50 20 ms", split=True),
    Scenario("split 50%, A/A, sub-ms", median_ms=0.15, split=True),
    Scenario(
        "split 50%, latency +20%",
        latency_scale=1.2,
        null=False,
        runs=max(20, RUNS // 2),
        split=True,
    ),
    Scenario(
        "split 50%, errors +1 pp",
        canary_errors=0.015,
        null=False,
        runs=max(20, RUNS // 2),
        split=True,
    ),
)
# On a split, each agent-window's load (the device's, and the moment's: a busy neighbour, a
# scheduler's bad second) slows both arms alike; the pairing must take it out.
LOAD_SD = 0.3


def _window(
    rng: np.random.Generator,
    median_ms: float,
    speed: float,
    error_rate: float,
    requests: int = REQUESTS,
) -> tuple[np.ndarray, int]:
    lat = rng.lognormal(math.log(median_ms / 1000), 0.35, requests)
    tail = rng.random(requests) < 0.03
    lat[tail] *= 1 + rng.pareto(2.5, int(tail.sum()))
    lat *= speed
    failures = int(rng.binomial(requests, error_rate))
    counts = np.bincount(
        np.searchsorted(BOUNDS, lat[: requests - failures]), minlength=len(BOUNDS) + 1
    )
    return counts, failures


def _sample(
    agent: int, w: int, counts: np.ndarray, failures: int, requests: int = REQUESTS
) -> AgentWindow:
    q = {
        name: percentile(list(counts), LATENCY_BOUNDS, p) * 1000
        for name, p in (("latency_p50", 0.5), ("latency_p99", 0.99))
    }
    return AgentWindow(f"agent-{agent}", w * WINDOW_S, (w + 1) * WINDOW_S, requests, failures, q)


def _run_split(rng: np.random.Generator, sc: Scenario) -> Outcome:
    """A traffic canary's 50% step: the canary agents serve both arms, REQUESTS / 2 each per
    window, under a load shared by the arms of the agent-window."""
    half = REQUESTS // 2
    speeds = np.exp(rng.normal(0, DEVICE_SD, sc.canary))
    pairs: list[list[tuple[AgentWindow, AgentWindow]]] = []
    hists: list[list[tuple[np.ndarray, np.ndarray]]] = []
    fails: list[list[tuple[int, int]]] = []
    for w in range(MAX_BAKE):
        row, hrow, frow = [], [], []
        for a in range(sc.canary):
            load = float(speeds[a]) * math.exp(rng.normal(0, LOAD_SD))
            cc, cf = _window(rng, sc.median_ms, load * sc.latency_scale, sc.canary_errors, half)
            bc, bf = _window(rng, sc.median_ms, load, BASE_ERRORS, half)
            row.append((_sample(a, w, cc, cf, half), _sample(a, w, bc, bf, half)))
            hrow.append((cc, bc))
            frow.append((cf, bf))
        pairs.append(row)
        hists.append(hrow)
        fails.append(frow)
    verdict, looks = "paused", MAX_BAKE
    for k in range(1, MAX_BAKE + 1):
        c = [p[0] for row in pairs[:k] for p in row]
        b = [p[1] for row in pairs[:k] for p in row]
        v = combined(judge(c, b, SPECS, looks=k, paired=True))
        enough = sum(s.requests for s in c) >= MIN_REQUESTS
        if v == "fail" or (v == "pass" and enough):
            verdict, looks = v, k
            break
    c_hist = sum(h[0] for row in hists[:BAKE] for h in row)
    b_hist = sum(h[1] for row in hists[:BAKE] for h in row)
    c_p99 = percentile(list(c_hist), LATENCY_BOUNDS, 0.99)
    b_p99 = percentile(list(b_hist), LATENCY_BOUNDS, 0.99)
    c_err = sum(f[0] for row in fails[:BAKE] for f in row)
    b_err = sum(f[1] for row in fails[:BAKE] for f in row)
    err_ratio = c_err / b_err if b_err else (math.inf if c_err else 1.0)
    return Outcome(
        judge=verdict,
        judge_looks=looks,
        gates_tight=c_p99 / b_p99 >= 1.2 or err_ratio >= 2,
        gates_loose=c_p99 / b_p99 >= 2,
    )


@dataclass
class Outcome:
    judge: str  # fail, pass, paused
    judge_looks: int
    gates_tight: bool  # p99_vs_baseline<1.2 and error_rate_vs_baseline<2 rolled back
    gates_loose: bool  # p99_vs_baseline<2 rolled back


def _run(rng: np.random.Generator, sc: Scenario) -> Outcome:
    if sc.split:
        return _run_split(rng, sc)
    speeds = np.exp(rng.normal(0, DEVICE_SD, AGENTS))
    windows: list[list[AgentWindow]] = []  # per window index: every agent's sample
    hists: list[list[np.ndarray]] = []
    fails: list[list[int]] = []
    before = []
    for w in range(-BEFORE, 0):
        for a in range(AGENTS):
            counts, failures = _window(rng, sc.median_ms, speeds[a], BASE_ERRORS)
            before.append(_sample(a, w, counts, failures))
    for w in range(MAX_BAKE):
        row, hrow, frow = [], [], []
        for a in range(AGENTS):
            canary = a < sc.canary
            counts, failures = _window(
                rng,
                sc.median_ms,
                speeds[a] * (sc.latency_scale if canary else 1.0),
                sc.canary_errors if canary else BASE_ERRORS,
            )
            row.append(_sample(a, w, counts, failures))
            hrow.append(counts)
            frow.append(failures)
        windows.append(row)
        hists.append(hrow)
        fails.append(frow)
    verdict, looks = "paused", MAX_BAKE
    for k in range(1, MAX_BAKE + 1):
        c = [s for row in windows[:k] for s in row[: sc.canary]]
        b = [s for row in windows[:k] for s in row[sc.canary :]]
        v = combined(judge(c, b, SPECS, looks=k, before=before))
        enough = sum(s.requests for s in c) >= MIN_REQUESTS
        if v == "fail" or (v == "pass" and enough):
            verdict, looks = v, k
            break
    # Ratio gates: pooled figures over the bake, judged once at its end.
    c_hist = sum(h for row in hists[:BAKE] for h in row[: sc.canary])
    b_hist = sum(h for row in hists[:BAKE] for h in row[sc.canary :])
    c_p99 = percentile(list(c_hist), LATENCY_BOUNDS, 0.99)
    b_p99 = percentile(list(b_hist), LATENCY_BOUNDS, 0.99)
    c_err = sum(f for row in fails[:BAKE] for f in row[: sc.canary]) / (BAKE * sc.canary * REQUESTS)
    b_err = sum(f for row in fails[:BAKE] for f in row[sc.canary :]) / (
        BAKE * (AGENTS - sc.canary) * REQUESTS
    )
    err_ratio = c_err / b_err if b_err else (math.inf if c_err else 1.0)
    return Outcome(
        judge=verdict,
        judge_looks=looks,
        gates_tight=c_p99 / b_p99 >= 1.2 or err_ratio >= 2,
        gates_loose=c_p99 / b_p99 >= 2,
    )


def main() -> list[dict[str, object]]:
    rng = np.random.default_rng(int(os.environ.get("JUDGE_BENCH_SEED", "15")))
    rows: list[dict[str, object]] = []
    print(
        f"judge bench: {AGENTS} agents ({CANARY} canary), windows of {WINDOW_S:g}s with "
        f"{REQUESTS} requests, device spread {DEVICE_SD:.0%}, bake {BAKE} windows, max bake "
        f"{MAX_BAKE}; judge {', '.join(s.name for s in SPECS)} looks after every window"
    )
    header = (
        f"{'scenario':<30} {'runs':>5} {'judge rolled back':>18} {'passed':>7} {'paused':>7} "
        f"{'median looks':>13} {'gates <1.2/<2x':>15} {'gates p99<2':>12}  target"
    )
    print(header)
    for sc in SCENARIOS:
        start = time.monotonic()
        outs = [_run(rng, sc) for _ in range(sc.runs)]
        n = len(outs)
        fail = sum(o.judge == "fail" for o in outs) / n
        passed = sum(o.judge == "pass" for o in outs) / n
        paused = sum(o.judge == "paused" for o in outs) / n
        decided = [o.judge_looks for o in outs if o.judge != "paused"]
        looks = statistics.median(decided) if decided else math.nan
        tight = sum(o.gates_tight for o in outs) / n
        loose = sum(o.gates_loose for o in outs) / n
        if sc.null:
            target, ok = "false rollbacks <= 1%", fail <= 0.01
        else:
            target, ok = "detected >= 95%", fail >= 0.95
        print(
            f"{sc.name:<30} {n:>5} {fail:>18.1%} {passed:>7.1%} {paused:>7.1%} "
            f"{looks:>6g} ({looks * WINDOW_S:>4.0f}s) {tight:>15.1%} {loose:>12.1%}  "
            f"{target}: {'PASS' if ok else 'MISS'}  [{time.monotonic() - start:.0f}s]",
            flush=True,
        )
        rows.append(
            {
                "scenario": sc.name,
                "runs": n,
                "judge_rolled_back": fail,
                "judge_passed": passed,
                "judge_paused": paused,
                "median_looks": looks,
                "gates_tight_rolled_back": tight,
                "gates_loose_rolled_back": loose,
                "target": target,
                "status": "PASS" if ok else "MISS",
            }
        )
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
