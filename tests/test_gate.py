"""Health gate rules, without sessions or clocks."""

from __future__ import annotations

import numpy as np
import pytest

from modelfleet.agent.gate import evaluate
from modelfleet.kernel.bundle import HealthSpec, Manifest, TensorSpec


def manifest(budget_ms: float = 10.0, datatype: str = "FP32") -> Manifest:
    return Manifest(
        name="m",
        version=2,
        inputs=(TensorSpec("x", datatype, (-1, 3)),),
        outputs=(TensorSpec("y", datatype, (-1, 3)),),
        model_sha256="",
        model_size=0,
        health=HealthSpec(rtol=1e-3, atol=1e-4, latency_budget_ms=budget_ms),
        max_batch_size=8,
    )


GOOD = np.array([[1.0, 2.0, 3.0]], np.float32)
FAST = [0.001] * 20


def test_pass() -> None:
    r = evaluate(manifest(), {"y": GOOD}, {"y": GOOD.copy()}, FAST)
    assert r.passed and r.kind == "ok" and r.version == 2
    assert r.p99_ms == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("observed", "kind", "words"),
    [
        ({}, "missing_output", "output 'y' is missing"),
        ({"y": GOOD.astype(np.float64)}, "dtype", "dtype float64, declared FP32"),
        ({"y": GOOD.reshape(1, 1, 3)}, "shape", "shape [1, 1, 3], declared [-1, 3]"),
        ({"y": np.array([[1.0, np.nan, 3.0]], np.float32)}, "non_finite", "1 non-finite"),
        ({"y": np.array([[1.0, np.inf, 3.0]], np.float32)}, "non_finite", "NaN/Inf"),
        ({"y": GOOD + 0.5}, "mismatch", "differs from the expected output at index [0, 0]"),
        ({"y": np.ones((2, 3), np.float32)}, "shape", "expected [1, 3]"),
    ],
)
def test_output_rules(observed: dict, kind: str, words: str) -> None:
    r = evaluate(manifest(), {"y": GOOD}, observed, FAST)
    assert not r.passed
    assert r.kind == kind
    assert words in r.reason


def test_within_tolerance_passes() -> None:
    r = evaluate(manifest(), {"y": GOOD}, {"y": GOOD + 1e-5}, FAST)
    assert r.passed, r.reason


def test_latency_budget_uses_p99() -> None:
    latencies = [0.001] * 99 + [0.5]  # one outlier in 100 runs sits above p99's cut
    assert evaluate(manifest(budget_ms=10), {"y": GOOD}, {"y": GOOD}, latencies[:98]).passed
    slow = evaluate(manifest(budget_ms=10), {"y": GOOD}, {"y": GOOD}, [0.02] * 20)
    assert not slow.passed and slow.kind == "latency"
    assert "p99 latency 20.000 ms" in slow.reason and "budget of 10 ms" in slow.reason


def test_integer_outputs_compare_exactly() -> None:
    want = np.array([[1, 2, 3]], np.int64)
    m = manifest(datatype="INT64")
    assert evaluate(m, {"y": want}, {"y": want.copy()}, FAST).passed
    r = evaluate(m, {"y": want}, {"y": want + 1}, FAST)
    assert r.kind == "mismatch"


def test_output_rules_come_before_latency() -> None:
    r = evaluate(manifest(budget_ms=0.0001), {"y": GOOD}, {"y": GOOD * np.nan}, FAST)
    assert r.kind == "non_finite"
