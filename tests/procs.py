"""Real agent processes for tests, demo and benchmarks: bounded waits, always cleaned up."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PERF_ANALYZER = ROOT / ".venv" / "bin" / "perf_analyzer"
ENV_DATA = "MODELFLEET_AGENT_DATA"


def dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


def _shm_held_by_others(pid: int | None) -> set[str]:
    """/dev/shm names another live process has open or mapped (a client's regions)."""
    held: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in (pid, os.getpid()):
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("/dev/shm/"):
                        held.add(target[len("/dev/shm/") :].removesuffix(" (deleted)"))
            for line in (proc / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    held.add(line.split("/dev/shm/", 1)[1].removesuffix(" (deleted)"))
    return held


def shm_leftovers(before: set[str], server_pid: int | None = None) -> set[str]:
    """/dev/shm entries that appeared since ``before`` and that no client made: the tests'
    own regions are named mf_shm_*, and another process that holds a file open or mapped
    (perf_analyzer in a test on the other pytest worker) is its client. What is left, the
    server (``server_pid``, excluded from the holders) made and did not remove."""
    new = {n for n in dev_shm() - before if not n.startswith("mf_shm_")}
    return new - _shm_held_by_others(server_pid) if new else new


# Ports handed to the processes the tests start, below the kernel's ephemeral range (32768 and
# up on Linux): a port from bind(0) is an ephemeral one, which any outgoing connection of the
# other pytest worker (a gRPC client, perf_analyzer) may take between this check and the
# server's bind ("address already in use", seen with two workers). Each worker draws from its
# own slice, in turn, so two calls never hand out the same port before the first is bound.
_PORT_WINDOW = (20000, 32768)


def _port_slice() -> range:
    low, high = _PORT_WINDOW
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        high = min(high, ephemeral_low)
    except (OSError, ValueError, IndexError):
        pass
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker) if worker.isdigit() else 0
    size = (high - low) // max(count, 1)
    return range(low + index * size, low + (index + 1) * size)


_ports = _port_slice()
_next_port = [_ports.start + (os.getpid() * 7919) % max(len(_ports), 1)]


def free_port() -> int:
    """A loopback port nothing is bound to now, for a server a test starts."""
    for _ in range(len(_ports)):
        port = _next_port[0]
        _next_port[0] = port + 1 if port + 1 < _ports.stop else _ports.start
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # a service's, or a server of ours still in TIME_WAIT
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class AgentProcess:
    """``modelfleet-agent serve`` as a subprocess on free loopback ports."""

    def __init__(
        self,
        models: Path,
        *extra: str,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        fleet_config: Path | None = None,
    ) -> None:
        self.models = Path(models)
        self.port = free_port()
        self.metrics_port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.log_path = log_path or (self.models.parent / f"agent-{self.port}.log")
        self.admin_socket = self.models.parent / f"agent-{self.port}.sock"
        common = [
            "--listen",
            self.url,
            "--metrics-listen",
            f"127.0.0.1:{self.metrics_port}",
        ]
        if fleet_config is not None:
            # Fleet mode: models come from the hub; the admin socket sits in the data dir.
            self.admin_socket = self.models / "admin.sock"
            self.args = [
                sys.executable,
                "-m",
                "modelfleet.agent.cli",
                "run",
                "--config",
                str(fleet_config),
                *common,
                *extra,
            ]
        else:
            self.args = [
                sys.executable,
                "-m",
                "modelfleet.agent.cli",
                "serve",
                "--models",
                str(self.models),
                "--admin-socket",
                str(self.admin_socket),
                "--poll-interval-s",
                "0.2",
                *common,
                *extra,
            ]
        # A standalone agent's data directory (model control's record, capture) beside its
        # repository, never the working directory's agent-data; a test's env or --data wins.
        data = (
            {} if fleet_config is not None else {ENV_DATA: str(self.models.parent / "agent-data")}
        )
        self.env = {**os.environ, **data, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> AgentProcess:
        self.models.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.args, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self

    def client(self):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.url)

    def wait_live(self, timeout: float = 30.0) -> None:
        client = self.client()
        try:
            wait_for(lambda: self._alive() and client.is_server_live(), timeout, "agent live")
        finally:
            client.close()

    def wait_model(self, name: str, version: str = "", timeout: float = 30.0) -> None:
        client = self.client()
        try:
            wait_for(
                lambda: self._alive() and client.is_model_ready(name, version),
                timeout,
                f"model {name} {version or '(active)'} ready",
            )
        finally:
            client.close()

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        wait_for(lambda: text in self.logs(), timeout, f"{text!r} in agent log")

    def _alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"agent exited early:\n{self.logs()[-4000:]}")
        return True

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "modelfleet.agent.cli",
                *args,
                "--admin-socket",
                str(self.admin_socket),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            return r.read().decode()

    def kill(self) -> None:
        """kill -9: no cleanup, no flush; what survives is what was on disk."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def traffic(
    agents: Iterable[AgentProcess], model: str = "mlp", interval_s: float = 0.02
) -> Iterator[None]:
    """Requests to ``model`` (input ``x``, one row of 4 floats) on every agent, one thread each,
    until the block ends. Failures are swallowed: a version switching under the load, or a
    version that fails on purpose, is what the calling test judges through telemetry."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    stop = threading.Event()

    def load(agent: AgentProcess) -> None:
        with grpcclient.InferenceServerClient(agent.url) as c:
            inp = grpcclient.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(np.ones((1, 4), np.float32))
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    c.infer(model, [inp])
                time.sleep(interval_s)

    threads = [threading.Thread(target=load, args=(a,), daemon=True) for a in agents]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(10)


class HubProcess:
    """``modelfleet-hub serve`` as a subprocess; its CLI runs against it with --data."""

    def __init__(self, data: Path, *extra: str, log_path: Path | None = None) -> None:
        self.data = Path(data)
        self.port = free_port()
        self.enroll_port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.log_path = log_path or (self.data.parent / f"hub-{self.port}.log")
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> HubProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modelfleet.hub.cli",
                "--data",
                str(self.data),
                "serve",
                "--listen",
                self.url,
                "--enroll-listen",
                f"127.0.0.1:{self.enroll_port}",
                *self.extra,
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: self._ready(), 30, "hub READY")
        return self

    def _ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"hub exited early:\n{self.logs()[-4000:]}")
        return "READY: hub on" in self.logs().split("shutting down")[-1]

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "modelfleet.hub.cli", "--data", str(self.data), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"modelfleet-hub {' '.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}"
            )
        return r.stdout if check else r  # type: ignore[return-value]

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log:
            self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def enroll_agent(
    hub: HubProcess, data: Path, labels: str, hostname: str, transport: str = "grpc"
) -> Path:
    """Enroll a new agent directory with a fresh token; returns its agent.toml."""
    token = hub.cli("agents", "token", "--labels", labels, "--ttl", "10m").strip()
    # On standard input, as the docs advise: never in argv, where other local users see it.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelfleet.agent.cli",
            "enroll",
            "--token-file",
            "-",
            "--data",
            str(data),
            "--hostname",
            hostname,
            "--transport",
            transport,
        ],
        cwd=ROOT,
        input=token,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0:
        raise AssertionError(f"enroll failed: {r.stdout}{r.stderr}")
    return data / "agent.toml"


def enroll_agents(
    hub: HubProcess, agents: Sequence[tuple[Path, str, str]], transport: str = "grpc"
) -> list[Path]:
    """:func:`enroll_agent` for each (data, labels, hostname), three at a time; returns their
    agent.toml in the same order. An enrollment is two short CLI processes, mostly interpreter
    start-up and waits on the hub, so a fixture's ten in a row left a core idle for ~20 s."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda a: enroll_agent(hub, *a, transport=transport), agents))


def agent_status(admin_socket: Path) -> dict[str, dict]:
    """Model name -> status, from a running agent's admin socket (no CLI start-up cost)."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from modelfleet.protos import agent_pb2, agent_pb2_grpc

    with grpc.insecure_channel(f"unix:{admin_socket}") as channel:
        resp = agent_pb2_grpc.AgentAdminStub(channel).Status(agent_pb2.StatusRequest(), timeout=5)
    return {
        m.name: MessageToDict(
            m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        for m in resp.models
    }


def hub_admin(hub: HubProcess):
    import grpc

    from modelfleet.protos import fleet_pb2_grpc

    admin = hub.data / "admin"
    creds = grpc.ssl_channel_credentials(
        root_certificates=(admin / "ca.crt").read_bytes(),
        private_key=(admin / "admin.key").read_bytes(),
        certificate_chain=(admin / "admin.crt").read_bytes(),
    )
    return fleet_pb2_grpc.HubAdminStub(grpc.secure_channel(hub.url, creds))


class BrokerProcess:
    """A real Mosquitto on a free loopback port, configured by `modelfleet-hub mqtt-config`."""

    def __init__(self, hub_data: Path, out: Path) -> None:
        self.hub_data = Path(hub_data)
        self.out = Path(out)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def configure(self) -> BrokerProcess:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "modelfleet.hub.cli",
                "--data",
                str(self.hub_data),
                "mqtt-config",
                "--out",
                str(self.out),
                "--listen",
                self.address,
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=60,
        )
        return self

    def start(self) -> BrokerProcess:
        self._log = open(self.out / "broker.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.out / "mosquitto.conf")],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

        def listening() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited:\n{self.logs()[-2000:]}")
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        wait_for(listening, 20, "mosquitto listening")
        return self

    def logs(self) -> str:
        try:
            return (self.out / "broker.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self._log:
            self._log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log:
            self._log.close()


def perf_analyzer(
    url: str,
    model: str,
    out: Path,
    *args: str,
    protocol: str = "grpc",
    stability: int = 1000,
    max_trials: int = 5,
    window_ms: int = 1000,
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, str]]]:
    """A short fixed perf_analyzer measurement over ``protocol`` (``grpc`` or ``http``; ``url``
    is the matching port), run as a user runs it (the installed wrapper finds the venv's CUDA
    runtime itself: no LD_LIBRARY_PATH); its output and CSV rows."""
    assert PERF_ANALYZER.exists(), "perf_analyzer is missing: run `make perf-analyzer`"
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    # A fixed, short measurement: windows of ``window_ms`` (1 s), at most ``max_trials`` of them.
    # The tests check that real inferences succeed, not how fast: the default stability bound of
    # 1000% (max/min of the last three windows within 10x) only stops perf_analyzer failing on a
    # machine busy with other tests.
    window = ["-p", str(window_ms), "--max-trials", str(max_trials), "-s", str(stability)]
    window += ["-f", str(out)]
    r = subprocess.run(
        [str(PERF_ANALYZER), "-i", protocol, "-u", url, "-m", model, *args, *window],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r, list(csv.DictReader(out.open()))
