"""Telemetry on its way to the hub: an on-disk outbox, and the loops that fill and drain it.

Every ``telemetry_interval_s`` the aggregator's counters become a :class:`TelemetryReport`; the
outbox gives it the agent's next sequence number and commits it to SQLite *before* anything is
sent. A report leaves the outbox only when the hub's :class:`TelemetryAck` lists its seq, which the
hub sends only after storing it (idempotently: a replay is acked, not counted again). So:

- ``kill -9`` at any instant loses nothing already committed and never reuses a seq: the report
  and the next seq are written in one transaction (WAL, ``synchronous=FULL``), so after a crash
  either both are there or neither is. Nor does it lose what was counted since the last report:
  the counters live in the journal (:mod:`agent.telemetry`), and the same transaction records
  how much of the journal the report holds, so :func:`open_journal` recovers exactly the rest.
- a lost ack, a hub or broker restart or a partition only means the same reports are sent again.
- a fresh outbox starts its seqs at the current time in milliseconds, not at 1: an agent whose
  outbox file was lost (disk replaced, file deleted) must not reuse seqs the hub already stored,
  which it would acknowledge and silently ignore as replays.

Cap: at most ``telemetry_outbox_max_reports`` reports wait (10,000 = ~14 h at 5 s). When full,
the OLDEST are dropped and their number rides in ``dropped_reports`` of the report being added
(plus whatever count the dropped reports themselves carried, so the hub's sum is exact).
The newest reports are what operators and the rollout engine act on (bake windows end "now"),
while the oldest describe a past the hub can no longer do anything about; dropping the newest
instead would freeze the agent's view at the start of an outage. The count makes the gap
visible at the hub rather than silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

from modelfleet.agent.fleet.backoff import Backoff
from modelfleet.agent.telemetry import (
    JOURNAL_SLOTS,
    CounterStore,
    JournalMark,
    TelemetryAggregator,
    recovered_report,
)
from modelfleet.kernel.errors import ModelfleetError
from modelfleet.kernel.jobs import JobRun
from modelfleet.protos import fleet_pb2 as pb

log = logging.getLogger(__name__)

OUTBOX_FILE = "telemetry-outbox.db"
# Reports per send (~0.6 KB per version each): far below gRPC's and the broker's limits.
BATCH_MAX = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    seq INTEGER PRIMARY KEY,
    body BLOB NOT NULL,
    -- the report's dropped_reports: dropping it carries them over, so none goes unreported
    dropped INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
-- the telemetry journal's counter cells as the committed reports hold them (agent/telemetry.py)
CREATE TABLE IF NOT EXISTS journal_mark (
    one INTEGER PRIMARY KEY CHECK (one = 0),
    ident INTEGER NOT NULL,
    counters BLOB NOT NULL,
    end_unix REAL NOT NULL
);
"""


class Outbox:
    """SQLite-backed FIFO of serialized reports keyed by seq. Thread-safe (one lock)."""

    def __init__(self, path: Path, max_reports: int, clock: Callable[[], float] = time.time):
        if max_reports < 1:
            raise ValueError("max_reports must be >= 1")
        self.path = Path(path)
        self.max_reports = max_reports
        self._lock = threading.Lock()
        # Autocommit mode: transactions are explicit BEGIN IMMEDIATE ... COMMIT below.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk (fsync of the WAL) before append() returns; power loss too.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        first = int(clock() * 1000)
        self._db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', ?), ('dropped', 0)",
            (first,),
        )
        self.path.chmod(0o600)
        # Dropped since this process started (for logs and tests; the hub gets the real count).
        self.dropped_total = 0

    def append(self, report: pb.TelemetryReport, mark: JournalMark | None = None) -> int:
        """Give ``report`` the next seq (and the pending drop count), commit it; return the seq.

        ``mark`` (the journal cells the report accounts for) is committed in the same
        transaction: after any crash, the outbox holds the report and its mark, or neither.
        """
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
                seq, dropped = meta["next_seq"], meta["dropped"]
                (count,) = db.execute("SELECT count(*) FROM reports").fetchone()
                excess = count - self.max_reports + 1
                if excess > 0:
                    oldest = "SELECT seq FROM reports ORDER BY seq LIMIT ?"
                    (carried,) = db.execute(
                        f"SELECT coalesce(sum(dropped), 0) FROM reports WHERE seq IN ({oldest})",
                        (excess,),
                    ).fetchone()
                    db.execute(f"DELETE FROM reports WHERE seq IN ({oldest})", (excess,))
                    dropped += excess + carried
                report.seq = seq
                report.dropped_reports = dropped
                db.execute(
                    "INSERT INTO reports (seq, body, dropped) VALUES (?, ?, ?)",
                    (seq, report.SerializeToString(), dropped),
                )
                db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
                db.execute("UPDATE meta SET value = 0 WHERE key = 'dropped'")
                if mark is not None:
                    db.execute(
                        "INSERT OR REPLACE INTO journal_mark (one, ident, counters, end_unix) "
                        "VALUES (0, ?, ?, ?)",
                        (mark.ident, mark.counters, mark.end_unix),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        if excess > 0:
            self.dropped_total += excess
            log.warning(
                "telemetry outbox full (%d reports): dropped the %d oldest",
                self.max_reports,
                excess,
            )
        return seq

    def pending(self, limit: int = BATCH_MAX) -> list[pb.TelemetryReport]:
        """The oldest reports not yet acknowledged, in seq order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM reports ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [pb.TelemetryReport.FromString(body) for (body,) in rows]

    def ack(self, seqs: Iterable[int]) -> int:
        """Forget acknowledged reports; returns how many were still here."""
        seqs = [int(s) for s in seqs]
        if not seqs:
            return 0
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM reports WHERE seq = ?", [(s,) for s in seqs])
            self._db.execute("COMMIT")
            return self._db.total_changes - before

    def journal_mark(self) -> JournalMark | None:
        with self._lock:
            row = self._db.execute("SELECT ident, counters, end_unix FROM journal_mark").fetchone()
        return JournalMark(int(row[0]), bytes(row[1]), float(row[2])) if row else None

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM reports").fetchone()[0])

    def next_seq(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_journal(path: Path, outbox: Outbox, slots: int = JOURNAL_SLOTS) -> CounterStore:
    """The journal to count into from now on, after what a crash left in it is in the outbox.

    What the journal at ``path`` holds beyond the outbox's mark (counts of a process killed
    before its next report) becomes one report, committed with the new mark; then a fresh
    journal replaces it, so slots never pile up across restarts. If that report cannot be
    written (disk full), the old journal stays in use and its counts go with the next report.
    """
    mark = outbox.journal_mark()
    old = CounterStore.open(path)
    if old is not None:
        report = recovered_report(old, mark)
        if report is not None:
            try:
                outbox.append(
                    report, JournalMark(old.ident, old.counters().tobytes(), report.end_unix)
                )
            except Exception as exc:
                log.error(
                    "cannot write the telemetry recovered from %s: %s; it goes with "
                    "the next report",
                    path,
                    exc,
                )
                return old
            log.warning(
                "telemetry: %d request(s) counted before the agent stopped without reporting "
                "them (kill -9, crash) recovered from %s",
                sum(v.requests for v in report.versions),
                path,
            )
        old.close()
    return CounterStore.create(path, slots)


# Sends a batch and returns the seqs the hub acknowledged; raises OSError (ConnectionError) or a
# ModelfleetError when the hub cannot be reached or refuses.
Sender = Callable[[pb.TelemetryBatch], Awaitable[Sequence[int]]]


class TelemetryShipper:
    """Cuts a report every interval into the outbox, and drains the outbox to the hub."""

    def __init__(
        self,
        aggregator: TelemetryAggregator,
        outbox: Outbox,
        send: Sender,
        *,
        interval_s: float,
        serving: Callable[[], Iterable[tuple[str, int]]] = tuple,
        backoff_max_s: float = 30.0,
        batch_max: int = BATCH_MAX,
    ) -> None:
        self.aggregator = aggregator
        self.outbox = outbox
        self.send = send
        self.interval_s = interval_s
        self.serving = serving
        self.batch_max = batch_max
        self.backoff = Backoff(base=1.0, cap=backoff_max_s)
        self.new_report = asyncio.Event()
        # One cut at a time: two cuts before either commits would both hold the same counts.
        self._cutting = asyncio.Lock()
        self.sent = 0
        self.last_error = ""
        # Outbox deletions for acks that came late (strong references: the loop keeps weak ones).
        self._late: set[asyncio.Task[int]] = set()

    async def cut(
        self, *, only_if_active: bool = False, job_runs: Sequence[JobRun] = ()
    ) -> int | None:
        """The interval so far becomes a report in the outbox; returns its seq.

        ``job_runs`` ride along: once this returns they are on disk and will reach the hub.
        """
        async with self._cutting:
            if only_if_active and not job_runs and not self.aggregator.pending():
                return None
            cut = self.aggregator.cut(self.serving())
            cut.report.job_runs.extend(pb.JobRun(**asdict(run)) for run in job_runs)
            seq = await asyncio.to_thread(self._commit, cut.report, cut.mark)
            cut.commit()
        self.new_report.set()
        return seq

    def _commit(self, report: pb.TelemetryReport, mark: JournalMark | None) -> int:
        seq = self.outbox.append(report, mark)
        # Power loss only (a killed process loses nothing): the journal on disk is then at
        # most one interval behind.
        self.aggregator.store.flush()
        return seq

    async def collect_loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.interval_s
        while not stop.is_set():
            # Wakes at least every second to stamp the journal: a report recovered after a
            # crash ends at the last stamp.
            self.aggregator.stamp()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(1.0, max(0.0, due - loop.time())))
            if stop.is_set():
                return  # the shutdown path cuts the partial interval (after draining)
            if loop.time() < due:
                continue
            # A fixed schedule, not sleep(interval) after the work: intervals do not drift.
            due += self.interval_s
            if due < loop.time():  # the loop was stalled for more than an interval
                due = loop.time() + self.interval_s
            try:
                await self.cut()
            except Exception as exc:
                # Nothing is lost: an uncommitted cut leaves its counts to the next one (which
                # then covers both intervals). Disk full is the usual cause.
                log.error("cannot write telemetry to %s: %s", self.outbox.path, exc)

    async def send_once(self) -> int:
        """Send one batch from the outbox; returns how many reports the hub acknowledged."""
        batch = await asyncio.to_thread(self.outbox.pending, self.batch_max)
        if not batch:
            return 0
        acked = set(await self.send(pb.TelemetryBatch(reports=batch)))
        mine = acked & {r.seq for r in batch}
        if not mine:
            # Never resend the same batch in a tight loop: this is treated like an outage.
            raise ConnectionError(f"the hub acknowledged none of {len(batch)} report(s)")
        gone = await asyncio.to_thread(self.outbox.ack, mine)
        self.sent += gone
        return len(mine)

    def ack_late(self, seqs: Sequence[int]) -> None:
        """Acks that arrived after :meth:`send_once` stopped waiting (over MQTT): those reports
        are stored at the hub, whichever copy got there, so they leave the outbox too."""
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self.outbox.ack, list(seqs))
        )
        self._late.add(task)
        task.add_done_callback(self._late.discard)

    async def send_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.new_report.clear()
            try:
                acked = await self.send_once()
            except Exception as exc:
                # Transport trouble (OSError), a refusal (ModelfleetError), or anything else:
                # the reports stay in the outbox and the loop must keep going.
                if not isinstance(exc, OSError | ModelfleetError):
                    log.exception("sending telemetry failed unexpectedly")
                delay = self.backoff.next()
                msg = str(exc)
                if msg != self.last_error:
                    log.warning("telemetry not delivered (%s); retrying in %.1fs", msg, delay)
                self.last_error = msg
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                continue
            if self.last_error:
                log.info("telemetry delivered again")
                self.last_error = ""
            self.backoff.reset()
            if acked:
                continue  # more may be waiting (a backlog after an outage goes out at once)
            waiters = {
                asyncio.ensure_future(self.new_report.wait()),
                asyncio.ensure_future(stop.wait()),
            }
            # The timeout re-checks the outbox now and then even if no event arrives.
            await asyncio.wait(
                waiters, timeout=max(self.interval_s, 1.0) * 4, return_when=asyncio.FIRST_COMPLETED
            )
            for w in waiters:
                w.cancel()


__all__ = [
    "BATCH_MAX",
    "OUTBOX_FILE",
    "Outbox",
    "Sender",
    "TelemetryShipper",
    "open_journal",
]
