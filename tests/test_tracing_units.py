"""Tracing without processes: the light front when off, settings checks, the CLI's metadata,
and the rollout engine's step spans through the hub's real rollout manager (the fixture of
tests/test_traffic_canary_hub.py), kept by the SDK's InMemorySpanExporter."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from modelfleet.kernel import tracing
from modelfleet.kernel.errors import InvalidRequestError
from modelfleet.kernel.tracing import TracingSettings
from tests.test_traffic_canary_hub import hub, start, tick, traffic

__all__ = ["hub"]  # the fixture, used by name below


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.start(TracingSettings("http://127.0.0.1:4317", 1.0, "test"), exporter)
    try:
        yield exporter
    finally:
        tracing.stop()


def finished(exporter: InMemorySpanExporter) -> list[Any]:
    t = tracing.current()
    assert t is not None
    t.provider.force_flush()
    return list(exporter.get_finished_spans())


def test_off_is_a_no_op() -> None:
    assert tracing.current() is None
    assert tracing.start(TracingSettings("")) is None
    with tracing.span("x", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}) as s:
        s.set_attribute("k", 1)
        tracing.annotate(k=2)
        tracing.event("y", 0, {})
    assert s is tracing.NO_SPAN


@pytest.mark.parametrize(
    ("endpoint", "ratio", "why"),
    [("127.0.0.1:4317", 1.0, "OTLP/gRPC URL"), ("http://h:4317", 1.5, "between 0 and 1")],
)
def test_bad_settings_are_refused(endpoint: str, ratio: float, why: str) -> None:
    with pytest.raises(InvalidRequestError, match=why):
        tracing.check_settings(endpoint, ratio)


def test_trace_context_from_metadata_and_environment() -> None:
    md = [("traceparent", "00-a-b-01"), ("x-routing-key", "k"), ("tracestate", b"v=1")]
    assert tracing.carrier_of(md) == {"traceparent": "00-a-b-01", "tracestate": "v=1"}
    assert tracing.carrier_of(None) == {}
    assert tracing.env_carrier({"TRACEPARENT": "00-a-b-01", "PATH": "/bin"}) == [
        ("traceparent", "00-a-b-01")
    ]
    assert tracing.env_carrier({}) == []


def test_a_span_continues_its_carrier_and_records_a_failure(exported: InMemorySpanExporter) -> None:
    trace_id, parent = "ab" * 16, "cd" * 8
    carrier = {"traceparent": f"00-{trace_id}-{parent}-01"}
    with pytest.raises(InvalidRequestError), tracing.span("op", carrier, {tracing.MODEL: "m"}):
        raise InvalidRequestError("bad", reason="shape")
    (span,) = finished(exported)
    assert f"{span.context.trace_id:032x}" == trace_id
    assert f"{span.parent.span_id:016x}" == parent
    assert span.attributes[tracing.ERROR_REASON] == "shape"
    assert span.attributes[tracing.OUTCOME] == "failure"
    assert not span.status.is_ok


def test_rollout_steps_become_spans_with_their_verdicts(
    hub: Any, exported: InMemorySpanExporter
) -> None:
    # A failing candidate: the first wave starts, its evaluation fails, the rollout rolls back.
    start(hub)
    tick(hub, 1)
    for _ in range(5):
        tick(hub, 2)
        traffic(hub, {2: 0.2})
    r = tick(hub, 1)
    assert r.state in ("rolling_back", "rolled_back")
    spans = finished(exported)
    names = [s.name for s in spans]
    assert "hub.rollout.wave" in names and "hub.rollout.rollback" in names
    wave = next(s for s in spans if s.name == "hub.rollout.wave")
    assert wave.attributes["modelfleet.wave"] == 1
    assert wave.attributes["modelfleet.rollout_id"] == r.id
    verdicts = [
        s.attributes["modelfleet.verdict"] for s in spans if s.name == "hub.rollout.evaluate"
    ]
    assert verdicts and verdicts[-1] == "fail"
    rollback = next(s for s in spans if s.name == "hub.rollout.rollback")
    assert "error_rate=0.2" in str(rollback.attributes["modelfleet.reason"])


def test_a_good_rollout_passes_every_evaluation_and_ends_done(
    hub: Any, exported: InMemorySpanExporter
) -> None:
    r = start(hub, traffic=[])
    for _ in range(60):  # bounded: two waves, a few ticks each
        traffic(hub, {})
        r = tick(hub, 3)
        if r.state == "done":
            break
    assert r.state == "done", r.events
    spans = finished(exported)
    verdicts = {
        s.attributes["modelfleet.verdict"] for s in spans if s.name == "hub.rollout.evaluate"
    }
    assert verdicts == {"pass"}
    waves = sorted(s.attributes["modelfleet.wave"] for s in spans if s.name == "hub.rollout.wave")
    assert waves == [1, 2]
    assert [s.name for s in spans].count("hub.rollout.done") == 1
