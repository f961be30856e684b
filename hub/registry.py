"""Registry and fleet state in SQLite (WAL): models, versions, agents, tokens, deployments.

Every write is one transaction. The hub is the only writer; sqlite3 calls are short enough to
run on the event loop. A PostgreSQL implementation would replace this class behind the same
methods.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import sqlite3
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelfleet.kernel.bundle import MAX_VERSION, VERSION_RANGE
from modelfleet.kernel.errors import (
    BundleExistsError,
    InvalidRequestError,
    ModelfleetError,
    ModelNotFoundError,
    Status,
    did_you_mean,
)
from modelfleet.kernel.jobs import JobRun, JobSpec
from modelfleet.kernel.reports import AgentReport

log = logging.getLogger(__name__)

STAGES = ("staged", "production", "deprecated", "retired")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    stage TEXT NOT NULL DEFAULT 'staged',
    notes TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    target_path TEXT NOT NULL,
    signed INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    -- sha256 of model.onnx: the same model republished under a new version is recognised.
    model_sha256 TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    labels TEXT NOT NULL,
    enrolled_at REAL NOT NULL,
    last_seen REAL NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'active',
    cert_fingerprint TEXT NOT NULL,
    report TEXT NOT NULL DEFAULT '{}',
    presence TEXT NOT NULL DEFAULT '',
    presence_at REAL NOT NULL DEFAULT 0,
    -- not_valid_after of the certificate issued at enrollment (agents report later ones).
    cert_expires_at REAL NOT NULL DEFAULT 0,
    -- fingerprint of the certificate the last renewal issued, until the agent renews with it.
    cert_pending TEXT NOT NULL DEFAULT ''
);
-- every agent certificate the CA issued (enrollment, renewal): the CRL lists those of revoked
-- agents until they expire. Serials are up to 159 bits: hex text.
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    not_after REAL NOT NULL
);
-- named admin identities (admin:<name>) and their roles; the hub's own admin:admin is not
-- here (always the admin role). key_sha256: SHA-256 of the certificate's public key
-- (SubjectPublicKeyInfo, DER): a certificate for another key with the same name is refused.
CREATE TABLE IF NOT EXISTS admins (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'active',
    key_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    cert_expires_at REAL NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL DEFAULT 0,
    updated_by TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    labels TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL,
    used_by TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    selector TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS job_runs (
    agent_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    job TEXT NOT NULL,
    data TEXT NOT NULL,
    finished_at REAL NOT NULL,
    PRIMARY KEY (agent_id, run_id)
);
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deployments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    selector TEXT NOT NULL,
    created_at REAL NOT NULL,
    -- serve: the version to run; prepare: load and gate it beside the running one (blue/green,
    -- and, with split_bp/shadow_bp, a live comparison against the running one).
    kind TEXT NOT NULL DEFAULT 'serve',
    -- deploy (modelfleet-hub deploy) or rollout (a wave, a rollback, a completed rollout);
    -- '' in rows written before the hub recorded it.
    source TEXT NOT NULL DEFAULT '',
    rollout_id INTEGER NOT NULL DEFAULT 0,
    -- the admin identity that deployed (deploy only).
    actor TEXT NOT NULL DEFAULT '',
    -- undeploy: the row stays, as history, but decides nothing any more.
    removed_at REAL NOT NULL DEFAULT 0,
    removed_by TEXT NOT NULL DEFAULT ''
);
-- Experiments (hub/experiments.py): a candidate compared with the running version on live
-- traffic; the whole state is JSON in data, state is its summary for queries.
CREATE TABLE IF NOT EXISTS experiments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
-- Inference capture (hub/capture.py): per model and selector, the share of requests agents
-- capture and the inputs they drop or hash. The newest row matching an agent decides.
CREATE TABLE IF NOT EXISTS capture_settings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    selector TEXT NOT NULL,
    rate_bp INTEGER NOT NULL,
    exclude TEXT NOT NULL,
    hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    actor TEXT NOT NULL DEFAULT '',
    UNIQUE (model, selector)
);
-- Small facts the hub must remember across restarts (e.g. the newest signed targets seen).
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class PermissionDeniedError(ModelfleetError):
    status = Status.PERMISSION_DENIED
    reason = "permission_denied"


class FailedPreconditionError(ModelfleetError):
    status = Status.FAILED_PRECONDITION
    reason = "failed_precondition"


@dataclass(frozen=True)
class VersionRow:
    name: str
    version: int
    sha256: str
    size: int
    stage: str
    notes: str
    created_at: float
    target_path: str
    signed: bool
    same_content_as: int = 0


@dataclass(frozen=True)
class AgentRow:
    agent_id: str
    hostname: str
    labels: dict[str, str]
    enrolled_at: float
    last_seen: float
    status: str
    cert_fingerprint: str
    report: AgentReport
    presence: str = ""
    cert_expires_at: float = 0.0  # at enrollment; 0: enrolled before the hub recorded it
    cert_pending: str = ""  # fingerprint issued by the last renewal, not yet used to renew


@dataclass(frozen=True)
class AdminRow:
    name: str
    role: str
    status: str
    key_sha256: str
    created_at: float
    created_by: str
    cert_expires_at: float = 0.0
    updated_at: float = 0.0
    updated_by: str = ""


@dataclass(frozen=True)
class Desired:
    name: str
    version: int
    target_path: str
    sha256: str
    size: int
    prepare_version: int = 0
    prepare_size: int = 0
    # Live comparison of prepare_version against version (fleet.proto DesiredModel).
    split_bp: int = 0
    sticky: bool = False
    shadow_bp: int = 0
    comparison: str = ""
    # Inference capture (fleet.proto DesiredModel; set with `modelfleet-hub capture set`).
    capture_rate_bp: int = 0
    capture_exclude: tuple[str, ...] = ()
    capture_hash: tuple[str, ...] = ()


@dataclass(frozen=True)
class CaptureSetting:
    """What agents matching ``selector`` capture of ``model`` (the newest match decides)."""

    model: str
    selector: dict[str, str]
    rate_bp: int
    exclude: tuple[str, ...] = ()
    hash: tuple[str, ...] = ()
    created_at: float = 0.0
    actor: str = ""
    id: int = 0


# Selector key that names one agent: used by rollouts for per-agent assignments.
AGENT_KEY = "_agent"


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True)
class DeploymentRow:
    """One row of the deployments log: ``version`` of ``name`` for the agents ``selector``
    matches. The newest matching row decides, per model and agent (see :func:`decide`)."""

    id: int
    name: str
    version: int  # 0: "not desired" (a rollout's rollback for an agent that had none)
    selector: dict[str, str]
    created_at: float
    kind: str = "serve"  # serve, or prepare (blue/green: load beside the serving version)
    source: str = "deploy"  # deploy or rollout
    rollout_id: int = 0
    actor: str = ""
    removed_at: float = 0.0
    removed_by: str = ""
    # prepare rows: the live comparison against the serving version (see Desired).
    split_bp: int = 0
    sticky: bool = False
    shadow_bp: int = 0
    comparison: str = ""

    @property
    def agent_id(self) -> str:
        """The one agent a rollout's per-agent assignment names; "" for a fleet deployment."""
        return self.selector.get(AGENT_KEY, "")

    @property
    def labels(self) -> dict[str, str]:
        """The selector without the reserved per-agent key."""
        return {k: v for k, v in self.selector.items() if k != AGENT_KEY}


def decide(
    rows: Sequence[DeploymentRow], match: Mapping[str, str], retired: Collection[tuple[str, int]]
) -> tuple[dict[str, DeploymentRow], dict[str, DeploymentRow], list[DeploymentRow]]:
    """Per model, the row that decides an agent's desired version, and its blue/green
    preparation: the newest matching row of each kind (``rows`` in id order). ``match`` is the
    agent's labels plus ``AGENT_KEY: agent id``. Rows naming a retired version decide nothing
    (they are returned third): the row before them decides."""
    chosen: dict[str, DeploymentRow] = {}
    prepare: dict[str, DeploymentRow] = {}
    skipped: list[DeploymentRow] = []
    for row in rows:
        if not selector_matches(row.selector, match):
            continue
        if (row.name, row.version) in retired:
            skipped.append(row)
        elif row.kind == "prepare":
            prepare[row.name] = row
        else:
            chosen[row.name] = row
            # A newer serve decision supersedes any earlier preparation.
            prepare.pop(row.name, None)
    return chosen, prepare, skipped


# Release notes are printed by every `models show`; the cap keeps rows and answers small.
MAX_NOTES_BYTES = 4096
# Labels and selectors are compared for every agent on every desired-state computation and
# printed as "k=v,k=v": bounded, printable, and free of the two separators.
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 253
MAX_LABELS = 32


def check_version(version: int, name: str = "") -> None:
    if not 1 <= version <= MAX_VERSION:
        what = f"{name} version" if name else "version"
        raise InvalidRequestError(
            f"{what} {version} is out of range: versions are integers in {VERSION_RANGE}"
        )


def check_notes(notes: str) -> None:
    size = len(notes.encode("utf-8", "surrogatepass"))
    if size > MAX_NOTES_BYTES:
        raise InvalidRequestError(
            f"notes are {size} bytes (UTF-8); at most {MAX_NOTES_BYTES} bytes are allowed"
        )


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:40] + "..."


def check_labels(labels: Mapping[str, str], what: str = "label") -> None:
    """Refuse label sets (token labels, deploy selectors) that cannot be written as k=v,k=v."""
    if len(labels) > MAX_LABELS:
        raise InvalidRequestError(f"{len(labels)} {what}s given; at most {MAX_LABELS} are allowed")
    for k, v in labels.items():
        if not 1 <= len(k) <= MAX_LABEL_KEY or any(c in "=," or not c.isprintable() for c in k):
            raise InvalidRequestError(
                f"{what} key {_short(k)!r} is invalid: a key is 1 to {MAX_LABEL_KEY} printable "
                "characters, none of them '=' or ','"
            )
        if len(v) > MAX_LABEL_VALUE or any(c == "," or not c.isprintable() for c in v):
            raise InvalidRequestError(
                f"{what} value {_short(v)!r} of {k!r} is invalid: a value is at most "
                f"{MAX_LABEL_VALUE} printable characters, none of them ','"
            )


# How often buffered last-seen times and reports are written (see Registry.touch).
SEEN_FLUSH_S = 1.0


@dataclass(frozen=True)
class JobRow:
    spec: JobSpec
    selector: dict[str, str]
    created_at: float


class Registry:
    def __init__(self, path: Path, clock: Any = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        # Autocommit mode, so every transaction is an explicit BEGIN IMMEDIATE ... COMMIT.
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(_SCHEMA)
        self._migrate()
        self._deployments_cache: tuple[int, list[DeploymentRow]] = (-1, [])
        self._retired_warned: set[tuple[str, str, int]] = set()
        # Bumped on every job change, so watchers know to resend desired state.
        self._jobs_version = 0
        # agent id -> (last seen, latest report or None): written by flush_seen(), see touch().
        self._seen: dict[str, tuple[float, AgentReport | None]] = {}

    def _migrate(self) -> None:
        """Columns added after a table first shipped; ALTER is a no-op-safe, one-time step."""
        added = {
            "versions": [("model_sha256", "TEXT NOT NULL DEFAULT ''")],
            "agents": [
                ("presence", "TEXT NOT NULL DEFAULT ''"),
                ("presence_at", "REAL NOT NULL DEFAULT 0"),
                ("cert_expires_at", "REAL NOT NULL DEFAULT 0"),
                ("cert_pending", "TEXT NOT NULL DEFAULT ''"),
                ("revoked_at", "REAL NOT NULL DEFAULT 0"),
            ],
            "deployments": [
                ("kind", "TEXT NOT NULL DEFAULT 'serve'"),
                ("source", "TEXT NOT NULL DEFAULT ''"),
                ("rollout_id", "INTEGER NOT NULL DEFAULT 0"),
                ("actor", "TEXT NOT NULL DEFAULT ''"),
                ("removed_at", "REAL NOT NULL DEFAULT 0"),
                ("removed_by", "TEXT NOT NULL DEFAULT ''"),
                # prepare rows: the comparison (see Desired).
                ("split_bp", "INTEGER NOT NULL DEFAULT 0"),
                ("sticky", "INTEGER NOT NULL DEFAULT 0"),
                ("shadow_bp", "INTEGER NOT NULL DEFAULT 0"),
                ("comparison", "TEXT NOT NULL DEFAULT ''"),
            ],
        }
        for table, columns in added.items():
            have = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}
            for name, decl in columns:
                if name not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")

    # -- admins ------------------------------------------------------------------------------

    def put_admin(self, row: AdminRow) -> None:
        """Add an admin, or replace one of that name (a new key, role and certificate)."""
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO admins (name, role, status, key_sha256, created_at, "
                "created_by, cert_expires_at, updated_at, updated_by) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.name,
                    row.role,
                    row.status,
                    row.key_sha256,
                    row.created_at,
                    row.created_by,
                    row.cert_expires_at,
                    row.updated_at,
                    row.updated_by,
                ),
            )

    def get_admin(self, name: str) -> AdminRow | None:
        r = self.db.execute("SELECT * FROM admins WHERE name = ?", (name,)).fetchone()
        return AdminRow(**dict(r)) if r is not None else None

    def admins(self) -> list[AdminRow]:
        return [AdminRow(**dict(r)) for r in self.db.execute("SELECT * FROM admins ORDER BY name")]

    def update_admin(self, name: str, *, role: str = "", status: str = "", by: str) -> None:
        with self.tx() as db:
            if role:
                db.execute("UPDATE admins SET role = ? WHERE name = ?", (role, name))
            if status:
                db.execute("UPDATE admins SET status = ? WHERE name = ?", (status, name))
            db.execute(
                "UPDATE admins SET updated_at = ?, updated_by = ? WHERE name = ?",
                (self.clock(), by, name),
            )

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.flush_seen()
        self.db.close()

    def backup_to(self, path: Path) -> None:
        """Copy the whole database, as of now, into a new file ``path`` (SQLite's online
        backup API, in one step: the copy is one consistent state, whatever the WAL holds).

        Buffered last-seen times and reports are written first, so the copy has them too.
        """
        self.flush_seen()
        dest = sqlite3.connect(path)
        try:
            # A staging copy: the caller makes it durable where it ends up, so no fsyncs here
            # (the backup runs on the event loop).
            dest.execute("PRAGMA synchronous=OFF")
            self.db.backup(dest)
        finally:
            dest.close()

    # -- versions -------------------------------------------------------------------------------

    def latest_version(self, name: str) -> int:
        row = self.db.execute("SELECT MAX(version) FROM versions WHERE name = ?", (name,))
        return int(row.fetchone()[0] or 0)

    def check_new_version(self, name: str, version: int) -> None:
        check_version(version, name)
        if self.get_version(name, version, missing_ok=True) is not None:
            raise BundleExistsError(
                f"{name} version {version} is already published; versions are immutable"
            )
        latest = self.latest_version(name)
        if version <= latest:
            raise InvalidRequestError(
                f"{name} version {version} must be greater than the latest published "
                f"version {latest}"
            )

    def add_version(
        self,
        *,
        name: str,
        version: int,
        sha256: str,
        size: int,
        notes: str,
        target_path: str,
        signed: bool,
        manifest: Mapping[str, Any],
    ) -> VersionRow:
        with self.tx():
            self.check_new_version(name, version)
            self.db.execute(
                "INSERT INTO versions (name, version, sha256, size, notes, created_at, "
                "target_path, signed, manifest, model_sha256) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    version,
                    sha256,
                    size,
                    notes,
                    self.clock(),
                    target_path,
                    int(signed),
                    json.dumps(manifest),
                    manifest.get("model", {}).get("sha256", ""),
                ),
            )
        row = self.get_version(name, version)
        assert row is not None
        return row

    def mark_signed(self, name: str, version: int, signed: bool = True) -> None:
        with self.tx():
            self.db.execute(
                "UPDATE versions SET signed = ? WHERE name = ? AND version = ?",
                (int(signed), name, version),
            )

    def _row(self, r: sqlite3.Row) -> VersionRow:
        same = self.db.execute(
            "SELECT MIN(version) FROM versions WHERE name = ? AND model_sha256 = ? AND version < ?",
            (r["name"], r["model_sha256"], r["version"]),
        ).fetchone()[0]
        return VersionRow(
            r["name"],
            r["version"],
            r["sha256"],
            r["size"],
            r["stage"],
            r["notes"],
            r["created_at"],
            r["target_path"],
            bool(r["signed"]),
            int(same or 0),
        )

    def get_version(self, name: str, version: int, missing_ok: bool = False) -> VersionRow | None:
        r = self.db.execute(
            "SELECT * FROM versions WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
        if r is None:
            if missing_ok:
                return None
            raise self._no_version(name, version)
        return self._row(r)

    def _no_version(self, name: str, version: int) -> ModelNotFoundError:
        """The error for a missing version: the model's versions, or the close model names."""
        have = [
            int(v)
            for (v,) in self.db.execute(
                "SELECT version FROM versions WHERE name = ? ORDER BY version", (name,)
            )
        ]
        if not have:
            return self._no_model(name)
        shown = ", ".join(str(v) for v in have[-10:])
        return ModelNotFoundError(
            f"model {name!r} has no version {version} (its versions: "
            f"{'..., ' if len(have) > 10 else ''}{shown})"
        )

    def _no_model(self, name: str) -> ModelNotFoundError:
        known = [r[0] for r in self.db.execute("SELECT DISTINCT name FROM versions")]
        return ModelNotFoundError(f"no model named {name!r}{did_you_mean(name, known)}")

    def versions(self, name: str) -> list[VersionRow]:
        rows = self.db.execute(
            "SELECT * FROM versions WHERE name = ? ORDER BY version", (name,)
        ).fetchall()
        if not rows:
            raise self._no_model(name)
        return [self._row(r) for r in rows]

    def retired_versions(self) -> set[tuple[str, int]]:
        rows = self.db.execute("SELECT name, version FROM versions WHERE stage = 'retired'")
        return {(r[0], int(r[1])) for r in rows}

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self.tx():
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def all_versions(self) -> list[VersionRow]:
        rows = self.db.execute("SELECT * FROM versions ORDER BY name, version").fetchall()
        return [self._row(r) for r in rows]

    def model_sha256(self, name: str, version: int) -> str:
        """The sha256 of the version's model.onnx (signed into the target's custom fields)."""
        r = self.db.execute(
            "SELECT model_sha256 FROM versions WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
        if r is None:
            raise self._no_version(name, version)
        return str(r[0])

    def models(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT name, MAX(version) AS latest, COUNT(*) AS n, "
            "MAX(CASE WHEN stage = 'production' THEN version END) AS prod "
            "FROM versions GROUP BY name ORDER BY name"
        ).fetchall()
        return [
            {
                "name": r["name"],
                "latest": r["latest"],
                "count": r["n"],
                "production": r["prod"] or 0,
            }
            for r in rows
        ]

    def set_stage(self, name: str, version: int, stage: str) -> VersionRow:
        if stage not in STAGES:
            raise InvalidRequestError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")
        row = self.get_version(name, version)
        assert row is not None
        if row.stage == "retired" and stage != "retired":
            raise FailedPreconditionError(f"{name} version {version} is retired for good")
        with self.tx():
            if stage == "production":
                # One production version per model: the previous one steps down.
                self.db.execute(
                    "UPDATE versions SET stage = 'deprecated' WHERE name = ? AND "
                    "stage = 'production' AND version != ?",
                    (name, version),
                )
            self.db.execute(
                "UPDATE versions SET stage = ? WHERE name = ? AND version = ?",
                (stage, name, version),
            )
        out = self.get_version(name, version)
        assert out is not None
        return out

    def promote(self, name: str, version: int, replaced: Collection[int]) -> list[int]:
        """A completed rollout's stages in one transaction: ``version`` becomes production;
        the production version before it and the ``replaced`` versions (what the rollout's
        agents ran before) that are staged or production become deprecated. Returns those."""
        row = self.get_version(name, version)
        assert row is not None
        if row.stage == "retired":
            raise FailedPreconditionError(f"{name} version {version} is retired for good")
        with self.tx():
            rows = self.db.execute(
                "SELECT version FROM versions WHERE name = ? AND version != ? AND "
                "(stage = 'production' OR (stage = 'staged' AND version IN "
                f"({','.join('?' * len(replaced))})))",
                (name, version, *replaced),
            ).fetchall()
            deprecated = sorted(int(r[0]) for r in rows)
            self.db.executemany(
                "UPDATE versions SET stage = 'deprecated' WHERE name = ? AND version = ?",
                [(name, v) for v in deprecated],
            )
            self.db.execute(
                "UPDATE versions SET stage = 'production' WHERE name = ? AND version = ?",
                (name, version),
            )
        return deprecated

    # -- tokens and agents ----------------------------------------------------------------------

    def add_token(
        self, token_id: str, secret_hash: str, labels: Mapping[str, str], expires_at: float
    ) -> None:
        with self.tx():
            self.db.execute(
                "INSERT INTO tokens (token_id, secret_hash, labels, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (token_id, secret_hash, json.dumps(dict(labels)), self.clock(), expires_at),
            )

    def consume_token(self, token_id: str, secret_hash: str, agent_id: str) -> dict[str, str]:
        """Mark the token used by ``agent_id`` and return its labels; refuse any reuse."""
        now = self.clock()
        with self.tx():
            r = self.db.execute("SELECT * FROM tokens WHERE token_id = ?", (token_id,)).fetchone()
            if r is None or not hmac.compare_digest(r["secret_hash"], secret_hash):
                raise PermissionDeniedError("enrollment token is not valid")
            if r["used_at"] is not None:
                raise PermissionDeniedError(
                    f"enrollment token {token_id} was already used (by {r['used_by']})"
                )
            if r["expires_at"] <= now:
                raise PermissionDeniedError(f"enrollment token {token_id} has expired")
            self.db.execute(
                "UPDATE tokens SET used_at = ?, used_by = ? WHERE token_id = ?",
                (now, agent_id, token_id),
            )
        labels: dict[str, str] = json.loads(r["labels"])
        return labels

    def add_agent(
        self,
        agent_id: str,
        hostname: str,
        labels: Mapping[str, str],
        fingerprint: str,
        cert_expires_at: float = 0.0,
        serial: int | None = None,
    ) -> None:
        with self.tx():
            self.db.execute(
                "INSERT INTO agents (agent_id, hostname, labels, enrolled_at, cert_fingerprint, "
                "cert_expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    agent_id,
                    hostname,
                    json.dumps(dict(labels)),
                    self.clock(),
                    fingerprint,
                    cert_expires_at,
                ),
            )
            if serial is not None:
                self._add_certificate(agent_id, serial, cert_expires_at)

    def renewed(
        self,
        agent_id: str,
        presented: str,
        issued: str,
        serial: int | None = None,
        not_after: float = 0.0,
    ) -> None:
        """Record a renewal: the certificate that asked is the agent's confirmed one from now
        on, the one just issued is pending until the agent asks with it (see
        HubCore.renew_certificate). The agent id, and so its standing, stay the same."""
        with self.tx():
            self.db.execute(
                "UPDATE agents SET cert_fingerprint = ?, cert_pending = ? WHERE agent_id = ?",
                (presented, issued, agent_id),
            )
            if serial is not None:
                self._add_certificate(agent_id, serial, not_after)

    def _add_certificate(self, agent_id: str, serial: int, not_after: float) -> None:
        # In the transaction that records the agent or renewal: no certificate is issued and
        # recorded there without being known to the CRL.
        self.db.execute(
            "INSERT OR IGNORE INTO certificates (serial, agent_id, not_after) VALUES (?, ?, ?)",
            (format(serial, "x"), agent_id, not_after),
        )

    def revoked_certificates(self, now: float) -> list[tuple[int, float]]:
        """(serial, revoked at) of every unexpired certificate of a revoked agent: the CRL."""
        rows = self.db.execute(
            "SELECT c.serial, a.revoked_at FROM certificates c JOIN agents a USING (agent_id) "
            "WHERE a.status = 'revoked' AND c.not_after > ? ORDER BY c.serial",
            (now,),
        ).fetchall()
        return [(int(r[0], 16), float(r[1])) for r in rows]

    def agent(self, agent_id: str) -> AgentRow:
        r = self.db.execute("SELECT * FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
        if r is None:
            raise PermissionDeniedError(f"unknown agent {agent_id!r}")
        return self._agent(r)

    def _agent(self, r: sqlite3.Row) -> AgentRow:
        last_seen, report = r["last_seen"], None
        if (pending := self._seen.get(r["agent_id"])) is not None:
            last_seen, report = pending
        return AgentRow(
            r["agent_id"],
            r["hostname"],
            json.loads(r["labels"]),
            r["enrolled_at"],
            last_seen,
            r["status"],
            r["cert_fingerprint"],
            report if report is not None else AgentReport.from_json(json.loads(r["report"])),
            r["presence"],
            r["cert_expires_at"],
            r["cert_pending"],
        )

    def agents(self) -> list[AgentRow]:
        return [
            self._agent(r)
            for r in self.db.execute("SELECT * FROM agents ORDER BY agent_id").fetchall()
        ]

    def set_presence(self, agent_id: str, online: bool) -> None:
        self.agent(agent_id)
        with self.tx():
            self.db.execute(
                "UPDATE agents SET presence = ?, presence_at = ? WHERE agent_id = ?",
                ("online" if online else "offline", self.clock(), agent_id),
            )

    def revoke(self, agent_id: str) -> None:
        self.agent(agent_id)
        with self.tx():
            self.db.execute(
                "UPDATE agents SET status = 'revoked', revoked_at = ? WHERE agent_id = ?",
                (self.clock(), agent_id),
            )

    def touch(self, agent_id: str, report: AgentReport | None = None) -> None:
        """Record that an agent was seen (with its latest report): in memory, at once.

        Agents report every few seconds. A transaction, and so an fsync, per report on the
        hub's event loop would cap the fleet at what the disk can sync (an SD card or a network
        volume: a few dozen per second). Reads here see the new values at once; flush_seen()
        writes all of them in one transaction, which the hub does every SEEN_FLUSH_S. A crash
        loses at most that interval of liveness data, which the agents' next reports restore.
        """
        previous = self._seen.get(agent_id)
        if report is None and previous is not None:
            report = previous[1]
        self._seen[agent_id] = (self.clock(), report)

    def flush_seen(self) -> int:
        """Write the buffered last-seen times and reports; return how many agents."""
        if not self._seen:
            return 0
        pending, self._seen = self._seen, {}
        try:
            with self.tx():
                for agent_id, (seen, report) in pending.items():
                    if report is None:
                        self.db.execute(
                            "UPDATE agents SET last_seen = ? WHERE agent_id = ?", (seen, agent_id)
                        )
                    else:
                        self.db.execute(
                            "UPDATE agents SET last_seen = ?, report = ? WHERE agent_id = ?",
                            (seen, json.dumps(report.to_json()), agent_id),
                        )
        except BaseException:
            for agent_id, entry in pending.items():
                self._seen.setdefault(agent_id, entry)  # newer touches win; retried next time
            raise
        return len(pending)

    # -- desired state --------------------------------------------------------------------------

    def check_deployable(self, name: str, version: int) -> VersionRow:
        row = self.get_version(name, version)
        assert row is not None
        if row.stage == "retired":
            raise FailedPreconditionError(f"{name} version {version} is retired: not deployable")
        if not row.signed:
            raise FailedPreconditionError(
                f"{name} version {version} is not signed yet: sign it with `modelfleet-hub sign "
                f"{name} {version} --sha256 HEX --targets-key FILE` (HEX: the bundle sha256 that "
                "publish printed)"
            )
        return row

    def deploy(
        self,
        name: str,
        version: int,
        selector: Mapping[str, str],
        *,
        actor: str = "",
        source: str = "deploy",
        rollout_id: int = 0,
        kind: str = "serve",
        split_bp: int = 0,
        sticky: bool = False,
        shadow_bp: int = 0,
        comparison: str = "",
    ) -> int:
        """One row of the deployments log; returns its id. ``kind="prepare"`` with
        ``split_bp``/``shadow_bp`` is a live comparison against the serving version (see
        :class:`Desired`)."""
        self.check_deployable(name, version)
        if kind != "prepare" and (split_bp or shadow_bp):
            raise ValueError("a split or shadow share needs kind='prepare'")
        if not (0 <= split_bp <= 10000 and 0 <= shadow_bp <= 10000):
            raise ValueError("shares are basis points, 0..10000")
        with self.tx():
            cur = self.db.execute(
                "INSERT INTO deployments (name, version, selector, created_at, source, "
                "rollout_id, actor, kind, split_bp, sticky, shadow_bp, comparison) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    version,
                    json.dumps(dict(selector), sort_keys=True),
                    self.clock(),
                    source,
                    rollout_id,
                    actor,
                    kind,
                    split_bp,
                    int(sticky),
                    shadow_bp,
                    comparison,
                ),
            )
        return int(cur.lastrowid or 0)

    def deploy_many(
        self,
        name: str,
        assignments: Sequence[tuple[str, int]],
        kind: str = "serve",
        *,
        rollout_id: int = 0,
        split_bp: int = 0,
        sticky: bool = False,
        shadow_bp: int = 0,
        comparison: str = "",
    ) -> int:
        """Per-agent desired versions (a rollout's wave, or its rollback) in one transaction.

        Version 0 means "this model is not desired on that agent". ``split_bp``, ``sticky``,
        ``shadow_bp`` and ``comparison`` are for ``kind="prepare"``: the live comparison of the
        prepared version against the serving one (see :class:`Desired`)."""
        if kind != "prepare" and (split_bp or shadow_bp):
            raise ValueError("a split or shadow share needs kind='prepare'")
        if not (0 <= split_bp <= 10000 and 0 <= shadow_bp <= 10000):
            raise ValueError("shares are basis points, 0..10000")
        for version in {v for _, v in assignments if v}:
            row = self.get_version(name, version)
            assert row is not None
            if not row.signed:
                raise FailedPreconditionError(f"{name} version {version} is not signed yet")
        now = self.clock()
        with self.tx():
            self.db.executemany(
                "INSERT INTO deployments (name, version, selector, created_at, kind, source, "
                "rollout_id, split_bp, sticky, shadow_bp, comparison) "
                "VALUES (?, ?, ?, ?, ?, 'rollout', ?, ?, ?, ?, ?)",
                [
                    (
                        name,
                        v,
                        json.dumps({AGENT_KEY: a}),
                        now,
                        kind,
                        rollout_id,
                        split_bp,
                        int(sticky),
                        shadow_bp,
                        comparison,
                    )
                    for a, v in assignments
                ],
            )
        return self.revision()

    def remove_deployments(self, ids: Collection[int], actor: str = "") -> int:
        """Undeploy: the rows stay as history but decide nothing from now on. Returns the new
        revision: removing is a change of desired state like any deployment."""
        with self.tx():
            self.db.executemany(
                "UPDATE deployments SET removed_at = ?, removed_by = ? "
                "WHERE id = ? AND removed_at = 0",
                [(self.clock(), actor, i) for i in sorted(ids)],
            )
            # The revision is the deployments' AUTOINCREMENT counter (see revision()): one
            # step up here, and the next deployment's id is the step after.
            self.db.execute("UPDATE sqlite_sequence SET seq = seq + 1 WHERE name = 'deployments'")
        return self.revision()

    def deployment_rows(self, include_removed: bool = False) -> list[DeploymentRow]:
        """The deployments log in id order: what decides desired state, or (with
        ``include_removed``) everything ever deployed, for history."""
        if not include_removed:
            return list(self._deployments())
        rows = self.db.execute("SELECT * FROM deployments ORDER BY id").fetchall()
        return [_deployment_row(r) for r in rows]

    # -- scheduled jobs ------------------------------------------------------------------------

    def put_job(
        self,
        spec: JobSpec,
        selector: Mapping[str, str],
        *,
        create: bool = False,
    ) -> None:
        with self.tx():
            exists = self.db.execute("SELECT 1 FROM jobs WHERE name = ?", (spec.name,)).fetchone()
            if create and exists:
                raise BundleExistsError(f"job {spec.name!r} already exists")
            if not create and not exists:
                raise ModelNotFoundError(f"no job named {spec.name!r}")
            self.db.execute(
                "INSERT OR REPLACE INTO jobs (name, spec, selector, created_at) VALUES (?, ?, ?, "
                "COALESCE((SELECT created_at FROM jobs WHERE name = ?), ?))",
                (
                    spec.name,
                    json.dumps(spec.to_record()),
                    json.dumps(dict(selector)),
                    spec.name,
                    self.clock(),
                ),
            )
        self._jobs_version += 1

    def delete_job(self, name: str) -> None:
        with self.tx():
            if self.db.execute("DELETE FROM jobs WHERE name = ?", (name,)).rowcount == 0:
                raise ModelNotFoundError(f"no job named {name!r}")
        self._jobs_version += 1

    def jobs(self) -> list[JobRow]:
        rows = self.db.execute("SELECT * FROM jobs ORDER BY name").fetchall()
        return [
            JobRow(
                JobSpec.from_record(json.loads(r["spec"])),
                json.loads(r["selector"]),
                r["created_at"],
            )
            for r in rows
        ]

    def job(self, name: str) -> JobRow:
        for j in self.jobs():
            if j.spec.name == name:
                return j
        raise ModelNotFoundError(f"no job named {name!r}")

    # -- inference capture ------------------------------------------------------------------------

    def set_capture(self, setting: CaptureSetting) -> CaptureSetting:
        """Insert or replace the setting for (model, selector); it becomes the newest."""
        selector = json.dumps(dict(sorted(setting.selector.items())))
        with self.tx():
            self.db.execute(
                "DELETE FROM capture_settings WHERE model = ? AND selector = ?",
                (setting.model, selector),
            )
            cur = self.db.execute(
                "INSERT INTO capture_settings (model, selector, rate_bp, exclude, hash, "
                "created_at, actor) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    setting.model,
                    selector,
                    setting.rate_bp,
                    json.dumps(list(setting.exclude)),
                    json.dumps(list(setting.hash)),
                    self.clock(),
                    setting.actor,
                ),
            )
        row = self.db.execute(
            "SELECT * FROM capture_settings WHERE id = ?", (cur.lastrowid,)
        ).fetchone()
        return _capture_row(row)

    def remove_capture(self, model: str, selector: Mapping[str, str] | None = None) -> int:
        """Remove the model's setting for ``selector`` (None: all of the model's settings)."""
        with self.tx():
            if selector is None:
                cur = self.db.execute("DELETE FROM capture_settings WHERE model = ?", (model,))
            else:
                cur = self.db.execute(
                    "DELETE FROM capture_settings WHERE model = ? AND selector = ?",
                    (model, json.dumps(dict(sorted(selector.items())))),
                )
            return int(cur.rowcount)

    def capture_settings(self) -> list[CaptureSetting]:
        rows = self.db.execute("SELECT * FROM capture_settings ORDER BY model, id").fetchall()
        return [_capture_row(r) for r in rows]

    def _capture_for(self, labels: Mapping[str, str]) -> dict[str, CaptureSetting]:
        chosen: dict[str, CaptureSetting] = {}
        for c in self.capture_settings():  # by id: the newest match wins
            if selector_matches(c.selector, labels):
                chosen[c.model] = c
        return chosen

    def jobs_for(self, labels: Mapping[str, str]) -> list[JobSpec]:
        return [j.spec for j in self.jobs() if selector_matches(j.selector, labels)]

    def add_job_run(self, run: JobRun) -> None:
        """Idempotent by (agent, run id): a report sent twice is stored once."""
        with self.tx():
            self.db.execute(
                "INSERT OR IGNORE INTO job_runs (agent_id, run_id, job, data, finished_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (run.agent_id, run.run_id, run.job, json.dumps(run.to_record()), run.finished_at),
            )

    def job_runs(self, job: str) -> list[JobRun]:
        rows = self.db.execute(
            "SELECT data FROM job_runs WHERE job = ? ORDER BY finished_at", (job,)
        ).fetchall()
        return [JobRun.from_record(json.loads(r["data"])) for r in rows]

    # -- rollouts ------------------------------------------------------------------------------

    def create_rollout(self, model: str, version: int) -> int:
        now = self.clock()
        with self.tx():
            cur = self.db.execute(
                "INSERT INTO rollouts (model, version, state, data, created_at, updated_at) "
                "VALUES (?, ?, 'pending', '{}', ?, ?)",
                (model, version, now, now),
            )
        return int(cur.lastrowid or 0)

    def save_rollout(self, rollout_id: int, state: str, data: Mapping[str, Any]) -> None:
        with self.tx():
            self.db.execute(
                "UPDATE rollouts SET state = ?, data = ?, updated_at = ? WHERE id = ?",
                (state, json.dumps(data), self.clock(), rollout_id),
            )

    def rollouts(
        self, model: str | None = None, states: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        return [
            {**r, "version": row["version"]}
            for r, row in self._state_rows("rollouts", model, states)
        ]

    # -- experiments ---------------------------------------------------------------------------

    def create_experiment(self, model: str, data: Mapping[str, Any]) -> int:
        now = self.clock()
        with self.tx():
            cur = self.db.execute(
                "INSERT INTO experiments (model, state, data, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (model, data.get("state", "running"), json.dumps(data), now, now),
            )
        return int(cur.lastrowid or 0)

    def save_experiment(self, experiment_id: int, state: str, data: Mapping[str, Any]) -> None:
        with self.tx():
            self.db.execute(
                "UPDATE experiments SET state = ?, data = ?, updated_at = ? WHERE id = ?",
                (state, json.dumps(data), self.clock(), experiment_id),
            )

    def experiments(
        self, model: str | None = None, states: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """Experiments in id order, as {"id", "model", "state", "data"}."""
        return [r for r, _ in self._state_rows("experiments", model, states)]

    def _state_rows(
        self, table: str, model: str | None, states: Sequence[str]
    ) -> list[tuple[dict[str, Any], sqlite3.Row]]:
        """Rows of a table of durable state machines (rollouts, experiments) in id order, as
        {"id", "model", "state", "data"} with the row itself for table-specific columns."""
        sql, args = f"SELECT * FROM {table} WHERE 1=1", []
        if model is not None:
            sql += " AND model = ?"
            args.append(model)
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += list(states)
        rows = self.db.execute(sql + " ORDER BY id", args).fetchall()
        return [
            (
                {
                    "id": r["id"],
                    "model": r["model"],
                    "state": r["state"],
                    "data": json.loads(r["data"]),
                },
                r,
            )
            for r in rows
        ]

    def revision(self) -> int:
        """Increases with every change of the deployments: the AUTOINCREMENT counter of
        their ids (the newest id ever given), which an undeploy also steps up."""
        row = self.db.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'deployments'"
        ).fetchone()
        return int(row[0] or 0) if row else 0

    def _deployments(self) -> list[DeploymentRow]:
        # Parsed once per revision: every agent's desired state is computed from the same list.
        revision = self.revision()
        if self._deployments_cache[0] != revision:
            rows = self.db.execute("SELECT * FROM deployments WHERE removed_at = 0 ORDER BY id")
            self._deployments_cache = (revision, [_deployment_row(r) for r in rows])
        return self._deployments_cache[1]

    def decided_for(
        self, labels: Mapping[str, str], agent_id: str = ""
    ) -> dict[str, DeploymentRow]:
        """Per model, the deployment (or rollout assignment) that decides this agent's desired
        version; version 0 rows included (they decide "not desired")."""
        match = {**labels, AGENT_KEY: agent_id} if agent_id else dict(labels)
        return decide(self._deployments(), match, self.retired_versions())[0]

    def desired_for(self, labels: Mapping[str, str], agent_id: str = "") -> list[Desired]:
        """Per model, the newest deployment whose selector matches this agent.

        Fleet deployments select by labels; a rollout's per-agent assignments select by the
        reserved key ``_agent``. Version 0 means "not desired"."""
        match = {**labels, AGENT_KEY: agent_id} if agent_id else dict(labels)
        decided, prepared, skipped = decide(self._deployments(), match, self.retired_versions())
        for row in skipped:
            # Retired is for good: never installed again. The deployment before it decides
            # (or none: the model is not desired).
            if (agent_id, row.name, row.version) not in self._retired_warned:
                self._retired_warned.add((agent_id, row.name, row.version))
                log.warning(
                    "agent %s: %s v%d is retired; dropped from its desired state",
                    agent_id or dict(labels),
                    row.name,
                    row.version,
                )
        chosen = {name: row.version for name, row in decided.items()}
        out = []
        for name, version in sorted(chosen.items()):
            if version == 0:
                continue
            v = self.get_version(name, version)
            assert v is not None
            p = prepared.get(name)
            if p is None or p.version == 0:
                out.append(Desired(name, version, v.target_path, v.sha256, v.size))
                continue
            p_row = self.get_version(name, p.version)
            assert p_row is not None
            out.append(
                Desired(
                    name,
                    version,
                    v.target_path,
                    v.sha256,
                    v.size,
                    p.version,
                    p_row.size,
                    p.split_bp,
                    p.sticky,
                    p.shadow_bp,
                    p.comparison,
                )
            )
        capture = self._capture_for(labels)
        if capture:
            out = [
                dataclasses.replace(
                    d,
                    capture_rate_bp=c.rate_bp,
                    capture_exclude=c.exclude,
                    capture_hash=c.hash,
                )
                if (c := capture.get(d.name)) is not None
                else d
                for d in out
            ]
        return out


def _capture_row(r: sqlite3.Row) -> CaptureSetting:
    return CaptureSetting(
        model=r["model"],
        selector=json.loads(r["selector"]),
        rate_bp=int(r["rate_bp"]),
        exclude=tuple(json.loads(r["exclude"])),
        hash=tuple(json.loads(r["hash"])),
        created_at=float(r["created_at"]),
        actor=r["actor"],
        id=int(r["id"]),
    )


def _deployment_row(r: sqlite3.Row) -> DeploymentRow:
    selector: dict[str, str] = json.loads(r["selector"])
    # Rows from before the hub recorded a source: rollouts alone wrote per-agent rows.
    source = r["source"] or ("rollout" if AGENT_KEY in selector else "deploy")
    return DeploymentRow(
        id=int(r["id"]),
        name=r["name"],
        version=int(r["version"]),
        selector=selector,
        created_at=float(r["created_at"]),
        kind=r["kind"],
        source=source,
        rollout_id=int(r["rollout_id"]),
        actor=r["actor"],
        removed_at=float(r["removed_at"]),
        removed_by=r["removed_by"],
        split_bp=int(r["split_bp"]),
        sticky=bool(r["sticky"]),
        shadow_bp=int(r["shadow_bp"]),
        comparison=r["comparison"],
    )
