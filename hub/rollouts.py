"""Canary rollouts: a durable state machine, without sockets or clocks.

A rollout moves one model version through waves of the selected agents:

    pending -> wave k: switching -> baking -> (evaluate) -> wave k+1 ... -> done
                 |          |          |
                 |          |          +-> paused (inconclusive: too few requests)
                 +----------+----------+-> rolling_back -> rolled_back   (gate failed, agents
                                                                           failed, timeout)
    any active state -> paused (operator) -> resume; abort / rollback -> rolled_back; promote

A traffic canary (``Spec.traffic``, e.g. 5,25,50,100) runs each wave in steps: the wave's
agents load the new version beside the active one and answer the step's share of requests
with it (a prepare row with a split), bake, are judged, and move to the next share; at 100 the
wave's agents switch (a serve row), bake and are judged as in a plain wave. A failed judgement
returns every agent to 0% at once (serve rows of the previous version supersede the splits).

Pacing (``Spec.rate_base``): the agents a wave assigns go out in batches, one a minute, batch k
taking up to min(rate_max, rate_base * rate_factor**k) agents (AWS IoT Jobs' exponential rate).
Abort criteria: more than ``abort_failed_pct`` percent of the agents resolved so far failed
(refused, or silent past the per-agent timeout), once ``abort_min_agents`` are resolved.

:class:`Rollout` holds the whole state as plain data (JSON round-trip), and :meth:`Rollout.step`
takes the current time and an :class:`Observer` (what agents report, what telemetry says) and
returns the assignments to make. :class:`hub.rollout_manager.RolloutManager` does the I/O.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from modelfleet.hub.judge import (
    AgentWindow,
    JudgeSpecError,
    MetricVerdict,
    combined,
    judge,
    parse_metrics,
    verdict_to_json,
)
from modelfleet.kernel.errors import InvalidRequestError, ModelfleetError, Status

ACTIVE_STATES = ("pending", "preparing", "ready", "switching", "baking", "paused", "rolling_back")
FINAL_STATES = ("done", "rolled_back")

_GATE_RE = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*([0-9.eE+-]+)\s*$")
ABSOLUTE_METRICS = ("error_rate", "p50_ms", "p95_ms", "p99_ms")
RELATIVE_METRICS = (
    "error_rate_vs_baseline",
    "p50_vs_baseline",
    "p95_vs_baseline",
    "p99_vs_baseline",
)
# From late labels (hub.outcomes): the new version's accuracy, and the reference's minus it.
ACCURACY_METRICS = ("accuracy", "accuracy_drop")
# Labelled predictions an accuracy gate needs (of the new version, and of the reference
# version) before it judges; until then the wave bakes on, up to the bake limit.
DEFAULT_MIN_LABELS = 30
# While a wave bakes under the judge, it looks at the telemetry this often (the judge's intervals
# stay valid however often it looks; this bounds the queries).
JUDGE_EVERY_S = 5.0
# An inconclusive judge at the end of the bake keeps the wave baking up to this many bakes
# (unless --max-bake says otherwise), then pauses the rollout for an operator.
MAX_BAKE_FACTOR = 3.0
# The judge compares each agent's latency with its own level over this long before the rollout
# started (all agents then served the previous version): device speed cancels out.
BEFORE_S = 600.0


class RolloutRefusedError(ModelfleetError):
    """A rollout that would change nothing, or go back, without being asked to."""

    status = Status.FAILED_PRECONDITION
    reason = "rollout_refused"


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    threshold: float

    @classmethod
    def parse(
        cls,
        text: str,
        metrics: Sequence[str] = ABSOLUTE_METRICS + RELATIVE_METRICS + ACCURACY_METRICS,
        what: str = "gate",
    ) -> Gate:
        """``METRIC<VALUE`` (or ``<=``, ``>``, ``>=``) with METRIC one of ``metrics``: a
        rollout's gates by default, an experiment's shadow gates with theirs."""
        m = _GATE_RE.match(text)
        if not m or m.group(1) not in metrics:
            raise InvalidRequestError(
                f"invalid {what} {text!r}: use METRIC<VALUE or METRIC>VALUE with METRIC one of "
                f"{', '.join(metrics)}"
            )
        try:
            threshold = float(m.group(3))
        except ValueError:
            raise InvalidRequestError(
                f"invalid {what} {text!r}: {m.group(3)!r} is not a number"
            ) from None
        return cls(m.group(1), m.group(2), threshold)

    def holds(self, value: float) -> bool:
        return {
            "<": value < self.threshold,
            "<=": value <= self.threshold,
            ">": value > self.threshold,
            ">=": value >= self.threshold,
        }[self.op]

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


@dataclass(frozen=True)
class Stats:
    """What telemetry says about a set of agents on one version in a window."""

    requests: int = 0
    failures: int = 0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    def value(self, metric: str) -> float:
        return float(getattr(self, metric))


class Observer(Protocol):
    def active_version(self, agent_id: str) -> int | None: ...

    def refusal(self, agent_id: str, version: int) -> str | None:
        """Why the agent refused ``version`` (gate, verification, disk), or None."""

    def stats(self, version: int, agents: Collection[str], since: float, until: float) -> Stats: ...

    def prepared(self, agent_id: str, version: int) -> bool:
        """Blue/green: the agent holds ``version`` loaded and gated beside the active one."""

    def samples(
        self, version: int, agents: Collection[str], since: float, until: float
    ) -> Sequence[AgentWindow]:
        """The judge's samples: one per agent-window (only asked when the rollout judges)."""

    def paired_samples(
        self,
        version: int,
        baseline_version: int,
        agents: Collection[str],
        since: float,
        until: float,
    ) -> tuple[Sequence[AgentWindow], Sequence[AgentWindow]]:
        """A traffic split's samples (only asked when a split is judged): both arms of each
        agent-window, cut alike so the judge pairs them (``judge(paired=True)``)."""


class AccuracyObserver(Protocol):
    """What an observer that reads late labels adds (only asked for accuracy gates)."""

    def accuracy(self, version: int, since: float) -> tuple[int, float | None]:
        """(labelled predictions, accuracy or None) of ``version``'s predictions since then."""

    def accuracy_baseline(self) -> float | None:
        """The operator's reference accuracy for the model (`outcomes baseline`), if set."""


@dataclass
class Spec:
    model: str
    version: int
    selector: dict[str, str]
    waves: list[str]
    bake_s: float
    gates: list[str]
    min_requests: int = 0
    max_failed_agents: int = 0
    agent_timeout_s: float = 600.0
    strategy: str = "canary"
    # blue-green: switch as soon as every agent is prepared, instead of waiting for promote.
    auto_switch: bool = False
    # A version older than one the selected agents run or are set to run is refused without it.
    allow_downgrade: bool = False
    # Metrics the statistical judge compares, canary against baseline agents (hub.judge), e.g.
    # ["latency", "errors"]; empty: not judged. Clients send the default (DEFAULT_JUDGE).
    judge: list[str] = field(default_factory=list)
    # Longest bake of a wave the judge finds inconclusive; 0: MAX_BAKE_FACTOR bakes.
    max_bake_s: float = 0.0
    # Traffic canary: per wave, the percent of requests the new version answers, step by step
    # (strictly increasing, ending at 100). Empty: each wave switches its agents at once.
    traffic: list[int] = field(default_factory=list)
    # Pacing (see the module's docstring); rate_base 0: every agent of a wave at once.
    rate_base: float = 0.0
    rate_factor: float = 2.0
    rate_max: float = 0.0  # 0: no maximum
    # Abort criteria; abort_failed_pct 0: off (max_failed_agents decides instead).
    abort_failed_pct: float = 0.0
    abort_min_agents: int = 1
    # Accuracy gates judge once this many labelled predictions exist (docs/rollouts.md).
    min_labels: int = DEFAULT_MIN_LABELS

    def validate(self) -> None:
        check_waves(self.waves)
        if self.bake_s < 0 or self.agent_timeout_s <= 0:
            raise InvalidRequestError("bake must be >= 0 and agent timeout > 0")
        if self.min_requests < 0 or self.max_failed_agents < 0:
            raise InvalidRequestError("--min-requests and --max-failed-agents must be >= 0")
        if self.strategy not in ("canary", "blue-green"):
            raise InvalidRequestError(f"unknown strategy {self.strategy!r} (canary or blue-green)")
        for g in self.gates:
            Gate.parse(g)
        try:
            parse_metrics(self.judge)
        except JudgeSpecError as exc:
            raise InvalidRequestError(f"--judge: {exc}") from None
        if self.max_bake_s < 0 or (self.max_bake_s and self.max_bake_s < self.bake_s):
            raise InvalidRequestError(
                f"--max-bake {self.max_bake_s:g}s must be at least --bake {self.bake_s:g}s"
            )
        if self.traffic:
            check_traffic(self.traffic)
            if self.strategy != "canary":
                raise InvalidRequestError(
                    "--traffic steps a canary's share of requests; blue-green switches whole "
                    "agents: use one or the other"
                )
        if self.rate_base < 0 or self.rate_max < 0:
            raise InvalidRequestError("--rate-base and --rate-max must be >= 0 (0: no limit)")
        if self.rate_factor < 1:
            raise InvalidRequestError(
                f"--rate-factor {self.rate_factor:g} must be >= 1 (the rate grows or stays)"
            )
        if not 0 <= self.abort_failed_pct <= 100:
            raise InvalidRequestError(
                f"--abort-failed-pct {self.abort_failed_pct:g} is out of range: 0 (off) to 100"
            )
        if self.abort_min_agents < 1:
            raise InvalidRequestError("--abort-min-agents must be >= 1")
        if self.min_labels < 1:
            raise InvalidRequestError("--min-labels must be >= 1")

    @property
    def bake_limit_s(self) -> float:
        return self.max_bake_s or self.bake_s * MAX_BAKE_FACTOR

    def warnings(self) -> list[str]:
        """Settings that are valid but let a bad version through: said at start and in status."""
        if not self.gates and not self.judge:
            return [
                "no gates: a wave passes once its agents have switched (each agent's health "
                "gate) and baked; traffic is not judged (add --gate, e.g. 'error_rate<0.01')"
            ]
        if self.min_requests == 0:
            return [
                "--min-requests 0: a wave that sees no traffic passes every gate (set "
                "--min-requests so a quiet bake pauses the rollout as inconclusive)"
            ]
        return []


def _verdict_line(v: MetricVerdict) -> str:
    """One judged metric in a reason: its verdict and why, in plain words."""
    return f"{v.metric} {v.verdict.upper()} ({v.why})"


def check_waves(waves: Sequence[str]) -> None:
    """Waves are all percentages (1..100) or all counts (>= 1), strictly increasing."""
    if not waves:
        raise InvalidRequestError("a rollout needs at least one wave")
    for w in waves:
        if not re.fullmatch(r"\d+%?", w.strip()):
            raise InvalidRequestError(f"invalid wave {w!r}: use a percentage or a count")
    percent = [w.strip().endswith("%") for w in waves]
    if any(percent) and not all(percent):
        raise InvalidRequestError(
            f"waves {','.join(waves)} mix percentages and counts: use one kind"
        )
    numbers = [int(w.strip().rstrip("%")) for w in waves]
    unit = "%" if percent[0] else " agent(s)"
    for n in numbers:
        if n < 1 or (percent[0] and n > 100):
            what = "percentages from 1 to 100" if percent[0] else "counts of at least 1"
            raise InvalidRequestError(f"invalid wave {n}{unit}: waves are {what}")
    for before, after in itertools.pairwise(numbers):
        if after <= before:
            raise InvalidRequestError(
                f"waves must increase (each is the cumulative share of the agents): "
                f"{after}{unit} comes after {before}{unit} in {','.join(waves)}"
            )


def check_traffic(steps: Sequence[int]) -> None:
    """Traffic steps are percentages from 1 to 100, strictly increasing, ending at 100."""
    shown = ",".join(str(s) for s in steps)
    for s in steps:
        if not 1 <= s <= 100:
            raise InvalidRequestError(
                f"invalid traffic step {s} in {shown}: steps are percentages from 1 to 100"
            )
    for before, after in itertools.pairwise(steps):
        if after <= before:
            raise InvalidRequestError(
                f"traffic steps must increase: {after} comes after {before} in {shown}"
            )
    if steps[-1] != 100:
        raise InvalidRequestError(
            f"traffic steps {shown} must end at 100 (the wave's agents then switch to the "
            "new version)"
        )


def parse_traffic(text: str) -> list[int]:
    """``5,25,50,100`` (a trailing % allowed) as checked steps."""
    steps = []
    for part in filter(None, (p.strip().rstrip("%") for p in text.split(","))):
        if not part.isdigit():
            raise InvalidRequestError(
                f"invalid traffic step {part!r} in {text!r}: use percentages, e.g. 5,25,50,100"
            )
        steps.append(int(part))
    if not steps:
        raise InvalidRequestError("--traffic needs at least one step, e.g. 5,25,50,100")
    check_traffic(steps)
    return steps


def check_target(spec: Spec, current: Mapping[str, tuple[int, int]]) -> None:
    """Refuse a rollout that changes nothing, or (unless allowed) goes back to an older version.

    ``current``: per selected agent (a name people know), the version the hub wants it to run
    and the version it reports running (0: none).
    """
    if not current:
        raise InvalidRequestError(f"no enrolled agent matches the selector {spec.selector}")
    v, where = spec.version, _where(spec.selector)
    if all(desired == v for desired, _ in current.values()):
        running = sum(1 for _, active in current.values() if active == v)
        raise RolloutRefusedError(
            f"{spec.model} v{v} is already the desired version of all {len(current)} agent(s) "
            f"{where} ({running} run it): nothing to roll out"
        )
    if spec.traffic:
        bare = sorted(a for a, (desired, _) in current.items() if not desired)
        if bare:
            shown = ", ".join(bare[:5]) + (f" and {len(bare) - 5} more" if len(bare) > 5 else "")
            raise RolloutRefusedError(
                f"a traffic canary splits requests between the version an agent runs and "
                f"v{v}: {len(bare)} of the {len(current)} agent(s) {where} run no version of "
                f"{spec.model} ({shown}). Deploy it first, narrow --selector, or roll out "
                "without --traffic"
            )
    newer = {a: max(d, act) for a, (d, act) in current.items() if max(d, act) > v}
    if newer and not spec.allow_downgrade:
        names = sorted(newer)
        shown = ", ".join(f"{a} (v{newer[a]})" for a in names[:5])
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        raise RolloutRefusedError(
            f"{spec.model} v{v} is a downgrade: {len(newer)} of the {len(current)} agent(s) "
            f"{where} run or are set to run a newer version: {shown}{more}. Pass "
            "--allow-downgrade to go back on purpose"
        )


def _where(selector: Mapping[str, str]) -> str:
    if not selector:
        return "of the fleet"
    return "matching " + ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def stable_order(agents: Collection[str], model: str, version: int) -> list[str]:
    """Deterministic canary order: a resumed rollout (or a rerun) picks the same agents."""

    def key(agent: str) -> str:
        return hashlib.sha256(f"{model}/{version}/{agent}".encode()).hexdigest()

    return sorted(agents, key=key)


def wave_sizes(waves: Sequence[str], total: int) -> list[int]:
    """Cumulative agent counts per wave; percentages round up so a wave is never empty."""
    sizes: list[int] = []
    for w in waves:
        w = w.strip()
        n = math.ceil(total * float(w[:-1]) / 100) if w.endswith("%") else int(w)
        sizes.append(min(total, max(n, sizes[-1] if sizes else 0)))
    if not sizes or sizes[-1] < total:
        # The last wave always takes everyone: a rollout that "ends" at 50% is a split.
        sizes.append(total)
    return sizes


@dataclass(frozen=True)
class AgentFacts:
    """What the fleet says about one agent now: shown beside the rollout's own view of it."""

    hostname: str = ""
    active_version: int = 0
    last_error: str = ""  # the error it last reported for the rollout's model


@dataclass
class Rollout:
    id: int
    spec: Spec
    agents: list[str]  # in canary order
    previous: dict[str, int]  # agent -> version it ran before (0: none)
    state: str = "pending"
    wave: int = 0
    sizes: list[int] = field(default_factory=list)
    assigned: list[str] = field(default_factory=list)
    switched: list[str] = field(default_factory=list)
    # Blue/green: agents holding the new version ready beside the old one.
    prepared: list[str] = field(default_factory=list)
    # Preparation requests for the manager (agent, version; 0 clears), taken after each call.
    prepare_out: list[tuple[str, int]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    # agent -> the 1-based wave that assigned it (promote assigns the rest in the last wave).
    assigned_in: dict[str, int] = field(default_factory=dict)
    wave_started: float = 0.0
    bake_started: float = 0.0
    paused_from: str = ""
    reason: str = ""
    gate_values: list[dict[str, Any]] = field(default_factory=list)
    # The judge's latest look at the wave baking now (an evaluation, not yet a decision), and
    # how many looks this wave has had.
    look: dict[str, Any] = field(default_factory=dict)
    looks: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float = 0.0
    # Traffic canary: the index in spec.traffic of the current wave's share.
    traffic_step: int = 0
    # Split requests for the manager (agent, version, split_bp), taken after each call like
    # prepare_out. Version 0 clears the agent's preparation.
    split_out: list[tuple[str, int, int]] = field(default_factory=list)
    # Pacing: agents of the current wave not assigned yet, batches sent, the last one's time.
    queued: list[str] = field(default_factory=list)
    batches: int = 0
    batch_at: float = 0.0
    # agent -> when it was assigned: the agent timeout runs from here (pacing spreads a wave).
    assigned_at: dict[str, float] = field(default_factory=dict)

    @classmethod
    def new(
        cls,
        rollout_id: int,
        spec: Spec,
        agents: Collection[str],
        previous: Mapping[str, int],
        now: float,
    ) -> Rollout:
        spec.validate()
        if not agents:
            raise InvalidRequestError(f"no enrolled agent matches the selector {spec.selector}")
        order = stable_order(agents, spec.model, spec.version)
        r = cls(rollout_id, spec, order, dict(previous), created_at=now, updated_at=now)
        # Blue/green switches everyone at once: one wave of all agents.
        waves = ["100%"] if spec.strategy == "blue-green" else spec.waves
        r.sizes = wave_sizes(waves, len(order))
        r._event(now, f"created for {len(order)} agent(s), waves {r.sizes}")
        for warning in spec.warnings():
            r._event(now, f"warning: {warning}")
        return r

    # -- persistence ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Rollout:
        d = dict(data)
        d["spec"] = Spec(**d["spec"])
        d["split_out"] = [tuple(x) for x in d.get("split_out", [])]
        return cls(**d)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def has_accuracy_gates(self) -> bool:
        return any(Gate.parse(g).metric in ACCURACY_METRICS for g in self.spec.gates)

    def _event(self, now: float, text: str) -> None:
        self.events.append({"at": now, "text": text})
        self.updated_at = now

    def note(self, now: float, text: str) -> None:
        """An event from the I/O around the machine (e.g. the stages a completion set)."""
        self._event(now, text)

    # -- operator commands ------------------------------------------------------------------------

    def pause(self, now: float, why: str = "paused by operator") -> None:
        if self.state in ("pending", "switching", "baking"):
            self.paused_from, self.state, self.reason = self.state, "paused", why
            self._event(now, why)
        elif not self.active:
            raise InvalidRequestError(f"rollout {self.id} is {self.state}")

    def resume(self, now: float) -> None:
        if self.state != "paused":
            raise InvalidRequestError(f"rollout {self.id} is {self.state}, not paused")
        self.state, self.reason = self.paused_from or "switching", ""
        if self.state == "baking":
            # Bake afresh: the pause may have been for lack of traffic.
            self.bake_started = now
            self.look, self.looks = {}, 0
        elif self.state == "switching":
            # Time spent paused does not count against the agents.
            self.wave_started = now
        self._event(now, "resumed")

    def abort(self, now: float, why: str = "aborted by operator") -> list[tuple[str, int]]:
        """Stop and return every agent of the rollout to its previous version."""
        if not self.active:
            raise InvalidRequestError(f"rollout {self.id} is already {self.state}")
        return self._rollback(now, why)

    def rollback_now(
        self, now: float, why: str = "rollback --now by operator"
    ) -> list[tuple[str, int]]:
        """Every agent back to its previous version (0% of traffic) at once, and the rollout
        ends rolled back without waiting for the agents to confirm."""
        out = self.abort(now, why)
        self.state, self.finished_at = "rolled_back", now
        self._event(now, "rolled back at once (--now): the agents follow on their own")
        return out

    def promote(self, now: float) -> list[tuple[str, int]]:
        """Skip the remaining waves: everyone gets the new version now (blue/green: switch)."""
        if not self.active or self.state in ("rolling_back", "preparing"):
            raise InvalidRequestError(f"rollout {self.id} is {self.state}")
        # A wave on a traffic split switches too: promote means the whole share, everywhere.
        splitting = (
            [a for a in self._wave_agents() if a not in self.failed] if self._splitting() else []
        )
        self.switched = [a for a in self.switched if a not in splitting]
        self.wave = len(self.sizes) - 1
        self._event(now, "promoted by operator: all remaining agents now")
        return [(a, self.spec.version) for a in splitting] + self._start_wave(now, paced=False)

    # -- traffic canary and pacing --------------------------------------------------------------

    def share(self) -> int:
        """The percent of the current wave's requests the new version answers."""
        if not self.spec.traffic:
            return 100
        return self.spec.traffic[min(self.traffic_step, len(self.spec.traffic) - 1)]

    def _splitting(self) -> bool:
        return self.share() < 100

    def _wave_agents(self) -> list[str]:
        return [a for a in self.assigned if self.assigned_in.get(a) == self.wave + 1]

    def _release(self, now: float) -> list[tuple[str, int]]:
        """Assign the next batch of queued agents when pacing lets it go (all without pacing):
        serve rows, or split rows while the wave's share is under 100%."""
        if not self.queued:
            return []
        if self.spec.rate_base > 0:
            if self.batches and now < self.batch_at + 60:
                return []
            n = self.spec.rate_base * self.spec.rate_factor**self.batches
            if self.spec.rate_max > 0:
                n = min(n, self.spec.rate_max)
            count = max(1, int(n))
            self.batches, self.batch_at = self.batches + 1, now
        else:
            count = len(self.queued)
        batch, self.queued = self.queued[:count], self.queued[count:]
        self.assigned += batch
        self.assigned_in.update((a, self.wave + 1) for a in batch)
        self.assigned_at.update((a, now) for a in batch)
        if self.spec.rate_base > 0:
            self._event(
                now,
                f"wave {self.wave + 1}: batch {self.batches} assigned {len(batch)} agent(s)"
                + (f", {len(self.queued)} queued" if self.queued else ""),
            )
        if self._splitting():
            bp = self.share() * 100
            self.split_out += [(a, self.spec.version, bp) for a in batch]
            return []
        return [(a, self.spec.version) for a in batch]

    def _next_step(self, now: float) -> list[tuple[str, int]]:
        """The judgement passed on a split: the next share (at 100: the wave's agents switch)."""
        self.traffic_step += 1
        agents = [a for a in self._wave_agents() if a not in self.failed]
        version = self.spec.version
        if self._splitting():
            bp = self.share() * 100
            self.split_out += [(a, version, bp) for a in agents]
            self.state, self.bake_started = "baking", now
            self.look, self.looks = {}, 0
            self._event(
                now,
                f"wave {self.wave + 1}: v{version} answers {self.share()}% of requests on "
                f"{len(agents)} agent(s); baking {self.spec.bake_s:g}s",
            )
            return []
        # 100%: a serve row; the wave waits for the agents to switch, then bakes as usual.
        self.switched = [a for a in self.switched if a not in agents]
        self.state, self.wave_started = "switching", now
        self._event(
            now, f"wave {self.wave + 1}: 100% of requests: switching {len(agents)} agent(s)"
        )
        return [(a, version) for a in agents]

    def _too_many_failed(self, resolved: int) -> str | None:
        """Why the failures so far stop the rollout (None: they do not)."""
        n = len(self.failed)
        if self.spec.abort_failed_pct > 0:
            if resolved < self.spec.abort_min_agents or n == 0:
                return None
            pct = 100.0 * n / resolved
            if pct <= self.spec.abort_failed_pct:
                return None
            return (
                f"{n} of {resolved} agent(s) failed ({pct:.0f}% > --abort-failed-pct "
                f"{self.spec.abort_failed_pct:g}, after --abort-min-agents "
                f"{self.spec.abort_min_agents})"
            )
        if n <= self.spec.max_failed_agents:
            return None
        return f"{n} agent(s) failed (budget {self.spec.max_failed_agents})"

    # -- the machine ------------------------------------------------------------------------------

    def step(self, now: float, obs: Observer) -> list[tuple[str, int]]:
        """Advance as far as the observations allow; return (agent, version) assignments."""
        out: list[tuple[str, int]] = []
        for _ in range(len(self.sizes) * 3 + 3):  # bounded: at most a few transitions a wave
            before = (self.state, self.wave)
            out += self._step_once(now, obs)
            if (self.state, self.wave) == before:
                break
        return out

    def _step_once(self, now: float, obs: Observer) -> list[tuple[str, int]]:
        if self.state == "pending" and self.spec.strategy == "blue-green":
            self.state, self.wave_started = "preparing", now
            self.prepare_out += [(a, self.spec.version) for a in self.agents]
            self._event(
                now,
                f"preparing v{self.spec.version} beside the serving version on "
                f"{len(self.agents)} agent(s)",
            )
            return []
        if self.state == "preparing":
            return self._check_prepared(now, obs)
        if self.state == "ready":
            return []  # waits for promote
        if self.state == "pending":
            return self._start_wave(now)
        if self.state == "switching":
            return self._release(now) + self._check_switching(now, obs)
        if self.state == "baking":
            if now >= self.bake_started + self.spec.bake_s:
                if self.look.get("final") and now - self.look["at"] < JUDGE_EVERY_S:
                    return []  # baking on past the bake: the judge looks at its pace
                return self._evaluate(now, obs)
            if self.spec.judge and now - self.look.get("at", 0.0) >= JUDGE_EVERY_S:
                return self._evaluate(now, obs, early=True)
            return []
        if self.state == "rolling_back":
            back = [a for a in self.assigned if obs.active_version(a) == self.spec.version]
            if not back or now - self.wave_started > self.spec.agent_timeout_s:
                self.state, self.finished_at = "rolled_back", now
                left = f"; {len(back)} agent(s) had not switched back yet" if back else ""
                self._event(now, f"rolled back{left}")
            return []
        return []

    def _start_wave(self, now: float, paced: bool = True) -> list[tuple[str, int]]:
        target = self.sizes[self.wave]
        new = [a for a in self.agents[:target] if a not in self.assigned and a not in self.queued]
        # promote: no pacing and no traffic steps, everyone at once on a serve row.
        self.traffic_step = 0 if paced else len(self.spec.traffic)
        self.queued += new
        self.state, self.wave_started = "switching", now
        share = (
            f", v{self.spec.version} answering {self.share()}% of their requests"
            if self._splitting()
            else ""
        )
        self._event(
            now,
            f"wave {self.wave + 1}/{len(self.sizes)}: assigned {len(new)} "
            f"agent(s), {len(self.assigned) + len(self.queued)}/{len(self.agents)} in total{share}",
        )
        if not paced:
            base, self.spec.rate_base = self.spec.rate_base, 0.0
            try:
                return self._release(now)
            finally:
                self.spec.rate_base = base
        return self._release(now)

    def _resolve(
        self,
        now: float,
        obs: Observer,
        agents: list[str],
        done: list[str],
        lateness: str,
        reached: Callable[[str], bool],
    ) -> None:
        """Move each pending agent to ``done`` (it reached the state) or to ``failed`` (it
        refused the version, or stayed silent past the agent timeout)."""
        version = self.spec.version
        for a in agents:
            if a in done or a in self.failed:
                continue
            if reached(a):
                done.append(a)
                continue
            why = obs.refusal(a, version)
            if why:
                self.failed[a] = why
                self._event(now, f"agent {a} refused v{version}: {why}")
            elif (
                now - max(self.wave_started, self.assigned_at.get(a, 0.0))
                > self.spec.agent_timeout_s
            ):
                self.failed[a] = f"{lateness} within {self.spec.agent_timeout_s:g}s"
                self._event(now, f"agent {a} timed out ({lateness})")

    def _check_prepared(self, now: float, obs: Observer) -> list[tuple[str, int]]:
        version = self.spec.version

        def ready(a: str) -> bool:
            return obs.prepared(a, version) or obs.active_version(a) == version

        self._resolve(now, obs, self.agents, self.prepared, "not prepared", ready)
        if self._too_many_failed(len(self.prepared) + len(self.failed)):
            detail = "; ".join(f"{a}: {w}" for a, w in self.failed.items())
            return self._rollback(now, f"{len(self.failed)} agent(s) failed to prepare: {detail}")
        if all(a in self.prepared or a in self.failed for a in self.agents):
            self.state = "ready"
            self._event(
                now,
                f"v{version} ready on {len(self.prepared)} agent(s)"
                + (
                    "; switching"
                    if self.spec.auto_switch
                    else "; `rollout promote` switches them all at once"
                ),
            )
            if self.spec.auto_switch:
                return self._start_wave(now)
        return []

    def _check_switching(self, now: float, obs: Observer) -> list[tuple[str, int]]:
        version = self.spec.version
        splitting = self._splitting()

        def reached(a: str) -> bool:
            # A split needs the version loaded and gated beside the active one.
            if splitting and obs.prepared(a, version):
                return True
            return obs.active_version(a) == version

        self._resolve(
            now,
            obs,
            self.assigned,
            self.switched,
            "not loaded" if splitting else "no switch",
            reached,
        )
        why = self._too_many_failed(len(self.switched) + len(self.failed))
        if why:
            detail = "; ".join(f"{a}: {w}" for a, w in self.failed.items())
            return self._rollback(now, f"{why}: {detail}")
        if not self.queued and all(a in self.switched or a in self.failed for a in self.assigned):
            self.state, self.bake_started = "baking", now
            self.look, self.looks = {}, 0
            share = f" answering {self.share()}% of the wave's requests" if splitting else ""
            self._event(
                now,
                f"wave {self.wave + 1}: {len(self.switched)} agent(s) on "
                f"v{version}{share}; baking {self.spec.bake_s:g}s",
            )
        return []

    def _evaluate(self, now: float, obs: Observer, early: bool = False) -> list[tuple[str, int]]:
        """Judge the wave baking now: at the end of its bake, or (``early``) at a look of the
        statistical judge during it.

        The rule: a failing gate (at the end of the bake) or a failing judged metric (at any
        look: the judge's intervals are valid however often it looks) rolls back. A wave passes
        at the end of its bake when its gates hold and the judge passes or has nothing to judge
        (no baseline agents, or no canary traffic with --min-requests 0); it passes early, at a
        look, when every judged metric passes, every gate holds on the traffic so far and the
        canary has served --min-requests (at least one). A judge still inconclusive at the end
        of the bake keeps the wave baking, looking every JUDGE_EVERY_S, up to the bake limit
        (--max-bake); then the rollout pauses for an operator.
        """
        since, version = self.bake_started, self.spec.version
        canary = obs.stats(version, self.switched, since, now)
        baseline_agents = self._baseline_agents()
        baseline_versions = {self.previous.get(a, 0) for a in baseline_agents} - {0}
        baseline, baseline_version = Stats(), 0
        if baseline_agents and len(baseline_versions) == 1:
            baseline_version = baseline_versions.pop()
            baseline = obs.stats(baseline_version, baseline_agents, since, now)
        values: dict[str, Any] = {
            "wave": self.wave + 1,
            "at": now,
            "since": since,
            "canary_requests": canary.requests,
            "baseline_requests": baseline.requests,
            "canary_failures": canary.failures,
            "baseline_failures": baseline.failures,
            "canary_agents": len(self.switched),
            "baseline_agents": len(baseline_agents) if baseline_version else 0,
            "baseline_version": baseline_version,
            "gates": [],
            "final": not early,
        }
        verdict, verdicts, note = self._judge(now, obs, canary, baseline_agents, baseline_version)
        values.update(
            verdicts=[verdict_to_json(v) for v in verdicts], looks=self.looks, judge_note=note
        )
        failures: list[str] = []
        # Accuracy gates still waiting for labels: the wave bakes on (up to the bake limit).
        waiting: list[str] = []
        for text in self.spec.gates:
            gate = Gate.parse(text)
            metric = gate.metric
            if metric in ACCURACY_METRICS:
                entry = self._accuracy_gate(gate, obs)
                values["gates"].append(entry)
                if entry["ok"] is None:
                    waiting.append(f"{gate}: {entry['note']}")
                elif not entry["ok"]:
                    failures.append(f"{gate.metric}={entry['value']:.4g} (gate {gate})")
                continue
            if metric in RELATIVE_METRICS:
                metric = metric.replace("_vs_baseline", "")
                if metric.startswith("p"):
                    metric += "_ms"  # p99_vs_baseline compares p99_ms
            # The figures behind the verdict, shown by `rollout status` (None: no traffic).
            seen = {
                "canary": canary.value(metric) if canary.requests else None,
                "baseline": baseline.value(metric) if baseline.requests else None,
            }
            if gate.metric in ABSOLUTE_METRICS:
                value = canary.value(gate.metric)
            else:
                base = baseline.value(metric)
                if baseline.requests < max(1, self.spec.min_requests) or base <= 0:
                    values["gates"].append(
                        {
                            "gate": str(gate),
                            "value": None,
                            "ok": None,
                            "note": "no baseline traffic",
                            **seen,
                        }
                    )
                    continue
                value = canary.value(metric) / base
            ok = gate.holds(value)
            values["gates"].append({"gate": str(gate), "value": value, "ok": ok, **seen})
            if not ok:
                failures.append(f"{gate.metric}={value:.4g} (gate {gate})")
        judged = [_verdict_line(v) for v in verdicts if v.verdict == "fail"]
        if early:
            self.look = values
            if verdict == "fail":
                self.gate_values.append(values)
                return self._rollback(
                    now, f"wave {self.wave + 1} failed the judge: {'; '.join(judged)}"
                )
            if (
                verdict == "pass"
                and not failures
                and not waiting
                and canary.requests >= max(1, self.spec.min_requests)
            ):
                self.gate_values.append(values)
                self._event(
                    now,
                    f"wave {self.wave + 1} passed early, after {now - since:.0f}s of "
                    f"{self.spec.bake_s:g}s bake: "
                    + ", ".join(f"{v.metric} {v.verdict}" for v in verdicts),
                )
                return self._next_wave(now)
            return []
        if canary.requests < self.spec.min_requests:
            self.gate_values.append(values)
            self.pause(
                now,
                f"inconclusive: wave {self.wave + 1} saw {canary.requests} "
                f"request(s) in {now - since:.0f}s of bake, fewer than "
                f"--min-requests {self.spec.min_requests}; resume to bake again "
                "or promote",
            )
            self.paused_from = "baking"
            return []
        if failures or judged:
            self.gate_values.append(values)
            return self._rollback(
                now, f"wave {self.wave + 1} failed: {', '.join(failures + judged)}"
            )
        if verdict == "inconclusive" or waiting:
            limit = self.spec.bake_limit_s
            open_ = []
            if verdict == "inconclusive":
                open_.append(
                    f"the judge is inconclusive after {now - since:.0f}s ("
                    + ", ".join(f"{v.metric} {v.verdict}" for v in verdicts)
                    + ")"
                )
            open_ += [f"waiting for labels ({w})" for w in waiting]
            if now - since < limit:
                if not self.look.get("final"):
                    self._event(
                        now,
                        f"wave {self.wave + 1}: {'; '.join(open_)}; baking on, up to {limit:g}s",
                    )
                self.look = values
                return []
            self.gate_values.append(values)
            undecided = [_verdict_line(v) for v in verdicts if v.verdict == "inconclusive"]
            undecided += [f"too few labels for {w}" for w in waiting]
            who = "the judge cannot tell" if verdict == "inconclusive" else "cannot tell"
            self.pause(
                now,
                f"inconclusive: wave {self.wave + 1} baked {now - since:.0f}s (--max-bake "
                f"{limit:g}s) and {who}: {'; '.join(undecided)}; resume to "
                "bake again, promote, or roll back",
            )
            self.paused_from = "baking"
            return []
        self.gate_values.append(values)
        if verdicts:
            self._event(
                now,
                f"wave {self.wave + 1} passed after {now - since:.0f}s of bake: "
                + ", ".join(f"{v.metric} {v.verdict}" for v in verdicts),
            )
        return self._next_wave(now)

    def _next_wave(self, now: float) -> list[tuple[str, int]]:
        if self._splitting():
            return self._next_step(now)
        if self.wave + 1 >= len(self.sizes):
            self.state, self.finished_at = "done", now
            self._event(now, f"done: v{self.spec.version} on {len(self.switched)} agent(s)")
            return []
        self.wave += 1
        return self._start_wave(now)

    def _accuracy_gate(self, gate: Gate, obs: Observer) -> dict[str, Any]:
        """An accuracy gate on the labels so far: ok None (with a note) until the new version,
        and for accuracy_drop the reference, have --min-labels labelled predictions."""
        need = self.spec.min_labels
        entry: dict[str, Any] = {"gate": str(gate), "value": None, "ok": None}
        if not hasattr(obs, "accuracy"):
            return {**entry, "note": "this hub reads no outcomes"}
        acc_obs: AccuracyObserver = obs  # type: ignore[assignment]
        # The new version's predictions since the rollout began.
        n, acc = acc_obs.accuracy(self.spec.version, self.created_at)
        entry.update(canary=acc, labels=n)
        if acc is None or n < need:
            return {**entry, "note": f"{n} of {need} labelled predictions (--min-labels)"}
        entry["note"] = f"{n} labelled"
        if gate.metric == "accuracy":
            return {**entry, "value": acc, "ok": gate.holds(acc)}
        reference = acc_obs.accuracy_baseline()
        if reference is None:
            versions = [v for v in self.previous.values() if v]
            if not versions:
                return {**entry, "note": "no reference: no previous version and no baseline"}
            ref_version = max(set(versions), key=versions.count)
            ref_n, ref_acc = acc_obs.accuracy(ref_version, 0.0)
            if ref_acc is None or ref_n < need:
                return {
                    **entry,
                    "note": f"reference v{ref_version} has {ref_n} of {need} labelled "
                    "predictions (or set one: `modelfleet-hub outcomes baseline`)",
                }
            reference = ref_acc
        drop = reference - acc
        return {**entry, "baseline": reference, "value": drop, "ok": gate.holds(drop)}

    def _judge(
        self,
        now: float,
        obs: Observer,
        canary: Stats,
        baseline_agents: list[str],
        baseline_version: int,
    ) -> tuple[str | None, list[MetricVerdict], str]:
        """The judge's combined verdict (None: not applied, the note says why) and per-metric
        verdicts for the bake so far."""
        if not self.spec.judge:
            return None, [], ""
        if not baseline_version:
            return None, [], "not judged: no baseline (no agent left on one previous version)"
        if canary.requests == 0 and self.spec.min_requests == 0:
            return None, [], "not judged: no canary traffic (--min-requests 0)"
        self.looks += 1
        since = self.bake_started
        metrics = parse_metrics(self.spec.judge)
        if self.spec.traffic and self._splitting():
            # Both arms run on the wave's agents at the same moments: each agent-window's
            # candidate arm is judged against its own active arm (the device, its load and the
            # moment cancel), pair by pair.
            c, b = obs.paired_samples(
                self.spec.version, baseline_version, self._wave_agents(), since, now
            )
            verdicts = judge(c, b, metrics, self.looks, paired=True)
            return combined(verdicts), verdicts, ""
        c = obs.samples(self.spec.version, self.switched, since, now)
        b = obs.samples(baseline_version, baseline_agents, since, now)
        agents = [*self.switched, *baseline_agents]
        before = obs.samples(baseline_version, agents, self.created_at - BEFORE_S, self.created_at)
        verdicts = judge(c, b, metrics, self.looks, before)
        return combined(verdicts), verdicts, ""

    def _baseline_agents(self) -> list[str]:
        """Agents whose previous version's requests are the baseline: those not assigned yet,
        and, on a traffic split, the wave's agents (the share the old version still answers)."""
        split = set(self._wave_agents()) if self._splitting() else set()
        return [a for a in self.agents if a not in self.assigned or a in split]

    def _rollback(self, now: float, why: str) -> list[tuple[str, int]]:
        self.state, self.reason, self.wave_started = "rolling_back", why, now
        self._event(now, f"rolling back: {why}")
        self.queued = []
        if self.spec.strategy == "blue-green":
            self.prepare_out += [(a, 0) for a in self.agents]  # drop the prepared version
        if self.spec.traffic:
            # Every split to 0% now; the serve rows below (written after) supersede these
            # where the agent had a previous version.
            self.split_out += [(a, 0, 0) for a in self.assigned]
        return [(a, self.previous.get(a, 0)) for a in self.assigned if self.previous.get(a, 0)]

    # -- views ------------------------------------------------------------------------------------

    def per_agent(self, facts: Mapping[str, AgentFacts]) -> list[dict[str, Any]]:
        """Every agent in canary order: its role, the wave that took it, where it stands."""
        assigned = set(self.assigned)
        out = []
        for a in self.agents:
            f = facts.get(a, AgentFacts())
            if a in self.failed:
                state = "failed"
            elif a in assigned and self.state in ("rolling_back", "rolled_back"):
                # The engine's own test: back once it no longer serves the rolled-out version.
                on_new = f.active_version == self.spec.version
                state = "rolling_back" if on_new else "rolled_back"
            elif a in assigned and self._splitting() and self.assigned_in.get(a) == self.wave + 1:
                state = f"split {self.share()}%" if a in self.switched else "loading"
            elif a in assigned:
                state = "switched" if a in self.switched else "switching"
            elif self.state in ("rolling_back", "rolled_back", "done"):
                state = "unchanged"
            elif a in self.prepared:
                state = "prepared"
            elif a in self.queued:
                state = "queued"
            elif self.state == "preparing":
                state = "preparing"
            else:
                state = "waiting"
            out.append(
                {
                    "agent_id": a,
                    "hostname": f.hostname,
                    "role": "canary" if a in assigned else "baseline",
                    "wave": self.assigned_in.get(a, 0) if a in assigned else 0,
                    "previous_version": self.previous.get(a, 0),
                    "active_version": f.active_version,
                    "state": state,
                    "last_error": self.failed.get(a) or f.last_error,
                }
            )
        return out

    def summary(self, now: float, facts: Mapping[str, AgentFacts] | None = None) -> dict[str, Any]:
        """The status view; ``facts`` (per agent id) adds the per-agent view, else it is empty."""
        bake_left = 0.0
        if self.state == "baking":
            bake_left = max(0.0, self.bake_started + self.spec.bake_s - now)
        return {
            "id": self.id,
            "model": self.spec.model,
            "version": self.spec.version,
            "state": self.state,
            "wave": self.wave + 1,
            "waves": self.sizes,
            "agents": len(self.agents),
            "assigned": len(self.assigned),
            "switched": len(self.switched),
            "prepared": len(self.prepared),
            "strategy": self.spec.strategy,
            "failed": self.failed,
            "bake_left_s": bake_left,
            "reason": self.reason,
            "gates": self.spec.gates,
            "last_evaluation": self._last_evaluation(),
            "events": self.events[-20:],
            "per_agent": self.per_agent(facts) if facts is not None else [],
            "warnings": self.spec.warnings(),
            "selector": dict(self.spec.selector),
            "bake_s": self.spec.bake_s,
            "min_requests": self.spec.min_requests,
            "max_failed_agents": self.spec.max_failed_agents,
            "agent_timeout_s": self.spec.agent_timeout_s,
            "auto_switch": self.spec.auto_switch,
            "allow_downgrade": self.spec.allow_downgrade,
            "judge": list(self.spec.judge),
            "max_bake_s": self.spec.bake_limit_s,
            "traffic": list(self.spec.traffic),
            # The current wave's share of requests on the new version (0: not a traffic canary).
            "traffic_percent": self.share() if self.spec.traffic else 0,
            "queued": len(self.queued),
            "rate_base": self.spec.rate_base,
            "rate_factor": self.spec.rate_factor,
            "rate_max": self.spec.rate_max,
            "abort_failed_pct": self.spec.abort_failed_pct,
            "abort_min_agents": self.spec.abort_min_agents,
            "min_labels": self.spec.min_labels,
        }

    def _last_evaluation(self) -> dict[str, Any] | None:
        """The newest of the last decision and the judge's latest look at the wave baking."""
        last = self.gate_values[-1] if self.gate_values else None
        if self.look and self.state == "baking" and (not last or self.look["at"] > last["at"]):
            return self.look
        return last
