"""The processes under test: the agent and the echo server; timing, memory, metrics, status."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import ROOT, AgentProcess

POLL_S = 0.010


def start_echo(listen: str, spec: dict, log_path: Path, hop_threads: int = 0) -> subprocess.Popen:
    """Start :mod:`tests.benchmarks.echo_server`; the caller must terminate it.

    It runs in its own process also because its protobuf module cannot be imported next to
    tritonclient (both define the ``inference`` package).
    """
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.benchmarks.echo_server",
                "--listen",
                listen,
                "--spec",
                json.dumps(spec),
                "--hop-threads",
                str(hop_threads),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@dataclass(frozen=True)
class Startup:
    """Seconds from just before Popen to each milestone."""

    live_s: float
    ready_s: float
    # From the agent's own log lines (wall clock, millisecond resolution); None if absent.
    log_listening_s: float | None
    log_ready_s: float | None


def start_agent(
    repo: Path, models: list[str], *flags: str, log_path: Path, timeout_s: float = 60.0
) -> tuple[AgentProcess, Startup]:
    """Start an agent and wait, polling every 10 ms, until every model in ``models`` is ready.

    The caller owns the returned process and must stop it (also when this raises: it stops the
    agent itself before raising).
    """
    agent = AgentProcess(repo, *flags, log_path=log_path)
    wall0 = time.time()
    t0 = time.monotonic()
    agent.start()
    try:
        live_s, ready_s = _poll_ready(agent, models, t0, timeout_s)
    except BaseException:
        agent.stop()
        raise
    listening = _log_time(agent.logs(), "listening on")
    ready = _log_time(agent.logs(), "READY")
    return agent, Startup(
        live_s,
        ready_s,
        listening - wall0 if listening is not None else None,
        ready - wall0 if ready is not None else None,
    )


def _poll_ready(
    agent: AgentProcess, models: list[str], t0: float, timeout_s: float
) -> tuple[float, float]:
    deadline = t0 + timeout_s
    live_s: float | None = None
    client = None
    try:
        while time.monotonic() < deadline:
            if agent.proc is None or agent.proc.poll() is not None:
                raise RuntimeError(f"agent exited during start-up:\n{agent.logs()[-3000:]}")
            if client is None:
                # A fresh channel per attempt: a channel that saw "connection refused" backs off
                # for up to a second before reconnecting, which would be measured as start-up.
                attempt = grpcclient.InferenceServerClient(agent.url)
                try:
                    if attempt.is_server_live(client_timeout=1.0):
                        live_s = time.monotonic() - t0
                        client, attempt = attempt, None
                except Exception:
                    pass
                finally:
                    if attempt is not None:
                        attempt.close()
            if client is not None:
                try:
                    if all(client.is_model_ready(m, client_timeout=1.0) for m in models):
                        ready_s = time.monotonic() - t0
                        return live_s if live_s is not None else ready_s, ready_s
                except Exception:
                    pass
            time.sleep(POLL_S)
    finally:
        if client is not None:
            client.close()
    raise TimeoutError(f"agent not ready within {timeout_s}s:\n{agent.logs()[-3000:]}")


_LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z ")


def _log_time(logs: str, text: str) -> float | None:
    """Unix time of the first log line containing ``text`` (the agent logs UTC, ms)."""
    for line in logs.splitlines():
        if text in line:
            m = _LOG_TS.match(line)
            if m:
                stamp = dt.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f")
                return stamp.replace(tzinfo=dt.UTC).timestamp()
    return None


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB (MiB), from /proc/PID/status."""
    values = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024  # kB -> MiB
    return values["VmRSS"], values["VmHWM"]


def metric(agent: AgentProcess, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when there are none)."""
    total = 0.0
    for family in text_string_to_metric_families(agent.metrics()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def status(agent: AgentProcess) -> dict:
    """``modelfleet-agent status --json`` of a running agent."""
    proc = agent.cli("status", "--json")
    if proc.returncode != 0:
        raise RuntimeError(f"status failed ({proc.returncode}): {proc.stderr}")
    return json.loads(proc.stdout)


def active_version(agent: AgentProcess, model: str) -> int:
    for m in status(agent).get("models", []):
        if m.get("name") == model:
            # int64 fields come out of MessageToDict as strings.
            return int(m.get("active_version", 0))
    return 0
