"""Experiments on a real registry and a real telemetry store, without processes
(hub/experiments.py): refusals first, then start/status/stop/promote, the duration timer, and
what survives a restart (a new registry and core over the same files)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from modelfleet.hub.experiments import (
    MIN_SHADOW_COMPARED,
    Experiments,
    ShadowView,
    shadow_verdict,
)
from modelfleet.hub.registry import FailedPreconditionError, Registry
from modelfleet.hub.telemetry import TelemetryStore
from modelfleet.kernel.errors import InvalidRequestError, ModelNotFoundError
from modelfleet.protos import fleet_pb2 as pb


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _noop() -> None:
    return None


def make_registry(path: Path, clock: Clock) -> Registry:
    reg = Registry(path, clock=clock)
    if not reg.models():
        for v in (1, 2, 3, 4):
            reg.add_version(
                name="m",
                version=v,
                sha256=f"{v:064x}",
                size=10,
                notes="",
                target_path=f"m/{v}/bundle.tar",
                signed=v != 4,
                manifest={"model": {"sha256": str(v)}},
            )
        for agent, site in (("b1", "berlin"), ("b2", "berlin"), ("p1", "paris")):
            reg.add_agent(agent, agent, {"site": site}, "fp")
        reg.deploy("m", 1, {}, actor="admin")
    return reg


@pytest.fixture
def hub(tmp_path: Path) -> Any:
    clock = Clock()
    reg = make_registry(tmp_path / "r.db", clock)
    store = TelemetryStore(tmp_path / "t.duckdb", retention_s=86400, clock=clock)
    rollouts: list[Any] = []
    x = Experiments(reg, _noop, lambda: rollouts, store, clock=clock)
    yield SimpleNamespace(reg=reg, store=store, x=x, clock=clock, rollouts=rollouts, root=tmp_path)
    store.close()
    reg.close()


def start(x: Experiments, **kw: Any) -> Any:
    args: dict[str, Any] = {"split_percent": 10.0}
    args.update(kw)
    selector = args.pop("selector", {"site": "berlin"})
    candidate = args.pop("candidate", 2)
    return asyncio.run(x.start("m", candidate, selector, actor="admin", **args))


def desired(reg: Registry, agent: str) -> Any:
    a = reg.agent(agent)
    return next(d for d in reg.desired_for(a.labels, agent) if d.name == "m")


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        ({"split_percent": 0.0}, InvalidRequestError, "--split PCT or --shadow PCT"),
        ({"shadow_percent": 5.0}, InvalidRequestError, "a split or a shadow"),
        ({"split_percent": 100.0}, InvalidRequestError, "--split 100 is out of range"),
        ({"split_percent": -3.0}, InvalidRequestError, "--split -3 is out of range"),
        ({"split_percent": 0, "shadow_percent": 150.0}, InvalidRequestError, "--shadow 150"),
        ({"split_percent": 0.001}, InvalidRequestError, "0.01% steps"),
        (
            {"split_percent": 0, "shadow_percent": 10, "sticky": True},
            InvalidRequestError,
            "--sticky",
        ),
        ({"candidate": 9}, ModelNotFoundError, "9"),
        ({"candidate": 4}, FailedPreconditionError, "not signed"),
        ({"candidate": 1}, FailedPreconditionError, "already run"),
        ({"selector": {"site": "rome"}}, InvalidRequestError, "matches no active agent"),
        ({"duration_s": -1.0}, InvalidRequestError, "--duration"),
    ],
)
def test_refusals_say_what_is_wrong(hub: Any, kw: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        start(hub.x, **kw)
    assert hub.reg.experiments() == []  # a refused start leaves nothing behind


def test_retired_candidate_and_unknown_model_are_refused(hub: Any) -> None:
    hub.reg.set_stage("m", 3, "retired")
    with pytest.raises(FailedPreconditionError, match="retired"):
        start(hub.x, candidate=3)
    with pytest.raises(ModelNotFoundError):
        asyncio.run(hub.x.start("nope", 2, {}, split_percent=5))


def test_agents_without_the_model_are_refused(hub: Any) -> None:
    # Only paris deploys the model: the berlin agents run nothing to compare with.
    hub.reg.remove_deployments([r.id for r in hub.reg.deployment_rows()])
    hub.reg.deploy("m", 1, {"site": "paris"})
    with pytest.raises(FailedPreconditionError, match="run no version of m"):
        start(hub.x)


def test_overlapping_experiment_and_active_rollout_are_refused(hub: Any) -> None:
    start(hub.x)
    with pytest.raises(FailedPreconditionError, match=r"experiment 1 of m .* already runs on 2"):
        start(hub.x, selector={}, candidate=3)
    with pytest.raises(FailedPreconditionError, match="already runs"):
        start(hub.x, candidate=3)  # same selector
    # A disjoint selector is fine.
    start(hub.x, selector={"site": "paris"}, shadow_percent=50.0, split_percent=0.0)
    rollout = SimpleNamespace(id=7, state="baking", agents=["b1"], spec=SimpleNamespace(model="m"))
    asyncio.run(hub.x.stop("m", 1))
    hub.rollouts.append(rollout)
    with pytest.raises(FailedPreconditionError, match="rollout 7 of m is in progress"):
        start(hub.x, candidate=3)
    # And a rollout is refused on agents in an experiment.
    with pytest.raises(FailedPreconditionError, match=r"experiment 2 of m .* runs on 1"):
        hub.x.check_overlap("m", ["p1"], "a rollout of v3")


def test_stop_and_promote_of_nothing_running_are_refused(hub: Any) -> None:
    with pytest.raises(ModelNotFoundError, match="no experiment of 'm'"):
        asyncio.run(hub.x.stop("m"))
    start(hub.x)
    asyncio.run(hub.x.stop("m"))
    with pytest.raises(FailedPreconditionError, match="already stopped: nothing to promote"):
        asyncio.run(hub.x.promote("m"))
    with pytest.raises(ModelNotFoundError, match="no experiment 5"):
        asyncio.run(hub.x.stop("m", 5))


# -- the life of an experiment ----------------------------------------------------------------


def test_split_reaches_the_selected_agents_and_stop_removes_it(hub: Any) -> None:
    e = start(hub.x, split_percent=12.5, sticky=True)
    assert (
        e.id == 1
        and e.mode == "split"
        and e.share_bp == 1250
        and e.baseline
        == {
            "b1": 1,
            "b2": 1,
        }
    )
    for agent in ("b1", "b2"):
        d = desired(hub.reg, agent)
        assert (d.version, d.prepare_version, d.split_bp, d.sticky, d.shadow_bp) == (
            1,
            2,
            1250,
            True,
            0,
        )
        assert d.comparison == "experiment 1"
    assert desired(hub.reg, "p1").prepare_version == 0
    st = hub.x.status(e)
    assert st.agents_in == ["b1", "b2"] and st.agents_out == []
    assert [a.arm for a in st.arms] == ["active", "candidate"]
    assert st.verdict.startswith("inconclusive") and st.shadow is None
    stopped = asyncio.run(hub.x.stop("m", actor="ops"))
    assert stopped.state == "stopped" and "stopped by ops" in stopped.reason
    assert desired(hub.reg, "b1").prepare_version == 0  # agents drop the candidate
    assert desired(hub.reg, "b1").version == 1


def test_promote_deploys_the_candidate_for_the_selector(hub: Any) -> None:
    start(hub.x, split_percent=0.0, shadow_percent=100.0)
    e = asyncio.run(hub.x.promote("m", actor="ops"))
    assert e.state == "promoted"
    assert desired(hub.reg, "b1").version == 2 and desired(hub.reg, "b1").prepare_version == 0
    assert desired(hub.reg, "p1").version == 1
    assert hub.x.get("m").state == "promoted"


def test_duration_ends_the_experiment_even_across_a_restart(hub: Any) -> None:
    start(hub.x, duration_s=60.0)
    hub.clock.now += 30
    asyncio.run(hub.x.tick())
    assert hub.x.get("m").running
    # The hub stops; it comes back after the end time: the first tick ends the experiment.
    hub.reg.close()
    hub.clock.now += 300
    reg = Registry(hub.root / "r.db", clock=hub.clock)
    x = Experiments(reg, _noop, lambda: [], hub.store, clock=hub.clock)
    e = x.get("m")
    assert e.running and e.ends_at == 1060.0
    asyncio.run(x.tick())
    e = x.get("m")
    assert e.state == "ended" and "--duration 60s reached" in e.reason
    assert desired(reg, "b1").prepare_version == 0
    hub.reg = reg  # the fixture closes this one


def test_status_reads_telemetry_per_arm(hub: Any) -> None:
    e = start(hub.x, split_percent=20.0)
    hub.clock.now += 10

    def report(agent: str, seq: int, version: int, requests: int, failures: int) -> None:
        r = pb.TelemetryReport(seq=seq, start_unix=1001, end_unix=1009)
        v = r.versions.add(model="m", version=version, requests=requests, failures=failures)
        v.request_latency.bounds.extend([0.001, 0.01, 0.1])
        v.request_latency.counts.extend([requests - failures, 0, 0, 0])
        v.request_latency.count = requests - failures
        hub.store.ingest(agent, [r])

    report("b1", 1, 1, 80, 0)
    report("b1", 2, 2, 20, 5)
    report("p1", 1, 1, 50, 0)  # not in the experiment
    st = hub.x.status(e)
    arms = {a.arm: a for a in st.arms}
    assert (arms["active"].requests, arms["active"].failures) == (80, 0)
    assert (arms["candidate"].requests, arms["candidate"].failures) == (20, 5)
    assert arms["candidate"].error_rate == pytest.approx(0.25)
    assert arms["active"].p99_ms is not None


def test_shadow_status_reads_the_shadow_comparison(hub: Any) -> None:
    e = start(hub.x, split_percent=0.0, shadow_percent=25.0)
    assert desired(hub.reg, "b1").shadow_bp == 2500
    st = hub.x.status(e)
    assert [a.arm for a in st.arms] == ["active"]
    assert st.shadow is not None and st.shadow.available
    # Nothing compared yet: every default gate waits for its comparisons.
    assert [g.ok for g in st.shadow_gates] == [None, None]
    assert st.verdict.startswith("inconclusive: shadow_agreement>0.98: 0 of the 100")


def test_the_judge_decides_a_split_from_its_two_arms(hub: Any) -> None:
    """Issue 15 item 4: the verdict so far, by the statistical judge, candidate arm against
    active arm on the same agents (their agent-windows as samples)."""
    e = start(hub.x, split_percent=50.0)
    seq = {"b1": 0, "b2": 0}

    def report(agent: str, t: float, version: int, requests: int, failures: int) -> None:
        seq[agent] += 1
        r = pb.TelemetryReport(seq=seq[agent], start_unix=t, end_unix=t + 1)
        v = r.versions.add(model="m", version=version, requests=requests, failures=failures)
        v.request_latency.bounds.extend([0.001, 0.002, 0.005, 0.01])
        v.request_latency.counts.extend([0, requests - failures, 0, 0, 0])
        v.request_latency.count = requests - failures
        hub.store.ingest(agent, [r])

    # 60 agent-windows a side: the candidate fails 20% of its requests, the active arm none.
    for i in range(30):
        t = 1001.0 + 2 * i
        for agent in ("b1", "b2"):
            report(agent, t, 1, 400, 0)
            report(agent, t + 1, 2, 400, 80)
    hub.clock.now = 1100.0
    st = hub.x.status(e)
    by_metric = {v.metric: v for v in st.verdicts}
    assert set(by_metric) == {"latency_p50", "latency_p99", "errors"}
    assert by_metric["errors"].verdict == "fail"
    assert by_metric["errors"].canary == pytest.approx(0.2)
    assert by_metric["errors"].baseline == pytest.approx(0.0)
    assert st.verdict.startswith("fail: errors: ")
    # Same latency on both arms: the latency metrics never fail.
    assert by_metric["latency_p50"].verdict != "fail"


def test_a_shadow_is_judged_by_its_gates() -> None:
    def view(compared: int, **figures: float | None) -> ShadowView:
        return ShadowView(True, "", compared, 0, 0, **figures)

    gates = ["shadow_agreement>0.98", "shadow_abs_diff_p99<0.05"]
    few = shadow_verdict(gates, view(MIN_SHADOW_COMPARED - 1, abs_diff_p99=0.5))
    assert [g.ok for g in few] == [None, None] and "99 of the 100" in few[0].why
    # A regression model has no top-1 agreement: that gate is not judged, the other decides.
    close = shadow_verdict(gates, view(500, abs_diff_p99=0.01))
    assert [g.ok for g in close] == [None, True] and "class scores" in close[0].why
    far = shadow_verdict(gates, view(500, top1_agreement=0.9, abs_diff_p99=0.3))
    assert [g.ok for g in far] == [False, False] and far[0].value == 0.9
    with pytest.raises(InvalidRequestError, match="invalid shadow gate 'p99<3'"):
        shadow_verdict(["p99<3"], view(500))


def test_experiment_start_refuses_gates_and_judge_of_the_other_kind(hub: Any) -> None:
    with pytest.raises(InvalidRequestError, match="--gate sets a shadow's thresholds"):
        start(hub.x, split_percent=10.0, gates=["shadow_agreement>0.9"])
    with pytest.raises(InvalidRequestError, match="--judge compares the arms' traffic"):
        start(hub.x, split_percent=0.0, shadow_percent=10.0, judge_metrics=["errors"])
    with pytest.raises(InvalidRequestError, match="--judge: "):
        start(hub.x, split_percent=10.0, judge_metrics=["speed"])
    with pytest.raises(InvalidRequestError, match="invalid shadow gate"):
        start(hub.x, split_percent=0.0, shadow_percent=10.0, gates=["agreement>0.9"])


def test_a_newer_deployment_takes_agents_out_of_the_experiment(hub: Any) -> None:
    e = start(hub.x)
    hub.reg.deploy("m", 3, {"site": "berlin"}, actor="ops")
    st = hub.x.status(e)
    assert st.agents_in == [] and st.agents_out == ["b1", "b2"]


# -- the edges: conversion and the CLI's rendering --------------------------------------------


def test_status_round_trips_through_the_message_and_renders(hub: Any) -> None:
    from modelfleet.hub.cli import _render_experiment, build_parser, experiment_dict
    from modelfleet.hub.convert import experiment_to_proto

    e = start(hub.x, split_percent=12.5, sticky=True, duration_s=3600.0)
    msg = experiment_to_proto(hub.x.status(e))
    d = experiment_dict(msg)
    assert d["share_percent"] == 12.5 and d["sticky"] and d["mode"] == "split"
    assert d["shadow"] is None and d["arms"][0]["p99_ms"] is None
    assert d["ends_at"] == 1000.0 + 3600
    text = _render_experiment(msg)
    assert "experiment 1: m v2 (split 12.5%, sticky)  state RUNNING" in text
    assert "2 agent(s) in the experiment" in text and "verdict: inconclusive" in text
    shadow = start(hub.x, split_percent=0.0, shadow_percent=50.0, selector={"site": "paris"})
    text = _render_experiment(experiment_to_proto(hub.x.status(shadow)))
    assert "shadow" in text
    args = build_parser().parse_args(
        ["experiment", "start", "m", "--candidate", "2", "--shadow", "5%", "--duration", "2h"]
    )
    assert (args.shadow, args.split, args.duration) == (5.0, None, 7200.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["experiment", "start", "m", "--candidate", "2"])
