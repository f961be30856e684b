"""Threading settings on a compute-bound model: which defaults win, measured with perf_analyzer.

``python -m tests.benchmarks.threads_bench [--rounds 3] [--window-ms 3000]`` (``BENCH=threads``).

The model is the issue's compute-bound MLP (512 -> 2048 -> 2048 -> 16, one row per request,
batch dimension free). One agent per setting runs at once on its own copy of the repository;
perf_analyzer (C++, so the client does not take Python's share of the two cores) measures
throughput at concurrency 16 and p50 at concurrency 1 against each in turn, round after round,
so a change in the machine's load falls on every setting alike. Figures are medians over the
rounds, and ratios are to the first setting (the agent's defaults), taken round by round.

Settings: the defaults, one intra-op thread, spinning off, both, and one intra-op thread with
as many serving threads as cores; each with the batcher on (the default) and, for the
defaults and the winner, off, which gives the batching gain.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from statistics import median

from tests import models
from tests.benchmarks.cpu_bench import PERF_ANALYZER, perf_analyzer_row
from tests.benchmarks.fixtures import BenchModel, make_bundle
from tests.procs import AgentProcess

NAME = "dense"
WIDTH_IN, HIDDEN, WIDTH_OUT, LAYERS = 512, 2048, 16, 2


def settings(cores: int) -> dict[str, list[str]]:
    return {
        "defaults": [],
        "intra 1": ["--intra-op-threads", "1"],
        "spinning off": ["--ort-spinning", "off"],
        "intra 1, spinning off": ["--intra-op-threads", "1", "--ort-spinning", "off"],
        f"intra 1, {cores} serving threads": [
            "--intra-op-threads",
            "1",
            "--serving-threads",
            str(cores),
        ],
    }


def measure(url: str, concurrency: int, window_ms: int, out: Path) -> tuple[float, float]:
    """(inferences per second, p50 ms) from three perf_analyzer windows."""
    # Three windows, whatever their spread: the rounds, not perf_analyzer's stability check,
    # absorb a shared machine's noise.
    window = ("-p", str(window_ms), "--max-trials", "3", "-s", "1000")
    row = perf_analyzer_row(url, NAME, f"x:{WIDTH_IN}", concurrency, out, *window)
    return float(row["Inferences/Second"]), int(row["p50 latency"]) / 1000.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-ms", type=int, default=3000)
    args = parser.parse_args(argv)
    if not PERF_ANALYZER.exists():
        print("perf_analyzer is missing: run `make perf-analyzer`", file=sys.stderr)
        return 1
    cores = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="threads-bench-"))
    agents: dict[str, AgentProcess] = {}
    try:
        onnx = models.mlp(
            work / "dense.onnx", inputs=WIDTH_IN, hidden=HIDDEN, outputs=WIDTH_OUT, layers=LAYERS
        )
        model = BenchModel(NAME, onnx, WIDTH_IN, WIDTH_OUT)
        base = work / "repo"
        base.mkdir()
        make_bundle(model, base)
        chosen = settings(cores)
        runs = {name: flags for name, flags in chosen.items()}
        runs["defaults, batching off"] = ["--batching", "off"]
        runs["intra 1, batching off"] = ["--intra-op-threads", "1", "--batching", "off"]
        for i, (name, flags) in enumerate(runs.items()):
            repo = work / f"repo-{i}"
            shutil.copytree(base, repo)
            agents[name] = AgentProcess(repo, *flags, log_path=work / f"agent-{i}.log")
        for a in agents.values():
            a.start()
        for a in agents.values():
            a.wait_model(NAME, timeout=120)
        print(f"{cores} cores; load average {os.getloadavg()[0]:.1f} at the start", flush=True)
        results: dict[str, list[tuple[float, float]]] = {n: [] for n in agents}
        for a in agents.values():  # warm-up
            measure(a.url, 16, 1000, work / "pa.csv")
        for rnd in range(args.rounds):
            for name, a in agents.items():
                c16, _ = measure(a.url, 16, args.window_ms, work / "pa.csv")
                _, p50 = measure(a.url, 1, args.window_ms, work / "pa.csv")
                results[name].append((c16, p50))
                print(
                    f"round {rnd + 1} {name:34s} c16 {c16:8.0f} inf/s   c1 p50 {p50:6.2f} ms",
                    flush=True,
                )
        print(
            f"\nload average {os.getloadavg()[0]:.1f} at the end; medians of {args.rounds} rounds"
        )
        print("| setting | c16 throughput | / defaults | c1 p50 | / defaults |")
        print("|---|---|---|---|---|")
        ref = results["defaults"]
        for name, rows in results.items():
            tput = [r[0] / d[0] for r, d in zip(rows, ref, strict=True)]
            lat = [r[1] / d[1] for r, d in zip(rows, ref, strict=True)]
            print(
                f"| {name} | {median(r[0] for r in rows):,.0f}/s | {median(tput):.2f}x "
                f"| {median(r[1] for r in rows):.2f} ms | {median(lat):.2f}x |"
            )
        for on, off in (
            ("defaults", "defaults, batching off"),
            ("intra 1", "intra 1, batching off"),
        ):
            gain = [a[0] / b[0] for a, b in zip(results[on], results[off], strict=True)]
            print(f"batching gain at c16, {on}: {median(gain):.2f}x")
    finally:
        for a in agents.values():
            a.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
