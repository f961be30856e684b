"""Fleet telemetry at the hub: idempotent ingestion into DuckDB, window queries, /metrics.

Storage: ``DATA/telemetry.duckdb``, two tables (docs/telemetry.md has the full schema):

- ``reports``: one row per stored report, ``(agent_id, seq)`` unique, with its interval
  (``start_unix``, ``end_unix``), the agent's RSS and CPU seconds, and ``dropped_reports``.
- ``shadow_stats``: one row per (agent_id, seq, model, version, shadow_version, output): a
  primary version's output compared with a shadow version's (counts, histograms of absolute and
  relative difference and Jensen-Shannon divergence in :data:`DIFF_BOUNDS` / :data:`JS_BOUNDS`,
  shadow latency).
- ``version_stats``: one row per (agent_id, seq, model, version): counters, failures by reason
  (two parallel lists), and the request / queue / compute latency and batch size histograms as
  lists of bucket counts in the bounds of :data:`agent.telemetry.LATENCY_BOUNDS` /
  :data:`BATCH_BOUNDS` (a histogram sent with other bounds is re-bucketed on the way in).

Ingestion is idempotent per (agent_id, seq): a replayed report is acknowledged but not stored
again. Dedup looks the batch's seqs up among stored reports with the same ``end_unix`` range (a
replay is the same bytes, so the same ``end_unix``), which lets DuckDB's zone maps skip all but
the row groups of that time range instead of keeping an index of every key in memory. One
transaction per batch (several agents' batches are grouped into one by
:class:`TelemetryIngestor`), rows inserted from Arrow.

Query API (used by the rollout engine and ``modelfleet-hub metrics``)::

    store = TelemetryStore(path, retention_s=7 * 86400)
    store.ingest(agent_id: str, reports: Sequence[pb.TelemetryReport]) -> list[int]
        # the acknowledged seqs: every seq in the batch once it is stored (now or before)
    store.ingest_many(batches: Sequence[tuple[str, Sequence[pb.TelemetryReport]]])
        -> list[list[int]]                       # several agents, one transaction
    store.window(model: str, version: int | None, agents: Collection[str] | None,
                 since: float, until: float) -> list[WindowStats]
        # one per version with data, ordered by version; version None: every version;
        # agents None: the whole fleet (an empty collection matches nobody).
    store.samples(model: str, version: int, agents: Collection[str] | None,
                  since: float, until: float, min_requests: int = 200) -> list[AgentWindow]
        # the statistical judge's samples: one per agent-window, quiet intervals pooled
    store.shadow_window(model: str, version: int, agents=None, since=-inf, until=inf,
                        *, shadow_version: int | None = None) -> ShadowStats
        # the version's shadow comparisons (agent/serving/shadow.py), one summary
    store.close()

Window semantics: a report interval counts when its ``end_unix`` lies in ``(since, until]``
(intervals are a few seconds long; counting whole intervals by their end keeps every request in
exactly one of two adjacent windows). ``request_rate`` is requests per second over
``until - since``; ``error_rate`` failures / requests (0 without requests). Percentiles come
from the summed request-latency histogram of *successful* requests, interpolated linearly inside
the bucket (the first bucket starts at 0); a rank in the +Inf bucket reports the largest finite
bound; without any successful request they are NaN. ``agents`` counts distinct agents with a
row for the version in the window (an agent reports its active versions every interval, even
idle ones).

Reports whose interval ended more than ``retention_s`` ago are acknowledged but not stored, and
stored rows older than that are deleted by :meth:`TelemetryStore.prune` (the hub runs it hourly):
so a very late replay of a pruned report cannot be counted twice.

Threading: one DuckDB connection guarded by one lock; callers may come from any thread.
:class:`TelemetryIngestor` runs ingestion on a dedicated thread so the event loop never waits
for a commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from modelfleet.hub.judge import AgentWindow
from modelfleet.kernel.telemetry_bounds import BATCH_BOUNDS, DIFF_BOUNDS, JS_BOUNDS, LATENCY_BOUNDS
from modelfleet.protos import fleet_pb2 as pb

if TYPE_CHECKING:
    from modelfleet.hub.ports import TelemetryStorePort

log = logging.getLogger(__name__)

TELEMETRY_FILE = "telemetry.duckdb"
# "Agents reporting" on /metrics: distinct agents with a report that ended this recently.
REPORTING_WINDOW_S = 60.0
QUANTILES = (0.5, 0.95, 0.99)
# The judge's samples: an agent's intervals are pooled until they hold this many requests (a
# quantile of fewer is mostly the slowest request); latency needs half as many successes.
MIN_SAMPLE_REQUESTS = 200
# A split's pairs pool until each arm holds this many (TelemetryStore.paired_samples): the pair
# already cancels the device and the moment, so shorter spans buy more pairs, and measured on a
# busy machine the judge's interval narrowed faster with 100 a side than with 200.
MIN_PAIR_REQUESTS = 100
SAMPLE_QUANTILES = (("latency_p50", 0.5), ("latency_p95", 0.95), ("latency_p99", 0.99))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    agent_id VARCHAR NOT NULL,
    seq UBIGINT NOT NULL,
    start_unix DOUBLE NOT NULL,
    end_unix DOUBLE NOT NULL,
    received_unix DOUBLE NOT NULL,
    rss_bytes UBIGINT NOT NULL,
    cpu_seconds DOUBLE NOT NULL,
    dropped_reports UBIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS version_stats (
    agent_id VARCHAR NOT NULL,
    seq UBIGINT NOT NULL,
    model VARCHAR NOT NULL,
    version BIGINT NOT NULL,
    start_unix DOUBLE NOT NULL,
    end_unix DOUBLE NOT NULL,
    requests UBIGINT NOT NULL,
    failures UBIGINT NOT NULL,
    failure_reasons VARCHAR[] NOT NULL,
    failure_counts UBIGINT[] NOT NULL,
    request_counts UBIGINT[] NOT NULL,
    request_sum DOUBLE NOT NULL,
    queue_counts UBIGINT[] NOT NULL,
    queue_sum DOUBLE NOT NULL,
    compute_counts UBIGINT[] NOT NULL,
    compute_sum DOUBLE NOT NULL,
    batch_counts UBIGINT[] NOT NULL,
    batch_sum DOUBLE NOT NULL,
    gate_passed UBIGINT NOT NULL,
    gate_failed UBIGINT NOT NULL,
    swaps UBIGINT NOT NULL,
    rollbacks UBIGINT NOT NULL,
    arm VARCHAR NOT NULL DEFAULT ''
);
-- Stores made before arms existed gain the column (as the last one, as above).
ALTER TABLE version_stats ADD COLUMN IF NOT EXISTS arm VARCHAR DEFAULT '';
CREATE TABLE IF NOT EXISTS shadow_stats (
    agent_id VARCHAR NOT NULL,
    seq UBIGINT NOT NULL,
    model VARCHAR NOT NULL,
    version BIGINT NOT NULL,
    shadow_version BIGINT NOT NULL,
    output VARCHAR NOT NULL,
    start_unix DOUBLE NOT NULL,
    end_unix DOUBLE NOT NULL,
    compared UBIGINT NOT NULL,
    dropped UBIGINT NOT NULL,
    shadow_failures UBIGINT NOT NULL,
    top1_agree UBIGINT NOT NULL,
    top1_total UBIGINT NOT NULL,
    abs_counts UBIGINT[] NOT NULL,
    abs_sum DOUBLE NOT NULL,
    rel_counts UBIGINT[] NOT NULL,
    rel_sum DOUBLE NOT NULL,
    js_counts UBIGINT[] NOT NULL,
    js_sum DOUBLE NOT NULL,
    latency_counts UBIGINT[] NOT NULL,
    latency_sum DOUBLE NOT NULL
);
CREATE TABLE IF NOT EXISTS drift_stats (
    agent_id VARCHAR NOT NULL,
    seq UBIGINT NOT NULL,
    model VARCHAR NOT NULL,
    version BIGINT NOT NULL,
    end_unix DOUBLE NOT NULL,
    window_start_unix DOUBLE NOT NULL,
    window_end_unix DOUBLE NOT NULL,
    offered UBIGINT NOT NULL,
    sampled UBIGINT NOT NULL,
    tensor VARCHAR NOT NULL,
    feature VARCHAR NOT NULL,
    role VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    psi DOUBLE NOT NULL,
    js DOUBLE NOT NULL,
    ks DOUBLE,
    rows UBIGINT NOT NULL
);
"""

_U64_LIST = pa.list_(pa.uint64())
_REPORT_SCHEMA = pa.schema(
    [
        ("agent_id", pa.string()),
        ("seq", pa.uint64()),
        ("start_unix", pa.float64()),
        ("end_unix", pa.float64()),
        ("received_unix", pa.float64()),
        ("rss_bytes", pa.uint64()),
        ("cpu_seconds", pa.float64()),
        ("dropped_reports", pa.uint64()),
    ]
)
_VERSION_SCHEMA = pa.schema(
    [
        ("agent_id", pa.string()),
        ("seq", pa.uint64()),
        ("model", pa.string()),
        ("version", pa.int64()),
        ("start_unix", pa.float64()),
        ("end_unix", pa.float64()),
        ("requests", pa.uint64()),
        ("failures", pa.uint64()),
        ("failure_reasons", pa.list_(pa.string())),
        ("failure_counts", _U64_LIST),
        ("request_counts", _U64_LIST),
        ("request_sum", pa.float64()),
        ("queue_counts", _U64_LIST),
        ("queue_sum", pa.float64()),
        ("compute_counts", _U64_LIST),
        ("compute_sum", pa.float64()),
        ("batch_counts", _U64_LIST),
        ("batch_sum", pa.float64()),
        ("gate_passed", pa.uint64()),
        ("gate_failed", pa.uint64()),
        ("swaps", pa.uint64()),
        ("rollbacks", pa.uint64()),
        ("arm", pa.string()),
    ]
)
_SHADOW_SCHEMA = pa.schema(
    [
        ("agent_id", pa.string()),
        ("seq", pa.uint64()),
        ("model", pa.string()),
        ("version", pa.int64()),
        ("shadow_version", pa.int64()),
        ("output", pa.string()),
        ("start_unix", pa.float64()),
        ("end_unix", pa.float64()),
        ("compared", pa.uint64()),
        ("dropped", pa.uint64()),
        ("shadow_failures", pa.uint64()),
        ("top1_agree", pa.uint64()),
        ("top1_total", pa.uint64()),
        ("abs_counts", _U64_LIST),
        ("abs_sum", pa.float64()),
        ("rel_counts", _U64_LIST),
        ("rel_sum", pa.float64()),
        ("js_counts", _U64_LIST),
        ("js_sum", pa.float64()),
        ("latency_counts", _U64_LIST),
        ("latency_sum", pa.float64()),
    ]
)
_DRIFT_SCHEMA = pa.schema(
    [
        ("agent_id", pa.string()),
        ("seq", pa.uint64()),
        ("model", pa.string()),
        ("version", pa.int64()),
        ("end_unix", pa.float64()),
        ("window_start_unix", pa.float64()),
        ("window_end_unix", pa.float64()),
        ("offered", pa.uint64()),
        ("sampled", pa.uint64()),
        ("tensor", pa.string()),
        ("feature", pa.string()),
        ("role", pa.string()),
        ("kind", pa.string()),
        ("psi", pa.float64()),
        ("js", pa.float64()),
        ("ks", pa.float64()),
        ("rows", pa.uint64()),
    ]
)


@dataclass(frozen=True)
class FeatureDrift:
    """One feature of one version over the drift windows of a query; ``agent_id`` empty:
    fleet-wide (every selected agent's windows together)."""

    version: int
    agent_id: str
    tensor: str
    feature: str
    role: str
    windows: int
    rows: int
    psi_max: float
    psi_mean: float
    # PSI of the newest window (fleet-wide: the largest among the agents' newest windows).
    psi_last: float
    js_max: float
    ks_max: float | None
    agents: int


@dataclass(frozen=True)
class WindowStats:
    model: str
    version: int
    requests: int
    failures: int
    failures_by_reason: dict[str, int]
    error_rate: float
    # Requests per second over the whole window (until - since).
    request_rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    # Distinct agents with telemetry for this version in the window.
    agents: int
    # The arms agents reported the version in ("active", "candidate", "shadow"; "" for a version
    # loaded without a role), sorted: a split's candidate reads ("candidate",).
    arms: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShadowOutputStats:
    """One output tensor of the primary against the shadow, over a window."""

    output: str
    compared: int
    # Class-score outputs only; NaN when the output is not one.
    top1_agreement: float
    abs_diff_p50: float
    abs_diff_p99: float
    rel_diff_p50: float
    rel_diff_p99: float
    # Probability outputs only (bits, 0..1); NaN otherwise.
    js_p50: float
    js_p99: float


@dataclass(frozen=True)
class ShadowStats:
    """A primary version's shadow comparisons over a window (:meth:`TelemetryStore.shadow_window`).

    Counts are requests. The summary values take the worst output: the lowest top-1 agreement
    and the highest difference quantiles, so a gate on them holds for every output. Quantiles
    come from the summed histograms as in :func:`percentile`; NaN without data.
    """

    model: str
    version: int
    # The shadow versions seen in the window (normally one).
    shadow_versions: tuple[int, ...]
    compared: int
    dropped: int
    shadow_failures: int
    top1_agree: int
    top1_total: int
    # top1_agree / top1_total summed over class-score outputs; NaN when there are none.
    top1_agreement: float
    abs_diff_p50: float
    abs_diff_p99: float
    rel_diff_p50: float
    rel_diff_p99: float
    js_p50: float
    js_p99: float
    shadow_latency_p50_ms: float
    shadow_latency_p99_ms: float
    agents: int
    outputs: dict[str, ShadowOutputStats] = field(default_factory=dict)

    @property
    def drop_rate(self) -> float:
        """Share of sampled copies dropped (0 with none sampled)."""
        sampled = self.compared + self.dropped + self.shadow_failures
        return self.dropped / sampled if sampled else 0.0


@dataclass
class IngestCounters:
    """Since the hub started; exported on /metrics."""

    reports: int = 0
    duplicates: int = 0
    expired: int = 0
    dropped_by_agents: int = 0
    # (model, version) -> [requests, failures]
    versions: dict[tuple[str, int], list[int]] = field(default_factory=dict)


def rebucket(hist: pb.Histogram, bounds: Sequence[float]) -> list[int]:
    """Counts in ``bounds`` (+Inf last) from a histogram sent with any bounds.

    The usual case (same bounds) is a copy. Otherwise each source bucket lands in the first
    target bucket whose bound is >= the source bucket's upper bound: a conservative mapping
    (latencies never appear lower than they were).
    """
    n = len(bounds) + 1
    if not hist.counts:
        return [0] * n
    if len(hist.counts) == n and tuple(hist.bounds) == tuple(bounds):
        return list(hist.counts)
    out = [0] * n
    src = list(hist.bounds)
    for i, c in enumerate(hist.counts):
        upper = src[i] if i < len(src) else math.inf
        out[bisect_left(bounds, upper) if upper != math.inf else n - 1] += c
    return out


def percentile(counts: Sequence[int], bounds: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of a bucketed distribution, linear inside the bucket."""
    total = sum(counts)
    if total <= 0:
        return math.nan
    rank = q * total
    cum = 0
    for i, c in enumerate(counts):
        if c and cum + c >= rank:
            if i >= len(bounds):  # +Inf bucket: nothing to interpolate towards
                return float(bounds[-1])
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * ((rank - cum) / c)
        cum += c
    return float(bounds[-1])


def _report_filter(
    model: str,
    version: int | None,
    agents: Collection[str] | None,
    since: float,
    until: float,
) -> tuple[str, dict[str, Any]] | None:
    """The WHERE clause (and its parameters) every window query shares: one model, one version
    or all (None), reports that ended in ``(since, until]``, some agents or the whole fleet
    (None). None when ``agents`` is empty: nobody's reports, nothing to query."""
    where = ["model = $model", "end_unix > $since", "end_unix <= $until"]
    params: dict[str, Any] = {"model": model, "since": since, "until": until}
    if version is not None:
        where.append("version = $version")
        params["version"] = int(version)
    if agents is not None:
        if not agents:
            return None
        where.append("agent_id IN (SELECT unnest($agents::VARCHAR[]))")
        params["agents"] = list(agents)
    return " AND ".join(where), params


class TelemetryStore:
    def __init__(
        self,
        path: Path | str,
        *,
        retention_s: float = 7 * 86400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = str(path)
        self.retention_s = retention_s
        self.clock = clock
        self._lock = threading.Lock()
        self._db = duckdb.connect(self.path)
        self._db.execute(_SCHEMA)
        self.counters = IngestCounters()

    # -- ingestion -------------------------------------------------------------------------------

    def ingest(self, agent_id: str, reports: Sequence[pb.TelemetryReport]) -> list[int]:
        return self.ingest_many([(agent_id, reports)])[0]

    def ingest_many(
        self, batches: Sequence[tuple[str, Sequence[pb.TelemetryReport]]]
    ) -> list[list[int]]:
        """Store every new report of every batch in one transaction; return the acked seqs."""
        now = self.clock()
        horizon = now - self.retention_s if self.retention_s > 0 else -math.inf
        candidates: dict[tuple[str, int], pb.TelemetryReport] = {}
        per_version: dict[tuple[str, int], tuple[int, int]] = {}
        expired = submitted = 0
        for agent_id, reports in batches:
            for r in reports:
                if r.end_unix < horizon:
                    expired += 1  # would be pruned at once; acked so the agent lets go of it
                    continue
                submitted += 1
                candidates.setdefault((agent_id, r.seq), r)
        with self._lock:
            db = self._db
            db.execute("BEGIN TRANSACTION")
            try:
                stored = self._already_stored(candidates)
                new = [(k, r) for k, r in candidates.items() if k not in stored]
                if new:
                    rep_tbl, ver_tbl, sh_tbl, per_version = self._tables(new, now)
                    dr_tbl = _drift_table(new)
                    # Arrow in one call per table: per-statement overhead dominates small batches.
                    db.from_arrow(rep_tbl).insert_into("reports")
                    if ver_tbl.num_rows:
                        db.from_arrow(ver_tbl).insert_into("version_stats")
                    if sh_tbl.num_rows:
                        db.from_arrow(sh_tbl).insert_into("shadow_stats")
                    if dr_tbl.num_rows:
                        db.from_arrow(dr_tbl).insert_into("drift_stats")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            c = self.counters
            c.reports += len(new)
            c.duplicates += submitted - len(new)
            c.expired += expired
            for _, r in new:
                c.dropped_by_agents += r.dropped_reports
            for key, (req, fail) in per_version.items():
                tot = c.versions.setdefault(key, [0, 0])
                tot[0] += req
                tot[1] += fail
        return [[r.seq for r in reports] for _, reports in batches]

    def _already_stored(
        self, candidates: dict[tuple[str, int], pb.TelemetryReport]
    ) -> set[tuple[str, int]]:
        if not candidates:
            return set()
        ends = [r.end_unix for r in candidates.values()]
        # The end_unix range lets zone maps skip row groups of other times (a replay carries the
        # very end_unix of the stored original); agent and seq narrow it to a superset of the
        # candidates, checked exactly below.
        rows = self._db.execute(
            "SELECT agent_id, seq FROM reports WHERE end_unix BETWEEN ? AND ? "
            "AND agent_id IN (SELECT unnest(?::VARCHAR[])) "
            "AND seq IN (SELECT unnest(?::UBIGINT[]))",
            [
                min(ends),
                max(ends),
                sorted({a for a, _ in candidates}),
                sorted({q for _, q in candidates}),
            ],
        ).fetchall()
        return {(a, int(q)) for a, q in rows} & candidates.keys()

    @staticmethod
    def _tables(
        new: list[tuple[tuple[str, int], pb.TelemetryReport]], now: float
    ) -> tuple[pa.Table, pa.Table, pa.Table, dict[tuple[str, int], tuple[int, int]]]:
        rep: dict[str, list[Any]] = {name: [] for name in _REPORT_SCHEMA.names}
        ver: dict[str, list[Any]] = {name: [] for name in _VERSION_SCHEMA.names}
        sh: dict[str, list[Any]] = {name: [] for name in _SHADOW_SCHEMA.names}
        per_version: dict[tuple[str, int], tuple[int, int]] = {}
        for (agent_id, seq), r in new:
            for name, value in (
                ("agent_id", agent_id),
                ("seq", seq),
                ("start_unix", r.start_unix),
                ("end_unix", r.end_unix),
                ("received_unix", now),
                ("rss_bytes", r.rss_bytes),
                ("cpu_seconds", r.cpu_seconds),
                ("dropped_reports", r.dropped_reports),
            ):
                rep[name].append(value)
            for v in r.versions:
                reasons = sorted(v.failures_by_reason.items())
                for name, cell in (
                    ("agent_id", agent_id),
                    ("seq", seq),
                    ("model", v.model),
                    ("version", v.version),
                    ("start_unix", r.start_unix),
                    ("end_unix", r.end_unix),
                    ("requests", v.requests),
                    ("failures", v.failures),
                    ("failure_reasons", [k for k, _ in reasons]),
                    ("failure_counts", [n for _, n in reasons]),
                    ("request_counts", rebucket(v.request_latency, LATENCY_BOUNDS)),
                    ("request_sum", v.request_latency.sum),
                    ("queue_counts", rebucket(v.queue_latency, LATENCY_BOUNDS)),
                    ("queue_sum", v.queue_latency.sum),
                    ("compute_counts", rebucket(v.compute_latency, LATENCY_BOUNDS)),
                    ("compute_sum", v.compute_latency.sum),
                    ("batch_counts", rebucket(v.batch_size, BATCH_BOUNDS)),
                    ("batch_sum", v.batch_size.sum),
                    ("gate_passed", v.gate_passed),
                    ("gate_failed", v.gate_failed),
                    ("swaps", v.swaps),
                    ("rollbacks", v.rollbacks),
                    ("arm", v.arm),
                ):
                    ver[name].append(cell)
                for c in v.shadow:
                    for name, cell in (
                        ("agent_id", agent_id),
                        ("seq", seq),
                        ("model", v.model),
                        ("version", v.version),
                        ("shadow_version", c.shadow_version),
                        ("output", c.output),
                        ("start_unix", r.start_unix),
                        ("end_unix", r.end_unix),
                        ("compared", c.compared),
                        ("dropped", c.dropped),
                        ("shadow_failures", c.shadow_failures),
                        ("top1_agree", c.top1_agree),
                        ("top1_total", c.top1_total),
                        ("abs_counts", rebucket(c.abs_diff, DIFF_BOUNDS)),
                        ("abs_sum", c.abs_diff.sum),
                        ("rel_counts", rebucket(c.rel_diff, DIFF_BOUNDS)),
                        ("rel_sum", c.rel_diff.sum),
                        ("js_counts", rebucket(c.js_divergence, JS_BOUNDS)),
                        ("js_sum", c.js_divergence.sum),
                        ("latency_counts", rebucket(c.shadow_latency, LATENCY_BOUNDS)),
                        ("latency_sum", c.shadow_latency.sum),
                    ):
                        sh[name].append(cell)
                key = (v.model, v.version)
                req, fail = per_version.get(key, (0, 0))
                per_version[key] = (req + v.requests, fail + v.failures)
        return (
            pa.table(rep, schema=_REPORT_SCHEMA),
            pa.table(ver, schema=_VERSION_SCHEMA),
            pa.table(sh, schema=_SHADOW_SCHEMA),
            per_version,
        )

    # -- queries ---------------------------------------------------------------------------------

    def window(
        self,
        model: str,
        version: int | None,
        agents: Collection[str] | None,
        since: float,
        until: float,
    ) -> list[WindowStats]:
        found = _report_filter(model, version, agents, since, until)
        if found is None:
            return []
        where, params = found
        rows = f"SELECT * FROM version_stats WHERE {where}"
        with self._lock:
            db = self._db
            totals = db.execute(
                f"SELECT version, sum(requests), sum(failures), count(DISTINCT agent_id), "
                f"list(DISTINCT arm) FROM ({rows}) GROUP BY version ORDER BY version",
                params,
            ).fetchall()
            if not totals:
                return []
            buckets = db.execute(
                f"SELECT version, i, sum(c) FROM (SELECT version, unnest(request_counts) AS c, "
                f"generate_subscripts(request_counts, 1) AS i FROM ({rows})) GROUP BY ALL",
                params,
            ).fetchall()
            reasons = db.execute(
                f"SELECT version, r, sum(c) FROM (SELECT version, unnest(failure_reasons) AS r, "
                f"unnest(failure_counts) AS c FROM ({rows})) GROUP BY ALL",
                params,
            ).fetchall()
        hists: dict[int, list[int]] = {}
        for ver, i, c in buckets:
            hists.setdefault(ver, [0] * (len(LATENCY_BOUNDS) + 1))[i - 1] += int(c)
        by_reason: dict[int, dict[str, int]] = {}
        for ver, r, c in reasons:
            by_reason.setdefault(ver, {})[r] = int(c)
        span = max(until - since, 1e-9)
        out = []
        for ver, requests, failures, n_agents, arms in totals:
            requests, failures = int(requests or 0), int(failures or 0)
            counts = hists.get(ver, [])
            p50, p95, p99 = (percentile(counts, LATENCY_BOUNDS, q) * 1000 for q in QUANTILES)
            out.append(
                WindowStats(
                    model=model,
                    version=int(ver),
                    requests=requests,
                    failures=failures,
                    failures_by_reason=dict(sorted(by_reason.get(ver, {}).items())),
                    error_rate=failures / requests if requests else 0.0,
                    request_rate=requests / span,
                    p50_ms=p50,
                    p95_ms=p95,
                    p99_ms=p99,
                    agents=int(n_agents),
                    arms=tuple(sorted(a for a in arms or () if a is not None)),
                )
            )
        return out

    def samples(
        self,
        model: str,
        version: int,
        agents: Collection[str] | None,
        since: float,
        until: float,
        min_requests: int = MIN_SAMPLE_REQUESTS,
    ) -> list[AgentWindow]:
        """The judge's samples: one per agent-window of ``version`` (see :mod:`hub.judge`).

        Each stored report is one agent's interval. An agent's consecutive intervals are pooled
        (counts and histograms summed) until they hold ``min_requests`` requests: a p99 of five
        requests is their maximum, not a p99. A sample's latency quantiles need half that many
        successful requests (else NaN: a version failing most requests has no latency to
        compare, its errors speak); a remainder below ``min_requests`` at the end keeps its
        counts (errors are judged on every request) and has no latency. Intervals without
        requests are skipped. Same window semantics as :meth:`window`; agents None: the whole
        fleet.
        """
        found = _report_filter(model, version, agents, since, until)
        if found is None:
            return []
        where, params = found
        with self._lock:
            rows = self._db.execute(
                "SELECT agent_id, start_unix, end_unix, requests, failures, request_counts "
                f"FROM version_stats WHERE {where} AND requests > 0 "
                "ORDER BY agent_id, end_unix",
                params,
            ).fetchall()
        out: list[AgentWindow] = []
        acc: list[tuple[Any, ...]] = []

        def flush(with_latency: bool) -> None:
            counts = [sum(int(r[5][i]) for r in acc) for i in range(len(LATENCY_BOUNDS) + 1)]
            latency = {}
            if with_latency and sum(counts) >= max(1, min_requests // 2):
                for name, q in SAMPLE_QUANTILES:
                    latency[name] = percentile(counts, LATENCY_BOUNDS, q) * 1000
            out.append(
                AgentWindow(
                    agent_id=acc[0][0],
                    start=float(acc[0][1]),
                    end=float(acc[-1][2]),
                    requests=sum(int(r[3]) for r in acc),
                    failures=sum(int(r[4]) for r in acc),
                    latency_ms=latency,
                )
            )
            acc.clear()

        for row in rows:
            if acc and acc[0][0] != row[0]:
                flush(False)
            acc.append(row)
            if sum(int(r[3]) for r in acc) >= max(1, min_requests):
                flush(True)
        if acc:
            flush(False)
        return out

    def paired_samples(
        self,
        model: str,
        candidate: int,
        baseline: Collection[int],
        agents: Collection[str] | None,
        since: float,
        until: float,
        min_requests: int = MIN_PAIR_REQUESTS,
    ) -> tuple[list[AgentWindow], list[AgentWindow]]:
        """A split's samples, one pair per agent-window: ``candidate`` and the ``baseline``
        version(s) of the same agent over the same span (equal agent, start and end, which is
        how :func:`hub.judge.judge` pairs them with ``paired=True``).

        Per agent, consecutive reports are pooled until *each* arm holds ``min_requests``
        requests, so both arms of a pair cover the same minutes (a 5% arm pools longer, its
        partner with it). Latency as in :meth:`samples`; a remainder at the end keeps its
        counts only.
        """
        versions = sorted({int(v) for v in baseline} - {int(candidate)})
        found = _report_filter(model, None, agents, since, until)
        if found is None or not versions:
            return [], []
        where, params = found
        marks = ", ".join(f"$v{i}" for i in range(len(versions) + 1))
        params.update({f"v{i}": v for i, v in enumerate([int(candidate), *versions])})
        with self._lock:
            rows = self._db.execute(
                "SELECT agent_id, start_unix, end_unix, requests, failures, request_counts, "
                f"version, seq FROM version_stats WHERE {where} AND version IN ({marks}) "
                "AND requests > 0 ORDER BY agent_id, end_unix, seq",
                params,
            ).fetchall()
        floor, cand = max(1, min_requests), int(candidate)
        out_c: list[AgentWindow] = []
        out_b: list[AgentWindow] = []
        acc: list[tuple[Any, ...]] = []

        def arm(rows_: list[tuple[Any, ...]], with_latency: bool) -> AgentWindow:
            counts = [sum(int(r[5][i]) for r in rows_) for i in range(len(LATENCY_BOUNDS) + 1)]
            latency = {}
            if with_latency and sum(counts) >= max(1, min_requests // 2):
                for name, q in SAMPLE_QUANTILES:
                    latency[name] = percentile(counts, LATENCY_BOUNDS, q) * 1000
            return AgentWindow(
                agent_id=acc[0][0],
                start=float(acc[0][1]),
                end=float(acc[-1][2]),
                requests=sum(int(r[3]) for r in rows_),
                failures=sum(int(r[4]) for r in rows_),
                latency_ms=latency,
            )

        def flush(with_latency: bool) -> None:
            out_c.append(arm([r for r in acc if r[6] == cand], with_latency))
            out_b.append(arm([r for r in acc if r[6] != cand], with_latency))
            acc.clear()

        def full() -> bool:
            c = sum(int(r[3]) for r in acc if r[6] == cand)
            return c >= floor and sum(int(r[3]) for r in acc) - c >= floor

        # One report at a time: both arms of a report always land in the same pair.
        for (agent, _), report in itertools.groupby(rows, key=lambda r: (r[0], r[7])):
            if acc and acc[0][0] != agent:
                flush(False)
            acc.extend(report)
            if full():
                flush(True)
        if acc:
            flush(False)
        return out_c, out_b

    def shadow_window(
        self,
        model: str,
        version: int,
        agents: Collection[str] | None = None,
        since: float = -math.inf,
        until: float = math.inf,
        *,
        shadow_version: int | None = None,
    ) -> ShadowStats:
        """``version``'s outputs against its shadow version(s), over reports that ended in
        ``(since, until]`` (the same window rule as :meth:`window`); agents None: the fleet."""
        found = _report_filter(model, version, agents, since, until)
        rows: list[tuple[Any, ...]] = []
        if found is not None:
            where, params = found
            if shadow_version is not None:
                where += " AND shadow_version = $shadow_version"
                params["shadow_version"] = int(shadow_version)
            with self._lock:
                rows = self._db.execute(
                    "SELECT agent_id, seq, shadow_version, output, compared, dropped, "
                    "shadow_failures, top1_agree, top1_total, abs_counts, rel_counts, js_counts, "
                    f"latency_counts FROM shadow_stats WHERE {where}",
                    params,
                ).fetchall()
        return _shadow_stats(model, int(version), rows)

    def drift_window(
        self,
        model: str,
        version: int | None,
        agents: Collection[str] | None,
        since: float,
        until: float,
    ) -> list[FeatureDrift]:
        """Drift per feature over the drift windows whose report ended in ``(since, until]``:
        fleet-wide rows (``agent_id`` ""), then one per agent; each group ordered by version,
        then ``psi_max`` descending. ``agents`` None: the whole fleet (empty: nobody)."""
        found = _report_filter(model, version, agents, since, until)
        if found is None:
            return []
        where, params = found
        rows = f"SELECT * FROM drift_stats WHERE {where}"
        # psi_last: per agent, the newest window's PSI; fleet-wide the largest of those.
        query = f"""
            WITH d AS ({rows}),
            per_agent AS (
                SELECT version, agent_id, tensor, feature, any_value(role) AS role,
                       count(*) AS windows, sum(rows) AS rows, max(psi) AS psi_max,
                       avg(psi) AS psi_mean, arg_max(psi, window_end_unix) AS psi_last,
                       max(js) AS js_max, max(ks) AS ks_max
                FROM d GROUP BY version, agent_id, tensor, feature
            ),
            fleet AS (
                SELECT version, '' AS agent_id, tensor, feature, any_value(role) AS role,
                       sum(windows) AS windows, sum(rows) AS rows, max(psi_max) AS psi_max,
                       sum(psi_mean * windows) / sum(windows) AS psi_mean,
                       max(psi_last) AS psi_last, max(js_max) AS js_max, max(ks_max) AS ks_max,
                       count(*) AS agents
                FROM per_agent GROUP BY version, tensor, feature
            )
            SELECT * FROM (
                SELECT *, 0 AS grp FROM fleet
                UNION ALL
                SELECT *, 1 AS agents, 1 AS grp FROM per_agent
            ) ORDER BY grp, agent_id, version, psi_max DESC, tensor, feature
        """
        with self._lock:
            result = self._db.execute(query, params).fetchall()
        return [
            FeatureDrift(
                version=int(ver),
                agent_id=agent,
                tensor=tensor,
                feature=feature,
                role=role,
                windows=int(windows),
                rows=int(n_rows or 0),
                psi_max=float(psi_max),
                psi_mean=float(psi_mean),
                psi_last=float(psi_last),
                js_max=float(js_max),
                ks_max=None if ks_max is None else float(ks_max),
                agents=int(n_agents),
            )
            for (
                ver,
                agent,
                tensor,
                feature,
                role,
                windows,
                n_rows,
                psi_max,
                psi_mean,
                psi_last,
                js_max,
                ks_max,
                n_agents,
                _grp,
            ) in result
        ]

    def reporting_agents(self, within_s: float = REPORTING_WINDOW_S) -> dict[tuple[str, int], int]:
        """(model, version) -> distinct agents with a report that ended in the last ``within_s``."""
        since = self.clock() - within_s
        with self._lock:
            rows = self._db.execute(
                "SELECT model, version, count(DISTINCT agent_id) FROM version_stats "
                "WHERE end_unix > ? GROUP BY ALL",
                [since],
            ).fetchall()
        return {(m, int(v)): int(n) for m, v, n in rows}

    def stored_reports(self, agent_id: str | None = None) -> int:
        with self._lock:
            if agent_id is None:
                return _count(self._db.execute("SELECT count(*) FROM reports").fetchone())
            return _count(
                self._db.execute(
                    "SELECT count(*) FROM reports WHERE agent_id = ?", [agent_id]
                ).fetchone()
            )

    def prune(self) -> int:
        """Delete rows past the retention; returns the reports deleted."""
        if self.retention_s <= 0:
            return 0
        horizon = self.clock() - self.retention_s
        with self._lock:
            self._db.execute("BEGIN TRANSACTION")
            try:
                n = _count(
                    self._db.execute(
                        "SELECT count(*) FROM reports WHERE end_unix < ?", [horizon]
                    ).fetchone()
                )
                self._db.execute("DELETE FROM version_stats WHERE end_unix < ?", [horizon])
                self._db.execute("DELETE FROM shadow_stats WHERE end_unix < ?", [horizon])
                self._db.execute("DELETE FROM drift_stats WHERE end_unix < ?", [horizon])
                self._db.execute("DELETE FROM reports WHERE end_unix < ?", [horizon])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return int(n)

    def backup_to(self, path: Path | str) -> None:
        """Copy every table, as of now, into a new DuckDB file ``path`` (one consistent state:
        ingestion waits on the lock meanwhile). A logical copy through the hub's own connection:
        DuckDB lets no other process open the file while the hub has it."""
        target = str(path).replace("'", "''")
        with self._lock:
            row = self._db.execute("SELECT current_database()").fetchone()
            source = str(row[0]).replace('"', '""') if row else "main"
            self._db.execute(f"ATTACH '{target}' AS modelfleet_backup")
            try:
                self._db.execute(f'COPY FROM DATABASE "{source}" TO modelfleet_backup')
                self._db.execute("CHECKPOINT modelfleet_backup")
            finally:
                self._db.execute("DETACH modelfleet_backup")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class TelemetryIngestor:
    """Async front of the store for the gRPC and MQTT handlers: group commit off the loop.

    Batches arriving while a transaction runs are written together in the next one, so the
    per-transaction cost is shared by every agent that reported meanwhile.
    """

    def __init__(self, store: TelemetryStorePort) -> None:
        self.store = store
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="telemetry-db")
        self._queue: list[tuple[str, list[pb.TelemetryReport], asyncio.Future]] = []
        self._draining = False
        self._tasks: set[asyncio.Task] = set()

    async def ingest(self, agent_id: str, reports: Iterable[pb.TelemetryReport]) -> list[int]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._queue.append((agent_id, list(reports), fut))
        if not self._draining:
            self._draining = True
            task = loop.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                items, self._queue = self._queue, []
                batches = [(agent_id, reports) for agent_id, reports, _ in items]
                try:
                    acked = await loop.run_in_executor(
                        self.executor, self.store.ingest_many, batches
                    )
                except Exception as exc:
                    log.exception("storing telemetry failed")
                    for _, _, fut in items:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, _, fut), seqs in zip(items, acked, strict=True):
                    if not fut.done():
                        fut.set_result(seqs)
        finally:
            self._draining = False

    async def query(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a store query on the store's thread (keeps DuckDB work off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def prune_loop(self, stop: asyncio.Event, every_s: float = 3600.0) -> None:
        """Retention: delete old rows at start and then hourly."""
        while not stop.is_set():
            try:
                n = await self.query(self.store.prune)
                if n:
                    log.info("telemetry retention: deleted %d old report(s)", n)
            except Exception:
                log.exception("pruning telemetry failed; will retry")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.store.close()


class FleetCollector:
    """prometheus_client collector: fleet aggregates from the store, read at scrape time."""

    def __init__(self, store: TelemetryStorePort) -> None:
        self.store = store

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self.store.counters
        yield CounterMetricFamily(
            "modelfleet_hub_telemetry_reports", "Telemetry reports stored.", value=c.reports
        )
        yield CounterMetricFamily(
            "modelfleet_hub_telemetry_duplicates",
            "Replayed telemetry reports acknowledged but not stored again.",
            value=c.duplicates,
        )
        yield CounterMetricFamily(
            "modelfleet_hub_telemetry_expired",
            "Telemetry reports older than the retention, acknowledged and not stored.",
            value=c.expired,
        )
        yield CounterMetricFamily(
            "modelfleet_hub_telemetry_agent_dropped_reports",
            "Reports agents dropped from full outboxes (as they reported).",
            value=c.dropped_by_agents,
        )
        requests = CounterMetricFamily(
            "modelfleet_hub_fleet_requests",
            "Inference requests reported by agents, per model version.",
            labels=["model", "version"],
        )
        failures = CounterMetricFamily(
            "modelfleet_hub_fleet_failures",
            "Failed inference requests reported by agents, per model version.",
            labels=["model", "version"],
        )
        for (model, version), (req, fail) in sorted(c.versions.items()):
            requests.add_metric([model, str(version)], req)
            failures.add_metric([model, str(version)], fail)
        yield requests
        yield failures
        agents = GaugeMetricFamily(
            "modelfleet_hub_fleet_agents_reporting",
            f"Agents whose telemetry for the version ended in the last {REPORTING_WINDOW_S:g}s.",
            labels=["model", "version"],
        )
        try:
            reporting = self.store.reporting_agents()
        except duckdb.Error:  # closed during shutdown
            reporting = {}
        for (model, version), n in sorted(reporting.items()):
            agents.add_metric([model, str(version)], n)
        yield agents


def serve_metrics(store: TelemetryStorePort, listen: str) -> Any:
    """The hub's Prometheus /metrics on ``listen`` (HOST:PORT); returns the HTTP server."""
    from prometheus_client import CollectorRegistry

    from modelfleet.kernel.metrics_http import serve_metrics_http
    from modelfleet.kernel.settings import split_hostport

    host, port = split_hostport(listen, "metrics_listen")
    registry = CollectorRegistry()
    registry.register(FleetCollector(store))
    return serve_metrics_http(registry, host, port)


__all__ = [
    "TELEMETRY_FILE",
    "FleetCollector",
    "ShadowOutputStats",
    "ShadowStats",
    "TelemetryIngestor",
    "TelemetryStore",
    "WindowStats",
    "percentile",
    "rebucket",
    "serve_metrics",
]


def _drift_table(new: list[tuple[tuple[str, int], pb.TelemetryReport]]) -> pa.Table:
    cols: dict[str, list[Any]] = {name: [] for name in _DRIFT_SCHEMA.names}
    for (agent_id, seq), r in new:
        for v in r.versions:
            for d in v.drift:
                for f in d.features:
                    for name, cell in (
                        ("agent_id", agent_id),
                        ("seq", seq),
                        ("model", v.model),
                        ("version", v.version),
                        ("end_unix", r.end_unix),
                        ("window_start_unix", d.window_start_unix),
                        ("window_end_unix", d.window_end_unix),
                        ("offered", d.offered),
                        ("sampled", d.sampled),
                        ("tensor", f.tensor),
                        ("feature", f.name),
                        ("role", f.role),
                        ("kind", f.kind),
                        ("psi", f.psi),
                        ("js", f.js),
                        ("ks", f.ks if f.HasField("ks") else None),
                        ("rows", f.rows),
                    ):
                        cols[name].append(cell)
    return pa.table(cols, schema=_DRIFT_SCHEMA)


def _sum_lists(acc: list[int] | None, counts: Sequence[int]) -> list[int]:
    if acc is None:
        return [int(c) for c in counts]
    return [a + int(c) for a, c in zip(acc, counts, strict=True)]


def _shadow_stats(model: str, version: int, rows: Sequence[tuple[Any, ...]]) -> ShadowStats:
    # Per report and shadow version, request counts are the same on every output's row:
    # counted once (the largest, should a row be missing an output).
    per_report: dict[tuple[str, int, int], tuple[int, int, int]] = {}
    per_output: dict[str, dict[str, Any]] = {}
    agents: set[str] = set()
    for agent, seq, shadow_v, output, compared, dropped, failures, agree, total, *hists in rows:
        agents.add(agent)
        key = (agent, int(seq), int(shadow_v))
        prev = per_report.get(key, (0, 0, 0))
        per_report[key] = (
            max(prev[0], int(compared)),
            max(prev[1], int(dropped)),
            max(prev[2], int(failures)),
        )
        o = per_output.setdefault(output, {"compared": 0, "agree": 0, "total": 0})
        o["compared"] += int(compared)
        o["agree"] += int(agree)
        o["total"] += int(total)
        for name, counts in zip(("abs", "rel", "js", "lat"), hists, strict=True):
            o[name] = _sum_lists(o.get(name), counts)
    nan = math.nan
    outputs = {}
    for name, o in sorted(per_output.items()):
        abs_c, rel_c, js_c = o.get("abs", []), o.get("rel", []), o.get("js", [])
        outputs[name] = ShadowOutputStats(
            output=name,
            compared=o["compared"],
            top1_agreement=o["agree"] / o["total"] if o["total"] else nan,
            abs_diff_p50=percentile(abs_c, DIFF_BOUNDS, 0.5),
            abs_diff_p99=percentile(abs_c, DIFF_BOUNDS, 0.99),
            rel_diff_p50=percentile(rel_c, DIFF_BOUNDS, 0.5),
            rel_diff_p99=percentile(rel_c, DIFF_BOUNDS, 0.99),
            js_p50=percentile(js_c, JS_BOUNDS, 0.5),
            js_p99=percentile(js_c, JS_BOUNDS, 0.99),
        )

    def worst(values: Iterable[float], pick: Callable[[Iterable[float]], float]) -> float:
        known = [v for v in values if not math.isnan(v)]
        return pick(known) if known else nan

    latency: list[int] | None = None
    for o in per_output.values():
        if "lat" in o:
            # Every output's row holds the same shadow latencies: take one output's.
            latency = o["lat"]
            break
    agree = sum(o["agree"] for o in per_output.values())
    total = sum(o["total"] for o in per_output.values())
    out = list(outputs.values())
    return ShadowStats(
        model=model,
        version=version,
        shadow_versions=tuple(sorted({k[2] for k in per_report})),
        compared=sum(v[0] for v in per_report.values()),
        dropped=sum(v[1] for v in per_report.values()),
        shadow_failures=sum(v[2] for v in per_report.values()),
        top1_agree=agree,
        top1_total=total,
        top1_agreement=agree / total if total else nan,
        abs_diff_p50=worst((o.abs_diff_p50 for o in out), max),
        abs_diff_p99=worst((o.abs_diff_p99 for o in out), max),
        rel_diff_p50=worst((o.rel_diff_p50 for o in out), max),
        rel_diff_p99=worst((o.rel_diff_p99 for o in out), max),
        js_p50=worst((o.js_p50 for o in out), max),
        js_p99=worst((o.js_p99 for o in out), max),
        shadow_latency_p50_ms=percentile(latency or [], LATENCY_BOUNDS, 0.5) * 1000,
        shadow_latency_p99_ms=percentile(latency or [], LATENCY_BOUNDS, 0.99) * 1000,
        agents=len(agents),
        outputs=outputs,
    )


def _count(row: tuple[Any, ...] | None) -> int:
    """The value of a ``SELECT count(*)`` row (DuckDB types fetchone() as optional)."""
    return int(row[0]) if row is not None else 0
