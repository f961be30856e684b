"""Shadow runs: a copy of a request answered by the active version, run again on the candidate.

The data plane offers the copy once the primary response is built (:meth:`ShadowRunner.offer`
is a ``put_nowait``); the response goes to the client whatever happens here. A bounded queue
holds copies for ``workers`` threads of their own, each running the shadow version's session
directly (not a serving thread, not the candidate's batcher: a shadow copy is not a served
request of the candidate and must not take capacity from real ones). A full queue drops the
copy and counts it. Comparing the outputs (:func:`compare_outputs`) and counting happen on the
shadow thread too, so the event loop does nothing for a copy after offering it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from modelfleet.agent.serving import tracing as spans

if TYPE_CHECKING:
    from modelfleet.agent.metrics import AgentMetrics
    from modelfleet.agent.slots import LoadedVersion

log = logging.getLogger(__name__)

# |primary| + REL_EPS is the denominator of the relative difference: outputs near zero would
# otherwise turn any rounding into an enormous relative error.
REL_EPS = 1e-6
# Nice value of the shadow threads (Linux): below the serving threads' when cores are short.
SHADOW_NICE = 10
# A row is a probability vector when it is non-negative and sums to 1 within this.
PROB_SUM_TOL = 1e-3


@dataclass(frozen=True)
class OutputCompare:
    """One output tensor of one request, primary against shadow."""

    output: str
    ok: bool  # False: the shadow lacks the output or returns another shape or kind
    abs_diff: float = 0.0
    rel_diff: float = 0.0
    # Class scores (last dimension > 1): did every row's arg-max agree? None: not class scores.
    top1_agree: bool | None = None
    # Jensen-Shannon divergence in bits, one per row, when both sides are probability vectors.
    js: tuple[float, ...] = ()


def js_divergence_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise Jensen-Shannon divergence (base 2, so 0..1) of probability rows ``p`` and ``q``."""
    p = p / p.sum(axis=-1, keepdims=True)
    q = q / q.sum(axis=-1, keepdims=True)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> np.ndarray:
        # 0 * log(0 / m) is 0 by convention; where a > 0, m >= a / 2 > 0.
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(
                a > 0, a * np.log2(np.where(a > 0, a, 1.0) / np.where(m > 0, m, 1.0)), 0
            )
        return terms.sum(axis=-1)

    return np.clip(0.5 * kl(p) + 0.5 * kl(q), 0.0, 1.0)


def _is_probability(a: np.ndarray) -> bool:
    return bool((a >= 0).all() and np.abs(a.sum(axis=-1) - 1.0).max() <= PROB_SUM_TOL)


def compare_output(name: str, primary: np.ndarray, shadow: np.ndarray | None) -> OutputCompare:
    """One output of one request. Few numpy calls: outputs are small, so each call's overhead,
    paid on a shadow thread while holding the GIL, is what the serving loop would feel."""
    if shadow is None or primary.shape != shadow.shape:
        return OutputCompare(name, False)
    numeric = "biuf"
    if primary.dtype.kind not in numeric or shadow.dtype.kind not in numeric:
        # Strings and the like: equal or not, as a diff of 0 or 1.
        same = bool(np.array_equal(primary, shadow))
        return OutputCompare(name, True, 0.0 if same else 1.0, 0.0 if same else 1.0)
    if primary.size == 0:
        return OutputCompare(name, True)
    p = primary.astype(np.float64)
    s = shadow.astype(np.float64)
    diff = np.abs(p - s)
    abs_diff = float(diff.max())
    finite = math.isfinite(abs_diff)
    if not finite:
        # A NaN on one side only is as different as it gets; NaN on both is agreement.
        both_nan = np.isnan(p) & np.isnan(s)
        diff = np.where(both_nan, 0.0, np.where(np.isnan(diff), np.inf, diff))
        abs_diff = float(diff.max())
        p = np.nan_to_num(p)
    rel_diff = float((diff / (np.abs(p) + REL_EPS)).max())
    top1 = None
    js: tuple[float, ...] = ()
    if finite and p.ndim >= 1 and p.shape[-1] > 1:
        top1 = bool((p.argmax(axis=-1) == s.argmax(axis=-1)).all())
        if _is_probability(p) and _is_probability(s):
            js = tuple(js_divergence_bits(p, s).reshape(-1).tolist())
    return OutputCompare(name, True, abs_diff, rel_diff, top1, js)


def compare_outputs(
    primary: dict[str, np.ndarray], shadow: dict[str, np.ndarray]
) -> list[OutputCompare]:
    return [compare_output(name, arr, shadow.get(name)) for name, arr in primary.items()]


@dataclass
class _Copy:
    primary: LoadedVersion
    shadow: LoadedVersion
    feed: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    # The request's span when tracing is on: the shadow run's span goes under it.
    trace: Any = None


class _OutputSeries:
    def __init__(self, m: AgentMetrics, labels: tuple[str, str, str]) -> None:
        self.abs_diff = m.shadow_abs_diff.labels(*labels)
        self.rel_diff = m.shadow_rel_diff.labels(*labels)
        self.js = m.shadow_js_divergence.labels(*labels)
        self.agree = m.shadow_top1.labels(*labels, "agree")
        self.disagree = m.shadow_top1.labels(*labels, "disagree")


class _Series:
    """Prometheus children of one (primary, shadow) pair."""

    def __init__(self, m: AgentMetrics, primary: LoadedVersion, shadow: LoadedVersion) -> None:
        self.m = m
        # Weak: the cache must not keep an unloaded version's session alive, and an id is
        # reused once its object is gone.
        self._refs = (weakref.ref(primary), weakref.ref(shadow))
        self.primary = (primary.name, str(primary.version))
        labels = (*self.primary, str(shadow.version))
        self.compared = m.shadow_requests.labels(*labels, "compared")
        self.seconds = m.shadow_seconds.labels(*labels)
        self.outputs: dict[str, _OutputSeries] = {}

    def of(self, primary: LoadedVersion, shadow: LoadedVersion) -> bool:
        return self._refs[0]() is primary and self._refs[1]() is shadow

    def output(self, name: str) -> _OutputSeries:
        out = self.outputs.get(name)
        if out is None:
            out = self.outputs[name] = _OutputSeries(self.m, (*self.primary, name))
        return out


class ShadowRunner:
    """The bounded queue and its worker threads; counts into the primary version's telemetry.

    The event loop only ever does :meth:`offer` (a ``put_nowait``, or counting a drop). The
    workers are plain threads, not tasks: running the shadow, comparing and counting happen
    there, so a copy costs the loop no callback at all. Their counts go into
    :class:`agent.telemetry.ShadowCells` under its lock and into Prometheus (thread-safe).
    """

    def __init__(self, metrics: AgentMetrics, queue_max: int = 64, workers: int = 1) -> None:
        self.metrics = metrics
        self.queue_max = queue_max
        self.workers = max(1, workers)
        self._queue: queue.Queue[_Copy | None] | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._series: dict[tuple[int, int], _Series] = {}
        self.closed = False

    def _start(self) -> queue.Queue[_Copy | None]:
        with self._lock:
            if self._queue is None:
                q: queue.Queue[_Copy | None] = queue.Queue(max(self.queue_max, 1))
                self._threads = [
                    threading.Thread(target=self._work, args=(q,), name=f"shadow-{i}", daemon=True)
                    for i in range(self.workers)
                ]
                for t in self._threads:
                    t.start()
                self._queue = q
            return self._queue

    def offer(
        self,
        primary: LoadedVersion,
        shadow: LoadedVersion,
        feed: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        trace: Any = None,
    ) -> bool:
        """Queue a copy (never waits); False when it was dropped."""
        if self.closed:
            return False
        if self.queue_max <= 0:
            self._record_drop(primary, shadow, outputs)
            return False
        q = self._queue or self._start()
        try:
            q.put_nowait(_Copy(primary, shadow, feed, outputs, trace))
        except queue.Full:
            self._record_drop(primary, shadow, outputs)
            return False
        return True

    def _record_drop(
        self, primary: LoadedVersion, shadow: LoadedVersion, outputs: dict[str, np.ndarray]
    ) -> None:
        primary.telemetry_shadow(shadow.version, list(outputs)).dropped()
        self.metrics.shadow_requests.labels(
            primary.name, str(primary.version), str(shadow.version), "dropped"
        ).inc()

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def _work(self, q: queue.Queue[_Copy | None]) -> None:
        # Linux applies a thread id's nice value to that thread alone: where cores are short,
        # the scheduler then gives the serving threads and the event loop the CPU first.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICE)
        while True:
            copy = q.get()
            if copy is None:
                return
            start_ns = time.time_ns() if copy.trace is not None else 0
            try:
                elapsed, compared = _run(copy)
            except Exception as exc:  # the shadow failing is a finding, never a crash
                self._record(copy, None, 0.0)
                log.debug(
                    "shadow run of %s v%d failed: %s", copy.shadow.name, copy.shadow.version, exc
                )
                if copy.trace is not None:
                    spans.shadow_ran(
                        copy.trace,
                        copy.primary,
                        copy.shadow,
                        start_ns,
                        "failed",
                        type(exc).__name__,
                    )
            else:
                self._record(copy, compared, elapsed)
                if copy.trace is not None:
                    agreed = all(c.ok for c in compared)
                    spans.shadow_ran(
                        copy.trace,
                        copy.primary,
                        copy.shadow,
                        start_ns,
                        "compared" if agreed else "failed",
                        "" if agreed else "comparison_failed",
                    )

    def _record(self, copy: _Copy, compared: list[OutputCompare] | None, elapsed: float) -> None:
        p, s = copy.primary, copy.shadow
        cells = p.telemetry_shadow(s.version, list(copy.outputs))
        m = self.metrics
        labels = (p.name, str(p.version), str(s.version))
        if compared is None or not all(c.ok for c in compared):
            cells.failed()
            m.shadow_requests.labels(*labels, "failed").inc()
            return
        cells.compared(compared, elapsed)
        # The label children are looked up once per (primary, shadow): the lookup costs more
        # than the observation, and this thread holds the GIL the serving loop wants.
        key = (id(p), id(s))
        series = self._series.get(key)
        if series is None or not series.of(p, s):
            series = self._series[key] = _Series(m, p, s)
        series.compared.inc()
        series.seconds.observe(elapsed)
        for c in compared:
            out = series.output(c.output)
            out.abs_diff.observe(c.abs_diff)
            out.rel_diff.observe(c.rel_diff)
            for js in c.js:
                out.js.observe(js)
            if c.top1_agree is not None:
                (out.agree if c.top1_agree else out.disagree).inc()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking copies; queued ones are let go, a running one finishes (bounded)."""
        self.closed = True
        q = self._queue
        if q is None:
            return
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()
        for _ in self._threads:
            q.put(None)
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            # Off the loop: a shadow run in progress may take a while to finish.
            await asyncio.to_thread(t.join, max(0.0, deadline - time.monotonic()))


def _run(copy: _Copy) -> tuple[float, list[OutputCompare]]:
    """On a shadow thread: run the shadow version, then compare (neither touches the loop)."""
    model = copy.shadow.model
    start = time.perf_counter()
    results = model.run_prepared(model.prepare(copy.feed))
    elapsed = time.perf_counter() - start
    return elapsed, compare_outputs(copy.outputs, results)


__all__ = [
    "OutputCompare",
    "ShadowRunner",
    "compare_output",
    "compare_outputs",
    "js_divergence_bits",
]
