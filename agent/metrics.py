"""Prometheus metrics of the agent, labelled by model and version."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from modelfleet.agent.telemetry import TelemetryAggregator
from modelfleet.kernel.metrics_http import serve_metrics_http
from modelfleet.kernel.telemetry_bounds import (
    BATCH_BUCKETS,
    DIFF_BOUNDS,
    JS_BOUNDS,
    LATENCY_BUCKETS,
)

# The *_created series double the exposition size and nobody alerts on them.
disable_created_metrics()

# Buckets in seconds: 50 us .. 10 s, dense where low-latency serving lives. The fleet telemetry
# (agent/telemetry.py) and the hub use the same bounds (kernel/telemetry_bounds.py).
_LATENCY_BUCKETS, _BATCH_BUCKETS = LATENCY_BUCKETS, BATCH_BUCKETS


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # Per version counters for the hub (fleet mode reports them; standalone just counts).
        self.telemetry = TelemetryAggregator()
        r = self.registry
        self.requests = Counter(
            "modelfleet_requests_total",
            "Inference requests by outcome; failures carry their reason.",
            ["model", "version", "outcome", "reason"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "modelfleet_request_duration_seconds",
            "Time from request decoded to response ready.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "modelfleet_queue_duration_seconds",
            "Time a request waited for its batch to start computing.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "modelfleet_compute_duration_seconds",
            "onnxruntime run time per executed batch.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "modelfleet_batch_size",
            "Rows per executed batch.",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.loaded = Gauge(
            "modelfleet_loaded_versions",
            "1 for each loaded version, by role (active, previous, candidate or shadow).",
            ["model", "version", "role"],
            registry=r,
        )
        self.swaps = Counter(
            "modelfleet_swaps_total", "Switches of the active version.", ["model"], registry=r
        )
        self.rollbacks = Counter(
            "modelfleet_rollbacks_total",
            "Switches back to the previous version.",
            ["model"],
            registry=r,
        )
        self.gate_results = Counter(
            "modelfleet_gate_results_total",
            "Health gate outcomes by kind (ok, non_finite, mismatch, latency, ...).",
            ["model", "version", "result"],
            registry=r,
        )
        self.gate_failures = Counter(
            "modelfleet_gate_failures_total",
            "Candidate versions refused by the health gate or at load.",
            ["model", "version", "reason"],
            registry=r,
        )

        self.provider_fallbacks = Counter(
            "modelfleet_provider_fallbacks_total",
            "Versions loaded on a lesser execution provider because the one asked for (label "
            "provider) could not load.",
            ["model", "version", "provider"],
            registry=r,
        )
        self.execution_provider = Gauge(
            "modelfleet_execution_provider",
            "1 for the execution provider each loaded version serves on.",
            ["model", "version", "provider"],
            registry=r,
        )

        # Guardrails (agent/serving/admission.py): requests refused before any work because the
        # model was at a limit or the client over its rate. Per model, not per version.
        self.shed = Counter(
            "modelfleet_requests_shed_total",
            "Inference requests refused with RESOURCE_EXHAUSTED by a guardrail, by reason: "
            "concurrency, queued_rows or rate_limit.",
            ["model", "reason"],
            registry=r,
        )
        # Live comparison of two versions (docs/operations.md#comparing-versions-on-live-traffic).
        self.routed = Counter(
            "modelfleet_routed_requests_total",
            "Requests by the arm that answered them while a comparison is on: active, "
            "candidate, or pinned (the request named its version).",
            ["model", "version", "arm"],
            registry=r,
        )
        # Inference capture (agent/serving/capture.py): per model, not per version, so the
        # series stay few whatever the version churn.
        self.capture_requests = Counter(
            "modelfleet_capture_requests_total",
            "Sampled requests by outcome: captured (written) or dropped (capture queue full).",
            ["model", "outcome"],
            registry=r,
        )
        self.capture_bytes = Counter(
            "modelfleet_capture_bytes_total",
            "Bytes of Parquet written to capture files.",
            ["model"],
            registry=r,
        )
        self.capture_files = Counter(
            "modelfleet_capture_files_total",
            "Capture files by event: written (complete), deleted_quota (oldest deleted to stay "
            "within capture_quota_bytes), shipped (acknowledged by the hub, deleted locally), "
            "refused (the hub takes no files of this model from this agent; deleted unshipped).",
            ["model", "event"],
            registry=r,
        )
        self.shadow_requests = Counter(
            "modelfleet_shadow_requests_total",
            "Copies of requests answered by version for shadow_version: compared, dropped "
            "(queue full) or failed (the shadow errs or returns other outputs).",
            ["model", "version", "shadow_version", "outcome"],
            registry=r,
        )
        self.shadow_seconds = Histogram(
            "modelfleet_shadow_duration_seconds",
            "Time the shadow version took per copy (queueing excluded).",
            ["model", "version", "shadow_version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.shadow_abs_diff = Histogram(
            "modelfleet_shadow_abs_diff",
            "Per compared request and output: the largest |primary - shadow|.",
            ["model", "version", "output"],
            buckets=DIFF_BOUNDS,
            registry=r,
        )
        self.shadow_rel_diff = Histogram(
            "modelfleet_shadow_rel_diff",
            "Per compared request and output: the largest |primary - shadow| / (|primary| + 1e-6).",
            ["model", "version", "output"],
            buckets=DIFF_BOUNDS,
            registry=r,
        )
        self.shadow_js_divergence = Histogram(
            "modelfleet_shadow_js_divergence_bits",
            "Per compared row of a probability output: Jensen-Shannon divergence in bits.",
            ["model", "version", "output"],
            buckets=JS_BOUNDS,
            registry=r,
        )
        self.shadow_top1 = Counter(
            "modelfleet_shadow_top1_total",
            "Compared requests of a class-score output whose arg-max agreed or not.",
            ["model", "version", "output", "outcome"],
            registry=r,
        )

        # Drift of the latest closed window (agent/serving/drift.py). Series: per version, the
        # drift_metrics_features features with the largest PSI in that window (all of them when
        # the reference has no more), replaced at every window: bounded by that setting.
        self.drift_psi = Gauge(
            "modelfleet_drift_psi",
            "Population stability index of a feature in the latest drift window.",
            ["model", "version", "feature"],
            registry=r,
        )
        self.drift_js = Gauge(
            "modelfleet_drift_js_distance",
            "Jensen-Shannon distance (log2) of a feature in the latest drift window.",
            ["model", "version", "feature"],
            registry=r,
        )
        self.drift_ks = Gauge(
            "modelfleet_drift_ks",
            "Binned Kolmogorov-Smirnov statistic of a numeric feature in the latest drift window.",
            ["model", "version", "feature"],
            registry=r,
        )
        self.drift_rows = Counter(
            "modelfleet_drift_requests_total",
            "Requests offered to drift accounting: sampled (rows counted), skipped (sampling "
            "rate) or capped (drift_max_rows_per_s reached).",
            ["model", "version", "outcome"],
            registry=r,
        )

    def forget_version(self, model: str, version: str) -> None:
        """Drop every series of an unloaded version, so a fleet that swaps often does not
        grow its exposition (and the agent's memory) without bound."""
        for metric in (
            self.requests,
            self.request_seconds,
            self.queue_seconds,
            self.compute_seconds,
            self.batch_size,
            self.gate_results,
            self.provider_fallbacks,
            self.execution_provider,
            self.routed,
            self.shadow_requests,
            self.shadow_seconds,
            self.shadow_abs_diff,
            self.shadow_rel_diff,
            self.shadow_js_divergence,
            self.shadow_top1,
            self.drift_psi,
            self.drift_js,
            self.drift_ks,
            self.drift_rows,
        ):
            names = metric._labelnames  # prometheus_client keeps children by label values
            m_i, v_i = names.index("model"), names.index("version")
            for values in list(metric._metrics):
                if values[m_i] == model and values[v_i] == version:
                    metric.remove(*values)

    def serve_http(self, host: str, port: int) -> None:
        serve_metrics_http(self.registry, host, port)
