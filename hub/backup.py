"""Disaster recovery: a consistent copy of a running hub, and a new data directory made from one.

Backup (``modelfleet-hub backup DIR``) asks the running hub over its admin API
(``HubAdmin.Backup``), because only the hub can copy its stores consistently: DuckDB admits no
second process to the telemetry file, and the registry and the TUF metadata must show the same
instant (the registry remembers the newest signed targets; a registry newer than the metadata
makes the hub refuse to start, as it would a rollback).

- :func:`backup_stream` (the hub): on the event loop, in one step with no ``await`` in it,
  the registry (SQLite's online backup API) and the metadata, keys, CA, admin identity and
  MQTT identity are copied into ``DATA/uploads/backup-*``. Everything that writes the registry
  or the metadata runs on that loop, so nothing lands between those copies; the step takes
  milliseconds (the summary reports it). Then, off the loop: the telemetry through the hub's
  own DuckDB connection (ingestion waits meanwhile), and the bundle blobs the registry names,
  which are immutable and need no copy before sending. Everything is streamed (at most
  ``transfer_rate_limit_mbps``); the staging folder is removed at the end, and at the next
  start if the hub died meanwhile.
- :class:`BackupWriter` (the CLI): writes each file, checks its size and SHA-256 against what
  the hub announced, fsyncs it, and writes ``manifest.json`` last and atomically. A backup
  without a manifest is incomplete: restore refuses it.

Restore (``modelfleet-hub restore DIR --data-dir NEW``, offline, :func:`restore`): the
manifest and every file's hash are checked before anything is written; the files are copied
(and hashed again) into a folder beside NEW (files 0600, folders 0700), the registry and the
TUF metadata are checked as the hub would, and the folder is renamed into place. It also
writes ``restored.json``: at its first start the hub re-signs the TUF metadata with versions
:data:`VERSION_GAP` higher (:func:`finish_restore`), so agents that saw metadata the lost hub
signed after the backup accept the restored hub's as newer instead of refusing a rollback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from modelfleet.kernel.atomic import atomic_write, fsync_dir, try_lock
from modelfleet.kernel.errors import InvalidRequestError, ModelfleetError, Status, VerificationError

if TYPE_CHECKING:
    from modelfleet.hub.core import HubCore

log = logging.getLogger(__name__)

BACKUP_FORMAT = "modelfleet-hub-backup"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
# Written by restore into the new data directory; the hub's first start acts on it, then
# deletes it.
RESTORED_FILE = "restored.json"
# How far a restored hub moves its TUF versions up: more than the lost hub could have signed
# after the backup (it signs a timestamp per publish and at most every few minutes otherwise).
VERSION_GAP = 1_000_000
STAGING_PREFIX = "backup-"
CHUNK = 1 << 20
REGISTRY_FILE = "registry.db"
TELEMETRY_FILE = "telemetry.duckdb"  # hub.telemetry.TELEMETRY_FILE, without loading DuckDB
# hub.alert_manager.ALERTS_FILE: alert rules, webhooks (secrets) and queued notifications. Not
# REQUIRED: backups taken before alerting existed restore without it.
ALERTS_FILE = "alerts.sqlite"
# hub.outcomes.OUTCOMES_FILE: late labels, which cannot be fetched again. Not REQUIRED either.
OUTCOMES_FILE = "outcomes.sqlite"
# hub.audit.AUDIT_FILE: the audit trail. Not REQUIRED either.
AUDIT_FILE = "audit.sqlite"
SINGLE_FILES = (REGISTRY_FILE, TELEMETRY_FILE, ALERTS_FILE, OUTCOMES_FILE, AUDIT_FILE)
# Folders copied whole, besides tuf/ (copied under its lock) and blobs/ (the registry's).
STATE_DIRS = ("keys", "ca", "admin", "mqtt")
TOP_LEVEL = frozenset({*SINGLE_FILES, "tuf", "blobs", *STATE_DIRS})
# Without these the hub cannot start as the same hub (same CA, same TUF keys and metadata).
REQUIRED = (
    REGISTRY_FILE,
    TELEMETRY_FILE,
    "tuf/root.json",
    "tuf/1.root.json",
    "tuf/timestamp.json",
    "keys/snapshot.pem",
    "keys/timestamp.pem",
    "ca/ca.key",
    "ca/ca.crt",
)
_BLOB_PATH = re.compile(r"blobs/sha256/([0-9a-f]{2})/([0-9a-f]{64})")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A manifest lists a few thousand files; anything this large is not one of ours.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


class BackupError(ModelfleetError):
    """The backup cannot be taken or written (the message says why and what to do)."""

    status = Status.FAILED_PRECONDITION
    reason = "backup"


@dataclass(frozen=True)
class BackupFile:
    path: str  # relative to the data directory, "/"-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class BackupSummary:
    created_at: float
    hub: str
    tuf_versions: dict[str, int]
    models: int
    versions: int
    agents: int
    blobs: int
    files: int
    bytes: int
    pause_ms: float


def check_path(path: str) -> PurePosixPath:
    """``path`` as a relative path inside a data directory, or InvalidRequestError.

    Guards both ends: the CLI writes what the hub names, restore copies what a manifest names,
    and neither may write outside its folder.
    """
    p = PurePosixPath(path)
    bad = (
        not path
        or "\\" in path
        or "\0" in path
        or p.is_absolute()
        or any(part in ("", ".", "..") for part in path.split("/"))
        or p.parts[0] not in TOP_LEVEL
        or (p.parts[0] in SINGLE_FILES and len(p.parts) != 1)
        or (p.parts[0] not in SINGLE_FILES and len(p.parts) < 2)
    )
    if not bad and p.parts[0] == "blobs":
        m = _BLOB_PATH.fullmatch(path)
        bad = m is None or m.group(2)[:2] != m.group(1)
    if bad:
        raise InvalidRequestError(
            f"{path!r} is not a path a hub backup holds ({', '.join(SINGLE_FILES)}, or a "
            f"file under {', '.join(sorted(TOP_LEVEL - set(SINGLE_FILES)))})"
        )
    return p


def _file_sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _open_new(path: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return fd


# -- the hub's side ----------------------------------------------------------------------------


@dataclass
class _Snapshot:
    staging: Path
    created_at: float
    pause_ms: float
    tuf_versions: dict[str, int]
    models: int
    agents: int
    # (sha256, "name vN") of every version the registry holds, deduplicated by sha256.
    blobs: dict[str, str] = field(default_factory=dict)
    versions: int = 0


def _copy_tree(src: Path, dest: Path) -> None:
    for path in sorted(src.rglob("*")):
        # atomic_write's temporaries (".name.xxxx.tmp") are no part of any state.
        if path.name.startswith(".") or path.is_symlink() or not path.is_file():
            continue
        out = dest / path.relative_to(src)
        out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # No fsync while the loop waits: the staging copy is temporary, the CLI makes the
        # backup durable.
        fd = _open_new(out)
        try:
            _write_all(fd, path.read_bytes())
        finally:
            os.close(fd)


def _backup_sqlite(src: Path, dest: Path) -> None:
    """A consistent copy of a SQLite file another connection of this process writes (SQLite's
    online backup API); nothing when it does not exist."""
    if not src.exists():
        return
    source = sqlite3.connect(src)
    try:
        target = sqlite3.connect(dest)
        try:
            target.execute("PRAGMA synchronous=OFF")  # a staging copy, made durable where it lands
            source.backup(target)
        finally:
            target.close()
    finally:
        source.close()
    os.chmod(dest, 0o600)


def take_snapshot(core: HubCore) -> _Snapshot:
    """Copy the registry and the small state files as of one instant (call on the event loop).

    No ``await`` in here: every registry and metadata write of the hub runs on the event loop,
    so none can land between these copies.
    """
    started = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=core.paths.uploads))
    try:
        core.registry.backup_to(staging / REGISTRY_FILE)
        _backup_sqlite(core.paths.root / ALERTS_FILE, staging / ALERTS_FILE)
        _backup_sqlite(core.paths.root / OUTCOMES_FILE, staging / OUTCOMES_FILE)
        core.tuf.copy_metadata(staging / "tuf")
        for name in STATE_DIRS:
            if (core.paths.root / name).is_dir():
                _copy_tree(core.paths.root / name, staging / name)
        snap = _Snapshot(
            staging=staging,
            created_at=time.time(),
            pause_ms=0.0,
            tuf_versions=core.tuf.versions(),
            models=len(core.registry.models()),
            agents=len(core.registry.agents()),
        )
        for v in core.registry.all_versions():
            snap.versions += 1
            snap.blobs.setdefault(v.sha256, f"{v.name} v{v.version}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    snap.pause_ms = (time.monotonic() - started) * 1000
    return snap


def remove_stale_staging(uploads: Path) -> None:
    """Staging folders of backups cut short by a hub that died (called at start, under the
    data directory's lock, so no backup is running)."""
    for path in uploads.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def _staged_files(snap: _Snapshot) -> list[tuple[BackupFile, Path]]:
    out = []
    for path in sorted(snap.staging.rglob("*")):
        if path.is_file():
            digest, size = _file_sha256(path)
            out.append((BackupFile(path.relative_to(snap.staging).as_posix(), size, digest), path))
    return out


async def backup_stream(core: HubCore) -> AsyncIterator[BackupFile | bytes | BackupSummary]:
    """What ``HubAdmin.Backup`` sends: for each file its :class:`BackupFile`, then its bytes in
    chunks; a :class:`BackupSummary` last."""
    snap = take_snapshot(core)
    log.info(
        "backup: registry and metadata copied (the loop paused %.1f ms); sending", snap.pause_ms
    )
    try:
        await core.telemetry_ingest.query(core.telemetry.backup_to, snap.staging / TELEMETRY_FILE)
        # Off the loop: a year of trail is hundreds of MB (about 0.25 s per 100 MB), and it
        # need not be of the registry's instant (its store has its own lock).
        await asyncio.to_thread(core.audit.backup_to, snap.staging / AUDIT_FILE)
        staged = await asyncio.to_thread(_staged_files, snap)
        blobs = []
        for digest, what in sorted(snap.blobs.items()):
            if not core.blobs.exists(digest):
                raise BackupError(
                    f"the bundle of {what} (blob {digest}) is missing from the hub's blob store: "
                    "the hub cannot serve it either; publish that model again under a new "
                    "version, then back up"
                )
            path = f"blobs/sha256/{digest[:2]}/{digest}"
            blobs.append(BackupFile(path, core.blobs.size(digest), digest))
        rate = core.cfg.transfer_rate_limit_mbps * 1e6
        started, sent, files = time.monotonic(), 0, 0
        entries: list[tuple[BackupFile, Iterator[bytes]]] = [
            (f, _read(src)) for f, src in staged
        ] + [(f, core.blobs.read(f.sha256)) for f in blobs]
        for entry, chunks in entries:
            yield entry
            files += 1
            while (block := await asyncio.to_thread(next, chunks, None)) is not None:
                yield block
                sent += len(block)
                if rate > 0:
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        yield BackupSummary(
            created_at=snap.created_at,
            hub=core.advertise,
            tuf_versions=snap.tuf_versions,
            models=snap.models,
            versions=snap.versions,
            agents=snap.agents,
            blobs=len(blobs),
            files=files,
            bytes=sent,
            pause_ms=snap.pause_ms,
        )
        log.info("backup: sent %d file(s), %d bytes", files, sent)
    finally:
        shutil.rmtree(snap.staging, ignore_errors=True)


def _read(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            yield block


def finish_restore(core: HubCore) -> None:
    """At start: if this data directory was just restored, move the TUF versions up (see the
    module's docstring), then forget the mark. A crash before the mark is gone moves them up
    once more at the next start, which is harmless."""
    marker = core.paths.root / RESTORED_FILE
    try:
        info = json.loads(marker.read_bytes())
        gap = int(info.get("version_gap", VERSION_GAP))
    except FileNotFoundError:
        return
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("%s is unreadable (%s); moving the TUF versions up anyway", marker, exc)
        info, gap = {}, VERSION_GAP
    moved = core.tuf.advance_versions(gap)
    core.note_targets_version()
    marker.unlink()
    fsync_dir(core.paths.root)
    taken = info.get("backup_created_at")
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(taken)) if taken else "?"
    log.warning(
        "restored from the backup taken at %s: re-signed %s, so agents that saw newer metadata "
        "from the lost hub accept this hub's%s",
        when,
        ", ".join(f"{role} v{old} -> v{new}" for role, (old, new) in moved.items() if old != new),
        ""
        if core.tuf.has_online_targets_key
        else " (targets stays: its key is offline; see docs/operations.md if versions were "
        "published after the backup)",
    )


# -- the CLI's side: writing a backup ----------------------------------------------------------


def _mkdirs(root: Path, rel: PurePosixPath, made: set[Path]) -> Path:
    """Create the folders of ``rel`` under ``root`` (0700), remembering them to fsync later."""
    current = root
    for part in rel.parts[:-1]:
        current = current / part
        if current not in made:
            with contextlib.suppress(FileExistsError):
                current.mkdir(mode=0o700)
            if current.is_symlink() or not current.is_dir():
                raise BackupError(f"{current} is not a folder")
            made.add(current)
    return current / rel.parts[-1]


class BackupWriter:
    """Writes the files a hub streams into ``dest`` and, once all arrived intact, the manifest.

    ``dest`` must be empty or new: a backup never mixes with other files. Every file is
    created 0600 (they hold the CA and signing keys), checked against the size and SHA-256 the
    hub announced, and fsynced; ``manifest.json`` comes last, written atomically, so an
    interrupted backup has none and restore refuses it.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = Path(dest)
        if self.dest.exists() and not self.dest.is_dir():
            raise BackupError(f"{self.dest} exists and is not a folder: back up into a new folder")
        if self.dest.is_dir() and any(self.dest.iterdir()):
            hint = (
                " (an interrupted backup: it has no manifest; delete it)"
                if not (self.dest / MANIFEST_FILE).exists()
                else ""
            )
            raise BackupError(f"{self.dest} is not empty{hint}: back up into a new or empty folder")
        self.created = not self.dest.exists()
        self.dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dest.chmod(0o700)
        self.files: list[BackupFile] = []
        self._dirs: set[Path] = {self.dest}
        self._current: BackupFile | None = None
        self._fd = -1
        self._hash = hashlib.sha256()
        self._written = 0

    def begin(self, entry: BackupFile) -> None:
        self._end_file()
        rel = check_path(entry.path)
        if entry.size < 0 or not _SHA256.fullmatch(entry.sha256):
            raise BackupError(f"the hub announced {entry.path} with a bad size or sha256")
        if any(f.path == entry.path for f in self.files):
            raise BackupError(f"the hub sent {entry.path} twice")
        self._fd = _open_new(_mkdirs(self.dest, rel, self._dirs))
        self._current, self._hash, self._written = entry, hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        if self._current is None:
            raise BackupError("the hub sent file data before naming the file")
        self._written += len(data)
        if self._written > self._current.size:
            raise BackupError(
                f"the hub sent more than the {self._current.size} bytes it announced for "
                f"{self._current.path}"
            )
        self._hash.update(data)
        _write_all(self._fd, data)

    def _end_file(self) -> None:
        entry = self._current
        if entry is None:
            return
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd, self._current = -1, None
        digest = self._hash.hexdigest()
        if self._written != entry.size or digest != entry.sha256:
            raise VerificationError(
                f"{entry.path} arrived as {self._written} bytes with sha256 {digest[:16]}, the "
                f"hub announced {entry.size} bytes with sha256 {entry.sha256[:16]}: the transfer "
                "or the hub's copy is damaged (for a blob: the hub's blob store); take the "
                "backup again",
                reason="backup",
            )
        self.files.append(entry)

    def finish(self, summary: BackupSummary) -> str:
        """Write the manifest (after every file and folder is durable); return its SHA-256."""
        self._end_file()
        total = sum(f.size for f in self.files)
        if summary.files != len(self.files) or summary.bytes != total:
            raise BackupError(
                f"received {len(self.files)} file(s), {total} bytes; the hub sent "
                f"{summary.files} file(s), {summary.bytes} bytes: take the backup again"
            )
        have = {f.path for f in self.files}
        missing = [p for p in REQUIRED if p not in have]
        if missing:
            raise BackupError(f"the hub sent no {', '.join(missing)}: not a complete backup")
        for d in sorted(self._dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)
        manifest = {
            "format": BACKUP_FORMAT,
            "format_version": FORMAT_VERSION,
            **{k: v for k, v in asdict(summary).items() if k not in ("files", "bytes")},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(summary.created_at)),
            "total_bytes": total,
            "files": [asdict(f) for f in sorted(self.files, key=lambda f: f.path)],
        }
        data = (json.dumps(manifest, indent=1) + "\n").encode()
        atomic_write(self.dest / MANIFEST_FILE, data, 0o600)
        return hashlib.sha256(data).hexdigest()

    def abort(self) -> None:
        """Remove what this writer put in ``dest`` (and ``dest`` if it made it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.created:
            shutil.rmtree(self.dest, ignore_errors=True)
            return
        for child in list(self.dest.iterdir()):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


# -- restore -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    created_at: float
    hub: str
    tuf_versions: dict[str, int]
    counts: dict[str, int]
    files: list[BackupFile]
    sha256: str

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _refuse(backup: Path, what: str) -> VerificationError:
    return VerificationError(
        f"refusing the backup in {backup}: {what}; restore another backup", reason="backup"
    )


def read_manifest(backup: Path, expect_sha256: str | None = None) -> Manifest:
    """Parse and check ``backup/manifest.json`` (not yet the files it lists)."""
    backup = Path(backup)
    if not backup.is_dir():
        raise InvalidRequestError(f"no backup folder {backup}")
    path = backup / MANIFEST_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise _refuse(
            backup,
            f"it has no {MANIFEST_FILE}, so the backup never finished (interrupted, or the hub "
            "failed half-way) or this is not a backup",
        ) from None
    except OSError as exc:
        raise _refuse(backup, f"cannot open {MANIFEST_FILE}: {exc}") from None
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _refuse(backup, f"{MANIFEST_FILE} is over {MAX_MANIFEST_BYTES} bytes")
    digest = hashlib.sha256(raw).hexdigest()
    if expect_sha256 is not None and digest != expect_sha256.lower():
        raise _refuse(
            backup,
            f"{MANIFEST_FILE} has sha256 {digest}, not the {expect_sha256} that backup printed "
            "(the manifest was changed)",
        )
    try:
        data = json.loads(raw)
        if data.get("format") != BACKUP_FORMAT:
            raise ValueError(f"format {data.get('format')!r} is not {BACKUP_FORMAT!r}")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"format_version {data.get('format_version')!r}: this hub reads version "
                f"{FORMAT_VERSION}"
            )
        files = [
            BackupFile(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in data["files"]
        ]
        manifest = Manifest(
            created_at=float(data["created_at"]),
            hub=str(data.get("hub", "")),
            tuf_versions={str(k): int(v) for k, v in dict(data.get("tuf_versions", {})).items()},
            counts={k: int(data.get(k, 0)) for k in ("models", "versions", "agents", "blobs")},
            files=files,
            sha256=digest,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _refuse(backup, f"{MANIFEST_FILE} is not a valid backup manifest ({exc})") from None
    seen: set[str] = set()
    for f in files:
        try:
            check_path(f.path)
        except InvalidRequestError as exc:
            raise _refuse(backup, f"{MANIFEST_FILE} lists {exc}") from None
        if f.path in seen:
            raise _refuse(backup, f"{MANIFEST_FILE} lists {f.path} twice")
        if f.size < 0 or not _SHA256.fullmatch(f.sha256):
            raise _refuse(backup, f"{MANIFEST_FILE} has a bad size or sha256 for {f.path}")
        m = _BLOB_PATH.fullmatch(f.path)
        if m is not None and m.group(2) != f.sha256:
            raise _refuse(backup, f"{f.path} is listed with another sha256 than its name")
        seen.add(f.path)
    missing = [p for p in REQUIRED if p not in seen]
    if missing:
        raise _refuse(backup, f"{MANIFEST_FILE} lists no {', '.join(missing)}")
    return manifest


def _open_backup_file(backup: Path, entry: BackupFile) -> int:
    path = backup / entry.path
    try:
        # No symlinks anywhere on the way: the backup's own files or nothing.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise _refuse(backup, f"{entry.path} is missing (the manifest lists it)") from None
    except OSError as exc:
        raise _refuse(backup, f"cannot open {entry.path}: {exc}") from None
    inside = os.path.realpath(path).startswith(os.path.realpath(backup) + os.sep)
    if not stat.S_ISREG(os.fstat(fd).st_mode) or not inside:
        os.close(fd)
        raise _refuse(backup, f"{entry.path} is not a regular file inside the backup folder")
    return fd


def _check_copy(backup: Path, entry: BackupFile, digest: str, size: int) -> None:
    if size != entry.size or digest != entry.sha256:
        raise _refuse(
            backup,
            f"{entry.path} does not match the manifest: {size} bytes with sha256 {digest}, the "
            f"manifest says {entry.size} bytes with sha256 {entry.sha256} (the file was changed "
            "or damaged)",
        )


def verify_backup(backup: Path, expect_sha256: str | None = None) -> Manifest:
    """The manifest and every file it lists, hashed: raises naming the first that differs."""
    backup = Path(backup).absolute()
    manifest = read_manifest(backup, expect_sha256)
    for entry in manifest.files:
        fd = _open_backup_file(backup, entry)
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "rb") as fh:
            while block := fh.read(CHUNK):
                digest.update(block)
                size += len(block)
        _check_copy(backup, entry, digest.hexdigest(), size)
    return manifest


@dataclass(frozen=True)
class RestoreResult:
    manifest: Manifest
    data_dir: Path
    replaced: Path | None  # where the previous contents of data_dir went (--force)
    targets_key_online: bool


def _copy_in(backup: Path, entry: BackupFile, dest: Path, made: set[Path]) -> None:
    """Copy one file, hashing it again (it may have changed since verify_backup read it)."""
    src = _open_backup_file(backup, entry)
    out = _open_new(_mkdirs(dest, check_path(entry.path), made))
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(src, "rb") as fh:
            while block := fh.read(CHUNK):
                digest.update(block)
                size += len(block)
                _write_all(out, block)
        os.fsync(out)
    finally:
        os.close(out)
    _check_copy(backup, entry, digest.hexdigest(), size)


def _check_restored(backup: Path, new: Path, manifest: Manifest) -> bool:
    """What the hub checks at start, before the folder takes NEW's place: the registry is a
    sound SQLite database whose every version has its blob, and the TUF metadata verifies
    against the anchor and the online keys. Returns whether the targets key is online."""
    from modelfleet.hub.signing import RepositoryIntegrityError, TufRepository, TufSetupError

    have = {f.path for f in manifest.files}
    try:
        db = sqlite3.connect(new / REGISTRY_FILE)
        try:
            ok = db.execute("PRAGMA integrity_check").fetchone()
            if ok is None or ok[0] != "ok":
                raise _refuse(backup, f"{REGISTRY_FILE} fails SQLite's integrity check: {ok}")
            rows = db.execute("SELECT name, version, sha256 FROM versions").fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise _refuse(backup, f"{REGISTRY_FILE} is not a hub registry ({exc})") from None
    for name, version, digest in rows:
        if f"blobs/sha256/{str(digest)[:2]}/{digest}" not in have:
            raise _refuse(backup, f"the registry holds {name} v{version} but not its blob {digest}")
    try:
        repo = TufRepository.open(new / "tuf", new / "keys")
    except (RepositoryIntegrityError, TufSetupError) as exc:
        raise _refuse(backup, f"its TUF metadata does not verify: {exc}") from None
    return repo.has_online_targets_key


def restore(
    backup: Path, data_dir: Path, *, force: bool = False, expect_sha256: str | None = None
) -> RestoreResult:
    """Make ``data_dir`` a copy of the hub in ``backup`` (see the module's docstring)."""
    from modelfleet.hub.core import LOCK_FILE, HubRunningError

    backup = Path(backup).absolute()
    data_dir = Path(data_dir).absolute()
    manifest = verify_backup(backup, expect_sha256)
    if data_dir == backup or backup.is_relative_to(data_dir) or data_dir.is_relative_to(backup):
        raise InvalidRequestError(
            f"restore into a folder apart from the backup: {data_dir} and {backup} overlap"
        )
    lock = None
    if data_dir.exists():
        if not data_dir.is_dir() or data_dir.is_symlink():
            raise BackupError(f"{data_dir} exists and is not a folder")
        entries = [p.name for p in data_dir.iterdir()]
        if entries and not force:
            raise BackupError(
                f"{data_dir} is not empty ({len(entries)} entries, e.g. {sorted(entries)[0]}): "
                "restore into an empty or new folder, or pass --force to replace it (its "
                "contents are moved aside, not deleted)"
            )
        if entries:
            lock = try_lock(data_dir / LOCK_FILE, 0o600)
            if lock is None:
                raise HubRunningError(
                    f"a hub is running on {data_dir} ({data_dir / LOCK_FILE} is held): stop it "
                    "before restoring over it"
                )
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    work = data_dir.with_name(f".{data_dir.name}.restoring-{secrets.token_hex(4)}")
    work.mkdir(mode=0o700)
    replaced = None
    try:
        work.chmod(0o700)
        made = {work}
        for entry in manifest.files:
            _copy_in(backup, entry, work, made)
        targets_online = _check_restored(backup, work, manifest)
        marker: dict[str, Any] = {
            "backup_created_at": manifest.created_at,
            "backup_manifest_sha256": manifest.sha256,
            "backup_hub": manifest.hub,
            "restored_at": time.time(),
            "version_gap": VERSION_GAP,
        }
        atomic_write(work / RESTORED_FILE, (json.dumps(marker) + "\n").encode(), 0o600)
        for d in sorted(made, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)
        if data_dir.exists():
            if lock is not None:
                stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                replaced = data_dir.with_name(f"{data_dir.name}.replaced-{stamp}")
                os.rename(data_dir, replaced)
            else:
                data_dir.rmdir()
        os.rename(work, data_dir)
        fsync_dir(data_dir.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)
    return RestoreResult(manifest, data_dir, replaced, targets_online)
