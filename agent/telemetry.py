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

Where the numbers live: a :class:`CounterStore`, int64 cells that only ever grow. In fleet mode
the store is a shared file mapping, ``DATA/telemetry-journal`` (the *journal*): a count is in
the kernel's page cache the moment the request is accounted, which is before its response is
handed to gRPC, so a ``kill -9`` (or any crash of the process) cannot lose it, and no system call
is made per request. A report is the difference between the cells now and the cells as of the
previous report; the outbox stores those "reported" cells (the *mark*) in the same transaction
as the report, so at start-up ``journal - mark`` is exactly what no report holds yet
(:func:`recovered_report`). Standalone agents use the same code over anonymous memory.

Cost on the request path: a dict lookup is done once per loaded version (the :class:`LoadedVersion`
keeps its :class:`VersionCounters`); a request adds to five cells and does two ``bisect`` calls.
Every hook runs on the event loop (the data plane, the batcher's completion callback and the slot
switches all do), and so does :meth:`TelemetryAggregator.cut`, so the cells need no lock. Two
calls come from other threads and take a small lock shared with the cut and :meth:`attach`:
:meth:`TelemetryAggregator.version` (a candidate version is built on the loader thread) and
:meth:`TelemetryAggregator.totals` (the agent's /metrics, read when scraped; cells only grow and
each is read whole, so a scrape racing a request sees it in some series and not yet in others).
Shadow comparisons (:class:`ShadowCells`) are the exception: the shadow threads write them,
under a lock of their own.
"""

from __future__ import annotations

import logging
import mmap
import os
import resource
import secrets
import struct
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelfleet.kernel.atomic import atomic_write
from modelfleet.kernel.telemetry_bounds import BATCH_BOUNDS, DIFF_BOUNDS, JS_BOUNDS, LATENCY_BOUNDS
from modelfleet.protos import fleet_pb2 as pb

log = logging.getLogger(__name__)

# Client-supplied model names are unbounded; only models the agent knows get their own entry.
UNKNOWN_MODEL = "_unknown"
JOURNAL_FILE = "telemetry-journal"
# Closed drift windows kept for the next report: a day of 5-minute windows of a few versions.
DRIFT_PENDING_MAX = 1024

# -- the layout of a store: slots of 128 int64 cells (1 KiB); slot 0 is the header -------------
SLOT_CELLS = 128
_NAME_CELLS = 16  # 128 bytes: model names are at most 128 ASCII characters (kernel.bundle)
_VERSION = 16
REASON_SLOTS = 8  # distinct failure reasons per version; further ones count as "other"
_REASON_BYTES = 32
_REASON_NAMES = 17  # 8 x 32 bytes
COUNTERS = 49  # first counter cell; cells [COUNTERS, SLOT_CELLS) only ever grow
_REQUESTS, _FAILURES, _GATE_PASSED, _GATE_FAILED, _SWAPS, _ROLLBACKS = range(49, 55)
_REASONS = 55
_REQUEST_H = _REASONS + REASON_SLOTS  # 63: 17 buckets, then the sum in nanoseconds
_QUEUE_H = _REQUEST_H + len(LATENCY_BOUNDS) + 2
_COMPUTE_H = _QUEUE_H + len(LATENCY_BOUNDS) + 2
_BATCH_H = _COMPUTE_H + len(LATENCY_BOUNDS) + 2  # 10 buckets, then the sum in rows
assert _BATCH_H + len(BATCH_BOUNDS) + 2 == SLOT_CELLS
_REQUEST_SUM = _REQUEST_H + len(LATENCY_BOUNDS) + 1
_QUEUE_SUM = _QUEUE_H + len(LATENCY_BOUNDS) + 1
_COMPUTE_SUM = _COMPUTE_H + len(LATENCY_BOUNDS) + 1
_BATCH_SUM = _BATCH_H + len(BATCH_BOUNDS) + 1
OTHER_REASON = "other"

# Header cells (slot 0).
_MAGIC = int.from_bytes(b"MFTJRNL1", "little", signed=True)
_H_MAGIC, _H_IDENT, _H_CREATED_MS, _H_ALIVE_MS, _H_USED, _H_CAPACITY = range(6)
# Serving workers' switch epoch (agent/workers.py): the leader stores it, every process reads it.
_H_SWITCH = 6
# 4096 versions per process lifetime (a fresh journal at every start); 4 MiB, sparse on disk.
JOURNAL_SLOTS = 4096


class CounterStore:
    """Slots of int64 cells in a buffer: a file mapping (the journal) or anonymous memory."""

    def __init__(self, mm: mmap.mmap, path: Path | None) -> None:
        self.mm = mm
        self.path = path
        self.cells = memoryview(mm).cast("q")
        # The counter cells as of the last committed report, one row per used slot.
        self.reported = np.zeros((0, SLOT_CELLS - COUNTERS), np.int64)

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def memory(cls, slots: int = JOURNAL_SLOTS) -> CounterStore:
        store = cls(mmap.mmap(-1, (slots + 1) * SLOT_CELLS * 8), None)
        store._init_header(slots)
        return store

    @classmethod
    def create(cls, path: Path, slots: int = JOURNAL_SLOTS) -> CounterStore:
        """A fresh journal with a new random identity, replacing any file at ``path``.

        The header reaches the disk (fsync, atomic rename) before anything is counted, so after
        any crash the file there is either the old journal or this one, never a mix.
        """
        header = struct.pack(
            "<6q", _MAGIC, secrets.randbits(62) + 1, int(time.time() * 1000), 0, 1, slots + 1
        )
        atomic_write(path, header, mode=0o600)
        store = cls.open(path)
        if store is None:  # pragma: no cover - we just wrote it
            raise OSError(f"cannot open the new telemetry journal {path}")
        return store

    @classmethod
    def map(cls, path: Path) -> CounterStore:
        """Another process's store, to count in the slots it gives out (a serving worker's view
        of the journal). Never set aside or extended: the owner does that."""
        with open(path, "r+b") as f:
            head = f.read(48)
            magic, _ident, _created, _alive, _used, capacity = (
                struct.unpack("<6q", head) if len(head) == 48 else (0,) * 6
            )
            if magic != _MAGIC:
                raise OSError(f"{path} is not a telemetry store")
            mm = mmap.mmap(f.fileno(), capacity * SLOT_CELLS * 8, mmap.MAP_SHARED)
        return cls(mm, path)

    @classmethod
    def open(cls, path: Path) -> CounterStore | None:
        """The journal at ``path``, or None if there is none or it is not one (set aside)."""
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        try:
            head = os.pread(fd, 48, 0)
            magic, _ident, _created, _alive, used, capacity = (
                struct.unpack("<6q", head) if len(head) == 48 else (0,) * 6
            )
            valid = magic == _MAGIC and 1 <= used <= capacity <= 1_000_000
            if valid:
                size = capacity * SLOT_CELLS * 8
                # A journal cut short by a crash right after its header was written: extend it.
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)  # the mapping keeps its own reference to the file
        if not valid:
            aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
            os.replace(path, aside)
            log.error(
                "%s is not a telemetry journal; moved it to %s and started a new one", path, aside
            )
            return None
        return cls(mm, path)

    def _init_header(self, slots: int) -> None:
        c = self.cells
        c[_H_MAGIC], c[_H_IDENT] = _MAGIC, secrets.randbits(62) + 1
        c[_H_CREATED_MS] = int(time.time() * 1000)
        c[_H_USED], c[_H_CAPACITY] = 1, slots + 1

    # -- header -------------------------------------------------------------------------------

    @property
    def ident(self) -> int:
        return self.cells[_H_IDENT]

    @property
    def created_unix(self) -> float:
        return self.cells[_H_CREATED_MS] / 1000

    @property
    def alive_unix(self) -> float:
        """When the agent last stamped it (every second, and at every report)."""
        return max(self.cells[_H_ALIVE_MS], self.cells[_H_CREATED_MS]) / 1000

    def stamp(self, now: float) -> None:
        self.cells[_H_ALIVE_MS] = int(now * 1000)

    @property
    def switch_epoch(self) -> int:
        """The last swap the leader let every serving process make (one aligned 8-byte cell:
        a reader sees the old value or the new, never a mix)."""
        return self.cells[_H_SWITCH]

    def advance_switch(self) -> int:
        self.cells[_H_SWITCH] += 1
        return self.cells[_H_SWITCH]

    @property
    def used(self) -> int:
        return self.cells[_H_USED]

    # -- slots --------------------------------------------------------------------------------

    def allocate(self, model: str, version: int) -> int | None:
        """A new slot for (model, version); its first cell, or None when the store is full."""
        c = self.cells
        slot = c[_H_USED]
        if slot >= c[_H_CAPACITY]:
            return None
        base = slot * SLOT_CELLS
        name = model.encode()[: _NAME_CELLS * 8]
        self.mm[base * 8 : base * 8 + len(name)] = name
        c[base + _VERSION] = version
        # Published last: recovery reads only slots below `used`, each complete.
        c[_H_USED] = slot + 1
        return base

    def name_reason(self, base: int, index: int, reason: str) -> None:
        at = (base + _REASON_NAMES) * 8 + index * _REASON_BYTES
        raw = reason.encode()[:_REASON_BYTES]
        self.mm[at : at + _REASON_BYTES] = raw.ljust(_REASON_BYTES, b"\0")

    def describe(self, slot: int) -> tuple[str, int, list[str]]:
        base = slot * SLOT_CELLS
        name = bytes(self.mm[base * 8 : (base + _NAME_CELLS) * 8]).rstrip(b"\0")
        reasons = []
        for i in range(REASON_SLOTS):
            at = (base + _REASON_NAMES) * 8 + i * _REASON_BYTES
            reasons.append(
                bytes(self.mm[at : at + _REASON_BYTES]).rstrip(b"\0").decode(errors="replace")
            )
        return name.decode(errors="replace"), self.cells[base + _VERSION], reasons

    def counters(self) -> np.ndarray:
        """A copy of every used slot's counter cells, one row per slot (slot 1 is row 0)."""
        used = self.used
        flat = np.frombuffer(self.mm, np.int64, count=used * SLOT_CELLS)
        return flat.reshape(used, SLOT_CELLS)[1:, COUNTERS:].copy()

    def unreported(self, now: np.ndarray) -> np.ndarray:
        done = np.zeros_like(now)
        rows = min(len(self.reported), len(now))
        done[:rows] = self.reported[:rows]
        return now - done

    def flush(self) -> None:
        """Onto the disk (msync): only power loss needs this; a killed process loses nothing."""
        if self.path is not None:
            self.mm.flush()

    def close(self) -> None:
        self.cells.release()
        self.mm.close()


def _histogram(row: np.ndarray, at: int, bounds: tuple[float, ...], scale: float) -> pb.Histogram:
    i = at - COUNTERS
    counts = row[i : i + len(bounds) + 1].tolist()
    return pb.Histogram(
        bounds=bounds, counts=counts, sum=int(row[i + len(bounds) + 1]) * scale, count=sum(counts)
    )


def version_telemetry(
    model: str, version: int, reasons: list[str], row: np.ndarray
) -> pb.VersionTelemetry:
    """One slot's counter cells (deltas) as the message the hub stores."""
    by_reason: dict[str, int] = {}
    for i, name in enumerate(reasons):
        n = int(row[_REASONS - COUNTERS + i])
        if n and name:
            by_reason[name] = by_reason.get(name, 0) + n
    return pb.VersionTelemetry(
        model=model,
        version=version,
        requests=int(row[_REQUESTS - COUNTERS]),
        failures=int(row[_FAILURES - COUNTERS]),
        failures_by_reason=by_reason,
        request_latency=_histogram(row, _REQUEST_H, LATENCY_BOUNDS, 1e-9),
        queue_latency=_histogram(row, _QUEUE_H, LATENCY_BOUNDS, 1e-9),
        compute_latency=_histogram(row, _COMPUTE_H, LATENCY_BOUNDS, 1e-9),
        batch_size=_histogram(row, _BATCH_H, BATCH_BOUNDS, 1.0),
        gate_passed=int(row[_GATE_PASSED - COUNTERS]),
        gate_failed=int(row[_GATE_FAILED - COUNTERS]),
        swaps=int(row[_SWAPS - COUNTERS]),
        rollbacks=int(row[_ROLLBACKS - COUNTERS]),
    )


class VersionCounters:
    """One model version's cells in a :class:`CounterStore`."""

    __slots__ = ("base", "cells", "model", "reasons", "store", "version")

    def __init__(self, model: str, version: int, store: CounterStore, base: int) -> None:
        self.model = model
        self.version = version
        self.place(store, base)
        self.reasons: dict[str, int] = {}

    def place(self, store: CounterStore, base: int) -> None:
        self.store = store
        self.cells = store.cells
        self.base = base

    # -- hooks (event loop) ---------------------------------------------------------------------

    def ok(self, request_s: float, queue_s: float) -> None:
        c, b = self.cells, self.base
        c[b + _REQUESTS] += 1
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le semantics).
        c[b + _REQUEST_H + bisect_left(LATENCY_BOUNDS, request_s)] += 1
        c[b + _REQUEST_SUM] += int(request_s * 1e9)
        if queue_s:
            c[b + _QUEUE_H + bisect_left(LATENCY_BOUNDS, queue_s)] += 1
            c[b + _QUEUE_SUM] += int(queue_s * 1e9)
        else:
            # No wait at all (a model run inline): the first bucket, nothing to add to the sum.
            c[b + _QUEUE_H] += 1

    def failed(self, reason: str) -> None:
        c, b = self.cells, self.base
        index = self.reasons.get(reason)
        if index is None:
            index = self._new_reason(reason)
        c[b + _REASONS + index] += 1
        c[b + _FAILURES] += 1
        c[b + _REQUESTS] += 1

    def _new_reason(self, reason: str) -> int:
        index = len(self.reasons)
        last = REASON_SLOTS - 1
        if index < last:
            self.store.name_reason(self.base, index, reason)
        else:
            # The last cell is shared by every further reason, so none of them goes uncounted.
            if index == last:
                self.store.name_reason(self.base, last, OTHER_REASON)
            index = last
        self.reasons[reason] = index
        return index

    def batch_done(self, rows: int, compute_s: float) -> None:
        c, b = self.cells, self.base
        c[b + _BATCH_H + bisect_left(BATCH_BOUNDS, rows)] += 1
        c[b + _BATCH_SUM] += rows
        c[b + _COMPUTE_H + bisect_left(LATENCY_BOUNDS, compute_s)] += 1
        c[b + _COMPUTE_SUM] += int(compute_s * 1e9)

    def count(self, cell: int) -> None:
        self.cells[self.base + cell] += 1

    def reason_names(self) -> list[str]:
        names = [""] * REASON_SLOTS
        for name, i in self.reasons.items():
            names[i] = OTHER_REASON if i == REASON_SLOTS - 1 else name
        return names


@dataclass(frozen=True)
class Totals:
    """A version's counts since the process started: the agent's /metrics reads these at scrape
    time (agent/metrics.py), so a request is counted once, here, not again in prometheus_client.

    Histograms are (per-bucket counts, the last one above every bound; sum).
    """

    successes: int
    failures: dict[str, int]
    request: tuple[list[int], float]
    queue: tuple[list[int], float]
    compute: tuple[list[int], float]
    batch: tuple[list[int], float]


def totals(c: VersionCounters) -> Totals:
    """Read from any thread: each cell is read whole; cells only grow, so a scrape that races
    a request sees it in some series and not yet in others, as with any Prometheus client."""
    return _totals_at(c.cells, c.base, c.reasons.copy())  # the event loop may add a reason


def _totals_at(cells: memoryview, base: int, reasons: dict[str, int]) -> Totals:
    row = cells[base + COUNTERS : base + SLOT_CELLS].tolist()

    def hist(at: int, bounds: tuple[float, ...], scale: float) -> tuple[list[int], float]:
        i = at - COUNTERS
        return row[i : i + len(bounds) + 1], row[i + len(bounds) + 1] * scale

    failures: dict[str, int] = {}
    for name, index in reasons.items():
        n = row[_REASONS - COUNTERS + index]
        if n:
            label = OTHER_REASON if index == REASON_SLOTS - 1 else name
            failures[label] = n
    return Totals(
        successes=row[_REQUESTS - COUNTERS] - row[_FAILURES - COUNTERS],
        failures=failures,
        request=hist(_REQUEST_H, LATENCY_BOUNDS, 1e-9),
        queue=hist(_QUEUE_H, LATENCY_BOUNDS, 1e-9),
        compute=hist(_COMPUTE_H, LATENCY_BOUNDS, 1e-9),
        batch=hist(_BATCH_H, BATCH_BOUNDS, 1.0),
    )


def _sum_totals(a: Totals, b: Totals) -> Totals:
    def hist(x: tuple[list[int], float], y: tuple[list[int], float]) -> tuple[list[int], float]:
        return [i + j for i, j in zip(x[0], y[0], strict=True)], x[1] + y[1]

    failures = dict(a.failures)
    for name, n in b.failures.items():
        failures[name] = failures.get(name, 0) + n
    return Totals(
        successes=a.successes + b.successes,
        failures=failures,
        request=hist(a.request, b.request),
        queue=hist(a.queue, b.queue),
        compute=hist(a.compute, b.compute),
        batch=hist(a.batch, b.batch),
    )


def reason_indexes(names: list[str]) -> dict[str, int]:
    return {name: i for i, name in enumerate(names) if name}


def merge_version_telemetry(into: pb.VersionTelemetry, other: pb.VersionTelemetry) -> None:
    """Add ``other`` (the same version counted by another serving process) to ``into``."""
    into.requests += other.requests
    into.failures += other.failures
    for name, n in other.failures_by_reason.items():
        into.failures_by_reason[name] = into.failures_by_reason.get(name, 0) + n
    for field_name in ("request_latency", "queue_latency", "compute_latency", "batch_size"):
        mine, theirs = getattr(into, field_name), getattr(other, field_name)
        counts = [i + j for i, j in zip(mine.counts, theirs.counts, strict=True)]
        del mine.counts[:]
        mine.counts.extend(counts)
        mine.sum += theirs.sum
        mine.count += theirs.count
    into.gate_passed += other.gate_passed
    into.gate_failed += other.gate_failed
    into.swaps += other.swaps
    into.rollbacks += other.rollbacks


# -- shadow comparisons: per (model, primary version, shadow version), one row per output -------
# Kept in memory, not in the journal: they are samples of the traffic, and a kill -9 loses at
# most the open interval of them (the served counts above are what must never be lost).
_SH_COMPARED, _SH_DROPPED, _SH_FAILURES, _SH_AGREE, _SH_TOTAL = range(5)
_SH_ABS = 5
_SH_REL = _SH_ABS + len(DIFF_BOUNDS) + 2
_SH_JS = _SH_REL + len(DIFF_BOUNDS) + 2
_SH_LAT = _SH_JS + len(JS_BOUNDS) + 2
_SH_CELLS = _SH_LAT + len(LATENCY_BOUNDS) + 2


_DIFF_EDGES = np.array(DIFF_BOUNDS)
_JS_EDGES = np.array(JS_BOUNDS)
_LATENCY_EDGES = np.array(LATENCY_BOUNDS)


def _observe_many(row: list[float], at: int, edges: np.ndarray, values: np.ndarray) -> None:
    """Count each of ``values`` into the histogram at ``at`` (buckets, then the sum): a value
    equal to an edge belongs to that edge's bucket (le semantics, as bisect_left above)."""
    if not values.size:
        return
    counts = np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)
    for i, n in enumerate(counts.tolist(), at):
        if n:
            row[i] += n
    row[at + len(edges) + 1] += float(values.sum())


class ShadowCells:
    """What one primary version's outputs looked like next to one shadow version's.

    Unlike the other cells, these are written from the shadow threads (and drops from the event
    loop), so writers and :meth:`snapshot` share a lock. ``dropped`` and ``failures`` count
    requests, so every output's row counts them alike.
    """

    __slots__ = ("lock", "max_abs", "model", "reported", "rows", "shadow_version", "version")

    def __init__(self, model: str, version: int, shadow_version: int, outputs: list[str]) -> None:
        self.model, self.version, self.shadow_version = model, version, shadow_version
        self.rows: dict[str, list[float]] = {o: [0.0] * _SH_CELLS for o in outputs}
        self.reported: dict[str, list[float]] = {}
        # The largest per-request absolute difference seen (for `status`; not reported).
        self.max_abs = 0.0
        self.lock = threading.Lock()

    def _row(self, output: str) -> list[float]:
        row = self.rows.get(output)
        if row is None:
            row = self.rows[output] = [0.0] * _SH_CELLS
        return row

    def dropped(self) -> None:
        with self.lock:
            for row in self.rows.values():
                row[_SH_DROPPED] += 1

    def failed(self, requests: int = 1) -> None:
        with self.lock:
            for row in self.rows.values():
                row[_SH_FAILURES] += requests

    def compared(self, outputs: Iterable[Any], shadow_s: float) -> None:
        """``outputs``: :class:`agent.serving.shadow.OutputCompare` of one request."""
        rows = []
        for c in outputs:
            top1 = c.top1_agree
            rows.append(
                (
                    c.output,
                    np.array([c.abs_diff]),
                    np.array([c.rel_diff]),
                    np.array(c.js, np.float64),
                    int(bool(top1)),
                    int(top1 is not None),
                )
            )
        self.compared_batch(rows, np.array([shadow_s]))

    def compared_batch(
        self,
        outputs: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, int, int]],
        shadow_s: np.ndarray,
    ) -> None:
        """Several requests at once: per output (name, absolute and relative difference per
        request, Jensen-Shannon divergence per row, top-1 agreed, top-1 total), and the shadow
        run's seconds per request. Counts as :meth:`compared` once per request would."""
        n = len(shadow_s)
        with self.lock:
            for output, abs_diff, rel_diff, js, agreed, total in outputs:
                row = self._row(output)
                row[_SH_COMPARED] += n
                _observe_many(row, _SH_ABS, _DIFF_EDGES, abs_diff)
                if abs_diff.size:
                    self.max_abs = max(self.max_abs, float(abs_diff.max()))
                _observe_many(row, _SH_REL, _DIFF_EDGES, rel_diff)
                _observe_many(row, _SH_JS, _JS_EDGES, js)
                row[_SH_TOTAL] += total
                row[_SH_AGREE] += agreed
                _observe_many(row, _SH_LAT, _LATENCY_EDGES, shadow_s)

    def snapshot(self) -> dict[str, list[float]]:
        with self.lock:
            return {o: list(r) for o, r in self.rows.items()}

    def totals(self) -> tuple[int, int, int, int, int]:
        """(compared, dropped, failures, top-1 agreed, top-1 total) since the agent started,
        in requests; top-1 summed over the class-score outputs."""
        if not self.rows:
            return 0, 0, 0, 0, 0
        row = next(iter(self.rows.values()))
        rows = self.rows.values()
        return (
            max(int(r[_SH_COMPARED]) for r in rows),
            int(row[_SH_DROPPED]),
            int(row[_SH_FAILURES]),
            sum(int(r[_SH_AGREE]) for r in rows),
            sum(int(r[_SH_TOTAL]) for r in rows),
        )

    def deltas(self, rows: dict[str, list[float]]) -> dict[str, list[float]]:
        """What ``rows`` (a :meth:`snapshot`) holds beyond the last committed report."""
        out = {}
        for output, row in rows.items():
            done = self.reported.get(output)
            delta = row if done is None else [a - b for a, b in zip(row, done, strict=True)]
            if any(delta):
                out[output] = list(delta)
        return out


def _hist(row: list[float], at: int, bounds: tuple[float, ...]) -> pb.Histogram:
    counts = [int(c) for c in row[at : at + len(bounds) + 1]]
    return pb.Histogram(
        bounds=bounds, counts=counts, sum=row[at + len(bounds) + 1], count=sum(counts)
    )


def shadow_compare(shadow_version: int, output: str, row: list[float]) -> pb.ShadowCompare:
    return pb.ShadowCompare(
        shadow_version=shadow_version,
        output=output,
        compared=int(row[_SH_COMPARED]),
        dropped=int(row[_SH_DROPPED]),
        shadow_failures=int(row[_SH_FAILURES]),
        top1_agree=int(row[_SH_AGREE]),
        top1_total=int(row[_SH_TOTAL]),
        abs_diff=_hist(row, _SH_ABS, DIFF_BOUNDS),
        rel_diff=_hist(row, _SH_REL, DIFF_BOUNDS),
        js_divergence=_hist(row, _SH_JS, JS_BOUNDS),
        shadow_latency=_hist(row, _SH_LAT, LATENCY_BOUNDS),
    )


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


@dataclass
class JournalMark:
    """What the reports committed so far hold of a journal: its counter cells at the last cut."""

    ident: int
    counters: bytes  # int64 rows, one per slot, of cells [COUNTERS, SLOT_CELLS)
    end_unix: float

    def rows(self) -> np.ndarray:
        return np.frombuffer(self.counters, np.int64).reshape(-1, SLOT_CELLS - COUNTERS).copy()


@dataclass
class Cut:
    """A report cut from the counters; :meth:`commit` once it is safely in the outbox.

    Until then nothing is forgotten: a cut that is never committed (the write failed) leaves its
    counts to the next one.
    """

    report: pb.TelemetryReport
    mark: JournalMark | None
    commit: Callable[[], None]


def recovered_report(store: CounterStore, mark: JournalMark | None) -> pb.TelemetryReport | None:
    """What ``store`` (a journal found at start-up) counted that no committed report holds.

    ``mark`` is the outbox's record of the last committed cut; one of another journal means
    this one was created after it, so all of it is unreported. Cells below the mark (possible
    only after power loss, when the journal's pages had not reached the disk) count nothing.
    """
    same = mark is not None and mark.ident == store.ident
    store.reported = mark.rows() if same and mark is not None else store.reported[:0]
    now = store.counters()
    delta = store.unreported(now)
    if (delta < 0).any():
        log.warning(
            "the telemetry journal is older than the outbox (power loss?); counts "
            "since its last flush to disk are lost"
        )
        delta = np.maximum(delta, 0)
    # Serving processes count one version in slots of their own: one entry per version.
    merged: dict[tuple[str, int], pb.VersionTelemetry] = {}
    for slot in range(len(delta)):
        if not delta[slot].any():
            continue
        entry = version_telemetry(*store.describe(slot + 1), delta[slot])
        key = (entry.model, entry.version)
        if key in merged:
            merge_version_telemetry(merged[key], entry)
        else:
            merged[key] = entry
    versions = list(merged.values())
    if not versions:
        return None
    start = mark.end_unix if same and mark is not None else store.created_unix
    return pb.TelemetryReport(
        start_unix=start, end_unix=max(start, store.alive_unix), versions=versions
    )


class TelemetryAggregator:
    """All versions' counters; :meth:`cut` turns them into one report's worth (no seq yet).

    Entries live as long as the process: a loaded version (or a request still in flight on an
    unloaded one) keeps adding to its entry, so dropping entries could lose counts, and one
    small slot per version ever loaded costs little (1 KiB).
    """

    def __init__(
        self, clock: Callable[[], float] = time.time, store: CounterStore | None = None
    ) -> None:
        self.clock = clock
        self.store = store or CounterStore.memory()
        # Versions beyond the store's capacity: counted, but only in memory.
        self._overflow: CounterStore | None = None
        self._versions: dict[tuple[str, int], VersionCounters] = {}
        self._lock = threading.Lock()
        self.started = clock()
        self.process = ProcessSampler()
        self._shadow: dict[tuple[str, int, int], ShadowCells] = {}
        # (model, version) -> arm ("active", "candidate", "shadow") at the time of a cut; the
        # slot manager installs it (agent/slots.py).
        self.arms: Callable[[], dict[tuple[str, int], str]] = dict
        # Closed drift windows waiting for the next cut (agent/serving/drift.py), oldest first;
        # a commit removes those its report carried. Bounded: a standalone agent never cuts.
        self._drift: list[tuple[str, int, pb.DriftReport]] = []
        # (model, version) -> first cells of the slots other serving processes count that
        # version in (agent/workers.py); cut, totals and recovery add them to this entry.
        self._siblings: dict[tuple[str, int], list[int]] = {}

    def sibling(self, model: str, version: int) -> int | None:
        """A slot of the store for another serving process to count (model, version) in, its
        first cell; None when the store is full or not shared (that process counts in memory
        only, and a warning says so)."""
        self.version(model, version)  # the entry the slot is summed into
        with self._lock:
            base = self.store.allocate(model, version) if self.store.path is not None else None
            if base is None:
                log.warning(
                    "no shared telemetry slot for %s v%d in a serving worker: its requests of "
                    "that version are not in reports or /metrics until the agent restarts",
                    model,
                    version,
                )
                return None
            self._siblings.setdefault((model, version), []).append(base)
            return base

    def shadow(
        self, model: str, version: int, shadow_version: int, outputs: list[str]
    ) -> ShadowCells:
        key = (model, version, shadow_version)
        cells = self._shadow.get(key)
        if cells is None:
            # Shadow threads and the event loop both come here.
            with self._lock:
                cells = self._shadow.get(key)
                if cells is None:
                    cells = ShadowCells(model, version, shadow_version, outputs)
                    self._shadow[key] = cells
        return cells

    def shadow_cells(self, model: str) -> list[ShadowCells]:
        with self._lock:
            return [c for (m, _, _), c in sorted(self._shadow.items()) if m == model]

    def version(self, model: str, version: int) -> VersionCounters:
        key = (model, version)
        counters = self._versions.get(key)
        if counters is None:
            with self._lock:
                counters = self._versions.get(key)
                if counters is None:
                    store, base = self._allocate(model, version)
                    counters = self._versions[key] = VersionCounters(model, version, store, base)
        return counters

    def _allocate(self, model: str, version: int) -> tuple[CounterStore, int]:
        base = self.store.allocate(model, version)
        if base is not None:
            return self.store, base
        if self._overflow is None:
            log.warning(
                "telemetry journal full (%d versions since the agent started): "
                "counts of further versions are kept in memory only until the next "
                "restart, and a kill -9 can lose their open interval",
                self.store.used - 1,
            )
            self._overflow = CounterStore.memory()
        base = self._overflow.allocate(model, version)
        if base is None:
            raise RuntimeError("more than 8192 model versions in one agent process")
        return self._overflow, base

    def attach(self, store: CounterStore) -> None:
        """Count into ``store`` from now on (fleet mode: the journal).

        Its slots are adopted as they are (``store.reported`` says how much of them is
        reported), and what the current entries counted and have not reported yet moves into
        it, so nothing is lost or counted twice by the move.
        """
        with self._lock:
            old = {id(s): (s, s.unreported(s.counters())) for s in self._stores()}
            adopted: dict[tuple[str, int], VersionCounters] = {}
            siblings: dict[tuple[str, int], list[int]] = {}
            for slot in range(1, store.used):
                model, version, names = store.describe(slot)
                c = VersionCounters(model, version, store, slot * SLOT_CELLS)
                c.reasons = reason_indexes(names)
                if (model, version) in adopted:
                    # A serving worker's slot (this process always allocates its own first).
                    siblings.setdefault((model, version), []).append(c.base)
                else:
                    adopted[(model, version)] = c
            if self._siblings:
                raise RuntimeError("attach() after serving workers got slots: start them after")
            self._siblings = siblings
            moving = list(self._versions.items())
            self.store, self._overflow = store, None
            self._versions = adopted
            for key, c in moving:
                delta = old[id(c.store)][1]
                row = delta[c.base // SLOT_CELLS - 1]
                names = c.reason_names()
                target = self._versions.get(key)
                if target is None:
                    target_store, base = self._allocate(*key)
                    target = self._versions[key] = VersionCounters(*key, target_store, base)
                c.place(target.store, target.base)
                c.reasons = target.reasons
                # The LoadedVersion holding `c` keeps it: make it the entry, not a copy.
                self._versions[key] = c
                _add(c, row, names)
            for s, _ in old.values():
                if s is not store and s.path is None:
                    s.close()

    def _stores(self) -> list[CounterStore]:
        return [s for s in (self.store, self._overflow) if s is not None]

    def totals(self, keep: Callable[[str, int], bool]) -> list[tuple[VersionCounters, Totals]]:
        """The counts of the versions ``keep`` accepts, for /metrics (the scrape thread). Read
        under the lock :meth:`attach` holds while it moves counters and closes the store they
        were in, so a scrape never reads a half-moved count or a closed store."""
        with self._lock:
            out = []
            for c in self._versions.values():
                if not keep(c.model, c.version):
                    continue
                sums = totals(c)
                for base in self._siblings.get((c.model, c.version), ()):
                    sums = _sum_totals(sums, self._sibling_totals(base))
                out.append((c, sums))
            return out

    def _sibling_totals(self, base: int) -> Totals:
        names = self.store.describe(base // SLOT_CELLS)[2]
        return _totals_at(self.store.cells, base, reason_indexes(names))

    def own_requests(self) -> int:
        """Requests this process counted (its share of the serving processes' traffic)."""
        with self._lock:
            return sum(c.cells[c.base + _REQUESTS] for c in self._versions.values())

    def requests_in(self, bases: Iterable[int]) -> int:
        """Requests counted in these sibling slots (one worker's share)."""
        with self._lock:
            return sum(self.store.cells[b + _REQUESTS] for b in bases)

    # -- hooks that have no LoadedVersion at hand (event loop) ----------------------------------

    def failed(self, model: str, version: int, reason: str) -> None:
        self.version(model, version).failed(reason)

    def gate(self, model: str, version: int, passed: bool) -> None:
        self.version(model, version).count(_GATE_PASSED if passed else _GATE_FAILED)

    def switched(self, model: str, version: int, *, rollback: bool) -> None:
        self.version(model, version).count(_ROLLBACKS if rollback else _SWAPS)

    def drift(self, model: str, version: int, report: pb.DriftReport) -> None:
        """A closed drift window, for the next report."""
        with self._lock:
            self._drift.append((model, version, report))
            if len(self._drift) > DRIFT_PENDING_MAX:
                # The hub has not taken a report for that long: keep the newest windows.
                del self._drift[: len(self._drift) - DRIFT_PENDING_MAX]

    # -- reporting (event loop) -----------------------------------------------------------------

    def pending(self) -> bool:
        """Anything counted since the last committed cut?"""
        with self._lock:
            if self._drift:
                return True
            return any(s.unreported(s.counters()).any() for s in self._stores())

    def stamp(self) -> None:
        """Record in the journal that the agent is alive now (a recovered report ends here)."""
        self.store.stamp(self.clock())

    def cut(self, serving: Iterable[tuple[str, int]] = ()) -> Cut:
        """The interval since the last committed cut as a report (``seq`` is the outbox's job).

        Versions in ``serving`` (the active ones) are included even when idle, so the hub sees
        which agents are on a version while it gets no traffic; other idle versions are left out.
        """
        now = self.clock()
        serving = set(serving)
        arms = self.arms()
        serving |= set(arms)
        for model, version in serving:
            self.version(model, version)
        with self._lock:
            drift = list(self._drift)
        drift_by_version: dict[tuple[str, int], list[pb.DriftReport]] = {}
        for model, version, d in drift:
            drift_by_version.setdefault((model, version), []).append(d)
            self.version(model, version)
        with self._lock:
            entries = sorted(self._versions.items())
            stores = self._stores()
            current = [s.counters() for s in stores]
            siblings = {k: list(v) for k, v in self._siblings.items()}
        deltas = {id(s): s.unreported(cur) for s, cur in zip(stores, current, strict=True)}
        shared = deltas[id(self.store)]
        with self._lock:
            shadows = sorted(self._shadow.items())
        shadow_rows = {k: c.snapshot() for k, c in shadows}
        shadow_now = {k: c.deltas(shadow_rows[k]) for k, c in shadows}
        by_version: dict[tuple[str, int], list[pb.ShadowCompare]] = {}
        for (model, version, shadow_version), rows in shadow_now.items():
            for output, row in sorted(rows.items()):
                by_version.setdefault((model, version), []).append(
                    shadow_compare(shadow_version, output, row)
                )
        versions = []
        for key, c in entries:
            row = deltas[id(c.store)][c.base // SLOT_CELLS - 1]
            others = [(b, shared[b // SLOT_CELLS - 1]) for b in siblings.get(key, ())]
            counted = row.any() or any(r.any() for _, r in others)
            if key in serving or counted or key in by_version or key in drift_by_version:
                msg = version_telemetry(c.model, c.version, c.reason_names(), row)
                for b, r in others:
                    if r.any():
                        names = self.store.describe(b // SLOT_CELLS)[2]
                        theirs = version_telemetry(c.model, c.version, names, r)
                        merge_version_telemetry(msg, theirs)
                msg.arm = arms.get(key, "")
                msg.shadow.extend(by_version.get(key, ()))
                msg.drift.extend(drift_by_version.get(key, ()))
                versions.append(msg)
        report = pb.TelemetryReport(
            start_unix=self.started,
            end_unix=now,
            versions=versions,
            rss_bytes=self.process.rss_bytes(),
            cpu_seconds=self.process.cpu_delta(),
        )
        journal = self.store
        mark = (
            JournalMark(journal.ident, current[0].tobytes(), now)
            if journal.path is not None
            else None
        )
        journal.stamp(now)

        def commit() -> None:
            for s, cur in zip(stores, current, strict=True):
                s.reported = cur
            for k, rows in shadow_rows.items():
                self._shadow[k].reported = rows
            with self._lock:
                sent = {id(d) for _, _, d in drift}
                self._drift = [e for e in self._drift if id(e[2]) not in sent]
            self.started = now

        return Cut(report, mark, commit)

    def snapshot(self, serving: Iterable[tuple[str, int]] = ()) -> pb.TelemetryReport:
        """:meth:`cut` and commit at once (nothing to keep durable: standalone, tests)."""
        cut = self.cut(serving)
        cut.commit()
        return cut.report


def _add(c: VersionCounters, row: np.ndarray, names: list[str]) -> None:
    """Add ``row`` (counter cells of an entry whose reasons were ``names``) to ``c``'s cells."""
    cells, base = c.cells, c.base
    reason_cells = range(_REASONS - COUNTERS, _REASONS - COUNTERS + REASON_SLOTS)
    for i, n in enumerate(row.tolist()):
        if n and i not in reason_cells:
            cells[base + COUNTERS + i] += n
    for i, name in enumerate(names):
        n = int(row[_REASONS - COUNTERS + i])
        if n and name:
            index = c.reasons.get(name)
            if index is None:
                index = c._new_reason(name)
            cells[base + _REASONS + index] += n


__all__ = [
    "BATCH_BOUNDS",
    "JOURNAL_FILE",
    "LATENCY_BOUNDS",
    "UNKNOWN_MODEL",
    "CounterStore",
    "Cut",
    "JournalMark",
    "ProcessSampler",
    "ShadowCells",
    "TelemetryAggregator",
    "VersionCounters",
    "merge_version_telemetry",
    "recovered_report",
]
