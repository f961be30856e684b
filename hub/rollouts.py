"""Canary rollouts: a durable state machine, without sockets or clocks.

A rollout moves one model version through waves of the selected agents:

    pending -> wave k: switching -> baking -> (evaluate) -> wave k+1 ... -> done
                 |          |          |
                 |          |          +-> paused (inconclusive: too few requests)
                 +----------+----------+-> rolling_back -> rolled_back   (gate failed, agents
                                                                           failed, timeout)
    any active state -> paused (operator) -> resume; abort / rollback -> rolled_back; promote

:class:`Rollout` holds the whole state as plain data (JSON round-trip), and :meth:`Rollout.step`
takes the current time and an :class:`Observer` (what agents report, what telemetry says) and
returns the assignments to make. :class:`hub.rollout_manager.RolloutManager` does the I/O.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from modelfleet.kernel.errors import InvalidRequestError

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


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    threshold: float

    @classmethod
    def parse(cls, text: str) -> Gate:
        m = _GATE_RE.match(text)
        if not m or m.group(1) not in ABSOLUTE_METRICS + RELATIVE_METRICS:
            raise InvalidRequestError(
                f"invalid gate {text!r}: use METRIC<VALUE with METRIC one of "
                f"{', '.join(ABSOLUTE_METRICS + RELATIVE_METRICS)}"
            )
        return cls(m.group(1), m.group(2), float(m.group(3)))

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

    def validate(self) -> None:
        if not self.waves:
            raise InvalidRequestError("a rollout needs at least one wave")
        for w in self.waves:
            if not re.fullmatch(r"\d+%?", w.strip()):
                raise InvalidRequestError(f"invalid wave {w!r}: use a percentage or a count")
        if self.bake_s < 0 or self.agent_timeout_s <= 0:
            raise InvalidRequestError("bake must be >= 0 and agent timeout > 0")
        if self.strategy not in ("canary", "blue-green"):
            raise InvalidRequestError(f"unknown strategy {self.strategy!r} (canary or blue-green)")
        for g in self.gates:
            Gate.parse(g)


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
    wave_started: float = 0.0
    bake_started: float = 0.0
    paused_from: str = ""
    reason: str = ""
    gate_values: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float = 0.0

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
        return r

    # -- persistence ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Rollout:
        d = dict(data)
        d["spec"] = Spec(**d["spec"])
        return cls(**d)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

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
        elif self.state == "switching":
            # Time spent paused does not count against the agents.
            self.wave_started = now
        self._event(now, "resumed")

    def abort(self, now: float, why: str = "aborted by operator") -> list[tuple[str, int]]:
        """Stop and return every agent of the rollout to its previous version."""
        if not self.active:
            raise InvalidRequestError(f"rollout {self.id} is already {self.state}")
        return self._rollback(now, why)

    def promote(self, now: float) -> list[tuple[str, int]]:
        """Skip the remaining waves: everyone gets the new version now (blue/green: switch)."""
        if not self.active or self.state in ("rolling_back", "preparing"):
            raise InvalidRequestError(f"rollout {self.id} is {self.state}")
        self.wave = len(self.sizes) - 1
        self._event(now, "promoted by operator: all remaining agents now")
        return self._start_wave(now)

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
            return self._check_switching(now, obs)
        if self.state == "baking":
            if now >= self.bake_started + self.spec.bake_s:
                return self._evaluate(now, obs)
            return []
        if self.state == "rolling_back":
            back = [a for a in self.assigned if obs.active_version(a) == self.spec.version]
            if not back or now - self.wave_started > self.spec.agent_timeout_s:
                self.state, self.finished_at = "rolled_back", now
                left = f"; {len(back)} agent(s) had not switched back yet" if back else ""
                self._event(now, f"rolled back{left}")
            return []
        return []

    def _start_wave(self, now: float) -> list[tuple[str, int]]:
        target = self.sizes[self.wave]
        new = [a for a in self.agents[:target] if a not in self.assigned]
        self.assigned += new
        self.state, self.wave_started = "switching", now
        self._event(
            now,
            f"wave {self.wave + 1}/{len(self.sizes)}: assigned {len(new)} "
            f"agent(s), {len(self.assigned)}/{len(self.agents)} in total",
        )
        return [(a, self.spec.version) for a in new]

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
            elif now - self.wave_started > self.spec.agent_timeout_s:
                self.failed[a] = f"{lateness} within {self.spec.agent_timeout_s:g}s"
                self._event(now, f"agent {a} timed out ({lateness})")

    def _check_prepared(self, now: float, obs: Observer) -> list[tuple[str, int]]:
        version = self.spec.version

        def ready(a: str) -> bool:
            return obs.prepared(a, version) or obs.active_version(a) == version

        self._resolve(now, obs, self.agents, self.prepared, "not prepared", ready)
        if len(self.failed) > self.spec.max_failed_agents:
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
        self._resolve(
            now,
            obs,
            self.assigned,
            self.switched,
            "no switch",
            lambda a: obs.active_version(a) == version,
        )
        if len(self.failed) > self.spec.max_failed_agents:
            detail = "; ".join(f"{a}: {w}" for a, w in self.failed.items())
            return self._rollback(
                now,
                f"{len(self.failed)} agent(s) failed (budget "
                f"{self.spec.max_failed_agents}): {detail}",
            )
        if all(a in self.switched or a in self.failed for a in self.assigned):
            self.state, self.bake_started = "baking", now
            self._event(
                now,
                f"wave {self.wave + 1}: {len(self.switched)} agent(s) on "
                f"v{version}; baking {self.spec.bake_s:g}s",
            )
        return []

    def _evaluate(self, now: float, obs: Observer) -> list[tuple[str, int]]:
        since, version = self.bake_started, self.spec.version
        canary = obs.stats(version, self.switched, since, now)
        baseline_agents = [a for a in self.agents if a not in self.assigned]
        baseline_versions = {self.previous.get(a, 0) for a in baseline_agents} - {0}
        baseline = Stats()
        if baseline_agents and len(baseline_versions) == 1:
            baseline = obs.stats(baseline_versions.pop(), baseline_agents, since, now)
        values: dict[str, Any] = {
            "wave": self.wave + 1,
            "at": now,
            "canary_requests": canary.requests,
            "baseline_requests": baseline.requests,
            "gates": [],
        }
        self.gate_values.append(values)
        if canary.requests < self.spec.min_requests:
            self.pause(
                now,
                f"inconclusive: wave {self.wave + 1} saw {canary.requests} "
                f"request(s) in {now - since:.0f}s of bake, fewer than "
                f"--min-requests {self.spec.min_requests}; resume to bake again "
                "or promote",
            )
            self.paused_from = "baking"
            return []
        failures = []
        for text in self.spec.gates:
            gate = Gate.parse(text)
            if gate.metric in ABSOLUTE_METRICS:
                value = canary.value(gate.metric)
            else:
                base_metric = gate.metric.replace("_vs_baseline", "")
                if base_metric.startswith("p"):
                    base_metric += "_ms"  # p99_vs_baseline compares p99_ms
                base = baseline.value(base_metric)
                if baseline.requests < max(1, self.spec.min_requests) or base <= 0:
                    values["gates"].append(
                        {
                            "gate": str(gate),
                            "value": None,
                            "ok": None,
                            "note": "no baseline traffic",
                        }
                    )
                    continue
                value = canary.value(base_metric) / base
            ok = gate.holds(value)
            values["gates"].append({"gate": str(gate), "value": value, "ok": ok})
            if not ok:
                failures.append(f"{gate.metric}={value:.4g} (gate {gate})")
        if failures:
            return self._rollback(now, f"wave {self.wave + 1} failed: {', '.join(failures)}")
        if self.wave + 1 >= len(self.sizes):
            self.state, self.finished_at = "done", now
            self._event(now, f"done: v{version} on {len(self.switched)} agent(s)")
            return []
        self.wave += 1
        return self._start_wave(now)

    def _rollback(self, now: float, why: str) -> list[tuple[str, int]]:
        self.state, self.reason, self.wave_started = "rolling_back", why, now
        self._event(now, f"rolling back: {why}")
        if self.spec.strategy == "blue-green":
            self.prepare_out += [(a, 0) for a in self.agents]  # drop the prepared version
        return [(a, self.previous.get(a, 0)) for a in self.assigned if self.previous.get(a, 0)]

    # -- views ------------------------------------------------------------------------------------

    def summary(self, now: float) -> dict[str, Any]:
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
            "last_evaluation": self.gate_values[-1] if self.gate_values else None,
            "events": self.events[-20:],
        }
