"""A standalone agent refuses what would break another one or hide a mistake, and its log, its
`status` and ServerReady agree on readiness (issue 14, item 7). Real agent processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import make_mlp_bundle
from tests.procs import ROOT, AgentProcess, wait_for

pytestmark = pytest.mark.process

EXIT_NOT_READY = 23


def agent_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modelfleet.agent.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def serve_expecting_refusal(*args: str) -> subprocess.CompletedProcess:
    """`serve` that must stop on its own; one that keeps running is killed and fails the test."""
    try:
        return agent_cli("serve", "--listen", "127.0.0.1:0", *args, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`modelfleet-agent serve {' '.join(args)}` started instead of refusing")


def test_second_serve_on_the_same_models_is_refused_and_a_stale_socket_replaced(
    tmp_path: Path, repo: Path
) -> None:
    make_mlp_bundle(repo, 1)
    socket = repo / ".modelfleet-admin.sock"  # the default: one agent per --models
    first = AgentProcess(repo, "--admin-socket", str(socket), log_path=tmp_path / "first.log")
    first.admin_socket = socket
    with first:
        first.wait_model("mlp")
        second = serve_expecting_refusal("--models", str(repo))
        assert second.returncode == 5, second.stderr
        assert f"another agent is running on the admin socket {socket}" in second.stderr
        assert "--admin-socket" in second.stderr and "Traceback" not in second.stderr
        # The first agent keeps its socket: status and rollback still reach it.
        assert socket.is_socket()
        status = agent_cli("status", "--models", str(repo))
        assert status.returncode == 0 and "READY" in status.stdout, status.stderr

        # kill -9 leaves the socket behind: a new agent tells it is stale and takes its place.
        first.kill()
        assert socket.is_socket()
        third = AgentProcess(repo, "--admin-socket", str(socket), log_path=tmp_path / "third.log")
        third.admin_socket = socket
        with third:
            third.wait_model("mlp")
            assert "removing the stale admin socket" in third.logs()
            status = agent_cli("status", "--models", str(repo))
            assert status.returncode == 0 and "READY" in status.stdout, status.stderr
        assert third.proc is not None and third.proc.returncode == 0
        assert not socket.exists()


def test_serve_refuses_a_models_folder_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nosuchdir"
    r = serve_expecting_refusal("--models", str(missing))
    assert r.returncode == 3, r.stderr
    assert f"model repository {missing} does not exist" in r.stderr
    assert f"mkdir -p {missing}" in r.stderr and "--models DIR" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not missing.exists()


def test_log_status_and_server_ready_agree(tmp_path: Path, repo: Path) -> None:
    agent = AgentProcess(repo, log_path=tmp_path / "agent.log")
    with agent:
        agent.wait_live()
        agent.wait_log("NOT READY (standalone, repository")
        assert "READY (standalone" not in agent.logs().replace("NOT READY (standalone", "")
        status = agent.cli("status")
        assert status.returncode == EXIT_NOT_READY, status.stdout + status.stderr
        assert "NOT READY (no model to serve yet)" in status.stdout
        as_json = agent.cli("status", "--json")
        assert as_json.returncode == EXIT_NOT_READY
        assert json.loads(as_json.stdout).get("ready", False) is False
        with grpcclient.InferenceServerClient(agent.url) as client:
            assert not client.is_server_ready()

            make_mlp_bundle(repo, 1)
            agent.wait_model("mlp")
            wait_for(
                lambda: f"READY (standalone, repository {repo}): serving mlp v1" in agent.logs(),
                30,
                "READY line",
            )
            assert client.is_server_ready()
        status = agent.cli("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"agent on {agent.url}: READY" in status.stdout
