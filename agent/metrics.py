"""Prometheus metrics of the agent, labelled by model and version."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import accumulate

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from modelfleet.agent.telemetry import TelemetryAggregator, Totals, VersionCounters
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
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        telemetry: TelemetryAggregator | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        # Per version counters for the hub (fleet mode reports them; standalone just counts).
        self.telemetry = telemetry or TelemetryAggregator()
        r = self.registry
        # With serving workers (agent/workers.py): (process, pid, requests) for each serving
        # process, the leader first; set by the agent, read at scrape time.
        self.processes: Callable[[], list[tuple[int, int | None, int]]] | None = None
        r.register(ProcessesCollector(self))
        self.worker_restarts = Counter(
            "modelfleet_serving_worker_restarts_total",
            "Serving worker processes started again after they exited.",
            registry=r,
        )
        # Requests and their latency histograms are counted once, in the telemetry cells the
        # fleet reports come from; /metrics reads them at scrape time (ServingCollector). A
        # prometheus_client observe per histogram per request was the largest share of the
        # agent's own CPU per request after onnxruntime (docs/benchmarks.md).
        # Loaded versions, whose request series /metrics shows (a version that never loaded,
        # e.g. a candidate refused by its gate, has telemetry cells but no series).
        self._served: set[tuple[str, int]] = set()
        # (model, version label, reason) -> requests shed by a guardrail; not in the telemetry
        # cells because a shed request says nothing about the version (dataplane._account_shed).
        self.shed_requests: dict[tuple[str, str, str], int] = {}
        r.register(ServingCollector(self))
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
        # Answers computed but refused at the HTTP edge (agent/serving/http_server.py).
        self.refused_responses = Counter(
            "modelfleet_refused_responses_total",
            "Responses the model computed but the HTTP edge refused with 400 because they "
            "cannot be sent as asked, by reason: non_finite_output (NaN or Infinity asked for "
            "as JSON) or data (bytes that are not UTF-8 asked for as JSON). The request counts "
            "as a success in the version's statistics.",
            ["model", "version", "reason"],
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
        self._served.discard((model, int(version)))
        for key in [k for k in self.shed_requests if k[0] == model and k[1] == version]:
            del self.shed_requests[key]
        for metric in (
            self.refused_responses,
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

    def serving(self, model: str, version: int) -> VersionCounters:
        """The cells a loaded version counts its requests in; on /metrics until it unloads."""
        self._served.add((model, version))
        return self.telemetry.version(model, version)

    def exposed(self) -> list[tuple[VersionCounters, Totals]]:
        """Versions whose serving series /metrics shows, with their counts: loaded ones, and
        version 0, which holds requests that resolved no version (an empty version label)."""
        served = self._served.copy()
        return self.telemetry.totals(lambda m, v: v == 0 or (m, v) in served)

    def serve_http(self, host: str, port: int) -> None:
        serve_metrics_http(self.registry, host, port)


_LATENCY_LE = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
_BATCH_LE = [floatToGoString(float(b)) for b in BATCH_BUCKETS] + ["+Inf"]


def _cumulative(le: list[str], counts: list[int]) -> list[tuple[str, float]]:
    return list(zip(le, accumulate(counts), strict=True))


def resident_bytes(pid: int) -> int | None:
    """A process's resident memory from /proc (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class ProcessesCollector(Collector):
    """Each serving process's share of the requests and its memory (serving_workers > 1)."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        processes = self.metrics.processes
        requests = CounterMetricFamily(
            "modelfleet_serving_process_requests",
            "Inference requests each serving process answered (0 is the agent's main process).",
            labels=["process"],
        )
        memory = GaugeMetricFamily(
            "modelfleet_serving_process_resident_bytes",
            "Resident memory of each serving process (0 is the agent's main process).",
            labels=["process"],
        )
        for index, pid, count in processes() if processes is not None else ():
            requests.add_metric([str(index)], count)
            rss = resident_bytes(pid) if pid is not None else None
            if rss is not None:
                memory.add_metric([str(index)], rss)
        yield requests
        yield memory


class ServingCollector(Collector):
    """modelfleet_requests_total and the request, queue, compute and batch-size histograms,
    built at scrape time from the telemetry cells (agent/telemetry.py ``totals``)."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics
        # Successes are requests minus failures, two cells a failure bumps one after the other;
        # a scrape between the two must not read a counter that went down (Prometheus would
        # see a reset), so each series reports at least what it reported last.
        self._successes: dict[tuple[str, int], int] = {}

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        requests = CounterMetricFamily(
            "modelfleet_requests",
            "Inference requests by outcome; failures carry their reason.",
            labels=[*labels, "outcome", "reason"],
        )
        hists = {
            name: HistogramMetricFamily(name, text, labels=labels)
            for name, text in (
                (
                    "modelfleet_request_duration_seconds",
                    "Time from request decoded to response ready.",
                ),
                (
                    "modelfleet_queue_duration_seconds",
                    "Time a request waited for its batch to start computing.",
                ),
                ("modelfleet_compute_duration_seconds", "onnxruntime run time per executed batch."),
                ("modelfleet_batch_size", "Rows per executed batch."),
            )
        }
        successes: dict[tuple[str, int], int] = {}
        for c, t in self.metrics.exposed():
            ver = str(c.version) if c.version else ""
            if c.version:
                key = (c.model, c.version)
                successes[key] = max(t.successes, self._successes.get(key, 0))
                requests.add_metric([c.model, ver, "success", ""], successes[key])
            for reason, n in sorted(t.failures.items()):
                requests.add_metric([c.model, ver, "failure", reason], n)
            if not c.version:
                continue
            for name, (le, (counts, total)) in zip(
                hists,
                (
                    (_LATENCY_LE, t.request),
                    (_LATENCY_LE, t.queue),
                    (_LATENCY_LE, t.compute),
                    (_BATCH_LE, t.batch),
                ),
                strict=True,
            ):
                hists[name].add_metric([c.model, ver], _cumulative(le, counts), total)
        self._successes = successes
        for (model, ver, reason), n in list(self.metrics.shed_requests.items()):
            requests.add_metric([model, ver, "shed", reason], n)
        yield requests
        yield from hists.values()
