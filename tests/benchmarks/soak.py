"""``make soak``: a fleet agent under steady open-loop load for ten minutes, hot-swapped every 30 s,
with its hub restarted half-way. Not part of ``make test`` or ``make bench``.

1. A real hub (``modelfleet-hub serve``) and one real agent enrolled with it (``modelfleet-agent
   run``, fleet mode, default settings); v1 of a small MLP is published and deployed.
2. The agent's maximum throughput, measured closed-loop (tritonclient.grpc, as in ``make bench``)
   at a few concurrencies; the best one is the maximum.
3. For ``SOAK_SECONDS``: an open-loop load at ``SOAK_LOAD`` x that maximum (latency counted from
   each request's scheduled send time), while every ``SOAK_SWAP_EVERY_S`` the next version is
   published with the hub CLI and deployed (versions alternate between two models with the same
   signature and different weights, so every swap is a real one), and at the midpoint the hub is
   stopped with SIGTERM and started again on the same data directory and ports; the next swap
   waits until the agent's watch stream is back on the new hub (timed: its reconnect backoff is
   a figure of its own, not part of that swap's time). The agent's and
   the hub's RSS (``VmRSS``) and open file descriptors (``/proc/PID/fd``) are sampled all along,
   with the machine's load average.

Goals (a miss exits 1, so the run can gate): no failed request; every deployed version active on
the agent; the agent back on the restarted hub within 45 s; RSS and open descriptors of the
agent, and of each hub process, grow by less than 5% from the first minute to the last (medians
of each minute's samples). The p99 drift (last minute over first) is reported beside them
without a goal: on a shared machine it follows the neighbours more than the agent.

Environment: ``SOAK_SECONDS`` (600), ``SOAK_SWAP_EVERY_S`` (30), ``SOAK_PROBE_S`` (15: closed-loop
time of the throughput probe), ``SOAK_LOAD`` (0.8), ``SOAK_OUT`` (``bench-run/soak``: results.md,
results.json, samples.csv, and every process's log under ``work/``).

Run: ``make soak`` or ``.venv/bin/python -m tests.benchmarks.soak``.
"""

from __future__ import annotations

import csv
import os
import resource
import shutil
import signal
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modelfleet.protos import fleet_pb2 as pb
from tests import models
from tests.benchmarks.load import OpenLoad, Target, cpu_seconds, percentile_ms, run_concurrent
from tests.benchmarks.report import Report, Row
from tests.benchmarks.run import machine_info
from tests.procs import ROOT, AgentProcess, HubProcess, agent_status, enroll_agent, hub_admin

MODEL = "soak"
WIDTH_IN = 4
GROWTH_MAX = 0.05
PROBE_CONCURRENCY = (4, 8, 16)
# The gate's latency rule is not what is measured here: a busy shared machine must not turn a
# soak into a gate refusal (refusals are counted all the same, as swaps that did not happen).
LATENCY_BUDGET_MS = "1000"


@dataclass(frozen=True)
class Settings:
    seconds: float = 600.0
    swap_every_s: float = 30.0
    probe_s: float = 15.0
    load: float = 0.8
    out: Path = ROOT / "bench-run" / "soak"

    @property
    def window_s(self) -> float:
        """Length of the first and last windows compared: a minute, or a fifth of a short run."""
        return min(60.0, self.seconds / 5)

    @property
    def sample_every_s(self) -> float:
        return min(2.0, max(0.25, self.seconds / 40))

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str] = os.environ) -> Settings:
        def number(name: str, default: float, low: float, high: float) -> float:
            raw = env.get(name, "")
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise SystemExit(
                    f"{name}={raw!r} is not a number; unset it for {default:g}"
                ) from None
            if not low <= value <= high:
                raise SystemExit(f"{name}={raw} is out of range: use {low:g} to {high:g}")
            return value

        seconds = number("SOAK_SECONDS", cls.seconds, 10, 86400)
        return cls(
            seconds=seconds,
            swap_every_s=number("SOAK_SWAP_EVERY_S", cls.swap_every_s, 2, seconds),
            probe_s=number("SOAK_PROBE_S", cls.probe_s, 1.5, 600),
            load=number("SOAK_LOAD", cls.load, 0.05, 1.5),
            out=Path(env.get("SOAK_OUT") or cls.out),
        )


@dataclass
class Sample:
    t: float  # seconds since the soak's load began
    who: str  # "agent" or "hub"
    pid: int
    rss_mb: float
    fds: int
    threads: int


def proc_sample(pid: int) -> tuple[float, int, int]:
    """(VmRSS in MiB, open file descriptors, threads) of a live process, from /proc. A process
    that has exited but is not reaped yet (the hub being restarted) still has /proc/PID/status,
    with no VmRSS line and no descriptors: ValueError, as for one that is gone."""
    rss, threads = None, 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    if rss is None:
        raise ValueError(f"process {pid} has exited")
    return rss, len(os.listdir(f"/proc/{pid}/fd")), threads


@dataclass
class Swap:
    version: int
    due_s: float
    published_s: float = float("nan")  # since the load began
    deployed_s: float = float("nan")
    active_s: float = float("nan")  # when the agent first reported it active
    error: str = ""

    @property
    def lag_s(self) -> float:
        return self.active_s - self.deployed_s


@dataclass
class Restart:
    at_s: float = float("nan")
    stop_s: float = float("nan")  # SIGTERM -> exited
    ready_s: float = float("nan")  # start -> READY
    # READY -> the agent's watch stream back on the new hub (its reconnect backoff, with jitter)
    back_s: float = float("nan")
    back_error: str = ""
    old_pid: int = 0
    new_pid: int = 0


@dataclass
class Run:
    settings: Settings
    work: Path
    report: Report = field(default_factory=Report)
    samples: list[Sample] = field(default_factory=list)
    loadavg: list[tuple[float, float]] = field(default_factory=list)
    swaps: list[Swap] = field(default_factory=list)
    restart: Restart = field(default_factory=Restart)
    hub: HubProcess | None = None
    # Hubs stopped by the restart, kept so that stop() closes their log files too.
    stopped_hubs: list[HubProcess] = field(default_factory=list)
    agent: AgentProcess | None = None
    onnx: list[Path] = field(default_factory=list)
    max_rps: float = 0.0
    # CPU seconds over the soak: the agent's, and this process's (mostly the load generator).
    cpu: tuple[float, float] = (float("nan"), float("nan"))
    elapsed: float = float("nan")  # seconds from the load's start to its last answer
    began: float = 0.0  # time.monotonic() when the load began

    # -- set-up ---------------------------------------------------------------------------------

    def start_fleet(self) -> None:
        self.onnx = [
            models.mlp(self.work / "onnx" / f"{name}.onnx", inputs=WIDTH_IN, seed=seed)
            for name, seed in (("a", 1), ("b", 2))
        ]
        self.hub = HubProcess(self.work / "hub", log_path=self.work / "hub-1.log").start()
        config = enroll_agent(self.hub, self.work / "agent", "role=soak", hostname="soak-1")
        self.agent = AgentProcess(
            self.work / "agent", fleet_config=config, log_path=self.work / "agent.log"
        ).start()
        self.agent.wait_live(timeout=60)
        self.publish(1)
        self.deploy(1)
        self.wait_active(1, time.monotonic() + 120)
        assert self.hub.proc is not None and self.agent.proc is not None
        print(
            f"  hub {self.hub.url} (pid {self.hub.proc.pid}), agent {self.agent.url} "
            f"(pid {self.agent.proc.pid}): v1 active",
            flush=True,
        )

    def publish(self, version: int) -> None:
        assert self.hub is not None
        # The operator's path: the hub CLI builds the bundle, uploads it and the hub signs it.
        self.hub.cli(
            "publish",
            MODEL,
            str(self.onnx[(version - 1) % 2]),
            "--version",
            str(version),
            "--latency-budget-ms",
            LATENCY_BUDGET_MS,
        )

    def deploy(self, version: int) -> None:
        assert self.hub is not None
        # The admin RPC the CLI calls, on a fresh channel: the hub may have been restarted.
        stub = hub_admin(self.hub)
        stub.Deploy(pb.DeployRequest(name=MODEL, version=version), timeout=30)

    def active(self) -> int:
        assert self.agent is not None
        return int(agent_status(self.agent.admin_socket).get(MODEL, {}).get("active_version", 0))

    def wait_active(self, version: int, deadline: float) -> bool:
        while time.monotonic() < deadline:
            try:
                if self.active() == version:
                    return True
            except Exception:
                pass  # the admin socket is busy or restarting; ask again
            time.sleep(0.05)
        return False

    # -- the probe ------------------------------------------------------------------------------

    def probe(self) -> None:
        assert self.agent is not None and self.agent.proc is not None
        target = Target("agent", self.agent.url, MODEL)
        x = row()
        each = self.settings.probe_s / len(PROBE_CONCURRENCY)
        best = 0.0
        for c in PROBE_CONCURRENCY:
            b = run_concurrent(
                target,
                x,
                threads=c,
                warmup_s=min(1.0, each / 3),
                duration_s=each,
                server_pid=self.agent.proc.pid,
            )
            rps = b.completed / b.seconds
            best = max(best, rps)
            self.report.add(
                Row(
                    "probe",
                    f"closed loop, concurrency {c}",
                    f"{rps:,.0f} req/s",
                    note=f"p99 {percentile_ms(b.latencies, 99):.2f} ms, {b.failed} failed",
                )
            )
        self.max_rps = best
        self.report.add(
            Row(
                "probe",
                "maximum throughput",
                f"{best:,.0f} req/s",
                note=f"best of {len(PROBE_CONCURRENCY)} concurrencies, {each:.1f} s each",
            )
        )

    # -- the soak -------------------------------------------------------------------------------

    def soak(self) -> OpenLoad:
        s = self.settings
        assert self.agent is not None
        rate = s.load * self.max_rps
        print(
            f"  open loop at {rate:,.0f} req/s ({s.load:.0%} of {self.max_rps:,.0f}) for "
            f"{s.seconds:.0f} s; swap every {s.swap_every_s:g} s, hub restart at "
            f"{s.seconds / 2:.0f} s",
            flush=True,
        )
        load = OpenLoad(
            Target("agent", self.agent.url, MODEL), row(), rate=rate, duration_s=s.seconds
        )
        stop_sampling = threading.Event()
        sampler = threading.Thread(target=self._sample, args=(stop_sampling, load), daemon=True)
        assert self.agent.proc is not None
        pid = self.agent.proc.pid
        with load:
            self.began = time.monotonic() + (load.t0 - time.perf_counter_ns()) / 1e9
            cpu0 = (cpu_seconds(pid), own_cpu_seconds())
            sampler.start()
            try:
                self._events()
                load.wait(s.seconds + 60)
            finally:
                stop_sampling.set()
                sampler.join(10)
            self.cpu = (cpu_seconds(pid) - cpu0[0], own_cpu_seconds() - cpu0[1])
            self.elapsed = self._now()
        return load

    def _events(self) -> None:
        """Swaps at every interval and the restart at the midpoint, in time order, one at a time.

        An event that comes while the previous one still runs starts right after it; a swap
        waits at most until the next one is due for its version to become active.
        """
        s = self.settings
        half = s.seconds / 2
        dues = [s.swap_every_s * k for k in range(1, int(s.seconds / s.swap_every_s) + 1)]
        dues = [d for d in dues if d < s.seconds - 0.5]
        restarted = False
        for k, due in enumerate(dues):
            if not restarted and due >= half:
                self._sleep_until(half)
                self._restart_hub()
                restarted = True
            self._sleep_until(due)
            swap = Swap(version=k + 2, due_s=due)
            self.swaps.append(swap)
            following = dues[k + 1] if k + 1 < len(dues) else s.seconds
            try:
                self.publish(swap.version)
                swap.published_s = self._now()
                self.deploy(swap.version)
                swap.deployed_s = self._now()
                if self.wait_active(swap.version, self.began + max(following, self._now() + 5)):
                    swap.active_s = self._now()
                else:
                    swap.error = "not active before the next swap"
            except Exception as exc:
                swap.error = f"{type(exc).__name__}: {exc}"[:300]
            print(
                f"  {self._now():6.1f}s  v{swap.version}: "
                + (
                    f"active {swap.lag_s:.2f} s after deploy"
                    if not swap.error
                    else f"NOT swapped: {swap.error}"
                ),
                flush=True,
            )
        if not restarted:
            self._sleep_until(half)
            self._restart_hub()

    def _restart_hub(self) -> None:
        assert self.hub is not None and self.hub.proc is not None
        old = self.hub
        r = self.restart
        r.at_s, r.old_pid = self._now(), old.proc.pid
        t = time.monotonic()
        old.stop()
        r.stop_s = time.monotonic() - t
        new = HubProcess(old.data, log_path=self.work / "hub-2.log")
        new.port, new.enroll_port, new.url = old.port, old.enroll_port, old.url
        t = time.monotonic()
        self.hub = new.start()
        r.ready_s = time.monotonic() - t
        r.new_pid = new.proc.pid  # type: ignore[union-attr]
        print(
            f"  {self._now():6.1f}s  hub restarted: SIGTERM -> exit {r.stop_s:.2f} s, "
            f"start -> READY {r.ready_s:.2f} s (pid {r.old_pid} -> {r.new_pid})",
            flush=True,
        )
        self.stopped_hubs.append(old)
        self._wait_agent_back()

    # The agent's reconnect backoff is capped at 30 s by default (full jitter): wait that long and
    # some more for the network and a loaded machine before calling it lost.
    agent_back_within_s = 45.0

    def _wait_agent_back(self) -> None:
        """Waits for the agent's watch stream on the restarted hub, so that the swap after the
        restart measures the swap alone and the reconnect is a figure of its own."""
        assert self.hub is not None
        r = self.restart
        ready_wall, t = time.time(), time.monotonic()
        deadline = t + self.agent_back_within_s
        stub = hub_admin(self.hub)  # one channel: it reconnects on its own while the hub starts
        while time.monotonic() < deadline:
            try:
                agents = stub.ListAgents(pb.ListAgentsRequest(), timeout=5).agents
                if any(a.last_seen >= ready_wall for a in agents):
                    r.back_s = time.monotonic() - t
                    break
            except Exception:
                pass  # the new hub's admin socket is still coming up; ask again
            time.sleep(0.1)
        else:
            r.back_error = f"the agent was not back within {self.agent_back_within_s:g} s"
        back = f"back on the hub {r.back_s:.2f} s after READY"
        print(f"  {self._now():6.1f}s  agent {r.back_error or back}", flush=True)

    def _sample(self, stop: threading.Event, load: OpenLoad) -> None:
        every = self.settings.sample_every_s
        progress_every = max(5.0, self.settings.seconds / 20)
        next_progress = progress_every
        while True:
            t = self._now()
            if t >= next_progress:
                next_progress += progress_every
                self._progress(t, progress_every, load)
            for who, p in (("agent", self.agent), ("hub", self.hub)):
                pid = p.proc.pid if p is not None and p.proc is not None else 0
                try:
                    rss, fds, threads = proc_sample(pid)
                except (OSError, ValueError):
                    continue  # the hub between stop and start
                self.samples.append(Sample(t, who, pid, rss, fds, threads))
            self.loadavg.append((t, os.getloadavg()[0]))
            if stop.wait(every):
                return

    def _progress(self, t: float, span: float, load: OpenLoad) -> None:
        """One line on how the last ``span`` seconds went, for whoever watches a long run."""
        ns = 1_000_000_000
        # Requests due in the span that ended a second ago: most of them have been answered.
        idx = load.window(load.t0 + int((t - span - 1) * ns), load.t0 + int((t - 1) * ns))
        state = load.state[idx]
        lag = load.send_lag[idx][state != OpenLoad.UNSENT]
        agent = next((x for x in reversed(self.samples) if x.who == "agent"), None)
        print(
            f"  {t:6.1f}s  last {span:.0f} s: {np.count_nonzero(state == OpenLoad.OK):,} ok, "
            f"{np.count_nonzero(state == OpenLoad.FAILED)} failed, p99 "
            f"{percentile_ms(load.ok_latencies(idx), 99):.1f} ms, sender lag p99 "
            f"{float(np.percentile(lag, 99)) / 1e6 if lag.size else float('nan'):.1f} ms"
            + (f"; agent RSS {agent.rss_mb:.1f} MB, {agent.fds} fds" if agent else "")
            + f"; load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )

    def _now(self) -> float:
        return time.monotonic() - self.began

    def _sleep_until(self, at_s: float) -> None:
        delay = at_s - self._now()
        if delay > 0:
            time.sleep(delay)

    # -- figures --------------------------------------------------------------------------------

    def figures(self, load: OpenLoad) -> None:
        s, rep = self.settings, self.report
        c = load.counts()
        failed = c["failed"] + c["pending"]
        kinds = "; ".join(
            f"{n} x {k}" for k, n in sorted(load.error_kinds.items(), key=lambda kv: -kv[1])
        )
        first = load.first_errors[0] if load.first_errors else None
        rep.check(
            Row(
                "soak",
                "failed requests",
                str(failed),
                target="0",
                note=f"{c['ok']:,} answered of {c['ok'] + failed:,} sent"
                + (f"; {kinds}" if kinds else "")
                + (f"; first at {first[0] / load.rate:.1f} s: {first[1][:120]}" if first else ""),
            ),
            failed == 0,
        )
        sent = load.state != OpenLoad.UNSENT
        lag = load.send_lag[sent]
        lag99 = float(np.percentile(lag, 99)) / 1e6 if lag.size else float("nan")
        # The generator keeps at most its senders' worth of requests in flight: when the agent
        # answers more slowly than the schedule, the rest wait in the generator and leave late.
        # Those still waiting when the run ends were never offered, so the run did not hold
        # its load: a miss of the run itself (usually a machine busier than during the probe).
        rep.check(
            Row(
                "soak",
                "offered load held",
                f"{load.rate:,.0f} req/s",
                f"max {self.max_rps:,.0f} req/s",
                load.rate / self.max_rps,
                "all sent",
                note=f"answered {c['ok'] / self.elapsed:,.0f} req/s over "
                f"{self.elapsed:.0f} s"
                + (
                    f", {c['unsent']:,} of {c['scheduled']:,} never sent (the generator "
                    f"was {float(lag.max()) / 1e9:.0f} s behind)"
                    if c["unsent"]
                    else ""
                )
                + f"; sender lag p99 {lag99:.1f} ms; CPU per answered request: agent "
                f"{self.cpu[0] / max(c['ok'], 1) * 1e6:.0f} us, load generator "
                f"{self.cpu[1] / max(c['ok'], 1) * 1e6:.0f} us; agent "
                f"{self.cpu[0] / self.elapsed:.0%} of a core",
            ),
            c["unsent"] == 0,
        )

        ns = 1_000_000_000
        w = s.window_s
        first_idx = load.window(load.t0, load.t0 + int(w * ns))
        last_idx = load.window(load.t0 + int((s.seconds - w) * ns), load.t0 + int(s.seconds * ns))
        p_first = percentile_ms(load.ok_latencies(first_idx), 99)
        p_last = percentile_ms(load.ok_latencies(last_idx), 99)
        all_ok = load.ok_latencies()
        rep.add(
            Row(
                "soak",
                f"p99, last {w:.3g} s",
                f"{p_last:.2f} ms",
                f"first {w:.3g} s {p_first:.2f} ms",
                p_last / p_first if p_first else None,
                note=f"whole run p50 {percentile_ms(all_ok, 50):.2f} ms, p99 "
                f"{percentile_ms(all_ok, 99):.2f} ms, max "
                f"{float(all_ok.max()) / 1e6 if all_ok.size else float('nan'):.1f} ms; "
                "latency from each request's scheduled send time",
            )
        )
        r = self.restart
        if not np.isnan(r.at_s):
            near = load.window(load.t0 + int(r.at_s * ns), load.t0 + int((r.at_s + 10) * ns))
            rep.add(
                Row(
                    "soak",
                    "p99 in the 10 s from the hub's SIGTERM",
                    f"{percentile_ms(load.ok_latencies(near), 99):.2f} ms",
                    note=f"{int(np.count_nonzero(load.state[near] == OpenLoad.FAILED))} "
                    "failed in that window",
                )
            )

        done = [sw for sw in self.swaps if not sw.error]
        lags = [sw.lag_s for sw in done]
        served = np.unique(load.version[load.state == OpenLoad.OK])
        rep.check(
            Row(
                "swaps",
                "versions deployed and active on the agent",
                f"{len(done)} of {len(self.swaps)}",
                target="all",
                note=(
                    f"deploy -> active median {statistics.median(lags):.2f} s, max "
                    f"{max(lags):.2f} s; "
                    if lags
                    else ""
                )
                + f"versions answering clients: {len(served)}"
                + "".join(f"; v{sw.version}: {sw.error}" for sw in self.swaps if sw.error),
            ),
            bool(self.swaps) and len(done) == len(self.swaps),
        )
        # The swap due at the midpoint itself waits for the restart: it is the first after it.
        after = [sw for sw in self.swaps if sw.due_s >= s.seconds / 2]
        if not np.isnan(r.at_s):
            rep.check(
                Row(
                    "hub restart",
                    "SIGTERM -> exit, start -> READY",
                    f"{r.stop_s:.2f} s, {r.ready_s:.2f} s",
                    target="restarted",
                    note="first swap after it: "
                    + (
                        f"v{after[0].version} active {after[0].lag_s:.2f} s after deploy"
                        if after and not after[0].error
                        else (after[0].error if after else "none")
                    ),
                ),
                not np.isnan(r.ready_s),
            )
            rep.check(
                Row(
                    "hub restart",
                    "READY -> agent back on the hub",
                    f"{r.back_s:.2f} s" if not r.back_error else "not back",
                    target=f"< {self.agent_back_within_s:g} s",
                    note=r.back_error
                    or "the agent's watch stream reconnected (jittered backoff, capped at 30 s)",
                ),
                not r.back_error,
            )

        self._growth("agent", "agent", 0.0, s.seconds)
        if np.isnan(r.at_s):
            self._growth("hub", "hub", 0.0, s.seconds)
        else:
            # Two hub processes: each is compared with itself.
            self._growth("hub", "hub, before restart", 0.0, r.at_s)
            self._growth("hub", "hub, after restart", r.at_s + r.ready_s + r.stop_s, s.seconds)
        loads = [v for _, v in self.loadavg]
        if loads:
            rep.add(
                Row(
                    "machine",
                    "load average (1 min) during the soak",
                    f"mean {statistics.fmean(loads):.2f}, max {max(loads):.2f}",
                    note=f"{self.report.machine.get('nproc', '?')} cores",
                )
            )

    def _growth(self, who: str, label: str, t0: float, t1: float) -> None:
        """RSS and descriptors: median of the first window of [t0, t1) against the last one."""
        w = min(self.settings.window_s, (t1 - t0) / 3)
        mine = [x for x in self.samples if x.who == who and t0 <= x.t < t1]
        head = [x for x in mine if x.t < t0 + w]
        tail = [x for x in mine if x.t >= t1 - w]
        if not head or not tail:
            self.report.add(
                Row("memory", f"{label}: RSS and descriptors", "no samples", verdict="ERROR")
            )
            self.report.errors.append(f"{label}: no samples")
            return
        for what, unit, get in (
            ("RSS", "MB", lambda x: x.rss_mb),
            ("open file descriptors", "", lambda x: x.fds),
        ):
            a = statistics.median(get(x) for x in head)
            b = statistics.median(get(x) for x in tail)
            peak = max(get(x) for x in mine)

            def fmt(v: float, unit: str = unit) -> str:
                return f"{v:.1f} {unit}" if unit else f"{v:g}"

            threads = ""
            if unit:  # once, on the RSS row
                threads = (
                    f"; threads {statistics.median(x.threads for x in head):g} -> "
                    f"{statistics.median(x.threads for x in tail):g}"
                )
            self.report.check(
                Row(
                    "memory",
                    f"{label}: {what}, last {w:.3g} s",
                    fmt(b),
                    f"first {w:.3g} s {fmt(a)}",
                    b / a if a else None,
                    f"< +{GROWTH_MAX:.0%}",
                    note=f"peak {fmt(peak)}, {len(mine)} samples{threads}",
                ),
                b <= a * (1 + GROWTH_MAX),
            )

    def save_samples(self) -> None:
        path = self.settings.out / "samples.csv"
        with open(path, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["t_s", "process", "pid", "rss_mb", "fds", "threads"])
            for x in self.samples:
                out.writerow([f"{x.t:.2f}", x.who, x.pid, f"{x.rss_mb:.2f}", x.fds, x.threads])

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        for h in [*self.stopped_hubs, self.hub]:
            if h is not None:
                h.stop()


def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def row() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, WIDTH_IN)).astype(np.float32)


def exit_status(report: Report) -> int:
    """1 when a goal is missed or a part of the run failed, 0 otherwise: the soak is a gate."""
    if report.errors or any(r.verdict in ("MISS", "ERROR") for r in report.rows):
        return 1
    return 0


def main() -> int:
    settings = Settings.from_env()
    work = settings.out / "work"
    # Only the directory this benchmark creates is removed: bundles and logs of the last run.
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run = Run(settings, work)
    run.report.machine = machine_info()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in run.report.machine.items()), flush=True)
    started = time.monotonic()
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, so every process started is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        print("\n== hub, agent, v1", flush=True)
        run.start_fleet()
        print("\n== maximum throughput (closed loop)", flush=True)
        run.probe()
        print("\n== soak", flush=True)
        load = run.soak()
        run.report.machine["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print("\n== figures", flush=True)
        run.figures(load)
    except KeyboardInterrupt:
        run.report.errors.append("interrupted")
        print("\ninterrupted; partial results follow", flush=True)
    except Exception as exc:
        traceback.print_exc()
        run.report.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        run.stop()
    run.report.machine["runtime_s"] = f"{time.monotonic() - started:.0f}"
    if run.report.rows:
        print("\n" + run.report.text_table())
    settings.out.mkdir(parents=True, exist_ok=True)
    run.report.save(settings.out)
    run.save_samples()
    status = exit_status(run.report)
    missed = [r.what for r in run.report.rows if r.verdict in ("MISS", "ERROR")]
    print(
        f"\nsoak: {'PASS' if status == 0 else 'FAIL'}; goals missed: {missed or 'none'}; "
        f"errors: {run.report.errors or 'none'}; runtime {run.report.machine['runtime_s']} s; "
        f"load average at the end {run.report.machine.get('loadavg_end', '?')}"
    )
    print(f"results: {settings.out / 'results.md'}, {settings.out / 'samples.csv'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
