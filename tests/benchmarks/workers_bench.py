"""Serving workers: the hot path with 1, 2 (and more) serving processes, beside the echo server.

``python -m tests.benchmarks.workers_bench [--rounds 3] [--window-ms 2000] [--workers 1 2]``
(``BENCH=workers``).

The issue's measures, with perf_analyzer (C++, so the client takes little of the cores):
concurrency-1 p50 and concurrency-16 throughput on the small model, each agent beside the bare
Python gRPC echo in the same round; targets take turns round by round. perf_analyzer at
concurrency 16 opens several connections, and SO_REUSEPORT spreads connections (not requests)
over the processes, so the share each process got is printed too (from the agent's
``modelfleet_serving_process_requests_total``), with every process's resident memory.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from statistics import median

from tests.benchmarks.cpu_bench import PERF_ANALYZER, perf_analyzer_row
from tests.benchmarks.fixtures import SMALL, build_models, make_bundle
from tests.benchmarks.run import echo_running
from tests.benchmarks.servers import start_agent
from tests.procs import AgentProcess


def measure(url: str, concurrency: int, window_ms: int, out: Path) -> tuple[float, float]:
    """(inferences per second, p50 ms) over three perf_analyzer windows."""
    window = ("-p", str(window_ms), "--max-trials", "3", "-s", "1000")
    row = perf_analyzer_row(url, SMALL, "x:4", concurrency, out, *window)
    return float(row["Inferences/Second"]), int(row["p50 latency"]) / 1000.0


def shares(agent: AgentProcess) -> tuple[dict[str, float], dict[str, float]]:
    text = agent.metrics()
    requests = {
        p: float(v)
        for p, v in re.findall(
            r'^modelfleet_serving_process_requests_total\{process="(\d+)"\} (\S+)$', text, re.M
        )
    }
    rss = {
        p: float(v) / 2**20
        for p, v in re.findall(
            r'^modelfleet_serving_process_resident_bytes\{process="(\d+)"\} (\S+)$', text, re.M
        )
    }
    return requests, rss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-ms", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--intra-one",
        action="store_true",
        help="also each worker count with one onnxruntime intra-op thread per session",
    )
    args = parser.parse_args(argv)
    if not PERF_ANALYZER.exists():
        print("perf_analyzer is missing: run `make perf-analyzer`", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="workers-bench-"))
    models = build_models(work / "onnx")
    repo = work / "repo"
    make_bundle(models[SMALL], repo)
    results: dict[str, dict[str, list[float]]] = {}
    with ExitStack() as stack:
        echo_url, _ = stack.enter_context(echo_running(work, {SMALL: models[SMALL]}))
        agents: dict[str, AgentProcess] = {}
        configs = [(f"agent w{n}", n, []) for n in args.workers]
        if args.intra_one:
            configs += [(f"w{n} intra1", n, ["--intra-op-threads", "1"]) for n in args.workers]
        for label, n, extra in configs:
            agent, _ = start_agent(
                repo,
                [SMALL],
                "--serving-workers",
                str(n),
                "--poll-interval-s",
                "3600",
                *extra,
                log_path=work / f"{label.replace(' ', '-')}.log",
                timeout_s=180,
            )
            stack.callback(agent.stop)
            agents[label] = agent
        targets = {"echo": echo_url, **{label: a.url for label, a in agents.items()}}
        for name in targets:
            results[name] = {"c1 p50 ms": [], "c16 inf/s": []}
        for r in range(args.rounds):
            for name, url in targets.items():
                out = work / f"{name.replace(' ', '-')}-{r}.csv"
                _, p50 = measure(url, 1, args.window_ms, out)
                thr, _ = measure(url, 16, args.window_ms, out)
                results[name]["c1 p50 ms"].append(p50)
                results[name]["c16 inf/s"].append(thr)
                print(f"round {r + 1} {name:12s} c1 p50 {p50:.3f} ms  c16 {thr:8.0f} inf/s")
        print()
        echo = {k: median(v) for k, v in results["echo"].items()}
        print(f"{'target':12s} {'c1 p50 ms':>10s} {'x echo':>7s} {'c16 inf/s':>10s} {'x echo':>7s}")
        for name, figures in results.items():
            p50 = median(figures["c1 p50 ms"])
            thr = median(figures["c16 inf/s"])
            print(
                f"{name:12s} {p50:10.3f} {p50 / echo['c1 p50 ms']:7.2f} {thr:10.0f} "
                f"{thr / echo['c16 inf/s']:7.2f}"
            )
        print("\nper-ratio medians are of the medians; targets: c1 p50 <= 1.25x, c16 >= 0.8x")
        for label, agent in agents.items():
            requests, rss = shares(agent)
            if requests:
                total = sum(requests.values()) or 1.0
                parts = ", ".join(
                    f"process {p}: {100 * v / total:.0f}% of requests, {rss.get(p, 0):.0f} MiB"
                    for p, v in sorted(requests.items())
                )
                print(f"{label}: {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
