"""Drift benchmark: ``.venv/bin/python -m tests.benchmarks.drift_bench`` (~2 minutes).

Pure: no agent, no hub, no processes; kernel/drift.py and onnxruntime in this process.

1. **Cost per request** of ``DriftWindow.add`` (the request's input and output rows, what the
   agent will call per sampled request, binning amortised: a few hundred rows are binned at
   once) beside in-process onnxruntime ``Session.run`` of the same batch, at batch 1 and 16, on
   the agent bench's models (``small``: MLP 4-16-3; ``heavy``: 2048 wide, whose input and output
   are summarised because they are wider than 256) and on the issue's 32-feature MLP. Twice:
   every request added (sampling 1.0), and one in ten (the caller's sampler, ``random() < 0.1``,
   included in the cost). Both alternate for ``ROUNDS`` rounds and the best round of each counts
   (the reference machine is shared). Target: drift at the sampling the agent will default to
   (0.1) under 5% of the inference it rides on; the 1.0 figures are printed for honesty.
2. **Detection** on synthetic data: 32 features (24 normal with various means and scales, 4
   log-normal, 4 integer codes stored as floats), a reference of 100,000 rows, live traffic at
   100 requests/s of one row each, fed one second (100 rows) per ``add``, which gives the same
   counts as 100 one-row adds (binning is per row; part 1 measures the per-request cost).
   - A 0.5 standard-deviation mean shift on feature 0 starts at a random moment inside window 0;
     ``TRIALS`` trials per window length: the window in which PSI on feature 0 first exceeds
     ``PSI_ALERT`` (0.2), counted from window 0 (so "within two windows" is window 0 or 1).
   - 24 hours of unshifted traffic (8,640,000 rows, same generator, other seed): how many
     feature-windows exceed 0.2, and the largest PSI seen (the false alarm rate and its margin).
   Window lengths: 5 min (30,000 rows: the issue's figure), 1 min, 10 s, and 1 s (100 rows: where
   the sampling noise of a small window meets the threshold; 1 hour replayed, not 24).
3. **Serving cost in the agent** (issue 16: within 5% at concurrency 1 and 16, p50 and
   throughput). Three standalone agents serve one bundle with a reference (the 32-feature MLP,
   batch 1): drift off (``drift = false``), on with the defaults (sampling 1.0, at most
   ``drift_max_rows_per_s`` = 250 rows per second, 5-second windows so scoring runs too), and
   on for every request (no row cap). tritonclient at concurrency 1 (blocks alternating between
   the agents) and 16 (closed loop, rounds alternating); on vs off from the same run.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from modelfleet.kernel.drift import PSI_ALERT, DriftWindow, Reference, build_tensor_ref
from tests import models
from tests.benchmarks.fixtures import build_models
from tests.benchmarks.report import Report, Row

ROUNDS = 5
CALLS = 4000
SAMPLING = 0.1
TARGET_SHARE = 0.05
REFERENCE_ROWS = 100_000
FEATURES = 32
RATE = 100  # requests per second, one row each
SHIFT_SD = 0.5
TRIALS = 20
WINDOWS_S = (300, 60, 10, 1)
DAY_S = 86_400
SHORT_REPLAY_S = 3_600  # for 1 s windows: 3,600 windows are plenty to see the rate


# ---------------------------------------------------------------------------------------------
# 1. cost per request


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def cost(report: Report, figures: dict[str, Any]) -> None:
    sec = "drift cost"
    with tempfile.TemporaryDirectory(prefix="drift-bench-") as tmp_name:
        tmp = Path(tmp_name)
        bench = build_models(tmp)
        cases = [(m.name, m.onnx_path, m.width_in) for m in bench.values()]
        wide = models.mlp(tmp / "mlp32.onnx", inputs=FEATURES, hidden=64, outputs=1)
        cases.append(("mlp32", wide, FEATURES))
        rng = np.random.default_rng(0)
        for name, path, width in cases:
            session = _session(path)
            ref_x = rng.standard_normal((1000, width)).astype(np.float32)
            (ref_y,) = session.run(["y"], {"x": ref_x})
            reference = Reference(
                1000,
                (
                    build_tensor_ref("x", "input", ref_x, width=width),
                    build_tensor_ref("y", "output", ref_y, width=ref_y.shape[1]),
                ),
            )
            for batch in (1, 16):
                x = ref_x[:batch].copy()
                (y,) = session.run(["y"], {"x": x})
                window = DriftWindow(reference)
                calls = CALLS if name != "heavy" else CALLS // 8

                def infer(session=session, x=x) -> object:
                    return session.run(["y"], {"x": x})

                def drift_all(window=window, x=x, y=y) -> None:
                    window.add({"x": x, "y": y})

                def drift_sampled(window=window, x=x, y=y) -> None:
                    if random.random() < SAMPLING:
                        window.add({"x": x, "y": y})

                best = {"ort": 1e18, "all": 1e18, "sampled": 1e18}
                for _ in range(ROUNDS):
                    best["ort"] = min(best["ort"], _per_call_us(infer, calls))
                    best["all"] = min(best["all"], _per_call_us(drift_all, calls))
                    best["sampled"] = min(best["sampled"], _per_call_us(drift_sampled, calls))
                ort_us = best["ort"]
                label = f"{name}, batch {batch}"
                report.add(
                    Row(
                        sec,
                        f"{label}: drift every request",
                        f"{best['all']:.2f} us",
                        f"ORT {ort_us:.1f} us",
                        best["all"] / ort_us,
                    )
                )
                report.check(
                    Row(
                        sec,
                        f"{label}: drift at sampling {SAMPLING}",
                        f"{best['sampled']:.2f} us",
                        f"ORT {ort_us:.1f} us",
                        best["sampled"] / ort_us,
                        f"< {TARGET_SHARE:.0%} of ORT",
                    ),
                    best["sampled"] / ort_us < TARGET_SHARE,
                )
                figures.setdefault("cost_us", {})[label] = {
                    "ort": round(ort_us, 2),
                    "drift_all": round(best["all"], 2),
                    "drift_sampled": round(best["sampled"], 2),
                }


# ---------------------------------------------------------------------------------------------
# 2. detection and false alarms

_MEANS = np.linspace(-3, 3, 24)
_SCALES = np.linspace(0.2, 5, 24)


def synthetic(rng: np.random.Generator, rows: int, shift: float = 0.0) -> np.ndarray:
    """``rows`` rows of the 32 features; ``shift`` standard deviations added to feature 0."""
    out = np.empty((rows, FEATURES), dtype=np.float32)
    out[:, :24] = rng.standard_normal((rows, 24)) * _SCALES + _MEANS
    out[:, 24:28] = rng.lognormal(0.0, 0.75, (rows, 4))
    out[:, 28:] = rng.poisson(3.0, (rows, 4))
    out[:, 0] += shift * _SCALES[0]
    return out


def reference() -> Reference:
    data = synthetic(np.random.default_rng(1), REFERENCE_ROWS)
    return Reference(REFERENCE_ROWS, (build_tensor_ref("x", "input", data, width=FEATURES),))


def detect(ref: Reference, window_s: int, trial: int, max_windows: int = 6) -> int | None:
    """The window (0 = the one the shift starts in) whose PSI on feature 0 first exceeds the
    threshold; None if none of ``max_windows`` does."""
    rng = np.random.default_rng(1000 + trial * 7 + window_s)
    start = int(rng.integers(0, window_s))  # seconds into window 0 when the shift begins
    window = DriftWindow(ref)
    for w in range(max_windows):
        for second in range(window_s):
            t = w * window_s + second
            window.add({"x": synthetic(rng, RATE, SHIFT_SD if t >= start else 0.0)})
        scores = window.snapshot().scores(ref)
        if scores[0].psi > PSI_ALERT:
            return w
    return None


def replay(ref: Reference, seconds: int, windows_s: tuple[int, ...]) -> dict[int, dict[str, Any]]:
    """Unshifted traffic for ``seconds``; per window length: feature-windows over the
    threshold, windows with any feature over it, the largest PSI seen."""
    rng = np.random.default_rng(2)
    acc = {w: DriftWindow(ref, buffer_rows=4096) for w in windows_s}
    out: dict[int, dict[str, Any]] = {
        w: {"windows": 0, "feature_windows": 0, "flagged": 0, "windows_flagged": 0, "max_psi": 0.0}
        for w in windows_s
    }
    block_s = 300
    for block in range(0, seconds, block_s):
        rows = synthetic(rng, RATE * block_s)
        for second in range(block_s):
            t = block + second
            part = rows[second * RATE : (second + 1) * RATE]
            for w, window in acc.items():
                window.add({"x": part})
                if (t + 1) % w == 0:
                    scores = window.snapshot().scores(ref)
                    stats = out[w]
                    psis = [s.psi for s in scores]
                    stats["windows"] += 1
                    stats["feature_windows"] += len(psis)
                    over = sum(p > PSI_ALERT for p in psis)
                    stats["flagged"] += over
                    stats["windows_flagged"] += over > 0
                    stats["max_psi"] = max(stats["max_psi"], max(psis))
    return out


def detection(report: Report, figures: dict[str, Any]) -> None:
    sec = "drift detection"
    t0 = time.perf_counter()
    ref = reference()
    print(f"reference of {REFERENCE_ROWS:,} rows built in {time.perf_counter() - t0:.1f} s")
    for w in WINDOWS_S:
        found = [detect(ref, w, trial) for trial in range(TRIALS)]
        within_two = sum(1 for f in found if f is not None and f <= 1)
        figures.setdefault("detection", {})[f"{w}s"] = found
        row = Row(
            sec,
            f"shift 0.5 sd, {w} s windows ({w * RATE:,} rows): flagged within 2 windows",
            f"{within_two}/{TRIALS}",
            note=f"first flagged window per trial: {found}",
        )
        # The issue's figure is the 5-minute window; shorter ones show where the noise of a
        # small window starts to matter.
        if w == 300:
            row.target = "all trials"
            report.check(row, within_two == TRIALS)
        else:
            report.add(row)
    t0 = time.perf_counter()
    day = replay(ref, DAY_S, tuple(w for w in WINDOWS_S if w >= 10))
    short = replay(ref, SHORT_REPLAY_S, tuple(w for w in WINDOWS_S if w < 10))
    print(f"replays done in {time.perf_counter() - t0:.0f} s")
    for w, stats in sorted({**day, **short}.items(), reverse=True):
        hours = (DAY_S if w in day else SHORT_REPLAY_S) / 3600
        rate = stats["flagged"] / stats["feature_windows"]
        row = Row(
            sec,
            f"no shift, {hours:.0f} h replayed, {w} s windows: feature-windows over {PSI_ALERT}",
            f"{stats['flagged']} of {stats['feature_windows']:,} ({rate:.2%})",
            note=(
                f"windows with any feature flagged: {stats['windows_flagged']} of "
                f"{stats['windows']:,}; largest PSI {stats['max_psi']:.3f}"
            ),
        )
        figures.setdefault("false_alarms", {})[f"{w}s"] = {**stats, "hours": hours}
        if w >= 10:
            row.target = "none"
            report.check(row, stats["flagged"] == 0)
        else:
            report.add(row)


SERVE_C1_REQUESTS = 3000
# Short rounds, many of them, alternating: a neighbour's burst on the shared machine then hits
# every variant alike.
SERVE_C16_ROUNDS = 8
SERVE_C16_SECONDS = 2.0
SERVE_TARGET = 1.05


def serving(report: Report, figures: dict[str, Any]) -> None:
    """Part 3: drift on vs off in the agent, through the inference port."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from modelfleet.kernel.bundle import create_bundle
    from tests.benchmarks.load import Target, interleaved_sequential, percentile_ms, run_concurrent
    from tests.procs import AgentProcess

    sec = "drift serving cost"
    with tempfile.TemporaryDirectory(prefix="drift-serve-") as tmp_name:
        tmp = Path(tmp_name)
        rng = np.random.default_rng(4)
        onnx = models.mlp(tmp / "mlp32.onnx", inputs=FEATURES, hidden=64, outputs=1)
        ref_x = rng.standard_normal((2000, FEATURES)).astype(np.float32)
        ref = tmp / "ref.parquet"
        pq.write_table(pa.table({f"x[{i}]": ref_x[:, i] for i in range(FEATURES)}), ref)
        repo = tmp / "repo"
        create_bundle(
            onnx,
            name="m",
            version=1,
            samples={"x": ref_x[:4]},
            out_dir=repo,
            latency_budget_ms=10_000,
            reference=ref,
        )
        # Whether a model runs inline on the event loop (inline_max_us) moves CPU per request by
        # 20% and would hide what drift costs. The gate used to decide it from its p99, which
        # load moved between agents started a moment apart; it now uses the fastest gate run,
        # and the pin stays so that figures compare with the runs recorded before.
        same = {"MODELFLEET_AGENT_INLINE_MAX_US": "1000000"}
        variants = {
            "off": {**same, "MODELFLEET_AGENT_DRIFT": "false"},
            "on": {**same, "MODELFLEET_AGENT_DRIFT_WINDOW_S": "5"},
            "every": {
                **same,
                "MODELFLEET_AGENT_DRIFT_WINDOW_S": "5",
                "MODELFLEET_AGENT_DRIFT_MAX_ROWS_PER_S": "0",
            },
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
                    env=env,
                    log_path=tmp / f"{label}.log",
                )
                agents[label] = a
                a.start()
                a.wait_model("m", "1", timeout=60)
            x = rng.standard_normal((1, FEATURES)).astype(np.float32)
            targets = [Target(label, a.url, "m") for label, a in agents.items()]
            lat = interleaved_sequential(targets, x, requests=SERVE_C1_REQUESTS)
            base = percentile_ms(lat["off"], 50)
            figures["serving_c1_p50_ms"] = {k: percentile_ms(v, 50) for k, v in lat.items()}
            for label in ("on", "every"):
                p50 = percentile_ms(lat[label], 50)
                row = Row(
                    sec,
                    f"p50, concurrency 1, drift {label}",
                    f"{p50:.3f} ms",
                    f"{base:.3f} ms (off)",
                    p50 / base,
                    f"<= {SERVE_TARGET}x",
                )
                report.check(row, p50 / base <= SERVE_TARGET)
            blocks: dict[str, list] = {label: [] for label in agents}
            for _ in range(SERVE_C16_ROUNDS):
                for label, a in agents.items():
                    blocks[label].append(
                        run_concurrent(
                            Target(label, a.url, "m"),
                            x,
                            threads=16,
                            duration_s=SERVE_C16_SECONDS,
                            server_pid=a.proc.pid,
                        )
                    )
            rps = {
                k: sum(b.completed for b in v) / sum(b.seconds for b in v)
                for k, v in blocks.items()
            }
            p50s = {
                k: percentile_ms(np.concatenate([b.latencies for b in v]), 50)
                for k, v in blocks.items()
            }
            # The agent's own CPU time per request: what drift adds to the work, whatever the
            # neighbours do to latency and throughput.
            cpu_us = {
                k: 1e6 * sum(b.cpu_s or 0.0 for b in v) / max(sum(b.completed for b in v), 1)
                for k, v in blocks.items()
            }
            figures["serving_c16"] = {"rps": rps, "p50_ms": p50s, "cpu_us_per_request": cpu_us}
            figures["load_average"] = os.getloadavg()[0]
            for label in ("on", "every"):
                row = Row(
                    sec,
                    f"throughput, concurrency 16, drift {label}",
                    f"{rps[label]:.0f} req/s",
                    f"{rps['off']:.0f} req/s (off)",
                    rps[label] / rps["off"],
                    f">= {1 / SERVE_TARGET:.3f}x",
                )
                report.check(row, rps[label] / rps["off"] >= 1 / SERVE_TARGET)
                row = Row(
                    sec,
                    f"p50, concurrency 16, drift {label}",
                    f"{p50s[label]:.3f} ms",
                    f"{p50s['off']:.3f} ms (off)",
                    p50s[label] / p50s["off"],
                    f"<= {SERVE_TARGET}x",
                )
                report.check(row, p50s[label] / p50s["off"] <= SERVE_TARGET)
                report.add(
                    Row(
                        sec,
                        f"agent CPU per request, concurrency 16, drift {label}",
                        f"{cpu_us[label]:.1f} us",
                        f"{cpu_us['off']:.1f} us (off)",
                        cpu_us[label] / cpu_us["off"],
                        note="the least noisy figure on a shared machine",
                    )
                )
        finally:
            for a in agents.values():
                a.stop()


def main() -> dict[str, Any]:
    report = Report()
    figures: dict[str, Any] = {"psi_alert": PSI_ALERT, "sampling": SAMPLING}
    # DRIFT_PARTS=serving runs part 3 alone (a minute instead of four).
    parts = os.environ.get("DRIFT_PARTS", "cost,detection,serving").split(",")
    if "cost" in parts:
        cost(report, figures)
    if "detection" in parts:
        detection(report, figures)
    if "serving" in parts:
        serving(report, figures)
    print()
    print(report.text_table())
    return figures


if __name__ == "__main__":
    result = main()
    print(json.dumps(result, indent=2))
    sys.exit(0)
