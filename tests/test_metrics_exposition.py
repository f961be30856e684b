"""The agent's request metrics are read from the telemetry cells at scrape time
(agent/metrics.py ServingCollector): the exposition must be what prometheus_client's own
Counter and Histogram would write for the same requests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.telemetry import _FAILURES
from modelfleet.kernel.telemetry_bounds import BATCH_BUCKETS, LATENCY_BUCKETS

LATENCIES = [0.00004, 0.00005, 0.0003, 0.0012, 0.0012, 0.07, 3.0, 12.0]
QUEUES = [0.0, 0.0, 0.00001, 0.0006, 0.0, 0.0, 0.002, 0.0]
BATCHES = [(1, 0.00002), (3, 0.0004), (16, 0.0015), (300, 0.2)]


def _lines(text: bytes, prefix: str) -> list[str]:
    return sorted(
        line for line in text.decode().splitlines() if line.startswith(prefix) and "mlp" in line
    )


def _reference() -> bytes:
    """The same requests counted by prometheus_client, as the agent did before."""
    r = CollectorRegistry()
    requests = Counter(
        "modelfleet_requests_total", "x", ["model", "version", "outcome", "reason"], registry=r
    )
    hists = {
        name: Histogram(name, "x", ["model", "version"], buckets=buckets, registry=r)
        for name, buckets in (
            ("modelfleet_request_duration_seconds", LATENCY_BUCKETS),
            ("modelfleet_queue_duration_seconds", LATENCY_BUCKETS),
            ("modelfleet_compute_duration_seconds", LATENCY_BUCKETS),
            ("modelfleet_batch_size", BATCH_BUCKETS),
        )
    }
    for latency, queue in zip(LATENCIES, QUEUES, strict=True):
        requests.labels("mlp", "3", "success", "").inc()
        hists["modelfleet_request_duration_seconds"].labels("mlp", "3").observe(latency)
        hists["modelfleet_queue_duration_seconds"].labels("mlp", "3").observe(queue)
    for rows, compute in BATCHES:
        hists["modelfleet_batch_size"].labels("mlp", "3").observe(rows)
        hists["modelfleet_compute_duration_seconds"].labels("mlp", "3").observe(compute)
    requests.labels("mlp", "3", "failure", "shape").inc(2)
    requests.labels("mlp", "", "failure", "model_not_found").inc()
    requests.labels("mlp", "3", "shed", "concurrency").inc()
    return generate_latest(r)


def _agent() -> tuple[AgentMetrics, bytes]:
    m = AgentMetrics()
    cells = m.serving("mlp", 3)
    for latency, queue in zip(LATENCIES, QUEUES, strict=True):
        cells.ok(latency, queue)
    for rows, compute in BATCHES:
        cells.batch_done(rows, compute)
    cells.failed("shape")
    cells.failed("shape")
    m.telemetry.failed("mlp", 0, "model_not_found")
    m.shed_requests[("mlp", "3", "concurrency")] = 1
    return m, generate_latest(m.registry)


def test_request_series_read_from_the_cells_equal_prometheus_clients_own() -> None:
    _, ours = _agent()
    theirs = _reference()
    for prefix in (
        "modelfleet_requests_total",
        "modelfleet_request_duration_seconds",
        "modelfleet_queue_duration_seconds",
        "modelfleet_compute_duration_seconds",
        "modelfleet_batch_size",
    ):
        got, want = _lines(ours, prefix), _lines(theirs, prefix)
        assert want, prefix
        if prefix.endswith("seconds"):
            # Sums are kept in whole nanoseconds in the cells.
            got = [g for g in got if "_sum" not in g]
            want = [w for w in want if "_sum" not in w]
        assert got == want, prefix
    sums = [line for line in _lines(ours, "modelfleet_request_duration_seconds_sum")]
    assert len(sums) == 1 and abs(float(sums[0].split()[-1]) - sum(LATENCIES)) < 1e-6


def test_each_family_is_written_once_with_its_help_and_type() -> None:
    _, ours = _agent()
    text = ours.decode()
    for family, kind in (
        ("modelfleet_requests_total", "counter"),
        ("modelfleet_request_duration_seconds", "histogram"),
        ("modelfleet_batch_size", "histogram"),
    ):
        assert text.count(f"# TYPE {family} {kind}\n") == 1
        assert text.count(f"# HELP {family} ") == 1


def test_an_unloaded_version_leaves_metrics_and_comes_back_with_its_counts() -> None:
    m, _ = _agent()
    m.forget_version("mlp", "3")
    text = generate_latest(m.registry).decode()
    assert 'version="3"' not in text
    # Failures that resolved no version stay.
    assert (
        'modelfleet_requests_total{model="mlp",outcome="failure",reason="model_not_found",'
        'version=""} 1.0' in text
    )
    m.serving("mlp", 3).ok(0.001, 0.0)
    text = generate_latest(m.registry).decode()
    assert (
        'modelfleet_requests_total{model="mlp",outcome="success",reason="",version="3"} 9.0' in text
    )


def test_failure_reasons_past_the_seventh_are_counted_as_other() -> None:
    m = AgentMetrics()
    cells = m.serving("mlp", 1)
    for i in range(10):
        cells.failed(f"reason{i}")
    text = generate_latest(m.registry).decode()
    failures = [line for line in text.splitlines() if 'outcome="failure"' in line]
    assert len(failures) == 8
    assert 'reason="other",version="1"} 3.0' in text


def test_a_version_that_never_loaded_has_no_series() -> None:
    """A candidate refused by its gate gets telemetry cells (the gate verdict) but never served:
    /metrics must not grow by a version per refused candidate."""
    m, _ = _agent()
    m.telemetry.gate("mlp", 7, False)
    text = generate_latest(m.registry).decode()
    assert 'version="7"' not in text and 'version="3"' in text


def test_the_success_counter_never_goes_down_between_scrapes() -> None:
    """Successes are requests minus failures: a scrape that read a failure's first cell but not
    yet its second would see one success fewer; the collector reports at least its last value."""
    m, _ = _agent()
    text = generate_latest(m.registry).decode()
    line = 'modelfleet_requests_total{model="mlp",outcome="success",reason="",version="3"} 8.0'
    assert line in text
    cells = m.serving("mlp", 3)
    cells.cells[cells.base + _FAILURES] += 1  # alone, as mid-way through failed()
    assert line in generate_latest(m.registry).decode()
