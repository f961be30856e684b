"""OpenTelemetry tracing for hub and agent: off unless ``tracing_endpoint`` is set.

This module is the light front door: importing it imports no OpenTelemetry. :func:`start`
imports the SDK and the OTLP/gRPC exporter, sets up a TracerProvider with a
BatchSpanProcessor (spans leave on a background thread, never on the request path) and makes
it this process's :func:`current` tracing; :func:`stop` flushes and shuts it down. Until then
:func:`current` is ``None`` and :func:`span`/:func:`annotate` do nothing, so a disabled process
pays one ``is None`` check where it would have traced.

Trace context comes in as W3C ``traceparent``/``tracestate`` (gRPC metadata on the servers;
the ``TRACEPARENT``/``TRACESTATE`` environment variables for the admin CLI, which sends them on
as metadata). The sampler is parent-based: a request whose caller sampled it is traced, one
whose caller did not is not, and a request without context is sampled at
``tracing_sample_ratio``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from modelfleet.kernel.errors import InvalidRequestError

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_CARRIED = (TRACEPARENT, TRACESTATE)
# The OpenTelemetry convention for handing trace context to a command line program.
ENV_CARRIER = {"TRACEPARENT": TRACEPARENT, "TRACESTATE": TRACESTATE}

# Attribute names shared by hub and agent spans.
MODEL = "modelfleet.model"
VERSION = "modelfleet.version"
OUTCOME = "modelfleet.outcome"
ERROR_REASON = "modelfleet.error_reason"


@dataclass(frozen=True)
class TracingSettings:
    # OTLP/gRPC collector, e.g. http://127.0.0.1:4317 (https:// for TLS); empty: tracing off.
    endpoint: str = ""
    # Share of traces started here (no sampled parent) that are recorded, 0..1.
    sample_ratio: float = 1.0
    service_name: str = ""
    service_version: str = ""


def check_settings(endpoint: str, sample_ratio: float) -> None:
    """Refuse settings the exporter would only fail on later (at the first export)."""
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise InvalidRequestError(
            f"config: tracing_endpoint must be an OTLP/gRPC URL such as http://127.0.0.1:4317 "
            f"(https:// for TLS), not {endpoint!r}; leave it empty to turn tracing off"
        )
    if not 0.0 <= sample_ratio <= 1.0:
        raise InvalidRequestError(
            f"config: tracing_sample_ratio must be between 0 and 1, not {sample_ratio:g}"
        )


def carrier_of(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    """The W3C trace context headers in gRPC invocation metadata (keys arrive lower-case)."""
    out: dict[str, str] = {}
    for key, value in metadata or ():
        if key in _CARRIED:
            out[key] = value if isinstance(value, str) else value.decode()
    return out


def env_carrier(environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """gRPC metadata carrying TRACEPARENT/TRACESTATE from the environment (empty: none)."""
    env = os.environ if environ is None else environ
    return [(header, env[var]) for var, header in ENV_CARRIER.items() if env.get(var)]


class Span:
    """What traced code may do with a span; the disabled one does nothing."""

    def set_attribute(self, key: str, value: Any) -> None:
        pass


NO_SPAN = Span()


class Tracing:
    """A TracerProvider exporting over OTLP/gRPC; built by :func:`start` only."""

    def __init__(self, settings: TracingSettings, exporter: Any = None) -> None:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._status = trace.Status
        self._error = trace.StatusCode.ERROR
        self._kinds = {"server": trace.SpanKind.SERVER, "internal": trace.SpanKind.INTERNAL}
        # W3C trace context only, whatever OTEL_PROPAGATORS says: it is what we document.
        self._propagator = TraceContextTextMapPropagator()
        resource = Resource.create(
            {
                "service.name": settings.service_name,
                "service.version": settings.service_version,
            }
        )
        self.provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio))
        )
        if exporter is None:
            exporter = OTLPSpanExporter(
                endpoint=settings.endpoint, insecure=settings.endpoint.startswith("http://")
            )
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        # Our own provider, not the global one: a library in the process cannot redirect it.
        self.tracer = self.provider.get_tracer("modelfleet")

    def extract(self, carrier: Mapping[str, str]) -> Any:
        return self._propagator.extract(carrier) if carrier else None

    @contextlib.contextmanager
    def span(
        self,
        name: str,
        *,
        carrier: Mapping[str, str] | None = None,
        kind: str = "internal",
        attributes: Mapping[str, Any] | None = None,
    ) -> Iterator[Any]:
        """A span current in this task; an exception ends it with an error status (and its
        reason, for our errors) and goes on."""
        parent = self.extract(carrier) if carrier else None
        with self.tracer.start_as_current_span(
            name,
            context=parent,
            kind=self._kinds[kind],
            attributes=dict(attributes or {}),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except BaseException as exc:
                self.fail(span, exc)
                raise

    def fail(self, span: Any, exc: BaseException) -> None:
        span.set_attribute(OUTCOME, "failure")
        span.set_attribute(ERROR_REASON, getattr(exc, "reason", "") or type(exc).__name__)
        span.set_status(self._status(self._error, str(exc)[:200]))

    def record(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        parent: Any,
        attributes: Mapping[str, Any],
        error: str = "",
    ) -> None:
        """A span that already happened (queue wait, inference, a shadow run), as a child of
        the span ``parent``; ``error`` non-empty marks it failed."""
        ctx = self._trace.set_span_in_context(parent)
        span = self.tracer.start_span(
            name, context=ctx, attributes=dict(attributes), start_time=start_ns
        )
        if error:
            span.set_attribute(ERROR_REASON, error)
            span.set_status(self._status(self._error, error))
        span.end(end_time=end_ns)

    def current_span(self) -> Any:
        return self._trace.get_current_span()

    def shutdown(self) -> None:
        # Flushes what the batch processor still holds (bounded by the exporter's timeout).
        self.provider.shutdown()


_current: Tracing | None = None


def current() -> Tracing | None:
    """This process's tracing, or None when it is off (the common case)."""
    return _current


def start(settings: TracingSettings, exporter: Any = None) -> Tracing | None:
    """Turn tracing on for this process when ``settings.endpoint`` is set; else do nothing.

    ``exporter``: another SpanExporter than OTLP to the endpoint (the unit tests keep spans in
    memory with the SDK's own InMemorySpanExporter)."""
    global _current
    if not settings.endpoint:
        return None
    check_settings(settings.endpoint, settings.sample_ratio)
    if _current is None:
        _current = Tracing(settings, exporter)
    return _current


def stop() -> None:
    global _current
    tracing, _current = _current, None
    if tracing is not None:
        tracing.shutdown()


@contextlib.contextmanager
def span(
    name: str,
    carrier: Mapping[str, str] | None = None,
    attributes: Mapping[str, Any] | None = None,
    kind: str = "internal",
) -> Iterator[Any]:
    """A span when tracing is on; otherwise :data:`NO_SPAN` (set_attribute does nothing)."""
    tracing = _current
    if tracing is None:
        yield NO_SPAN
        return
    with tracing.span(name, carrier=carrier, kind=kind, attributes=attributes) as s:
        yield s


def annotate(**attributes: Any) -> None:
    """Set attributes on the current span (nothing when tracing is off or no span is open)."""
    tracing = _current
    if tracing is None:
        return
    s = tracing.current_span()
    for key, value in attributes.items():
        s.set_attribute(key, value)


def event(name: str, start_ns: int, attributes: Mapping[str, Any]) -> None:
    """A span from ``start_ns`` until now, under the current span (if any): a step the hub's
    timer took, recorded once its outcome is known."""
    tracing = _current
    if tracing is None:
        return
    tracing.record(name, start_ns, time.time_ns(), tracing.current_span(), attributes)


def perf_to_epoch_ns(perf_s: float, offset_ns: int) -> int:
    """A ``time.perf_counter()`` reading as epoch nanoseconds, given ``epoch_offset_ns()``."""
    return int(perf_s * 1e9) + offset_ns


def epoch_offset_ns() -> int:
    """What to add to perf_counter nanoseconds for wall-clock ones (taken afresh per use, so a
    stepped wall clock shifts only the spans recorded after it)."""
    return time.time_ns() - time.perf_counter_ns()


class MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the trace context a CLI was started with) to every call."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self.metadata = metadata

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), *self.metadata])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)
