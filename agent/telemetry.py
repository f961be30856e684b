"""Per model version telemetry, aggregated on the agent and cut into reports every interval.

What the agent counts for every (model, version) between two reports (see docs/telemetry.md):

- ``requests``: every request accounted by the data plane, successful or not; ``failures`` and
  ``failures_by_reason`` the failed ones, by the error's ``reason`` (``shape``, ``datatype``,
  ``not_found``, ...). Requests whose model is unknown to the agent count under model
  ``_unknown`` (client-supplied names are unbounded), those that resolved no version under
  version 0.
- latency histograms in seconds: ``request`` (decoded -> response ready) and ``queue`` (waiting for
  a batch to start) per successful request, ``compute`` per executed batch; ``batch_size`` in rows
  per executed batch. The bucket bounds are the Prometheus buckets of :mod:`agent.metrics`, so
  the agent's own /metrics and the hub's telemetry agree bucket for bucket.
- health-gate verdicts (passed / failed), switches to the version (swaps) and rollbacks to it.
- per report: the process's resident memory and the CPU seconds it used during the interval.

Cost on the request path: a dict lookup is done once per loaded version (the :class:`LoadedVersion`
keeps its :class:`VersionCounters`); a request adds a few integers and two ``bisect`` calls.
Every hook runs on the event loop (the data plane, the batcher's completion callback and the slot
switches all do), and so does :meth:`TelemetryAggregator.snapshot`, so the counters need no
lock. The only call from another thread is :meth:`TelemetryAggregator.version` (a candidate
version is built on the loader thread), which takes a small lock shared with the snapshot.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

from agent.metrics import BATCH_BUCKETS, LATENCY_BUCKETS
from protos import fleet_pb2 as pb

LATENCY_BOUNDS: tuple[float, ...] = tuple(float(b) for b in LATENCY_BUCKETS)
BATCH_BOUNDS: tuple[float, ...] = tuple(float(b) for b in BATCH_BUCKETS)
# Client-supplied model names are unbounded; only models the agent knows get their own entry.
UNKNOWN_MODEL = "_unknown"


class HistogramAcc:
    """Non-cumulative bucket counts: counts[i] observations <= bounds[i]; the last is +Inf."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le semantics).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def take(self) -> pb.Histogram:
        out = pb.Histogram(bounds=self.bounds, counts=self.counts, sum=self.sum, count=self.count)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0
        return out


class VersionCounters:
    """One model version's counters since the last report."""

    __slots__ = (
        "batch",
        "compute",
        "failures",
        "gate_failed",
        "gate_passed",
        "model",
        "queue",
        "reasons",
        "request",
        "requests",
        "rollbacks",
        "swaps",
        "version",
    )

    def __init__(self, model: str, version: int) -> None:
        self.model = model
        self.version = version
        self.requests = 0
        self.failures = 0
        self.reasons: dict[str, int] = {}
        self.request = HistogramAcc(LATENCY_BOUNDS)
        self.queue = HistogramAcc(LATENCY_BOUNDS)
        self.compute = HistogramAcc(LATENCY_BOUNDS)
        self.batch = HistogramAcc(BATCH_BOUNDS)
        self.gate_passed = 0
        self.gate_failed = 0
        self.swaps = 0
        self.rollbacks = 0

    # -- hooks (event loop) ---------------------------------------------------------------------

    def ok(self, request_s: float, queue_s: float) -> None:
        self.requests += 1
        self.request.observe(request_s)
        self.queue.observe(queue_s)

    def failed(self, reason: str) -> None:
        self.requests += 1
        self.failures += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def batch_done(self, rows: int, compute_s: float) -> None:
        self.batch.observe(rows)
        self.compute.observe(compute_s)

    # -- reporting ------------------------------------------------------------------------------

    def idle(self) -> bool:
        return not (
            self.requests or self.batch.count or self.gate_passed or self.gate_failed
            or self.swaps or self.rollbacks
        )  # fmt: skip

    def take(self) -> pb.VersionTelemetry:
        out = pb.VersionTelemetry(
            model=self.model,
            version=self.version,
            requests=self.requests,
            failures=self.failures,
            failures_by_reason=self.reasons,
            request_latency=self.request.take(),
            queue_latency=self.queue.take(),
            compute_latency=self.compute.take(),
            batch_size=self.batch.take(),
            gate_passed=self.gate_passed,
            gate_failed=self.gate_failed,
            swaps=self.swaps,
            rollbacks=self.rollbacks,
        )
        self.requests = self.failures = 0
        self.reasons = {}
        self.gate_passed = self.gate_failed = self.swaps = self.rollbacks = 0
        return out


class ProcessSampler:
    """Resident memory now, and CPU seconds (user + system) since the previous sample."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._cpu = self.cpu_total()

    @staticmethod
    def cpu_total() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    def rss_bytes(self) -> int:
        try:
            # statm: size resident shared ... in pages; the current RSS, not the peak.
            with open("/proc/self/statm", "rb") as fh:
                return int(fh.read().split()[1]) * self._page
        except (OSError, IndexError, ValueError):
            # Not Linux: the peak is the best the platform offers (kilobytes on Linux/BSD).
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def cpu_delta(self) -> float:
        now = self.cpu_total()
        delta, self._cpu = max(0.0, now - self._cpu), now
        return delta


class TelemetryAggregator:
    """All versions' counters; :meth:`snapshot` cuts them into one report's worth (no seq yet).

    Entries live as long as the process: a loaded version (or a request still in flight on an
    unloaded one) keeps adding to its entry, so dropping entries could lose counts, and one small
    entry per version ever loaded costs nothing.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._versions: dict[tuple[str, int], VersionCounters] = {}
        self._lock = threading.Lock()
        self.started = clock()
        self.process = ProcessSampler()

    def version(self, model: str, version: int) -> VersionCounters:
        key = (model, version)
        counters = self._versions.get(key)
        if counters is None:
            with self._lock:
                counters = self._versions.setdefault(key, VersionCounters(model, version))
        return counters

    # -- hooks that have no LoadedVersion at hand (event loop) ----------------------------------

    def failed(self, model: str, version: int, reason: str) -> None:
        self.version(model, version).failed(reason)

    def gate(self, model: str, version: int, passed: bool) -> None:
        counters = self.version(model, version)
        if passed:
            counters.gate_passed += 1
        else:
            counters.gate_failed += 1

    def switched(self, model: str, version: int, *, rollback: bool) -> None:
        counters = self.version(model, version)
        if rollback:
            counters.rollbacks += 1
        else:
            counters.swaps += 1

    # -- reporting (event loop) -----------------------------------------------------------------

    def pending(self) -> bool:
        """Anything counted since the last snapshot?"""
        with self._lock:
            return any(not c.idle() for c in self._versions.values())

    def snapshot(self, serving: Iterable[tuple[str, int]] = ()) -> pb.TelemetryReport:
        """The interval since the previous snapshot as a report (``seq`` is the outbox's job).

        Versions in ``serving`` (the active ones) are included even when idle, so the hub sees
        which agents are on a version while it gets no traffic; other idle versions are left out.
        """
        now = self.clock()
        start, self.started = self.started, now
        serving = set(serving)
        for model, version in serving:
            self.version(model, version)
        with self._lock:
            entries = list(self._versions.items())
        versions = [
            c.take() for key, c in sorted(entries) if key in serving or not c.idle()
        ]  # fmt: skip
        return pb.TelemetryReport(
            start_unix=start,
            end_unix=now,
            versions=versions,
            rss_bytes=self.process.rss_bytes(),
            cpu_seconds=self.process.cpu_delta(),
        )


__all__ = [
    "BATCH_BOUNDS",
    "LATENCY_BOUNDS",
    "UNKNOWN_MODEL",
    "HistogramAcc",
    "ProcessSampler",
    "TelemetryAggregator",
    "VersionCounters",
]
