"""The agent and the hub as systemd services, and the packages that install them.

Real processes and real sockets: the sd_notify datagrams arrive on a unix socket this test
binds (a path for the agent, the abstract namespace for the hub); SIGTERM meets real concurrent
load; SIGHUP re-reads real files. The .deb/.rpm are built once for the module with nfpm (in the
background, from the module's first process test on, while the tests that need no package run),
and the agent runs from the .deb's contents, unpacked into a temporary root and mounted at
/opt/modelfleet in a private mount namespace (nothing on this machine changes). The units pass
``systemd-analyze verify`` against that same unpacked root.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelfleet.agent.cli import build_parser as agent_parser
from modelfleet.agent.config import ServeConfig, load_config, reload_config
from modelfleet.batch.cli import build_parser as batch_parser
from modelfleet.hub.cli import build_parser as hub_parser
from modelfleet.hub.config import HubConfig, load_hub_config, reload_hub_config
from modelfleet.kernel.commandline import bash_completion
from modelfleet.kernel.errors import InvalidRequestError
from modelfleet.kernel.sdnotify import Notifier
from tests import models
from tests.conftest import make_mlp_bundle, mlp_samples
from tests.procs import ROOT, AgentProcess, HubProcess, enroll_agent, free_port, wait_for

PACKAGING = ROOT / "packaging"
PROGRAMS = {
    "modelfleet-agent": agent_parser,
    "modelfleet-hub": hub_parser,
    "modelfleet-batch": batch_parser,
}
X = np.ones((1, 4), np.float32)

# Runs the rest of argv under the kernel's W^X lock (prctl PR_SET_MDWE, Linux 6.3+; inherited
# across exec): what the units' MemoryDenyWriteExecute=yes enforces.
MDWE_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    raise SystemExit("PR_SET_MDWE: " + os.strerror(ctypes.get_errno()))
os.execvp(sys.argv[1], sys.argv[1:])
"""


# -- sd_notify: a listener standing in for systemd --------------------------------------------


class NotifyListener:
    """A unix datagram socket, like the one systemd passes in $NOTIFY_SOCKET; records every
    notification with its arrival time."""

    def __init__(self, path: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            name = f"modelfleet-test-{uuid.uuid4().hex[:12]}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(str(path))
            self.address = str(path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            with self.lock:
                self.messages.append((time.monotonic(), fields))

    def snapshot(self) -> list[tuple[float, dict[str, str]]]:
        with self.lock:
            return list(self.messages)

    def find(self, pred: Callable[[dict[str, str]], bool]) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in self.snapshot() if pred(m)]

    def wait(
        self,
        pred: Callable[[dict[str, str]], bool],
        timeout: float,
        what: str,
        proc: subprocess.Popen | None = None,
        log: Path | None = None,
    ) -> float:
        """Arrival time of the first notification matching pred; fails at once (with the log)
        when ``proc`` exits first."""

        def arrived() -> bool:
            if self.find(pred):
                return True
            if proc is not None and proc.poll() is not None:
                tail = log.read_text(errors="replace")[-4000:] if log else ""
                pytest.fail(f"exited ({proc.returncode}) before {what}:\n{tail}")
            return False

        deadline = time.monotonic() + timeout
        while not arrived():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.02)
        return self.find(pred)[0][0]

    def statuses(self) -> list[str]:
        return [m["STATUS"] for _, m in self.snapshot() if "STATUS" in m]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    lst = NotifyListener(tmp_path / "notify.sock")
    yield lst
    lst.close()


def infer(url: str, version: str = "") -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    try:
        inp = grpcclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(X)
        return client.infer("mlp", [inp], model_version=version, client_timeout=30).as_numpy("y")
    finally:
        client.close()


def publish(repo: Path, staging: Path, version: int) -> None:
    bundle = make_mlp_bundle(staging, version, seed=version)
    (repo / "mlp").mkdir(parents=True, exist_ok=True)
    os.rename(bundle.path, repo / "mlp" / str(version))


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without what systemd or a shell may have set for the runner."""
    drop = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, **extra}


def test_notifier_pings_from_the_event_loop_only(tmp_path: Path) -> None:
    """A blocked event loop stops the watchdog pings: that is what lets systemd restart a hung
    service. Also: WATCHDOG_PID of another process disables the watchdog, and no socket means
    no-op."""
    import asyncio

    lst = NotifyListener()  # abstract namespace
    try:

        async def main() -> None:
            n = Notifier({"NOTIFY_SOCKET": lst.address, "WATCHDOG_USEC": "200000"})
            assert n.watchdog_s == pytest.approx(0.2)
            task = asyncio.create_task(n.run_watchdog())
            await asyncio.sleep(0.6)
            time.sleep(0.7)  # the loop hangs
            await asyncio.sleep(0.6)
            task.cancel()

        asyncio.run(main())
        wait_for(lambda: len(lst.find(lambda m: m.get("WATCHDOG") == "1")) >= 8, 5, "pings")
        times = [t for t, _ in lst.find(lambda m: m.get("WATCHDOG") == "1")]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps) >= 0.65, gaps  # nothing while the loop was blocked
        assert statistics.median(gaps) == pytest.approx(0.1, abs=0.05), gaps  # half of 0.2 s
    finally:
        lst.close()
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_s
    silent = Notifier({})
    assert not silent.enabled and not silent.ready("x") and not silent.watchdog()


def test_journal_format_only_when_stderr_is_the_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$JOURNAL_STREAM is inherited by children whose stderr may go elsewhere: only a matching
    device:inode means journald. JSON keeps the <priority> prefix under journald."""
    import json
    import logging

    from modelfleet.kernel.logs import setup_logging

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    err = open(tmp_path / "stderr", "w+")  # noqa: SIM115 - closed below
    st = os.fstat(err.fileno())
    monkeypatch.setattr(sys, "stderr", err)
    try:
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        setup_logging("INFO", json_lines=True)
        logging.getLogger("modelfleet.agent").warning("disk nearly full")
        setup_logging("INFO")
        logging.getLogger("modelfleet.hub").info("hello")
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        setup_logging("INFO")
        logging.getLogger("modelfleet.agent").info("redirected")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        err.close()
    first, second, third = (tmp_path / "stderr").read_text().splitlines()
    # Lines name loggers without the package namespace: "agent", not "modelfleet.agent".
    assert first.startswith("<4>{") and json.loads(first[3:])["level"] == "warning"
    assert json.loads(first[3:])["logger"] == "agent"
    assert second == "<6>hub: hello"
    assert re.match(r"\d{4}-\d\d-\d\dT\S+Z INFO agent: redirected$", third), third


# -- the agent ------------------------------------------------------------------------------


@pytest.mark.usefixtures("package_build")
def test_agent_notifies_ready_status_and_watchdog(
    repo: Path, staging: Path, tmp_path: Path, listener: NotifyListener
) -> None:
    make_mlp_bundle(repo, 1)
    log_path = tmp_path / "agent.log"
    log_path.touch()
    st = log_path.stat()
    # stderr is this file, and JOURNAL_STREAM names it: journald format, no timestamps.
    env = clean_env(
        NOTIFY_SOCKET=listener.address,
        WATCHDOG_USEC="400000",
        JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}",
    )
    agent = AgentProcess(repo, log_path=log_path, env=env).start()
    try:
        ready_at = listener.wait(
            lambda m: m.get("READY") == "1", 60, "READY=1", agent.proc, agent.log_path
        )
        # READY=1 means "serves now": the model answers at once.
        assert infer(agent.url).shape == (1, 3)
        ready = listener.find(lambda m: m.get("READY") == "1")[0][1]
        assert ready["STATUS"] == "serving mlp v1; 0 loading"
        assert listener.statuses()[0] == "starting"
        assert any(s.startswith("starting: loading models from") for s in listener.statuses())

        # WATCHDOG=1 every WATCHDOG_USEC/2 = 0.2 s, counted over a bounded window.
        time.sleep(2.0)
        window = [
            t
            for t, m in listener.find(lambda m: m.get("WATCHDOG") == "1")
            if ready_at <= t <= ready_at + 2.0
        ]
        # 10 expected; a busy machine may delay a ping or two, never add any.
        assert 6 <= len(window) <= 11, len(window)
        gaps = [b - a for a, b in itertools.pairwise(window)]
        assert 0.17 <= statistics.median(gaps) <= 0.3, gaps

        # STATUS= follows what serves.
        publish(repo, staging, 2)
        listener.wait(
            lambda m: m.get("STATUS") == "serving mlp v2; 0 loading",
            60,
            "v2",
            agent.proc,
            agent.log_path,
        )
        assert "serving mlp v1; 1 loading" in listener.statuses()

        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(30) == 0
        stopping = listener.find(lambda m: m.get("STOPPING") == "1")
        assert stopping and stopping[0][1]["STATUS"].startswith("stopping: draining")
    finally:
        agent.stop()
    logs = agent.logs()
    assert "<6>agent: READY (standalone" in logs
    assert not re.search(r"^\d{4}-\d\d-\d\dT", logs, re.M), logs[:500]


def _watch_health(url: str, seen: list[tuple[float, int]], done: threading.Event) -> None:
    """grpc.health.v1 Watch(""): records every status until NOT_SERVING, then hangs up (as a
    balancer would: an open Watch stream would otherwise hold the drain until its timeout)."""
    with grpc.insecure_channel(url) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=60
        )
        try:
            for resp in call:
                seen.append((time.monotonic(), resp.status))
                if resp.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    call.cancel()
                    break
        except grpc.RpcError:
            pass
        finally:
            done.set()


@pytest.mark.usefixtures("package_build")
def test_sigterm_under_load_drains_in_flight_requests_under_wx_lock(
    repo: Path, tmp_path: Path, listener: NotifyListener
) -> None:
    """Also runs the agent as MemoryDenyWriteExecute=yes would: onnxruntime needs no JIT."""
    make_mlp_bundle(repo, 1)
    # Each request waits up to 0.3 s in the batcher: at any moment ~8 requests are in flight.
    agent = AgentProcess(
        repo,
        "--max-queue-delay-us",
        "300000",
        "--drain-timeout-s",
        "10",
        "--inline-max-us",
        "0",
        log_path=tmp_path / "agent.log",
        env=clean_env(NOTIFY_SOCKET=listener.address),
    )
    agent.args = [sys.executable, "-c", MDWE_EXEC, *agent.args]
    agent.start()
    try:
        listener.wait(lambda m: m.get("READY") == "1", 60, "READY=1", agent.proc, agent.log_path)
        health: list[tuple[float, int]] = []
        health_done = threading.Event()
        threading.Thread(
            target=_watch_health, args=(agent.url, health, health_done), daemon=True
        ).start()
        wait_for(lambda: bool(health), 10, "health SERVING")
        assert health[0][1] == health_pb2.HealthCheckResponse.SERVING

        records: list[tuple[float, float, str]] = []  # (start, end, "ok" or status)
        lock = threading.Lock()
        stop = threading.Event()

        def client_loop() -> None:
            client = grpcclient.InferenceServerClient(agent.url)
            inp = grpcclient.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(X)
            while not stop.is_set():
                start = time.monotonic()
                try:
                    out = client.infer("mlp", [inp], client_timeout=30).as_numpy("y")
                    outcome = "ok" if out.shape == (1, 3) else f"bad shape {out.shape}"
                except Exception as exc:
                    outcome = str(getattr(exc, "status", lambda: None)() or exc)
                with lock:
                    records.append((start, time.monotonic(), outcome))
                if outcome != "ok":
                    time.sleep(0.05)
            client.close()

        threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        wait_for(lambda: sum(r[2] == "ok" for r in records) >= 24, 30, "steady load")
        term_at = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(30) == 0
        exited_at = time.monotonic()
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        agent.stop()

    in_flight = [r for r in records if r[0] < term_at < r[1]]
    assert len(in_flight) >= 4, "the load did not keep requests in flight"
    assert all(r[2] == "ok" for r in in_flight), in_flight
    # Anything sent well before the signal reached the server, so it finished; refusals are
    # for requests sent after the server stopped accepting, and say UNAVAILABLE.
    assert all(r[2] == "ok" for r in records if r[0] < term_at - 0.1)
    refused = [r for r in records if r[2] != "ok"]
    assert all("UNAVAILABLE" in r[2] for r in refused), refused[:3]
    # The drain waited for the in-flight requests, not for drain_timeout_s.
    assert exited_at - term_at < 8, exited_at - term_at
    # Health went NOT_SERVING at the start of the drain, while requests were still finishing.
    assert health_done.wait(10)
    not_serving = [t for t, s in health if s == health_pb2.HealthCheckResponse.NOT_SERVING]
    assert not_serving and not_serving[0] < max(r[1] for r in in_flight)
    assert listener.find(lambda m: m.get("STOPPING") == "1")
    assert "stopped" in agent.logs()


@pytest.mark.usefixtures("package_build")
def test_sighup_reloads_agent_config(
    repo: Path, staging: Path, tmp_path: Path, listener: NotifyListener
) -> None:
    make_mlp_bundle(repo, 1)
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nlog_level = "INFO"\nserving_threads = 2\n')
    agent = AgentProcess(
        repo,
        "--config",
        str(config),
        log_path=tmp_path / "agent.log",
        env=clean_env(NOTIFY_SOCKET=listener.address),
    )
    agent.start()
    try:
        listener.wait(lambda m: m.get("READY") == "1", 60, "READY=1", agent.proc, agent.log_path)
        assert " DEBUG " not in agent.logs()

        config.write_text('[agent]\nlog_level = "DEBUG"\nserving_threads = 3\n')
        before = time.monotonic_ns() // 1000
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_log("configuration reloaded: log_level 'INFO' -> 'DEBUG'")
        agent.wait_log("needs a restart: serving_threads")
        # RELOADING=1 with MONOTONIC_USEC (this process's CLOCK_MONOTONIC too), then READY=1.
        reloading_at = listener.wait(lambda m: m.get("RELOADING") == "1", 10, "RELOADING=1")
        reloading = listener.find(lambda m: m.get("RELOADING") == "1")[0][1]
        assert before <= int(reloading["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
        assert [t for t, _ in listener.find(lambda m: m.get("READY") == "1")][-1] > reloading_at

        # DEBUG now applies: the next change of what serves is logged at debug level.
        publish(repo, staging, 2)
        agent.wait_log("DEBUG agent: status: serving mlp v2; 0 loading")

        # A broken file is refused; the agent keeps serving with the running configuration.
        config.write_text("[agent\n")
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_log("configuration reload failed, keeping the running configuration")
        assert infer(agent.url, "2").shape == (1, 3)
        assert agent.proc.poll() is None
    finally:
        code = agent.stop()
    assert code == 0


def test_reload_applies_runtime_keys_and_keeps_flags(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\npoll_interval_s = 1.0\nlog_level = "INFO"\n')
    cfg = load_config(config, {"log_level": "WARNING", "listen": None}, env={})
    config.write_text(
        '[agent]\npoll_interval_s = 0.25\nlog_level = "DEBUG"\nlisten = "127.0.0.1:9"\n'
    )
    applied, restart = reload_config(cfg)
    assert applied == ["poll_interval_s"] and restart == ["listen"]
    # The flag still wins over the file, as at start; the running listen stays.
    assert (cfg.poll_interval_s, cfg.log_level, cfg.listen) == (0.25, "WARNING", "127.0.0.1:8001")
    config.write_text('[agent]\norigin = "x"\n')
    with pytest.raises(InvalidRequestError, match="origin"):
        load_config(config, env={})

    hub_cfg = tmp_path / "hub.toml"
    hub_cfg.write_text("[hub]\nrefresh_interval_s = 60\n")
    hcfg = load_hub_config(hub_cfg, {"data": tmp_path / "hub"}, env={})
    hub_cfg.write_text('[hub]\nrefresh_interval_s = 5\nhostnames = "a.example"\n')
    assert reload_hub_config(hcfg) == (["refresh_interval_s"], ["hostnames"])
    assert hcfg.data == tmp_path / "hub"


# -- the hub --------------------------------------------------------------------------------


@pytest.mark.usefixtures("package_build")
def test_hub_notifies_reloads_and_stops(tmp_path: Path) -> None:
    lst = NotifyListener()  # abstract namespace this time: NOTIFY_SOCKET=@...
    config = tmp_path / "hub.toml"
    config.write_text('[hub]\nrefresh_interval_s = 60\nlog_level = "INFO"\n')
    port, enroll_port = free_port(), free_port()
    log_path = tmp_path / "hub.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modelfleet.hub.cli",
                "--data",
                str(tmp_path / "hub"),
                "serve",
                "--config",
                str(config),
                "--listen",
                f"127.0.0.1:{port}",
                "--enroll-listen",
                f"127.0.0.1:{enroll_port}",
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(NOTIFY_SOCKET=lst.address, WATCHDOG_USEC="1000000", PYTHONUNBUFFERED="1"),
        )
    logs = log_path.read_text
    try:
        ready_at = lst.wait(lambda m: m.get("READY") == "1", 60, "hub READY=1", proc, log_path)
        ready = lst.find(lambda m: m.get("READY") == "1")[0][1]
        assert ready["STATUS"] == (
            f"serving on 127.0.0.1:{port} (enrollment 127.0.0.1:{enroll_port})"
        )
        # The hub is really up when it says so.
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        time.sleep(1.6)
        pings = [t for t, m in lst.find(lambda m: m.get("WATCHDOG") == "1") if t >= ready_at]
        assert 2 <= len(pings) <= 5, pings  # every 0.5 s

        config.write_text(
            '[hub]\nrefresh_interval_s = 0.5\nlog_level = "DEBUG"\nhostnames = "x.example"\n'
        )
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: "configuration reloaded: refresh_interval_s 60.0 -> 0.5" in logs(),
            10,
            "hub reload",
        )
        assert "needs a restart: hostnames" in logs()
        lst.wait(lambda m: m.get("RELOADING") == "1" and "MONOTONIC_USEC" in m, 10, "RELOADING")
        assert len(lst.find(lambda m: m.get("READY") == "1")) == 2

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert lst.find(lambda m: m.get("STOPPING") == "1")
        assert "stopped" in logs()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        lst.close()


@pytest.mark.usefixtures("package_build")
def test_fleet_agent_from_packaged_config_is_ready_from_cache(tmp_path: Path) -> None:
    """The installed layout end to end: enroll writes DATA/agent.toml, the service runs
    `run --config` on a copy of packaging/etc/agent.toml whose `enrollment` points at it. READY=1
    comes once the cached models serve, also when the hub is down."""
    hub = HubProcess(tmp_path / "hub", log_path=tmp_path / "hub.log").start()
    data = tmp_path / "agent-data"
    etc = tmp_path / "etc-agent.toml"
    try:
        enrolled = enroll_agent(hub, data, "site=test", hostname="edge-1")
        shipped = (PACKAGING / "etc" / "agent.toml").read_text()
        etc.write_text(shipped.replace("/var/lib/modelfleet/agent/agent.toml", str(enrolled)))
        hub.cli("publish", "mlp", str(models.mlp(tmp_path / "mlp.onnx")))
        hub.cli("deploy", "mlp", "1")

        def start(name: str, lst: NotifyListener) -> AgentProcess:
            # The data dir (admin socket) comes from the enrollment file, not from this file.
            env = clean_env(NOTIFY_SOCKET=lst.address, MODELFLEET_AGENT_BACKOFF_MAX_S="1")
            return AgentProcess(
                data, fleet_config=etc, log_path=tmp_path / f"{name}.log", env=env
            ).start()

        lst = NotifyListener(tmp_path / "n1.sock")
        agent = start("agent1", lst)
        try:
            lst.wait(lambda m: m.get("READY") == "1", 60, "READY=1", agent.proc, agent.log_path)
            lst.wait(
                lambda m: m.get("STATUS") == "serving mlp v1; 0 loading",
                60,
                "mlp v1",
                agent.proc,
                agent.log_path,
            )
            assert f"READY (fleet mode, hub {hub.url})" in agent.logs()
        finally:
            code = agent.stop()
            lst.close()
        assert code == 0
    finally:
        hub.stop()

    # The hub is gone: the restarted agent serves its cached, verified bundle all the same.
    lst = NotifyListener(tmp_path / "n2.sock")
    agent = start("agent2", lst)
    try:
        lst.wait(lambda m: m.get("READY") == "1", 60, "READY=1", agent.proc, agent.log_path)
        ready = lst.find(lambda m: m.get("READY") == "1")[0][1]
        assert ready["STATUS"] == "serving mlp v1; 0 loading"
        assert infer(agent.url).shape == (1, 3)
    finally:
        code = agent.stop()
        lst.close()
    assert code == 0


# -- default configuration files ------------------------------------------------------------


def _documented_keys(path: Path) -> set[str]:
    return set(re.findall(r"^#? ?([a-z_]+) = ", path.read_text(), re.M))


@pytest.mark.parametrize(("cls", "name"), [(ServeConfig, "agent.toml"), (HubConfig, "hub.toml")])
def test_default_configs_document_every_key(cls: type, name: str) -> None:
    keys = {f.name for f in dataclasses.fields(cls)} - {"origin"}
    missing = keys - _documented_keys(PACKAGING / "etc" / name)
    assert not missing, f"packaging/etc/{name} does not document {sorted(missing)}"


@pytest.mark.usefixtures("package_build")
def test_default_agent_config_runs_once_enrolled(tmp_path: Path) -> None:
    """/etc/modelfleet/agent.toml + what `enroll` wrote = a fleet-mode config; keys set in
    /etc, the environment and flags override enrollment."""
    enrolled = tmp_path / "agent-data" / "agent.toml"
    shipped = (PACKAGING / "etc" / "agent.toml").read_text()
    etc = tmp_path / "etc-agent.toml"
    etc.write_text(shipped.replace("/var/lib/modelfleet/agent/agent.toml", str(enrolled)))
    # Before enrollment: valid, but no hub, and `run` refuses (exit 3, "enroll first").
    assert load_config(etc, env={}).hub == ""
    r = subprocess.run(
        [sys.executable, "-m", "modelfleet.agent.cli", "run", "--config", str(etc)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 3 and "enroll first" in r.stderr

    enrolled.parent.mkdir()
    enrolled.write_text(
        '[agent]\nagent_id = "edge-1"\nhub = "hub.example:7443"\n'
        f'data = "{enrolled.parent}"\nlisten = "127.0.0.1:8001"\ntransport = "grpc"\n'
    )
    cfg = load_config(etc, env={})
    assert (cfg.agent_id, cfg.hub, cfg.data) == ("edge-1", "hub.example:7443", enrolled.parent)
    etc.write_text(
        etc.read_text().replace('# listen = "127.0.0.1:8001"', 'listen = "0.0.0.0:8001"')
    )
    assert load_config(etc, env={}).listen == "0.0.0.0:8001"
    env = {"MODELFLEET_AGENT_LISTEN": "127.0.0.1:8101"}
    assert load_config(etc, env=env).listen == "127.0.0.1:8101"
    assert load_config(etc, {"listen": "127.0.0.1:8201"}, env=env).listen == "127.0.0.1:8201"
    assert load_hub_config(PACKAGING / "etc" / "hub.toml", env={}).listen == "127.0.0.1:7443"


# -- the packages ---------------------------------------------------------------------------


@dataclasses.dataclass
class Built:
    deb: Path
    rpm: Path
    root: Path  # the .deb unpacked
    seconds: float


@dataclasses.dataclass
class PackageBuild:
    proc: subprocess.Popen
    out: Path
    log: Path
    started: float


@pytest.fixture(scope="module")
def package_build(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PackageBuild | None]:
    """The .deb/.rpm build (about a minute, most of it pip, compileall and compression),
    started by the module's first process test and left running in the background, at a lower
    priority, while the tests that need no package run; `built` waits for it. None when no
    selected test of this module needs the packages."""
    if not any(
        "built" in item.fixturenames
        for item in request.session.items
        if getattr(item, "module", None) is request.module
    ):
        yield None
        return
    out = tmp_path_factory.mktemp("dist")
    log = out.parent / f"{out.name}-build.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            ["nice", "-n", "5", sys.executable, str(PACKAGING / "build.py"), "--out", str(out)],
            cwd=ROOT,
            stdout=fh,
            stderr=subprocess.STDOUT,
            # Its own process group: an unfinished build (pip, nfpm) goes down whole below.
            start_new_session=True,
        )
    yield PackageBuild(proc, out, log, time.monotonic())
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


@pytest.fixture(scope="module")
def built(package_build: PackageBuild | None, tmp_path_factory: pytest.TempPathFactory) -> Built:
    assert package_build is not None
    returncode = package_build.proc.wait(900)
    assert returncode == 0, package_build.log.read_text(errors="replace")[-6000:]
    out = package_build.out
    (deb,) = out.glob("modelfleet_*_amd64.deb")
    (rpm,) = out.glob("modelfleet-*.x86_64.rpm")
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=300)
    return Built(deb, rpm, root, time.monotonic() - package_build.started)


def test_deb_holds_the_venv_units_and_configs(built: Built) -> None:
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(built.deb)], check=True, capture_output=True, text=True
    ).stdout
    paths = {line.split()[5].removeprefix(".") for line in listing.splitlines()}
    site = "/opt/modelfleet/venv/lib/python3.11/site-packages"
    for expected in (
        "/opt/modelfleet/venv/bin/modelfleet-agent",
        "/opt/modelfleet/venv/bin/modelfleet-hub",
        "/opt/modelfleet/venv/bin/modelfleet-batch",
        "/opt/modelfleet/venv/bin/python3",
        "/opt/modelfleet/venv/pyvenv.cfg",
        f"{site}/modelfleet/agent/app.py",
        f"{site}/modelfleet/agent/__pycache__/app.cpython-311.pyc",
        f"{site}/modelfleet/kernel/sdnotify.py",
        f"{site}/onnxruntime/__init__.py",
        "/usr/bin/modelfleet-agent",
        "/usr/lib/systemd/system/modelfleet-agent.service",
        "/usr/lib/systemd/system/modelfleet-hub.service",
        "/usr/share/modelfleet/systemd/modelfleet-agent.service.d/gpu.conf",
        "/usr/lib/sysusers.d/modelfleet.conf",
        "/usr/lib/tmpfiles.d/modelfleet.conf",
        "/etc/modelfleet/agent.toml",
        "/etc/modelfleet/hub.toml",
        "/usr/share/doc/modelfleet/install.md",
        "/usr/share/doc/modelfleet/monitoring.md",
        "/usr/share/modelfleet/prometheus/modelfleet-rules.yml",
        "/usr/share/modelfleet/grafana/modelfleet.json",
        *(f"/usr/share/bash-completion/completions/{prog}" for prog in PROGRAMS),
    ):
        assert expected in paths, expected
    assert not any(p.startswith(f"{site}/tests/") for p in paths)
    # Our packages live under one namespace: no generic top-level names in site-packages.
    for generic in ("agent", "hub", "batch", "kernel", "protos"):
        assert f"{site}/{generic}/" not in paths, generic

    def field(name: str) -> str:
        return subprocess.run(
            ["dpkg-deb", "-f", str(built.deb), name], check=True, capture_output=True, text=True
        ).stdout.strip()

    assert field("Package") == "modelfleet" and field("Depends") == "python3.11"
    conffiles = subprocess.run(
        ["dpkg-deb", "--info", str(built.deb), "conffiles"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert sorted(conffiles) == ["/etc/modelfleet/agent.toml", "/etc/modelfleet/hub.toml"]
    for script in ("postinst", "prerm", "postrm"):
        assert (
            subprocess.run(
                ["dpkg-deb", "--info", str(built.deb), script], capture_output=True
            ).returncode
            == 0
        ), script
    # Shipped files are the repository's.
    for rel, src in (
        ("usr/lib/systemd/system/modelfleet-agent.service", "systemd/modelfleet-agent.service"),
        ("etc/modelfleet/agent.toml", "etc/agent.toml"),
    ):
        assert (built.root / rel).read_bytes() == (PACKAGING / src).read_bytes()
    # An RPM lead (magic ed ab ee db), built from the same tree.
    assert built.rpm.read_bytes()[:4] == b"\xed\xab\xee\xdb"
    assert built.rpm.stat().st_size > 50e6
    print(
        f"\npackages built in {built.seconds:.0f}s: {built.deb.name} "
        f"{built.deb.stat().st_size / 1e6:.0f} MB, {built.rpm.name}"
    )


def test_venv_is_relocated_to_opt(built: Built) -> None:
    venv = built.root / "opt/modelfleet/venv"
    assert os.readlink(venv / "bin/python3") == "/usr/bin/python3.11"
    assert "home = /usr/bin\n" in (venv / "pyvenv.cfg").read_text()
    for script in (venv / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            assert b"build/pkg" not in script.read_bytes(), script.name
    shebang = (venv / "bin/modelfleet-agent").read_text().splitlines()[0]
    assert shebang == "#!/opt/modelfleet/venv/bin/python"
    # Byte code carries the installed path and is hash-checked (flags 0b11), not mtime-based.
    app = venv / "lib/python3.11/site-packages/modelfleet/agent"
    pyc = (app / "__pycache__/app.cpython-311.pyc").read_bytes()
    assert int.from_bytes(pyc[4:8], "little") == 3
    assert b"/opt/modelfleet/venv/lib/python3.11/site-packages/modelfleet/agent/app.py" in pyc


def test_packages_install_bash_completion_generated_from_the_parsers(
    built: Built, tmp_path: Path
) -> None:
    completions = built.root / "usr/share/bash-completion/completions"
    for prog, build in PROGRAMS.items():
        script = completions / prog
        assert script.stat().st_mode & 0o777 == 0o644
        # What this code's parser generates: the package's completion knows every flag it has.
        assert script.read_text() == bash_completion(build()), prog
    # Loaded as bash-completion does (by command name, on the first TAB), it completes.
    fn = "_modelfleet_hub"
    r = subprocess.run(
        [
            "bash",
            "-c",
            'source "$0"; COMP_WORDS=(modelfleet-hub models ls --j); COMP_CWORD=3; '
            f'{fn}; echo "${{COMPREPLY[@]}}"; COMP_WORDS=(modelfleet-hub ro); COMP_CWORD=1; '
            f'{fn}; echo "${{COMPREPLY[@]}}"',
            str(completions / "modelfleet-hub"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0 and r.stdout.split("\n")[:2] == ["--json", "rollout"], r


def _installed(root: Path, *cmd: str) -> list[str]:
    """cmd with the unpacked tree mounted read-only at /opt/modelfleet, in a private mount
    namespace (a tmpfs over /opt hides, and protects, whatever this machine has there)."""
    script = (
        "set -e; mount -t tmpfs tmpfs /opt; mkdir /opt/modelfleet; "
        f"mount --bind {root}/opt/modelfleet /opt/modelfleet; "
        'mount -o remount,bind,ro /opt/modelfleet; exec "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *cmd]


def test_agent_runs_from_the_unpacked_deb(built: Built, tmp_path: Path) -> None:
    venv = built.root / "opt/modelfleet/venv"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    # Straight from the unpacked tree: the venv finds its site-packages from pyvenv.cfg.
    cmd = [str(venv / "bin/python"), str(venv / "bin/modelfleet-agent"), "--help"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "serve" in r.stdout, r.stderr

    # At its installed path, through the console scripts' own shebangs.
    model = models.mlp(tmp_path / "mlp.onnx")
    np.savez(tmp_path / "samples.npz", **mlp_samples())
    r = subprocess.run(
        _installed(
            built.root,
            "/opt/modelfleet/venv/bin/modelfleet-agent",
            "bundle",
            "create",
            str(model),
            "--name",
            "mlp",
            "--version",
            "1",
            "--samples",
            str(tmp_path / "samples.npz"),
            "--out",
            str(tmp_path / "repo"),
        ),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "created" in r.stdout
    cmd = _installed(built.root, "/opt/modelfleet/venv/bin/modelfleet-hub", "--help")
    hub = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert hub.returncode == 0, hub.stderr
    # --version is the packaged distribution's own (its metadata in the venv).
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for prog in PROGRAMS:
        cmd = _installed(built.root, f"/opt/modelfleet/venv/bin/{prog}", "--version")
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stdout) == (0, f"{prog} {version}\n"), r.stderr

    lst = NotifyListener(tmp_path / "notify.sock")
    port = free_port()
    log_path = tmp_path / "packaged-agent.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            _installed(
                built.root,
                "/opt/modelfleet/venv/bin/modelfleet-agent",
                "serve",
                "--models",
                str(tmp_path / "repo"),
                "--listen",
                f"127.0.0.1:{port}",
                "--admin-socket",
                str(tmp_path / "admin.sock"),
            ),
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**env, "NOTIFY_SOCKET": lst.address},
        )
    try:
        lst.wait(lambda m: m.get("READY") == "1", 60, "READY=1", proc, log_path)
        y = infer(f"127.0.0.1:{port}")
        assert y.shape == (1, 3)
        proc.send_signal(signal.SIGTERM)  # unshare and sh exec'd: this is the agent itself
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        lst.close()
    logs = log_path.read_text()
    assert "READY (standalone" in logs and "stopped" in logs and "Traceback" not in logs


def _verify_root(built: Built) -> Path:
    """The unpacked .deb plus what `systemd-analyze verify --root` resolves: the system's own
    units (targets the services hang off) and /bin/kill (ExecReload)."""
    root = built.root
    units = root / "usr/lib/systemd/system"
    host_units = next(
        p
        for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
        if (p / "sysinit.target").exists()
    )
    for unit in host_units.iterdir():
        if not (units / unit.name).exists() and not unit.is_dir():
            shutil.copy(unit, units / unit.name, follow_symlinks=True)
    (root / "bin").mkdir(exist_ok=True)
    if not (root / "bin/kill").exists():
        shutil.copy(shutil.which("kill") or "/bin/kill", root / "bin/kill")
    return root


def _analyze(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", *args, f"--root={root}"], capture_output=True, text=True, timeout=120
    )


def test_units_pass_systemd_analyze_verify(built: Built) -> None:
    root = _verify_root(built)
    for unit in ("modelfleet-agent.service", "modelfleet-hub.service"):
        r = _analyze(root, "verify", unit)
        # Unknown keys are only warnings (exit 0): any output at all fails the test.
        assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
        # The hardening is real: systemd's own exposure score stays low (0 best, 10 worst).
        r = _analyze(root, "security", "--offline=yes", "--threshold=20", unit)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    # The GPU variant: the shipped drop-in, installed where install.md says.
    dropin = root / "etc/systemd/system/modelfleet-agent.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "usr/share/modelfleet/systemd/modelfleet-agent.service.d/gpu.conf", dropin)
    try:
        r = _analyze(root, "verify", "modelfleet-agent.service")
        assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
        shown = _analyze(root, "security", "--offline=yes", "modelfleet-agent.service").stdout
        assert re.search(r"✗ PrivateDevices=", shown), shown[-3000:]
    finally:
        shutil.rmtree(root / "etc/systemd")


def test_sysusers_and_tmpfiles_create_users_and_state_dirs(tmp_path: Path) -> None:
    """Applied for real to an empty root: the users exist and own 0700 state directories."""
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(PACKAGING / "sysusers.d/modelfleet.conf")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    passwd = {
        ln.split(":")[0]: ln.split(":") for ln in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    assert passwd["modelfleet"][5] == "/var/lib/modelfleet/agent"
    assert passwd["modelfleet-hub"][5] == "/var/lib/modelfleet/hub"
    subprocess.run(
        [
            "systemd-tmpfiles",
            "--create",
            f"--root={tmp_path}",
            str(PACKAGING / "tmpfiles.d/modelfleet.conf"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for name, user in (("agent", "modelfleet"), ("hub", "modelfleet-hub")):
        st = (tmp_path / "var/lib/modelfleet" / name).stat()
        assert (st.st_mode & 0o777, st.st_uid) == (0o700, int(passwd[user][2]))


def test_maintainer_scripts_never_start_or_enable_anything(tmp_path: Path) -> None:
    """postinst creates users and directories, reloads systemd, and on upgrade only
    try-restarts what already runs; prerm disables only on removal. Run with stub commands
    that record their arguments, in a mount namespace where /run/systemd/system exists."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    calls = tmp_path / "calls"
    for name in ("systemctl", "systemd-sysusers", "systemd-tmpfiles"):
        stub = stubs / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n')
        stub.chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin"}

    def run(script: str, *args: str) -> list[str]:
        calls.write_text("")
        sh = (
            "set -e; mount -t tmpfs tmpfs /run; mkdir -p /run/systemd/system; "
            'mount -t tmpfs tmpfs /opt; exec sh "$@"'
        )
        r = subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                sh,
                "sh",
                str(PACKAGING / "scripts" / script),
                *args,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        return calls.read_text().splitlines()

    install = run("postinstall.sh", "configure", "")
    assert install == [
        "systemd-sysusers /usr/lib/sysusers.d/modelfleet.conf",
        "systemd-tmpfiles --create /usr/lib/tmpfiles.d/modelfleet.conf",
        "systemctl daemon-reload",
    ]
    assert run("postinstall.sh", "1") == install  # rpm install
    upgrade = run("postinstall.sh", "configure", "0.0.9-1")
    assert upgrade[-1] == "systemctl try-restart modelfleet-agent.service modelfleet-hub.service"
    assert run("postinstall.sh", "2") == upgrade  # rpm upgrade
    for args in (("configure", ""), ("configure", "0.0.9-1"), ("1",), ("2",)):
        assert not any(
            re.search(r"\b(enable|start|restart)\b", c.replace("try-restart", ""))
            for c in run("postinstall.sh", *args)
        ), args
    assert run("preremove.sh", "upgrade", "0.2.0-1") == [] and run("preremove.sh", "1") == []
    assert run("preremove.sh", "remove") == [
        "systemctl --no-reload disable --now modelfleet-agent.service modelfleet-hub.service"
    ]
    assert run("postremove.sh", "upgrade", "0.2.0-1") == []
    assert run("postremove.sh", "purge") == ["systemctl daemon-reload"]
