"""Alert rules and their state machine: sans-IO, time injected (docs/monitoring.md).

A rule compares one metric of a model version, measured over a window of fleet telemetry,
with a threshold. Each (rule, model, version, selector) is an alert instance that moves

    inactive --cond--> pending --cond held for_s--> firing --clear held clear_for_s--> resolved

Resolving has hysteresis: a firing alert clears only once the metric is back past the *clear*
threshold (default: the threshold itself) for ``clear_for_s`` seconds, so a value hovering
around the threshold does not flap. "No data" (no telemetry, or too few requests) never makes
an alert pending and counts as clear for a firing one: a version no longer serving resolves.

Metrics come from :class:`MetricSource` objects, one per metric name. Latency and error rate
read the hub's telemetry windows; drift (PSI, :class:`DriftSource`) reads the drift windows
agents report, and accuracy (:class:`AccuracySource`) late labels joined with captured
predictions, both registered by the hub's wiring (hub/app.py).

The I/O shell (storage, the timer, webhook delivery) is :mod:`hub.alert_manager`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from modelfleet.kernel.errors import InvalidRequestError

COMPARISONS = (">", ">=", "<", "<=")
SEVERITIES = ("info", "warning", "critical")
STATES = ("inactive", "pending", "firing", "resolved")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}\Z")


@dataclass(frozen=True)
class MetricInfo:
    unit: str
    description: str


# Every metric a rule may name. Sources for some may not exist yet (see NoDataSource).
METRICS: dict[str, MetricInfo] = {
    "latency_p99_ms": MetricInfo("ms", "99th percentile request latency of successful requests"),
    "error_rate": MetricInfo("ratio", "failed requests / requests"),
    "drift_psi": MetricInfo("psi", "largest population stability index over input features"),
    "accuracy_drop": MetricInfo("ratio", "accuracy below the reference, from late labels"),
}


@dataclass(frozen=True)
class Rule:
    name: str
    metric: str
    comparison: str = ">"
    threshold: float = 0.0
    # The condition must hold this long before the alert fires.
    for_s: float = 60.0
    # Telemetry window each evaluation measures, ending now.
    window_s: float = 300.0
    # A firing alert resolves once the clear condition has held this long...
    clear_for_s: float = 60.0
    # ...the clear condition being "value is no longer past clear_threshold" (None: threshold).
    clear_threshold: float | None = None
    # Which models (fnmatch pattern) and which agents (labels; empty: the whole fleet).
    model: str = "*"
    selector: Mapping[str, str] = field(default_factory=dict)
    severity: str = "warning"
    # Webhook names notified; empty: every webhook.
    webhooks: tuple[str, ...] = ()
    # A retraining trigger: the payload carries model, version, evidence and the capture.
    retrain: bool = False
    # Fewer requests than this in the window is "no data" (a single failure is not 100%).
    min_requests: int = 10
    enabled: bool = True
    builtin: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "selector", dict(sorted(dict(self.selector).items())))
        object.__setattr__(self, "webhooks", tuple(self.webhooks))

    def validate(self) -> Rule:
        if not _NAME.match(self.name):
            raise InvalidRequestError(
                f"invalid rule name {self.name!r}: use 1-63 of a-z 0-9 . _ - (starting with a "
                "letter or digit)"
            )
        if self.metric not in METRICS:
            raise InvalidRequestError(
                f"unknown metric {self.metric!r} in rule {self.name!r}; use one of "
                f"{', '.join(METRICS)}"
            )
        if self.comparison not in COMPARISONS:
            raise InvalidRequestError(
                f"unknown comparison {self.comparison!r} in rule {self.name!r}; use one of "
                f"{' '.join(COMPARISONS)}"
            )
        if self.severity not in SEVERITIES:
            raise InvalidRequestError(
                f"unknown severity {self.severity!r} in rule {self.name!r}; use one of "
                f"{', '.join(SEVERITIES)}"
            )
        for key in ("threshold", "for_s", "window_s", "clear_for_s"):
            if not math.isfinite(getattr(self, key)):
                raise InvalidRequestError(f"rule {self.name!r}: {key} must be a finite number")
        if self.clear_threshold is not None and not math.isfinite(self.clear_threshold):
            raise InvalidRequestError(f"rule {self.name!r}: clear_threshold must be finite")
        if self.for_s < 0 or self.clear_for_s < 0:
            raise InvalidRequestError(f"rule {self.name!r}: for and clear-for must be >= 0")
        if self.window_s <= 0:
            raise InvalidRequestError(f"rule {self.name!r}: the window must be > 0")
        if self.min_requests < 0:
            raise InvalidRequestError(f"rule {self.name!r}: min_requests must be >= 0")
        if self.clear_threshold is not None and _past(
            self.clear_threshold, self.comparison, self.threshold, strict=True
        ):
            raise InvalidRequestError(
                f"rule {self.name!r}: clear_threshold {self.clear_threshold:g} lies beyond the "
                f"threshold {self.threshold:g} (for '{self.comparison}' it must be on the "
                "healthy side, or the alert could never resolve)"
            )
        for name in self.webhooks:
            if not _NAME.match(name):
                raise InvalidRequestError(f"rule {self.name!r}: invalid webhook name {name!r}")
        if not self.model:
            raise InvalidRequestError(f"rule {self.name!r}: model pattern is empty (use '*')")
        return self

    @property
    def clear_at(self) -> float:
        return self.threshold if self.clear_threshold is None else self.clear_threshold

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["selector"] = dict(self.selector)
        d["webhooks"] = list(self.webhooks)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Rule:
        known = {f for f in cls.__dataclass_fields__}
        extra = set(d) - known
        if extra:
            raise InvalidRequestError(f"unknown rule field(s): {', '.join(sorted(extra))}")
        return cls(**dict(d)).validate()


# The product brief's thresholds, in force until a rule of the same name replaces them.
BUILTIN_RULES: tuple[Rule, ...] = (
    Rule("latency-p99", "latency_p99_ms", ">", 100.0, severity="warning", builtin=True),
    Rule("error-rate", "error_rate", ">", 0.01, severity="critical", builtin=True),
    Rule("drift-psi", "drift_psi", ">", 0.2, severity="warning", builtin=True, retrain=True),
    Rule("accuracy-drop", "accuracy_drop", ">", 0.05, severity="warning", builtin=True),
)
BUILTIN_NAMES = frozenset(r.name for r in BUILTIN_RULES)


def rules_in_force(stored: Sequence[Rule]) -> list[Rule]:
    """Built-ins, each replaced by a stored rule of the same name, then the other stored rules."""
    by_name = {r.name: r for r in stored}
    out = [by_name.pop(b.name, b) for b in BUILTIN_RULES]
    return out + sorted(by_name.values(), key=lambda r: r.name)


def _model_specificity(pattern: str) -> tuple[int, int]:
    """Exact names beat patterns, and longer literal parts beat shorter ones."""
    wild = any(c in pattern for c in "*?[")
    return (0 if wild else 1, len(pattern.replace("*", "").replace("?", "")))


def effective_rules(rules: Sequence[Rule], model: str) -> list[Rule]:
    """The rules that apply to ``model``: per (metric, selector) the one whose model pattern is
    the most specific match wins, so ``--model fraud`` overrides the built-in for fraud only
    (and a disabled one silences it there); ties keep every rule."""
    best: dict[tuple[str, tuple[tuple[str, str], ...]], list[Rule]] = {}
    for r in rules:
        if not fnmatch.fnmatchcase(model, r.model):
            continue
        key = (r.metric, tuple(sorted(r.selector.items())))
        held = best.get(key)
        if held is None or _model_specificity(r.model) > _model_specificity(held[0].model):
            best[key] = [r]
        elif _model_specificity(r.model) == _model_specificity(held[0].model):
            held.append(r)
    return [r for group in best.values() for r in group if r.enabled]


# -- measuring -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    version: int
    # None: no data for this version (no telemetry, or below the rule's min_requests).
    value: float | None
    requests: int = 0
    # What the value was computed from, as sent in the payload (counts, percentiles, agents).
    evidence: Mapping[str, Any] = field(default_factory=dict)


class MetricSource(Protocol):
    """One metric, measured per version of a model over the agents ``agents`` (None: all)."""

    # Non-empty: the metric cannot be measured yet, and why (shown by `alerts ls`).
    no_data_reason: str

    def measure(
        self, model: str, agents: Collection[str] | None, since: float, until: float
    ) -> list[Measurement]: ...


class WindowReader(Protocol):
    """The part of the telemetry store port the telemetry sources need."""

    def window(
        self,
        model: str,
        version: int | None,
        agents: Collection[str] | None,
        since: float,
        until: float,
    ) -> list[Any]: ...


class TelemetrySource:
    """Latency and error rate from the hub's telemetry windows (hub.telemetry.WindowStats)."""

    no_data_reason = ""

    def __init__(self, store: WindowReader, metric: str) -> None:
        if metric not in ("latency_p99_ms", "error_rate"):
            raise ValueError(f"no telemetry source for {metric!r}")
        self.store = store
        self.metric = metric

    def measure(
        self, model: str, agents: Collection[str] | None, since: float, until: float
    ) -> list[Measurement]:
        out = []
        for s in self.store.window(model, None, agents, since, until):
            value: float | None
            if self.metric == "error_rate":
                value = s.error_rate
            else:
                # No successful request: no latency sample (the error-rate rule judges that).
                value = None if math.isnan(s.p99_ms) else s.p99_ms
            evidence = {
                "requests": s.requests,
                "failures": s.failures,
                "failures_by_reason": dict(s.failures_by_reason),
                "error_rate": s.error_rate,
                "p50_ms": None if math.isnan(s.p50_ms) else s.p50_ms,
                "p99_ms": None if math.isnan(s.p99_ms) else s.p99_ms,
                "agents": s.agents,
                "window_start": since,
                "window_end": until,
            }
            out.append(Measurement(s.version, value, s.requests, evidence))
        return out


class NoDataSource:
    """A metric whose telemetry does not exist yet: every rule on it reports why."""

    def __init__(self, reason: str) -> None:
        self.no_data_reason = reason

    def measure(
        self, model: str, agents: Collection[str] | None, since: float, until: float
    ) -> list[Measurement]:
        return []


class DriftReader(Protocol):
    """The part of the telemetry store port the drift source needs."""

    def drift_window(
        self,
        model: str,
        version: int | None,
        agents: Collection[str] | None,
        since: float,
        until: float,
    ) -> list[Any]: ...


class DriftSource:
    """``drift_psi``: per version, the largest PSI of any input feature in any agent's drift
    window that ended in the alert window (hub.telemetry.FeatureDrift, fleet-wide rows).

    ``requests`` is the rows scored (a feature's, summed over agents and windows), so a rule's
    ``min_requests`` keeps a handful of rows from raising a drift alert.
    """

    no_data_reason = ""

    def __init__(self, store: DriftReader, top: int = 5) -> None:
        self.store = store
        self.top = top

    def measure(
        self, model: str, agents: Collection[str] | None, since: float, until: float
    ) -> list[Measurement]:
        by_version: dict[int, list[Any]] = {}
        for f in self.store.drift_window(model, None, agents, since, until):
            if not f.agent_id and f.role == "input":
                by_version.setdefault(f.version, []).append(f)
        out = []
        for version, feats in sorted(by_version.items()):
            feats.sort(key=lambda f: f.psi_max, reverse=True)
            worst = feats[0]
            evidence = {
                "feature": worst.feature,
                "tensor": worst.tensor,
                "psi": worst.psi_max,
                "rows": worst.rows,
                "windows": worst.windows,
                "agents": worst.agents,
                "top_features": [
                    {"feature": f.feature, "psi_max": f.psi_max, "psi_mean": f.psi_mean}
                    for f in feats[: self.top]
                ],
                "window_start": since,
                "window_end": until,
            }
            out.append(Measurement(version, worst.psi_max, worst.rows, evidence))
        return out


# A reference version needs this many labelled predictions before accuracy_drop trusts it.
MIN_REFERENCE_LABELS = 30


class OutcomesReader(Protocol):
    """The part of hub.outcomes.OutcomeService the accuracy source needs."""

    def accuracy(
        self,
        model: str,
        version: int = 0,
        since: float = 0.0,
        output: str = "",
        agents: Collection[str] | None = None,
    ) -> Any: ...

    def reference(self, model: str, version: int, min_labels: int) -> tuple[float, str] | None: ...


class AccuracySource:
    """``accuracy_drop``: per version, the reference accuracy minus the version's, from late
    labels joined with captured predictions (hub.outcomes).

    The reference is the operator's baseline (`outcomes baseline`) or else the newest older
    version with MIN_REFERENCE_LABELS labelled predictions; a version without one has no data.
    Labels arrive late, so every labelled prediction of the version counts, not only those of
    the rule's window; ``requests`` is the labelled count, so the rule's ``min_requests`` is the
    number of labels needed before the alert can fire.
    """

    no_data_reason = ""

    def __init__(self, outcomes: OutcomesReader) -> None:
        self.outcomes = outcomes

    def measure(
        self, model: str, agents: Collection[str] | None, since: float, until: float
    ) -> list[Measurement]:
        report = self.outcomes.accuracy(model, agents=agents)
        out = []
        for g in report.groups:
            q = g.quality
            if g.arm != "*" or q.accuracy is None:
                continue
            ref = self.outcomes.reference(model, g.version, MIN_REFERENCE_LABELS)
            evidence = {
                "labelled": q.labelled,
                "accuracy": q.accuracy.value,
                "accuracy_low": q.accuracy.low,
                "accuracy_high": q.accuracy.high,
                "reference": ref[0] if ref else None,
                "reference_from": ref[1] if ref else None,
                "outcomes": report.outcomes,
                "unmatched": report.unmatched,
            }
            value = ref[0] - q.accuracy.value if ref else None
            out.append(Measurement(g.version, value, q.labelled, evidence))
        return out


def default_sources(store: WindowReader) -> dict[str, MetricSource]:
    return {
        "latency_p99_ms": TelemetrySource(store, "latency_p99_ms"),
        "error_rate": TelemetrySource(store, "error_rate"),
        "drift_psi": NoDataSource("no data yet: agents do not report drift scores"),
        "accuracy_drop": NoDataSource("no data yet: no late labels (outcomes) received"),
    }


# -- the state machine ---------------------------------------------------------------------------


def _past(value: float, comparison: str, threshold: float, strict: bool = False) -> bool:
    if comparison == ">":
        return value > threshold
    if comparison == ">=":
        return value > threshold if strict else value >= threshold
    if comparison == "<":
        return value < threshold
    return value < threshold if strict else value <= threshold


def selector_text(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


@dataclass(frozen=True)
class AlertState:
    rule: str
    model: str
    version: int
    selector: str
    state: str = "inactive"
    # pending/firing: when the condition started holding (the episode); resolved: when cleared.
    since: float = 0.0
    # Firing: when the clear condition started holding (0: it does not hold).
    clear_since: float = 0.0
    value: float | None = None
    updated_at: float = 0.0
    evidence: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, int, str]:
        return (self.rule, self.model, self.version, self.selector)


@dataclass(frozen=True)
class Transition:
    """A change worth recording in history and, for firing/resolved, notifying."""

    state: AlertState
    previous: str
    notify: bool
    # When the episode began (pending start): part of the idempotency key.
    episode: float


def advance(
    rule: Rule, prior: AlertState, m: Measurement | None, now: float
) -> tuple[AlertState, Transition | None]:
    """One evaluation of one alert instance (``m`` None: no data): its next state, and the
    transition if the state changed."""
    value = None if m is None or m.value is None else m.value
    if value is not None and m is not None and m.requests < rule.min_requests:
        value = None
    evidence = dict(m.evidence) if m is not None else {}
    held = value is not None and _past(value, rule.comparison, rule.threshold)
    cleared = value is None or not _past(value, rule.comparison, rule.clear_at)
    s = replace(prior, value=value, updated_at=now, evidence=evidence or prior.evidence)

    if prior.state in ("inactive", "resolved"):
        if not held:
            return s, None
        if rule.for_s <= 0:
            firing = replace(s, state="firing", since=now, clear_since=0.0)
            return firing, Transition(firing, prior.state, True, now)
        pending = replace(s, state="pending", since=now, clear_since=0.0)
        return pending, Transition(pending, prior.state, False, now)

    if prior.state == "pending":
        if not held:
            # Never fired: back to quiet without telling anyone.
            quiet = replace(s, state="inactive", since=now, clear_since=0.0)
            return quiet, Transition(quiet, "pending", False, prior.since)
        if now - prior.since >= rule.for_s:
            firing = replace(s, state="firing")
            return firing, Transition(firing, "pending", True, prior.since)
        return s, None

    # firing
    if not cleared:
        return replace(s, clear_since=0.0), None
    clear_since = prior.clear_since or now
    if now - clear_since >= rule.clear_for_s:
        resolved = replace(s, state="resolved", since=now, clear_since=0.0)
        return resolved, Transition(resolved, "firing", True, prior.since)
    return replace(s, clear_since=clear_since), None


def idempotency_key(t: Transition) -> str:
    """The same event (rule, target, episode, state) always gets the same key, so a
    notification redone after a crash or retried carries the key the receiver already saw."""
    s = t.state
    text = f"{s.rule}\x00{s.model}\x00{s.version}\x00{s.selector}\x00{t.episode!r}\x00{s.state}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def payload(
    rule: Rule, t: Transition, key: str, *, hub: str = "", capture: str | None = None
) -> dict[str, Any]:
    """The webhook body (docs/monitoring.md#payload)."""
    s = t.state
    body: dict[str, Any] = {
        "kind": "modelfleet.alert",
        "idempotency_key": key,
        "rule": rule.name,
        "metric": rule.metric,
        "severity": rule.severity,
        "state": s.state,
        "model": s.model,
        "version": s.version,
        "selector": s.selector,
        "value": s.value,
        "comparison": rule.comparison,
        "threshold": rule.threshold,
        "clear_threshold": rule.clear_at,
        "window_s": rule.window_s,
        "for_s": rule.for_s,
        "since": t.episode,
        "at": s.updated_at,
        "evidence": dict(s.evidence),
        "hub": hub,
    }
    if rule.retrain:
        body["retrain"] = {
            "model": s.model,
            "version": s.version,
            "reason": f"{rule.metric} {rule.comparison} {rule.threshold:g}",
            "evidence": dict(s.evidence),
            # Reserved for inference capture: where the captured requests of this version are
            # (null until capture exists or when it is off for the model).
            "captured_data": capture,
        }
    return body


__all__ = [
    "BUILTIN_NAMES",
    "BUILTIN_RULES",
    "METRICS",
    "AccuracySource",
    "AlertState",
    "DriftSource",
    "Measurement",
    "MetricSource",
    "NoDataSource",
    "Rule",
    "TelemetrySource",
    "Transition",
    "advance",
    "default_sources",
    "effective_rules",
    "idempotency_key",
    "payload",
    "rules_in_force",
    "selector_text",
]
