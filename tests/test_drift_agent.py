"""Drift on the agent (agent/serving/drift.py) with a real ONNX model and a real reference from
kernel/reference.py, through the data plane, the telemetry aggregator and /metrics; and the
hub's side: drift windows stored once per (agent, seq), queried per feature, alerting."""

from __future__ import annotations

import asyncio
import math
import random
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest

from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.serving.dataplane import DataPlane, InferInput, InferRequest
from modelfleet.agent.serving.drift import DriftMonitor, DriftSampler
from modelfleet.agent.slots import BatchingConfig, SlotManager
from modelfleet.hub.alerts import DriftSource
from modelfleet.hub.telemetry import TelemetryStore
from modelfleet.kernel.runtime import RuntimeOptions
from modelfleet.protos import fleet_pb2 as pb
from tests.conftest import make_mlp_bundle
from tests.test_bundle_reference import reference_parquet

ROWS_PER_REQUEST = 4


def live_rows(rng: np.random.Generator, shift: float = 0.0) -> np.ndarray:
    """Rows drawn like reference_parquet's: three normal features, one code in 0..3; feature 0
    moved by ``shift`` standard deviations."""
    x = rng.standard_normal((ROWS_PER_REQUEST, 4)).astype(np.float32)
    x[:, 3] = rng.integers(0, 4, ROWS_PER_REQUEST)
    x[:, 0] += shift
    return x


def run_agent(tmp_path: Path, scenario, *, reference: bool = True, **monitor_kw) -> None:
    ref = reference_parquet(tmp_path / "ref.parquet") if reference else None
    kwargs = {"reference": ref} if ref is not None else {}
    bundle = make_mlp_bundle(tmp_path / "repo", 1, **kwargs)

    async def main() -> None:
        metrics = AgentMetrics()
        slots = SlotManager(
            runtime=RuntimeOptions(1, 1, "cpu"),
            batching=BatchingConfig(enabled=False, inline_max_us=0),
            metrics=metrics,
            serving_threads=1,
        )
        # No row cap unless a test sets one: these requests come faster than real traffic.
        monitor_kw.setdefault("max_rows_per_s", 0)
        monitor = DriftMonitor(metrics, report=metrics.telemetry.drift, **monitor_kw)
        slots.drift_attach = monitor.attach
        plane = DataPlane(slots, metrics)
        try:
            await slots.deploy(bundle.path)
            await asyncio.wait_for(scenario(metrics, slots, plane, monitor), 60)
        finally:
            await plane.close()
            slots.close()

    asyncio.run(main())


async def send(plane: DataPlane, rng: np.random.Generator, n: int, shift: float = 0.0) -> None:
    for i in range(n):
        x = live_rows(rng, shift)
        await plane.infer(
            InferRequest("mlp", "", str(i), [InferInput("x", "FP32", tuple(x.shape), x)])
        )
    await asyncio.sleep(0)  # the deferred counting runs on the loop's next turn


def test_a_shifted_feature_tops_the_window_in_telemetry_and_metrics(tmp_path: Path) -> None:
    async def scenario(metrics, slots, plane, monitor: DriftMonitor) -> None:
        version = slots.resolve("mlp")
        assert isinstance(version.drift, DriftSampler)
        await send(plane, np.random.default_rng(5), 300, shift=4.0)
        reports = monitor.close_windows({("mlp", 1)})
        assert len(reports) == 1
        report = reports[0]
        assert report.offered == 300 and report.sampled == 300
        inputs = sorted(
            (f for f in report.features if f.role == "input"), key=lambda f: f.psi, reverse=True
        )
        assert inputs[0].name == "x[0]" and inputs[0].psi > 2.0
        assert inputs[0].rows == 300 * ROWS_PER_REQUEST
        assert all(f.psi < 0.2 for f in inputs[1:]), [(f.name, f.psi) for f in inputs]
        assert inputs[0].HasField("ks") and inputs[0].ks > 0.5
        # The coded feature is categorical: no KS.
        assert not next(f for f in inputs if f.name == "x[3]").HasField("ks")
        assert {f.role for f in report.features} == {"input", "output"}
        assert sum(inputs[0].counts) == inputs[0].rows
        text = generate_latest(metrics.registry).decode()
        line = next(
            ln
            for ln in text.splitlines()
            if ln.startswith("modelfleet_drift_psi{") and "x[0]" in ln
        )
        assert math.isclose(float(line.split()[-1]), inputs[0].psi, rel_tol=1e-9)
        assert (
            'modelfleet_drift_requests_total{model="mlp",outcome="sampled",version="1"} 300.0'
            in text
        )

        # Into the next telemetry report once, then gone (committed).
        first = metrics.telemetry.snapshot([("mlp", 1)])
        [v] = [v for v in first.versions if v.model == "mlp"]
        assert [d.sampled for d in v.drift] == [300]
        second = metrics.telemetry.snapshot([("mlp", 1)])
        assert all(not v.drift for v in second.versions)
        # An empty window makes no report.
        assert monitor.close_windows({("mlp", 1)}) == []

    run_agent(tmp_path, scenario)


def test_unshifted_traffic_flags_nothing(tmp_path: Path) -> None:
    async def scenario(metrics, slots, plane, monitor: DriftMonitor) -> None:
        await send(plane, np.random.default_rng(6), 500)
        [report] = monitor.close_windows()
        worst = max(report.features, key=lambda f: f.psi)
        assert worst.psi < 0.2, (worst.name, worst.psi)

    run_agent(tmp_path, scenario)


def test_sampling_rate_and_row_cap_bound_what_is_counted(tmp_path: Path) -> None:
    async def scenario(metrics, slots, plane, monitor: DriftMonitor) -> None:
        sampler = slots.resolve("mlp").drift
        sampler.clock = lambda: 100.0  # one second, however long the test takes
        await send(plane, np.random.default_rng(7), 50)
        [report] = monitor.close_windows()
        # 20 rows per second: five requests of four rows, the other 45 capped.
        assert report.offered == 50 and report.sampled == 5
        text = generate_latest(metrics.registry).decode()
        assert 'outcome="capped",version="1"} 45.0' in text
        sampler.max_rows_per_s = 0
        sampler.sample_rate = 0.5
        sampler.rng = random.Random(3)
        await send(plane, np.random.default_rng(8), 400)
        [report] = monitor.close_windows()
        assert report.offered == 400 and 150 < report.sampled < 250

    run_agent(tmp_path, scenario, max_rows_per_s=20)


def test_a_version_without_reference_has_no_sampler(tmp_path: Path) -> None:
    async def scenario(metrics, slots, plane, monitor: DriftMonitor) -> None:
        assert slots.resolve("mlp").drift is None
        await send(plane, np.random.default_rng(9), 3)
        assert monitor.close_windows() == []

    run_agent(tmp_path, scenario, reference=False)


def test_an_unloaded_version_reports_its_last_window_and_is_forgotten(tmp_path: Path) -> None:
    async def scenario(metrics, slots, plane, monitor: DriftMonitor) -> None:
        await send(plane, np.random.default_rng(10), 10)
        assert len(monitor.close_windows({("mlp", 1)})) == 1
        await send(plane, np.random.default_rng(11), 10)
        assert len(monitor.close_windows(set())) == 1  # unloaded since: its last window
        assert monitor.close_windows(set()) == []
        assert "mlp" not in str(monitor._exported)

    run_agent(tmp_path, scenario)


# -- the hub -------------------------------------------------------------------------------------


def drift_report(seq: int, end: float, psi0: float, *, model: str = "mlp") -> pb.TelemetryReport:
    feats = [
        pb.DriftFeature(
            tensor="x", name=f"x[{i}]", role="input", kind="numeric", psi=p, js=p / 4, rows=400
        )
        for i, p in enumerate([psi0, 0.01, 0.02])
    ]
    feats[0].ks = 0.4
    feats.append(pb.DriftFeature(tensor="y", name="y[0]", role="output", psi=9.0, js=0.9, rows=400))
    return pb.TelemetryReport(
        seq=seq,
        start_unix=end - 5,
        end_unix=end,
        versions=[
            pb.VersionTelemetry(
                model=model,
                version=1,
                requests=100,
                drift=[
                    pb.DriftReport(
                        window_start_unix=end - 300,
                        window_end_unix=end - 1,
                        offered=100,
                        sampled=100,
                        features=feats,
                    )
                ],
            )
        ],
    )


def test_the_hub_stores_drift_once_and_summarises_per_feature(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "t.duckdb", clock=lambda: 1000.0)
    try:
        store.ingest("a1", [drift_report(1, 900.0, 0.5), drift_report(2, 950.0, 0.3)])
        # The outbox resends what it got no ack for: acknowledged, not stored again.
        assert store.ingest("a1", [drift_report(2, 950.0, 0.3)]) == [2]
        store.ingest("a2", [drift_report(1, 960.0, 0.05)])
        found = store.drift_window("mlp", None, None, 0.0, 1000.0)
        fleet = [f for f in found if not f.agent_id]
        assert fleet[0].feature == "y[0]"  # ordered by psi_max, outputs included
        x0 = next(f for f in fleet if f.feature == "x[0]")
        assert x0.windows == 3 and x0.agents == 2 and x0.rows == 1200
        assert x0.psi_max == 0.5 and math.isclose(x0.psi_mean, (0.5 + 0.3 + 0.05) / 3)
        assert x0.psi_last == 0.3  # the larger of each agent's newest window
        assert x0.ks_max == 0.4
        assert next(f for f in fleet if f.feature == "x[1]").ks_max is None
        a1 = [f for f in found if f.agent_id == "a1" and f.feature == "x[0]"]
        assert len(a1) == 1 and a1[0].windows == 2 and a1[0].psi_last == 0.3
        assert store.drift_window("mlp", None, ["a2"], 0.0, 1000.0)[0].agents == 1
        assert store.drift_window("mlp", None, [], 0.0, 1000.0) == []
        assert store.drift_window("mlp", 2, None, 0.0, 1000.0) == []

        # The alert source: the largest PSI over input features only, rows as the requests.
        [m] = DriftSource(store).measure("mlp", None, 0.0, 1000.0)
        assert m.version == 1 and m.value == 0.5 and m.requests == 1200
        assert m.evidence["feature"] == "x[0]"
        assert DriftSource(store).measure("other", None, 0.0, 1000.0) == []

        # Pruned like the other tables.
        store.retention_s = 70.0
        store.prune()
        after = store.drift_window("mlp", None, None, 0.0, 1000.0)
        x0 = next(f for f in after if not f.agent_id and f.feature == "x[0]")
        assert x0.windows == 2 and x0.psi_max == 0.3  # the window of the report at 900 is gone
    finally:
        store.close()


@pytest.mark.parametrize("bad", [{"drift_window_s": 0}, {"drift_sample_rate": 1.5}])
def test_drift_settings_are_checked(tmp_path: Path, bad: dict) -> None:
    from modelfleet.agent.config import ServeConfig, validate
    from modelfleet.kernel.errors import InvalidRequestError

    cfg = ServeConfig(models=tmp_path, **bad)
    with pytest.raises(InvalidRequestError, match="drift_"):
        validate(cfg)
