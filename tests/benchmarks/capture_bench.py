"""Inference capture cost: ``.venv/bin/python -m tests.benchmarks.capture_bench`` (about a
minute; ``BENCH=capture make bench``).

Two standalone agents serve the same model (an MLP, 64 inputs, 8 outputs): one with capture
off, one capturing 10% of the requests (``modelfleet-agent capture m --rate 10``) to Parquet
files. Each figure beside its baseline from the same run:

- concurrency 1: blocks of sequential requests alternating between the two agents; p50 and
  throughput (1 / mean latency);
- concurrency 16: closed loop, rounds alternating between the agents; p50 and throughput.

Target (issue 16): p50 and throughput within 5% of capture off. Beside them, measured in process
so that load on a shared machine barely moves them: the cost of ``Capture.offer`` on the serving
path at 10%, and the CPU per captured row, writer thread included. Missed targets print MISS;
the exit status is 0 unless something fails to run.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from modelfleet.kernel.bundle import create_bundle
from tests import models
from tests.benchmarks.load import (
    Target,
    Throughput,
    interleaved_sequential,
    percentile_ms,
    run_concurrent,
)
from tests.benchmarks.report import Report, Row
from tests.procs import AgentProcess

WIDTH = 64
RATE_PCT = 10
C1_REQUESTS = 3000
C16_ROUNDS = 3
C16_SECONDS = 4.0
MAX_COST = 1.05


def build_repo(root: Path) -> Path:
    repo = root / "repo"
    samples = {"x": np.random.default_rng(7).standard_normal((4, WIDTH)).astype(np.float32)}
    model = models.mlp(root / "src" / "m.onnx", inputs=WIDTH, hidden=64, layers=2, outputs=8)
    create_bundle(model, name="m", version=1, samples=samples, out_dir=repo)
    return repo


def start(repo: Path, data: Path, log: Path) -> AgentProcess:
    agent = AgentProcess(
        repo,
        "--intra-op-threads",
        "1",
        "--serving-threads",
        "2",
        log_path=log,
        env={"MODELFLEET_AGENT_DATA": str(data)},
    )
    agent.start()
    try:
        agent.wait_model("m", "1", timeout=60)
    except BaseException:
        agent.stop()
        raise
    return agent


def captured(agent: AgentProcess) -> tuple[int, int]:
    text = agent.metrics()
    out = []
    for outcome in ("captured", "dropped"):
        m = re.search(
            rf'modelfleet_capture_requests_total\{{model="m",outcome="{outcome}"\}} (\S+)', text
        )
        out.append(int(float(m.group(1))) if m else 0)
    return out[0], out[1]


def _ratio_row(report: Report, what: str, on: float, off: float, unit: str, higher: bool) -> None:
    ratio = on / off if off else float("nan")
    ok = ratio >= 1 / MAX_COST if higher else ratio <= MAX_COST
    target = f">= {1 / MAX_COST:.3f}x" if higher else f"<= {MAX_COST}x"
    row = Row("capture cost", what, f"{on:.3f} {unit}", f"{off:.3f} {unit}", ratio, target)
    report.check(row, ok)


def capture_cost(report: Report, root: Path) -> None:
    repo = build_repo(root)
    x = np.random.default_rng(0).standard_normal((1, WIDTH)).astype(np.float32)
    off = start(repo, root / "off-data", root / "off.log")
    on = start(repo, root / "on-data", root / "on.log")
    try:
        r = on.cli("capture", "m", "--rate", str(RATE_PCT))
        if r.returncode != 0:
            raise RuntimeError(f"capture failed: {r.stderr}")
        t_off, t_on = Target("off", off.url, "m"), Target("on", on.url, "m")
        lat = interleaved_sequential([t_off, t_on], x, requests=C1_REQUESTS)
        a, b = percentile_ms(lat["off"], 50), percentile_ms(lat["on"], 50)
        _ratio_row(report, f"p50, concurrency 1, {RATE_PCT}% captured", b, a, "ms", False)
        tput_off = 1e9 / float(np.mean(lat["off"]))
        tput_on = 1e9 / float(np.mean(lat["on"]))
        _ratio_row(report, "throughput, concurrency 1", tput_on, tput_off, "req/s", True)
        blocks: dict[str, list] = {"off": [], "on": []}
        for _ in range(C16_ROUNDS):
            for label, agent in (("off", off), ("on", on)):
                t = Target(label, agent.url, "m")
                blocks[label].append(
                    run_concurrent(
                        t, x, threads=16, duration_s=C16_SECONDS, server_pid=agent.proc.pid
                    )
                )
        lats = {k: np.concatenate([b.latencies for b in v]) for k, v in blocks.items()}
        a, b = percentile_ms(lats["off"], 50), percentile_ms(lats["on"], 50)
        _ratio_row(report, f"p50, concurrency 16, {RATE_PCT}% captured", b, a, "ms", False)
        rps = {k: Throughput.of(v).rps for k, v in blocks.items()}
        _ratio_row(report, "throughput, concurrency 16", rps["on"], rps["off"], "req/s", True)
        got, dropped = captured(on)
        report.add(
            Row(
                "capture cost",
                "requests captured / dropped (queue full)",
                f"{got} / {dropped}",
                note="files under the agent's data folder, capture/m/",
            )
        )
    finally:
        off.stop()
        on.stop()


def capture_cpu(report: Report, root: Path) -> None:
    """In process, so load on the machine barely matters: what a request costs the serving
    path (``offer``), and the CPU per captured row, writer thread included."""
    import time

    from modelfleet.agent.metrics import AgentMetrics
    from modelfleet.agent.serving.capture import Capture, CaptureLimits, CaptureRule

    cap = Capture(CaptureLimits(root / "cpu", queue_max=100_000), AgentMetrics(), root)
    x = {"x": np.random.default_rng(0).random((1, WIDTH), dtype=np.float32)}
    y = {"y": np.random.default_rng(1).random((1, 8), dtype=np.float32)}
    cap.set_rule("m", CaptureRule(RATE_PCT * 100))
    n = 100_000
    t = time.perf_counter()
    for _ in range(n):
        cap.offer("r", "m", 1, "active", x, y)
    per_offer = (time.perf_counter() - t) / n * 1e6
    cap.set_rule("m", CaptureRule(10_000))
    n = 20_000
    c0 = time.process_time()
    for i in range(n):
        cap.offer(f"r{i}", "m", 1, "active", x, y)
    cap.close()
    per_row = (time.process_time() - c0) / n * 1e6
    report.add(
        Row("capture cost", f"offer() on the serving path, {RATE_PCT}% rate", f"{per_offer:.2f} us")
    )
    report.add(
        Row(
            "capture cost",
            "CPU per captured row (offer + writer thread)",
            f"{per_row:.1f} us",
            note=f"{WIDTH} float inputs, 8 outputs",
        )
    )


def main() -> int:
    report = Report()
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)", flush=True)
    with tempfile.TemporaryDirectory(prefix="mf-capture-bench-") as tmp:
        for name, fn in (("capture cpu", capture_cpu), ("capture cost", capture_cost)):
            print(f"== {name}", flush=True)
            try:
                fn(report, Path(tmp))
            except Exception as exc:
                report.errors.append(f"{name}: {exc}")
                print(f"  ERROR: {exc}", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    print()
    print(report.text_table())
    for e in report.errors:
        print(f"ERROR {e}")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
