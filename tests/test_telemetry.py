"""Telemetry that loses nothing: aggregation, the on-disk outbox, the DuckDB store, and real
processes through hub outages and a kill -9 with exact counts."""

from __future__ import annotations

import asyncio
import itertools
import math
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from modelfleet.agent.fleet.outbox import Outbox, TelemetryShipper, open_journal
from modelfleet.agent.telemetry import (
    BATCH_BOUNDS,
    LATENCY_BOUNDS,
    REASON_SLOTS,
    CounterStore,
    JournalMark,
    TelemetryAggregator,
    recovered_report,
)
from modelfleet.hub.telemetry import TelemetryStore, percentile, rebucket
from modelfleet.protos import fleet_pb2 as pb
from tests import models
from tests.procs import ROOT, AgentProcess, HubProcess, enroll_agent, free_port, wait_for

# -- agent aggregation ------------------------------------------------------------------------


def test_aggregator_counts_per_version_and_resets_each_interval() -> None:
    now = [1000.0]
    agg = TelemetryAggregator(clock=lambda: now[0])
    v1 = agg.version("mlp", 1)
    v1.ok(0.0004, 0.0001)
    v1.ok(0.001, 0.0)  # exactly on a bound: counted in that bound's bucket (le semantics)
    v1.failed("shape")
    v1.batch_done(3, 0.0002)
    agg.failed("_unknown", 0, "model_not_found")
    agg.gate("mlp", 2, False)
    agg.switched("mlp", 1, rollback=True)
    agg.version("mlp", 9)
    now[0] = 1005.0
    report = agg.snapshot(serving=[("mlp", 1), ("other", 7)])
    assert (report.start_unix, report.end_unix) == (1000.0, 1005.0)
    assert report.rss_bytes > 1_000_000 and report.cpu_seconds >= 0
    by = {(v.model, v.version): v for v in report.versions}
    # Versions that serve are reported even when idle; other idle ones (mlp v9) are not.
    assert set(by) == {("mlp", 1), ("mlp", 2), ("_unknown", 0), ("other", 7)}
    assert by[("other", 7)].requests == 0
    m = by[("mlp", 1)]
    assert (m.requests, m.failures, dict(m.failures_by_reason)) == (3, 1, {"shape": 1})
    assert m.rollbacks == 1 and m.swaps == 0
    assert list(m.request_latency.bounds) == list(LATENCY_BOUNDS)
    assert m.request_latency.count == 2 and sum(m.request_latency.counts) == 2
    assert m.request_latency.counts[LATENCY_BOUNDS.index(0.001)] == 1
    assert m.request_latency.counts[LATENCY_BOUNDS.index(0.0005)] == 1
    assert list(m.batch_size.bounds) == list(BATCH_BOUNDS) and m.batch_size.counts[2] == 1
    assert by[("mlp", 2)].gate_failed == 1
    # The next interval starts from zero.
    now[0] = 1010.0
    again = agg.snapshot(serving=[("mlp", 1)])
    assert again.start_unix == 1005.0
    assert [(v.model, v.version, v.requests) for v in again.versions] == [("mlp", 1, 0)]
    assert not agg.pending()


def requests_in(reports: list[pb.TelemetryReport]) -> int:
    return sum(v.requests for r in reports for v in r.versions)


def test_an_uncommitted_cut_leaves_its_counts_to_the_next() -> None:
    now = [100.0]
    agg = TelemetryAggregator(clock=lambda: now[0])
    agg.version("mlp", 1).ok(0.001, 0.0)
    now[0] = 105.0
    lost = agg.cut()  # the outbox write failed: never committed
    assert requests_in([lost.report]) == 1
    agg.version("mlp", 1).ok(0.001, 0.0)
    now[0] = 110.0
    cut = agg.cut()
    # Both intervals in one report, from the last committed end on.
    assert requests_in([cut.report]) == 2 and cut.report.start_unix == 100.0
    cut.commit()
    assert not agg.pending() and requests_in([agg.snapshot()]) == 0


def test_failure_reasons_beyond_the_slots_count_as_other() -> None:
    agg = TelemetryAggregator()
    c = agg.version("mlp", 1)
    reasons = [f"r{i}" for i in range(REASON_SLOTS + 3)]
    for r in reasons:
        c.failed(r)
    c.failed("r0")
    (v,) = agg.snapshot().versions
    expected = {r: 1 for r in reasons[: REASON_SLOTS - 1]} | {"r0": 2, "other": 4}
    assert (v.requests, v.failures, dict(v.failures_by_reason)) == (12, 12, expected)


def test_attach_moves_unreported_counts_into_the_journal(tmp_path: Path) -> None:
    agg = TelemetryAggregator()
    held = agg.version("mlp", 1)  # a LoadedVersion keeps this object
    held.ok(0.001, 0.0)
    agg.snapshot()  # reported: must not be reported again
    held.ok(0.001, 0.0)
    held.failed("shape")
    agg.failed("_unknown", 0, "model_not_found")
    journal = CounterStore.create(tmp_path / "journal")
    agg.attach(journal)
    held.ok(0.002, 0.0)  # the same object now counts into the journal
    by = {(v.model, v.version): v for v in agg.snapshot().versions}
    assert (by["mlp", 1].requests, by["mlp", 1].failures) == (3, 1)
    assert dict(by["mlp", 1].failures_by_reason) == {"shape": 1}
    assert by["_unknown", 0].failures_by_reason["model_not_found"] == 1
    # And the journal holds them: a process killed now would recover all of it.
    got = recovered_report(journal, None)
    assert got is not None and requests_in([got]) == 4


def test_recovery_counts_what_no_committed_report_holds(tmp_path: Path) -> None:
    journal = CounterStore.create(tmp_path / "journal")
    agg = TelemetryAggregator(store=journal)
    for _ in range(5):
        agg.version("mlp", 1).ok(0.001, 0.0)
    cut = agg.cut()
    assert cut.mark is not None and cut.mark.ident == journal.ident
    cut.commit()
    for _ in range(3):
        agg.version("mlp", 1).ok(0.001, 0.0)
    agg.version("mlp", 2).failed("shape")
    got = recovered_report(journal, cut.mark)
    assert got is not None
    assert {(v.version, v.requests) for v in got.versions} == {(1, 3), (2, 1)}
    assert got.start_unix == cut.mark.end_unix
    # A mark of another journal (this one was created after it): all of it is unreported.
    other = JournalMark(journal.ident + 1, cut.mark.counters, cut.mark.end_unix)
    got = recovered_report(journal, other)
    assert got is not None and requests_in([got]) == 9
    # A journal older than the mark (its pages lost with the power): v1 recovers nothing, never
    # a negative count; v2, which the mark does not know, still recovers its request.
    ahead = JournalMark(journal.ident, (cut.mark.rows() * 10).tobytes(), cut.mark.end_unix)
    got = recovered_report(journal, ahead)
    assert got is not None and [(v.version, v.requests) for v in got.versions] == [(2, 1)]


def test_open_journal_commits_recovered_counts_once_and_starts_afresh(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_reports=100)
    first = open_journal(tmp_path / "journal", box)
    agg = TelemetryAggregator(store=first)
    for _ in range(7):
        agg.version("mlp", 1).ok(0.001, 0.0)
    ident = first.ident
    first.close()  # as a kill -9 leaves it: counted, never reported
    second = open_journal(tmp_path / "journal", box)
    assert second.ident != ident and second.used == 1
    assert requests_in(box.pending()) == 7
    second.close()
    # Killed again right away: the mark names the old journal, the new one holds nothing.
    third = open_journal(tmp_path / "journal", box)
    assert requests_in(box.pending()) == 7 and box.count() == 1
    third.close()
    # Not a journal: set aside with a clear log, and a fresh one is used.
    (tmp_path / "journal").write_bytes(b"garbage")
    fourth = open_journal(tmp_path / "journal", box)
    assert fourth.used == 1 and list(tmp_path.glob("journal.unreadable-*"))
    fourth.close()


_KILLED_COUNTER = """
import sys
from pathlib import Path
from modelfleet.agent.fleet.outbox import Outbox, open_journal
from modelfleet.agent.telemetry import TelemetryAggregator
data = Path(sys.argv[1])
box = Outbox(data / "outbox.db", max_reports=1_000_000)
agg = TelemetryAggregator(store=open_journal(data / "journal", box))
v = agg.version("mlp", 1)
n = 0
while True:
    v.ok(0.0004, 0.0)
    n += 1
    # The answer goes out only after the count: what the parent read was counted.
    sys.stdout.write(f"{n}\\n")
    sys.stdout.flush()
    if n % 500 == 0:
        cut = agg.cut()
        box.append(cut.report, cut.mark)
        cut.commit()
"""


def test_kill_9_loses_no_count_that_was_answered(tmp_path: Path) -> None:
    answered = 0
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILLED_COUNTER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        last = 0
        while last < 1200 + 300 * round_ and time.monotonic() < deadline:
            last = int(proc.stdout.readline())
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # Lines already written to the pipe were counted too; read them all.
        last = max([last, *(int(x) for x in proc.stdout.read().split())])
        answered += last
    box = Outbox(tmp_path / "outbox.db", max_reports=1_000_000)
    open_journal(tmp_path / "journal", box).close()
    counted = requests_in(box.pending(limit=10**6))
    # Counted before answering: at most the one count per kill whose answer was not written.
    assert answered <= counted <= answered + 3, (answered, counted)


def test_journal_hot_path_micro_benchmark(tmp_path: Path) -> None:
    """What a request costs in telemetry: the counters it adds to, in the journal."""
    import timeit

    journal = TelemetryAggregator(store=CounterStore.create(tmp_path / "journal"))
    c = journal.version("mlp", 1)
    n = 100_000
    per = min(timeit.repeat(lambda: c.ok(0.0004, 0.00002), number=n, repeat=5)) / n
    batch = min(timeit.repeat(lambda: c.batch_done(1, 0.0002), number=n, repeat=5)) / n
    print(f"\nper request {per * 1e9:.0f} ns, per batch {batch * 1e9:.0f} ns")
    assert requests_in([journal.snapshot()]) == 5 * n
    assert per < 20e-6  # a floor against gross regressions (a system call would show)


# -- the outbox -------------------------------------------------------------------------------


def report(requests: int = 1, end: float = 0.0) -> pb.TelemetryReport:
    return pb.TelemetryReport(
        start_unix=end - 1,
        end_unix=end or time.time(),
        versions=[pb.VersionTelemetry(model="mlp", version=1, requests=requests)],
    )


def test_outbox_seq_survives_restart_and_acks_remove(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path, max_reports=100)
    first = box.next_seq()
    # Seeded from the clock: a lost outbox file can never reuse seqs the hub has stored.
    assert first > 1_600_000_000_000
    seqs = [box.append(report(i)) for i in range(5)]
    assert seqs == list(range(first, first + 5))
    assert box.ack(seqs[:2]) == 2 and box.ack(seqs[:2]) == 0
    box.close()
    box = Outbox(path, max_reports=100)
    assert [r.seq for r in box.pending()] == seqs[2:]
    assert [r.versions[0].requests for r in box.pending(limit=2)] == [2, 3]
    box.ack(seqs)
    box.close()
    box = Outbox(path, max_reports=100)
    assert box.count() == 0 and box.append(report()) == first + 5
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_outbox_cap_drops_oldest_and_counts_them(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_reports=3)
    seqs = [box.append(report(i)) for i in range(7)]
    pending = box.pending()
    assert [r.seq for r in pending] == seqs[-3:]
    # Each report carries what was dropped to make room for it, plus what dropped reports
    # carried: the hub's sum over what arrives is exactly the number lost.
    assert sum(r.dropped_reports for r in pending) == 4 == box.dropped_total
    box.ack([r.seq for r in pending])
    assert box.append(report()) == seqs[-1] + 1
    assert box.pending()[0].dropped_reports == 0


_CRASH_WRITER = """
import sys, time
from modelfleet.agent.fleet.outbox import Outbox
from modelfleet.protos import fleet_pb2 as pb
box = Outbox(sys.argv[1], max_reports=1_000_000)
print("open", flush=True)
while True:
    box.append(pb.TelemetryReport(end_unix=time.time(),
               versions=[pb.VersionTelemetry(model="m", version=1, requests=1)]))
"""


def test_outbox_kill_9_loses_nothing_written_and_never_reuses_a_seq(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CRASH_WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"open\n"
        time.sleep(0.3 + 0.1 * round_)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        box = Outbox(path, max_reports=1_000_000)
        seqs = [r.seq for r in box.pending(limit=10**9)]
        assert len(seqs) > 5, "the writer wrote nothing"
        # Contiguous, no duplicates, and the counter continues right after the last one.
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert box.next_seq() == seqs[-1] + 1
        box.close()


def test_shipper_retries_with_backoff_and_drains_in_order(tmp_path: Path) -> None:
    agg = TelemetryAggregator()
    box = Outbox(tmp_path / "outbox.db", max_reports=1000)
    calls: list[list[int]] = []
    received: dict[int, pb.TelemetryReport] = {}

    async def send(batch: pb.TelemetryBatch) -> list[int]:
        calls.append([r.seq for r in batch.reports])
        if len(calls) <= 3:
            raise ConnectionError("hub down")
        for r in batch.reports:
            received.setdefault(r.seq, r)
        return [r.seq for r in batch.reports]

    async def scenario() -> None:
        shipper = TelemetryShipper(agg, box, send, interval_s=0.05, backoff_max_s=0.2, batch_max=4)
        stop = asyncio.Event()
        tasks = [
            asyncio.ensure_future(shipper.collect_loop(stop)),
            asyncio.ensure_future(shipper.send_loop(stop)),
        ]
        for _ in range(40):
            agg.version("mlp", 1).ok(0.001, 0.0)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
        await shipper.cut(only_if_active=True)
        await shipper.send_once()

    asyncio.run(scenario())
    assert box.count() == 0
    seqs = sorted(received)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert sum(r.versions[0].requests for r in received.values() if r.versions) == 40
    # Backoff, not a busy loop: a handful of attempts while the "hub" was down.
    assert len(calls) < 40
    assert all(c == sorted(c) and len(c) <= 4 for c in calls)


# -- the hub's store --------------------------------------------------------------------------


def synthetic(
    agent: str, seq: int, end: float, latencies: np.ndarray, failures: int = 0, version: int = 1
) -> pb.TelemetryReport:
    agg = TelemetryAggregator(clock=lambda: end)
    c = agg.version("mlp", version)
    for x in latencies:
        c.ok(float(x), 0.0)
    for _ in range(failures):
        c.failed("shape")
    r = agg.snapshot(serving=[("mlp", version)])
    r.seq, r.start_unix = seq, end - 5
    return r


def test_store_is_idempotent_per_agent_and_seq(tmp_path: Path) -> None:
    path = tmp_path / "t.duckdb"
    store = TelemetryStore(path)
    now = time.time()
    batch = [synthetic("a", s, now - 50 + s, np.full(10, 0.002), 1) for s in range(1, 6)]
    assert store.ingest("a", batch) == [1, 2, 3, 4, 5]
    assert store.ingest("a", batch) == [1, 2, 3, 4, 5]  # acked again, not stored again
    # Same seqs from another agent are other reports; a repeat inside one call counts once.
    assert store.ingest_many([("b", batch[:2]), ("b", batch[:2])]) == [[1, 2], [1, 2]]
    (w,) = store.window("mlp", 1, None, now - 100, now)
    assert (w.requests, w.failures, w.agents) == (7 * 11, 7, 2)
    assert store.counters.duplicates == 7 and store.counters.reports == 7
    store.close()
    # After a hub restart too.
    store = TelemetryStore(path)
    store.ingest("a", batch)
    (w,) = store.window("mlp", 1, None, now - 100, now)
    assert w.requests == 77 and store.stored_reports() == 7
    store.close()


def test_window_percentiles_match_numpy(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "t.duckdb")
    rng = np.random.default_rng(5)
    now = time.time()
    all_lat = []
    for agent in range(4):
        for seq in range(1, 11):
            lat = rng.lognormal(mean=np.log(0.004), sigma=0.6, size=250)
            all_lat.append(lat)
            store.ingest(
                f"agent-{agent}",
                [synthetic(f"agent-{agent}", seq, now - 100 + seq, lat, failures=seq % 3)],
            )
    lat = np.concatenate(all_lat)
    assert lat.max() < LATENCY_BOUNDS[-1]
    (w,) = store.window("mlp", None, None, now - 200, now)
    failures = 4 * sum(s % 3 for s in range(1, 11))
    assert w.requests == lat.size + failures and w.failures == failures
    assert w.error_rate == pytest.approx(failures / (lat.size + failures))
    assert w.request_rate == pytest.approx(w.requests / 200)
    assert w.failures_by_reason == {"shape": failures} and w.agents == 4
    # Reference: the bucketed CDF, linear between bounds, computed independently with numpy.
    edges = np.array((0.0, *LATENCY_BOUNDS))
    counts = np.array([np.sum((lat > lo) & (lat <= hi)) for lo, hi in itertools.pairwise(edges)])
    cdf = np.concatenate(([0], np.cumsum(counts)))
    for q, got in ((0.5, w.p50_ms), (0.95, w.p95_ms), (0.99, w.p99_ms)):
        ref = float(np.interp(q * lat.size, cdf, edges)) * 1000
        assert got == pytest.approx(ref, rel=1e-9)
        # And the true percentile lies in the same bucket as the estimate.
        true = float(np.percentile(lat, q * 100))
        i = int(np.searchsorted(LATENCY_BOUNDS, true))
        assert edges[i] * 1000 <= got <= edges[i + 1] * 1000, (q, got, true)


def test_window_filters_and_edges(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "t.duckdb")
    now = time.time()
    store.ingest(
        "a",
        [
            synthetic("a", 1, now - 30, np.full(5, 0.001), version=1),
            synthetic("a", 2, now - 10, np.full(7, 0.001), version=2),
        ],
    )
    store.ingest("b", [synthetic("b", 1, now - 10, np.full(3, 0.001), version=2)])
    # Intervals count by their end: (since, until].
    assert [w.requests for w in store.window("mlp", 2, None, now - 10, now)] == []
    assert [w.requests for w in store.window("mlp", 2, None, now - 11, now - 10)] == [10]
    both = store.window("mlp", None, None, now - 60, now)
    assert [(w.version, w.requests, w.agents) for w in both] == [(1, 5, 1), (2, 10, 2)]
    assert [w.requests for w in store.window("mlp", 2, ["b"], now - 60, now)] == [3]
    assert store.window("mlp", None, [], now - 60, now) == []
    assert store.window("other", None, None, now - 60, now) == []
    idle = synthetic("c", 1, now - 5, np.array([]))
    store.ingest("c", [idle])
    (w,) = store.window("mlp", 1, ["c"], now - 60, now)
    assert w.requests == 0 and w.agents == 1 and math.isnan(w.p99_ms)


def test_retention_and_rebucketing(tmp_path: Path) -> None:
    now = [time.time()]
    store = TelemetryStore(tmp_path / "t.duckdb", retention_s=3600, clock=lambda: now[0])
    old = synthetic("a", 1, now[0] - 7200, np.full(3, 0.001))
    fresh = synthetic("a", 2, now[0] - 10, np.full(3, 0.001))
    assert store.ingest("a", [old, fresh]) == [1, 2]  # too old: acked, not stored
    assert store.stored_reports() == 1 and store.counters.expired == 1
    now[0] += 3600
    assert store.prune() == 1 and store.stored_reports() == 0
    # A histogram in other bounds lands in the first bucket at or above each source bound.
    h = pb.Histogram(bounds=[0.0003, 0.002, 50.0], counts=[1, 2, 3, 4])
    got = rebucket(h, LATENCY_BOUNDS)
    assert got[LATENCY_BOUNDS.index(0.0005)] == 1 and got[LATENCY_BOUNDS.index(0.0025)] == 2
    assert got[-1] == 7 and sum(got) == 10
    assert percentile([0, 0, 4], [1.0, 2.0], 0.5) == 2.0  # all in +Inf: the last bound
    assert percentile([4, 0, 0], [1.0, 2.0], 0.5) == 0.5


def test_ingest_rate_micro_benchmark(tmp_path: Path) -> None:
    """1,000 reports (2 versions each) from 100 agents, batched as the ingestor groups them."""
    store = TelemetryStore(tmp_path / "t.duckdb")
    now = time.time()
    lat = np.random.default_rng(1).lognormal(np.log(0.003), 0.5, 50)
    batches = []
    for seq in range(1, 11):
        group = []
        for a in range(100):
            r = synthetic(f"a{a}", seq, now - 100 + seq, lat, failures=1)
            r.versions.append(synthetic(f"a{a}", seq, now - 100 + seq, lat, version=2).versions[0])
            group.append((f"a{a}", [r]))
        batches.append(group)
    start = time.perf_counter()
    for group in batches:
        store.ingest_many(group)
    rate = 1000 / (time.perf_counter() - start)
    print(f"\ningested {rate:.0f} reports/s")
    assert store.stored_reports() == 1000
    assert rate > 100  # a floor against gross regressions; the measured rate is printed


# -- real processes ---------------------------------------------------------------------------

TELEMETRY_ENV = {
    "MODELFLEET_AGENT_BACKOFF_MAX_S": "1",
    "MODELFLEET_AGENT_REPORT_INTERVAL_S": "1",
    "MODELFLEET_AGENT_TELEMETRY_INTERVAL_S": "0.5",
}


def infer(agent: AgentProcess, ok: int, bad: int) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with grpcclient.InferenceServerClient(agent.url) as c:
        good = grpcclient.InferInput("x", [1, 4], "FP32")
        good.set_data_from_numpy(np.ones((1, 4), np.float32))
        wrong = grpcclient.InferInput("x", [1, 5], "FP32")
        wrong.set_data_from_numpy(np.ones((1, 5), np.float32))
        for _ in range(ok):
            c.infer("mlp", [good])
        for _ in range(bad):
            with pytest.raises(InferenceServerException, match="shape"):
                c.infer("mlp", [wrong])


def fleet_metrics(hub: HubProcess) -> tuple[int, int, str]:
    """(requests, failures, table) of mlp v1 over the last hour, via the CLI."""
    out = hub.cli("metrics", "mlp", "--since", "1h")
    for line in out.splitlines():
        cols = line.split()
        if cols and cols[0] == "1":
            return int(cols[2]), int(cols[4]), out
    return 0, 0, out


def outbox_requests(data: Path) -> int:
    con = sqlite3.connect(f"file:{data / 'telemetry-outbox.db'}?mode=ro", uri=True)
    try:
        bodies = [b for (b,) in con.execute("SELECT body FROM reports")]
    finally:
        con.close()
    reports = [pb.TelemetryReport.FromString(b) for b in bodies]
    return sum(v.requests for r in reports for v in r.versions)


def restart_hub(old: HubProcess, log_path: Path, *extra: str) -> HubProcess:
    h = HubProcess(old.data, *extra, log_path=log_path)
    h.port, h.enroll_port, h.url = old.port, old.enroll_port, old.url
    return h.start()


def test_exact_counts_through_hub_outage_and_agent_kill(tmp_path: Path) -> None:
    metrics_port = free_port()
    extra = ("--metrics-listen", f"127.0.0.1:{metrics_port}")
    hubs = [HubProcess(tmp_path / "hub", *extra, log_path=tmp_path / "hub0.log").start()]
    agents: list[AgentProcess] = []
    try:
        hub = hubs[0]
        data = tmp_path / "edge-1"
        config = enroll_agent(hub, data, "site=berlin", hostname="edge-1")

        def start_agent(**env: str) -> AgentProcess:
            a = AgentProcess(
                data,
                fleet_config=config,
                env={**TELEMETRY_ENV, **env},
                log_path=tmp_path / f"agent{len(agents)}.log",
            )
            agents.append(a)
            return a.start()

        agent = start_agent()
        hub.cli("publish", "mlp", str(models.mlp(tmp_path / "m.onnx", seed=0)))
        hub.cli("deploy", "mlp", "1")
        agent.wait_model("mlp", timeout=60)

        # 1. Known traffic, exact counts at the hub: CLI and Prometheus.
        infer(agent, 300, 20)
        wait_for(lambda: fleet_metrics(hub)[:2] == (320, 20), 60, "320 requests, 20 failures")
        table = fleet_metrics(hub)[2]
        assert "shape=20" in table and "6.250%" in table
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            prom = r.read().decode()
        assert 'modelfleet_hub_fleet_requests_total{model="mlp",version="1"} 320.0' in prom
        assert 'modelfleet_hub_fleet_agents_reporting{model="mlp",version="1"} 1.0' in prom
        assert "modelfleet_hub_telemetry_reports_total" in prom

        # 2. Hub outage while requests continue: the outbox holds them until it is back.
        hub.stop()
        infer(agent, 100, 10)
        time.sleep(1.5)  # several intervals go into the outbox while the hub is away
        hub = restart_hub(hub, tmp_path / "hub1.log", *extra)
        hubs.append(hub)
        wait_for(lambda: fleet_metrics(hub)[:2] == (430, 30), 60, "430 after the hub outage")

        # 3. Hub down and the agent killed (-9) with reports in its outbox.
        hub.stop()
        infer(agent, 50, 5)
        wait_for(lambda: outbox_requests(data) == 55, 60, "55 requests in the outbox")
        agent.kill()
        hub = restart_hub(hub, tmp_path / "hub2.log", *extra)
        hubs.append(hub)
        agent = start_agent()
        wait_for(lambda: fleet_metrics(hub)[:2] == (485, 35), 90, "485 after kill -9")
        # Nothing twice: more intervals pass (replays would show up now), counts stay put.
        time.sleep(2)
        assert fleet_metrics(hub)[:2] == (485, 35)
        assert outbox_requests(data) == 0

        # 4. SIGTERM mid-interval: with a 60 s interval, only the shutdown flush can deliver these.
        agent.stop()
        agent = start_agent(MODELFLEET_AGENT_TELEMETRY_INTERVAL_S="60")
        agent.wait_model("mlp", timeout=60)
        infer(agent, 10, 1)
        assert agent.stop() == 0
        wait_for(lambda: fleet_metrics(hub)[:2] == (496, 36), 60, "the partial interval")
    finally:
        for a in agents:
            a.stop()
        for h in hubs:
            h.stop()


# -- serving workers' slots (agent/workers.py) ----------------------------------------------------

_SIBLING_COUNTER = """
import sys
from pathlib import Path
from modelfleet.agent.telemetry import CounterStore
from modelfleet.agent.workers import _WorkerTelemetry
agg = _WorkerTelemetry(CounterStore.map(Path(sys.argv[1])))
agg.assigned[("mlp", 1)] = int(sys.argv[2])
v = agg.version("mlp", 1)
for _ in range(int(sys.argv[3])):
    v.ok(0.0004, 0.0001)
for reason in (sys.argv[4] if len(sys.argv) > 4 else "shape,datatype,shape").split(","):
    v.failed(reason)
agg.gate("mlp", 1, True)  # the leader counts gates and switches once for every process
agg.switched("mlp", 1, rollback=False)
"""


def _count_in_sibling(
    journal: Path, base: int, n: int, reasons: str = "shape,datatype,shape"
) -> None:
    subprocess.run(
        [sys.executable, "-c", _SIBLING_COUNTER, str(journal), str(base), str(n), reasons],
        cwd=ROOT,
        check=True,
        timeout=60,
    )


def test_a_worker_process_counts_in_its_slot_and_every_view_sums_it(tmp_path: Path) -> None:
    journal = CounterStore.create(tmp_path / "journal")
    agg = TelemetryAggregator(store=journal)
    mine = agg.version("mlp", 1)
    for _ in range(4):
        mine.ok(0.001, 0.0)
    mine.failed("shape")
    agg.gate("mlp", 1, True)
    base = agg.sibling("mlp", 1)
    assert base is not None
    _count_in_sibling(tmp_path / "journal", base, 6)

    # The report: one entry for the version, every process's counts in it.
    cut = agg.cut()
    (entry,) = [v for v in cut.report.versions if (v.model, v.version) == ("mlp", 1)]
    assert entry.requests == 4 + 1 + 6 + 3
    assert entry.failures == 1 + 3
    assert dict(entry.failures_by_reason) == {"shape": 3, "datatype": 1}
    assert entry.request_latency.count == 10
    assert entry.gate_passed == 1 and entry.swaps == 0
    cut.commit()
    assert agg.snapshot().versions == []  # all of it was in the committed cut

    # /metrics: the same sums, from the scrape thread's view.
    ((_, sums),) = agg.totals(lambda m, v: (m, v) == ("mlp", 1))
    assert sums.successes == 10
    assert sums.failures == {"shape": 3, "datatype": 1}
    assert sum(sums.request[0]) == 10
    assert agg.own_requests() == 5 and agg.requests_in([base]) == 9

    # A crash now: recovery finds the worker's later counts under the same version, once.
    _count_in_sibling(tmp_path / "journal", base, 2)
    got = recovered_report(journal, cut.mark)
    assert got is not None
    assert [(v.model, v.version, v.requests) for v in got.versions] == [("mlp", 1, 5)]


def test_reattached_journal_sums_a_workers_slot_it_finds(tmp_path: Path) -> None:
    """A journal kept in use after a restart (its recovered report could not be written)
    holds a worker's slot of the last run: adopted as that version's sibling, not lost."""
    path = tmp_path / "journal"
    first = TelemetryAggregator(store=CounterStore.create(path))
    first.version("mlp", 1).ok(0.001, 0.0)
    base = first.sibling("mlp", 1)
    assert base is not None
    _count_in_sibling(path, base, 2)
    again = CounterStore.open(path)
    assert again is not None
    agg = TelemetryAggregator()
    agg.attach(again)
    (entry,) = agg.cut().report.versions
    assert entry.requests == 1 + 2 + 3


def test_a_worker_never_sets_aside_or_grows_a_store(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    path.write_bytes(b"not a journal" * 10)
    with pytest.raises(OSError, match="not a telemetry store"):
        CounterStore.map(path)
    assert path.read_bytes() == b"not a journal" * 10


def test_a_restarted_worker_keeps_its_slots_reasons_in_their_cells(tmp_path: Path) -> None:
    """A worker started again counts in the slots its predecessor used: a reason keeps the cell
    it was named in, so old counts are never reported under another reason's name."""
    agg = TelemetryAggregator(store=CounterStore.create(tmp_path / "journal"))
    base = agg.sibling("mlp", 1)
    assert base is not None
    _count_in_sibling(tmp_path / "journal", base, 0, "shape,shape")
    _count_in_sibling(tmp_path / "journal", base, 0, "datatype,shape")
    ((_, sums),) = agg.totals(lambda m, v: True)
    assert sums.failures == {"shape": 3, "datatype": 1}
