"""Issue 14, items 3, 5 and 6 on a real hub with two real agents: nonsense refused before anything
changes, `rollout start --wait` / `rollout status --watch` exit codes (0 done, 20 rolled back, 21
waiting for an operator, 22 timeout), a watch in a pipe and on a terminal, and a status that
shows the figures behind each verdict and every agent.

The tests share one fleet and run in order: each starts from where the one before left it.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from modelfleet.hub.cli import EXIT_NEEDS_OPERATOR, EXIT_ROLLED_BACK, EXIT_WAIT_TIMEOUT
from tests import models
from tests.procs import (
    ROOT,
    AgentProcess,
    HubProcess,
    agent_status,
    enroll_agent,
    traffic,
    wait_for,
)

FAST = {
    "MODELFLEET_AGENT_REPORT_INTERVAL_S": "0.5",
    "MODELFLEET_AGENT_BACKOFF_MAX_S": "1",
    "MODELFLEET_AGENT_TELEMETRY_INTERVAL_S": "1",
}
# Two agents, one per wave: wave 1 is one canary with one baseline agent beside it.
ONE_BY_ONE = ("--waves", "1,2", "--waves-are-counts", "--agent-timeout", "60s")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, list]]:
    root = tmp_path_factory.mktemp("rollout-wait")
    hub = HubProcess(root / "hub", log_path=root / "hub.log").start()
    agents: list[AgentProcess] = []
    try:
        for i, site in enumerate(("berlin", "paris")):
            config = enroll_agent(hub, root / f"a{i}", f"site={site}", hostname=f"edge-{i}")
            agents.append(
                AgentProcess(
                    root / f"a{i}", fleet_config=config, env=FAST, log_path=root / f"a{i}.log"
                ).start()
            )
        src = root / "onnx"
        hub.cli("publish", "mlp", str(models.mlp(src / "v1.onnx", seed=0)))
        hub.cli("publish", "mlp", str(models.mlp(src / "v2.onnx", seed=1)))
        hub.cli("deploy", "mlp", "1")
        wait_for(lambda: all(active(a) == 1 for a in agents), 120, "v1 everywhere")
        yield hub, agents
    finally:
        for a in agents:
            a.stop()
        hub.stop()


def active(agent: AgentProcess) -> int:
    try:
        return int(agent_status(agent.admin_socket).get("mlp", {}).get("active_version", 0))
    except Exception:
        return -1


def cli(hub: HubProcess, *args: str) -> subprocess.CompletedProcess:
    return hub.cli(*args, check=False, timeout=180)  # type: ignore[return-value]


def status(hub: HubProcess) -> dict:
    return json.loads(hub.cli("rollout", "status", "mlp", "--json"))


def test_nonsense_is_refused_before_anything_changes(fleet) -> None:
    hub, agents = fleet
    r = cli(hub, "rollout", "start", "mlp", "1")
    assert r.returncode == 7, r.stderr
    assert "mlp v1 is already the desired version of all 2 agent(s) of the fleet (2 run it)" in (
        r.stderr
    )
    r = cli(hub, "rollout", "start", "mlp", "2", "--waves", "50,10")
    assert r.returncode == 3 and "waves must increase" in r.stderr and "50%,10%" in r.stderr
    r = cli(hub, "rollout", "start", "mlp", "2", "--bake", "300")
    assert r.returncode == 2 and "'300' has no unit: add one, e.g. 300s" in r.stderr
    r = cli(hub, "rollout", "start", "mlp", "2", "--timeout", "5s")
    assert r.returncode == 2 and "--timeout needs --wait" in r.stderr
    r = cli(hub, "rollout", "status", "mlp", "--timeout", "5s")
    assert r.returncode == 2 and "--timeout needs --watch" in r.stderr
    # Nothing was recorded, nothing moved.
    assert hub.cli("rollout", "history", "mlp") == ""
    assert [active(a) for a in agents] == [1, 1]


def test_wait_exits_0_when_done_and_prints_one_line_per_change(fleet) -> None:
    hub, agents = fleet
    # --judge none: gates only, and there are none (the warning below).
    no_judge = ("--judge", "none")
    r = cli(hub, "rollout", "start", "mlp", "2", *ONE_BY_ONE, "--bake", "1s", *no_judge, "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    # Said at start: no gate judges the waves.
    assert "warning: no gates: a wave passes once its agents have switched" in out
    # Not a terminal: the block once, then lines; never the block again.
    assert out.count("rollout 1: mlp v2  state") == 1
    lines = out.splitlines()
    assert lines[-1] == "rollout 1 of mlp v2: done; exit 0"
    changes = [ln for ln in lines if re.match(r"\d\d:\d\d:\d\d  ", ln)]
    assert any("wave 2/2: assigned 1 agent(s)" in ln for ln in changes)
    assert any(ln.endswith("done: v2 on 2 agent(s)") for ln in changes)
    assert len(changes) == len(set(changes))  # each change once
    assert [active(a) for a in agents] == [2, 2]
    # The same outcome from a watch of the finished rollout; the no-gates warning stays.
    r = cli(hub, "rollout", "status", "mlp", "--watch", "--timeout", "30s")
    assert r.returncode == 0 and "warning: no gates" in r.stdout
    assert r.stdout.splitlines()[-1] == "rollout 1 of mlp v2: done; exit 0"
    assert status(hub)["warnings"][0].startswith("no gates")
    # Now v2 is everywhere: v2 again changes nothing, v1 goes back.
    r = cli(hub, "rollout", "start", "mlp", "2")
    assert r.returncode == 7 and "nothing to roll out" in r.stderr
    r = cli(hub, "rollout", "start", "mlp", "1")
    assert r.returncode == 7
    assert "mlp v1 is a downgrade: 2 of the 2 agent(s) of the fleet run or are set to run" in (
        r.stderr
    )
    assert "--allow-downgrade" in r.stderr
    assert len(hub.cli("rollout", "history", "mlp").splitlines()) == 1


def test_wait_exits_20_when_rolled_back_and_status_shows_what_was_judged(fleet) -> None:
    hub, agents = fleet
    hub.cli("publish", "mlp", str(models.mlp(hub.data.parent / "onnx" / "v3.onnx", seed=3)))
    with traffic(agents, interval_s=0.01):
        # The canary is as fast as the baseline, so a ratio gate of 0.01 fails for certain:
        # what matters here is that both figures behind it are shown.
        r = cli(
            hub,
            "rollout",
            "start",
            "mlp",
            "3",
            *ONE_BY_ONE,
            "--bake",
            "4s",
            "--gate",
            "error_rate<0.5",
            "--gate",
            "p99_vs_baseline<0.01",
            "--min-requests",
            "5",
            "--wait",
            "--timeout",
            "150s",
        )
    assert r.returncode == EXIT_ROLLED_BACK, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1].startswith("rollout 2 of mlp v3: rolled_back (wave 1 failed")
    assert r.stdout.splitlines()[-1].endswith(f"; exit {EXIT_ROLLED_BACK}")
    wait_for(lambda: status(hub)["per_agent"][0]["active_version"] == 2, 60, "canary back on v2")
    s = status(hub)
    ev = s["last_evaluation"]
    assert ev["wave"] == 1 and ev["canary_agents"] == 1 and ev["baseline_agents"] == 1
    assert ev["baseline_version"] == 2
    assert ev["canary_requests"] >= 5 and ev["baseline_requests"] >= 5
    gates = {g["gate"]: g for g in ev["gates"]}
    ratio = gates["p99_vs_baseline<0.01"]
    assert ratio["ok"] is False and ratio["canary"] > 0 and ratio["baseline"] > 0
    assert ratio["value"] == pytest.approx(ratio["canary"] / ratio["baseline"])
    assert gates["error_rate<0.5"]["ok"] is True
    assert gates["error_rate<0.5"]["baseline"] is not None
    canary, baseline = s["per_agent"]
    assert canary["role"] == "canary" and canary["wave"] == 1
    assert canary["previous_version"] == 2 and canary["state"] == "rolled_back"
    assert canary["hostname"] in ("edge-0", "edge-1")
    assert baseline["role"] == "baseline" and baseline["state"] == "unchanged"
    assert baseline["active_version"] == 2
    text = hub.cli("rollout", "status", "mlp")
    assert "CANARY   BASELINE" in text and "baseline v2 " in text
    assert f"{canary['agent_id']:<24} {canary['hostname']:<16} canary" in text


def test_wait_exits_21_when_inconclusive_then_abort_is_20(fleet) -> None:
    hub, agents = fleet
    # No traffic at all: the bake cannot reach --min-requests, the rollout pauses as inconclusive.
    r = cli(
        hub,
        "rollout",
        "start",
        "mlp",
        "3",
        *ONE_BY_ONE,
        "--bake",
        "2s",
        "--gate",
        "error_rate<0.5",
        "--min-requests",
        "1000000",
        "--wait",
        "--timeout",
        "120s",
    )
    assert r.returncode == EXIT_NEEDS_OPERATOR, r.stdout + r.stderr
    assert "rollout 3 of mlp v3: paused (inconclusive: wave 1 saw" in r.stdout.splitlines()[-1]
    r = cli(hub, "rollout", "status", "mlp", "--watch")
    assert r.returncode == EXIT_NEEDS_OPERATOR
    hub.cli("rollout", "abort", "mlp")
    r = cli(hub, "rollout", "status", "mlp", "--watch", "--timeout", "60s")
    assert r.returncode == EXIT_ROLLED_BACK, r.stdout + r.stderr
    wait_for(lambda: [active(a) for a in agents] == [2, 2], 60, "everyone back on v2")


def test_timeout_exits_22_and_the_rollout_goes_on(fleet) -> None:
    hub, agents = fleet
    start = time.monotonic()
    r = cli(
        hub,
        "rollout",
        "start",
        "mlp",
        "3",
        *ONE_BY_ONE,
        "--bake",
        "1h",
        "--wait",
        "--timeout",
        "2s",
    )
    assert r.returncode == EXIT_WAIT_TIMEOUT, r.stdout + r.stderr
    assert time.monotonic() - start < 60
    assert "after --timeout 2s; it goes on" in r.stderr
    assert status(hub)["state"] in ("switching", "baking")
    wait_for(lambda: status(hub)["state"] == "baking", 60, "baking")
    r = cli(hub, "rollout", "status", "mlp", "--watch", "--json", "--timeout", "1s")
    assert r.returncode == EXIT_WAIT_TIMEOUT
    first = json.loads(r.stdout.splitlines()[0])  # JSON lines: one object per change
    assert first["state"] == "baking" and first["bake_s"] == 3600
    hub.cli("rollout", "pause", "mlp")
    r = cli(hub, "rollout", "status", "mlp", "--watch", "--timeout", "30s")
    assert r.returncode == EXIT_NEEDS_OPERATOR
    assert r.stdout.splitlines()[-1] == "rollout 4 of mlp v3: paused (paused by operator); exit 21"
    hub.cli("rollout", "rollback", "mlp")
    r = cli(hub, "rollout", "status", "mlp", "--watch", "--timeout", "60s")
    assert r.returncode == EXIT_ROLLED_BACK
    wait_for(lambda: [active(a) for a in agents] == [2, 2], 60, "everyone back on v2")


def run_in_terminal(hub: HubProcess, *args: str, timeout: float = 150) -> tuple[int, str]:
    """The hub CLI with a pseudo-terminal as stdout and stderr: what a person at a shell sees."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelfleet.hub.cli", "--data", str(hub.data), *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the CLI exited and the terminal closed
                break
            if not chunk:
                break
            out += chunk
        return proc.wait(max(1.0, deadline - time.monotonic())), out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)


def test_a_terminal_keeps_a_redrawn_view(fleet) -> None:
    hub, agents = fleet
    code, out = run_in_terminal(
        hub, "rollout", "start", "mlp", "3", *ONE_BY_ONE, "--bake", "2s", "--wait"
    )
    assert code == 0, out
    redraws = out.count("\x1b[2J\x1b[H")
    assert redraws >= 3, out  # at least switching, baking and done, each drawn in place
    assert "watching rollout 5 every 1s; Ctrl-C stops watching, not the rollout" in out
    assert out.rstrip().endswith("rollout 5 of mlp v3: done; exit 0")
    assert [active(a) for a in agents] == [3, 3]


def test_blue_green_wait_stops_at_ready_with_prepared_counts(fleet) -> None:
    hub, agents = fleet
    hub.cli("publish", "mlp", str(models.mlp(hub.data.parent / "onnx" / "v4.onnx", seed=4)))
    r = cli(
        hub,
        "rollout",
        "start",
        "mlp",
        "4",
        "--strategy",
        "blue-green",
        "--bake",
        "1s",
        "--agent-timeout",
        "60s",
        "--wait",
        "--timeout",
        "120s",
    )
    assert r.returncode == EXIT_NEEDS_OPERATOR, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == "rollout 6 of mlp v4: ready; exit 21"
    text = hub.cli("rollout", "status", "mlp")
    assert "blue-green, wave 1/1" in text and "prepared 2/2" in text
    assert [a["state"] for a in status(hub)["per_agent"]] == ["prepared", "prepared"]
    hub.cli("rollout", "promote", "mlp")
    r = cli(hub, "rollout", "status", "mlp", "--watch", "--timeout", "120s")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [active(a) for a in agents] == [4, 4]
