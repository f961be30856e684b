"""``make bench``: the agent against in-process onnxruntime and a bare grpc.aio echo server.

Sections, in order (each prints as it finishes; the full table comes at the end):

1. in-process onnxruntime: one row, and 16 rows for the heavy model;
2. serving: the echo server, in-process onnxruntime and one agent per configuration (batching
   off, on with several queue delays), all up at once; concurrency 1 alternates blocks of
   requests between them, concurrency 16 alternates windows of a few seconds;
3. start-up: Popen to ``is_model_ready``, and resident memory;
4. swaps under load: concurrency 16 while a new version is renamed in every second.

Missed targets are reported as MISS and do not fail the run; an error that stops a section does
(exit status 1), after everything started has been stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from tests.benchmarks import fixtures, servers
from tests.benchmarks.fixtures import HEAVY, SMALL, BenchModel
from tests.benchmarks.load import (
    Block,
    ConcurrentLoad,
    LocalTarget,
    Target,
    Throughput,
    interleaved_sequential,
    percentile_ms,
    response_bytes,
    run_concurrent,
)
from tests.benchmarks.report import Report, Row
from tests.procs import ROOT, AgentProcess, free_port, wait_for

# Targets from the issue.
P50_RATIO_MAX = 1.3
SWAP_P99_RATIO_MAX = 2.0
BATCHING_GAIN_MIN = 3.0
RSS_MAX_MB = 120.0
READY_MAX_S = 2.0

CONCURRENCY = 16

# grpc turns Ctrl-C during a blocking call into a cancelled RPC, which would look like an ordinary
# failure and let the run carry on; this flag makes the next section boundary stop instead.
_interrupted = threading.Event()


def _on_sigint(signum: int, frame: object) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


# Repository poll interval of the swap run: a new version is seen at most this late.
POLL_INTERVAL_S = "0.1"


@dataclass(frozen=True)
class Plan:
    """How long each part runs; ``--quick`` shrinks everything for a smoke test."""

    c1_small: int = 2000
    c1_heavy: int = 500
    # Concurrency 16 alternates windows between the targets, this many rounds.
    c16_rounds: int = 3
    c16_warmup_s: float = 0.5
    c16_block_s: float = 2.0
    startups: int = 3
    steady_s: float = 10.0
    swaps: int = 100
    swap_every_s: float = 1.0
    delays_us: tuple[int, ...] = (0, 500, 1000)


QUICK = Plan(
    c1_small=300,
    c1_heavy=100,
    c16_rounds=1,
    c16_block_s=1.5,
    startups=1,
    steady_s=3.0,
    swaps=8,
    delays_us=(500,),
)


def ms(v: float) -> str:
    return f"{v:.3f} ms"


def rps(v: float) -> str:
    return f"{v:,.0f} req/s"


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "python": sys.version.split()[0],
    }
    for dist in ("onnxruntime", "grpcio", "tritonclient"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = "?"
    # Other work on a shared machine shows here; figures from a busy run deserve less trust.
    info["loadavg_start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


@contextmanager
def echo_running(
    work: Path, models: dict[str, BenchModel], hop_threads: int = 0
) -> Iterator[tuple[str, int]]:
    """The echo server on a free port, stopped on exit whatever happens."""
    url = f"127.0.0.1:{free_port()}"
    spec = {name: m.echo_spec() for name, m in models.items()}
    proc = servers.start_echo(url, spec, work / "echo.log", hop_threads)
    try:

        def live() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"echo server exited: {(work / 'echo.log').read_text()}")
            client = grpcclient.InferenceServerClient(url)
            try:
                return client.is_server_live(client_timeout=1.0)
            finally:
                client.close()

        wait_for(live, 30, "echo server live", interval=0.05)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def agent_running(
    repo: Path, names: list[str], flags: list[str], log_path: Path
) -> Iterator[tuple[AgentProcess, servers.Startup]]:
    agent, startup = servers.start_agent(repo, names, *flags, log_path=log_path)
    try:
        yield agent, startup
    finally:
        agent.stop()


class Bench:
    def __init__(self, plan: Plan, work: Path) -> None:
        self.plan = plan
        self.work = work
        self.report = Report()
        self.models: dict[str, BenchModel] = {}
        self.ort: dict[str, fixtures.InProcess] = {}
        self.echo_c16: dict[str, Throughput] = {}
        # model -> agent configuration -> concurrency-16 result
        self.agent_c16: dict[str, dict[str, Throughput]] = {}

    # -- sections -------------------------------------------------------------------------------

    def section(self, title: str, fn: Callable[[], None]) -> None:
        if _interrupted.is_set():
            raise KeyboardInterrupt
        print(f"\n== {title}", flush=True)
        start = time.monotonic()
        try:
            fn()
        except Exception as exc:
            if _interrupted.is_set():
                raise KeyboardInterrupt from exc
            traceback.print_exc()
            self.report.errors.append(f"{title}: {type(exc).__name__}: {exc}")
            self.report.rows.append(
                Row(title, "section failed", f"{type(exc).__name__}: {exc}"[:120], verdict="ERROR")
            )
        print(f"   ({time.monotonic() - start:.1f} s)", flush=True)

    def prepare(self) -> None:
        self.models = fixtures.build_models(self.work / "onnx")
        self.repo_all = self.work / "repo-all"
        self.repo_small = self.work / "repo-small"
        self.staging = self.work / "staging"
        for m in self.models.values():
            fixtures.make_bundle(m, self.repo_all)
        small = self.models[SMALL]
        fixtures.make_bundle(small, self.repo_small)
        last = 1 + self.plan.swaps
        self.staged = fixtures.stage_versions(
            small, self.work / "onnx", self.staging, range(2, last + 1)
        )
        print(f"  bundles: {self.repo_all}, {self.repo_small}; {len(self.staged)} staged versions")

    def in_process(self) -> None:
        for name, m in self.models.items():
            self.ort[name] = r = fixtures.ort_latency(m, runs=2000 if name == SMALL else 500)
            self.report.add(
                Row(
                    "onnxruntime",
                    f"{name}: 1 row, in-process p50",
                    ms(r.p50_ms),
                    note=f"p99 {ms(r.p99_ms)}",
                )
            )
        heavy16 = fixtures.ort_latency(self.models[HEAVY], rows=16, runs=200)
        self.ort["heavy16"] = heavy16
        one = self.ort[HEAVY].p50_ms
        self.report.add(
            Row(
                "onnxruntime",
                "heavy: 16 rows, in-process p50",
                ms(heavy16.p50_ms),
                baseline=f"16 x 1 row = {ms(16 * one)}",
                ratio=heavy16.p50_ms / (16 * one),
                note=f"batch-16 ceiling {16e3 / heavy16.p50_ms:,.0f} rows/s",
            )
        )
        if one < 0.5:
            print(f"  WARNING: heavy single-row compute is {one:.3f} ms, under the 0.5 ms asked")

    def agent_configs(self) -> list[tuple[str, list[str]]]:
        configs = [("batching off", ["--batching", "off"])]
        for d in self.plan.delays_us:
            configs.append(
                (f"batching on {d}us", ["--batching", "on", "--max-queue-delay-us", str(d)])
            )
        return configs

    def serving(self) -> None:
        """Every server up at once, so each measurement can alternate between them.

        Idle servers cost next to nothing, and alternating (blocks of requests at concurrency 1,
        windows of a few seconds at concurrency 16) spreads the shared machine's noise evenly over
        the agent configurations and their baselines.
        """
        configs = self.agent_configs()
        with contextlib.ExitStack() as stack:
            echo_url, echo_pid = stack.enter_context(echo_running(self.work, self.models))
            # Diagnostic: the echo server plus the agent's hop to a thread pool and back.
            hop_url, _ = stack.enter_context(echo_running(self.work, self.models, 2))
            agents: dict[str, AgentProcess] = {}
            for label, flags in configs:
                log = self.work / f"agent-{label.replace(' ', '-')}.log"
                # No swaps here: a slow poll keeps idle agents quiet.
                agent, _ = stack.enter_context(
                    agent_running(
                        self.repo_all, list(self.models), [*flags, "--poll-interval-s", "1"], log
                    )
                )
                agents[label] = agent
            print(f"  echo, echo+hop and {len(agents)} agents up", flush=True)
            self._c1(SMALL, self.plan.c1_small, echo_url, hop_url, agents)
            self._c1(HEAVY, self.plan.c1_heavy, echo_url, None, agents)
            for name in self.models:
                self._c16(name, echo_url, echo_pid, agents)
        self._batching_gain()

    def _c1(
        self, name: str, n: int, echo_url: str, hop_url: str | None, agents: dict[str, AgentProcess]
    ) -> None:
        m = self.models[name]
        x = m.row()
        sec = f"c1 {name}"
        echo_t = Target("echo", echo_url, name)
        size = response_bytes(echo_t, x)
        for label, agent in agents.items():
            got = response_bytes(Target(label, agent.url, name), x)
            if got != size:
                print(
                    f"  WARNING: {name} response is {got} bytes from agent {label}, "
                    f"{size} from the echo server"
                )
        # In-process onnxruntime is interleaved too: it is the other half of the heavy
        # model's baseline and suffers from the same neighbours.
        targets: list[Target | LocalTarget] = [echo_t, LocalTarget("ort", fixtures.ort_call(m))]
        if hop_url:
            targets.append(Target("hop", hop_url, name))
        targets += [Target(label, agent.url, name) for label, agent in agents.items()]
        interleaved_sequential(targets, x, requests=0, warmup=100)
        before = {label: self._server_times(a, name) for label, a in agents.items()}
        lat = interleaved_sequential(targets, x, requests=n, warmup=0)
        e50, e99 = percentile_ms(lat["echo"], 50), percentile_ms(lat["echo"], 99)
        o50 = percentile_ms(lat["ort"], 50)
        note = f"{n} requests per target, {size} B response; p99 {ms(e99)}"
        self.report.add(Row(sec, "echo server: p50", ms(e50), note=note))
        self.report.add(
            Row(
                sec,
                "in-process onnxruntime, 1 row: p50",
                ms(o50),
                note=f"p99 {ms(percentile_ms(lat['ort'], 99))}",
            )
        )
        if "hop" in lat:
            h50 = percentile_ms(lat["hop"], 50)
            self.report.add(
                Row(
                    sec,
                    "echo + thread-pool hop (diagnostic): p50",
                    ms(h50),
                    f"echo {ms(e50)}",
                    h50 / e50,
                    note="the agent's run_in_executor round trip alone",
                )
            )
        # The small model's compute is noise next to the round trip, so its baseline is the
        # echo server alone (the target's definition); the heavy one's adds onnxruntime.
        o99 = percentile_ms(lat["ort"], 99)
        base, base_text = (
            (e50, f"echo {ms(e50)}") if name == SMALL else (e50 + o50, f"echo+ORT {ms(e50 + o50)}")
        )
        # Tails do not add up exactly; the sum of the two p99s is a generous baseline.
        base99, base99_text = (
            (e99, f"echo {ms(e99)}") if name == SMALL else (e99 + o99, f"echo+ORT {ms(e99 + o99)}")
        )
        for label, agent in agents.items():
            a50, a99 = percentile_ms(lat[label], 50), percentile_ms(lat[label], 99)
            served, computed = self._inside(before[label], self._server_times(agent, name))
            note = f"inside the agent {ms(served)} mean, onnxruntime {ms(computed)}"
            row = Row(sec, f"agent, {label}: p50", ms(a50), base_text, a50 / base, note=note)
            if name == SMALL and label == "batching off":
                row.target = f"<= {P50_RATIO_MAX}x echo"
                self.report.check(row, a50 / base <= P50_RATIO_MAX)
            else:
                self.report.add(row)
            self.report.add(Row(sec, f"agent, {label}: p99", ms(a99), base99_text, a99 / base99))

    def _c16(
        self, name: str, echo_url: str, echo_pid: int, agents: dict[str, AgentProcess]
    ) -> None:
        p = self.plan
        x = self.models[name].row()
        sec = f"c16 {name}"
        blocks: dict[str, list[Block]] = {"echo": [], **{label: [] for label in agents}}
        rows = dict.fromkeys(agents, 0.0)
        runs = dict.fromkeys(agents, 0.0)
        for _ in range(p.c16_rounds):
            blocks["echo"].append(self._block(Target("echo", echo_url, name), x, echo_pid))
            for label, agent in agents.items():
                assert agent.proc is not None
                r0, n0 = self._batches(agent, name)
                blocks[label].append(self._block(Target(label, agent.url, name), x, agent.proc.pid))
                r1, n1 = self._batches(agent, name)
                rows[label] += r1 - r0
                runs[label] += n1 - n0
        echo = Throughput.of(blocks["echo"])
        self.echo_c16[name] = echo
        self.report.add(
            Row(
                sec,
                "echo server: throughput",
                rps(echo.rps),
                note=f"{echo.cpu_us_per_req:.0f} us server CPU/req",
            )
        )
        self.report.add(
            Row(sec, "echo server: p99", ms(echo.p99_ms), note=f"p50 {ms(echo.p50_ms)}")
        )
        self.agent_c16.setdefault(name, {})
        for label in agents:
            r = Throughput.of(blocks[label])
            self.agent_c16[name][label] = r
            note = f"{r.cpu_us_per_req:.0f} us agent CPU/req" if r.cpu_us_per_req else ""
            if runs[label]:
                note += f", {rows[label] / runs[label]:.1f} rows/run"
            if r.failed or echo.failed:
                note += f", {r.failed} failed (echo {echo.failed})"
            self.report.add(
                Row(
                    sec,
                    f"agent, {label}: throughput",
                    rps(r.rps),
                    f"echo {rps(echo.rps)}",
                    r.rps / echo.rps,
                    note=note,
                )
            )
            self.report.add(
                Row(
                    sec,
                    f"agent, {label}: p99",
                    ms(r.p99_ms),
                    f"echo {ms(echo.p99_ms)}",
                    r.p99_ms / echo.p99_ms,
                    note=f"p50 {ms(r.p50_ms)}",
                )
            )

    def _batching_gain(self) -> None:
        heavy = self.agent_c16.get(HEAVY, {})
        off = heavy.get("batching off")
        ons = {k: v for k, v in heavy.items() if k != "batching off"}
        if off is None or not ons:
            raise RuntimeError("no heavy-model throughput for batching off and on")
        best = max(ons, key=lambda k: ons[k].rps)
        gain = ons[best].rps / off.rps
        others = ", ".join(
            f"{k.removeprefix('batching on ')}: {v.rps / off.rps:.2f}x" for k, v in ons.items()
        )
        self.report.check(
            Row(
                "batching",
                f"heavy c16 throughput, best on ({best})",
                rps(ons[best].rps),
                f"off {rps(off.rps)}",
                gain,
                f">= {BATCHING_GAIN_MIN}x off",
                note=others,
            ),
            gain >= BATCHING_GAIN_MIN,
        )
        heavy16 = self.ort.get("heavy16")
        if heavy16:
            ceiling = 16e3 / heavy16.p50_ms
            self.report.add(
                Row(
                    "batching",
                    "heavy c16 throughput vs in-process batch-16 ceiling",
                    rps(ons[best].rps),
                    f"ORT {ceiling:,.0f} rows/s",
                    ons[best].rps / ceiling,
                )
            )

    def startup(self) -> None:
        ready, live, log_ready, rss = [], [], [], []
        for i in range(self.plan.startups):
            log = self.work / f"agent-startup-{i}.log"
            with agent_running(self.repo_small, [SMALL], [], log) as (agent, st):
                assert agent.proc is not None
                ready.append(st.ready_s)
                live.append(st.live_s)
                if st.log_ready_s is not None:
                    log_ready.append(st.log_ready_s)
                rss.append(servers.memory_mb(agent.proc.pid)[0])
        med = statistics.median(ready)
        self.report.check(
            Row(
                "start-up",
                "Popen -> small model ready (median)",
                f"{med:.3f} s",
                target=f"<= {READY_MAX_S} s",
                note=f"{len(ready)} starts, max {max(ready):.3f} s; server live at "
                f"{statistics.median(live):.3f} s"
                + (f"; READY logged at {statistics.median(log_ready):.3f} s" if log_ready else ""),
            ),
            med <= READY_MAX_S,
        )
        idle = statistics.median(rss)
        self.report.add(
            Row("memory", "RSS with the small model, idle after ready", f"{idle:.1f} MB")
        )

    def swaps(self) -> None:
        p = self.plan
        small = self.models[SMALL]
        log = self.work / "agent-swaps.log"
        repo_model_dir = self.repo_small / SMALL
        with agent_running(
            self.repo_small, [SMALL], ["--poll-interval-s", POLL_INTERVAL_S], log
        ) as (agent, _):
            assert agent.proc is not None
            pid = agent.proc.pid
            swaps0 = servers.metric(agent, "modelfleet_swaps_total", model=SMALL)
            # Samples in /metrics: labelled series per version show up here if never removed.
            series0 = _samples(agent.metrics())
            target = Target("agent", agent.url, SMALL)
            max_s = p.c16_warmup_s + p.steady_s + p.swaps * p.swap_every_s + 60
            renamed: list[tuple[int, int]] = []  # (version, perf_counter_ns of the rename)
            load = ConcurrentLoad(target, small.row(), threads=CONCURRENCY, max_duration_s=max_s)
            with load:
                time.sleep(p.c16_warmup_s)
                t_steady = time.perf_counter_ns()
                time.sleep(p.steady_s)
                rss_loaded, _ = servers.memory_mb(pid)
                t_swaps = time.perf_counter_ns()
                start = time.monotonic()
                for i, src in enumerate(self.staged):
                    # Fixed schedule, so a slow rename does not stretch the run.
                    delay = start + i * p.swap_every_s - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    version = int(src.name)
                    os.rename(src, repo_model_dir / src.name)
                    renamed.append((version, time.perf_counter_ns()))
                last = renamed[-1][0]
                # Give the last version time to load (bounded; a lagging agent is a finding,
                # reported below, not a reason to drop the figures), then one more second.
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    if servers.active_version(agent, SMALL) == last:
                        break
                    time.sleep(0.1)
                time.sleep(1.0)
                t_end = time.perf_counter_ns()
            rec = load.record()
            rss_after, hwm = servers.memory_mb(pid)
            swaps = servers.metric(agent, "modelfleet_swaps_total", model=SMALL) - swaps0
            gate_failures = servers.metric(agent, "modelfleet_gate_failures_total", model=SMALL)
            loaded = servers.metric(agent, "modelfleet_loaded_versions", model=SMALL)
            st = servers.status(agent)
            series1 = _samples(agent.metrics())

        _, steady = rec.window(t_steady, t_swaps)
        starts, during = rec.window(t_swaps, t_end)
        # Every failure counts, warm-up included.
        errors = rec.errors
        steady99, swap99 = percentile_ms(steady, 99), percentile_ms(during, 99)
        # Requests that started within 0.5 s after a rename: where a swap could hurt, undiluted.
        near = np.zeros(starts.shape, dtype=bool)
        for _, t in renamed:
            near |= (starts >= t) & (starts < t + 500_000_000)
        near99 = percentile_ms(during[near], 99)
        # Rename -> first request answered by the new version.
        first_seen: dict[str, int] = {}
        for s, v in zip(rec.starts.tolist(), rec.versions, strict=True):
            first_seen.setdefault(v, s)
        lags = [(first_seen[str(v)] - t) / 1e6 for v, t in renamed if str(v) in first_seen]
        served = len({v for v in rec.versions[np.searchsorted(rec.starts, t_swaps) :]})

        sec = "swaps"
        self.report.check(
            Row(
                sec,
                f"failed requests during {len(renamed)} swaps at c16",
                str(len(errors)),
                target="0",
                note=f"{during.size:,} requests"
                + (f"; first: {errors[0][1][:100]}" if errors else ""),
            ),
            not errors,
        )
        self.report.check(
            Row(
                sec,
                "p99 during swaps",
                ms(swap99),
                f"steady {ms(steady99)}",
                swap99 / steady99,
                f"<= {SWAP_P99_RATIO_MAX}x steady",
                note=f"p50 {ms(percentile_ms(during, 50))} vs {ms(percentile_ms(steady, 50))}; "
                f"p99 within 0.5 s after a rename {ms(near99)}; "
                f"max {ms(float(during.max()) / 1e6) if during.size else '-'}",
            ),
            swap99 / steady99 <= SWAP_P99_RATIO_MAX,
        )
        active = next(
            (
                int(m.get("active_version", 0))
                for m in st.get("models", [])
                if m.get("name") == SMALL
            ),
            0,
        )
        self.report.check(
            Row(
                sec,
                "swaps counted by modelfleet_swaps_total",
                f"{swaps:.0f}",
                f"{len(renamed)} renamed",
                swaps / len(renamed) if renamed else None,
                f"= {len(renamed)}",
                note=f"versions answering clients: {served}; active now v{active}; "
                f"loaded versions {loaded:.0f}; gate failures {gate_failures:.0f}",
            ),
            swaps == len(renamed),
        )
        if lags:
            self.report.add(
                Row(
                    sec,
                    "rename -> first answer from new version",
                    f"median {statistics.median(lags):.0f} ms",
                    note=f"max {max(lags):.0f} ms; poll interval "
                    f"{float(POLL_INTERVAL_S) * 1e3:.0f} ms",
                )
            )
        self.report.check(
            Row(
                "memory",
                "RSS with the small model, after c16 load",
                f"{rss_loaded:.1f} MB",
                target=f"<= {RSS_MAX_MB:.0f} MB",
            ),
            rss_loaded <= RSS_MAX_MB,
        )
        self.report.add(
            Row(
                "memory",
                f"RSS after {len(renamed)} swaps",
                f"{rss_after:.1f} MB",
                f"before {rss_loaded:.1f} MB",
                rss_after / rss_loaded,
                note=f"peak (VmHWM) {hwm:.1f} MB; /metrics samples {series0} -> {series1}",
            )
        )

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _server_times(agent: AgentProcess, model: str) -> tuple[float, float, float, float]:
        """Seconds and count of requests inside the agent, then of onnxruntime runs, so far."""
        out: list[float] = []
        for name in ("modelfleet_request_duration_seconds", "modelfleet_compute_duration_seconds"):
            out.append(servers.metric(agent, f"{name}_sum", model=model))
            out.append(servers.metric(agent, f"{name}_count", model=model))
        return out[0], out[1], out[2], out[3]

    @staticmethod
    def _batches(agent: AgentProcess, model: str) -> tuple[float, float]:
        """(rows, onnxruntime runs) so far, from the agent's batch-size histogram."""
        rows = servers.metric(agent, "modelfleet_batch_size_sum", model=model)
        return rows, servers.metric(agent, "modelfleet_batch_size_count", model=model)

    def _block(self, target: Target, x: np.ndarray, pid: int) -> Block:
        return run_concurrent(
            target,
            x,
            threads=CONCURRENCY,
            warmup_s=self.plan.c16_warmup_s,
            duration_s=self.plan.c16_block_s,
            server_pid=pid,
        )

    @staticmethod
    def _inside(
        before: tuple[float, float, float, float], after: tuple[float, float, float, float]
    ) -> tuple[float, float]:
        """Mean ms per request inside the agent, and per onnxruntime run, between two readings."""
        out = []
        for i in (0, 2):
            count = after[i + 1] - before[i + 1]
            out.append((after[i] - before[i]) / count * 1e3 if count else float("nan"))
        return out[0], out[1]


def _samples(metrics_text: str) -> int:
    return sum(1 for line in metrics_text.splitlines() if line and not line.startswith("#"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short smoke run (figures noisy)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench-run",
        help="working directory (results.md, results.json, logs)",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    work = args.out / "work"
    # Only the directory this benchmark creates is removed; bundles and logs of the last run.
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    signal.signal(signal.SIGINT, _on_sigint)
    started = time.monotonic()
    bench = Bench(plan, work)
    bench.report.machine = machine_info()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in bench.report.machine.items()))
    try:
        bench.section("models and bundles", bench.prepare)
        if bench.models:
            bench.section("in-process onnxruntime", bench.in_process)
            bench.section("serving: echo, onnxruntime and the agent, side by side", bench.serving)
            bench.section("start-up and memory", bench.startup)
            bench.section("swaps under load", bench.swaps)
    except KeyboardInterrupt:
        # Every process was stopped on the way out of its section.
        print("\ninterrupted; partial results follow", flush=True)
        bench.report.errors.append("interrupted")
    bench.report.machine["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    bench.report.machine["runtime_s"] = f"{time.monotonic() - started:.0f}"

    print("\n" + bench.report.text_table())
    missed = [r.what for r in bench.report.rows if r.verdict == "MISS"]
    print(
        f"\ntargets: {sum(r.verdict == 'PASS' for r in bench.report.rows)} PASS, "
        f"{len(missed)} MISS; errors: {len(bench.report.errors)}; "
        f"runtime {bench.report.machine['runtime_s']} s"
    )
    bench.report.save(args.out)
    print(f"results: {args.out / 'results.md'}, {args.out / 'results.json'}")
    # A missed target is a finding, not a failure; only a broken benchmark fails the run.
    if _interrupted.is_set():
        return 130
    return 1 if bench.report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
