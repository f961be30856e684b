"""Issue 12, item 9: the enrollment token stays off the command line and out of every log.

The attacker is another local user of the node: /proc/PID/cmdline is world-readable, so a token
passed as an argument can be copied and redeemed before the real enrollment completes.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelfleet.kernel.identity import EnrollToken
from tests.procs import ROOT, AgentProcess, HubProcess, wait_for

ENROLL = [sys.executable, "-m", "modelfleet.agent.cli", "enroll"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("token-secrecy")
    # DEBUG: a secret logged at any level shows up here.
    h = HubProcess(root / "hub", "--log-level", "DEBUG", log_path=root / "hub.log").start()
    yield h
    h.stop()


def new_token(hub: HubProcess) -> tuple[str, str]:
    token = hub.cli("agents", "token", "--labels", "site=test", "--ttl", "10m").strip()
    return token, EnrollToken.decode(token).secret


def proc_text(pid: int, what: str) -> str:
    return Path(f"/proc/{pid}/{what}").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def exec_view(proc: subprocess.Popen) -> tuple[str, str]:
    """(argv, environment) as the process shows them once it runs `agent.cli` (right after the
    fork, /proc still shows the parent's or nothing)."""
    wait_for(
        lambda: "modelfleet.agent.cli" in proc_text(proc.pid, "cmdline"), 10, "enroll to start"
    )
    return proc_text(proc.pid, "cmdline"), proc_text(proc.pid, "environ")


def start_enroll(data: Path, *args: str, **popen: object) -> subprocess.Popen:
    return subprocess.Popen(
        [*ENROLL, "--data", str(data), "--hostname", data.name, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def assert_nowhere(secret: str, token: str, *texts: str) -> None:
    for text in texts:
        assert secret not in text and token not in text


def files_text(root: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())


def test_enroll_with_token_file_keeps_the_token_out_of_argv(hub: HubProcess, tmp_path: Path):
    token, secret = new_token(hub)
    # A FIFO holds the enrolling process at the read, alive, while we look at what other local
    # users can see of it.
    fifo = tmp_path / "token.fifo"
    os.mkfifo(fifo, 0o600)
    proc = start_enroll(tmp_path / "node-file", "--token-file", str(fifo))
    try:
        argv, environ = exec_view(proc)
        assert "--token-file" in argv
        assert_nowhere(secret, token, argv, environ)

        def writer() -> int:
            try:
                return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no reader yet
                    return -1
                raise

        fd = -1
        deadline = time.monotonic() + 30
        while fd < 0 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            fd = writer()
            time.sleep(0.02)
        assert fd >= 0, "enroll never opened the token file"
        os.write(fd, (token + "\n").encode())
        os.close(fd)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, out + err
    assert "enrolled as" in out
    assert_nowhere(secret, token, out, err, files_text(tmp_path / "node-file"))


def test_enroll_with_token_on_stdin_and_the_agent_logs_no_secret(
    hub: HubProcess, tmp_path: Path
) -> None:
    token, secret = new_token(hub)
    data = tmp_path / "node-stdin"
    proc = start_enroll(data, "--token-file", "-", stdin=subprocess.PIPE)
    try:
        # The process waits for standard input: look at it before the token exists anywhere.
        assert_nowhere(secret, token, *exec_view(proc))
        out, err = proc.communicate(token + "\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, out + err
    assert_nowhere(secret, token, out, err)
    # The enrolled agent runs, reaches the hub, and logs nothing of the token either.
    agent = AgentProcess(
        data,
        "--log-level",
        "DEBUG",
        fleet_config=data / "agent.toml",
        log_path=tmp_path / "agent.log",
    )
    agent.start()
    try:
        agent.wait_live()
        wait_for(lambda: "node-stdin" in hub.cli("agents", "ls"), 30, "agent in `agents ls`")
    finally:
        agent.stop()
    assert_nowhere(secret, token, agent.logs(), files_text(data), hub.logs())


def test_enroll_with_token_in_the_environment(hub: HubProcess, tmp_path: Path) -> None:
    token, secret = new_token(hub)
    proc = start_enroll(
        tmp_path / "node-env", env={**os.environ, "MODELFLEET_AGENT_ENROLL_TOKEN": token}
    )
    try:
        assert_nowhere(secret, token, exec_view(proc)[0])
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, out + err
    assert_nowhere(secret, token, out, err)


def test_token_on_the_command_line_still_works_but_is_warned_about(
    hub: HubProcess, tmp_path: Path
) -> None:
    token, secret = new_token(hub)
    r = subprocess.run(
        [*ENROLL, "--token", token, "--data", str(tmp_path / "node-argv")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--token is visible" in r.stderr and "--token-file" in r.stderr
    assert_nowhere(secret, token, r.stdout, r.stderr, hub.logs())


def run_enroll(tmp_path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MODELFLEET_AGENT_ENROLL_TOKEN"}
    return subprocess.run(
        [*ENROLL, "--data", str(tmp_path / "node"), *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unusable_token_sources_are_refused_with_what_to_do(tmp_path: Path) -> None:
    r = run_enroll(tmp_path)
    assert r.returncode == 3 and "--token-file" in r.stderr, r.stderr
    r = run_enroll(tmp_path, "--token-file", str(tmp_path / "missing"))
    assert r.returncode == 3 and "missing" in r.stderr, r.stderr
    empty = tmp_path / "empty"
    empty.write_text("\n")
    r = run_enroll(tmp_path, "--token-file", str(empty))
    assert r.returncode == 3 and "is empty" in r.stderr, r.stderr
    r = run_enroll(tmp_path, "--token-file", "-", stdin="")
    assert r.returncode == 3 and "standard input is empty" in r.stderr, r.stderr
    two = tmp_path / "two"
    two.write_text("mft1.aaaa\nmft1.bbbb\n")
    r = run_enroll(tmp_path, "--token-file", str(two))
    assert r.returncode == 3 and "one token" in r.stderr, r.stderr
    r = run_enroll(tmp_path, "--token-file", str(two), "--token", "mft1.x")
    assert r.returncode == 2 and "not allowed with" in r.stderr, r.stderr
    # A world-readable token file is warned about (another user could redeem it first); the
    # token here is malformed, so enrollment stops before any network traffic.
    loose = tmp_path / "loose"
    loose.write_text("mft1.bad")
    loose.chmod(0o644)
    r = run_enroll(tmp_path, "--token-file", str(loose))
    assert "readable by group/others" in r.stderr and r.returncode == 3, r.stderr
    assert not (tmp_path / "node").exists()
