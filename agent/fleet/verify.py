"""Verify bundles from the hub with python-tuf's ngclient before anything is unpacked or loaded.

``BundleVerifier.fetch_bundle(name, version)``: a fresh ngclient ``Updater`` refreshes the
metadata (root -> timestamp -> snapshot -> targets, each checked for signatures, versions and
expiry), looks up the target ``<name>/<version>/bundle.tar``, reuses a local copy whose length and
sha256 match, or downloads it (resumably) and verifies it, and returns the local path.

URL scheme. ngclient addresses everything by URL; ours never reach HTTP. The Updater gets

- metadata base URL ``mf:metadata/``: ``mf:metadata/<file>`` -> ``Transport.fetch_metadata(file)``
  with file one of ``N.root.json``, ``timestamp.json``, ``N.snapshot.json``, ``N.targets.json``;
- targets base URL ``mf:targets/``: ``mf:targets/<path>`` -> ``Transport.fetch_target(path,
  offset)`` with path the consistent-snapshot name ``<name>/<version>/<sha256>.bundle.tar``.

Resumable downloads. Target bytes are appended to ``partial_dir/<sha256>.part`` as they arrive
(flushed per chunk, fsynced every few MiB), so an interrupted download (lost link, kill -9)
resumes from the part file's size. The part file is content-addressed, so it can only ever be a
prefix of that one file: if the final bytes do not verify it is deleted and the next attempt
starts clean. Power loss can leave a torn tail; that shows up as a hash mismatch and is handled
the same way.

Errors: everything that means "do not trust this" becomes ``VerificationError`` naming the
attack class (rollback, freeze, bad signature, hash mismatch, ...) plus ngclient's own text;
transport failures become ``TransportUnavailableError`` (retry later, partial bytes kept) or the
``protos.errors`` error the transport raised; a full disk is ``ResourceExhaustedError``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Protocol

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.api.serialization import DeserializationError
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from protos.atomic import atomic_write as _atomic_write
from protos.atomic import fsync_dir as _fsync_dir
from protos.bundle import NAME_RE
from protos.errors import (
    InvalidRequestError,
    ModelfleetError,
    ModelNotFoundError,
    ResourceExhaustedError,
    Status,
    VerificationError,
)

logger = logging.getLogger(__name__)

METADATA_URL = "mf:metadata/"
TARGETS_URL = "mf:targets/"
TARGET_FILE_NAME = "bundle.tar"
DEFAULT_RESERVE_BYTES = 64 << 20
# Every few MiB the part file is fsynced: bounds what a power cut can lose without paying for a
# sync per chunk. (A killed process loses nothing: chunks are flushed to the OS as they arrive.)
FSYNC_EVERY_BYTES = 4 << 20
_READ_CHUNK = 1 << 20
_MB = 1 << 20

# "<sha256>.<basename>": how ngclient names targets under consistent snapshots.
_HASHED_NAME = re.compile(r"([0-9a-f]{64})\.[^/]+")
_ROLE_NAMES = ("root", "timestamp", "snapshot", "targets")
_ROLE_IN_TEXT = re.compile(r"\b(root|timestamp|snapshot|targets)\b")


def bundle_target_path(name: str, version: int) -> str:
    """The TUF target path of a bundle; the same contract as ``hub.signing``."""
    return f"{name}/{version}/{TARGET_FILE_NAME}"


class TransportUnavailableError(ModelfleetError):
    """The hub could not be reached or the transfer broke off; retry later (partials are kept)."""

    status = Status.UNAVAILABLE
    reason = "transport"


class Transport(Protocol):
    """How the agent gets bytes from the hub (gRPC, MQTT, or in memory for tests).

    Both methods return an iterator of chunks; failures may be raised when called or while
    iterating. Raise ``protos.errors.ModelNotFoundError`` when the hub does not have the file:
    ngclient probes for ``N+1.root.json`` and must see "not found" to know the root is current.
    Raise other ``protos.errors`` errors or ``OSError`` for transport failures.
    """

    def fetch_metadata(self, filename: str) -> Iterator[bytes]:
        """The whole metadata file ``filename`` (e.g. ``"3.snapshot.json"``)."""
        ...

    def fetch_target(self, path: str, offset: int) -> Iterator[bytes]:
        """Bytes of target ``path`` (``"mlp/3/<sha256>.bundle.tar"``) from ``offset`` to the end.

        ``offset`` equal to the file's length yields nothing.
        """
        ...


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def target_sha256(path: str) -> str | None:
    """The sha256 in a consistent-snapshot target name, or None if it has none."""
    match = _HASHED_NAME.fullmatch(path.rpartition("/")[2])
    return match.group(1) if match else None


class InMemoryTransport:
    """A Transport over a metadata reader and blobs by sha256: for tests and local demos.

    ``metadata`` is typically ``TufRepository.read``; ``blobs`` maps sha256 -> file bytes.
    """

    def __init__(
        self,
        metadata: Callable[[str], bytes],
        blobs: Mapping[str, bytes],
        *,
        chunk_size: int = 64 << 10,
    ) -> None:
        self.metadata = metadata
        self.blobs = blobs
        self.chunk_size = chunk_size

    def fetch_metadata(self, filename: str) -> Iterator[bytes]:
        yield from _chunks(self.metadata(filename), self.chunk_size)

    def fetch_target(self, path: str, offset: int) -> Iterator[bytes]:
        sha = target_sha256(path)
        if sha is None or sha not in self.blobs:
            raise ModelNotFoundError(f"no target {path!r} on this hub")
        yield from _chunks(self.blobs[sha][offset:], self.chunk_size)


def _role_of_file(filename: str) -> str:
    # "7.snapshot.json" -> "snapshot"; "timestamp.json" -> "timestamp"
    stem = filename.removesuffix(".json")
    return stem.split(".", 1)[1] if stem[:1].isdigit() and "." in stem else stem


class TransportFetcher(FetcherInterface):
    """ngclient fetcher over a :class:`Transport`, with resumable target downloads.

    Maps ``mf:metadata/<file>`` and ``mf:targets/<path>`` (see the module docstring). Target
    names carrying a sha256 (always, with the hub's consistent snapshots) are downloaded through
    ``partial_dir/<sha256>.part``: a later fetch first yields the bytes already there, then asks
    the transport for the rest from ``offset = part size``.
    """

    def __init__(
        self, transport: Transport, partial_dir: Path, *, fsync_every: int = FSYNC_EVERY_BYTES
    ) -> None:
        self.transport = transport
        self.partial_dir = Path(partial_dir)
        self.fsync_every = fsync_every
        # The last metadata file requested and the verified-or-not bytes of each role fetched
        # during this refresh: ngclient's errors do not say which file failed or when it
        # expired, so error messages are completed from these.
        self.last_metadata: str | None = None
        self.fetched: dict[str, bytes] = {}

    def reset(self) -> None:
        self.last_metadata = None
        self.fetched.clear()

    def part_path(self, target_path: str) -> Path | None:
        sha = target_sha256(target_path)
        return self.partial_dir / f"{sha}.part" if sha else None

    def _fetch(self, url: str) -> Iterator[bytes]:
        if url.startswith(METADATA_URL):
            return self._metadata(url, url[len(METADATA_URL) :])
        if url.startswith(TARGETS_URL):
            return self._target(url, url[len(TARGETS_URL) :])
        raise tuf_exc.DownloadError(
            f"unsupported URL {url!r}: expected {METADATA_URL}<file> or {TARGETS_URL}<path>"
        )

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """Like the base class, but a resumable target is handed over as its part file.

        The base class copies every download into a temporary file (often a RAM-backed /tmp on
        devices); the part file already holds the bytes, so ngclient verifies that instead.
        """
        part = self.part_path(url[len(TARGETS_URL) :]) if url.startswith(TARGETS_URL) else None
        if part is None:
            with super().download_file(url, max_length) as fh:
                yield fh
            return
        received = 0
        chunks = self.fetch(url)
        try:
            for chunk in chunks:
                received += len(chunk)
                if received > max_length:
                    raise tuf_exc.DownloadLengthMismatchError(
                        f"Downloaded {received} bytes exceeding the maximum allowed length of "
                        f"{max_length}"
                    )
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # stop the transport stream now, not at garbage collection
        with open(part, "rb") as fh:
            yield fh

    def _guarded(self, url: str, open_stream: Callable[[], Iterable[bytes]]) -> Iterator[bytes]:
        """Transport errors -> ngclient's download errors (the original kept as __cause__)."""
        try:
            for chunk in open_stream():
                yield bytes(chunk)
        except ModelNotFoundError as exc:
            # ngclient treats 404 as "no newer root"; anything else is a failed download.
            raise tuf_exc.DownloadHTTPError(f"{url}: {exc}", 404) from exc
        except (ModelfleetError, OSError) as exc:
            raise tuf_exc.DownloadError(f"{url}: {exc}") from exc

    def _metadata(self, url: str, filename: str) -> Iterator[bytes]:
        self.last_metadata = filename
        parts: list[bytes] = []
        for chunk in self._guarded(url, lambda: self.transport.fetch_metadata(filename)):
            parts.append(chunk)
            yield chunk
        self.fetched[_role_of_file(filename)] = b"".join(parts)

    def _target(self, url: str, path: str) -> Iterator[bytes]:
        part = self.part_path(path)
        if part is None:
            yield from self._guarded(url, lambda: self.transport.fetch_target(path, 0))
            return
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        # Local I/O stays outside _guarded: a full disk must not look like a network failure.
        with open(part, "ab") as out:
            have = os.fstat(out.fileno()).st_size
            if have:
                logger.info("resuming %s at byte %d", path, have)
                with open(part, "rb") as existing:
                    remaining = have
                    while remaining > 0 and (block := existing.read(min(_READ_CHUNK, remaining))):
                        remaining -= len(block)
                        yield block
            unsynced = 0
            for chunk in self._guarded(url, lambda: self.transport.fetch_target(path, have)):
                out.write(chunk)
                out.flush()
                unsynced += len(chunk)
                if unsynced >= self.fsync_every:
                    os.fsync(out.fileno())
                    unsynced = 0
                yield chunk
            os.fsync(out.fileno())


class BundleVerifier:
    """Fetch bundles from the hub and return them only once TUF has verified them.

    ``metadata_dir`` holds ngclient's trusted metadata (rollback protection lives there: keep it
    across restarts). ``trusted_root`` is the root from enrollment; it is written as
    ``metadata_dir/root.json`` when that is missing and ignored otherwise, because the cached
    root may since have been rotated forward through verified root updates. Downloads land in
    ``download_dir/<name>/<version>/bundle.tar``; partial downloads in ``partial_dir`` (default
    ``download_dir/.partial``). One instance per metadata_dir; its methods are serialized.
    """

    def __init__(
        self,
        metadata_dir: Path,
        download_dir: Path,
        transport: Transport,
        *,
        trusted_root: bytes | None = None,
        config: UpdaterConfig | None = None,
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
        partial_dir: Path | None = None,
    ) -> None:
        self.metadata_dir = Path(metadata_dir)
        self.download_dir = Path(download_dir)
        self.reserve_bytes = reserve_bytes
        self.config = config or UpdaterConfig()
        if not self.config.prefix_targets_with_hash:
            raise ValueError("the hub serves targets by hash-prefixed name: keep it enabled")
        self._fetcher = TransportFetcher(
            transport, Path(partial_dir) if partial_dir else self.download_dir / ".partial"
        )
        self._lock = threading.Lock()
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.download_dir.mkdir(parents=True, exist_ok=True)
        root_path = self.metadata_dir / "root.json"
        if not root_path.exists():  # also true for a dangling root.json symlink
            if trusted_root is None:
                raise VerificationError(
                    f"no trusted root in {self.metadata_dir}: enroll the agent first",
                    reason="no_root",
                )
            _atomic_write(root_path, trusted_root)
        # Load the root now so a corrupt trust anchor fails at startup, not at first update.
        self._new_updater()

    @property
    def fetcher(self) -> TransportFetcher:
        return self._fetcher

    def refresh(self) -> None:
        """Update and verify the top-level metadata (root, timestamp, snapshot, targets)."""
        with self._lock:
            self._refreshed_updater()

    def signed_targets(self) -> dict[str, TargetFile]:
        """Targets (with their signed ``custom`` fields) as of the last successful refresh.

        ngclient writes ``targets.json`` only after verifying it, so this is trusted data.
        """
        try:
            data = (self.metadata_dir / "targets.json").read_bytes()
        except FileNotFoundError:
            return {}
        targets: Metadata[Targets] = Metadata.from_bytes(data)
        return dict(targets.signed.targets)

    def fetch_bundle(self, name: str, version: int) -> Path:
        """Return the local path of the verified bundle tar for ``name`` ``version``.

        Raises ``VerificationError`` (unsigned, tampered, rollback, expired, bad signature...),
        ``ResourceExhaustedError`` (disk), ``TransportUnavailableError`` or the transport's
        own ``protos.errors`` error.
        """
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidRequestError(f"invalid model name {name!r}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidRequestError(f"version must be a positive integer, got {version!r}")
        path = bundle_target_path(name, version)
        label = f"{name}/{version}"
        with self._lock:
            updater = self._refreshed_updater()
            with self._translated(label):
                info = updater.get_targetinfo(path)
            if info is None:
                raise VerificationError(
                    f"model {name} version {version} is not signed by the hub's targets key "
                    f"(no TUF target {path}); refusing to download it",
                    reason="unsigned",
                )
            dest = self.download_dir / name / str(version) / TARGET_FILE_NAME
            cached = updater.find_cached_target(info, str(dest))
            if cached is not None:
                return Path(cached)
            self._check_disk(info, name, version)
            dest.parent.mkdir(parents=True, exist_ok=True)
            # ngclient writes the destination in place; go through a temporary name so dest
            # only ever holds a verified file.
            tmp = dest.with_name(f".{dest.name}.tmp")
            try:
                with self._translated(label, target=info):
                    updater.download_target(info, str(tmp))
                os.replace(tmp, dest)
                _fsync_dir(dest.parent)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            self._discard_part(info)  # verified and copied: the partial is no longer needed
            return dest

    # -- internals ----------------------------------------------------------------------------

    def _new_updater(self) -> Updater:
        with self._translated("the trusted root"):
            # bootstrap=None: trust the cached root.json. It started as the enrollment root and
            # ngclient only ever advances it through roots signed by the previous one.
            return Updater(
                str(self.metadata_dir),
                METADATA_URL,
                str(self.download_dir),
                TARGETS_URL,
                fetcher=self._fetcher,
                config=self.config,
                bootstrap=None,
            )

    def _refreshed_updater(self) -> Updater:
        # An Updater refreshes at most once in its life, so every refresh gets a new one.
        updater = self._new_updater()
        self._fetcher.reset()
        with self._translated("metadata"):
            updater.refresh()
        return updater

    def _part(self, info: TargetFile) -> Path | None:
        sha = info.hashes.get("sha256")
        return self._fetcher.partial_dir / f"{sha}.part" if sha else None

    def _discard_part(self, info: TargetFile) -> None:
        part = self._part(info)
        if part is not None:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()

    def _check_disk(self, info: TargetFile, name: str, version: int) -> None:
        part = self._part(info)
        try:
            have = part.stat().st_size if part is not None else 0
        except FileNotFoundError:
            have = 0
        if have > info.length:
            self._discard_part(info)  # cannot be a prefix of this file
            have = 0
        # Peak use in download_dir: the part file grows to the full length, then the verified
        # copy is written next to it before the part is removed.
        need = (info.length - have) + info.length + self.reserve_bytes
        free = shutil.disk_usage(self.download_dir).free
        if free < need:
            raise ResourceExhaustedError(
                f"not enough disk space to download {name} v{version}: need "
                f"{_mb(need)} MB, {_mb(free)} MB free (bundle {_mb(info.length)} MB, "
                f"{_mb(have)} MB already downloaded, {_mb(self.reserve_bytes)} MB reserve)"
            )

    def _expiry_of(self, role: str) -> str:
        data = self._fetcher.fetched.get(role)
        if data is None:
            with contextlib.suppress(OSError):
                data = (self.metadata_dir / f"{role}.json").read_bytes()
        if data is None:
            return "an unknown time"
        try:
            return Metadata.from_bytes(data).signed.expires.isoformat()
        except DeserializationError:
            return "an unknown time"

    def _role_in(self, text: str) -> str:
        match = _ROLE_IN_TEXT.search(text)
        if match:
            return match.group(1)
        last = self._fetcher.last_metadata
        return _role_of_file(last) if last else "metadata"

    @contextlib.contextmanager
    def _translated(self, what: str, target: TargetFile | None = None) -> Iterator[None]:
        """Turn ngclient's exceptions into ours, with the attack class in plain words."""
        try:
            yield
        except tuf_exc.DownloadLengthMismatchError as exc:
            if target is not None:
                self._discard_part(target)
                raise VerificationError(
                    f"bundle length mismatch for {what}: the hub sent more than the signed "
                    f"{target.length} bytes (endless data attack?); partial download discarded "
                    f"(tuf: {exc})",
                    reason="length",
                ) from exc
            raise VerificationError(
                f"metadata {self._fetcher.last_metadata} is longer than allowed (endless data "
                f"attack?) (tuf: {exc})",
                reason="length",
            ) from exc
        except tuf_exc.DownloadError as exc:
            cause = exc.__cause__
            if isinstance(cause, ModelfleetError):
                # The transport's own error (NOT_FOUND, PERMISSION_DENIED...) says it best.
                raise cause from None
            detail = f" ({cause})" if cause is not None and str(cause) not in str(exc) else ""
            raise TransportUnavailableError(
                f"cannot fetch {what} from the hub: {exc}{detail}"
            ) from exc
        except tuf_exc.LengthOrHashMismatchError as exc:
            text = str(exc)
            kind = "length" if "length" in text.lower() else "hash"
            if target is not None:
                self._discard_part(target)
                raise VerificationError(
                    f"bundle {kind} mismatch for {what}: the downloaded file is not the one the "
                    f"hub signed (tampered or corrupted); partial download discarded (tuf: {text})",
                    reason=kind,
                ) from exc
            role = self._role_in(self._fetcher.last_metadata or text)
            raise VerificationError(
                f"metadata {kind} mismatch for {role}: it is not the file its parent role "
                f"recorded (mix-and-match attack?) (tuf: {text})",
                reason=kind,
            ) from exc
        except tuf_exc.BadVersionNumberError as exc:
            raise VerificationError(_rollback_message(str(exc)), reason="rollback") from exc
        except tuf_exc.ExpiredMetadataError as exc:
            role = self._role_in(str(exc))
            raise VerificationError(
                f"metadata expired (freeze attack?): {role} expired at {self._expiry_of(role)}; "
                f"the hub stopped re-signing it or someone replays old metadata (tuf: {exc})",
                reason="expired",
            ) from exc
        except tuf_exc.UnsignedMetadataError as exc:
            role = self._role_in(str(exc))
            raise VerificationError(
                f"bad signature on {role}: not signed by the key(s) the trusted root names for "
                f"it (forged or replaced metadata?) (tuf: {exc})",
                reason="signature",
            ) from exc
        except DeserializationError as exc:
            raise VerificationError(
                f"malformed {self._role_in(str(exc))} metadata from the hub (tuf: {exc})",
                reason="malformed",
            ) from exc
        except tuf_exc.RepositoryError as exc:
            raise VerificationError(
                f"TUF verification of {what} failed (tuf: {type(exc).__name__}: {exc})",
            ) from exc
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise ResourceExhaustedError(f"disk full while fetching {what}: {exc}") from exc
            raise


_TS_ROLLBACK = re.compile(r"New (\w+) version (\d+) must be >= (\d+)")
_META_ROLLBACK = re.compile(r"New (\w+) version must be >= (\d+), got version (\d+)")


def _rollback_message(text: str) -> str:
    if m := _TS_ROLLBACK.search(text):
        role, got, trusted = m.groups()
    elif m := _META_ROLLBACK.search(text):
        role, trusted, got = m.groups()
    else:
        return f"rollback or mix-and-match attack: inconsistent metadata versions (tuf: {text})"
    return f"rollback attack: {role} version {got} is lower than trusted {trusted} (tuf: {text})"


def _mb(n: int) -> str:
    return f"{n / _MB:.1f}"


__all__ = [
    "DEFAULT_RESERVE_BYTES",
    "METADATA_URL",
    "TARGETS_URL",
    "BundleVerifier",
    "InMemoryTransport",
    "Transport",
    "TransportFetcher",
    "TransportUnavailableError",
    "bundle_target_path",
    "target_sha256",
]
