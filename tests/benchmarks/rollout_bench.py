"""Telemetry ingestion for 1,000 agents and the rollout engine's decision time.

1. 1,000 simulated agents each send one report (two model versions) per round through the
   hub's real ingestion path (TelemetryIngestor -> DuckDB); rounds repeat. Figures: reports/s,
   and hub CPU for a fleet reporting every 10 s (CPU seconds per report x 100 reports/s).
2. A rollout over 1,000 agents in the real registry (SQLite) with the real manager: the time
   from the end of a wave's bake to the next wave's assignments being written (one tick).

Run: .venv/bin/python -m tests.benchmarks.rollout_bench
"""

from __future__ import annotations

import asyncio
import resource
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from modelfleet.hub.registry import Registry
from modelfleet.hub.rollout_manager import RolloutManager
from modelfleet.hub.rollouts import Spec
from modelfleet.hub.telemetry import TelemetryIngestor, TelemetryStore
from modelfleet.kernel.reports import AgentReport, ModelReport
from modelfleet.protos import fleet_pb2 as pb

N_AGENTS = 1000
ROUNDS = 5


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _report(seq: int, now: float) -> pb.TelemetryReport:
    rep = pb.TelemetryReport(seq=seq, start_unix=now - 10, end_unix=now)
    for version in (1, 2):
        v = rep.versions.add(model="mlp", version=version, requests=100, failures=1)
        v.failures_by_reason["runtime"] = 1
        for h in (v.request_latency, v.queue_latency, v.compute_latency):
            h.bounds.extend([0.001, 0.005, 0.01, 0.05])
            h.counts.extend([50, 30, 15, 4, 1])
            h.count, h.sum = 100, 0.4
    return rep


async def _ingest(store: TelemetryStore) -> dict[str, float]:
    ingestor = TelemetryIngestor(store)
    now = time.time()
    start, cpu0 = time.perf_counter(), _cpu()
    for r in range(ROUNDS):
        await asyncio.gather(
            *(
                ingestor.ingest(f"agent-{i}", [_report(r + 1, now + r * 10)])
                for i in range(N_AGENTS)
            )
        )
    wall, cpu = time.perf_counter() - start, _cpu() - cpu0
    reports = N_AGENTS * ROUNDS
    return {"reports_per_s": reports / wall, "cpu_per_report_ms": cpu / reports * 1e3}


async def _decision(tmp: Path) -> dict[str, float]:
    reg = Registry(tmp / "registry.db")
    for v in (1, 2):
        reg.add_version(
            name="mlp",
            version=v,
            sha256=f"{v:064x}",
            size=1,
            notes="",
            target_path=f"mlp/{v}/bundle.tar",
            signed=True,
            manifest={"model": {"sha256": str(v)}},
        )
    for i in range(N_AGENTS):
        reg.add_agent(f"agent-{i}", f"host-{i}", {"site": "x"}, "fp")
    reg.deploy("mlp", 1, {})
    store = TelemetryStore(tmp / "t.duckdb")
    core = SimpleNamespace(registry=reg, telemetry=store, changed=asyncio.Condition())
    manager = RolloutManager(core)
    spec = Spec(
        model="mlp",
        version=2,
        selector={},
        waves=["1%", "10%", "50%", "100%"],
        bake_s=0.05,
        gates=["error_rate<0.05", "p99_vs_baseline<2"],
        min_requests=10,
        agent_timeout_s=600,
    )
    r = await manager.start(spec)
    # The first wave's agents switch and report.
    for a in r.assigned:
        reg.touch(a, AgentReport(models=(ModelReport("mlp", active_version=2),)))
    await manager.tick()  # switching -> baking
    # Telemetry for the bake window, canary (v2) and baseline (v1) alike.
    time.sleep(0.01)
    now = time.time()
    store.ingest_many([(f"agent-{i}", [_report(1, now)]) for i in range(N_AGENTS)])
    time.sleep(0.06)  # the bake is over: the next tick is the decision
    start = time.perf_counter()
    await manager.tick()  # evaluate the wave, assign the next one, persist
    decision = time.perf_counter() - start
    after = manager.get("mlp")
    store.close()
    reg.close()
    return {
        "decision_s": decision,
        "assigned_after": float(len(after.assigned)),
        "wave_after": float(after.wave + 1),
    }


def main() -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="mf-rollout-bench-") as tmp:
        ing = asyncio.run(_ingest(TelemetryStore(Path(tmp) / "ingest.duckdb")))
        dec = asyncio.run(_decision(Path(tmp)))
    hub_cpu = ing["cpu_per_report_ms"] / 1e3 * (N_AGENTS / 10) * 100  # % of one core
    rows = [
        {
            "benchmark": "telemetry",
            "figure": f"ingestion, {N_AGENTS} agents x {ROUNDS} rounds",
            "value": ing["reports_per_s"],
            "unit": "reports/s",
            "baseline": 1000.0,
            "ratio": ing["reports_per_s"] / 1000.0,
            "target": ">= 1000 reports/s",
            "status": "PASS" if ing["reports_per_s"] >= 1000 else "MISS",
        },
        {
            "benchmark": "telemetry",
            "figure": f"hub CPU, {N_AGENTS} agents every 10 s",
            "value": hub_cpu,
            "unit": "% of one core",
            "baseline": "-",
            "ratio": "-",
            "target": "-",
            "status": "-",
        },
        {
            "benchmark": "rollout",
            "figure": f"end of bake -> next wave assigned ({N_AGENTS} agents)",
            "value": dec["decision_s"],
            "unit": "s",
            "baseline": 5.0,
            "ratio": dec["decision_s"] / 5.0,
            "target": "< 5 s",
            "status": "PASS" if dec["decision_s"] < 5 and dec["wave_after"] == 2 else "MISS",
        },
    ]
    for row in rows:
        value = row["value"]
        print(
            f"{row['benchmark']:<10} {row['figure']:<50} {value:>10.3f} {row['unit']:<14} "
            f"{row['target']:<20} {row['status']}"
        )
    return rows


if __name__ == "__main__":
    main()
