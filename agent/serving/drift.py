"""Drift on the agent: live rows of each loaded version against its bundle's reference.

Per loaded version whose bundle carries ``reference.json``, a :class:`DriftSampler` holds a
:class:`kernel.drift.DriftWindow`. After a successful inference the data plane offers the
request's inputs and outputs (:meth:`DriftSampler.offer`); the sampler decides at once whether
to count them (``drift_sample_rate``, then at most ``drift_max_rows_per_s`` rows per second)
and leaves the copy and binning to the event loop's next turn (``call_soon``), so they run after
the response is handed to gRPC, not before. Every ``drift_window_s`` the :class:`DriftMonitor`
closes each window: PSI, Jensen-Shannon distance and binned KS per feature
(``kernel.drift.score``), set on /metrics and queued into the next telemetry report as a
``DriftReport`` (only scores and counts leave the node; the outbox makes them durable and
counted once by the hub).

Why a per-second row cap and not only a rate: binning costs about 2 us per request plus 0.1 us
per row (docs/benchmarks.md#drift-benchdrift), a few percent of a tiny model's time per
request, so under low traffic every request is counted (rate 1.0: most signal per window), and
under high traffic the cap bounds the cost to about ``cap x 0.1 us`` plus the per-request floor
for the requests admitted: 250 rows/s is 75,000 rows per 5-minute window, more than twice the
30,000 that detect a 0.5 standard-deviation shift (docs/monitoring.md). At 1000 rows/s drift
cost 5 to 9% of throughput at concurrency 16 on a small model (BENCH=monitoring); at 250 it
does not show. The cap admits the first
rows of each second, a bias only for traffic whose distribution changes within a second.

What a crash loses: the window in progress (memory only) and closed windows not yet in a
telemetry report (at most one report interval). Once cut into a report they are on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from modelfleet.kernel.drift import DriftScores, DriftWindow, Reference
from modelfleet.kernel.errors import BundleError
from modelfleet.protos import fleet_pb2 as pb

if TYPE_CHECKING:
    from modelfleet.agent.metrics import AgentMetrics
    from modelfleet.agent.slots import LoadedVersion

log = logging.getLogger(__name__)


class DriftSampler:
    """One loaded version's drift window and the sampling in front of it.

    :meth:`offer` runs on the event loop only (the data plane), so its counters need no lock;
    the window itself is thread-safe (the monitor snapshots it from a worker thread).
    """

    def __init__(
        self,
        model: str,
        version: int,
        reference: Reference,
        *,
        sample_rate: float = 1.0,
        max_rows_per_s: int = 250,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.model = model
        self.version = version
        self.reference = reference
        self.window = DriftWindow(reference)
        self.sample_rate = sample_rate
        self.max_rows_per_s = max_rows_per_s
        self.clock = clock
        self.rng = rng or random.Random()
        self.tensors = frozenset(t.tensor for t in reference.tensors)
        self.started_unix = time.time()
        # Counters since the last window closed (event loop only).
        self.offered = 0
        self.skipped = 0
        self.capped = 0
        self.errors = 0
        self._second = -1
        self._second_rows = 0
        self.seen_loaded = False

    def offer(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """A successful request's tensors; counted now or never (never blocks, never raises)."""
        self.offered += 1
        if self.sample_rate < 1.0 and self.rng.random() >= self.sample_rate:
            self.skipped += 1
            return
        if self.max_rows_per_s:
            now = int(self.clock())
            if now != self._second:
                self._second, self._second_rows = now, 0
            if self._second_rows >= self.max_rows_per_s:
                self.capped += 1
                return
            first = next(iter(inputs.values()), None)
            self._second_rows += first.shape[0] if first is not None and first.ndim else 1
        arrays = {k: v for k, v in inputs.items() if k in self.tensors}
        arrays.update((k, v) for k, v in outputs.items() if k in self.tensors)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._add(arrays)
            return
        # After this task yields: the response is encoded and handed to gRPC first. The arrays
        # are the request's and the run's own (nothing reuses them), so deferring is safe.
        loop.call_soon(self._add, arrays)

    def _add(self, arrays: Mapping[str, np.ndarray]) -> None:
        try:
            self.window.add(arrays)
        except (BundleError, ValueError, TypeError) as exc:
            self.errors += 1
            if self.errors == 1:
                log.warning(
                    "model %s version %d: drift cannot count a request (%s); such requests are "
                    "skipped and counted as errors",
                    self.model,
                    self.version,
                    exc,
                )


def drift_report(
    scores: list[DriftScores],
    reference: Reference,
    start_unix: float,
    end_unix: float,
    offered: int,
    sampled: int,
) -> pb.DriftReport:
    roles = {t.tensor: t.role for t in reference.tensors}
    features = []
    for s in scores:
        f = pb.DriftFeature(
            tensor=s.tensor,
            name=s.feature,
            role=roles.get(s.tensor, "input"),
            kind=s.kind,
            psi=s.psi,
            js=s.js,
            rows=s.rows,
            counts=list(s.counts),
        )
        if s.ks is not None:
            f.ks = s.ks
        features.append(f)
    return pb.DriftReport(
        window_start_unix=start_unix,
        window_end_unix=end_unix,
        offered=offered,
        sampled=sampled,
        features=features,
    )


class DriftMonitor:
    """All drift samplers of the agent: attaches them to loaded versions, closes windows.

    ``report`` receives each closed window as ``(model, version, DriftReport)`` (fleet mode:
    the telemetry aggregator, which puts it into the next report); None: /metrics only.
    """

    def __init__(
        self,
        metrics: AgentMetrics,
        *,
        window_s: float = 300.0,
        sample_rate: float = 1.0,
        max_rows_per_s: int = 250,
        metrics_features: int = 32,
        report: Callable[[str, int, pb.DriftReport], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.window_s = window_s
        self.sample_rate = sample_rate
        self.max_rows_per_s = max_rows_per_s
        self.metrics_features = metrics_features
        self.report = report
        self.clock = clock
        self._lock = threading.Lock()
        self._samplers: dict[tuple[str, int], DriftSampler] = {}
        # Features with a /metrics series now, per version (replaced every window).
        self._exported: dict[tuple[str, int], set[str]] = {}

    def attach(self, version: LoadedVersion) -> None:
        """Give ``version`` a sampler if its bundle has a reference (the loader thread calls
        this; a reference that cannot be read leaves the version serving without drift)."""
        try:
            reference = version.bundle.reference()
        except BundleError as exc:
            log.warning(
                "model %s version %d: no drift accounting: %s", version.name, version.version, exc
            )
            return
        if reference is None:
            return
        sampler = DriftSampler(
            version.name,
            version.version,
            reference,
            sample_rate=self.sample_rate,
            max_rows_per_s=self.max_rows_per_s,
        )
        sampler.started_unix = self.clock()
        with self._lock:
            self._samplers[(version.name, version.version)] = sampler
        version.drift = sampler

    def close_windows(self, loaded: set[tuple[str, int]] | None = None) -> list[pb.DriftReport]:
        """Close every sampler's window; versions not in ``loaded`` (when given) are closed for
        the last time and forgotten. Returns the reports made (windows without rows make none).

        The counters are read and reset here: call it on the event loop (:meth:`run` does), the
        only thread that writes them; the binning and scoring of what is pending happen here
        too, a few milliseconds per version.
        """
        now = self.clock()
        with self._lock:
            samplers = list(self._samplers.items())
        out = []
        for key, sampler in samplers:
            offered, sampler.offered = sampler.offered, 0
            skipped, sampler.skipped = sampler.skipped, 0
            capped, sampler.capped = sampler.capped, 0
            sampler.errors = 0
            start, sampler.started_unix = sampler.started_unix, now
            counts = sampler.window.snapshot()
            labels = (sampler.model, str(sampler.version))
            sampled = counts.offered
            if sampled:
                self.metrics.drift_rows.labels(*labels, "sampled").inc(sampled)
            if skipped:
                self.metrics.drift_rows.labels(*labels, "skipped").inc(skipped)
            if capped:
                self.metrics.drift_rows.labels(*labels, "capped").inc(capped)
            scores = counts.scores(sampler.reference)
            if scores:
                self._export(key, scores)
                report = drift_report(scores, sampler.reference, start, now, offered, sampled)
                out.append(report)
                if self.report is not None:
                    self.report(sampler.model, sampler.version, report)
            if loaded is None:
                continue
            if key in loaded:
                sampler.seen_loaded = True
            elif sampler.seen_loaded:
                # Unloaded (a version still loading has not been seen loaded yet, and stays).
                with self._lock:
                    if self._samplers.get(key) is sampler:
                        del self._samplers[key]
                self._exported.pop(key, None)
        return out

    def _export(self, key: tuple[str, int], scores: list[DriftScores]) -> None:
        m = self.metrics
        model, version = key[0], str(key[1])
        top = sorted(scores, key=lambda s: s.psi, reverse=True)[: self.metrics_features]
        keep = {s.feature for s in top}
        for name in self._exported.get(key, set()) - keep:
            for gauge in (m.drift_psi, m.drift_js, m.drift_ks):
                with contextlib.suppress(KeyError):
                    gauge.remove(model, version, name)
        for s in top:
            m.drift_psi.labels(model, version, s.feature).set(s.psi)
            m.drift_js.labels(model, version, s.feature).set(s.js)
            if s.ks is not None:
                m.drift_ks.labels(model, version, s.feature).set(s.ks)
        self._exported[key] = keep

    async def run(self, stop: asyncio.Event, loaded: Callable[[], set[tuple[str, int]]]) -> None:
        """Close the windows every ``window_s`` until ``stop``; once more at the end, so the
        last partial window is reported with the final telemetry."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.window_s)
            try:
                self.close_windows(loaded())
            except Exception:  # a bug here must not end drift for the agent's lifetime
                log.exception("drift: closing the windows failed")


__all__ = ["DriftMonitor", "DriftSampler", "drift_report"]
