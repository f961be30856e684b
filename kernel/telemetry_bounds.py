"""Histogram bounds shared by the agent's Prometheus metrics, its fleet telemetry and the hub's
telemetry store: one definition, so a quantile the hub computes means what the agent measured."""

from __future__ import annotations

# Seconds.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
# Rows per executed batch.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

LATENCY_BOUNDS: tuple[float, ...] = tuple(float(b) for b in LATENCY_BUCKETS)
BATCH_BOUNDS: tuple[float, ...] = tuple(float(b) for b in BATCH_BUCKETS)

# Shadow comparisons (docs/telemetry.md). A first bound of 0 keeps identical outputs apart from
# tiny differences, so a quantile of identical outputs reads exactly 0. 0.05 is a bound because
# gates are written against it (`shadow_abs_diff_p99<0.05`).
DIFF_BOUNDS: tuple[float, ...] = (
    0.0,
    1e-6,
    1e-5,
    1e-4,
    1e-3,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    10.0,
)
# Jensen-Shannon divergence in bits lies in [0, 1].
JS_BOUNDS: tuple[float, ...] = (
    0.0,
    1e-6,
    1e-5,
    1e-4,
    1e-3,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
)
