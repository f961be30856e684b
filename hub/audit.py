"""The audit trail: who called the hub's admin services, what they asked and how it ended.

Every call that can change something is recorded before it runs and completed after it ends,
so a hub killed in the middle leaves an ``UNFINISHED`` entry rather than no trace of a change
that may have taken effect. Reads that succeed are recorded only with ``audit_reads`` (a
dashboard polling every few seconds would bury the changes); reads that export data (backup,
capture queries, the state file) are recorded always, and so is every refused or failed call,
whatever its method. The edge (hub/audit_edge.py) decides what a call is and words the request;
this module only stores plain strings.

SQLite in ``HUB_DATA/audit.sqlite`` (mode 0600), write-ahead log, a full sync per commit: an
entry that was written survives a crash of the hub or of the machine. Entries older than
``audit_retention_days`` are deleted at start and then every few thousand entries.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelfleet.kernel.errors import InvalidRequestError, ModelfleetError, Status

AUDIT_FILE = "audit.sqlite"
# The code of an entry whose call had not ended when the hub stopped.
UNFINISHED = "UNFINISHED"
DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
# Bounds on what one entry keeps: a request or error text longer than this is cut.
TEXT_CHARS = 2000
# How often (entries written) old entries are looked for, besides at start.
PRUNE_EVERY = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,
    duration_ms REAL NOT NULL DEFAULT 0,
    identity TEXT NOT NULL,
    peer TEXT NOT NULL,
    service TEXT NOT NULL,
    method TEXT NOT NULL,
    request TEXT NOT NULL,
    code TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS audit_started ON audit (started_at);
"""


class AuditFileError(ModelfleetError):
    status = Status.FAILED_PRECONDITION
    reason = "audit_file"


@dataclass(frozen=True)
class AuditEntry:
    id: int
    started_at: float
    duration_ms: float
    identity: str
    peer: str
    service: str
    method: str
    request: str
    code: str
    detail: str


def _cut(text: str) -> str:
    return text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 3] + "..."


class AuditStore:
    """Thread-safe (one connection behind a lock): the admin edges write on the event loop,
    and a backup reads from a worker thread."""

    def __init__(
        self, path: Path, retention_days: float = 365.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = Path(path)
        self.retention_days = retention_days
        self.clock = clock
        if not self.path.exists():
            # Private before SQLite opens it; its -wal and -shm files copy this mode.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(self.path, 0o600)
        self._lock = threading.Lock()
        self._written = 0
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            self.prune()
        except sqlite3.DatabaseError as exc:
            self.db.close()
            # Starting a new trail on our own would hide the history an auditor asks for.
            raise AuditFileError(
                f"{self.path} is damaged ({exc}); it holds the hub's audit trail. Stop the hub "
                "and restore it from a backup (`modelfleet-hub restore`), or move it aside to "
                "start a new trail (keep the damaged file for whoever audits)"
            ) from None

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def begin(self, identity: str, peer: str, service: str, method: str, request: str) -> int:
        """An entry for a call about to run, ``UNFINISHED`` until :meth:`end`; its id."""
        return self._insert(identity, peer, service, method, request, UNFINISHED, "", 0.0)

    def set_request(self, entry_id: int, request: str) -> None:
        """What an entry's call asked, once known (a stream's first message)."""
        with self._lock:
            self.db.execute("UPDATE audit SET request = ? WHERE id = ?", (_cut(request), entry_id))

    def end(self, entry_id: int, code: str, detail: str, duration_ms: float, request: str) -> None:
        """Complete an entry :meth:`begin` made (``request``: as known now; a stream's first
        message comes after the call began)."""
        with self._lock:
            self.db.execute(
                "UPDATE audit SET code = ?, detail = ?, duration_ms = ?, request = ? WHERE id = ?",
                (code, _cut(detail), duration_ms, _cut(request), entry_id),
            )

    def record(
        self,
        identity: str,
        peer: str,
        service: str,
        method: str,
        request: str,
        code: str,
        detail: str,
        duration_ms: float,
        started_at: float,
    ) -> int:
        """A whole entry for a call that has ended (a read, or a call refused before it ran)."""
        return self._insert(
            identity, peer, service, method, request, code, detail, duration_ms, started_at
        )

    def _insert(
        self,
        identity: str,
        peer: str,
        service: str,
        method: str,
        request: str,
        code: str,
        detail: str,
        duration_ms: float,
        started_at: float | None = None,
    ) -> int:
        with self._lock:
            cur = self.db.execute(
                "INSERT INTO audit (started_at, duration_ms, identity, peer, service, method, "
                "request, code, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.clock() if started_at is None else started_at,
                    duration_ms,
                    identity,
                    peer,
                    service,
                    method,
                    _cut(request),
                    code,
                    _cut(detail),
                ),
            )
            self._written += 1
            due = self._written % PRUNE_EVERY == 0
        if due:
            self.prune()
        return int(cur.lastrowid or 0)

    def prune(self) -> int:
        """Delete entries past the retention; how many."""
        if self.retention_days <= 0:
            return 0
        cutoff = self.clock() - self.retention_days * 86400
        with self._lock:
            return self.db.execute("DELETE FROM audit WHERE started_at < ?", (cutoff,)).rowcount

    def query(
        self,
        since: float = 0.0,
        identity: str = "",
        method: str = "",
        failed_only: bool = False,
        limit: int = 0,
    ) -> list[AuditEntry]:
        """The newest ``limit`` entries that match, oldest first."""
        limit = limit or DEFAULT_LIMIT
        if not 0 < limit <= MAX_LIMIT:
            raise InvalidRequestError(
                f"audit: limit must be 1..{MAX_LIMIT}, got {limit}; narrow the query with "
                "--since, --identity or --method instead"
            )
        where: list[str] = ["started_at >= ?"]
        params: list[float | str] = [since]
        if identity:
            where.append("identity = ?")
            params.append(identity)
        if method:
            where.append("method = ?")
            params.append(method)
        if failed_only:
            where.append("code != 'OK'")
        sql = (
            "SELECT id, started_at, duration_ms, identity, peer, service, method, request, code, "
            f"detail FROM audit WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?"
        )
        with self._lock:
            rows = self.db.execute(sql, (*params, limit)).fetchall()
        return [AuditEntry(*row) for row in reversed(rows)]

    def backup_to(self, path: Path) -> None:
        """A consistent copy into a new file (modelfleet-hub backup)."""
        dest = sqlite3.connect(path)
        try:
            with self._lock:
                self.db.backup(dest)
        finally:
            dest.close()
        os.chmod(path, 0o600)
