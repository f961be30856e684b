"""What tracing costs the request path (issue 16, item 7).

1. Concurrency 1, the bench's small model, four agents up at once and requests alternating
   between them in blocks (tests/benchmarks/load.py): a baseline agent run by another
   checkout's interpreter (``--baseline-python``, e.g. main's .venv/bin/python, whose editable
   install is that checkout's code), this code with tracing off, and this code with tracing on
   (every request sampled, spans exported to an in-process OTLP collector), and on with a
   sample ratio of 0 (what an unsampled request costs).
2. A micro-benchmark of what a disabled agent adds per request: the servicer's and the data
   plane's ``is None`` checks, and the extra dataclass fields (InferRequest.trace,
   Timing.started) against the same classes without them.

    python -m tests.benchmarks.tracing_bench --baseline-python /work/main/.venv/bin/python
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import timeit
from pathlib import Path
from typing import Any

import numpy as np

from modelfleet.agent.serving.batcher import Timing
from modelfleet.agent.serving.dataplane import InferRequest
from tests.benchmarks import fixtures
from tests.benchmarks.fixtures import SMALL
from tests.benchmarks.load import Target, interleaved_sequential
from tests.otlp_collector import Collector
from tests.procs import AgentProcess, wait_for


def _without(cls: type, name: str) -> type:
    """``cls`` as it was before tracing: the same dataclass less one field."""
    fields = [(f.name, f.type, f) for f in dataclasses.fields(cls) if f.name != name]
    return dataclasses.make_dataclass(cls.__name__ + "Before", fields)


def micro(number: int = 1_000_000) -> dict[str, float]:
    """ns per operation, best of 5; called as the serving path calls them (keywords)."""

    class Holder:
        tracing: Any = None

    holder = Holder()
    req = InferRequest("m", "", "", [])
    old_req, old_timing = _without(InferRequest, "trace"), _without(Timing, "started")

    def best(stmt: str, env: dict[str, Any]) -> float:
        return min(timeit.repeat(stmt, globals=env, number=number, repeat=5)) / number * 1e9

    env = {
        "h": holder,
        "r": req,
        "New": InferRequest,
        "Old": old_req,
        "T": Timing,
        "OT": old_timing,
    }
    return {
        "servicer check (self.tracing is None)": best("h.tracing is None", env),
        "data plane check (request.trace is not None)": best("r.trace is not None", env),
        "InferRequest with trace field": best("New('m', '', '', [])", env),
        "InferRequest before": best("Old('m', '', '', [])", env),
        "Timing with started": best(
            "T(queue_s=0.1, compute_s=0.2, batch_rows=1, started=0.3)", env
        ),
        "Timing before": best("OT(queue_s=0.1, compute_s=0.2, batch_rows=1)", env),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--baseline-python", default="", help="interpreter of the baseline (default: none)"
    )
    parser.add_argument("--requests", type=int, default=3000, help="per agent (default: 3000)")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated agents to run, of baseline, off, on, 0%% (default: all)",
    )
    parser.add_argument(
        "--baseline-last",
        action="store_true",
        help="start and alternate the baseline agent last (default: first)",
    )
    args = parser.parse_args()

    print("== micro-benchmark (ns per operation, best of 5)")
    m = micro()
    for k, v in m.items():
        print(f"  {k:48s} {v:7.1f}")
    added = (
        m["servicer check (self.tracing is None)"]
        + m["data plane check (request.trace is not None)"] * 2
        + max(0.0, m["InferRequest with trace field"] - m["InferRequest before"])
        + max(0.0, m["Timing with started"] - m["Timing before"])
    )
    print(f"  {'added per request with tracing off':48s} {added:7.1f}")

    with tempfile.TemporaryDirectory(prefix="tracing-bench-") as tmp, Collector() as collector:
        work = Path(tmp)
        model = fixtures.build_models(work / "onnx")[SMALL]
        agents: dict[str, AgentProcess] = {}
        configs: dict[str, tuple[str, dict[str, str]]] = {
            "tracing off": ("", {}),
            "tracing on": ("", {"MODELFLEET_AGENT_TRACING_ENDPOINT": collector.endpoint}),
            # On, but sampling none of these requests (they carry no trace context).
            "tracing 0%": (
                "",
                {
                    "MODELFLEET_AGENT_TRACING_ENDPOINT": collector.endpoint,
                    "MODELFLEET_AGENT_TRACING_SAMPLE_RATIO": "0",
                },
            ),
        }
        if args.baseline_python:
            configs = {"baseline": (args.baseline_python, {}), **configs}
        if args.baseline_last and "baseline" in configs:
            # The order the blocks alternate in, reversed: a position effect shows as a flip.
            configs = {k: v for k, v in configs.items() if k != "baseline"} | {
                "baseline": configs["baseline"]
            }
        if args.only:
            wanted = {f"tracing {w}" if w != "baseline" else w for w in args.only.split(",")}
            configs = {k: v for k, v in configs.items() if k in wanted}
        try:
            for label, (python, env) in configs.items():
                repo = work / label.replace(" ", "-") / "repo"
                fixtures.make_bundle(model, repo)
                agent = AgentProcess(repo, log_path=repo.parent / "agent.log", env=env)
                if python:
                    agent.args[0] = python
                agents[label] = agent.start()
            for agent in agents.values():
                agent.wait_model(model.name, timeout=60)
            targets = [Target(label, a.url, model.name) for label, a in agents.items()]
            lat = interleaved_sequential(targets, model.row(), requests=args.requests)
        finally:
            for agent in agents.values():
                agent.stop()
        print(f"\n== concurrency 1, {args.requests} requests per agent, interleaved")
        for label, ns in lat.items():
            p50, p99 = np.percentile(ns, 50) / 1e6, np.percentile(ns, 99) / 1e6
            print(f"  {label:12s} p50 {p50:.3f} ms  p99 {p99:.3f} ms")
        if "tracing on" in agents:
            wait_for(lambda: len(collector.spans()) > 0, 10, "spans at the collector")
            print(f"  spans received from the traced agent: {len(collector.spans())}")


if __name__ == "__main__":
    main()
