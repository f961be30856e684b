"""Agent CPU per request at concurrency 16, beside the echo server's, driven by perf_analyzer.

CPU time per request does not move much with other load on a shared machine, unlike
throughput: the process's utime + stime (/proc/PID/stat) over a fixed number of requests.
perf_analyzer (C++, `make perf-analyzer`) sends them, so the client takes little of the cores.
Targets take turns round by round. ``--baseline-ref REF`` adds a second agent serving the code
of git commit REF (its package folders extracted with ``git archive`` and put first on
PYTHONPATH, same interpreter and packages): before and after in the same run.

``MODELFLEET_PROFILE_LOOP=PATH`` (agent/cli.py) writes a cProfile of the agent's event loop
thread when it stops; ``--profile`` sets it for the agent under test, prints the top entries and
leaves the profile in ``bench-run/cpu-agent.prof``.

    python -m tests.benchmarks.cpu_bench [--rounds 3] [--requests 4000] [--baseline-ref main]
"""

from __future__ import annotations

import argparse
import csv
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

from tests.benchmarks.fixtures import SMALL, build_models, make_bundle
from tests.benchmarks.load import cpu_seconds
from tests.benchmarks.run import echo_running
from tests.procs import ROOT, AgentProcess

# The folders installed as modelfleet.* (pyproject.toml).
PACKAGES = ("agent", "kernel", "hub", "batch", "protos")
PERF_ANALYZER = Path(os.environ.get("PERF_ANALYZER", ROOT / ".venv" / "bin" / "perf_analyzer"))


def perf_analyzer_row(
    url: str, model: str, shape: str, concurrency: int, out: Path, *mode: str
) -> dict[str, str]:
    """One perf_analyzer run (gRPC, one row per request, ``--shape`` ``shape``) at
    ``concurrency``; ``mode`` picks how it measures. Its CSV row."""
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    r = subprocess.run(
        [
            str(PERF_ANALYZER),
            *("-i", "grpc", "-u", url, "-m", model, "--shape", shape, "-b", "1"),
            *("--concurrency-range", str(concurrency), *mode, "-f", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if r.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed against {url}:\n{r.stdout}\n{r.stderr}")
    return next(csv.DictReader(out.open()))


def drive(url: str, requests: int, concurrency: int, out: Path) -> float:
    """perf_analyzer sends ``requests`` one-row requests; their p50 in ms. (Its throughput is
    left out: with a request count it divides by whole seconds.)"""
    row = perf_analyzer_row(url, SMALL, "x:4", concurrency, out, "--request-count", str(requests))
    return int(row["p50 latency"]) / 1000.0


def extract_packages(ref: str, dest: Path) -> Path:
    """The agent's package folders at git commit ``ref`` under ``dest/modelfleet``; returns the
    folder to put first on PYTHONPATH (same interpreter and packages, that commit's code)."""
    code = dest / "modelfleet"
    code.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", ref, *PACKAGES], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
    return dest


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread ("name/tid") of a live process; onnxruntime's and Python's own
    threads all carry the interpreter's name, so the id tells them apart."""
    out: dict[str, float] = {}
    clk = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended
        fields = stat.rsplit(")", 1)[1].split()
        out[f"{name}/{task.name}"] = (int(fields[11]) + int(fields[12])) / clk
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--baseline-ref", help="git commit whose agent to compare against")
    parser.add_argument("--profile", action="store_true", help="cProfile the agent under test")
    parser.add_argument("--flags", default="", help="extra agent flags, space separated")
    parser.add_argument(
        "--baseline-flags", help="the baseline agent's extra flags (default: --flags)"
    )
    args = parser.parse_args(argv)
    if not PERF_ANALYZER.exists():
        print("perf_analyzer is missing: run `make perf-analyzer`", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="cpu-bench-"))
    try:
        models = build_models(work / "onnx")
        small = {SMALL: models[SMALL]}
        repo = work / "repo"
        repo.mkdir()
        make_bundle(models[SMALL], repo)
        prof = ROOT / "bench-run" / "cpu-agent.prof"
        prof.parent.mkdir(exist_ok=True)
        prof.unlink(missing_ok=True)
        agents: dict[str, AgentProcess] = {}
        flags = args.flags.split()
        env = {"MODELFLEET_PROFILE_LOOP": str(prof)} if args.profile else None
        agents["agent"] = AgentProcess(repo, *flags, log_path=work / "agent.log", env=env)
        if args.baseline_ref:
            base_env = {"PYTHONPATH": str(extract_packages(args.baseline_ref, work / "base-code"))}
            base_flags = flags if args.baseline_flags is None else args.baseline_flags.split()
            base = AgentProcess(repo, *base_flags, log_path=work / "base.log", env=base_env)
            # Its own admin socket: two agents on one repository is refused by design, so
            # the baseline reads a copy.
            base_repo = work / "repo-base"
            shutil.copytree(repo, base_repo)
            base.args[base.args.index(str(repo))] = str(base_repo)
            base.models = base_repo
            agents[f"agent at {args.baseline_ref}"] = base
        results: dict[str, list[tuple[float, float, float]]] = {}
        with echo_running(work, small) as (echo_url, echo_pid):
            try:
                for a in agents.values():
                    a.start()
                for a in agents.values():
                    a.wait_model(SMALL)
                targets = [("echo", echo_url, echo_pid)] + [
                    (n, a.url, a.proc.pid) for n, a in agents.items() if a.proc
                ]
                for t in targets:  # warm-up
                    drive(t[1], 500, args.concurrency, work / "pa.csv")
                for _ in range(args.rounds):
                    for name, url, pid in targets:
                        c0, t0 = cpu_seconds(pid), thread_cpu(pid)
                        p50 = drive(url, args.requests, args.concurrency, work / "pa.csv")
                        cpu_us = (cpu_seconds(pid) - c0) / args.requests * 1e6
                        t1 = thread_cpu(pid)
                        per_thread = {n: (t1[n] - t0.get(n, 0.0)) / args.requests * 1e6 for n in t1}
                        busy = sorted(per_thread.items(), key=lambda kv: -kv[1])[:4]
                        print("   " + ", ".join(f"{n} {us:.0f}" for n, us in busy), flush=True)
                        results.setdefault(name, []).append((cpu_us, p50))
                        print(
                            f"{name:17s} {cpu_us:6.0f} us CPU/req  p50 {p50:.3f} ms",
                            flush=True,
                        )
            finally:
                for a in agents.values():
                    a.stop()
        print(f"\nload average {os.getloadavg()[0]:.1f}; medians over {args.rounds} rounds:")
        print("| target | CPU per request | / echo's, same round | p50 at c16 |")
        echo_cpu = [r[0] for r in results["echo"]]
        for name, rows in results.items():
            ratios = [r[0] / e for r, e in zip(rows, echo_cpu, strict=True)]
            print(
                f"| {name} | {median([r[0] for r in rows]):.0f} us | {median(ratios):.2f}x "
                f"| {median([r[1] for r in rows]):.2f} ms |"
            )
        if args.profile and prof.exists():
            stats = pstats.Stats(str(prof))
            stats.sort_stats("tottime").print_stats(25)
            stats.sort_stats("cumulative").print_stats(40)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
