"""The I/O shell around :mod:`hub.alerts`: rules, states, history, webhooks and the
notification queue in SQLite (``DATA/alerts.sqlite``, mode 0600: it holds webhook secrets),
the evaluation timer and the delivery loop.

Durability: a state change, its history event and its queued notifications are one
transaction. A notification is delivered at least once; every attempt of one event carries
the same idempotency key (derived from the event, not from the attempt), so after a crash,
even between a receiver's 2xx and our record of it, the receiver can drop the repeat. An
attempt is counted before it is made, so a hub that crashes while sending still stops after
``webhook_max_attempts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelfleet.hub.alerts import (
    BUILTIN_NAMES,
    AlertState,
    Measurement,
    MetricSource,
    Rule,
    Transition,
    WindowReader,
    advance,
    default_sources,
    effective_rules,
    idempotency_key,
    payload,
    rules_in_force,
    selector_text,
)
from modelfleet.hub.webhooks import Outcome, backoff, check_webhook, post

if TYPE_CHECKING:
    from modelfleet.hub.ports import AlertStorePort
from modelfleet.kernel.errors import InvalidRequestError, ModelNotFoundError, did_you_mean

log = logging.getLogger(__name__)

ALERTS_FILE = "alerts.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alert_rules (
    name TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    updated_at REAL NOT NULL,
    actor TEXT NOT NULL DEFAULT '',
    -- Removed rules stay until their firing alerts are resolved (and notified) with them.
    removed_at REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS webhooks (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    secret BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS alert_states (
    rule TEXT NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    selector TEXT NOT NULL,
    state TEXT NOT NULL,
    since REAL NOT NULL,
    clear_since REAL NOT NULL,
    value REAL,
    updated_at REAL NOT NULL,
    evidence TEXT NOT NULL,
    PRIMARY KEY (rule, model, version, selector)
);
CREATE TABLE IF NOT EXISTS alert_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    rule TEXT NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    selector TEXT NOT NULL,
    state TEXT NOT NULL,
    previous TEXT NOT NULL,
    value REAL,
    threshold REAL NOT NULL,
    idempotency_key TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alert_events_at ON alert_events (at);
CREATE TABLE IF NOT EXISTS webhook_outbox (
    idempotency_key TEXT NOT NULL,
    webhook TEXT NOT NULL,
    body BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT NOT NULL DEFAULT '',
    done_at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (idempotency_key, webhook)
);
CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox (status, next_at);
"""


@dataclass(frozen=True)
class Event:
    at: float
    rule: str
    model: str
    version: int
    selector: str
    state: str
    previous: str
    value: float | None
    threshold: float
    idempotency_key: str


@dataclass(frozen=True)
class WebhookRow:
    name: str
    url: str
    created_at: float
    pending: int
    delivered: int
    failed: int
    last_error: str


@dataclass(frozen=True)
class QueuedNotification:
    idempotency_key: str
    webhook: str
    url: str
    secret: bytes
    body: bytes
    attempts: int


class AlertStore:
    """SQLite storage for alerting. Thread-safe: one connection behind one lock (the
    evaluation runs on a worker thread, the admin edges on the event loop)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        if not self.path.exists():
            # Created private before SQLite opens it; its -wal/-shm files copy this mode.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(self.path, 0o600)
        self._lock = threading.RLock()
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.db.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # -- rules -----------------------------------------------------------------------------------

    def stored_rules(self) -> list[Rule]:
        return [
            Rule.from_dict(json.loads(r["data"]))
            for r in self._query("SELECT data FROM alert_rules WHERE removed_at = 0 ORDER BY name")
        ]

    def removed_rules(self) -> list[Rule]:
        return [
            Rule.from_dict(json.loads(r["data"]))
            for r in self._query("SELECT data FROM alert_rules WHERE removed_at > 0")
        ]

    def purge_removed_rules(self) -> None:
        """Forget removed rules none of whose alerts is pending or firing any more."""
        with self._tx() as db:
            done = (
                "SELECT name FROM alert_rules WHERE removed_at > 0 AND name NOT IN "
                "(SELECT rule FROM alert_states WHERE state IN ('pending', 'firing'))"
            )
            db.execute(f"DELETE FROM alert_states WHERE rule IN ({done})")
            db.execute(f"DELETE FROM alert_rules WHERE name IN ({done})")

    def rules(self) -> list[Rule]:
        return rules_in_force(self.stored_rules())

    def set_rule(self, rule: Rule, actor: str = "") -> Rule:
        rule = Rule.from_dict({**rule.to_dict(), "builtin": False}).validate()
        with self._tx() as db:
            # Its alerts carry on under the new definition: a firing one resolves by the new
            # threshold (or, if it no longer matches, at the next evaluation), and is notified.
            db.execute(
                "INSERT INTO alert_rules (name, data, updated_at, actor, removed_at) "
                "VALUES (?, ?, ?, ?, 0) "
                "ON CONFLICT (name) DO UPDATE SET data = excluded.data, "
                "updated_at = excluded.updated_at, actor = excluded.actor, removed_at = 0",
                (rule.name, json.dumps(rule.to_dict()), self.clock(), actor),
            )
        return rule

    def remove_rule(self, name: str) -> bool:
        """Delete a stored rule; True if it was a built-in's override (the default is back)."""
        with self._tx() as db:
            n = db.execute(
                "UPDATE alert_rules SET removed_at = ? WHERE name = ? AND removed_at = 0",
                (self.clock(), name),
            ).rowcount
            if not n:
                if name in BUILTIN_NAMES:
                    raise InvalidRequestError(
                        f"rule {name!r} is built in and not overridden: nothing to remove "
                        f"(to silence it, `alerts rule set {name} --disabled`)"
                    )
                known = [
                    r["name"]
                    for r in db.execute("SELECT name FROM alert_rules WHERE removed_at = 0")
                ]
                raise ModelNotFoundError(f"no alert rule {name!r}{did_you_mean(name, known)}")
            # Pending alerts of the rule end now; firing ones resolve at the next evaluation.
            db.execute(
                "DELETE FROM alert_states WHERE rule = ? AND state != 'firing'",
                (name,),
            )
        return name in BUILTIN_NAMES

    # -- webhooks --------------------------------------------------------------------------------

    def add_webhook(self, name: str, url: str, secret: bytes, replace: bool = False) -> None:
        check_webhook(name, url, secret)
        with self._tx() as db:
            exists = db.execute("SELECT 1 FROM webhooks WHERE name = ?", (name,)).fetchone()
            if exists and not replace:
                raise InvalidRequestError(
                    f"webhook {name!r} exists; remove it first or pass --replace"
                )
            db.execute(
                "INSERT OR REPLACE INTO webhooks (name, url, secret, created_at) "
                "VALUES (?, ?, ?, ?)",
                (name, url, secret, self.clock()),
            )

    def remove_webhook(self, name: str) -> int:
        """Delete a webhook; its undelivered notifications are dropped (returned: how many)."""
        with self._tx() as db:
            if not db.execute("DELETE FROM webhooks WHERE name = ?", (name,)).rowcount:
                known = [r["name"] for r in db.execute("SELECT name FROM webhooks")]
                raise ModelNotFoundError(f"no webhook {name!r}{did_you_mean(name, known)}")
            return db.execute(
                "UPDATE webhook_outbox SET status = 'failed', last_error = 'webhook removed', "
                "done_at = ? WHERE webhook = ? AND status = 'pending'",
                (self.clock(), name),
            ).rowcount

    def webhooks(self) -> list[WebhookRow]:
        rows = self._query(
            "SELECT w.name, w.url, w.created_at, "
            "count(*) FILTER (WHERE o.status = 'pending') AS pending, "
            "count(*) FILTER (WHERE o.status = 'delivered') AS delivered, "
            "count(*) FILTER (WHERE o.status = 'failed') AS failed, "
            "(SELECT last_error FROM webhook_outbox x WHERE x.webhook = w.name "
            " AND x.last_error != '' ORDER BY x.created_at DESC LIMIT 1) AS last_error "
            "FROM webhooks w LEFT JOIN webhook_outbox o ON o.webhook = w.name "
            "GROUP BY w.name ORDER BY w.name"
        )
        return [
            WebhookRow(
                r["name"],
                r["url"],
                r["created_at"],
                r["pending"],
                r["delivered"],
                r["failed"],
                r["last_error"] or "",
            )
            for r in rows
        ]

    # -- states, history, queue ------------------------------------------------------------------

    def states(self) -> dict[tuple[str, str, int, str], AlertState]:
        out = {}
        for r in self._query("SELECT * FROM alert_states"):
            s = AlertState(
                r["rule"],
                r["model"],
                r["version"],
                r["selector"],
                r["state"],
                r["since"],
                r["clear_since"],
                r["value"],
                r["updated_at"],
                json.loads(r["evidence"]),
            )
            out[s.key] = s
        return out

    def history(self, since: float = 0.0, model: str = "") -> list[Event]:
        sql = "SELECT * FROM alert_events WHERE at >= ?"
        params: list[Any] = [since]
        if model:
            sql += " AND model = ?"
            params.append(model)
        return [
            Event(
                r["at"],
                r["rule"],
                r["model"],
                r["version"],
                r["selector"],
                r["state"],
                r["previous"],
                r["value"],
                r["threshold"],
                r["idempotency_key"],
            )
            for r in self._query(sql + " ORDER BY id", params)
        ]

    def apply(
        self,
        states: Sequence[AlertState],
        transitions: Sequence[tuple[Rule, Transition, str, bytes | None]],
        dropped: Sequence[tuple[str, str, int, str]] = (),
    ) -> int:
        """One transaction: new states, history events and queued notifications (``body``
        None: nothing to send). Returns the notifications queued."""
        queued = 0
        now = self.clock()
        with self._tx() as db:
            for s in states:
                db.execute(
                    "INSERT OR REPLACE INTO alert_states VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        s.rule,
                        s.model,
                        s.version,
                        s.selector,
                        s.state,
                        s.since,
                        s.clear_since,
                        s.value,
                        s.updated_at,
                        json.dumps(dict(s.evidence)),
                    ),
                )
            for gone in dropped:
                db.execute(
                    "DELETE FROM alert_states WHERE rule = ? AND model = ? AND version = ? "
                    "AND selector = ?",
                    gone,
                )
            names = [r["name"] for r in db.execute("SELECT name FROM webhooks")]
            for rule, t, key, body in transitions:
                s = t.state
                db.execute(
                    "INSERT INTO alert_events (at, rule, model, version, selector, state, "
                    "previous, value, threshold, idempotency_key) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        s.updated_at,
                        s.rule,
                        s.model,
                        s.version,
                        s.selector,
                        s.state,
                        t.previous,
                        s.value,
                        rule.threshold,
                        key if body is not None else "",
                    ),
                )
                if body is None:
                    continue
                targets = [n for n in (rule.webhooks or names) if n in names]
                for missing in sorted(set(rule.webhooks) - set(names)):
                    log.warning(
                        "alert rule %s names webhook %r, which does not exist: not sent there "
                        "(add it with `modelfleet-hub webhooks add`)",
                        rule.name,
                        missing,
                    )
                for w in targets:
                    # OR IGNORE: the same event queued again (a redone evaluation) is one row.
                    queued += db.execute(
                        "INSERT OR IGNORE INTO webhook_outbox (idempotency_key, webhook, body, "
                        "created_at, next_at) VALUES (?, ?, ?, ?, ?)",
                        (key, w, body, now, now),
                    ).rowcount
        return queued

    def due(self, now: float, limit: int = 32) -> list[QueuedNotification]:
        rows = self._query(
            "SELECT o.idempotency_key, o.webhook, o.body, o.attempts, w.url, w.secret "
            "FROM webhook_outbox o JOIN webhooks w ON w.name = o.webhook "
            "WHERE o.status = 'pending' AND o.next_at <= ? ORDER BY o.created_at LIMIT ?",
            (now, limit),
        )
        return [
            QueuedNotification(
                r["idempotency_key"], r["webhook"], r["url"], r["secret"], r["body"], r["attempts"]
            )
            for r in rows
        ]

    def next_due(self) -> float | None:
        rows = self._query("SELECT min(next_at) FROM webhook_outbox WHERE status = 'pending'")
        return rows[0][0] if rows and rows[0][0] is not None else None

    def begin_attempt(self, n: QueuedNotification, retry_at: float) -> int:
        """Count the attempt and schedule the retry before sending; returns its number."""
        with self._tx() as db:
            db.execute(
                "UPDATE webhook_outbox SET attempts = attempts + 1, next_at = ? "
                "WHERE idempotency_key = ? AND webhook = ?",
                (retry_at, n.idempotency_key, n.webhook),
            )
            row = db.execute(
                "SELECT attempts FROM webhook_outbox WHERE idempotency_key = ? AND webhook = ?",
                (n.idempotency_key, n.webhook),
            ).fetchone()
        return int(row[0]) if row else 0

    def finish_attempt(
        self, n: QueuedNotification, outcome: Outcome, attempt: int, max_attempts: int
    ) -> str:
        if outcome.ok:
            status = "delivered"
        elif attempt >= max_attempts:
            status = "failed"
        else:
            status = "pending"
        with self._tx() as db:
            db.execute(
                "UPDATE webhook_outbox SET status = ?, last_error = ?, done_at = ? "
                "WHERE idempotency_key = ? AND webhook = ? AND status = 'pending'",
                (
                    status,
                    outcome.error,
                    self.clock() if status != "pending" else 0.0,
                    n.idempotency_key,
                    n.webhook,
                ),
            )
        return status

    def outbox(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM webhook_outbox ORDER BY created_at")]


@dataclass(frozen=True)
class RuleStatus:
    rule: Rule
    # Empty, or why it cannot be evaluated (its metric has no data source yet).
    no_data: str


@dataclass(frozen=True)
class AlertSettings:
    interval_s: float = 5.0
    max_attempts: int = 12
    backoff_s: float = 1.0
    backoff_max_s: float = 300.0
    timeout_s: float = 10.0


class AlertManager:
    """Evaluates every rule in force for every model, on a timer; delivers notifications."""

    def __init__(
        self,
        store: AlertStorePort,
        telemetry: WindowReader,
        settings: AlertSettings | Callable[[], AlertSettings] = AlertSettings(),
        clock: Callable[[], float] = time.time,
        sources: Mapping[str, MetricSource] | None = None,
        hub: str = "",
        capture_locator: Callable[[str, int], str | None] | None = None,
    ) -> None:
        self.store: AlertStorePort = store
        self.clock = clock
        self._settings = settings
        self.sources: dict[str, MetricSource] = dict(default_sources(telemetry))
        self.sources.update(sources or {})
        self.hub = hub
        # Inference capture registers where a version's captured data lives (retrain payloads).
        self.capture_locator = capture_locator or (lambda model, version: None)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="alerts")
        self.sender = ThreadPoolExecutor(4, thread_name_prefix="webhooks")
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def settings(self) -> AlertSettings:
        s = self._settings
        return s() if callable(s) else s

    def register_source(self, metric: str, source: MetricSource) -> None:
        """Drift and accuracy plug in here when their telemetry exists."""
        self.sources[metric] = source

    def rule_statuses(self) -> list[RuleStatus]:
        return [
            RuleStatus(r, self.sources[r.metric].no_data_reason if r.metric in self.sources else "")
            for r in self.store.rules()
        ]

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(
        self,
        models: Sequence[str],
        agents: Sequence[tuple[str, Mapping[str, str]]],
        now: float | None = None,
    ) -> list[Transition]:
        """One round over every model (names) with the fleet's agents (id, labels)."""
        now = self.clock() if now is None else now
        rules = self.store.rules()
        prior = self.store.states()
        new_states: list[AlertState] = []
        transitions: list[tuple[Rule, Transition, str, bytes | None]] = []
        visited: set[tuple[str, str, int, str]] = set()
        for model in models:
            for rule in effective_rules(rules, model):
                source = self.sources.get(rule.metric)
                if source is None or source.no_data_reason:
                    continue
                sel = selector_text(rule.selector)
                scope = None
                if rule.selector:
                    scope = [
                        a
                        for a, labels in agents
                        if all(labels.get(k) == v for k, v in rule.selector.items())
                    ]
                try:
                    measured = source.measure(model, scope, now - rule.window_s, now)
                except Exception:
                    log.exception("measuring %s for %s failed; will retry", rule.metric, model)
                    continue
                by_version: dict[int, Measurement] = {m.version: m for m in measured}
                live = {
                    k[2]
                    for k, s in prior.items()
                    if k[0] == rule.name
                    and k[1] == model
                    and k[3] == sel
                    and s.state in ("pending", "firing")
                }
                for version in sorted(set(by_version) | live):
                    key = (rule.name, model, version, sel)
                    visited.add(key)
                    before = prior.get(key) or AlertState(rule.name, model, version, sel)
                    after, t = advance(rule, before, by_version.get(version), now)
                    if t is None and before.state in ("inactive", "resolved") and key in prior:
                        continue  # quiet and unchanged: no write every round
                    if t is None and after.state == "inactive":
                        continue
                    new_states.append(after)
                    if t is not None:
                        transitions.append(self._event(rule, t))
        # An alert whose rule no longer applies to it (rule removed or disabled, model gone): a
        # pending one ends quietly, a firing one resolves now (notified: someone was paged).
        dropped = [k for k, s in prior.items() if k not in visited and s.state == "pending"]
        definitions = {r.name: r for r in self.store.removed_rules()}
        definitions.update({r.name: r for r in rules})
        for k, s in prior.items():
            if k in visited or s.state != "firing":
                continue
            gone = definitions.get(k[0])
            if gone is None:
                dropped.append(k)
                continue
            now_clear = Rule.from_dict({**gone.to_dict(), "clear_for_s": 0.0})
            after, t = advance(now_clear, s, None, now)
            new_states.append(after)
            if t is not None:
                transitions.append(self._event(gone, t))
        if new_states or transitions or dropped:
            queued = self.store.apply(new_states, transitions, dropped)
            if queued:
                self._wake()
        if len(definitions) > len({r.name for r in rules}):
            self.store.purge_removed_rules()
        for rule, t, _key, _body in transitions:
            s = t.state
            if t.notify:
                log.warning(
                    "alert %s %s: %s v%d%s %s=%s (%s %g)",
                    rule.name,
                    s.state.upper(),
                    s.model,
                    s.version,
                    f" [{s.selector}]" if s.selector else "",
                    rule.metric,
                    "-" if s.value is None else f"{s.value:.4g}",
                    rule.comparison,
                    rule.threshold,
                )
        return [t for _, t, _, _ in transitions]

    def _event(self, rule: Rule, t: Transition) -> tuple[Rule, Transition, str, bytes | None]:
        key = idempotency_key(t)
        if not t.notify:
            return rule, t, key, None
        capture = self.capture_locator(t.state.model, t.state.version) if rule.retrain else None
        body = payload(rule, t, key, hub=self.hub, capture=capture)
        return rule, t, key, json.dumps(body, sort_keys=True).encode()

    async def run(
        self,
        stop: asyncio.Event,
        fleet: Callable[[bool], tuple[list[str], list[tuple[str, dict[str, str]]]]],
    ) -> None:
        """Evaluate every ``interval_s`` until ``stop``. ``fleet(with_agents)`` reads model
        names, and agents only when a rule has a selector, on the event loop (the registry
        belongs to it); measuring and writing happen on the alert thread so DuckDB queries
        never block the loop."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                with_agents = any(r.selector for r in self.store.rules())
                models, agents = fleet(with_agents)
                await loop.run_in_executor(self.executor, self.evaluate, models, agents)
            except Exception:
                log.exception("evaluating alert rules failed; will retry")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.interval_s)

    # -- delivery --------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._loop is not None and self._wakeup is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    def deliver_due(
        self, now: float | None = None, stopping: Callable[[], bool] = lambda: False
    ) -> list[tuple[str, str, str]]:
        """Send every notification due now (blocking); returns (key, webhook, status).
        ``stopping`` is checked between sends, so a shutdown waits for one attempt at most."""
        now = self.clock() if now is None else now
        cfg = self.settings
        out = []
        for n in self.store.due(now):
            if stopping():
                break
            attempt = n.attempts + 1
            retry_at = now + backoff(attempt, cfg.backoff_s, cfg.backoff_max_s)
            attempt = self.store.begin_attempt(n, retry_at)
            outcome = post(n.url, n.secret, n.body, n.idempotency_key, int(now), cfg.timeout_s)
            status = self.store.finish_attempt(n, outcome, attempt, cfg.max_attempts)
            if status == "failed":
                log.error(
                    "webhook %s: giving up on notification %s after %d attempts (%s)",
                    n.webhook,
                    n.idempotency_key,
                    attempt,
                    outcome.error,
                )
            elif status == "pending":
                log.info(
                    "webhook %s: attempt %d of %s failed (%s); retrying in %.1fs",
                    n.webhook,
                    attempt,
                    n.idempotency_key,
                    outcome.error,
                    retry_at - now,
                )
            out.append((n.idempotency_key, n.webhook, status))
        return out

    async def deliver(self, stop: asyncio.Event) -> None:
        """Send queued notifications as they fall due, until ``stop``; what is left stays
        queued on disk for the next start."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._wakeup = asyncio.Event()
        while not stop.is_set():
            self._wakeup.clear()
            try:
                await loop.run_in_executor(self.sender, self.deliver_due, None, stop.is_set)
                nxt = self.store.next_due()
            except Exception:
                log.exception("delivering webhook notifications failed; will retry")
                nxt = None
            wait = 5.0 if nxt is None else min(5.0, max(0.0, nxt - self.clock()))
            waiters = {
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(self._wakeup.wait()),
            }
            await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.sender.shutdown(wait=True)
        self.store.close()


__all__ = [
    "ALERTS_FILE",
    "AlertManager",
    "AlertSettings",
    "AlertStore",
    "Event",
    "QueuedNotification",
    "RuleStatus",
    "WebhookRow",
]
