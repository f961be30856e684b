"""Traffic split and shadow benchmark: ``.venv/bin/python -m tests.benchmarks.traffic_bench``
(about 2 minutes; ``BENCH=traffic make bench``).

Figures, each beside the baseline measured in the same run:

1. **Shadow cost.** Two standalone agents serve the same model (an MLP, v2 with other weights
   but the same cost as v1): one with no comparison, one copying 100% of v2's requests to v1
   (``modelfleet-agent compare --shadow 100``). Primary latency p50 and p99 through tritonclient
   at concurrency 1 (blocks of requests alternating between the two agents, so noise from a
   neighbour hits both alike) and at concurrency 16 (closed loop, rounds alternating). Target:
   shadow on <= 1.1x shadow off at concurrency 1. On two shared cores the shadow's work takes
   CPU the primary would otherwise have at concurrency 16; that ratio is printed, not targeted.
2. **A shadow 10x slower than the primary.** One agent, its candidate a much heavier model with
   the same signature (``tests.models.slow_mlp``: 96 layers of 1024 x 1024 sharing one
   weight); concurrency 16 with the shadow off, then on (alternating rounds). Target:
   no failed primary request; the copies the shadow cannot keep up with are dropped (counted in
   ``status``) instead.
3. **Split accuracy and stickiness**, over 100,000 requests each through the data plane in
   process (real slots, real onnxruntime sessions; the gRPC edge only parses the key): the
   observed share of unkeyed requests at 5% and 25%, and of keyed requests (20,000 keys, five
   requests each) at 50% sticky. Target: within 1 percentage point of the configured share,
   and every key always reaches one version.

With ``--baseline-python PY`` (another checkout's ``.venv/bin/python``, e.g. main's), the shadow
cost section starts a third agent running that checkout's code, also shadowing 100%, in the same
alternation: its primary latency and its shadow threads' CPU per compared copy print beside this
code's, so a change to the shadow path is measured before and after under the same neighbours.
``--only shadow,slow,split`` runs a subset of the sections.

Missed targets print MISS; the exit status is 0 unless something fails to run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.serving.dataplane import DataPlane, InferInput, InferRequest
from modelfleet.agent.serving.routing import Comparison
from modelfleet.agent.serving.shadow import SHADOW_NICE
from modelfleet.agent.slots import BatchingConfig, SlotManager
from modelfleet.kernel.bundle import create_bundle
from modelfleet.kernel.runtime import RuntimeOptions
from tests import models
from tests.benchmarks.load import (
    Target,
    interleaved_sequential,
    percentile_ms,
    run_concurrent,
)
from tests.benchmarks.report import Report, Row
from tests.procs import AgentProcess

WIDTH = 64
C1_REQUESTS = 3000
C16_ROUNDS = 3
C16_SECONDS = 4.0
SHADOW_C1_MAX = 1.1
SPLIT_REQUESTS = 100_000
SPLIT_KEYS = 20_000
SPLIT_TOLERANCE_PP = 1.0


def build_repo(root: Path, slow_candidate: bool) -> Path:
    repo = root / ("slow" if slow_candidate else "same") / "repo"
    samples = {"x": np.random.default_rng(7).standard_normal((4, WIDTH)).astype(np.float32)}
    src = repo.parent / "src"
    # v1 is the candidate (compared against the active v2, the highest version).
    if slow_candidate:
        v1 = models.slow_mlp(src / "v1.onnx", inputs=WIDTH, outputs=8, width=1024, repeats=96)
    else:
        v1 = models.mlp(src / "v1.onnx", inputs=WIDTH, hidden=64, layers=2, outputs=8, seed=1)
    v2 = models.mlp(src / "v2.onnx", inputs=WIDTH, hidden=64, layers=2, outputs=8, seed=2)
    for version, path in ((1, v1), (2, v2)):
        create_bundle(
            path,
            name="m",
            version=version,
            samples=samples,
            out_dir=repo,
            latency_budget_ms=10_000,
        )
    return repo


def start(repo: Path, log: Path, python: str = "") -> AgentProcess:
    # Two serving threads, one shadow worker, single-threaded sessions: what a small edge box
    # with two cores would run.
    agent = AgentProcess(repo, "--intra-op-threads", "1", "--serving-threads", "2", log_path=log)
    if python:
        agent.args[0] = python
    agent.start()
    try:
        agent.wait_model("m", "2", timeout=60)
    except BaseException:
        agent.stop()
        raise
    return agent


def compare(agent: AgentProcess, *args: str) -> None:
    r = agent.cli("compare", "m", *args)
    if r.returncode != 0:
        raise RuntimeError(f"compare {args} failed: {r.stderr}")


def shadow_counts(agent: AgentProcess) -> dict:
    r = agent.cli("status", "--json")
    (m,) = [m for m in json.loads(r.stdout)["models"] if m["name"] == "m"]
    return m.get("comparison") or {}


def shadow_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of the agent's shadow threads, from /proc. CPython 3.11 does
    not name OS threads; the shadow threads are the ones at nice SHADOW_NICE (capture's writer,
    the only other niced thread, is off here)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            # Fields after the parenthesised name, from state (field 3): utime 14, stime 15,
            # nice 19.
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        if int(fields[16]) == SHADOW_NICE:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def shadow_cost(report: Report, root: Path, baseline_python: str = "") -> None:
    repo = build_repo(root, slow_candidate=False)
    x = np.random.default_rng(0).standard_normal((1, WIDTH)).astype(np.float32)
    agents: dict[str, AgentProcess] = {}
    try:
        agents["off"] = start(repo, root / "off.log")
        agents["on"] = on = start(repo, root / "on.log")
        if baseline_python:
            agents["baseline on"] = start(repo, root / "baseline.log", baseline_python)
        for label, agent in agents.items():
            if label != "off":
                compare(agent, "--candidate", "1", "--shadow", "100")
        lat = interleaved_sequential(
            [Target(label, a.url, "m") for label, a in agents.items()], x, requests=C1_REQUESTS
        )
        for q, name in ((50, "p50"), (99, "p99")):
            a, b = percentile_ms(lat["off"], q), percentile_ms(lat["on"], q)
            row = Row(
                "shadow cost",
                f"primary {name}, concurrency 1, 100% shadow",
                f"{b:.3f} ms",
                f"{a:.3f} ms (shadow off)",
                b / a,
                f"<= {SHADOW_C1_MAX}x" if name == "p50" else "",
            )
            if name == "p50":
                report.check(row, b / a <= SHADOW_C1_MAX)
            else:
                report.add(row)
            if baseline_python:
                c = percentile_ms(lat["baseline on"], q)
                report.add(
                    Row(
                        "shadow cost",
                        f"primary {name}, concurrency 1, 100% shadow, baseline code",
                        f"{c:.3f} ms",
                        f"{a:.3f} ms (shadow off)",
                        c / a,
                        note=f"this code: {b / a:.2f}x in the same alternation",
                    )
                )
        blocks: dict[str, list] = {label: [] for label in agents}
        for _ in range(C16_ROUNDS):
            for label, agent in agents.items():
                t = Target(label, agent.url, "m")
                blocks[label].append(
                    run_concurrent(
                        t, x, threads=16, duration_s=C16_SECONDS, server_pid=agent.proc.pid
                    )
                )
        lats = {k: np.concatenate([b.latencies for b in v]) for k, v in blocks.items()}
        failed = sum(b.failed for b in blocks["on"])
        for q, name in ((50, "p50"), (99, "p99")):
            a, b = percentile_ms(lats["off"], q), percentile_ms(lats["on"], q)
            report.add(
                Row(
                    "shadow cost",
                    f"primary {name}, concurrency 16, 100% shadow",
                    f"{b:.3f} ms",
                    f"{a:.3f} ms (shadow off)",
                    b / a,
                    note="two shared cores: the shadow's compute competes with the primary's",
                )
            )
            if baseline_python:
                c = percentile_ms(lats["baseline on"], q)
                report.add(
                    Row(
                        "shadow cost",
                        f"primary {name}, concurrency 16, 100% shadow, baseline code",
                        f"{c:.3f} ms",
                        f"{a:.3f} ms (shadow off)",
                        c / a,
                        note=f"this code: {b / a:.2f}x in the same rounds",
                    )
                )
        per_copy = {}
        for label, agent in agents.items():
            if label != "off":
                done = int(shadow_counts(agent).get("shadow_compared", 0))
                assert agent.proc is not None
                per_copy[label] = shadow_cpu_s(agent.proc.pid) / max(done, 1) * 1e6
        report.add(
            Row(
                "shadow cost",
                "shadow threads' CPU per compared copy (run, compare, count)",
                f"{per_copy['on']:.1f} us",
                f"{per_copy['baseline on']:.1f} us (baseline code)" if baseline_python else "",
                per_copy["on"] / per_copy["baseline on"] if per_copy.get("baseline on") else None,
                note="from /proc, over both concurrencies",
            )
        )
        counts = shadow_counts(on)
        report.check(
            Row(
                "shadow cost",
                "failed primary requests with 100% shadow",
                str(failed),
                target="0",
                note=f"shadow compared {counts.get('shadow_compared', 0)}, "
                f"dropped {counts.get('shadow_dropped', 0)}",
            ),
            failed == 0,
        )
    finally:
        for agent in agents.values():
            agent.stop()


def slow_shadow(report: Report, root: Path) -> None:
    repo = build_repo(root, slow_candidate=True)
    x = np.random.default_rng(0).standard_normal((1, WIDTH)).astype(np.float32)
    agent = start(repo, root / "slow.log")
    try:
        # How much slower the candidate is, measured on the agent (explicit version requests).
        t = Target("m", agent.url, "m")
        lat_v2 = interleaved_sequential([t], x, requests=300, warmup=50)["m"]
        compare(agent, "--candidate", "1", "--split", "100")
        lat_v1 = interleaved_sequential([t], x, requests=100, warmup=20)["m"]
        slower = percentile_ms(lat_v1, 50) / percentile_ms(lat_v2, 50)
        blocks: dict[str, list] = {"off": [], "on": []}
        for _ in range(C16_ROUNDS):
            for label in ("off", "on"):
                if label == "on":
                    compare(agent, "--candidate", "1", "--shadow", "100")
                else:
                    compare(agent, "--off")
                blocks[label].append(
                    run_concurrent(
                        t, x, threads=16, duration_s=C16_SECONDS, server_pid=agent.proc.pid
                    )
                )
        compare(agent, "--candidate", "1", "--shadow", "100")
        counts = shadow_counts(agent)
        failed = sum(b.failed for b in blocks["on"])
        served = sum(b.completed for b in blocks["on"])
        lats = {k: np.concatenate([b.latencies for b in v]) for k, v in blocks.items()}
        dropped = int(counts.get("shadow_dropped", 0))
        for q, name in ((50, "p50"), (99, "p99")):
            a, b = percentile_ms(lats["off"], q), percentile_ms(lats["on"], q)
            report.add(
                Row(
                    "slow shadow",
                    f"primary {name}, concurrency 16, shadow {slower:.0f}x slower",
                    f"{b:.3f} ms",
                    f"{a:.3f} ms (shadow off)",
                    b / a,
                )
            )
        report.check(
            Row(
                "slow shadow",
                f"failed primary requests (of {served}), shadow {slower:.0f}x slower",
                str(failed),
                target="0, drops instead",
                note=f"shadow compared {counts.get('shadow_compared', 0)}, dropped {dropped}",
            ),
            failed == 0 and dropped > 0 and slower >= 10,
        )
    finally:
        agent.stop()


def split_accuracy(report: Report, root: Path) -> None:
    repo = build_repo(root / "split", slow_candidate=False)
    x = np.random.default_rng(0).standard_normal((1, WIDTH)).astype(np.float32)

    async def main() -> None:
        metrics = AgentMetrics()
        slots = SlotManager(
            runtime=RuntimeOptions(1, 1, "cpu"),
            batching=BatchingConfig(enabled=False),
            metrics=metrics,
        )
        plane = DataPlane(slots, metrics)
        try:
            await slots.deploy(repo / "m" / "2")
            await slots.deploy(repo / "m" / "1", switch=False)

            async def run(keys: list[str]) -> list[str]:
                out = []
                for k in keys:
                    req = InferRequest("m", "", "", [InferInput("x", "FP32", (1, WIDTH), x)])
                    req.routing_key = k
                    out.append((await plane.infer(req)).model_version)
                return out

            for bp in (500, 2500):
                slots.set_comparison("m", Comparison(1, split_bp=bp))
                start = time.perf_counter()
                got = Counter(await run([""] * SPLIT_REQUESTS))
                rate = SPLIT_REQUESTS / (time.perf_counter() - start)
                share = got["1"] / SPLIT_REQUESTS * 100
                report.check(
                    Row(
                        "split",
                        f"candidate share of {SPLIT_REQUESTS:,} unkeyed requests",
                        f"{share:.2f}%",
                        f"{bp / 100:g}% configured",
                        share / (bp / 100),
                        f"within {SPLIT_TOLERANCE_PP:g} pp",
                        note=f"{rate:,.0f} req/s in process",
                    ),
                    abs(share - bp / 100) <= SPLIT_TOLERANCE_PP,
                )
            slots.set_comparison("m", Comparison(1, split_bp=5000, sticky=True))
            keys = [f"user-{i}" for i in range(SPLIT_KEYS)] * (SPLIT_REQUESTS // SPLIT_KEYS)
            random.Random(3).shuffle(keys)
            versions = await run(keys)
            per_key: dict[str, set[str]] = {}
            for k, v in zip(keys, versions, strict=True):
                per_key.setdefault(k, set()).add(v)
            moved = sum(1 for vs in per_key.values() if len(vs) > 1)
            share = versions.count("1") / len(versions) * 100
            report.check(
                Row(
                    "split",
                    f"sticky: candidate share of {len(keys):,} requests, {SPLIT_KEYS:,} keys",
                    f"{share:.2f}%",
                    "50% configured",
                    share / 50,
                    f"within {SPLIT_TOLERANCE_PP:g} pp",
                ),
                abs(share - 50) <= SPLIT_TOLERANCE_PP,
            )
            report.check(
                Row(
                    "split",
                    "sticky: keys that reached more than one version",
                    str(moved),
                    target="0",
                ),
                moved == 0,
            )
        finally:
            await plane.close()
            slots.close()

    asyncio.run(main())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--baseline-python",
        default="",
        help="interpreter of a baseline checkout: its agent shadows beside this code's",
    )
    parser.add_argument("--only", default="", help="sections to run: split,shadow,slow")
    args = parser.parse_args()
    report = Report()
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)", flush=True)
    sections: list[tuple[str, str, Callable[[Report, Path], None]]] = [
        ("split", "split accuracy and stickiness", split_accuracy),
        ("shadow", "shadow cost", lambda r, p: shadow_cost(r, p, args.baseline_python)),
        ("slow", "slow shadow", slow_shadow),
    ]
    wanted = set(args.only.split(",")) if args.only else {key for key, _, _ in sections}
    unknown = wanted - {key for key, _, _ in sections}
    if unknown:
        parser.error(f"--only: no section(s) {sorted(unknown)}; the sections are split,shadow,slow")
    with tempfile.TemporaryDirectory(prefix="mf-traffic-bench-") as tmp:
        root = Path(tmp)
        for key, name, fn in sections:
            if key not in wanted:
                continue
            print(f"== {name}", flush=True)
            try:
                fn(report, root)
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
