"""Shadow runs: a copy of a request answered by the active version, run again on the candidate.

The data plane offers the copy once the primary response is built (:meth:`ShadowRunner.offer`
is a ``put`` on a C queue, or counting a drop); the response goes to the client whatever
happens here. A bounded queue holds copies for ``workers`` threads of their own, each running
the shadow version's session directly (not a serving thread, not the candidate's batcher: a
shadow copy is not a served request of the candidate and must not take capacity from real
ones). A full queue drops the copy and counts it.

Comparing (:func:`compare_batch`) and counting happen on the shadow thread, in batches: a
worker woken by a copy lets others gather for :data:`BATCH_WINDOW_S`, then compares all of
them per output in one numpy pass and counts them in one go. On CPython that thread holds the
GIL while it compares, and the event loop waits for it: per copy, a numpy call per statistic
and a counter update per value cost several times what a stacked pass does (docs/benchmarks.md,
traffic). The shadow model itself still runs once per copy, on that copy's feed alone, so
what is compared is what the candidate would have answered to that request.
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
# How long a woken worker lets copies gather before comparing them together. Copies wait at
# most this long (plus the batch before); at 2,000 copies/s about ten share one pass.
BATCH_WINDOW_S = 0.005


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


@dataclass(frozen=True)
class BatchCompare:
    """One output tensor over a batch of copies, primary against shadow: index i is copy i.

    The same statistics as :class:`OutputCompare`, as arrays: ``ok`` (bool), ``abs_diff`` and
    ``rel_diff`` (float64), ``top1`` (int8: 1 agreed, 0 disagreed, -1 not class scores), and
    the Jensen-Shannon rows of all copies flattened into ``js`` with ``js_copy`` naming the
    copy of each.
    """

    output: str
    ok: np.ndarray
    abs_diff: np.ndarray
    rel_diff: np.ndarray
    top1: np.ndarray
    js: np.ndarray
    js_copy: np.ndarray

    def one(self, i: int) -> OutputCompare:
        if not self.ok[i]:
            return OutputCompare(self.output, False)
        top1 = int(self.top1[i])
        return OutputCompare(
            self.output,
            True,
            float(self.abs_diff[i]),
            float(self.rel_diff[i]),
            None if top1 < 0 else bool(top1),
            tuple(self.js[self.js_copy == i].tolist()),
        )


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


def _probability(a: np.ndarray) -> np.ndarray:
    """Per copy (first axis): are all its rows probability vectors?"""
    n = a.shape[0]
    return (a >= 0).reshape(n, -1).all(axis=1) & (
        np.abs(a.sum(axis=-1) - 1.0).reshape(n, -1).max(axis=1) <= PROB_SUM_TOL
    )


_NO_JS = np.zeros(0, np.float64)
_NO_COPY = np.zeros(0, np.intp)


def _compare_stacked(
    p_in: np.ndarray, s_in: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Copies stacked on a new first axis, same shape and numeric kind on both sides:
    (abs_diff, rel_diff, top1, js, js_copy) in a fixed number of numpy calls."""
    n = p_in.shape[0]
    top1 = np.full(n, -1, np.int8)
    if p_in.size == 0:
        zeros = np.zeros(n, np.float64)
        return zeros, zeros.copy(), top1, _NO_JS, _NO_COPY
    p = p_in.astype(np.float64)
    s = s_in.astype(np.float64)
    diff = np.abs(p - s)
    abs_diff = diff.reshape(n, -1).max(axis=1)
    finite = np.isfinite(abs_diff)
    all_finite = bool(finite.all())
    if not all_finite:
        # A NaN on one side only is as different as it gets; NaN on both is agreement. Copies
        # whose difference is finite hold no NaN or infinity, so this leaves them as they are.
        both_nan = np.isnan(p) & np.isnan(s)
        diff = np.where(both_nan, 0.0, np.where(np.isnan(diff), np.inf, diff))
        abs_diff = diff.reshape(n, -1).max(axis=1)
        p = np.nan_to_num(p)
    rel_diff = (diff / (np.abs(p) + REL_EPS)).reshape(n, -1).max(axis=1)
    js, js_copy = _NO_JS, _NO_COPY
    if p.ndim >= 2 and p.shape[-1] > 1:
        agree = (p.argmax(axis=-1) == s.argmax(axis=-1)).reshape(n, -1).all(axis=1)
        top1 = agree.astype(np.int8)
        prob = _probability(p) & _probability(s)
        if not all_finite:
            top1[~finite] = -1
            prob &= finite
        if prob.all():
            js = js_divergence_bits(p, s).reshape(-1)
            js_copy = np.repeat(np.arange(n), js.size // n)
        elif prob.any():
            which = np.flatnonzero(prob)
            js = js_divergence_bits(p[which], s[which]).reshape(-1)
            js_copy = np.repeat(which, js.size // which.size)
    return abs_diff, rel_diff, top1, js, js_copy


def compare_batch(
    name: str, primaries: list[np.ndarray], shadows: list[np.ndarray | None]
) -> BatchCompare:
    """Output ``name`` of several copies: ``primaries[i]`` against ``shadows[i]`` (None: the
    shadow lacks the output). Copies whose arrays share shape and dtypes (the usual case: one
    model, one request shape) are stacked and compared in one pass."""
    n = len(primaries)
    ok = np.zeros(n, bool)
    abs_diff = np.zeros(n, np.float64)
    rel_diff = np.zeros(n, np.float64)
    top1 = np.full(n, -1, np.int8)
    js_parts: list[np.ndarray] = []
    copy_parts: list[np.ndarray] = []
    groups: dict[tuple[Any, ...], list[int]] = {}
    # The shadow's array of each copy whose output can be compared at all.
    present: dict[int, np.ndarray] = {}
    for i, (p, s) in enumerate(zip(primaries, shadows, strict=True)):
        if s is not None and p.shape == s.shape:
            groups.setdefault((p.shape, p.dtype, s.dtype), []).append(i)
            present[i] = s
    numeric = "biuf"
    for (_, p_dtype, s_dtype), idx in groups.items():
        ok[idx] = True
        if p_dtype.kind not in numeric or s_dtype.kind not in numeric:
            # Strings and the like: equal or not, as a diff of 0 or 1.
            for i in idx:
                differs = 0.0 if np.array_equal(primaries[i], present[i]) else 1.0
                abs_diff[i] = rel_diff[i] = differs
            continue
        a, r, t, js, js_copy = _compare_stacked(
            np.stack(primaries if len(idx) == n else [primaries[i] for i in idx]),
            np.stack([present[i] for i in idx]),
        )
        at = np.asarray(idx)
        abs_diff[at], rel_diff[at], top1[at] = a, r, t
        if js.size:
            js_parts.append(js)
            copy_parts.append(at[js_copy])
    if not js_parts:
        js, js_copy = _NO_JS, _NO_COPY
    elif len(js_parts) == 1:
        js, js_copy = js_parts[0], copy_parts[0]
    else:
        js, js_copy = np.concatenate(js_parts), np.concatenate(copy_parts)
    return BatchCompare(name, ok, abs_diff, rel_diff, top1, js, js_copy)


def compare_output(name: str, primary: np.ndarray, shadow: np.ndarray | None) -> OutputCompare:
    """One output of one request (a batch of one: the same code as the shadow threads')."""
    return compare_batch(name, [primary], [shadow]).one(0)


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
        self.failed = m.shadow_requests.labels(*labels, "failed")
        self.seconds = m.shadow_seconds.labels(*labels)
        self.outputs: dict[str, _OutputSeries] = {}

    def of(self, primary: LoadedVersion, shadow: LoadedVersion) -> bool:
        return self._refs[0]() is primary and self._refs[1]() is shadow

    def output(self, name: str) -> _OutputSeries:
        out = self.outputs.get(name)
        if out is None:
            out = self.outputs[name] = _OutputSeries(self.m, (*self.primary, name))
        return out


def _observe_all(histogram: Any, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for each of ``values`` (a labelled prometheus_client child).

    Where the child has the layout of prometheus_client 0.20 and later (``_upper_bounds``
    ending in +Inf, one ``_buckets`` value each, ``_sum``), each touched bucket is incremented
    once by its count: per value, ``observe`` costs a few microseconds of Python under the GIL.
    Any other layout gets ``observe`` per value. tests/test_traffic.py holds both to the same
    exposition.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if (
        not isinstance(bounds, list)
        or not isinstance(buckets, list)
        or total is None
        or len(bounds) != len(buckets)
        or not bounds
        or bounds[-1] != math.inf
    ):
        for v in values.tolist():
            histogram.observe(v)
        return
    if not values.size:
        return
    # observe() counts a value in the first bucket whose bound is >= it: searchsorted, left.
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    total.inc(float(values.sum()))
    # A NaN sorts past +Inf: observe() adds it to the sum and to no bucket, and so does this.
    for bucket, n in zip(buckets, counts.tolist(), strict=False):
        if n:
            bucket.inc(n)


class ShadowRunner:
    """The bounded queue and its worker threads; counts into the primary version's telemetry.

    The event loop only ever does :meth:`offer` (a ``put`` on a :class:`queue.SimpleQueue`,
    which is C and takes no Python lock, or counting a drop). The workers are plain threads,
    not tasks: running the shadow, comparing and counting happen there, so a copy costs the
    loop no callback at all. Their counts go into :class:`agent.telemetry.ShadowCells` under
    its lock and into Prometheus (thread-safe).
    """

    def __init__(self, metrics: AgentMetrics, queue_max: int = 64, workers: int = 1) -> None:
        self.metrics = metrics
        self.queue_max = queue_max
        self.workers = max(1, workers)
        self._queue: queue.SimpleQueue[_Copy | None] | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._series: dict[tuple[int, int], _Series] = {}
        self.closed = False

    def _start(self) -> queue.SimpleQueue[_Copy | None]:
        with self._lock:
            if self._queue is None:
                q: queue.SimpleQueue[_Copy | None] = queue.SimpleQueue()
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
        # One thread (the event loop) offers, so the size checked is the size put into.
        if q.qsize() >= self.queue_max:
            self._record_drop(primary, shadow, outputs)
            return False
        q.put(_Copy(primary, shadow, feed, outputs, trace))
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

    def _work(self, q: queue.SimpleQueue[_Copy | None]) -> None:
        # Linux applies a thread id's nice value to that thread alone: where cores are short,
        # the scheduler then gives the serving threads and the event loop the CPU first.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICE)
        while True:
            first = q.get()
            if first is None:
                return
            # Asleep, the thread leaves the GIL to the loop while the batch gathers.
            time.sleep(BATCH_WINDOW_S)
            batch = [first]
            stop = False
            # At most what the queue holds now: a worker that always finds more never counts.
            for _ in range(q.qsize()):
                try:
                    copy = q.get_nowait()
                except queue.Empty:
                    break
                if copy is None:
                    stop = True
                    break
                batch.append(copy)
            groups: dict[tuple[int, int, tuple[str, ...]], list[_Copy]] = {}
            for copy in batch:
                key = (id(copy.primary), id(copy.shadow), tuple(copy.outputs))
                groups.setdefault(key, []).append(copy)
            for copies in groups.values():
                try:
                    self._run_group(copies)
                except Exception:  # never lose the thread: the next batch must still count
                    log.exception("shadow comparison of %d copies failed", len(copies))
            if stop:
                return

    def _run_group(self, copies: list[_Copy]) -> None:
        """Copies of one (primary, shadow) pair: run each, compare all, count all."""
        p, s = copies[0].primary, copies[0].shadow
        model = s.model
        n = len(copies)
        elapsed = np.zeros(n, np.float64)
        results: list[dict[str, np.ndarray] | None] = []
        starts: list[int] = []
        traced = False
        for i, copy in enumerate(copies):
            if copy.trace is not None:
                traced = True
                starts.append(time.time_ns())
            else:
                starts.append(0)
            start = time.perf_counter()
            try:
                results.append(model.run_prepared(model.prepare(copy.feed)))
            except Exception as exc:  # the shadow failing is a finding, never a crash
                results.append(None)
                log.debug("shadow run of %s v%d failed: %s", s.name, s.version, exc)
                if copy.trace is not None:
                    spans.shadow_ran(copy.trace, p, s, starts[i], "failed", type(exc).__name__)
            elapsed[i] = time.perf_counter() - start
        ran = np.array([r is not None for r in results], bool)
        good = ran.copy()
        names = list(copies[0].outputs)
        compares: list[BatchCompare] = []
        if good.any():
            ran_at = np.flatnonzero(ran)
            for name in names:
                c = compare_batch(
                    name,
                    [copies[i].outputs[name] for i in ran_at],
                    [results[i].get(name) for i in ran_at],  # type: ignore[union-attr]
                )
                good[ran_at] &= c.ok
                compares.append(c)
        if traced:
            for i, copy in enumerate(copies):
                if copy.trace is not None and ran[i]:
                    spans.shadow_ran(
                        copy.trace,
                        p,
                        s,
                        starts[i],
                        "compared" if good[i] else "failed",
                        "" if good[i] else "comparison_failed",
                    )
        self._record(p, s, names, good, ran, compares, elapsed)

    def _record(
        self,
        p: LoadedVersion,
        s: LoadedVersion,
        names: list[str],
        good: np.ndarray,
        ran: np.ndarray,
        compares: list[BatchCompare],
        elapsed: np.ndarray,
    ) -> None:
        cells = p.telemetry_shadow(s.version, names)
        # The label children are looked up once per (primary, shadow): the lookup costs more
        # than the observation, and this thread holds the GIL the serving loop wants.
        key = (id(p), id(s))
        series = self._series.get(key)
        if series is None or not series.of(p, s):
            series = self._series[key] = _Series(self.metrics, p, s)
        n_good = int(good.sum())
        failed = len(good) - n_good
        if failed:
            cells.failed(failed)
            series.failed.inc(failed)
        if not n_good:
            return
        # compares hold the copies that ran; of those, the ones whose every output compared.
        keep = good[ran]
        whole = bool(keep.all())
        rows = []
        for c in compares:
            if whole:
                abs_diff, rel_diff, top1, js = c.abs_diff, c.rel_diff, c.top1, c.js
            else:
                abs_diff, rel_diff, top1 = c.abs_diff[keep], c.rel_diff[keep], c.top1[keep]
                js = c.js[keep[c.js_copy]]
            scored = top1 >= 0
            agreed = int(top1[scored].sum())
            rows.append((c.output, abs_diff, rel_diff, js, agreed, int(scored.sum())))
        seconds = elapsed[good]
        cells.compared_batch(rows, seconds)
        series.compared.inc(n_good)
        _observe_all(series.seconds, seconds)
        for output, abs_diff, rel_diff, js, agreed, total in rows:
            out = series.output(output)
            _observe_all(out.abs_diff, abs_diff)
            _observe_all(out.rel_diff, rel_diff)
            _observe_all(out.js, js)
            if agreed:
                out.agree.inc(agreed)
            if total - agreed:
                out.disagree.inc(total - agreed)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking copies; queued ones are let go, a running batch finishes (bounded)."""
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


__all__ = [
    "BATCH_WINDOW_S",
    "BatchCompare",
    "OutputCompare",
    "ShadowRunner",
    "compare_batch",
    "compare_output",
    "compare_outputs",
    "js_divergence_bits",
]
