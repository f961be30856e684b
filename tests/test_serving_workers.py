"""Serving workers (agent/workers.py): several processes answer inference on one port.

Real agents with ``--serving-workers``, real clients on many connections (SO_REUSEPORT spreads
connections, not requests), real kill -9. What is checked: every process serves, the counts of
all of them reach /metrics, a swap leaves no process on the old version, a worker that refuses
a version refuses it for all, a dead worker comes back with the current version, and nothing
outlives the agent.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests import models
from tests.conftest import make_mlp_bundle
from tests.procs import ROOT, AgentProcess, HubProcess, enroll_agent, wait_for
from tests.test_telemetry import TELEMETRY_ENV, fleet_metrics, restart_hub

# Every test here starts agents (and their workers), a hub or a child process.
pytestmark = pytest.mark.process

X = np.ones((1, 4), np.float32)
CHANNELS = 16


def infer(client: grpcclient.InferenceServerClient) -> str:
    inp = grpcclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(X)
    return client.infer("mlp", [inp]).get_response().model_version


def clients(agent, n: int = CHANNELS) -> list[grpcclient.InferenceServerClient]:
    # A connection each (gRPC shares one connection between equal channels of a process unless
    # told otherwise): the kernel hands each new connection to one of the processes.
    own = [("grpc.use_local_subchannel_pool", 1)]
    return [grpcclient.InferenceServerClient(agent.url, channel_args=own) for _ in range(n)]


def process_requests(agent) -> dict[str, float]:
    found = re.findall(
        r'^modelfleet_serving_process_requests_total\{process="(\d+)"\} (\S+)$',
        agent.metrics(),
        re.M,
    )
    return {p: float(v) for p, v in found}


def served_total(agent) -> float:
    found = re.findall(
        r'^modelfleet_requests_total\{model="mlp",[^}]*outcome="success"[^}]*\} (\S+)$',
        agent.metrics(),
        re.M,
    )
    return sum(float(v) for v in found)


def worker_pids(agent) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent.proc.pid:
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmd:
                out.append(int(entry))
    return out


def test_every_process_serves_and_is_counted(repo: Path, staging: Path, agent_factory) -> None:
    make_mlp_bundle(repo, 1)
    agent = agent_factory(repo, "--serving-workers", "2")
    agent.wait_log("agent: READY", timeout=90)
    assert "2 processes answer inference" in agent.logs()
    cs = clients(agent)
    try:
        for _ in range(5):
            for c in cs:
                assert infer(c) == "1"
    finally:
        for c in cs:
            c.close()
    shares = process_requests(agent)
    assert set(shares) == {"0", "1"}, shares
    # Sixteen connections all on one process: 2^-15 if the kernel spreads them evenly.
    assert shares["0"] > 0 and shares["1"] > 0, shares
    assert sum(shares.values()) == 5 * CHANNELS
    assert served_total(agent) == 5 * CHANNELS
    assert re.search(
        r'^modelfleet_serving_process_resident_bytes\{process="1"\} [1-9]', agent.metrics(), re.M
    )
    pids = worker_pids(agent)
    assert len(pids) == 1, pids
    assert agent.stop() == 0
    wait_for(lambda: not Path(f"/proc/{pids[0]}").exists(), 10, "worker gone")


def test_swap_reaches_every_process(repo: Path, staging: Path, agent_factory) -> None:
    make_mlp_bundle(repo, 1)
    agent = agent_factory(repo, "--serving-workers", "3")
    agent.wait_log("agent: READY", timeout=120)
    cs = clients(agent)
    try:
        assert {infer(c) for c in cs} == {"1"}
        bundle = make_mlp_bundle(staging, 2, seed=5)
        os.rename(bundle.path, repo / "mlp" / "2")
        agent.wait_log("version 1 -> 2", timeout=60)
        # The leader switched only after every worker had v2 loaded, and sent the switch
        # before logging; one round later no connection answers v1.
        wait_for(lambda: {infer(c) for c in cs} == {"2"}, 10, "every connection on v2")
        assert agent.logs().count("answers on") >= 2
    finally:
        for c in cs:
            c.close()


def test_killed_worker_comes_back_with_the_current_version(
    repo: Path, staging: Path, agent_factory
) -> None:
    make_mlp_bundle(repo, 1)
    agent = agent_factory(repo, "--serving-workers", "2")
    agent.wait_log("agent: READY", timeout=90)
    (pid,) = worker_pids(agent)
    bundle = make_mlp_bundle(staging, 2, seed=5)
    os.kill(pid, signal.SIGKILL)
    os.rename(bundle.path, repo / "mlp" / "2")
    agent.wait_log("starting it again", timeout=30)
    agent.wait_log("version 1 -> 2", timeout=60)
    wait_for(lambda: agent.logs().count("answers on") >= 2, 60, "worker back")
    (again,) = worker_pids(agent)
    assert again != pid
    cs = clients(agent)
    try:
        assert {infer(c) for c in cs} == {"2"}
    finally:
        for c in cs:
            c.close()
    assert "modelfleet_serving_worker_restarts_total 1.0" in agent.metrics()


def test_worker_dies_with_a_killed_leader(repo: Path, agent_factory) -> None:
    make_mlp_bundle(repo, 1)
    agent = agent_factory(repo, "--serving-workers", "2")
    agent.wait_log("agent: READY", timeout=90)
    (pid,) = worker_pids(agent)
    agent.kill()
    # Nothing may keep answering on the port once the agent is gone.
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, "worker gone with its leader")
    time.sleep(0.2)


def test_one_workers_refusal_refuses_the_version_everywhere(tmp_path: Path) -> None:
    """Two phases (tests/workers_phases.py, a child process): a version copied over between
    the leader's load and the worker's is refused on every process, v1 keeps serving; a clean
    version has reached the worker by the time the swap returns."""
    r = subprocess.run(
        [sys.executable, "-m", "tests.workers_phases", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
    assert "refused (worker)" in r.stderr and "changed after the leader loaded it" in r.stderr


def test_fleet_counts_every_process_exactly_through_a_kill_9(tmp_path: Path) -> None:
    """Fleet mode, two serving processes: the hub's counts are exact, including what both
    processes counted before the whole agent was killed (-9) with the hub away."""
    hubs = [HubProcess(tmp_path / "hub", log_path=tmp_path / "hub0.log").start()]
    agents: list[AgentProcess] = []
    try:
        hub = hubs[0]
        data = tmp_path / "edge-1"
        config = enroll_agent(hub, data, "site=berlin", hostname="edge-1")

        def start() -> AgentProcess:
            a = AgentProcess(
                data,
                "--serving-workers",
                "2",
                fleet_config=config,
                env=TELEMETRY_ENV,
                log_path=tmp_path / f"agent{len(agents)}.log",
            )
            agents.append(a)
            return a.start()

        agent = start()
        hub.cli("publish", "mlp", str(models.mlp(tmp_path / "m.onnx", seed=0)))
        hub.cli("deploy", "mlp", "1")
        agent.wait_model("mlp", timeout=60)
        wait_for(lambda: "answers on" in agent.logs(), 60, "the worker serving")

        def load(rounds: int) -> dict[str, float]:
            before = process_requests(agent)
            cs = clients(agent)
            try:
                for _ in range(rounds):
                    for c in cs:
                        assert infer(c) == "1"
            finally:
                for c in cs:
                    c.close()
            after = process_requests(agent)
            return {p: after[p] - before.get(p, 0.0) for p in after}

        shares = load(10)
        assert shares["0"] > 0 and shares["1"] > 0, shares
        wait_for(lambda: fleet_metrics(hub)[:2] == (160, 0), 60, "160 requests at the hub")

        # The hub away, both processes count, then the agent dies without a word.
        hub.stop()
        shares = load(5)
        assert shares["0"] > 0 and shares["1"] > 0, shares
        agent.kill()
        hub = restart_hub(hub, tmp_path / "hub1.log")
        hubs.append(hub)
        agent = start()
        wait_for(lambda: fleet_metrics(hub)[:2] == (240, 0), 90, "240 after the kill -9")
        time.sleep(1.5)  # replays would show now
        assert fleet_metrics(hub)[:2] == (240, 0)
    finally:
        for a in agents:
            a.stop()
        for h in hubs:
            h.stop()


TOKEN_A = "a" * 40
TOKEN_B = "b" * 40


def test_a_token_rotated_by_sighup_is_refused_by_every_process(
    repo: Path, tmp_path: Path, agent_factory
) -> None:
    """No worker keeps accepting a revoked inference token: SIGHUP reaches every process."""
    token_file = tmp_path / "inference.token"
    token_file.write_text(TOKEN_A)
    token_file.chmod(0o600)
    make_mlp_bundle(repo, 1)
    agent = agent_factory(repo, "--serving-workers", "2", "--auth-token-file", str(token_file))
    agent.wait_log("agent: READY", timeout=90)
    inp = grpcclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(X)

    def call(c: grpcclient.InferenceServerClient, token: str) -> bool:
        try:
            c.infer("mlp", [inp], headers={"authorization": f"Bearer {token}"}, client_timeout=10)
        except grpcclient.InferenceServerException as exc:
            assert "UNAUTHENTICATED" in str(exc.status()), exc
            return False
        return True

    cs = clients(agent)
    try:
        assert all(call(c, TOKEN_A) for c in cs)
        shares = process_requests(agent)
        assert shares["0"] > 0 and shares["1"] > 0, shares
        token_file.write_text(TOKEN_B)
        agent.proc.send_signal(signal.SIGHUP)
        # The same connections, so each stays with the process it reached before.
        wait_for(lambda: not any(call(c, TOKEN_A) for c in cs), 10, "the old token refused")
        assert all(call(c, TOKEN_B) for c in cs)
    finally:
        for c in cs:
            c.close()
    assert TOKEN_A not in agent.logs() and TOKEN_B not in agent.logs()


def test_model_control_asked_of_a_worker_is_done_by_the_agent(repo: Path, agent_factory) -> None:
    """Load and unload on a connection the kernel gave to a worker: the main process (which
    owns the repository) does it, and every process follows."""
    make_mlp_bundle(repo, 1)
    agent = agent_factory(repo, "--serving-workers", "2", "--model-control")
    agent.wait_log("agent: READY", timeout=90)
    cs = clients(agent)
    try:
        on_worker = None
        for c in cs:
            before = process_requests(agent)["1"]
            infer(c)
            if process_requests(agent)["1"] > before:
                on_worker = c
                break
        assert on_worker is not None, "no connection reached the worker"
        assert "model_repository" in on_worker.get_server_metadata().extensions
        on_worker.unload_model("mlp")
        for c in cs:
            with pytest.raises(grpcclient.InferenceServerException, match="not loaded"):
                infer(c)
        with pytest.raises(grpcclient.InferenceServerException, match="nothing"):
            on_worker.load_model("nothing")
        on_worker.load_model("mlp")
        assert {infer(c) for c in cs} == {"1"}
    finally:
        for c in cs:
            c.close()


def test_http_is_served_by_every_process(repo: Path, tmp_path: Path, agent_factory) -> None:
    """The HTTP/REST port is shared like the gRPC one: curl-like clients (a connection per
    request) reach both processes and get the same answers."""
    import json
    import urllib.request

    from tests.procs import free_port

    make_mlp_bundle(repo, 1)
    http_port = free_port()
    agent = agent_factory(repo, "--serving-workers", "2", "--http-listen", f"127.0.0.1:{http_port}")
    agent.wait_log("agent: READY", timeout=90)
    assert f"and HTTP 127.0.0.1:{http_port}" in agent.logs()
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}
    ).encode()
    answers = set()
    for _ in range(24):
        req = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v2/models/mlp/infer",
            data=body,
            headers={"Content-Type": "application/json", "Connection": "close"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            doc = json.loads(r.read())
        answers.add((doc["model_version"], tuple(doc["outputs"][0]["data"])))
    assert len(answers) == 1 and next(iter(answers))[0] == "1", answers
    shares = process_requests(agent)
    assert shares["0"] > 0 and shares["1"] > 0, shares
    assert agent.stop() == 0


def test_an_unwritable_data_folder_stops_the_agent_with_a_clear_error(
    repo: Path, tmp_path: Path
) -> None:
    make_mlp_bundle(repo, 1)
    blocked = tmp_path / "data-is-a-file"
    blocked.write_text("")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelfleet.agent.cli",
            "serve",
            *("--models", str(repo), "--listen", "127.0.0.1:0"),
            *("--admin-socket", str(tmp_path / "a.sock"), "--data", str(blocked)),
            *("--serving-workers", "2"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 3, r.stdout + r.stderr
    assert "needs a writable data folder" in r.stderr and "--data DIR" in r.stderr
    assert "Traceback" not in r.stderr


def test_serving_workers_out_of_range_is_refused(repo: Path, tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelfleet.agent.cli",
            "serve",
            *("--models", str(repo), "--serving-workers", "0"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 3, r.stdout + r.stderr
    assert "serving_workers must be between 1 and 64" in r.stderr


def test_capture_takes_every_processs_share_with_one_key(repo: Path, agent_factory) -> None:
    """A 100% capture rule with a hashed input: every request of every process is written,
    and equal inputs hash equal across processes (the workers use the main process's key)."""
    import pyarrow.parquet as pq

    make_mlp_bundle(repo, 1)
    agent = agent_factory(repo, "--serving-workers", "2")
    agent.wait_log("agent: READY", timeout=90)
    out = agent.cli("capture", "mlp", "--rate", "100", "--hash", "x")
    assert out.returncode == 0, out.stdout + out.stderr  # answered once every process has it
    cs = clients(agent)
    try:
        for _ in range(4):
            for c in cs:
                infer(c)
    finally:
        for c in cs:
            c.close()
    shares = process_requests(agent)
    assert shares["0"] > 0 and shares["1"] > 0, shares
    assert agent.stop() == 0  # every process finishes its open file
    files = sorted((repo.parent / "agent-data" / "capture" / "mlp").glob("*.parquet"))
    assert len(files) >= 2, files  # one per process at least
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 4 * CHANNELS
    assert len({r["in_x"] for r in rows}) == 1 and len(rows[0]["in_x"]) == 64
    assert not list((repo.parent / "agent-data" / "capture").rglob("*.tmp"))


def test_a_worker_told_to_stop_by_sigterm_leaves_and_is_started_again(
    repo: Path, agent_factory
) -> None:
    make_mlp_bundle(repo, 1)
    agent = agent_factory(repo, "--serving-workers", "2")
    agent.wait_log("agent: READY", timeout=90)
    (pid,) = worker_pids(agent)
    os.kill(pid, signal.SIGTERM)
    # Drained and gone promptly: no thread of it waits on the pipe at exit.
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 15, "the worker gone after SIGTERM")
    agent.wait_log("starting it again", timeout=15)
    wait_for(lambda: agent.logs().count("answers on") >= 2, 60, "a new worker serving")
    cs = clients(agent)
    try:
        assert {infer(c) for c in cs} == {"1"}
    finally:
        for c in cs:
            c.close()
    assert agent.stop() == 0
