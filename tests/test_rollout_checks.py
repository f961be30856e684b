"""Issue 14, items 3, 5 and 6 without processes: what a rollout refuses, what its status shows,
and the CLI's flags, defaults and exit codes. The real hub and agents: test_rollout_wait.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from modelfleet.hub.cli import (
    EXIT_NEEDS_OPERATOR,
    EXIT_ROLLED_BACK,
    EXIT_WAIT_TIMEOUT,
    ROLLOUT_EXIT_CODES,
    _render_rollout,
    build_parser,
    rollout_dict,
)
from modelfleet.hub.convert import rollout_to_proto
from modelfleet.hub.registry import Registry
from modelfleet.hub.rollout_manager import RolloutManager
from modelfleet.hub.rollouts import (
    AgentFacts,
    Rollout,
    RolloutRefusedError,
    Stats,
    check_target,
    stable_order,
)
from modelfleet.kernel.errors import EXIT_CODES, InvalidRequestError, ModelfleetError, Status
from modelfleet.kernel.reports import AgentReport, ModelReport
from modelfleet.protos import fleet_pb2 as pb
from tests.test_rollouts import AGENTS, BASE, GOOD, FakeFleet, run, spec

DOCS = Path(__file__).resolve().parent.parent / "docs"

# -- item 3: nonsense is refused, in the core -------------------------------------------------


@pytest.mark.parametrize(
    ("waves", "why"),
    [
        (["50%", "10%"], "waves must increase"),
        (["10%", "10%", "100%"], "waves must increase"),
        (["5", "2"], "waves must increase"),
        (["1", "50%"], "mix percentages and counts"),
        (["0%", "100%"], "percentages from 1 to 100"),
        (["10%", "150%"], "percentages from 1 to 100"),
        (["0", "3"], "counts of at least 1"),
    ],
)
def test_waves_that_do_not_increase_are_refused(waves: list[str], why: str) -> None:
    with pytest.raises(InvalidRequestError, match=why):
        spec(waves=waves).validate()


def test_increasing_waves_are_accepted() -> None:
    for waves in (["10%", "50%", "100%"], ["1%"], ["1", "3"], ["100%"]):
        spec(waves=waves).validate()


def test_a_version_already_desired_everywhere_is_refused() -> None:
    with pytest.raises(RolloutRefusedError, match=r"already the desired version of all 2") as e:
        check_target(spec(version=2), {"a1": (2, 2), "a2": (2, 1)})
    assert "(1 run it)" in str(e.value) and e.value.status.name == "FAILED_PRECONDITION"
    # One agent still to go: a real rollout.
    check_target(spec(version=2), {"a1": (2, 2), "a2": (1, 1)})


def test_a_downgrade_needs_allow_downgrade() -> None:
    current = {"a1": (3, 3), "a2": (1, 1), "a3": (2, 4)}  # a3 runs v4 (a deploy in flight)
    with pytest.raises(RolloutRefusedError, match="a downgrade: 2 of the 3") as e:
        check_target(spec(version=2), current)
    assert "a1 (v3), a3 (v4)" in str(e.value) and "--allow-downgrade" in str(e.value)
    check_target(spec(version=2, allow_downgrade=True), current)
    check_target(spec(version=5), current)


def test_no_agent_on_the_selector_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="no enrolled agent matches"):
        check_target(spec(selector={"site": "tokyo"}), {})


def test_the_manager_refuses_before_recording_anything(tmp_path: Path) -> None:
    """The hub core (RolloutManager.start, every client's way in) checks against the fleet, and a
    refused start leaves no rollout in the history."""
    reg = Registry(tmp_path / "registry.db")
    try:
        for v in (1, 2, 3):
            reg.add_version(
                name="m",
                version=v,
                sha256=f"{v:064x}",
                size=1,
                notes="",
                target_path=f"m/{v}/bundle.tar",
                signed=True,
                manifest={"model": {"sha256": str(v)}},
            )
        for i in range(3):
            reg.add_agent(f"agent-{i}", f"host-{i}", {"site": "x"}, "fp")
            reg.touch(f"agent-{i}", AgentReport(models=(ModelReport("m", active_version=2),)))
        reg.deploy("m", 2, {})
        core = SimpleNamespace(registry=reg, changed=asyncio.Condition())
        manager = RolloutManager(core)

        def start(**kw: object) -> Rollout:
            return asyncio.run(manager.start(spec(model="m", gates=[], min_requests=0, **kw)))

        with pytest.raises(RolloutRefusedError, match="already the desired version of all 3"):
            start(version=2)
        with pytest.raises(RolloutRefusedError, match="downgrade"):
            start(version=1)
        with pytest.raises(InvalidRequestError, match="waves must increase"):
            start(version=3, waves=["50%", "10%"])
        with pytest.raises(InvalidRequestError, match="no enrolled agent"):
            start(version=3, selector={"site": "tokyo"})
        assert reg.rollouts("m") == []
        r = start(version=1, allow_downgrade=True)
        assert r.state == "switching" and r.spec.allow_downgrade
        # What older hubs recorded for a start refused for its empty selector: a row without
        # data. It never ran; history and status pass over it instead of failing on it.
        reg.save_rollout(reg.create_rollout("m", 3), "rolled_back", {})
        assert [x.id for x in manager.history("m")] == [r.id]
        assert manager.get("m").id == r.id
    finally:
        reg.close()


def test_a_rollout_without_gates_says_so_at_start_and_in_its_status() -> None:
    r = Rollout.new(1, spec(gates=[]), AGENTS, {a: 1 for a in AGENTS}, now=0)
    assert any(e["text"].startswith("warning: no gates") for e in r.events)
    status = rollout_to_proto(r, 0.0)
    assert status.warnings[0].startswith("no gates: a wave passes once its agents have switched")
    assert "warning: no gates" in _render_rollout(status)
    assert "gates: none" in _render_rollout(status)
    # Gates without a traffic minimum: a quiet wave would pass them.
    r = Rollout.new(1, spec(min_requests=0), AGENTS, {a: 1 for a in AGENTS}, now=0)
    assert rollout_to_proto(r, 0.0).warnings[0].startswith("--min-requests 0")
    # Gates and a minimum: nothing to warn about.
    r = Rollout.new(1, spec(), AGENTS, {a: 1 for a in AGENTS}, now=0)
    assert not rollout_to_proto(r, 0.0).warnings


def _start(*args: str) -> object:
    return build_parser().parse_args(["rollout", "start", "m", "2", *args])


@pytest.mark.parametrize("flag", ["--bake", "--agent-timeout", "--timeout"])
def test_a_duration_without_a_unit_is_refused(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        _start("--wait", flag, "300")
    assert e.value.code == 2
    assert f"argument {flag}: '300' has no unit: add one, e.g. 300s" in capsys.readouterr().err
    args = _start("--wait", flag, "300s")
    assert getattr(args, flag[2:].replace("-", "_")) == 300.0


def test_rollout_start_help_shows_every_default() -> None:
    parser = build_parser()
    start = parser._subparsers._group_actions[0].choices["rollout"]  # type: ignore[union-attr]
    start = start._subparsers._group_actions[0].choices["start"]
    options = [a for a in start._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} >= {"bake", "waves", "min_requests", "wait", "timeout"}
    for action in options:
        assert action.help and "(default: " in action.help, action.option_strings
    text = " ".join(start.format_help().split())
    for shown in (
        "(default: 10,50,100)",
        "(default: 5m)",
        "(default: 10m)",
        "(default: none: the judge (--judge) compares canary and baseline)",
        "(default: latency,errors)",
        "(default: 3 x --bake)",
        "(default: 0: a wave without traffic passes its gates)",
        "(default: canary)",
        "(default: the whole fleet)",
    ):
        assert shown in text
    args = _start()
    assert (args.bake, args.agent_timeout, args.waves) == (300.0, 600.0, "10,50,100")


# -- item 6: the status shows what was judged ---------------------------------------------------


def test_the_evaluation_keeps_the_figures_behind_each_verdict() -> None:
    canary = Stats(requests=400, failures=4, p50_ms=5, p95_ms=8, p99_ms=30)
    fleet = FakeFleet({a: 1 for a in AGENTS}, per_version={2: canary, 1: BASE})
    r = Rollout.new(1, spec(), AGENTS, {a: 1 for a in AGENTS}, now=0)
    for t in (0, 1, 61):
        run(r, fleet, t)
    assert r.state == "rolling_back"
    ev = rollout_dict(rollout_to_proto(r, 61.0))["last_evaluation"]
    assert ev["canary_requests"] == 400 and ev["canary_failures"] == 4
    assert ev["baseline_requests"] == 5000 and ev["baseline_failures"] == 10
    assert (ev["canary_agents"], ev["baseline_agents"], ev["baseline_version"]) == (1, 9, 1)
    assert (ev["since"], ev["at"]) == (1, 61)
    gates = {g["gate"]: g for g in ev["gates"]}
    assert gates["error_rate<0.01"] == {
        "gate": "error_rate<0.01",
        "value": 0.01,
        "ok": False,
        "canary": 0.01,
        "baseline": 0.002,
    }
    ratio = gates["p99_vs_baseline<1.2"]
    assert (ratio["canary"], ratio["baseline"], ratio["value"], ratio["ok"]) == (30, 10, 3, False)
    text = _render_rollout(rollout_to_proto(r, 61.0))
    assert "baseline v1 5000 request(s), 10 failed, on 9 agent(s)" in text
    row = next(ln for ln in text.splitlines() if ln.strip().startswith("p99_vs_baseline<1.2"))
    assert row.split() == ["p99_vs_baseline<1.2", "30", "10", "3", "FAILED"]


def test_the_per_agent_view_names_canaries_their_version_state_and_error() -> None:
    order = stable_order(AGENTS, "m", 2)
    fleet = FakeFleet({a: 1 for a in AGENTS}, per_version={2: GOOD, 1: BASE})
    r = Rollout.new(1, spec(max_failed_agents=2), AGENTS, {a: 1 for a in AGENTS}, now=0)
    run(r, fleet, 0)
    run(r, fleet, 1)
    fleet.refuse[order[2]] = "health gate (non_finite): output y has NaN"
    run(r, fleet, 61)  # wave 2: agents 2..5 assigned, one of them refuses
    run(r, fleet, 62)
    facts = {a: AgentFacts(f"host-{a}", fleet.active[a]) for a in AGENTS}
    views = {v["agent_id"]: v for v in rollout_dict(rollout_to_proto(r, 62.0, facts))["per_agent"]}
    assert list(views) == order  # canary order
    assert views[order[0]] == {
        "agent_id": order[0],
        "hostname": f"host-{order[0]}",
        "role": "canary",
        "wave": 1,
        "previous_version": 1,
        "active_version": 2,
        "state": "switched",
        "last_error": "",
    }
    assert views[order[2]]["state"] == "failed" and views[order[2]]["wave"] == 2
    assert views[order[2]]["last_error"].startswith("health gate (non_finite)")
    assert views[order[9]]["role"] == "baseline" and views[order[9]]["state"] == "waiting"
    text = _render_rollout(rollout_to_proto(r, 62.0, facts))
    assert text.index(order[2]) < text.index(order[0])  # failed agents first
    # A status without facts (history) carries no per-agent rows.
    assert rollout_to_proto(r, 62.0).per_agent == []


def test_blue_green_shows_prepared_counts_per_agent_and_in_total() -> None:
    fleet = FakeFleet({a: 1 for a in AGENTS})
    silent = AGENTS[0]
    fleet.silent.add(silent)
    r = Rollout.new(1, spec(strategy="blue-green"), AGENTS, {a: 1 for a in AGENTS}, now=0)
    fleet.apply(r.step(0, fleet))
    fleet.apply_prepare(r.prepare_out)
    r.prepare_out = []
    fleet.apply(r.step(1, fleet))
    assert r.state == "preparing"
    status = rollout_to_proto(r, 1.0, {a: AgentFacts(active_version=1) for a in AGENTS})
    states = {a.agent_id: a.state for a in status.per_agent}
    assert states[silent] == "preparing" and list(states.values()).count("prepared") == 9
    assert "prepared 9/10" in _render_rollout(status)


# -- item 5: exit codes ---------------------------------------------------------------------------


def test_outcome_exit_codes_are_distinct_and_documented() -> None:
    outcome = {EXIT_ROLLED_BACK, EXIT_NEEDS_OPERATOR, EXIT_WAIT_TIMEOUT}
    assert len(outcome) == 3
    # Never an error's code, argparse's 2, a traceback's 1 or Ctrl-C's 130.
    assert not outcome & (set(EXIT_CODES.values()) | {0, 1, 2, 130})
    assert ROLLOUT_EXIT_CODES == {
        "done": 0,
        "rolled_back": EXIT_ROLLED_BACK,
        "paused": EXIT_NEEDS_OPERATOR,
        "ready": EXIT_NEEDS_OPERATOR,
    }
    doc = (DOCS / "cli.md").read_text()
    for code in outcome:
        assert f"| {code} |" in doc, f"exit code {code} is not in docs/cli.md's table"


def test_json_status_is_plain_data() -> None:
    r = Rollout.new(1, spec(), AGENTS, {a: 1 for a in AGENTS}, now=0)
    d = rollout_dict(rollout_to_proto(r, 0.0, {a: AgentFacts() for a in AGENTS}))
    assert json.loads(json.dumps(d)) == d
    assert d["bake_s"] == 60 and d["min_requests"] == 100 and len(d["per_agent"]) == 10


@pytest.mark.parametrize(
    "argv",
    [
        ["agents", "token", "--ttl"],
        ["metrics", "m", "--since"],
        [
            "jobs",
            "create",
            "j",
            "--model",
            "m",
            "--deployed",
            "--input",
            "i",
            "--output",
            "o",
            "--every",
        ],
        ["backup", "d", "--timeout"],
    ],
)
def test_every_duration_flag_refuses_a_bare_number(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """One rule for the whole CLI (issue 14): a bare 300 could mean seconds or minutes."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "300"])
    assert e.value.code == 2
    assert "'300' has no unit: add one, e.g. 300s" in capsys.readouterr().err
    build_parser().parse_args([*argv, "5m"])


class _Unreachable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "failed to connect to all addresses"


class _RestartingHub:
    """GetRollout as a hub that goes away for ``down`` calls and comes back with ``after``."""

    def __init__(self, down: int, after: pb.RolloutStatus) -> None:
        self.down, self.after, self.calls = down, after, 0

    def GetRollout(self, request: pb.GetRolloutRequest, timeout: float) -> pb.RolloutStatus:
        self.calls += 1
        if self.calls <= self.down:
            raise _Unreachable()
        return self.after


def test_a_watch_outlives_a_hub_restart(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 14 leftover: `rollout status --watch` exited 5 when the hub restarted under it,
    though the rollout is durable and resumes with the hub."""
    import modelfleet.hub.cli as hub_cli

    monkeypatch.setattr(hub_cli, "WATCH_INTERVAL_S", 0.0)
    running = pb.RolloutStatus(id=3, model="m", version=2, state="baking")
    done = pb.RolloutStatus(id=3, model="m", version=2, state="done")
    hub = _RestartingHub(down=3, after=done)
    assert hub_cli._watch_rollout(hub, running, None, as_json=False, shown=True) == 0
    err = capsys.readouterr().err
    assert "the hub does not answer" in err and "the hub answers again" in err
    # An outage that outlasts the watch's own deadline still ends it, with "unavailable".
    monkeypatch.setattr(hub_cli, "WATCH_OUTAGE_S", 0.0)
    with pytest.raises(ModelfleetError) as e:
        hub_cli._watch_rollout(_RestartingHub(10, done), running, None, as_json=False, shown=True)
    assert e.value.status is Status.UNAVAILABLE
