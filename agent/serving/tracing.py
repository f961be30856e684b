"""The data plane's spans, recorded once a request (or its shadow copy) is done.

Only reached when tracing is on (a request carries ``InferRequest.trace``): the batcher's
:class:`Timing` already holds when the batch started computing and how long it queued, so the
queue and inference spans are written afterwards with those times, and the serving path keeps
no span objects of its own. Span names and attributes are documented in docs/monitoring.md.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from modelfleet.kernel import tracing
from modelfleet.kernel.tracing import MODEL, OUTCOME, VERSION, epoch_offset_ns, perf_to_epoch_ns

if TYPE_CHECKING:
    from modelfleet.agent.serving.batcher import Timing
    from modelfleet.agent.serving.routing import Route
    from modelfleet.agent.slots import LoadedVersion

ARM = "modelfleet.arm"
BATCH_SIZE = "modelfleet.batch_size"
ROWS = "modelfleet.rows"
SHADOW_VERSION = "modelfleet.shadow_version"
# A request outside any comparison is answered by the active version.
NO_ARM = "active"


def served(
    span: Any, version: LoadedVersion, route: Route | None, timing: Timing, rows: int
) -> None:
    """Attributes of a served request's span, and its queue and inference children."""
    t = tracing.current()
    if t is None or not span.is_recording():
        # Not sampled: no attributes or children would be kept.
        return
    attrs = {
        MODEL: version.name,
        VERSION: version.version,
        ARM: route.arm if route is not None else NO_ARM,
        BATCH_SIZE: timing.batch_rows or rows,
        ROWS: rows,
    }
    for key, value in attrs.items():
        span.set_attribute(key, value)
    span.set_attribute(OUTCOME, "success")
    offset = epoch_offset_ns()
    started = timing.started
    if not started:
        return
    t.record(
        "modelfleet.queue",
        perf_to_epoch_ns(started - timing.queue_s, offset),
        perf_to_epoch_ns(started, offset),
        span,
        attrs,
    )
    t.record(
        "modelfleet.inference",
        perf_to_epoch_ns(started, offset),
        perf_to_epoch_ns(started + timing.compute_s, offset),
        span,
        attrs,
    )


def failed(span: Any, version: LoadedVersion | None) -> None:
    """What is known of a failed request (the span's exit adds the error reason)."""
    if version is not None:
        span.set_attribute(MODEL, version.name)
        span.set_attribute(VERSION, version.version)


def shadow_ran(
    parent: Any,
    primary: LoadedVersion,
    shadow: LoadedVersion,
    start_ns: int,
    outcome: str,
    error: str = "",
) -> None:
    """The shadow run of a request, a child of its request span, recorded after the response."""
    t = tracing.current()
    # The request span has ended by now (is_recording is False): ask its sampling decision.
    if t is None or not parent.get_span_context().trace_flags.sampled:
        return
    t.record(
        "modelfleet.shadow",
        start_ns,
        time.time_ns(),
        parent,
        {
            MODEL: primary.name,
            VERSION: primary.version,
            ARM: "shadow",
            SHADOW_VERSION: shadow.version,
            OUTCOME: outcome,
        },
        error,
    )
