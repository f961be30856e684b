"""Mistakes and ordinary events end with one line that names the fix and a documented exit
code, never a traceback; a normal hub stop logs no ERROR (issue 14, item 8). Real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import models
from tests.conftest import make_mlp_bundle
from tests.procs import (
    ROOT,
    AgentProcess,
    BrokerProcess,
    HubProcess,
    agent_status,
    enroll_agent,
    wait_for,
)

pytestmark = pytest.mark.process

EXIT_BROKEN_PIPE = 141


def cli(program: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"modelfleet.{program}.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The command failed with ``code`` and exactly one stderr line holding every needle."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and len(lines) == 1, f"{r.returncode}\n{r.stderr}"
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def listening_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_hub_on_a_busy_port_says_so_and_creates_nothing(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    with listening_socket() as busy:
        port = busy.getsockname()[1]
        busy_at = f"127.0.0.1:{port}"
        for flags, flag in (
            (["--listen", busy_at, "--enroll-listen", "127.0.0.1:0"], "--listen"),
            (["--listen", "127.0.0.1:0", "--enroll-listen", busy_at], "--enroll-listen"),
            (["--listen", "127.0.0.1:0", "--metrics-listen", busy_at], "--metrics-listen"),
        ):
            r = cli("hub", "--data", str(data), "serve", *flags)
            one_line_error(r, 5, f"127.0.0.1:{port}", "in use", flag)
            # No data directory, CA or keys for a hub that never listened.
            assert not data.exists(), sorted(data.rglob("*"))


def test_agent_on_a_busy_port_says_so_in_one_line(tmp_path: Path, repo: Path) -> None:
    with listening_socket() as busy:
        port = busy.getsockname()[1]
        r = cli("agent", "serve", "--models", str(repo), "--listen", f"127.0.0.1:{port}")
        one_line_error(r, 5, f"127.0.0.1:{port}", "in use", "--listen")


def test_config_that_is_a_directory(tmp_path: Path) -> None:
    data = tmp_path / "agent-data"
    data.mkdir()
    (data / "agent.toml").write_text('[agent]\nhub = "127.0.0.1:1"\n')
    r = cli("agent", "run", "--config", str(data))
    one_line_error(r, 3, f"config file {data} is a directory", f"--config {data}/agent.toml")
    r = cli("hub", "--data", str(tmp_path / "hub"), "serve", "--config", str(tmp_path))
    one_line_error(r, 3, f"config file {tmp_path} is a directory")


def test_admin_socket_path_over_107_bytes(tmp_path: Path, repo: Path) -> None:
    long = tmp_path / ("s" * (120 - len(str(tmp_path)))) / "admin.sock"
    r = cli(
        "agent",
        "serve",
        "--models",
        str(repo),
        "--listen",
        "127.0.0.1:0",
        "--admin-socket",
        str(long),
    )
    one_line_error(r, 3, "at most 107", "--admin-socket")
    r = cli("agent", "status", "--admin-socket", str(long))
    one_line_error(r, 3, "at most 107", "--admin-socket")


def closed_stdout(program: str, *args: str) -> subprocess.CompletedProcess:
    """Run with a stdout pipe whose reader is gone before the command writes (`| head`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", f"modelfleet.{program}.cli", *args],
            cwd=ROOT,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)


def test_a_closed_stdout_ends_the_command_quietly(tmp_path: Path) -> None:
    bundle = make_mlp_bundle(tmp_path / "repo", 1)
    r = closed_stdout("agent", "bundle", "inspect", str(bundle.path))
    assert r.returncode == EXIT_BROKEN_PIPE and r.stderr == "", r
    # argparse's help swallows the error itself (exit 0); what matters is the silence.
    for program in ("agent", "hub"):
        r = closed_stdout(program, "--help")
        assert r.returncode in (0, EXIT_BROKEN_PIPE) and r.stderr == "", r


def test_global_options_after_the_command_say_where_they_go(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    r = cli("hub", "models", "ls", "--data", str(data))
    one_line_error(
        r,
        2,
        "--data is an option of modelfleet-hub itself and goes before the command: "
        f"modelfleet-hub --data {data} models ls",
    )
    r = cli("hub", "agents", "ls", "--json", "--hub=127.0.0.1:1", "--admin-dir", str(data))
    one_line_error(r, 2, f"modelfleet-hub --hub=127.0.0.1:1 --admin-dir {data} agents ls --json")
    # Anything else still gets argparse's own words.
    r = cli("hub", "models", "ls", "--frobnicate")
    assert r.returncode == 2 and "unrecognized arguments: --frobnicate" in r.stderr


RESYNC_S = 2.0


def test_mqtt_hub_idle_past_its_resync_deploys_and_stops_without_error(tmp_path: Path) -> None:
    """The MQTT bridge's resync wait (mqtt_resync_interval_s) used to leak the hub's
    desired-state lock once it timed out: deploys hung from then on and SIGTERM ended in
    `RuntimeError: Lock is not acquired` (WatchDesired) or a hang."""
    (tmp_path / "hub").mkdir()
    # A short interval, so that the idle wait below times out several times, as 30 s would.
    (tmp_path / "hub.toml").write_text(f"[hub]\nmqtt_resync_interval_s = {RESYNC_S}\n")
    broker = BrokerProcess(tmp_path / "hub", tmp_path / "broker").configure().start()
    hub = HubProcess(
        tmp_path / "hub",
        "--config",
        str(tmp_path / "hub.toml"),
        "--mqtt",
        broker.address,
        log_path=tmp_path / "hub.log",
    )
    agent = None
    try:
        hub.start()
        wait_for(lambda: "connected to MQTT broker" in hub.logs(), 30, "hub on MQTT")
        hub.cli("publish", "mlp", str(models.mlp(tmp_path / "mlp.onnx")))
        config = enroll_agent(hub, tmp_path / "edge", "site=a", hostname="edge")
        agent = AgentProcess(
            tmp_path / "edge",
            fleet_config=config,
            env={"MODELFLEET_AGENT_BACKOFF_MAX_S": "1"},
            log_path=tmp_path / "edge.log",
        ).start()
        agent.wait_live()
        time.sleep(2.5 * RESYNC_S)  # past two of the bridge's waits with nothing to publish
        hub.cli("deploy", "mlp", "1", timeout=20)
        wait_for(
            lambda: agent_status(agent.admin_socket).get("mlp", {}).get("active_version") == "1",
            30,
            "mlp v1 on the agent",
        )
        assert hub.stop() == 0
        logs = hub.logs()
        assert " ERROR " not in logs and "Traceback" not in logs, logs[-3000:]
        assert "stopped" in logs
    finally:
        if agent is not None:
            agent.stop()
        hub.stop()
        broker.stop()
