"""Serving cost of drift and capture together: ``.venv/bin/python -m
tests.benchmarks.monitoring_bench`` (about 90 s; ``BENCH=monitoring make bench``).

Issue 16's figure: "serving cost of drift + capture at 10% sampling, concurrency 1 and 16, same
run: p50 and throughput within 5% of off". Four standalone agents serve one bundle with a
reference (MLP 32-64-1, batch 1, one row per request, 2 serving threads, single-threaded
sessions, pinned inline as in the drift suite so both take the same code path):

- **off**: ``drift = false``, no capture rule;
- **on**: drift with the defaults (every request offered, at most ``drift_max_rows_per_s`` rows
  binned per second) and 5-second windows so scoring runs during the run, and capture of 10% of
  the requests to Parquet (``modelfleet-agent capture m --rate 10``);
- **drift** and **capture**: each alone (informational: where the cost of "on" goes).

tritonclient at concurrency 1 (blocks of sequential requests alternating between them) and
16 (closed loop, short rounds alternating); p50 and throughput of on beside off from the same
run, and the agent's CPU per request (the steadiest figure on a shared machine). Missed targets
print MISS; the exit status is 0 unless something fails to run.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from tests import models
from tests.benchmarks.load import Target, interleaved_sequential, percentile_ms, run_concurrent
from tests.benchmarks.report import Report, Row
from tests.procs import AgentProcess

FEATURES = 32
RATE_PCT = 10
C1_REQUESTS = 3000
C16_ROUNDS = 8
C16_SECONDS = 2.0
TARGET = 1.05
SECTION = "drift + capture cost"


def build_repo(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from modelfleet.kernel.bundle import create_bundle

    rng = np.random.default_rng(4)
    onnx = models.mlp(root / "mlp32.onnx", inputs=FEATURES, hidden=64, outputs=1)
    ref_x = rng.standard_normal((2000, FEATURES)).astype(np.float32)
    ref = root / "ref.parquet"
    pq.write_table(pa.table({f"x[{i}]": ref_x[:, i] for i in range(FEATURES)}), ref)
    repo = root / "repo"
    create_bundle(
        onnx,
        name="m",
        version=1,
        samples={"x": ref_x[:4]},
        out_dir=repo,
        latency_budget_ms=10_000,
        reference=ref,
    )
    return repo


def _counter(text: str, metric: str, labels: str) -> float:
    m = re.search(rf"{metric}\{{{labels}\}} (\S+)", text)
    return float(m.group(1)) if m else 0.0


def _ratio_row(report: Report, what: str, on: float, off: float, unit: str, higher: bool) -> None:
    ratio = on / off if off else float("nan")
    ok = ratio >= 1 / TARGET if higher else ratio <= TARGET
    target = f">= {1 / TARGET:.3f}x" if higher else f"<= {TARGET}x"
    report.check(
        Row(SECTION, what, f"{on:.3f} {unit}", f"{off:.3f} {unit} (off)", ratio, target), ok
    )


def measure(report: Report, root: Path) -> None:
    repo = build_repo(root)
    same = {"MODELFLEET_AGENT_INLINE_MAX_US": "1000000"}
    # "drift" and "capture" alone say where the cost of "on" goes.
    variants = {
        "off": {**same, "MODELFLEET_AGENT_DRIFT": "false"},
        "on": {**same, "MODELFLEET_AGENT_DRIFT_WINDOW_S": "5"},
        "drift": {**same, "MODELFLEET_AGENT_DRIFT_WINDOW_S": "5"},
        "capture": {**same, "MODELFLEET_AGENT_DRIFT": "false"},
    }
    agents: dict[str, AgentProcess] = {}
    try:
        for label, env in variants.items():
            a = AgentProcess(
                repo,
                "--intra-op-threads",
                "1",
                "--serving-threads",
                "2",
                env={**env, "MODELFLEET_AGENT_DATA": str(root / f"{label}-data")},
                log_path=root / f"{label}.log",
            )
            agents[label] = a
            a.start()
            a.wait_model("m", "1", timeout=60)
        for label in ("on", "capture"):
            r = agents[label].cli("capture", "m", "--rate", str(RATE_PCT))
            if r.returncode != 0:
                raise RuntimeError(f"modelfleet-agent capture failed: {r.stderr}")
        x = np.random.default_rng(5).standard_normal((1, FEATURES)).astype(np.float32)
        targets = [Target(label, a.url, "m") for label, a in agents.items()]
        lat = interleaved_sequential(targets, x, requests=C1_REQUESTS)
        p50 = {k: percentile_ms(v, 50) for k, v in lat.items()}
        _ratio_row(report, "p50, concurrency 1", p50["on"], p50["off"], "ms", False)
        tput = {k: 1e9 / float(np.mean(v)) for k, v in lat.items()}
        _ratio_row(report, "throughput, concurrency 1", tput["on"], tput["off"], "req/s", True)
        # Throughput at concurrency 1 is 1 / mean latency: the tail says whether a miss is
        # stalls (a neighbour's, or scoring and rotation in the agent) or the median's cost.
        for q in (90, 99):
            report.add(
                Row(
                    SECTION,
                    f"p{q}, concurrency 1",
                    f"{percentile_ms(lat['on'], q):.3f} ms",
                    f"{percentile_ms(lat['off'], q):.3f} ms (off)",
                    percentile_ms(lat["on"], q) / percentile_ms(lat["off"], q),
                )
            )
        blocks: dict[str, list] = {label: [] for label in agents}
        for _ in range(C16_ROUNDS):
            for label, a in agents.items():
                blocks[label].append(
                    run_concurrent(
                        Target(label, a.url, "m"),
                        x,
                        threads=16,
                        duration_s=C16_SECONDS,
                        server_pid=a.proc.pid,
                    )
                )
        rps = {
            k: sum(b.completed for b in v) / sum(b.seconds for b in v) for k, v in blocks.items()
        }
        p50s = {
            k: percentile_ms(np.concatenate([b.latencies for b in v]), 50)
            for k, v in blocks.items()
        }
        cpu_us = {
            k: 1e6 * sum(b.cpu_s or 0.0 for b in v) / max(sum(b.completed for b in v), 1)
            for k, v in blocks.items()
        }
        _ratio_row(report, "p50, concurrency 16", p50s["on"], p50s["off"], "ms", False)
        _ratio_row(report, "throughput, concurrency 16", rps["on"], rps["off"], "req/s", True)
        for label in ("on", "drift", "capture"):
            report.add(
                Row(
                    SECTION,
                    f"agent CPU per request, concurrency 16, {label}",
                    f"{cpu_us[label]:.1f} us",
                    f"{cpu_us['off']:.1f} us (off)",
                    cpu_us[label] / cpu_us["off"],
                    note="the least noisy figure on a shared machine",
                )
            )
        for label in ("drift", "capture"):
            report.add(
                Row(
                    SECTION,
                    f"{label} alone: p50 c1 / p50 c16 / throughput c16, ratio to off",
                    f"{p50[label] / p50['off']:.2f}x / {p50s[label] / p50s['off']:.2f}x / "
                    f"{rps[label] / rps['off']:.2f}x",
                    note="where the cost of drift + capture goes",
                )
            )
        text = agents["on"].metrics()
        captured = _counter(
            text, "modelfleet_capture_requests_total", 'model="m",outcome="captured"'
        )
        dropped = _counter(text, "modelfleet_capture_requests_total", 'model="m",outcome="dropped"')
        windows = len(re.findall(r"^modelfleet_drift_psi\{", text, re.M))
        report.add(
            Row(
                SECTION,
                "on: requests captured / dropped; drift series on /metrics",
                f"{captured:.0f} / {dropped:.0f}; {windows}",
                note="proves both ran: capture files under on-data/capture/m",
            )
        )
        if captured == 0 or windows == 0:
            raise RuntimeError(f"drift or capture did not run: captured {captured}, {windows}")
    finally:
        for a in agents.values():
            a.stop()


def main() -> int:
    report = Report()
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)", flush=True)
    with tempfile.TemporaryDirectory(prefix="mf-monitoring-bench-") as tmp:
        try:
            measure(report, Path(tmp))
        except Exception as exc:
            report.errors.append(f"{SECTION}: {exc}")
            print(f"  ERROR: {exc}", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    print()
    print(report.text_table())
    for e in report.errors:
        print(f"ERROR {e}")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
