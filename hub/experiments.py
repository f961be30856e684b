"""Experiments: a candidate version judged against the running one on live traffic.

An experiment is one prepare row in the deployments log (``kind="prepare"`` for the selector,
with ``split_bp`` or ``shadow_bp``, see :class:`hub.registry.Desired`): each selected agent
loads the candidate beside the version it runs and either answers a share of the requests with
it (a split, sticky by routing key when asked) or runs a share of them again on it after the
response (a shadow). Agents do the work; the hub keeps the experiment (a row of its own, JSON,
durable across hub restarts), ends it when its duration is over, and reads telemetry per arm:

    running -> stopped   (`experiment stop`: the prepare row is removed, agents drop the candidate)
            -> promoted  (`experiment promote`: a serve row of the candidate for the selector)
            -> ended     (--duration reached: as stop)

Refused at start: an unknown, retired or unsigned candidate; a candidate some selected agent
already runs (nothing to compare) or an agent that runs no version of the model; a running
experiment or an active rollout of the model on any of the same agents; shares out of range.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from modelfleet.hub.judge import (
    DEFAULT_JUDGE,
    JudgeSpecError,
    MetricVerdict,
    combined,
    judge,
    parse_metrics,
)
from modelfleet.hub.registry import FailedPreconditionError, check_labels, selector_matches
from modelfleet.hub.rollouts import ACCURACY_METRICS, DEFAULT_MIN_LABELS, Gate
from modelfleet.kernel.errors import InvalidRequestError, ModelNotFoundError

if TYPE_CHECKING:
    from modelfleet.hub.ports import RegistryPort
    from modelfleet.hub.rollouts import Rollout

log = logging.getLogger(__name__)

RUNNING = "running"
FINAL_STATES = ("stopped", "promoted", "ended")
MODES = ("split", "shadow")

# A shadow's candidate answers nobody, so there is no traffic to judge it on: its verdict comes
# from thresholds on how far its outputs are from the active version's (issue 15 item 3).
DEFAULT_SHADOW_GATES = ("shadow_agreement>0.98", "shadow_abs_diff_p99<0.05")
# Shadow metric -> the ShadowView field it reads.
SHADOW_METRICS = {
    "shadow_agreement": "top1_agreement",
    "shadow_abs_diff_p50": "abs_diff_p50",
    "shadow_abs_diff_p99": "abs_diff_p99",
    "shadow_rel_diff_p99": "rel_diff_p99",
    "shadow_js_p99": "js_p99",
    "shadow_failure_rate": "failure_rate",
    "shadow_latency_p99_ms": "shadow_latency_p99_ms",
}
# Comparisons a shadow verdict needs before it says pass or fail.
MIN_SHADOW_COMPARED = 100


def parse_shadow_gate(text: str) -> Gate:
    """A shadow gate is a rollout gate over the shadow metrics (same syntax, same checks)."""
    return Gate.parse(text, tuple(SHADOW_METRICS), "shadow gate")


def parse_accuracy_gate(text: str) -> Gate:
    """A split's gate on late labels: a rollout's accuracy gate (same syntax, same checks)."""
    return Gate.parse(text, ACCURACY_METRICS, "split gate")


@dataclass(frozen=True)
class ShadowGateResult:
    gate: str
    value: float | None
    ok: bool | None  # None: not judged (too few comparisons, or no such figure for this model)
    why: str


def selector_text(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "(whole fleet)"


def share_bp(percent: float, mode: str) -> int:
    """A share in percent as basis points, refused out of range: a split is more than 0 and
    less than 100 percent (100% is a deployment, not two arms), a shadow more than 0 and at
    most 100 percent."""
    flag = f"--{mode}"
    if not math.isfinite(percent):
        raise InvalidRequestError(f"{flag} {percent} is not a number of percent")
    bp = round(percent * 100)
    if mode == "split" and not 1 <= bp <= 9999:
        raise InvalidRequestError(
            f"{flag} {percent:g} is out of range: a split sends more than 0 and less than 100 "
            "percent of the requests to the candidate, at 0.01% steps (for 100%, deploy or "
            "roll out the version)"
        )
    if mode == "shadow" and not 1 <= bp <= 10000:
        raise InvalidRequestError(
            f"{flag} {percent:g} is out of range: a shadow copies more than 0 and at most "
            "100 percent of the requests to the candidate, at 0.01% steps"
        )
    return bp


@dataclass
class Experiment:
    id: int
    model: str
    candidate: int
    selector: dict[str, str]
    mode: str  # split or shadow
    share_bp: int
    sticky: bool = False
    duration_s: float = 0.0  # 0: until stopped or promoted
    state: str = RUNNING
    created_at: float = 0.0
    ends_at: float = 0.0  # 0: no end set
    finished_at: float = 0.0
    reason: str = ""
    actor: str = ""
    # The prepare row that carries the comparison to the agents; the serve row of a promotion.
    deployment_id: int = 0
    promoted_deployment_id: int = 0
    # agent id -> the version it was desired to run at start: the active arm.
    baseline: dict[str, int] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    # What decides the verdict: judged metrics for a split (hub.judge), thresholds on the
    # output comparison for a shadow (parse_shadow_gate). Experiments saved before either existed
    # read back with the defaults.
    judge: list[str] = field(default_factory=lambda: list(DEFAULT_JUDGE))
    gates: list[str] = field(default_factory=lambda: list(DEFAULT_SHADOW_GATES))

    @property
    def label(self) -> str:
        """The comparison label agents carry in telemetry (fleet.proto DesiredModel)."""
        return f"experiment {self.id}"

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    def describe(self) -> str:
        share = f"{self.share_bp / 100:g}%"
        if self.mode == "split":
            what = f"split {share}" + (", sticky" if self.sticky else "")
        else:
            what = f"shadow {share}"
        where = selector_text(self.selector)
        return f"experiment {self.id} of {self.model} (v{self.candidate}, {what}, {where})"

    def event(self, now: float, text: str) -> None:
        self.events.append({"at": now, "text": text})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Experiment:
        return cls(**dict(data))


@dataclass(frozen=True)
class Arm:
    """One arm's traffic over the experiment's window (latencies None without a success)."""

    arm: str  # active or candidate
    version: int
    requests: int
    failures: int
    error_rate: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    agents: int


@dataclass(frozen=True)
class ShadowView:
    """The candidate's outputs against the active version's, from the agents' shadow runs."""

    available: bool
    note: str = ""
    compared: int = 0
    dropped: int = 0
    shadow_failures: int = 0
    top1_agreement: float | None = None
    abs_diff_p50: float | None = None
    abs_diff_p99: float | None = None
    rel_diff_p99: float | None = None
    js_p99: float | None = None
    shadow_latency_p99_ms: float | None = None


@dataclass(frozen=True)
class ExperimentStatus:
    experiment: Experiment
    since: float
    until: float
    arms: list[Arm]
    shadow: ShadowView | None
    verdict: str
    # Selected agents that carry the comparison now, and those where a newer deployment
    # decides instead (or that enrolled later and run another version).
    agents_in: list[str]
    agents_out: list[str]
    # The judge's per-metric verdicts (split) or each shadow gate's result (shadow).
    verdicts: list[MetricVerdict] = field(default_factory=list)
    shadow_gates: list[ShadowGateResult] = field(default_factory=list)


def _num(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


class Experiments:
    """The experiments core: start, stop, promote, the duration timer, status per arm."""

    def __init__(
        self,
        registry: RegistryPort,
        notify: Callable[[], Awaitable[None]],
        rollouts: Callable[[], Sequence[Rollout]],
        telemetry: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.notify = notify
        self.rollouts = rollouts
        self.telemetry = telemetry
        self.clock = clock
        self.lock = asyncio.Lock()
        # Late labels (hub.outcomes.OutcomeService), set by the hub: a split's accuracy gates.
        self.outcomes: Any = None

    # -- reads ------------------------------------------------------------------------------------

    def _all(self, model: str | None = None, states: Sequence[str] = ()) -> list[Experiment]:
        return [Experiment.from_json(r["data"]) for r in self.registry.experiments(model, states)]

    def ls(self, model: str = "") -> list[Experiment]:
        if model:
            self.registry.versions(model)  # an unknown model says so, with close names
        return self._all(model or None)

    def get(self, model: str, experiment_id: int = 0) -> Experiment:
        """One experiment of ``model``: by id, else the running one, else the latest."""
        self.registry.versions(model)
        rows = self._all(model)
        if experiment_id:
            rows = [e for e in rows if e.id == experiment_id]
            if not rows:
                raise ModelNotFoundError(f"no experiment {experiment_id} of {model!r}")
            return rows[0]
        if not rows:
            raise ModelNotFoundError(
                f"no experiment of {model!r}: start one with `modelfleet-hub experiment start "
                f"{model} --candidate V --split PCT`"
            )
        running = [e for e in rows if e.running]
        if len(running) > 1:
            shown = "; ".join(e.describe() for e in running)
            raise InvalidRequestError(
                f"{len(running)} experiments of {model} are running ({shown}): name one with --id"
            )
        return (running or rows)[-1]

    def running(self, model: str | None = None) -> list[Experiment]:
        return self._all(model, (RUNNING,))

    def _active_agents(self, selector: Mapping[str, str]) -> list[Any]:
        return [
            a
            for a in self.registry.agents()
            if a.status == "active" and selector_matches(selector, a.labels)
        ]

    def _desired(self, agent: Any, model: str) -> Any:
        for d in self.registry.desired_for(agent.labels, agent.agent_id):
            if d.name == model:
                return d
        return None

    def check_overlap(self, model: str, agent_ids: Sequence[str], doing: str) -> None:
        """Refuse ``doing`` (a rollout start) on agents a running experiment of ``model`` has."""
        wanted = set(agent_ids)
        for e in self.running(model):
            mine = {a.agent_id for a in self._active_agents(e.selector)} | set(e.baseline)
            both = wanted & mine
            if both:
                raise FailedPreconditionError(
                    f"{e.describe()} runs on {len(both)} of these agent(s): {doing} would "
                    f"replace its comparison. Stop or promote it first (`modelfleet-hub "
                    f"experiment stop {model} --id {e.id}`)"
                )

    # -- commands ---------------------------------------------------------------------------------

    async def start(
        self,
        model: str,
        candidate: int,
        selector: Mapping[str, str],
        *,
        split_percent: float = 0.0,
        shadow_percent: float = 0.0,
        sticky: bool = False,
        duration_s: float = 0.0,
        actor: str = "",
        judge_metrics: Sequence[str] = (),
        gates: Sequence[str] = (),
    ) -> Experiment:
        if bool(split_percent) == bool(shadow_percent):
            raise InvalidRequestError(
                "an experiment is a split or a shadow: give --split PCT or --shadow PCT (one)"
            )
        mode = "split" if split_percent else "shadow"
        bp = share_bp(split_percent or shadow_percent, mode)
        if sticky and mode != "split":
            raise InvalidRequestError(
                "--sticky keeps a routing key on one arm of a split; a shadow has one arm answering"
            )
        if mode == "split" and any(not g.strip().startswith("accuracy") for g in gates):
            raise InvalidRequestError(
                "--gate sets a shadow's thresholds; a split is judged on its traffic (--judge) "
                "and on late labels (--gate 'accuracy>=X' or 'accuracy_drop<X')"
            )
        if mode == "shadow" and any(g.strip().startswith("accuracy") for g in gates):
            raise InvalidRequestError(
                "accuracy gates need a split: a shadow's candidate answers nobody and its "
                "outputs are not captured, so late labels cannot score it"
            )
        if mode == "shadow" and judge_metrics:
            raise InvalidRequestError(
                "--judge compares the arms' traffic; a shadow's candidate answers no request, "
                "so it is judged by --gate thresholds on its outputs"
            )
        judged = list(judge_metrics) or list(DEFAULT_JUDGE)
        try:
            parse_metrics(judged)
        except JudgeSpecError as exc:
            raise InvalidRequestError(f"--judge: {exc}") from None
        shadow_gates = list(gates) or list(DEFAULT_SHADOW_GATES)
        if mode == "split":
            shadow_gates = list(gates)
            for g in shadow_gates:
                parse_accuracy_gate(g)
        else:
            for g in shadow_gates:
                parse_shadow_gate(g)
        if not math.isfinite(duration_s) or duration_s < 0:
            raise InvalidRequestError(f"--duration {duration_s:g}s must be positive (or none)")
        check_labels(selector, "selector")
        for key in selector:
            if key.startswith("_"):
                raise InvalidRequestError(f"selector key {key!r} is reserved")
        async with self.lock:
            self.registry.versions(model)  # unknown model: NOT_FOUND with close names
            self.registry.check_deployable(model, candidate)  # unknown, retired, unsigned
            agents = self._active_agents(selector)
            where = selector_text(selector)
            if not agents:
                raise InvalidRequestError(
                    f"selector {where} matches no active agent: an experiment runs on agents "
                    "that serve the model now (check the selector with `modelfleet-hub agents ls`)"
                )
            baseline: dict[str, int] = {}
            missing, same = [], []
            for a in agents:
                d = self._desired(a, model)
                name = a.hostname or a.agent_id
                if d is None or not d.version:
                    missing.append(name)
                elif d.version == candidate:
                    same.append(name)
                else:
                    baseline[a.agent_id] = d.version
            if same:
                raise FailedPreconditionError(
                    f"{model} v{candidate} is what {len(same)} of the {len(agents)} agent(s) "
                    f"matching {where} already run ({_names(same)}): nothing to compare it "
                    "with. Pick another --candidate or narrow --selector"
                )
            if missing:
                raise FailedPreconditionError(
                    f"{len(missing)} of the {len(agents)} agent(s) matching {where} run no "
                    f"version of {model} ({_names(missing)}): an experiment compares the "
                    "candidate with the running version. Deploy the model first or narrow "
                    "--selector"
                )
            ids = list(baseline)
            for r in self.rollouts():
                if r.spec.model == model and set(r.agents) & set(ids):
                    raise FailedPreconditionError(
                        f"rollout {r.id} of {model} is in progress ({r.state}) on "
                        f"{len(set(r.agents) & set(ids))} of these agent(s): finish, abort or "
                        "roll it back first"
                    )
            for e in self.running(model):
                mine = {a.agent_id for a in self._active_agents(e.selector)} | set(e.baseline)
                if mine & set(ids) or e.selector == dict(selector):
                    raise FailedPreconditionError(
                        f"{e.describe()} already runs on {len(mine & set(ids))} of these "
                        f"agent(s): one experiment per agent and model. Stop or promote it "
                        f"first (`modelfleet-hub experiment stop {model} --id {e.id}`)"
                    )
            now = self.clock()
            exp = Experiment(
                id=0,
                model=model,
                candidate=candidate,
                selector=dict(selector),
                mode=mode,
                share_bp=bp,
                sticky=sticky,
                duration_s=duration_s,
                created_at=now,
                ends_at=now + duration_s if duration_s else 0.0,
                actor=actor,
                baseline=baseline,
                judge=judged if mode == "split" else [],
                gates=shadow_gates,
            )
            exp.id = self.registry.create_experiment(model, exp.to_json())
            exp.deployment_id = self.registry.deploy(
                model,
                candidate,
                selector,
                actor=actor,
                source="experiment",
                kind="prepare",
                split_bp=bp if mode == "split" else 0,
                sticky=sticky,
                shadow_bp=bp if mode == "shadow" else 0,
                comparison=exp.label,
            )
            versions = sorted(set(baseline.values()))
            exp.event(
                now,
                f"started by {actor or '?'} on {len(agents)} agent(s): v{candidate} against "
                + ", ".join(f"v{v}" for v in versions)
                + (f"; ends in {duration_s:g}s" if duration_s else ""),
            )
            self._save(exp)
        await self.notify()
        log.info("%s started by %s", exp.describe(), actor or "?")
        return exp

    async def stop(self, model: str, experiment_id: int = 0, actor: str = "") -> Experiment:
        async with self.lock:
            exp = self._running(model, experiment_id, "stop")
            self._end(exp, "stopped", f"stopped by {actor or '?'}", actor)
        await self.notify()
        return exp

    async def promote(self, model: str, experiment_id: int = 0, actor: str = "") -> Experiment:
        """The candidate becomes the deployed version of the experiment's selector."""
        async with self.lock:
            exp = self._running(model, experiment_id, "promote")
            # The serve row supersedes the preparation for every agent it matches; the prepare
            # row is removed too, so the log says the comparison is over.
            exp.promoted_deployment_id = self.registry.deploy(
                exp.model, exp.candidate, exp.selector, actor=actor, source="experiment"
            )
            self._end(
                exp,
                "promoted",
                f"promoted by {actor or '?'}: v{exp.candidate} deployed for "
                f"{selector_text(exp.selector)}",
                actor,
            )
        await self.notify()
        return exp

    def _running(self, model: str, experiment_id: int, doing: str) -> Experiment:
        exp = self.get(model, experiment_id)
        if not exp.running:
            raise FailedPreconditionError(
                f"experiment {exp.id} of {model} is already {exp.state}: nothing to {doing}"
            )
        return exp

    def _end(self, exp: Experiment, state: str, why: str, actor: str = "") -> None:
        if exp.deployment_id:
            self.registry.remove_deployments([exp.deployment_id], actor)
        now = self.clock()
        exp.state, exp.reason, exp.finished_at = state, why, now
        exp.event(now, why)
        self._save(exp)
        log.info("%s: %s", exp.describe(), why)

    def _save(self, exp: Experiment) -> None:
        self.registry.save_experiment(exp.id, exp.state, exp.to_json())

    async def tick(self) -> None:
        """End the experiments whose duration is over (the timer is ``ends_at``, saved)."""
        ended = False
        async with self.lock:
            now = self.clock()
            for exp in self.running():
                if exp.ends_at and now >= exp.ends_at:
                    self._end(exp, "ended", f"ended: --duration {exp.duration_s:g}s reached")
                    ended = True
        if ended:
            await self.notify()

    async def run(self, stop: asyncio.Event, interval_s: float = 1.0) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("experiments: the duration check failed; will retry")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    # -- status -----------------------------------------------------------------------------------

    def status(self, exp: Experiment) -> ExperimentStatus:
        now = self.clock()
        since, until = exp.created_at, exp.finished_at or now
        agents_in, agents_out = [], []
        for a in self._active_agents(exp.selector):
            d = self._desired(a, exp.model)
            if d is not None and d.prepare_version == exp.candidate and d.comparison == exp.label:
                agents_in.append(a.agent_id)
            elif exp.running:
                agents_out.append(a.agent_id)
        agents = sorted(set(exp.baseline) | set(agents_in))
        arms = []
        for version in sorted(set(exp.baseline.values())):
            arms.append(self._arm(exp.model, "active", version, agents, since, until))
        if exp.mode == "split":
            arms.append(self._arm(exp.model, "candidate", exp.candidate, agents, since, until))
        shadow = self._shadow(exp, agents, since, until) if exp.mode == "shadow" else None
        if shadow is not None:
            results = shadow_verdict(exp.gates or list(DEFAULT_SHADOW_GATES), shadow)
            return ExperimentStatus(
                exp,
                since,
                until,
                arms,
                shadow,
                _shadow_summary(results),
                agents_in,
                agents_out,
                shadow_gates=results,
            )
        verdicts = self._judge(exp, agents, since, until)
        # Split experiments saved before accuracy gates carry the shadow defaults: not theirs.
        labelled = self._accuracy_gates(exp, since) if exp.mode == "split" else []
        return ExperimentStatus(
            exp,
            since,
            until,
            arms,
            None,
            _with_accuracy(_judge_summary(verdicts), labelled),
            agents_in,
            agents_out,
            verdicts=verdicts,
            shadow_gates=labelled,
        )

    def _accuracy_gates(self, exp: Experiment, since: float) -> list[ShadowGateResult]:
        """A split's accuracy gates on late labels: the candidate's labelled predictions since
        the experiment began against the active version's (or the operator's baseline). Not
        judged until both have DEFAULT_MIN_LABELS of them."""
        gates = [g for g in exp.gates if g.strip().startswith("accuracy")]
        if not gates:
            return []
        if self.outcomes is None:
            return [ShadowGateResult(g, None, None, "this hub reads no outcomes") for g in gates]
        need = DEFAULT_MIN_LABELS
        now_report = self.outcomes.accuracy(exp.model, since=since)
        cand = now_report.version(exp.candidate)
        n = cand.labelled if cand is not None else 0
        acc = cand.accuracy.value if cand is not None and cand.accuracy is not None else None
        reference: float | None = self.outcomes.store.baseline(exp.model)
        ref_why = "baseline"
        if reference is None:
            versions = sorted(set(exp.baseline.values()))
            everything = self.outcomes.accuracy(exp.model)
            qs = [everything.version(v) for v in versions]
            ok = [q for q in qs if q is not None and q.accuracy is not None and q.labelled >= need]
            if len(ok) == len(versions) and ok:
                # The worst active version: the candidate must beat every one it replaces.
                reference = min(q.accuracy.value for q in ok)
                ref_why = "active arm"
        out = []
        for text in gates:
            gate = parse_accuracy_gate(text)
            if acc is None or n < need:
                why = f"{n} of {need} labelled predictions of v{exp.candidate}"
                out.append(ShadowGateResult(str(gate), acc, None, why))
                continue
            if gate.metric == "accuracy":
                value = acc
            elif reference is None:
                why = f"no reference: the active arm has fewer than {need} labelled predictions"
                out.append(ShadowGateResult(str(gate), None, None, why))
                continue
            else:
                value = reference - acc
            held = gate.holds(value)
            why = f"{value:.4g} {'holds' if held else 'breaks it'} ({n} labelled"
            why += (
                f", reference {reference:.4g} from the {ref_why})" if reference is not None else ")"
            )
            out.append(ShadowGateResult(str(gate), value, held, why))
        return out

    def _judge(
        self, exp: Experiment, agents: list[str], since: float, until: float
    ) -> list[MetricVerdict]:
        """The statistical judge on the split's two arms: the candidate's agent-windows
        against the active version's, paired by agent and window."""
        if self.telemetry is None or not agents:
            return []
        # Both arms on the same agents at the same time: each agent-window's candidate arm
        # against its own active arm (device speed and the moment's load cancel in the pair).
        canary, baseline = self.telemetry.paired_samples(
            exp.model, exp.candidate, set(exp.baseline.values()), agents, since, until
        )
        metrics = parse_metrics(exp.judge or list(DEFAULT_JUDGE))
        return judge(canary, baseline, metrics, paired=True)

    def _arm(
        self, model: str, arm: str, version: int, agents: list[str], since: float, until: float
    ) -> Arm:
        rows: list[Any] = []
        if self.telemetry is not None and agents:
            rows = self.telemetry.window(model, version, agents, since, until)
        if not rows:
            return Arm(arm, version, 0, 0, 0.0, None, None, None, 0)
        s = rows[0]
        return Arm(
            arm,
            version,
            s.requests,
            s.failures,
            s.error_rate,
            _num(s.p50_ms),
            _num(s.p95_ms),
            _num(s.p99_ms),
            s.agents,
        )

    def _shadow(self, exp: Experiment, agents: list[str], since: float, until: float) -> ShadowView:
        if self.telemetry is None:
            return ShadowView(available=False, note="this hub keeps no telemetry")
        query = self.telemetry.shadow_window
        compared = dropped = failures = 0
        worst: dict[str, float | None] = {}
        for version in sorted(set(exp.baseline.values())):
            s = query(exp.model, version, agents, since, until, shadow_version=exp.candidate)
            compared += s.compared
            dropped += s.dropped
            failures += s.shadow_failures
            # The worst over the active versions (normally one): agreement low, differences high.
            for name, value, pick in (
                ("top1_agreement", s.top1_agreement, min),
                ("abs_diff_p50", s.abs_diff_p50, max),
                ("abs_diff_p99", s.abs_diff_p99, max),
                ("rel_diff_p99", s.rel_diff_p99, max),
                ("js_p99", s.js_p99, max),
                ("shadow_latency_p99_ms", s.shadow_latency_p99_ms, max),
            ):
                v, old = _num(value), worst.get(name)
                worst[name] = v if old is None else (old if v is None else pick(old, v))
        note = "" if compared else "no shadow comparison reported yet"
        return ShadowView(
            True,
            note,
            compared,
            dropped,
            failures,
            top1_agreement=worst.get("top1_agreement"),
            abs_diff_p50=worst.get("abs_diff_p50"),
            abs_diff_p99=worst.get("abs_diff_p99"),
            rel_diff_p99=worst.get("rel_diff_p99"),
            js_p99=worst.get("js_p99"),
            shadow_latency_p99_ms=worst.get("shadow_latency_p99_ms"),
        )


def shadow_verdict(gates: Sequence[str], view: ShadowView) -> list[ShadowGateResult]:
    """Each shadow gate against the comparison so far. Not judged until MIN_SHADOW_COMPARED
    requests were compared, nor where the model has no such figure (top-1 agreement needs
    class scores)."""
    out = []
    failure_rate = (
        view.shadow_failures / (view.compared + view.shadow_failures)
        if view.compared + view.shadow_failures
        else None
    )
    for text in gates:
        gate = parse_shadow_gate(text)
        field_name = SHADOW_METRICS[gate.metric]
        value = failure_rate if field_name == "failure_rate" else getattr(view, field_name)
        if not view.available or view.compared < MIN_SHADOW_COMPARED:
            why = f"{view.compared} of the {MIN_SHADOW_COMPARED} comparisons needed so far"
            out.append(ShadowGateResult(str(gate), value, None, why))
        elif value is None:
            why = (
                "no such figure for this model's outputs (top-1 agreement needs class scores)"
                if gate.metric == "shadow_agreement"
                else "no figure reported"
            )
            out.append(ShadowGateResult(str(gate), None, None, why))
        elif gate.holds(value):
            out.append(ShadowGateResult(str(gate), value, True, f"{value:.4g} holds"))
        else:
            out.append(ShadowGateResult(str(gate), value, False, f"{value:.4g} breaks it"))
    return out


def _shadow_summary(results: Sequence[ShadowGateResult]) -> str:
    failed = [r for r in results if r.ok is False]
    if failed:
        return "fail: " + "; ".join(f"{r.gate} ({r.why})" for r in failed)
    if not results:
        return "inconclusive: no gate to judge the shadow by"
    open_ = [r for r in results if r.ok is None]
    if len(open_) == len(results):
        return "inconclusive: " + "; ".join(f"{r.gate}: {r.why}" for r in open_)
    held = ", ".join(r.gate for r in results if r.ok)
    skipped = "".join(f"; {r.gate} not judged ({r.why})" for r in open_)
    return f"pass: {held}{skipped}"


def _with_accuracy(summary: str, results: Sequence[ShadowGateResult]) -> str:
    """The judge's summary, overruled by a failed accuracy gate and held open by a waiting one."""
    failed = [r for r in results if r.ok is False]
    if failed:
        return "fail: " + "; ".join(f"{r.gate} ({r.why})" for r in failed)
    waiting = [r for r in results if r.ok is None]
    if waiting and summary.startswith("pass"):
        return "inconclusive: " + "; ".join(f"{r.gate}: {r.why}" for r in waiting)
    return summary


def _judge_summary(verdicts: Sequence[MetricVerdict]) -> str:
    if not verdicts:
        return "inconclusive: no telemetry from the selected agents yet"
    verdict = combined(verdicts)
    deciding = [v for v in verdicts if v.verdict == verdict] or list(verdicts)
    return f"{verdict}: " + "; ".join(f"{v.metric}: {v.why}" for v in deciding)


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = sorted(names)
    return ", ".join(shown[:limit]) + (" ..." if len(shown) > limit else "")
