"""Arms and shadow comparisons from the agent's telemetry to the hub's DuckDB store and back."""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import numpy as np
import pytest

from modelfleet.agent.serving.shadow import OutputCompare
from modelfleet.agent.telemetry import TelemetryAggregator
from modelfleet.hub.telemetry import _SCHEMA, TelemetryStore
from modelfleet.protos import fleet_pb2 as pb


def agent_report(
    seq: int, end: float, compares: list[list[OutputCompare]], dropped: int = 0
) -> pb.TelemetryReport:
    """A report cut by the agent's own aggregator: v1 active, shadowed by v2."""
    agg = TelemetryAggregator(clock=lambda: end)
    agg.arms = lambda: {("clf", 1): "active", ("clf", 2): "shadow"}
    v1 = agg.version("clf", 1)
    cells = agg.shadow("clf", 1, 2, ["logits", "probs"])
    for outputs in compares:
        v1.ok(0.001, 0.0)
        cells.compared(outputs, 0.004)
    for _ in range(dropped):
        v1.ok(0.001, 0.0)
        cells.dropped()
    report = agg.snapshot()
    report.seq = seq
    return report


def request(abs_diff: float, agree: bool, js: float) -> list[OutputCompare]:
    return [
        OutputCompare("logits", True, abs_diff * 10, abs_diff, agree),
        OutputCompare("probs", True, abs_diff, abs_diff / 2, agree, (js,)),
    ]


def test_shadow_comparisons_are_stored_once_and_summarised(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "t.duckdb", retention_s=0)
    try:
        first = agent_report(
            1, 100.0, [request(0.0, True, 0.0)] * 98 + [request(0.2, False, 0.3)] * 2, dropped=5
        )
        second = agent_report(2, 110.0, [request(0.001, True, 0.001)] * 100)
        assert store.ingest("a1", [first, second]) == [1, 2]
        # A replay is acknowledged and not counted twice.
        assert store.ingest("a1", [first]) == [1]
        s = store.shadow_window("clf", 1, None, 0.0, 200.0)
        assert (s.compared, s.dropped, s.shadow_failures, s.agents) == (200, 5, 0, 1)
        assert s.shadow_versions == (2,)
        # Two class-score outputs per request: 4 of 400 disagreed.
        assert (s.top1_agree, s.top1_total) == (396, 400)
        assert s.top1_agreement == pytest.approx(0.99)
        assert s.drop_rate == pytest.approx(5 / 205)
        # The worst output (logits, ten times the difference) decides the summary.
        assert s.abs_diff_p99 == pytest.approx(s.outputs["logits"].abs_diff_p99)
        assert s.outputs["logits"].abs_diff_p99 > s.outputs["probs"].abs_diff_p99
        assert 0.0 < s.abs_diff_p50 <= 0.01
        assert math.isnan(s.outputs["logits"].js_p50)  # no probability rows
        assert 0 < s.js_p50 <= 0.001 and s.js_p99 == pytest.approx(0.001)
        assert 1.0 < s.shadow_latency_p50_ms <= 5.0
        # Windows and agents select as window() does.
        only_first = store.shadow_window("clf", 1, None, 0.0, 105.0)
        assert only_first.compared == 100 and only_first.abs_diff_p50 == 0.0
        assert store.shadow_window("clf", 1, ["a2"], 0.0, 200.0).compared == 0
        assert store.shadow_window("clf", 1, [], 0.0, 200.0).compared == 0
        assert store.shadow_window("clf", 1, None, 0.0, 200.0, shadow_version=3).compared == 0
        empty = store.shadow_window("clf", 7, None, 0.0, 200.0)
        assert empty.compared == 0 and math.isnan(empty.top1_agreement)
        # The arm comes with the version's window.
        (v1,) = store.window("clf", 1, None, 0.0, 200.0)
        (v2,) = store.window("clf", 2, None, 0.0, 200.0)
        assert v1.arms == ("active",) and v1.requests == 205
        assert v2.arms == ("shadow",) and v2.requests == 0
    finally:
        store.close()


def test_identical_outputs_read_as_zero_difference_and_full_agreement(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "t.duckdb", retention_s=0)
    try:
        store.ingest("a1", [agent_report(1, 10.0, [request(0.0, True, 0.0)] * 50)])
        s = store.shadow_window("clf", 1, None, 0.0, 20.0)
        assert s.top1_agreement == 1.0
        assert (s.abs_diff_p50, s.abs_diff_p99, s.rel_diff_p99, s.js_p99) == (0.0, 0.0, 0.0, 0.0)
    finally:
        store.close()


def test_a_store_from_before_arms_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    old_schema = _SCHEMA.split("-- Stores made before arms")[0].replace(
        ",\n    arm VARCHAR NOT NULL DEFAULT ''", ""
    )
    assert "arm" not in old_schema
    with duckdb.connect(str(path)) as db:
        db.execute(old_schema)
    store = TelemetryStore(path, retention_s=0)
    try:
        store.ingest("a1", [agent_report(1, 10.0, [request(0.0, True, 0.0)])])
        (v1,) = store.window("clf", 1, None, 0.0, 20.0)
        assert v1.arms == ("active",)
        assert store.shadow_window("clf", 1, None, 0.0, 20.0).compared == 1
    finally:
        store.close()


def test_cells_count_a_batch_as_its_requests_one_by_one() -> None:
    """The shadow threads count a batch of requests at once (compared_batch); the cells must
    hold what counting each request alone (compared) leaves."""
    requests = [request(d, d < 0.1, d / 3) for d in (0.0, 1e-6, 1e-5, 0.02, 0.05, 0.3, 2.0, 0.0)]
    seconds = [0.0005, 0.001, 0.004, 0.004, 0.02, 0.2, 1.5, 30.0]
    one = TelemetryAggregator().shadow("clf", 1, 2, ["logits", "probs"])
    for outputs, s in zip(requests, seconds, strict=True):
        one.compared(outputs, s)
    batch = TelemetryAggregator().shadow("clf", 1, 2, ["logits", "probs"])
    rows = []
    for k, name in enumerate(["logits", "probs"]):
        of = [r[k] for r in requests]
        rows.append(
            (
                name,
                np.array([c.abs_diff for c in of]),
                np.array([c.rel_diff for c in of]),
                np.array([js for c in of for js in c.js]),
                sum(bool(c.top1_agree) for c in of),
                sum(c.top1_agree is not None for c in of),
            )
        )
    batch.compared_batch(rows, np.array(seconds))
    got, want = batch.snapshot(), one.snapshot()
    assert got.keys() == want.keys()
    for output in want:
        assert got[output] == pytest.approx(want[output], rel=1e-12)
    assert batch.max_abs == one.max_abs == 20.0
    assert batch.totals() == one.totals() == (8, 0, 0, 12, 16)
