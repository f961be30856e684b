"""The statistical judge: does a canary behave worse than its baseline by an amount that matters?

Pure: no I/O, no clock. The rollout engine (:mod:`hub.rollouts`) and experiments call
:func:`judge` with samples the telemetry store cut (:meth:`hub.telemetry.TelemetryStore.samples`)
and get one :class:`MetricVerdict` per metric: ``pass``, ``fail`` or ``inconclusive``, with the
figures and the reason in plain words.

**The sample unit is one agent-window**: one agent's telemetry over one reporting interval
(consecutive intervals of a quiet agent pooled until they hold enough requests, see
:func:`pool_windows`). A device that is slow, or has one terrible minute, adds samples at the
end of the ranking; it cannot drag a pooled fleet-wide p99 with it.

**Tolerance** (per metric, absolute and relative): the smallest regression that matters,
``max(abs_tolerance, rel_tolerance * baseline)``. A latency regression under 1 ms never fails
with the defaults, however certain it is: the issue behind this module was a version rolled back
because its sub-millisecond p99 read 2.1 times the old one.

**Verdicts** come from an interval for the effect (canary minus baseline, in the metric's unit,
signed so that positive is worse): ``fail`` when the whole interval lies beyond the tolerance
(worse by more than what matters), ``pass`` when the whole interval lies below it (not worse by
anything that matters: non-inferiority, which lets a wave go on before its bake ends), else
``inconclusive``.

**Always valid.** The rollout engine looks every few seconds. A fixed-sample 99% interval looked
at a hundred times would cross the tolerance by chance far more often than 1% of the time. The
intervals here are confidence sequences: the normal-mixture boundary of the mSPRT (Robbins;
Johari et al., "Always valid inference", 2017). With the estimate's variance ``V`` and a mixing
variance ``tau**2``, the interval is ``estimate +- sqrt(V) * z`` with
``z = sqrt((V + tau**2) / tau**2 * (2 ln(1/alpha) + ln((V + tau**2) / V)))``; the probability
that it *ever* excludes the truth, over any number of looks, is at most ``alpha`` (under the
normal approximation). It is wider than a fixed-sample interval early and narrows as samples
arrive; a wave needs no count of looks to stay honest, so a restarted hub loses nothing.

- **Continuous metrics** (latency p50/p95/p99 per agent-window): Mann-Whitney U, effect as the
  Hodges-Lehmann shift (the median of all canary-minus-baseline differences), interval by
  inverting the rank test (Moses) at the always-valid ``z``. Ranks ignore how heavy the tail is;
  the shift is in milliseconds, so it meets an absolute tolerance directly. Devices differ in
  speed: given samples from before the rollout (``before``), each agent-window is taken relative
  to its own agent's earlier level (log ratio: a difference in differences), so the device's
  speed cancels; the shift is then read back in milliseconds at the baseline's level. Windows
  of one agent still resemble each other: the rank variance is inflated by the design effect
  ``1 + (w - 1) * icc`` (``w`` windows per agent, ``icc`` the share of rank variance between
  agents, one-way ANOVA on the ranks), so twenty windows of four agents count as what they are
  worth, not as eighty independent devices.
- **Proportions** (errors): pooled counts, ``failures / requests`` per arm, the difference
  judged by the mSPRT. Pooled, not per-window rates: errors are rare, most windows have none,
  and a rank test over mostly-zero rates has almost no power, while pooled counts use every
  request. To keep one failing device from deciding alone, the variance is the larger of the
  binomial one and the cluster-robust one computed over agent-windows (a device whose windows
  disagree with the rest widens the interval instead of narrowing it), and the binomial part
  adds one failure and one success per arm (Agresti-Caffo) so zero failures still leave an
  honest width.

**On a split** (``paired=True``: a traffic canary's step, an A/B experiment) both arms run on the
same agents at the same moments, and the samples come in pairs: the candidate's and the active
arm's window of one agent over the same span
(:meth:`hub.telemetry.TelemetryStore.paired_samples`). Each pair is compared within itself, so
the device, its load and the moment cancel, and no clustering needs paying for:

- **Latency**: per pair ``d = log(candidate / active)`` (latencies floored at a tenth of the
  absolute tolerance: zero divides nothing, changes far below what matters read as none;
  ``d`` clipped at a tenfold change). The change is bounded twice, each at ``alpha / 2``, and the
  two intervals intersected: the mean of ``d`` by the normal-mixture boundary above (plug-in
  variance, inflated for small counts, mixing scale the tolerance on the log scale), and the
  median of ``d`` by an always-valid sign test (:func:`sign_test_bound`), which holds for any
  spread and tail. The two bound the same number because the pairs' log ratios are symmetric
  about the change: the arms are exchangeable when nothing changed, and a version that scales
  latency shifts them. The mean is sharper when the pairs spread widely (a p99 of a few hundred
  requests on a busy machine); the sign test when most pairs agree and a few lie far out. Fewer
  than :data:`MIN_PAIRS` pairs: inconclusive. The interval is read back in milliseconds at the
  active arm's level.
- **Errors**: the difference of the arms' pooled rates over the pairs, judged by the mSPRT; the
  variance is the larger of the binomial one (Agresti-Caffo) and the cluster-robust one over
  the pairs' contributions to the difference, in which a burst that hits both arms of an agent
  cancels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

Verdict = Literal["pass", "fail", "inconclusive"]
Direction = Literal["lower", "higher"]
Kind = Literal["continuous", "proportion"]

# Mixing standard deviation of the rank test, on the scale P(canary > baseline) - 1/2: the
# mSPRT is most sensitive to effects of about this size (0.2: a canary slower than a baseline
# sample 70% of the time: the separations a wave of a few agents can show at all).
RANK_TAU = 0.2
# On a split, latency needs this many pairs before an interval: the variance comes from the
# pairs themselves, and fewer say too little about it.
MIN_PAIRS = 8
# A pair's log ratio counts at most this far (10x either way): one window caught by a stall
# cannot drag the mean, and a tenfold change is decisive anyway.
PAIR_CLIP = math.log(10)
# Pairwise differences beyond this many are computed on an evenly thinned subset (the shift
# estimate and its interval barely move; memory and time stay bounded on a large fleet).
MAX_PAIRS = 2_000_000


@dataclass(frozen=True)
class MetricSpec:
    """One judged metric: what it reads, which way is better, and the effect that matters."""

    name: str
    kind: Kind
    direction: Direction = "lower"
    # The smallest regression that matters is max(abs_tolerance, rel_tolerance * baseline), in
    # the metric's unit (milliseconds, or a fraction of requests).
    abs_tolerance: float = 0.0
    rel_tolerance: float = 0.0
    # Chance, over every look, that the interval ever excludes the true effect.
    alpha: float = 0.05
    # Fewer samples (agent-windows) than this in either arm: inconclusive, whatever they say.
    min_samples: int = 3
    unit: str = ""

    def tolerance(self, baseline: float) -> float:
        return max(self.abs_tolerance, self.rel_tolerance * abs(baseline))


# The metrics `--judge` accepts, with their default tolerances.
METRICS: dict[str, MetricSpec] = {
    "latency_p50": MetricSpec("latency_p50", "continuous", "lower", 1.0, 0.10, unit="ms"),
    "latency_p95": MetricSpec("latency_p95", "continuous", "lower", 1.0, 0.10, unit="ms"),
    "latency_p99": MetricSpec("latency_p99", "continuous", "lower", 1.0, 0.10, unit="ms"),
    "errors": MetricSpec("errors", "proportion", "lower", 0.005, 0.25, unit="fraction"),
}
# Names that stand for several metrics: "latency" judges the median (most sensitive to a version
# that is slower throughout) and the p99 (the tail).
ALIASES = {"latency": ("latency_p50", "latency_p99"), "error_rate": ("errors",)}
DEFAULT_JUDGE = ("latency", "errors")


class JudgeSpecError(ValueError):
    """A `--judge` entry that does not parse; the message says what to write instead."""


def parse_metric(text: str) -> list[MetricSpec]:
    """``NAME[:ABS[:REL]]``: a metric of :data:`METRICS` (or an alias, several), optionally with
    its absolute tolerance (ms for latency, a fraction for errors) and relative one (a fraction
    of the baseline), e.g. ``latency_p99:2:0.2`` or ``errors:0.01``."""
    parts = [p.strip() for p in text.strip().split(":")]
    names = ALIASES.get(parts[0], (parts[0],))
    known = ", ".join(sorted([*METRICS, *ALIASES]))
    if any(n not in METRICS for n in names) or len(parts) > 3:
        raise JudgeSpecError(
            f"invalid judged metric {text!r}: use NAME[:ABS_TOLERANCE[:REL_TOLERANCE]] with "
            f"NAME one of {known}"
        )
    return [_with_tolerances(METRICS[n], text, parts[1:]) for n in names]


def _with_tolerances(spec: MetricSpec, text: str, parts: Sequence[str]) -> MetricSpec:
    try:
        tolerances = [float(p) for p in parts]
    except ValueError:
        raise JudgeSpecError(
            f"invalid tolerance in {text!r}: numbers, e.g. latency_p99:2:0.1 (2 ms or 10%)"
        ) from None
    if any(not math.isfinite(t) or t < 0 for t in tolerances):
        raise JudgeSpecError(f"invalid tolerance in {text!r}: tolerances are >= 0")
    if tolerances:
        spec = replace(spec, abs_tolerance=tolerances[0])
    if len(tolerances) > 1:
        spec = replace(spec, rel_tolerance=tolerances[1])
    return spec


def parse_metrics(texts: Sequence[str]) -> list[MetricSpec]:
    """Every entry of ``--judge`` (comma-separated lists allowed); duplicates are refused."""
    out: list[MetricSpec] = []
    for text in texts:
        for item in text.split(","):
            if item.strip():
                out += parse_metric(item)
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise JudgeSpecError(f"metric(s) judged twice: {', '.join(dup)}")
    return out


@dataclass(frozen=True)
class AgentWindow:
    """One sample: one agent's traffic on one version over one (possibly pooled) interval."""

    agent_id: str
    start: float
    end: float
    requests: int
    failures: int
    # Latency quantiles of the successful requests, milliseconds; NaN: too few to say (the
    # window still counts for errors).
    latency_ms: Mapping[str, float]

    def value(self, metric: str) -> float:
        return float(self.latency_ms.get(metric, math.nan))


@dataclass(frozen=True)
class MetricVerdict:
    metric: str
    verdict: Verdict
    # Summary of each arm: median over agent-windows (continuous) or pooled rate (proportion);
    # NaN without samples.
    canary: float
    baseline: float
    # Canary minus baseline (Hodges-Lehmann shift, or difference of rates), and its interval;
    # NaN: not estimable. Positive is worse when lower is better.
    effect: float
    low: float
    high: float
    tolerance: float
    canary_samples: int
    baseline_samples: int
    canary_requests: int
    baseline_requests: int
    looks: int
    unit: str
    why: str


def always_valid_z(variance: float, tau: float, alpha: float) -> float:
    """The multiple of the standard error an always-valid (mSPRT) interval spans each side."""
    if variance <= 0:
        return math.inf
    t2 = tau * tau
    spread = 2 * math.log(1 / alpha) + math.log((variance + t2) / variance)
    return math.sqrt((variance + t2) / t2 * spread)


def _icc(ranks: np.ndarray, groups: Sequence[str]) -> float | None:
    """Share of the rank variance that lies between agents (one-way ANOVA); None: fewer than two
    agents, or no agent with two windows, to tell."""
    labels = np.asarray(groups)
    _, idx = np.unique(labels, return_inverse=True)
    n, k = len(ranks), int(idx.max()) + 1 if len(ranks) else 0
    if k < 2 or n <= k:
        return None
    sizes = np.bincount(idx).astype(float)
    means = np.bincount(idx, weights=ranks) / sizes
    ssb = float((sizes * (means - float(ranks.mean())) ** 2).sum())
    ssw = float(((ranks - means[idx]) ** 2).sum())
    msb, msw = ssb / (k - 1), ssw / (n - k)
    k0 = (n - float((sizes**2).sum()) / n) / (k - 1)
    denom = msb + (k0 - 1) * msw
    return 0.0 if denom <= 0 else max(0.0, min(1.0, (msb - msw) / denom))


def _pairs(c: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Every canary-minus-baseline difference, sorted (an evenly thinned grid past MAX_PAIRS)."""
    m, n = len(c), len(b)
    if m * n > MAX_PAIRS:
        keep = math.sqrt(MAX_PAIRS / (m * n))
        c = np.sort(c)[np.linspace(0, m - 1, max(1, int(m * keep))).astype(int)]
        b = np.sort(b)[np.linspace(0, n - 1, max(1, int(n * keep))).astype(int)]
    return np.sort((c[:, None] - b[None, :]).ravel())


@dataclass(frozen=True)
class _Arms:
    """What every verdict of one metric says about the two arms, whatever the test."""

    canary: float
    baseline: float
    tolerance: float
    canary_samples: int
    baseline_samples: int
    canary_requests: int
    baseline_requests: int

    def verdict(
        self,
        spec: MetricSpec,
        looks: int,
        verdict: Verdict,
        why: str,
        effect: float = math.nan,
        low: float = math.nan,
        high: float = math.nan,
    ) -> MetricVerdict:
        return MetricVerdict(
            metric=spec.name,
            verdict=verdict,
            canary=self.canary,
            baseline=self.baseline,
            effect=effect,
            low=low,
            high=high,
            tolerance=self.tolerance,
            canary_samples=self.canary_samples,
            baseline_samples=self.baseline_samples,
            canary_requests=self.canary_requests,
            baseline_requests=self.baseline_requests,
            looks=looks,
            unit=spec.unit,
            why=why,
        )


def _levels(spec: MetricSpec, before: Sequence[AgentWindow]) -> dict[str, float]:
    """Each agent's own level of the metric before the comparison: the median of its windows
    (agents with fewer than ``min_samples`` windows have none)."""
    per: dict[str, list[float]] = {}
    for w in before:
        v = w.value(spec.name)
        if math.isfinite(v) and v > 0:
            per.setdefault(w.agent_id, []).append(v)
    return {a: float(np.median(v)) for a, v in per.items() if len(v) >= spec.min_samples}


def _rank_test(
    spec: MetricSpec,
    canary: Sequence[AgentWindow],
    baseline: Sequence[AgentWindow],
    looks: int,
    before: Sequence[AgentWindow] | None,
) -> MetricVerdict:
    cw = [w for w in canary if math.isfinite(w.value(spec.name))]
    bw = [w for w in baseline if math.isfinite(w.value(spec.name))]
    c = np.array([w.value(spec.name) for w in cw], dtype=float)
    b = np.array([w.value(spec.name) for w in bw], dtype=float)
    m, n = len(c), len(b)
    b_med = float(np.median(b)) if n else math.nan
    c_med = float(np.median(c)) if m else math.nan
    # Devices differ in speed far more than versions do. With every agent's own level from
    # before, each sample becomes log(value / that level) (difference in differences): the
    # device's speed cancels, what is left is the change. Without it, samples stay as they are
    # and the design effect below pays for the device spread.
    levels = _levels(spec, before or ())
    agents = {w.agent_id for w in cw} | {w.agent_id for w in bw}
    paired = bool(levels) and agents <= levels.keys() and bool((c > 0).all() and (b > 0).all())
    if paired:
        c = np.log(c / np.array([levels[w.agent_id] for w in cw]))
        b = np.log(b / np.array([levels[w.agent_id] for w in bw]))
    arms = _Arms(
        canary=c_med,
        baseline=b_med,
        tolerance=spec.tolerance(b_med) if n else spec.abs_tolerance,
        canary_samples=m,
        baseline_samples=n,
        canary_requests=sum(w.requests for w in canary),
        baseline_requests=sum(w.requests for w in baseline),
    )
    if m < spec.min_samples or n < spec.min_samples:
        why = (
            f"too few agent-windows with latency (canary {m}, baseline {n}; at least "
            f"{spec.min_samples} each)"
        )
        return arms.verdict(spec, looks, "inconclusive", why)
    # Differences under a tenth of the tolerance cannot change a verdict; below that scale the
    # histogram buckets and timers make structure of nothing (identical versions whose p50 sits
    # in one bucket, each device a hair apart, would look clustered). They count as ties.
    resolution = (math.log1p(arms.tolerance / b_med) if paired else arms.tolerance) / 10
    if resolution > 0 and math.isfinite(resolution):
        c, b = np.round(c / resolution) * resolution, np.round(b / resolution) * resolution
    both = np.concatenate([c, b])
    # Mid-ranks: ties share their mean rank.
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    order = both.argsort(kind="mergesort")
    raw = np.empty(len(both))
    raw[order] = np.arange(1, len(both) + 1, dtype=float)
    ranks = (np.bincount(inverse, weights=raw) / counts)[inverse]
    big_n = float(m + n)
    # The share of rank variance ties leave (1: no ties, 0: every sample equal).
    untied = 1.0 - float((counts**3 - counts).sum()) / (big_n**3 - big_n)
    c_agents, b_agents = len({w.agent_id for w in cw}), len({w.agent_id for w in bw})
    icc_c = _icc(ranks[:m], [w.agent_id for w in cw])
    icc_b = _icc(ranks[m:], [w.agent_id for w in bw])
    # Device-to-device spread is a property of the fleet: an arm of one agent borrows the
    # other arm's estimate (no estimate at all: windows count as independent, said below).
    icc_c = icc_c if icc_c is not None else icc_b
    icc_b = icc_b if icc_b is not None else icc_c
    deff_c = 1.0 + (m / c_agents - 1.0) * (icc_c or 0.0)
    deff_b = 1.0 + (n / b_agents - 1.0) * (icc_b or 0.0)
    m_eff, n_eff = max(1.0, m / deff_c), max(1.0, n / deff_b)
    # Variance of U / (m n), the chance a canary sample exceeds a baseline one: ties and
    # clustering accounted for.
    var = untied * (m_eff + n_eff + 1) / (12 * m_eff * n_eff)
    z = always_valid_z(var, RANK_TAU, spec.alpha)
    diffs = _pairs(c, b)
    k = len(diffs)
    # Moses: the interval's ends are the differences where the U-test at z stops rejecting.
    # No rank variance left (all samples tied): every difference is the same, nothing to doubt.
    lo_i = math.floor(k / 2 - z * math.sqrt(var) * k) if var > 0 else 0
    low, high = (-math.inf, math.inf) if lo_i < 0 else (float(diffs[lo_i]), float(diffs[-1 - lo_i]))
    shift = float(np.median(diffs))
    if paired and n:
        # Back to the metric's unit at the baseline's level: a relative change of the baseline.
        shift, low, high = (
            b_med * math.expm1(x) if math.isfinite(x) else x for x in (shift, low, high)
        )
    sign = 1.0 if spec.direction == "lower" else -1.0
    effect = sign * shift
    low, high = sorted((sign * low, sign * high))
    verdict, why = _decide(spec, effect, low, high, arms.tolerance, "shift")
    clusters = (
        "windows counted as independent (no agent with two windows)"
        if icc_c is None
        else f"{m_eff:.0f} and {n_eff:.0f} effective samples after device clustering"
    )
    how = "each agent against its own level before" if paired else "unpaired"
    why += f"; {c_agents} canary and {b_agents} baseline agent(s) ({how}), {clusters}"
    return arms.verdict(spec, looks, verdict, why, effect, low, high)


def _proportion_test(
    spec: MetricSpec,
    canary: Sequence[AgentWindow],
    baseline: Sequence[AgentWindow],
    looks: int,
) -> MetricVerdict:
    cn = sum(w.requests for w in canary)
    bn = sum(w.requests for w in baseline)
    cf = sum(w.failures for w in canary)
    bf = sum(w.failures for w in baseline)
    pb = bf / bn if bn else math.nan
    arms = _Arms(
        canary=cf / cn if cn else math.nan,
        baseline=pb,
        tolerance=spec.tolerance(pb) if bn else spec.abs_tolerance,
        canary_samples=sum(1 for w in canary if w.requests),
        baseline_samples=sum(1 for w in baseline if w.requests),
        canary_requests=cn,
        baseline_requests=bn,
    )
    if min(arms.canary_samples, arms.baseline_samples) < spec.min_samples:
        why = (
            f"too few agent-windows with requests (canary {arms.canary_samples}, baseline "
            f"{arms.baseline_samples}; at least {spec.min_samples} each)"
        )
        return arms.verdict(spec, looks, "inconclusive", why)
    var = _rate_variance(canary, cf, cn) + _rate_variance(baseline, bf, bn)
    # Mixing scale: the effect that matters, so the test is most sensitive where it counts.
    z = always_valid_z(var, max(spec.abs_tolerance, 1e-4), spec.alpha)
    sign = 1.0 if spec.direction == "lower" else -1.0
    effect = sign * (arms.canary - pb)
    half = z * math.sqrt(var)
    verdict, why = _decide(spec, effect, effect - half, effect + half, arms.tolerance, "difference")
    why += f"; {cf} of {cn} canary and {bf} of {bn} baseline request(s) failed"
    return arms.verdict(spec, looks, verdict, why, effect, effect - half, effect + half)


def _paired(
    canary: Sequence[AgentWindow], baseline: Sequence[AgentWindow]
) -> list[tuple[AgentWindow, AgentWindow]]:
    """The split's pairs: the candidate's and the active arm's window of the same agent over
    the same span (:meth:`hub.telemetry.TelemetryStore.paired_samples` cuts them so). A window
    without its partner pairs with an empty one: it still counts for errors."""
    by_key: dict[tuple[str, float, float], list[AgentWindow | None]] = {}
    for i, side in enumerate((canary, baseline)):
        for w in side:
            slot = by_key.setdefault((w.agent_id, w.start, w.end), [None, None])
            held = slot[i]
            slot[i] = w if held is None else _merge([held, w], keep_latency=False)
    out = []
    for (agent, start, end), (c, b) in sorted(by_key.items()):
        empty = AgentWindow(agent, start, end, 0, 0, {})
        out.append((c or empty, b or empty))
    return out


def sign_test_bound(n: int, alpha: float) -> int:
    """The always-valid sign test's bound: an interval for the median of ``n`` paired values
    runs from the ``j``-th smallest to the ``j``-th largest (0: unbounded, too few pairs).

    If the median were some value, each pair would fall above it with probability one half,
    independently. The mixture over a uniform share ``p`` of Bernoulli(p) likelihoods against
    Bernoulli(1/2) is ``2**n / ((n + 1) * C(n, k))`` after ``k`` of ``n`` above: a nonnegative
    martingale under the hypothesis, so by Ville's inequality it ever reaches ``1/alpha`` with
    probability at most ``alpha``, however often it is looked at. ``j`` is the smallest count on
    one side that leaves the value standing.
    """
    limit = math.log(1 / alpha)
    for j in range(n // 2 + 1):
        log_m = n * math.log(2) + math.lgamma(j + 1) + math.lgamma(n - j + 1) - math.lgamma(n + 2)
        if log_m < limit:
            return j
    return n // 2


def _paired_latency_test(
    spec: MetricSpec,
    canary: Sequence[AgentWindow],
    baseline: Sequence[AgentWindow],
    looks: int,
) -> MetricVerdict:
    pairs = [
        (c.value(spec.name), b.value(spec.name))
        for c, b in _paired(canary, baseline)
        if math.isfinite(c.value(spec.name)) and math.isfinite(b.value(spec.name))
    ]
    c = np.array([max(p[0], 0.0) for p in pairs], dtype=float)
    b = np.array([max(p[1], 0.0) for p in pairs], dtype=float)
    n = len(pairs)
    m = sum(1 for w in canary if math.isfinite(w.value(spec.name)))
    k = sum(1 for w in baseline if math.isfinite(w.value(spec.name)))
    b_med = float(np.median(b)) if n else math.nan
    arms = _Arms(
        canary=float(np.median(c)) if n else math.nan,
        baseline=b_med,
        tolerance=spec.tolerance(b_med) if n else spec.abs_tolerance,
        canary_samples=m,
        baseline_samples=k,
        canary_requests=sum(w.requests for w in canary),
        baseline_requests=sum(w.requests for w in baseline),
    )
    need = max(spec.min_samples, MIN_PAIRS)
    if n < need:
        why = f"too few paired agent-windows with latency on both arms ({n}; at least {need})"
        return arms.verdict(spec, looks, "inconclusive", why)
    # Each pair is one agent over one span on both arms: the device, its load and the moment
    # cancel in the ratio. A floor of a tenth of the absolute tolerance keeps zero latencies
    # finite and makes changes far below what matters count as none.
    floor = max(spec.abs_tolerance / 10, 1e-6)
    level = b_med + floor
    d = np.clip(np.log((c + floor) / (b + floor)), -PAIR_CLIP, PAIR_CLIP)
    # The tolerance on the log scale, at the active arm's level: the mixing scale, so the test
    # is most sensitive to changes of the size that matters.
    delta = max(math.log1p(arms.tolerance / level), 0.01)
    # The mean log ratio, its variance from the pairs (inflated for small counts: with n - 1
    # degrees of freedom the plug-in variance runs low), never below the rounding that a tenth
    # of the tolerance leaves (identical pairs still have a width).
    var = max(float(d.var(ddof=1)) / n * (n - 1) / (n - 3), (delta / 10) ** 2 / 12 / n)
    half = always_valid_z(var, delta, spec.alpha / 2) * math.sqrt(var)
    mean = float(d.mean())
    # The same centre bounded a second way, robust where the mean is not: the always-valid sign
    # test for the median (pairs whose log ratios mostly agree, with a few far out, as when a
    # p99 lands on one stall). Both at alpha / 2 and intersected: the pairs' log ratios are
    # symmetric about the change (the arms are exchangeable when nothing changed; a version
    # that scales latency shifts them), so the mean and the median are the same number.
    s_d = np.sort(d)
    j = sign_test_bound(n, spec.alpha / 2)
    lo, hi = (-math.inf, math.inf) if j == 0 else (float(s_d[j - 1]), float(s_d[n - j]))
    lo, hi = max(lo, mean - half), min(hi, mean + half)
    if lo > hi:  # the two disagree: asymmetric pairs, take what either allows
        lo, hi = min(lo, mean - half), max(hi, mean + half)
    # Back to milliseconds at the active arm's level.
    shift, low, high = (level * math.expm1(x) for x in (mean, lo, hi))
    sign = 1.0 if spec.direction == "lower" else -1.0
    effect = sign * shift
    low, high = sorted((sign * low, sign * high))
    verdict, why = _decide(spec, effect, low, high, arms.tolerance, "mean paired change")
    slower = int((sign * d > 0).sum())
    worse = "slower" if spec.unit == "ms" else "worse"
    why += (
        f"; paired on the split: candidate {worse} than the active arm in {slower} of {n} "
        f"agent-window(s) of {len({w.agent_id for w in canary})} agent(s)"
    )
    return arms.verdict(spec, looks, verdict, why, effect, low, high)


def _paired_proportion_test(
    spec: MetricSpec,
    canary: Sequence[AgentWindow],
    baseline: Sequence[AgentWindow],
    looks: int,
) -> MetricVerdict:
    pairs = [(c, b) for c, b in _paired(canary, baseline) if c.requests or b.requests]
    cn = sum(c.requests for c, _ in pairs)
    bn = sum(b.requests for _, b in pairs)
    cf = sum(c.failures for c, _ in pairs)
    bf = sum(b.failures for _, b in pairs)
    pb = bf / bn if bn else math.nan
    arms = _Arms(
        canary=cf / cn if cn else math.nan,
        baseline=pb,
        tolerance=spec.tolerance(pb) if bn else spec.abs_tolerance,
        canary_samples=sum(1 for c, _ in pairs if c.requests),
        baseline_samples=sum(1 for _, b in pairs if b.requests),
        canary_requests=cn,
        baseline_requests=bn,
    )
    both = sum(1 for c, b in pairs if c.requests and b.requests)
    if both < spec.min_samples:
        why = (
            f"too few agent-windows with requests on both arms ({both}; at least "
            f"{spec.min_samples})"
        )
        return arms.verdict(spec, looks, "inconclusive", why)
    pc = cf / cn
    # The difference of pooled rates; its variance the larger of the binomial one (one failure
    # and one success added per arm, Agresti-Caffo, so zero failures keep an honest width) and
    # the cluster-robust one over the pairs: each pair's contribution to the difference, so a
    # burst that hits both arms of an agent at once cancels instead of widening.
    binomial = _rate_variance((), cf, cn) + _rate_variance((), bf, bn)
    resid = np.array(
        [
            (c.failures - pc * c.requests) / cn - (b.failures - pb * b.requests) / bn
            for c, b in pairs
        ]
    )
    paired = float((resid**2).sum()) * len(pairs) / (len(pairs) - 1)
    var = max(binomial, paired)
    z = always_valid_z(var, max(spec.abs_tolerance, 1e-4), spec.alpha)
    sign = 1.0 if spec.direction == "lower" else -1.0
    effect = sign * (pc - pb)
    half = z * math.sqrt(var)
    verdict, why = _decide(spec, effect, effect - half, effect + half, arms.tolerance, "difference")
    why += (
        f"; {cf} of {cn} candidate and {bf} of {bn} active-arm request(s) failed, paired over "
        f"{len(pairs)} agent-window(s)"
    )
    return arms.verdict(spec, looks, verdict, why, effect, effect - half, effect + half)


def _rate_variance(windows: Sequence[AgentWindow], failures: int, requests: int) -> float:
    """Variance of one arm's pooled rate: the larger of binomial (Agresti-Caffo) and
    cluster-robust over agent-windows."""
    p_ac = (failures + 1) / (requests + 2)
    binomial = p_ac * (1 - p_ac) / (requests + 2)
    used = [w for w in windows if w.requests]
    k = len(used)
    if k < 2:
        return binomial
    p = failures / requests
    resid = np.array([w.failures - p * w.requests for w in used], dtype=float)
    cluster = float((resid**2).sum()) / requests**2 * k / (k - 1)
    return max(binomial, cluster)


def _fmt(value: float, unit: str) -> str:
    value += 0.0  # no "-0"
    if unit == "ms":
        return f"{value:.3g} ms"
    return f"{value * 100:.3g} pp" if unit == "fraction" else f"{value:.3g}"


def _decide(
    spec: MetricSpec, effect: float, low: float, high: float, tol: float, what: str
) -> tuple[Verdict, str]:
    u = spec.unit
    worse = "slower" if u == "ms" else "worse"
    interval = f"[{_fmt(low, u)}, {_fmt(high, u)}]" if math.isfinite(low) else "unbounded"
    if low > tol:
        return "fail", (
            f"canary {worse} by {_fmt(effect, u)} ({what}); even the interval's best case "
            f"{_fmt(low, u)} exceeds the tolerance {_fmt(tol, u)}"
        )
    if high < tol:
        return "pass", (
            f"canary not {worse} by anything that matters: interval {interval} lies below the "
            f"tolerance {_fmt(tol, u)}"
        )
    return "inconclusive", (
        f"interval {interval} straddles the tolerance {_fmt(tol, u)}: more samples needed"
    )


def judge(
    canary: Sequence[AgentWindow],
    baseline: Sequence[AgentWindow],
    metrics: Sequence[MetricSpec],
    looks: int = 1,
    before: Sequence[AgentWindow] | None = None,
    paired: bool = False,
) -> list[MetricVerdict]:
    """One verdict per metric, canary against baseline.

    ``looks``: how many times this comparison has been judged so far, this one included; said in
    the explanation. The intervals are valid over any number of looks, so it changes no verdict.
    ``before``: samples of every agent of both groups from before the comparison began, all on
    the same (baseline) version. When every agent has its own level there, latency is compared
    as each agent's change against that level, which takes device-to-device speed out of the
    noise (a rollout's canary and baseline agents are different devices; an experiment that
    splits traffic on the same agents needs no ``before``).
    ``paired``: a split, both arms served by the same agents at the same time, windows cut in
    pairs (equal agent, start and end: :meth:`hub.telemetry.TelemetryStore.paired_samples`).
    Each pair is compared within itself (see the module's notes); ``before`` is not used.
    """
    out = []
    for spec in metrics:
        if paired:
            test = _paired_latency_test if spec.kind == "continuous" else _paired_proportion_test
            out.append(test(spec, canary, baseline, looks))
        elif spec.kind == "continuous":
            out.append(_rank_test(spec, canary, baseline, looks, before))
        else:
            out.append(_proportion_test(spec, canary, baseline, looks))
    return out


def combined(verdicts: Sequence[MetricVerdict]) -> Verdict:
    """fail if any fails, pass if all pass, else inconclusive (no metric: pass)."""
    if any(v.verdict == "fail" for v in verdicts):
        return "fail"
    if all(v.verdict == "pass" for v in verdicts):
        return "pass"
    return "inconclusive"


def pool_windows(windows: Sequence[AgentWindow], min_requests: int) -> list[AgentWindow]:
    """Per agent, merge consecutive windows until each holds ``min_requests`` requests.

    Counts add exactly; latency quantiles are the caller's to recompute (see
    :meth:`hub.telemetry.TelemetryStore.samples`, which pools histograms the same way). Here
    for callers that hold samples without histograms: a merged window takes the
    request-weighted mean of its parts' quantiles, an approximation.
    """
    by_agent: dict[str, list[AgentWindow]] = {}
    for w in sorted(windows, key=lambda w: (w.agent_id, w.end)):
        by_agent.setdefault(w.agent_id, []).append(w)
    out: list[AgentWindow] = []
    for parts in by_agent.values():
        acc: list[AgentWindow] = []
        for w in parts:
            acc.append(w)
            if sum(p.requests for p in acc) >= min_requests:
                out.append(_merge(acc, keep_latency=True))
                acc = []
        if acc:
            out.append(_merge(acc, keep_latency=False))
    return out


def _merge(parts: Sequence[AgentWindow], keep_latency: bool) -> AgentWindow:
    req = sum(p.requests for p in parts)
    latency: dict[str, float] = {}
    if keep_latency and req:
        names = {k for p in parts for k in p.latency_ms}
        for name in names:
            vals = [(p.value(name), p.requests) for p in parts if math.isfinite(p.value(name))]
            weight = sum(r for _, r in vals)
            latency[name] = sum(v * r for v, r in vals) / weight if weight else math.nan
    return AgentWindow(
        agent_id=parts[0].agent_id,
        start=parts[0].start,
        end=parts[-1].end,
        requests=req,
        failures=sum(p.failures for p in parts),
        latency_ms=latency,
    )


def verdict_to_json(v: MetricVerdict) -> dict[str, object]:
    """Plain data for the rollout's saved state (NaN and infinities become None)."""

    def num(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {
        "metric": v.metric,
        "verdict": v.verdict,
        "canary": num(v.canary),
        "baseline": num(v.baseline),
        "effect": num(v.effect),
        "low": num(v.low),
        "high": num(v.high),
        "tolerance": v.tolerance,
        "canary_samples": v.canary_samples,
        "baseline_samples": v.baseline_samples,
        "canary_requests": v.canary_requests,
        "baseline_requests": v.baseline_requests,
        "looks": v.looks,
        "unit": v.unit,
        "why": v.why,
    }


__all__ = [
    "ALIASES",
    "DEFAULT_JUDGE",
    "METRICS",
    "AgentWindow",
    "JudgeSpecError",
    "MetricSpec",
    "MetricVerdict",
    "always_valid_z",
    "combined",
    "judge",
    "parse_metric",
    "parse_metrics",
    "pool_windows",
    "sign_test_bound",
    "verdict_to_json",
]
