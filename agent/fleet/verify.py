"""Verify bundles from the hub with python-tuf's ngclient; unpack them in the same pass.

``BundleVerifier.fetch_bundle(name, version)``: a fresh ngclient ``Updater`` refreshes the
metadata (root -> timestamp -> snapshot -> targets, each checked for signatures, versions and
expiry) and looks up the signed target ``<name>/<version>/bundle.tar``. The archive's bytes
are then streamed from the hub, hashed as they arrive and unpacked as they arrive
(``kernel.bundle_stream``): every byte is written once, and the file that lands on disk is the
bundle file itself, not an archive to be copied out later. Only when the archive's length and
every signed hash match (TUF's target check, done here instead of by ``download_target``,
which would re-read the file) is the manifest checked and the directory renamed to
``download_dir/<name>/<version>``. Nothing is loaded before that.

URL scheme. ngclient addresses metadata by URL; ours never reach HTTP. The Updater gets the
metadata base URL ``mf:metadata/``: ``mf:metadata/<file>`` -> ``Transport.fetch_metadata(file)``
with file one of ``N.root.json``, ``timestamp.json``, ``N.snapshot.json``, ``N.targets.json``.
Targets are fetched with ``Transport.fetch_target(path, offset)`` where path is the
consistent-snapshot name ``<name>/<version>/<sha256>.bundle.tar``.

Resumable downloads. The unpacked pieces live in ``partial_dir/<sha256>/`` while they arrive
(flushed per chunk, fsynced every few MiB). After an interruption (lost link, kill -9, power
cut) the next attempt replays them through the hash and the parser, truncates a torn tail and
asks the hub for the rest. The directory is content-addressed, so it can only ever hold a
prefix of that one archive: if the final bytes do not verify it is deleted and the next
attempt starts clean.

Errors: everything that means "do not trust this" becomes ``VerificationError`` naming the
attack class (rollback, freeze, bad signature, hash mismatch, ...) plus ngclient's own text;
transport failures become ``TransportUnavailableError`` (retry later, partial bytes kept) or the
``kernel.errors`` error the transport raised; a full disk is ``ResourceExhaustedError``; a
signed archive that is not a well-formed bundle is ``BundleError``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from queue import Queue
from typing import Any, Protocol

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.api.serialization import DeserializationError
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from modelfleet.agent.fleet.cache import tree_size
from modelfleet.kernel.atomic import atomic_write as _atomic_write
from modelfleet.kernel.bundle import MANIFEST_FILE, NAME_RE, bundle_target_path, publish_unpacked
from modelfleet.kernel.bundle_stream import Buffer, StreamUnpacker
from modelfleet.kernel.errors import (
    BundleError,
    BundleExistsError,
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
DEFAULT_RESERVE_BYTES = 64 << 20
# Chunks in flight between the receiving and the writing thread (1 MiB each from the hub): enough
# to ride out a slow fsync, small enough to bound memory.
WRITE_QUEUE_CHUNKS = 16
WRITE_SLICE_BYTES = 1 << 20
_MB = 1 << 20

# "<sha256>.<basename>": how ngclient names targets under consistent snapshots.
_HASHED_NAME = re.compile(r"([0-9a-f]{64})\.[^/]+")
_ROLE_NAMES = ("root", "timestamp", "snapshot", "targets")
_ROLE_IN_TEXT = re.compile(r"\b(root|timestamp|snapshot|targets)\b")


class TransportUnavailableError(ModelfleetError):
    """The hub could not be reached or the transfer broke off; retry later (partials are kept)."""

    status = Status.UNAVAILABLE
    reason = "transport"


class Transport(Protocol):
    """How the agent gets bytes from the hub (gRPC, MQTT, or in memory for tests).

    Both methods return an iterator of chunks; failures may be raised when called or while
    iterating. Raise ``kernel.errors.ModelNotFoundError`` when the hub does not have the file:
    ngclient probes for ``N+1.root.json`` and must see "not found" to know the root is current.
    Raise other ``kernel.errors`` errors or ``OSError`` for transport failures.
    """

    def fetch_metadata(self, filename: str) -> Iterator[bytes]:
        """The whole metadata file ``filename`` (e.g. ``"3.snapshot.json"``)."""
        ...

    def fetch_target(self, path: str, offset: int) -> Iterator[bytes | memoryview]:
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
    """ngclient fetcher over a :class:`Transport`: metadata only (``mf:metadata/<file>``).

    Targets do not go through ngclient's download path: ``BundleVerifier`` streams them itself
    (hash and unpack as the bytes arrive) with :meth:`guarded` for the same error mapping.
    """

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        # The last metadata file requested and the verified-or-not bytes of each role fetched
        # during this refresh: ngclient's errors do not say which file failed or when it
        # expired, so error messages are completed from these.
        self.last_metadata: str | None = None
        self.fetched: dict[str, bytes] = {}

    def reset(self) -> None:
        self.last_metadata = None
        self.fetched.clear()

    def _fetch(self, url: str) -> Iterator[bytes]:
        if url.startswith(METADATA_URL):
            return self._metadata(url, url[len(METADATA_URL) :])
        raise tuf_exc.DownloadError(f"unsupported URL {url!r}: expected {METADATA_URL}<file>")

    def guarded(self, url: str, open_stream: Callable[[], Iterable[Buffer]]) -> Iterator[Buffer]:
        """Transport errors -> ngclient's download errors (the original kept as __cause__)."""
        try:
            yield from open_stream()
        except ModelNotFoundError as exc:
            # ngclient treats 404 as "no newer root"; anything else is a failed download.
            raise tuf_exc.DownloadHTTPError(f"{url}: {exc}", 404) from exc
        except (ModelfleetError, OSError) as exc:
            raise tuf_exc.DownloadError(f"{url}: {exc}") from exc

    def _metadata(self, url: str, filename: str) -> Iterator[bytes]:
        self.last_metadata = filename
        parts: list[bytes] = []
        for chunk in self.guarded(url, lambda: self.transport.fetch_metadata(filename)):
            parts.append(bytes(chunk))
            yield parts[-1]
        self.fetched[_role_of_file(filename)] = b"".join(parts)


class BundleVerifier:
    """Fetch bundles from the hub and return them only once TUF has verified them.

    ``metadata_dir`` holds ngclient's trusted metadata (rollback protection lives there: keep it
    across restarts). ``trusted_root`` is the root from enrollment; it is written as
    ``metadata_dir/root.json`` when that is missing and ignored otherwise, because the cached
    root may since have been rotated forward through verified root updates. Verified bundles
    are unpacked to ``download_dir/<name>/<version>/``; downloads in progress live in
    ``partial_dir/<sha256>/`` (default ``download_dir/.partial``), which must be on the same
    file system so the finished directory can be renamed into place. One instance per
    metadata_dir; its methods are serialized.
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
        self.transport = transport
        self.partial_dir = Path(partial_dir) if partial_dir else self.download_dir / ".partial"
        self._fetcher = TransportFetcher(transport)
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
        """Return the verified, unpacked bundle directory for ``name`` ``version``.

        Raises ``VerificationError`` (unsigned, tampered, rollback, expired, bad signature...),
        ``BundleError`` (signed but not a well-formed bundle of that name and version),
        ``ResourceExhaustedError`` (disk), ``TransportUnavailableError`` or the transport's
        own ``kernel.errors`` error.
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
            final = self.download_dir / name / str(version)
            if (final / MANIFEST_FILE).exists():
                return final  # verified and unpacked before; loading re-checks its files
            self._check_disk(info, name, version)
            with self._translated(label):
                files = self._download(info, label)
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                publish_unpacked(
                    files,
                    final.parent,
                    expect=(name, version),
                    verify_hashes=False,
                    where=f"bundle {label}",
                )
            except BundleExistsError:
                pass  # the same signed bytes, unpacked by an earlier attempt
            except BundleError:
                self._discard_partial(info)
                raise
            self._discard_partial(info)
            return final

    def _download(self, info: TargetFile, label: str) -> Path:
        """Stream, hash and unpack the target; return the unpacked files once they verify.

        The hashes are TUF's target check (length and every signed hash). They are computed
        here, as the bytes arrive, so the archive is never read back. A stream that is not a
        bundle archive is drained to the end anyway: whether its hash matches tells a tampered
        transfer (``VerificationError``) from a signed but malformed bundle (``BundleError``).
        """
        hashers = {}
        for algorithm in info.hashes:
            try:
                hashers[algorithm] = hashlib.new(algorithm)
            except ValueError:
                raise VerificationError(
                    f"bundle {label} is signed with hash algorithm {algorithm!r}, which this "
                    f"agent cannot compute; refusing it",
                    reason="hash",
                ) from None
        staging = self._staging(info)
        unpacker = StreamUnpacker(staging, where=f"bundle {label}")
        try:

            def rehash(data: bytes) -> None:
                for h in hashers.values():
                    h.update(data)

            offset = unpacker.resume(rehash)
        except BundleError as exc:
            logger.warning("%s; starting the download again", exc)
            offset = info.length + 1  # unusable pieces: start again below
        if offset > info.length:
            unpacker.discard()
            hashers = {alg: hashlib.new(alg) for alg in info.hashes}
            unpacker = StreamUnpacker(staging, where=f"bundle {label}")
            offset = unpacker.resume()
        try:
            malformed = None
            received = offset
            if offset < info.length:
                if offset:
                    logger.info("resuming %s at byte %d of %d", label, offset, info.length)
                try:
                    received, malformed = self._receive(info, label, offset, unpacker, hashers)
                except VerificationError:
                    self._discard_partial(info)
                    raise
            if received != info.length:
                self._discard_partial(info)
                raise VerificationError(
                    f"bundle length mismatch for {label}: the hub sent {received} bytes, the "
                    f"signed length is {info.length}; partial download discarded",
                    reason="length",
                )
            for algorithm, hasher in hashers.items():
                if hasher.hexdigest() != info.hashes[algorithm]:
                    self._discard_partial(info)
                    raise VerificationError(
                        f"bundle hash mismatch for {label}: the downloaded file is not the one "
                        f"the hub signed (tampered or corrupted); partial download discarded "
                        f"({algorithm} {hasher.hexdigest()[:16]}..., signed "
                        f"{info.hashes[algorithm][:16]}...)",
                        reason="hash",
                    )
            if malformed is not None:
                self._discard_partial(info)
                raise malformed
            try:
                return unpacker.finish()
            except BundleError:
                self._discard_partial(info)  # signed but incomplete: retrying cannot help
                raise
        finally:
            unpacker.close()

    def _receive(
        self,
        info: TargetFile,
        label: str,
        offset: int,
        unpacker: StreamUnpacker,
        hashers: Mapping[str, Any],
    ) -> tuple[int, BundleError | None]:
        """Stream the target from ``offset``: hash on this thread, unpack on a writer thread.

        Two threads so that receiving (mostly in gRPC's C core), hashing and writing (both
        release the GIL) overlap. Returns the bytes received in all and the first structural
        error, if the stream is not a bundle archive. Everything received is written (or the
        error recorded) before this returns, so an interruption leaves a resumable prefix.
        """
        # Consistent snapshots: the hub serves the target under "<dir>/<hash>.<basename>", with
        # the first hash listed (as ngclient's own download_target names it).
        digest = next(iter(info.hashes.values()))
        directory, _, basename = info.path.rpartition("/")
        hashed = f"{directory}/{digest}.{basename}" if directory else f"{digest}.{basename}"
        url = f"{TARGETS_URL}{hashed}"
        queue: Queue[Buffer | None] = Queue(maxsize=WRITE_QUEUE_CHUNKS)
        failed: list[BaseException] = []

        def write() -> None:
            while (chunk := queue.get()) is not None:
                if failed:
                    continue  # keep draining: the receiver must never block on a full queue
                try:
                    unpacker.write(chunk)
                except BaseException as exc:  # handed to the receiving thread
                    failed.append(exc)
            if not failed:
                try:
                    unpacker.flush()
                except BaseException as exc:  # handed to the receiving thread
                    failed.append(exc)

        writer = threading.Thread(target=write, name="bundle-writer", daemon=True)
        writer.start()
        received = offset
        chunks = self._fetcher.guarded(url, lambda: self.transport.fetch_target(hashed, offset))
        try:
            for chunk in chunks:
                received += len(chunk)
                if received > info.length:
                    raise VerificationError(
                        f"bundle length mismatch for {label}: the hub sent "
                        f"more than the signed {info.length} bytes (endless data attack?); "
                        f"partial download discarded",
                        reason="length",
                    )
                for hasher in hashers.values():
                    hasher.update(chunk)
                if failed and not isinstance(failed[0], BundleError):
                    break  # a local failure (disk full...): no point receiving more
                # Slices (views, no copies) keep the queue's bound in bytes whatever size of
                # message the hub chooses to send.
                view = memoryview(chunk)
                for start in range(0, len(view), WRITE_SLICE_BYTES):
                    queue.put(view[start : start + WRITE_SLICE_BYTES])
        finally:
            try:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()  # stop the transport stream now, not at garbage collection
            finally:
                queue.put(None)
                writer.join()
        error = failed[0] if failed else None
        if error is not None and not isinstance(error, BundleError):
            raise error
        return received, error

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

    def _staging(self, info: TargetFile) -> Path:
        return self.partial_dir / next(iter(info.hashes.values()))

    def _discard_partial(self, info: TargetFile) -> None:
        shutil.rmtree(self._staging(info), ignore_errors=True)

    def _check_disk(self, info: TargetFile, name: str, version: int) -> None:
        have = tree_size(self._staging(info))
        if have > info.length:
            self._discard_partial(info)  # cannot be a prefix of this archive
            have = 0
        # The archive is unpacked as it arrives: the bundle files take about its length (less
        # the headers) and nothing is copied afterwards.
        need = (info.length - have) + self.reserve_bytes
        free = shutil.disk_usage(
            self.partial_dir if self.partial_dir.exists() else self.download_dir
        ).free
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
    def _translated(self, what: str) -> Iterator[None]:
        """Turn ngclient's and the transport's exceptions into ours, in plain words.

        Bundle bytes are checked by ``_download`` itself, which raises ``VerificationError``
        directly; what arrives here about lengths and hashes concerns metadata.
        """
        try:
            yield
        except tuf_exc.DownloadLengthMismatchError as exc:
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
    "target_sha256",
]
