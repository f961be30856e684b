"""The hot path beside MLServer 1.7.1 (issue 17): the agent, MLServer and the bare grpc.aio echo
server serve the small model; p50 at concurrency 1 and throughput at concurrency 16, measured
with tritonclient.grpc (Python, as the other suites) and with perf_analyzer (C++, so the client
takes less of the cores), in interleaved rounds on this machine.

MLServer runs from its own virtual environment, ``build/mlserver-venv``, created on first use
(``pip install mlserver==1.7.1`` and the pins below; never into the project's venv, whose pins
clash with MLServer's). It has no ONNX runtime: ``tests/benchmarks/mlserver_runtime.py`` is ours
and loads the same .onnx with onnxruntime (the project's version) and the agent's default
session options. Its settings are generated per run into a temporary folder: loopback only,
ephemeral HTTP, gRPC and metrics ports, access logs off (``debug: false`` unless
``--mlserver-debug``), everything else at MLServer's defaults (``parallel_workers`` 1 unless
``--mlserver-workers``).

    python -m tests.benchmarks.mlserver_bench [--rounds 4] [--quick] [--mlserver-workers N]
        [--mlserver-debug]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from statistics import median

import numpy as np
import tritonclient.grpc as grpcclient

from tests.benchmarks import servers
from tests.benchmarks.fixtures import SMALL, BenchModel, build_models, make_bundle
from tests.benchmarks.load import (
    Target,
    cpu_seconds,
    interleaved_sequential,
    make_inputs,
    run_concurrent,
)
from tests.benchmarks.run import echo_running
from tests.procs import PERF_ANALYZER, ROOT, free_port, perf_analyzer, wait_for

MLSERVER_VERSION = "1.7.1"
# uvloop 0.22 and later raise from asyncio.get_event_loop() when no loop is set, which MLServer
# 1.7.1's inference worker calls as it starts: every worker dies at once and no model loads.
MLSERVER_PINS = (f"mlserver=={MLSERVER_VERSION}", "uvloop==0.21.0")
VENV = ROOT / "build" / "mlserver-venv"
RUNTIME = Path(__file__).with_name("mlserver_runtime.py")
# Reported with the figures: what MLServer's venv actually resolved.
REPORTED_DISTS = (
    "mlserver",
    "uvloop",
    "grpcio",
    "protobuf",
    "onnxruntime",
    "numpy",
    "fastapi",
    "uvicorn",
    "pydantic",
)
CONCURRENCY = 16
SYSTEMS = ("agent", "mlserver", "echo")


@dataclasses.dataclass(frozen=True)
class Plan:
    rounds: int = 4
    c1_requests: int = 1000
    c16_warmup_s: float = 1.0
    c16_seconds: float = 5.0
    # perf_analyzer: three windows of this many ms, averaged (see pa_run).
    pa_window_ms: int = 2000


QUICK = Plan(rounds=1, c1_requests=300, c16_warmup_s=0.5, c16_seconds=2.0, pa_window_ms=1000)


def ensure_venv() -> Path:
    """MLServer's interpreter, installing it on first use (or when the pins change)."""
    pins = [*MLSERVER_PINS, f"onnxruntime=={importlib.metadata.version('onnxruntime')}"]
    python = VENV / "bin" / "python"
    stamp = VENV / ".modelfleet-pins"
    want = "\n".join(pins) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    print(f"installing {' '.join(pins)} into {VENV} (once, about a minute)", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    r = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if r.returncode != 0:
        raise RuntimeError(f"pip could not install {pins} into {VENV}:\n{r.stdout}\n{r.stderr}")
    stamp.write_text(want)
    return python


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def venv_versions(python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "print(json.dumps({d: m.version(d) for d in sys.argv[1:]}))"
    )
    r = subprocess.run(
        [str(python), "-c", code, *REPORTED_DISTS], capture_output=True, text=True, check=True
    )
    return dict(json.loads(r.stdout))


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (MLServer's inference workers and their helpers)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
    return total


def tree_rss_mb(pid: int) -> float:
    """Summed VmRSS (MiB) of a process and its descendants (shared pages count in each)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            total += servers.memory_mb(p)[0]
    return total


class MLServerProcess:
    """``mlserver start`` (through the runtime file's launcher) on free loopback ports."""

    def __init__(
        self,
        python: Path,
        work: Path,
        model: BenchModel,
        model_config: bytes,
        workers: int | None,
        debug: bool = False,
    ) -> None:
        self.python = python
        self.work = work
        self.model = model
        self.model_config = model_config
        self.workers = workers
        self.debug = debug
        self.grpc_port = free_port()
        self.url = f"127.0.0.1:{self.grpc_port}"
        self.log_path = work / "mlserver.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: set[int] = set()

    def settings(self) -> dict[str, object]:
        s: dict[str, object] = {
            "debug": self.debug,
            "host": "127.0.0.1",
            "http_port": free_port(),
            "grpc_port": self.grpc_port,
            "metrics_port": free_port(),
            "metrics_dir": str(self.work / "metrics"),
            "environments_dir": str(self.work / "envs"),
        }
        if self.workers is not None:
            s["parallel_workers"] = self.workers
        return s

    def model_settings(self) -> dict[str, object]:
        m = self.model
        return {
            "name": m.name,
            "implementation": "mlserver_runtime.OnnxModel",
            "parameters": {"uri": str(m.onnx_path), "version": "1"},
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, m.width_in]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, m.width_out]}],
        }

    def start(self) -> None:
        repo = self.work / "repo"
        (repo / self.model.name).mkdir(parents=True)
        code = self.work / "code"
        code.mkdir()
        shutil.copy(RUNTIME, code / RUNTIME.name)
        (repo / "settings.json").write_text(json.dumps(self.settings(), indent=2))
        (repo / self.model.name / "model-settings.json").write_text(
            json.dumps(self.model_settings(), indent=2)
        )
        # MLServer reads MLSERVER_* variables as settings: none of the caller's may leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVER")}
        env["PYTHONPATH"] = str(code)
        env["MODELFLEET_BENCH_MODEL_CONFIGS"] = json.dumps(
            {self.model.name: base64.b64encode(self.model_config).decode()}
        )
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.python), str(code / RUNTIME.name), "start", str(repo)],
                cwd=self.work,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 120.0) -> None:
        def ready() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"MLServer exited:\n{self.logs()[-4000:]}")
            client = grpcclient.InferenceServerClient(self.url)
            try:
                return bool(client.is_model_ready(self.model.name, client_timeout=1.0))
            finally:
                client.close()

        try:
            wait_for(ready, timeout, "MLServer model ready", interval=0.2)
        except TimeoutError:
            raise TimeoutError(f"MLServer not ready:\n{self.logs()[-4000:]}") from None
        self.remember_children()

    def remember_children(self) -> None:
        if self.proc is not None:
            self.seen.update(descendants(self.proc.pid))

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        self.remember_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # Workers MLServer failed to stop: only PIDs seen as its children, and only while they
        # still run MLServer's interpreter (a PID is not reused within these seconds, but check).
        for pid in sorted(self.seen):
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                continue
            if Path(exe).resolve() == self.python.resolve():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@dataclasses.dataclass
class Results:
    """Per system, one entry per round (NaN where a measurement failed)."""

    tc_p50_ms: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    tc_rps: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    tc_cpu_us: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    pa_p50_ms: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    pa_rps: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)

    def add(self, table: dict[str, list[float]], system: str, value: float) -> None:
        table.setdefault(system, []).append(value)


def pa_run(url: str, concurrency: int, window_ms: int, out: Path) -> tuple[float, float]:
    """(p50 ms, inferences/s) from perf_analyzer over three windows of ``window_ms``.

    Its stability check is made to pass (within 1000%, the runner's default): on a shared
    machine whether three windows agree depends on the neighbours more than on the server, and a
    refused measurement would leave a hole in one system's rounds only. The spread shows in the
    per-round ratios.
    """
    try:
        _, rows = perf_analyzer(
            url,
            SMALL,
            out,
            *("--shape", "x:4", "-b", "1", "--concurrency-range", str(concurrency)),
            stability=1000,
            max_trials=3,
            window_ms=window_ms,
        )
    except AssertionError as exc:  # the runner asserts a zero exit status
        raise RuntimeError(str(exc)[-1500:]) from None
    row = rows[0]
    return int(row["p50 latency"]) / 1000.0, float(row["Inferences/Second"])


def med(values: list[float]) -> float:
    ok = [v for v in values if not math.isnan(v)]
    return median(ok) if ok else math.nan


def ratio_range(a: list[float], b: list[float]) -> str:
    rs = [x / y for x, y in zip(a, b, strict=True) if not (math.isnan(x) or math.isnan(y))]
    return f"{min(rs):.2f}-{max(rs):.2f}" if rs else "-"


@contextlib.contextmanager
def mlserver_running(
    python: Path, work: Path, model: BenchModel, config: bytes, workers: int | None, debug: bool
) -> Iterator[MLServerProcess]:
    server = MLServerProcess(python, work, model, config, workers, debug)
    try:
        server.start()
        server.wait_ready()
        yield server
    finally:
        server.stop()


def measure(
    plan: Plan,
    x: np.ndarray,
    urls: dict[str, str],
    cpu: dict[str, Callable[[], float]],
    work: Path,
) -> Results:
    res = Results()
    for r in range(plan.rounds):
        # The order turns every round, so no system always follows the same neighbour.
        order = list(SYSTEMS[r % 3 :] + SYSTEMS[: r % 3])
        print(
            f"round {r + 1}/{plan.rounds} (load {loadavg().split()[0]})",
            flush=True,
        )
        for c in (1, CONCURRENCY):
            for s in order:
                try:
                    p50, ips = pa_run(urls[s], c, plan.pa_window_ms, work / "pa.csv")
                except RuntimeError as exc:
                    res.failures.append(f"round {r + 1} perf_analyzer c{c} {s}: {exc}")
                    print(f"  perf_analyzer c{c} {s}: FAILED {str(exc)[-300:]}", flush=True)
                    p50, ips = math.nan, math.nan
                if c == 1:
                    res.add(res.pa_p50_ms, s, p50)
                else:
                    res.add(res.pa_rps, s, ips)
                print(f"  perf_analyzer c{c:<2} {s:8s} p50 {p50:7.3f} ms  {ips:7.0f} inf/s")
        targets: list = [Target(s, urls[s], SMALL) for s in order]
        lat = interleaved_sequential(targets, x, requests=plan.c1_requests)
        for s in order:
            p50 = float(np.percentile(lat[s], 50)) / 1e6
            res.add(res.tc_p50_ms, s, p50)
            print(f"  tritonclient  c1  {s:8s} p50 {p50:7.3f} ms")
        for s in order:
            block = run_concurrent(
                Target(s, urls[s], SMALL),
                x,
                threads=CONCURRENCY,
                warmup_s=plan.c16_warmup_s,
                duration_s=plan.c16_seconds,
                server_cpu=cpu[s],
            )
            rps = block.completed / block.seconds
            cpu_us = (block.cpu_s or 0.0) / block.completed * 1e6 if block.completed else math.nan
            if block.failed:
                res.failures.append(f"round {r + 1} tritonclient c16 {s}: {block.failed} failed")
            res.add(res.tc_rps, s, rps)
            res.add(res.tc_cpu_us, s, cpu_us)
            print(
                f"  tritonclient  c16 {s:8s} {rps:7.0f} req/s  {cpu_us:5.0f} us server CPU/req"
                + (f"  {block.failed} failed" if block.failed else ""),
                flush=True,
            )
    return res


def report(res: Results, rss: dict[str, float]) -> list[str]:
    names = {"agent": "agent", "mlserver": f"MLServer {MLSERVER_VERSION}", "echo": "echo"}
    lines = [
        "| system | c1 p50, tritonclient | c16 req/s, tritonclient | c1 p50, perf_analyzer "
        "| c16 inf/s, perf_analyzer | server CPU/req at c16 (tritonclient) | RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in SYSTEMS:
        lines.append(
            f"| {names[s]} | {med(res.tc_p50_ms[s]):.3f} ms | {med(res.tc_rps[s]):,.0f} "
            f"| {med(res.pa_p50_ms[s]):.3f} ms | {med(res.pa_rps[s]):,.0f} "
            f"| {med(res.tc_cpu_us[s]):.0f} us | {rss[s]:.0f} MiB |"
        )
    for base in ("mlserver", "echo"):
        cells = []
        for table in (res.tc_p50_ms, res.tc_rps, res.pa_p50_ms, res.pa_rps, res.tc_cpu_us):
            a, b = med(table["agent"]), med(table[base])
            cells.append(f"{a / b:.2f}x ({ratio_range(table['agent'], table[base])})")
        lines.append(f"| agent / {names[base]} | " + " | ".join(cells) + " | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help=f"default {Plan.rounds}")
    parser.add_argument("--quick", action="store_true", help="one short round (a smoke run)")
    parser.add_argument(
        "--mlserver-workers",
        type=int,
        help="MLServer's parallel_workers (default: MLServer's own default, 1)",
    )
    parser.add_argument(
        "--mlserver-debug",
        action="store_true",
        help="MLServer's debug setting on (its own default: a log line per gRPC request)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench-run" / "mlserver.json", help="results as JSON"
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    if not PERF_ANALYZER.exists():
        print("perf_analyzer is missing: run `make perf-analyzer`", file=sys.stderr)
        return 1
    python = ensure_venv()
    versions = venv_versions(python)
    loadavg_start = loadavg()
    print(f"/proc/loadavg at start: {loadavg_start} ({os.cpu_count()} CPUs)")
    print("MLServer venv: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="mlserver-bench-"))
    try:
        model = build_models(work / "onnx")[SMALL]
        make_bundle(model, work / "repo")
        x = model.row()
        with contextlib.ExitStack() as stack:
            agent, _ = servers.start_agent(work / "repo", [SMALL], log_path=work / "agent.log")
            stack.callback(agent.stop)
            assert agent.proc is not None
            probe = grpcclient.InferenceServerClient(agent.url)
            config = probe.get_model_config(SMALL).SerializeToString()
            probe.close()
            echo_url, echo_pid = stack.enter_context(echo_running(work, {SMALL: model}))
            (work / "mlserver").mkdir()
            ml = stack.enter_context(
                mlserver_running(
                    python,
                    work / "mlserver",
                    model,
                    config,
                    args.mlserver_workers,
                    args.mlserver_debug,
                )
            )
            assert ml.proc is not None
            urls = {"agent": agent.url, "mlserver": ml.url, "echo": echo_url}
            pids = {"agent": agent.proc.pid, "mlserver": ml.proc.pid, "echo": echo_pid}
            answers = {}
            for s, url in urls.items():
                c = grpcclient.InferenceServerClient(url)
                got = c.infer(SMALL, make_inputs(x))
                answers[s] = (got.as_numpy("y"), got.get_response().ByteSize())
                c.close()
            if not np.allclose(answers["agent"][0], answers["mlserver"][0], rtol=1e-5, atol=1e-6):
                raise RuntimeError(f"agent and MLServer disagree: {answers}")
            print(
                "response bytes: "
                + ", ".join(f"{s} {size}" for s, (_, size) in answers.items())
                + f"; MLServer processes: {ml.proc.pid} + {descendants(ml.proc.pid)}"
            )
            cpu = {s: functools.partial(tree_cpu, p) for s, p in pids.items()}
            res = measure(plan, x, urls, cpu, work)
            ml.remember_children()
            rss = {s: tree_rss_mb(p) for s, p in pids.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    loadavg_end = loadavg()
    workers = args.mlserver_workers if args.mlserver_workers is not None else "1 (default)"
    print(
        f"\nsmall model, {plan.rounds} rounds, medians per system (range of per-round ratios); "
        f"MLServer {MLSERVER_VERSION}, parallel_workers {workers}, "
        f"debug {str(args.mlserver_debug).lower()}, metrics on"
    )
    lines = report(res, rss)
    print("\n".join(lines))
    print(f"/proc/loadavg at start: {loadavg_start}; at end: {loadavg_end}")
    print(f"runtime {time.monotonic() - started:.0f} s")
    for f in res.failures:
        print(f"FAILED: {f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "loadavg_start": loadavg_start,
                "loadavg_end": loadavg_end,
                "mlserver_venv": versions,
                "mlserver_parallel_workers": workers,
                "mlserver_debug": args.mlserver_debug,
                "plan": dataclasses.asdict(plan),
                "rounds": {
                    "tritonclient_c1_p50_ms": res.tc_p50_ms,
                    "tritonclient_c16_rps": res.tc_rps,
                    "tritonclient_c16_server_cpu_us": res.tc_cpu_us,
                    "perf_analyzer_c1_p50_ms": res.pa_p50_ms,
                    "perf_analyzer_c16_infer_per_s": res.pa_rps,
                },
                "rss_mb": rss,
                "failures": res.failures,
                "table": lines,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results: {args.out}")
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
