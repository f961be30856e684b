"""``make bench``: every benchmark suite, one after the other, each in its own process.

Each suite prints its figures beside the baseline it measured in the same run. Suites run
sequentially so they do not compete for the machine's cores. Select some with
``BENCH="agent batch"`` (names below).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.procs import ROOT

SUITES = {
    "agent": "tests.benchmarks.run",  # serving latency, batching, swaps, RSS, start-up
    "distribution": "tests.benchmarks.distribution_bench",  # 200 MB bundle to 1 and 8 agents
    "fanout": "tests.benchmarks.fanout_bench",  # MQTT fan-out to 100 and 1,000 agents
    "rollout": "tests.benchmarks.rollout_bench",  # telemetry ingestion, rollout decision time
    "batch": "tests.benchmarks.batch_bench",  # Parquet scoring vs raw onnxruntime / plain loop
    "traffic": "tests.benchmarks.traffic_bench",  # shadow cost, split accuracy and stickiness
    "drift": "tests.benchmarks.drift_bench",  # drift cost per request, detection, false alarms
    "judge": "tests.benchmarks.judge_bench",  # rollout judge vs ratio gates on a simulated fleet
    "capture": "tests.benchmarks.capture_bench",  # serving cost of 10% inference capture
    "http": "tests.benchmarks.http_bench",  # HTTP/REST p50 and throughput vs gRPC and an echo
    "shm": "tests.benchmarks.shm_bench",  # 1 MB / 16 MB tensors: gRPC raw, HTTP, system shm
    "gpu": "tests.benchmarks.gpu_bench",  # CUDA vs CPU serving (CPU part only without a GPU)
    "monitoring": "tests.benchmarks.monitoring_bench",  # drift + 10% capture vs both off
    "cpu": "tests.benchmarks.cpu_bench",  # agent CPU per request at c16 (perf_analyzer) vs echo
    "instr": "tests.benchmarks.instr_bench",  # instructions per request (callgrind) vs echo
    "threads": "tests.benchmarks.threads_bench",  # threading settings on a compute-bound model
    "mlserver": "tests.benchmarks.mlserver_bench",  # hot path vs MLServer 1.7.1 and the echo
    "workers": "tests.benchmarks.workers_bench",  # hot path with 1 and 2 serving processes
}


def main() -> int:
    chosen = os.environ.get("BENCH", "").split() or list(SUITES)
    unknown = [s for s in chosen if s not in SUITES]
    if unknown:
        print(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)}", file=sys.stderr)
        return 2
    failed = []
    for name in chosen:
        print(f"\n##### {name} ({SUITES[name]})", flush=True)
        start = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", SUITES[name]], cwd=ROOT)
        print(f"##### {name}: exit {rc} after {time.monotonic() - start:.0f}s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"suites that failed to run: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
