"""The hub's TUF repository: signing keys, signed metadata on disk, the offline targets-key flow.

Every published bundle is one TUF target, an uncompressed tar of the bundle directory, at the
target path ``<name>/<version>/bundle.tar`` with ``custom = {"name", "version",
"manifest_sha256", ...}``. Agents verify it with python-tuf's ngclient (see
``agent/fleet/verify.py``) before anything is unpacked or loaded.

Layout of ``metadata_dir`` (consistent snapshots, so nothing a client may still be reading is
ever overwritten):

- ``N.root.json`` for every root version and ``root.json``, a copy of the latest;
- ``N.targets.json``, ``N.snapshot.json`` for every version; ``timestamp.json``, the latest;
- ``staged/targets.json``: targets metadata waiting for the offline targets key (see
  :meth:`TufRepository.stage_target`);
- ``.lock``: taken with ``flock`` around every write.

When publishing, ``timestamp.json`` is written last and is the commit point: it names the
snapshot, which names the targets version. A crash in between leaves an unreferenced newer file
that the next write overwrites. (``create`` writes ``root.json`` last instead: it marks a
complete repository.)

Keys are Ed25519, one per role, stored as unencrypted PEM PKCS#8 files ``<role>.pem`` with mode
0600. Snapshot and timestamp keys are online (the hub re-signs them on its own, see
:meth:`TufRepository.refresh_online`). Root and targets keys may be kept offline: then publishing
is two-step (stage, sign elsewhere with :func:`sign_staged`, commit).

Concurrency: the hub is one process, but an operator CLI may commit a staged targets file while
it runs. So writes hold a thread lock and an exclusive ``flock`` on ``metadata_dir/.lock``, and
every operation first reloads the in-memory state if ``timestamp.json`` or ``root.json`` changed
on disk.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Key, Signature, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from modelfleet.kernel.atomic import atomic_write as _atomic_write
from modelfleet.kernel.bundle import TARGET_FILE_NAME
from modelfleet.kernel.errors import (
    BundleExistsError,
    InvalidRequestError,
    ModelfleetError,
    ModelNotFoundError,
    Status,
    VerificationError,
)

logger = logging.getLogger(__name__)

ROLES = ("root", "targets", "snapshot", "timestamp")
# Roles whose private key may live off the hub; the other two must be online.
OFFLINE_CAPABLE_ROLES = ("root", "targets")
PUBLIC_KEYS_FILE = "public.json"
# keys/root-anchor.json: the SHA-256 of 1.root.json, written when the repository is created (or
# first opened by this version): the hub's own trust anchor, outside the metadata directory.
ROOT_ANCHOR_FILE = "root-anchor.json"
STAGED_DIR = "staged"
_LOCK_FILE = ".lock"
_DAY = 86400.0

# The only metadata names ngclient asks for with consistent snapshots (and root.json for
# enrollment). Anything else is not ours to serve.
_SERVED_NAME = re.compile(r"(?:root|timestamp)\.json|[1-9][0-9]*\.(?:root|snapshot|targets)\.json")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class TufSetupError(ModelfleetError):
    """The repository or its keys are missing, mismatched or in the wrong state."""

    status = Status.FAILED_PRECONDITION
    reason = "tuf_setup"


class TargetsKeyRequiredError(TufSetupError):
    """The targets key is offline: use stage_target() + sign_staged() + commit_staged_targets()."""

    reason = "targets_key_offline"


class AlreadyInitializedError(ModelfleetError):
    """Keys or metadata already exist; we never overwrite key material or a repository."""

    status = Status.ALREADY_EXISTS
    reason = "tuf_exists"


@dataclass(frozen=True)
class ExpiryPolicy:
    """Lifetime of each role's metadata, in seconds.

    Defaults: root 365 days, targets 365 days (both may be signed offline, so they must last),
    snapshot 7 days, timestamp 1 day. The timestamp lifetime bounds how long an attacker can
    freeze an agent on old metadata; the hub re-signs timestamp and snapshot when less than half
    of their lifetime remains (:meth:`TufRepository.refresh_online`), so schedule that at least
    every ``timestamp / 4`` seconds.
    """

    root: float = 365 * _DAY
    targets: float = 365 * _DAY
    snapshot: float = 7 * _DAY
    timestamp: float = 1 * _DAY

    def __post_init__(self) -> None:
        for role in ROLES:
            seconds = self.seconds(role)
            if not seconds > 0:
                raise InvalidRequestError(f"expiry for {role} must be > 0 s, got {seconds}")

    def seconds(self, role: str) -> float:
        return float(getattr(self, role))


# ---------------------------------------------------------------------------------------------
# Files


def _mkdir_private(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


# ---------------------------------------------------------------------------------------------
# Keys


def init_keys(keys_dir: Path, offline_dir: Path | None = None) -> dict[str, str]:
    """Create one Ed25519 key per role; return ``{role: keyid}``.

    Private keys go to ``<dir>/<role>.pem`` (mode 0600). With ``offline_dir``, the root and
    targets private keys are written there instead of ``keys_dir``, for the operator to move off
    the hub. ``keys_dir/public.json`` always holds all four public keys, which is what
    :meth:`TufRepository.create` needs when the root and targets keys are not on the hub.

    Refuses (``AlreadyInitializedError``) if any of the files already exists: overwriting a key
    would orphan every agent that trusts it.
    """
    keys_dir = Path(keys_dir)
    offline = Path(offline_dir) if offline_dir is not None else None
    destinations = {
        role: (offline if offline is not None and role in OFFLINE_CAPABLE_ROLES else keys_dir)
        / f"{role}.pem"
        for role in ROLES
    }
    candidates = [*destinations.values(), keys_dir / PUBLIC_KEYS_FILE]
    if offline is not None:
        # A stale online copy of an offline-capable key would defeat the point of moving it.
        candidates += [keys_dir / f"{role}.pem" for role in OFFLINE_CAPABLE_ROLES]
    existing = sorted({str(p) for p in candidates if p.exists()})
    if existing:
        raise AlreadyInitializedError(
            f"refusing to overwrite existing key material: {', '.join(existing)}"
        )
    _mkdir_private(keys_dir)
    if offline is not None:
        _mkdir_private(offline)
    signers = {role: CryptoSigner.generate_ed25519() for role in ROLES}
    for role, path in destinations.items():
        _atomic_write(path, signers[role].private_bytes, 0o600)
    public = {
        role: {"keyid": s.public_key.keyid, "key": s.public_key.to_dict()}
        for role, s in signers.items()
    }
    _atomic_write(
        keys_dir / PUBLIC_KEYS_FILE, (json.dumps(public, indent=2, sort_keys=True) + "\n").encode()
    )
    return {role: s.public_key.keyid for role, s in signers.items()}


def load_signer(key_path: Path) -> CryptoSigner:
    """Load an Ed25519 PEM PKCS#8 private key file as a signer."""
    key_path = Path(key_path)
    try:
        pem = key_path.read_bytes()
        mode = key_path.stat().st_mode
    except FileNotFoundError:
        raise TufSetupError(f"signing key {key_path} does not exist") from None
    except OSError as exc:
        raise TufSetupError(f"cannot read signing key {key_path}: {exc}") from None
    if mode & 0o077:
        logger.warning("signing key %s is readable by group/others (mode %o)", key_path, mode)
    try:
        private = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TufSetupError(f"{key_path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise TufSetupError(f"{key_path} is not an Ed25519 key")
    return CryptoSigner(private)


def load_public_keys(keys_dir: Path) -> dict[str, Key]:
    """The four public keys written by :func:`init_keys` (``{}`` when public.json is absent)."""
    path = Path(keys_dir) / PUBLIC_KEYS_FILE
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise TufSetupError(f"cannot read {path}: {exc}") from None
    try:
        # from_dict consumes its argument: hand it a copy.
        return {role: Key.from_dict(raw[role]["keyid"], dict(raw[role]["key"])) for role in raw}
    except (KeyError, TypeError, ValueError) as exc:
        raise TufSetupError(f"{path} is malformed: {exc}") from None


def set_public_key(keys_dir: Path, role: str, key: Key) -> None:
    """Record ``role``'s new public key in ``keys_dir/public.json`` (after a rotation)."""
    path = Path(keys_dir) / PUBLIC_KEYS_FILE
    try:
        public = json.loads(path.read_bytes())
    except FileNotFoundError:
        public = {}
    except (OSError, ValueError) as exc:
        raise TufSetupError(f"cannot read {path}: {exc}") from None
    public[role] = {"keyid": key.keyid, "key": key.to_dict()}
    _atomic_write(path, (json.dumps(public, indent=2, sort_keys=True) + "\n").encode())


def sign_staged(payload: bytes, key_path: Path) -> dict[str, str]:
    """Sign a staged targets payload with the (offline) targets key; the CLI's half of the flow.

    Returns the securesystemslib signature dict ``{"keyid": ..., "sig": ...}`` that
    :meth:`TufRepository.commit_staged_targets` expects.
    """
    return load_signer(key_path).sign(payload).to_dict()


def _optional_signer(path: Path) -> CryptoSigner | None:
    return load_signer(path) if path.exists() else None


# ---------------------------------------------------------------------------------------------
# Repository


def _validate_target(path: str, length: int, sha256: str, custom: Mapping[str, Any]) -> TargetFile:
    parts = path.split("/")
    if (
        not path
        or "\\" in path
        or any(p in ("", ".", "..") for p in parts)
        or any(ch.isspace() for ch in path)
    ):
        raise InvalidRequestError(f"invalid TUF target path {path!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise InvalidRequestError(f"target length must be a non-negative integer, got {length!r}")
    if not isinstance(sha256, str) or not _SHA256_HEX.fullmatch(sha256):
        raise InvalidRequestError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
    if not isinstance(custom, Mapping):
        raise InvalidRequestError("custom must be a mapping")
    custom = dict(custom)
    # For bundle paths the signed custom fields must agree with the path agents look up.
    if len(parts) == 3 and parts[2] == TARGET_FILE_NAME:
        if "name" in custom and custom["name"] != parts[0]:
            raise InvalidRequestError(f"custom name {custom['name']!r} does not match {path!r}")
        if "version" in custom and str(custom["version"]) != parts[1]:
            raise InvalidRequestError(
                f"custom version {custom['version']!r} does not match {path!r}"
            )
    try:
        json.dumps(custom)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"custom is not JSON-serializable: {exc}") from None
    return TargetFile(length, {"sha256": sha256}, path, {"custom": custom})


def _meta_for(version: int, data: bytes) -> MetaFile:
    # Length and hash let clients reject oversized or swapped files before parsing them.
    return MetaFile(version, length=len(data), hashes={"sha256": _sha256(data)})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def last_signed_path(key_path: Path) -> Path:
    """Where the signing CLI remembers what this targets key signed last (beside the key)."""
    key_path = Path(key_path)
    return key_path.with_name(key_path.name + ".last-signed.json")


def load_last_signed(key_path: Path) -> tuple[int, str] | None:
    path = last_signed_path(key_path)
    try:
        raw = json.loads(path.read_bytes())
        return int(raw["version"]), str(raw["sha256"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VerificationError(
            f"cannot read {path} ({exc}): it records the last targets this key signed; restore "
            "it, or delete it to trust the hub's current targets once",
            reason="signing_state",
        ) from None


def save_last_signed(key_path: Path, version: int, payload: bytes) -> None:
    digest = hashlib.sha256(payload).hexdigest()
    data = json.dumps({"version": version, "sha256": digest}) + "\n"
    _atomic_write(last_signed_path(key_path), data.encode(), 0o600)


class RepositoryIntegrityError(ModelfleetError):
    """The metadata on the hub's disk does not verify: it was tampered with or damaged.

    The hub refuses to serve it or to sign anything on top of it; an operator must restore the
    metadata directory from a backup (docs/operations.md) or find out who wrote it.
    """

    status = Status.FAILED_PRECONDITION
    reason = "repository_integrity"


# Bounds the root-chain walk: each root version is one signed rotation, far below this.
_MAX_ROOT_VERSIONS = 100_000


def _read_metadata(metadata_dir: Path, name: str) -> bytes:
    try:
        return (metadata_dir / name).read_bytes()
    except FileNotFoundError:
        raise RepositoryIntegrityError(f"{metadata_dir / name} is missing") from None
    except OSError as exc:
        raise RepositoryIntegrityError(f"cannot read {metadata_dir / name}: {exc}") from None


def _parse(data: bytes, name: str) -> Metadata[Any]:
    try:
        return Metadata.from_bytes(data)
    except Exception as exc:  # python-tuf raises several families for malformed input
        raise RepositoryIntegrityError(f"{name} is not valid TUF metadata: {exc}") from None


def _verify_role(delegator: Root, role: str, md: Metadata[Any], name: str) -> None:
    if md.signed.type != role:
        raise RepositoryIntegrityError(f"{name} holds {md.signed.type} metadata, not {role}")
    try:
        delegator.verify_delegate(role, md.signed_bytes, md.signatures)
    except UnsignedMetadataError as exc:
        raise RepositoryIntegrityError(
            f"{name} is not signed by the {role} key(s) that root v{delegator.version} trusts "
            f"({exc})"
        ) from None


def _verify_meta(meta: MetaFile, data: bytes, name: str, referrer: str) -> None:
    try:
        meta.verify_length_and_hashes(data)
    except Exception as exc:
        raise RepositoryIntegrityError(
            f"{name} does not match the length/hashes {referrer} signed for it ({exc})"
        ) from None


@dataclass
class VerifiedRepository:
    root: Metadata[Root]
    timestamp: Metadata[Timestamp]
    snapshot: Metadata[Snapshot]
    targets: Metadata[Targets]
    # Every file that was verified, by the name agents ask for: what the hub serves and signs
    # on top of, so that a file replaced on disk after verification is never used.
    files: dict[str, bytes]


def verify_repository(
    metadata_dir: Path,
    *,
    trusted_root: bytes | None = None,
    anchor_sha256: str | None = None,
) -> VerifiedRepository:
    """Verify the metadata on disk the way an agent does.

    The root chain starts from ``trusted_root`` (the root the caller already trusts; its
    ``N.root.json`` on disk must be unchanged) or else from ``1.root.json``, whose SHA-256 must
    be ``anchor_sha256`` when given: a whole chain swapped on disk, signed by other keys, does
    not verify. Each newer root must be signed by the previous root's keys and its own;
    ``root.json`` must be the last of them (or, after a key rotation cut short, an earlier
    one: the chain's tail wins). Then timestamp -> snapshot -> targets must each be signed by
    the keys root names and match the version, length and hashes the role above signed for it.
    Expiry is not checked: the hub re-signs what expires. Raises
    :class:`RepositoryIntegrityError` naming the first file that does not verify.
    """
    metadata_dir = Path(metadata_dir)
    files: dict[str, bytes] = {}
    if trusted_root is not None:
        root: Metadata[Root] = _parse(trusted_root, "the trusted root")
        name = f"{root.signed.version}.root.json"
        if _read_metadata(metadata_dir, name) != trusted_root:
            raise RepositoryIntegrityError(f"{name} was changed on disk after it was verified")
        root_bytes = trusted_root
    else:
        root_bytes = _read_metadata(metadata_dir, "1.root.json")
        if anchor_sha256 is not None and hashlib.sha256(root_bytes).hexdigest() != anchor_sha256:
            raise RepositoryIntegrityError(
                "1.root.json is not the root this hub was created with (its sha256 differs from "
                f"the one recorded in keys/{ROOT_ANCHOR_FILE}): the metadata was replaced"
            )
        root = _parse(root_bytes, "1.root.json")
        _verify_role(root.signed, "root", root, "1.root.json")
        if root.signed.version != 1:
            raise RepositoryIntegrityError(f"1.root.json holds root v{root.signed.version}")
    files[f"{root.signed.version}.root.json"] = root_bytes
    for n in range(root.signed.version + 1, _MAX_ROOT_VERSIONS):
        name = f"{n}.root.json"
        if not (metadata_dir / name).exists():
            break
        data = _read_metadata(metadata_dir, name)
        new: Metadata[Root] = _parse(data, name)
        _verify_role(root.signed, "root", new, name)
        _verify_role(new.signed, "root", new, name)
        if new.signed.version != n:
            raise RepositoryIntegrityError(f"{name} holds root v{new.signed.version}")
        root, root_bytes = new, data
        files[name] = data
    latest = _read_metadata(metadata_dir, "root.json")
    if latest != root_bytes and latest not in files.values():
        raise RepositoryIntegrityError(
            f"root.json is not a root of the verified chain (v1..v{root.signed.version})"
        )
    if latest != root_bytes:
        logger.warning(
            "root.json lags %d.root.json (a key rotation cut short?); using root v%d",
            root.signed.version,
            root.signed.version,
        )
    files["root.json"] = root_bytes
    ts_bytes = _read_metadata(metadata_dir, "timestamp.json")
    timestamp: Metadata[Timestamp] = _parse(ts_bytes, "timestamp.json")
    _verify_role(root.signed, "timestamp", timestamp, "timestamp.json")
    files["timestamp.json"] = ts_bytes
    snapshot_meta = timestamp.signed.snapshot_meta
    name = f"{snapshot_meta.version}.snapshot.json"
    data = _read_metadata(metadata_dir, name)
    _verify_meta(snapshot_meta, data, name, "timestamp.json")
    snapshot: Metadata[Snapshot] = _parse(data, name)
    _verify_role(root.signed, "snapshot", snapshot, name)
    if snapshot.signed.version != snapshot_meta.version:
        raise RepositoryIntegrityError(f"{name} holds snapshot v{snapshot.signed.version}")
    files[name] = data
    targets_meta = snapshot.signed.meta.get("targets.json")
    if targets_meta is None:
        raise RepositoryIntegrityError(f"{name} does not list targets.json")
    tname = f"{targets_meta.version}.targets.json"
    data = _read_metadata(metadata_dir, tname)
    _verify_meta(targets_meta, data, tname, name)
    targets: Metadata[Targets] = _parse(data, tname)
    _verify_role(root.signed, "targets", targets, tname)
    if targets.signed.version != targets_meta.version:
        raise RepositoryIntegrityError(f"{tname} holds targets v{targets.signed.version}")
    files[tname] = data
    return VerifiedRepository(root, timestamp, snapshot, targets, files)


def target_differences(old: Targets, new: Targets) -> list[str]:
    """What ``new`` removes from or changes in ``old``'s targets, one line each."""
    problems = []
    for path, before in sorted(old.targets.items()):
        after = new.targets.get(path)
        if after is None:
            problems.append(f"{path} is removed")
        elif after.length != before.length or after.hashes != before.hashes:
            problems.append(
                f"{path} changes from sha256 {before.hashes.get('sha256', '?')[:16]} "
                f"({before.length} bytes) to sha256 {after.hashes.get('sha256', '?')[:16]} "
                f"({after.length} bytes)"
            )
        elif after.to_dict() != before.to_dict():
            problems.append(
                f"{path} changes its custom fields from {before.custom} to {after.custom}"
            )
    return problems


def _check_successor(old: Targets, new: Targets, what: str) -> None:
    """Published targets are immutable and versions never go back."""
    if new.version < old.version:
        raise RepositoryIntegrityError(
            f"{what} (targets v{new.version}) is older than the targets v{old.version} already "
            "verified: a rollback"
        )
    problems = target_differences(old, new)
    if problems:
        raise RepositoryIntegrityError(
            f"{what} (targets v{new.version}) changes published targets: {'; '.join(problems)}"
        )


def _targets_from_payload(payload: bytes) -> Metadata[Targets]:
    """Targets metadata (unsigned) from the canonical bytes of its "signed" part."""
    try:
        md: Metadata[Targets] = Metadata.from_dict(
            {"signed": json.loads(payload), "signatures": []}
        )
    except Exception as exc:  # malformed JSON or metadata: python-tuf raises several kinds
        raise InvalidRequestError(f"the signed payload is not targets metadata: {exc}") from None
    if md.signed.type != "targets":
        raise InvalidRequestError(f"the signed payload is {md.signed.type}, not targets")
    if md.signed_bytes != payload:
        raise InvalidRequestError("the signed payload is not canonical JSON: sign what was staged")
    return md


@dataclass(frozen=True)
class ExpectedTarget:
    """The one target a key holder means to sign: what they built, not what the hub says."""

    path: str
    sha256: str
    length: int | None = None  # None: `sign` without the archive; the hash pins the content
    manifest_sha256: str | None = None


# Targets metadata signed for longer than this is refused at signing: a hub asking for a
# far-future expiry would be asking for a signature that outlives key rotation.
MAX_SIGNED_TARGETS_LIFETIME_S = 2 * 366 * _DAY


def check_signing_request(
    payload: bytes,
    base: bytes,
    key: Key,
    expected: ExpectedTarget,
    *,
    allow_extra: Iterable[str] = (),
    now: float | None = None,
    last_signed: tuple[int, str] | None = None,
) -> tuple[Metadata[Targets], list[str]]:
    """Decide, on the key holder's machine, whether ``payload`` may be signed with ``key``.

    The hub is not trusted here. ``base`` must be targets metadata that carries a valid
    signature by ``key`` itself (the last targets this key signed, as far as we can know), and
    ``payload`` must be exactly ``base`` plus ``expected``, as the next version: no published
    target removed or changed (never allowed), no other new target unless its path is in
    ``allow_extra``, no other field changed. ``last_signed`` is (version, sha256 of the signed
    part) of the targets this key holder signed last, kept beside the key: a base older than
    that, or another file of that version, is a fork the hub offers and is refused. Returns
    the parsed targets and one line per accepted extra target; raises ``VerificationError``
    listing every difference otherwise.
    """
    try:
        base_md: Metadata[Any] = Metadata.from_bytes(base)
    except Exception as exc:
        raise VerificationError(
            f"the hub sent no valid published targets to check against: {exc}",
            reason="signing_base",
        ) from None
    if base_md.signed.type != "targets":
        raise VerificationError("the hub sent no targets metadata to check against")
    sig = base_md.signatures.get(key.keyid)
    valid = sig is not None
    if sig is not None:
        try:
            key.verify_signature(sig, base_md.signed_bytes)
        except Exception:
            valid = False
    if not valid:
        raise VerificationError(
            f"the hub's published targets v{base_md.signed.version} is not signed by this targets "
            f"key (keyid {key.keyid[:16]}): the hub's metadata may have been forged, or this "
            "is not the key root trusts. Nothing was signed; check the hub "
            "(docs/security.md, 'What attacks look like')",
            reason="signing_base",
        )
    old: Targets = base_md.signed
    if last_signed is not None:
        version, digest = last_signed
        if old.version < version or (
            old.version == version and hashlib.sha256(base_md.signed_bytes).hexdigest() != digest
        ):
            raise VerificationError(
                f"the hub offers targets v{old.version} as the published targets, but this key "
                f"last signed targets v{version} (sha256 {digest[:16]}): the hub's metadata was "
                "rolled back or forked. Nothing was signed; check the hub (docs/security.md)",
                reason="signing_base",
            )
    new = _targets_from_payload(payload)
    problems: list[str] = []
    if new.signed.version != old.version + 1:
        problems.append(
            f"it is targets v{new.signed.version}, the next version after v{old.version} "
            f"is v{old.version + 1}"
        )
    problems += target_differences(old, new.signed)
    mine = new.signed.targets.get(expected.path)
    if mine is None:
        problems.append(f"it does not contain {expected.path}")
    else:
        if mine.hashes != {"sha256": expected.sha256}:
            problems.append(
                f"{expected.path} has hashes {mine.hashes}, you built sha256 {expected.sha256}"
            )
        if expected.length is not None and mine.length != expected.length:
            problems.append(
                f"{expected.path} is {mine.length} bytes, you built {expected.length} bytes"
            )
        custom = mine.custom
        name, _, rest = expected.path.partition("/")
        version_text = rest.partition("/")[0]
        if custom.get("name", name) != name or (
            str(custom.get("version", version_text)) != version_text
        ):
            problems.append(f"{expected.path} carries custom fields for another model: {custom}")
        if (
            expected.manifest_sha256 is not None
            and custom.get("manifest_sha256", expected.manifest_sha256) != expected.manifest_sha256
        ):
            problems.append(f"{expected.path} carries another manifest_sha256: {custom}")
    allowed = set(allow_extra)
    extras: list[str] = []
    for path, target in sorted(new.signed.targets.items()):
        if path in old.targets or path == expected.path:
            continue
        line = (
            f"{path}: sha256 {target.hashes.get('sha256', '?')}, {target.length} bytes, "
            f"custom {target.custom}"
        )
        if path in allowed:
            extras.append(line)
        else:
            problems.append(f"it also adds {line} (pass --allow-extra {path} to sign it too)")
    before, after = old.to_dict(), new.signed.to_dict()
    for field in sorted((set(before) | set(after)) - {"version", "expires", "targets"}):
        if before.get(field) != after.get(field):
            problems.append(f"it changes the field {field!r}")
    t = time.time() if now is None else now
    lifetime = new.signed.expires.timestamp() - t
    if not 0 < lifetime <= MAX_SIGNED_TARGETS_LIFETIME_S:
        problems.append(f"it expires at {new.signed.expires.isoformat()}, outside now..now+2y")
    if problems:
        raise VerificationError(
            "refusing to sign what the hub staged: " + "; ".join(problems), reason="signing_diff"
        )
    return new, extras


class TufRepository:
    """The hub's TUF metadata on disk. Use :meth:`create` or :meth:`open`.

    Thread-safe; writes are also serialized across processes with ``flock``.
    """

    def __init__(
        self,
        metadata_dir: Path,
        keys_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        expiry: ExpiryPolicy | None = None,
    ) -> None:
        self.metadata_dir = Path(metadata_dir)
        self.keys_dir = Path(keys_dir)
        self._clock = clock
        self._expiry = expiry or ExpiryPolicy()
        self._lock = threading.RLock()
        self._state_key: tuple[Any, ...] | None = None
        self._refused: tuple[Any, ...] | None = None
        self._refused_error: RepositoryIntegrityError | None = None
        # The bytes of every verified file agents may ask for: served and signed over from
        # here, never re-read from disk.
        self._files: dict[str, bytes] = {}
        self._anchor = _load_anchor(self.keys_dir)
        self._root: Metadata[Root]
        self._targets: Metadata[Targets]
        self._snapshot: Metadata[Snapshot]
        self._timestamp: Metadata[Timestamp]
        with self._lock:
            self._sync()
        if self._anchor is None:
            # First open (a repository from before the anchor, or just created): what verified
            # now becomes the anchor.
            self._anchor = (
                hashlib.sha256(self._files["1.root.json"]).hexdigest()
                if ("1.root.json" in self._files)
                else None
            )
            if self._anchor is not None:
                _atomic_write(
                    self.keys_dir / ROOT_ANCHOR_FILE,
                    (json.dumps({"1.root.json": {"sha256": self._anchor}}) + "\n").encode(),
                )
        self._snapshot_signer: Signer = load_signer(self.keys_dir / "snapshot.pem")
        self._timestamp_signer: Signer = load_signer(self.keys_dir / "timestamp.pem")
        self._targets_signer: Signer | None = _optional_signer(self.keys_dir / "targets.pem")
        self._check_signer(self._snapshot_signer, "snapshot")
        self._check_signer(self._timestamp_signer, "timestamp")
        if self._targets_signer is not None:
            self._check_signer(self._targets_signer, "targets")

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        metadata_dir: Path,
        keys_dir: Path,
        *,
        root_signer: Signer | None = None,
        targets_signer: Signer | None = None,
        clock: Callable[[], float] = time.time,
        expiry: ExpiryPolicy | None = None,
    ) -> TufRepository:
        """Write root v1, an empty targets v1, snapshot v1 and timestamp v1.

        Root and targets signers are read from ``keys_dir`` when their files are there, else
        they must be passed (the CLI loads them from the offline location). Passed signers are
        used for this call only and are not kept.
        """
        metadata_dir = Path(metadata_dir)
        keys_dir = Path(keys_dir)
        expiry = expiry or ExpiryPolicy()
        # root.json is written last, so it marks a complete repository; leftovers of a create()
        # that crashed half-way are simply overwritten.
        if (metadata_dir / "root.json").exists():
            raise AlreadyInitializedError(f"{metadata_dir} already holds a TUF repository")
        root_signer = root_signer or _optional_signer(keys_dir / "root.pem")
        targets_signer = targets_signer or _optional_signer(keys_dir / "targets.pem")
        if root_signer is None or targets_signer is None:
            missing = [
                r for r, s in (("root", root_signer), ("targets", targets_signer)) if s is None
            ]
            raise TufSetupError(
                f"creating the repository needs the {' and '.join(missing)} private key(s): "
                f"they are not in {keys_dir}, pass them (loaded from the offline copy)"
            )
        signers: dict[str, Signer] = {
            "root": root_signer,
            "targets": targets_signer,
            "snapshot": load_signer(keys_dir / "snapshot.pem"),
            "timestamp": load_signer(keys_dir / "timestamp.pem"),
        }
        published = load_public_keys(keys_dir)
        for role, signer in signers.items():
            if role in published and published[role].keyid != signer.public_key.keyid:
                raise TufSetupError(
                    f"the {role} private key (keyid {signer.public_key.keyid[:16]}) does not "
                    f"match {keys_dir / PUBLIC_KEYS_FILE} ({published[role].keyid[:16]})"
                )
        metadata_dir.mkdir(parents=True, exist_ok=True)
        now = clock()

        def expires(role: str) -> _dt.datetime:
            return _dt.datetime.fromtimestamp(now + expiry.seconds(role), tz=_dt.UTC)

        root = Root(version=1, expires=expires("root"), consistent_snapshot=True)
        for role, signer in signers.items():
            root.add_key(signer.public_key, role)
        root_md = Metadata(root)
        root_md.sign(signers["root"])
        targets_md = Metadata(Targets(version=1, expires=expires("targets")))
        targets_md.sign(signers["targets"])
        targets_bytes = targets_md.to_bytes()
        snapshot_md = Metadata(
            Snapshot(
                version=1,
                expires=expires("snapshot"),
                meta={"targets.json": _meta_for(1, targets_bytes)},
            )
        )
        snapshot_md.sign(signers["snapshot"])
        snapshot_bytes = snapshot_md.to_bytes()
        timestamp_md = Metadata(
            Timestamp(
                version=1,
                expires=expires("timestamp"),
                snapshot_meta=_meta_for(1, snapshot_bytes),
            )
        )
        timestamp_md.sign(signers["timestamp"])
        with _flock(metadata_dir):
            root_bytes = root_md.to_bytes()
            _atomic_write(metadata_dir / "1.targets.json", targets_bytes)
            _atomic_write(metadata_dir / "1.snapshot.json", snapshot_bytes)
            _atomic_write(metadata_dir / "1.root.json", root_bytes)
            _atomic_write(metadata_dir / "timestamp.json", timestamp_md.to_bytes())
            # Last: root.json is what callers (and the check above) take as "initialized".
            _atomic_write(metadata_dir / "root.json", root_bytes)
        return cls(metadata_dir, keys_dir, clock=clock, expiry=expiry)

    @classmethod
    def open(
        cls,
        metadata_dir: Path,
        keys_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        expiry: ExpiryPolicy | None = None,
    ) -> TufRepository:
        """Open an existing repository; the snapshot and timestamp keys must be in keys_dir."""
        return cls(metadata_dir, keys_dir, clock=clock, expiry=expiry)

    # -- reading ------------------------------------------------------------------------------

    def read(self, filename: str) -> bytes:
        """A metadata file by the name ngclient asks for (``root.json``, ``3.snapshot.json``...).

        Raises ``InvalidRequestError`` for names that try to leave the directory and
        ``ModelNotFoundError`` for anything that is not (or not yet) published metadata.
        """
        if not filename or "/" in filename or "\\" in filename or ".." in filename:
            raise InvalidRequestError(f"invalid metadata file name {filename!r}")
        if not _SERVED_NAME.fullmatch(filename):
            raise ModelNotFoundError(f"no TUF metadata named {filename!r}")
        with self._lock:
            # A repository that stopped verifying is not served (agents would refuse it too,
            # but an operator should see the hub say so, not a fleet of verification errors).
            self._sync()
            verified = self._files.get(filename)
        if verified is not None:
            return verified
        try:
            return (self.metadata_dir / filename).read_bytes()
        except FileNotFoundError:
            raise ModelNotFoundError(f"no TUF metadata named {filename!r} on this hub") from None

    def root_bytes(self) -> bytes:
        """The latest signed root: the trust anchor handed to agents at enrollment."""
        return self.read("root.json")

    def target(self, path: str) -> TargetFile | None:
        with self._lock:
            self._sync()
            return self._targets.signed.targets.get(path)

    def targets(self) -> dict[str, TargetFile]:
        with self._lock:
            self._sync()
            return dict(self._targets.signed.targets)

    def versions(self) -> dict[str, int]:
        """Current version of each role's metadata (for status pages and logs)."""
        with self._lock:
            self._sync()
            return {
                "root": self._root.signed.version,
                "targets": self._targets.signed.version,
                "snapshot": self._snapshot.signed.version,
                "timestamp": self._timestamp.signed.version,
            }

    def expires(self) -> dict[str, _dt.datetime]:
        with self._lock:
            self._sync()
            return {
                "root": self._root.signed.expires,
                "targets": self._targets.signed.expires,
                "snapshot": self._snapshot.signed.expires,
                "timestamp": self._timestamp.signed.expires,
            }

    def published_targets_bytes(self) -> bytes:
        """The signed targets metadata agents get now (what a staged payload builds on)."""
        with self._lock:
            self._sync()
            return self._files[f"{self._targets.signed.version}.targets.json"]

    @property
    def has_online_targets_key(self) -> bool:
        return self._targets_signer is not None

    def targets_keyid(self) -> str:
        """The keyid root trusts for targets (what an offline signature must carry)."""
        with self._lock:
            self._sync()
            return self._root.signed.roles["targets"].keyids[0]

    # -- publishing ---------------------------------------------------------------------------

    def add_target(
        self,
        path: str,
        length: int,
        sha256: str,
        custom: Mapping[str, Any],
        targets_signer: Signer | None = None,
    ) -> None:
        """Publish a target: new targets, snapshot and timestamp versions.

        Re-adding a path with the same length and hash is a no-op; with different ones it is
        refused (``BundleExistsError``): published bundles are immutable. Without a targets key
        (not in keys_dir, not passed) raises ``TargetsKeyRequiredError``.
        """
        target = _validate_target(path, length, sha256, custom)
        with self._write_lock():
            signer = targets_signer or self._targets_signer
            if signer is None:
                raise TargetsKeyRequiredError(
                    f"cannot publish {path}: the targets key is not on the hub. Stage it "
                    "(stage_target), sign the payload with the offline targets key "
                    "(sign_staged) and commit the signature (commit_staged_targets)"
                )
            self._check_signer(signer, "targets")
            if self._unchanged(self._targets.signed, target):
                return
            new = Metadata(self._next_targets(self._targets.signed, target))
            new.sign(signer)
            self._publish_targets(new)

    def stage_target(self, path: str, length: int, sha256: str, custom: Mapping[str, Any]) -> bytes:
        """Stage one target for offline signing; return the bytes the targets key must sign.

        The payload is always the published targets plus exactly this one target, never an
        earlier staging: whoever holds the admin identity can stage, and the key holder must
        be asked to sign only what they publish (the CLI checks that too, see
        :func:`check_signing_request`). A new staging replaces the previous one.
        """
        target = _validate_target(path, length, sha256, custom)
        with self._write_lock():
            if self._unchanged(self._targets.signed, target):
                raise BundleExistsError(f"{path} is already published as is: nothing to sign")
            md = Metadata(self._next_targets(self._targets.signed, target))
            staged_dir = self.metadata_dir / STAGED_DIR
            staged_dir.mkdir(exist_ok=True)
            _atomic_write(staged_dir / "targets.json", md.to_bytes())
            return md.signed_bytes

    def staged_payload(self) -> bytes | None:
        """The payload currently waiting for the offline targets key, if any."""
        with self._lock:
            staged = self._load_staged()
            return staged.signed_bytes if staged is not None else None

    def discard_staged(self) -> bool:
        with self._write_lock():
            try:
                (self.metadata_dir / STAGED_DIR / "targets.json").unlink()
            except FileNotFoundError:
                return False
            return True

    def commit_staged_targets(
        self, signature: Mapping[str, Any], payload: bytes | None = None
    ) -> None:
        """Publish signed targets: ``payload`` (the exact bytes signed) or the staged file.

        The signature (``{"keyid": ..., "sig": ...}``) is verified with the targets key of the
        current root before anything is written; the new targets must be the next version and
        keep every published target unchanged. A wrong key, a signature over other bytes or a
        change to a published target is refused and nothing is written.
        """
        try:
            sig = Signature.from_dict(dict(signature))
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidRequestError(f"malformed signature {signature!r}: {exc}") from None
        with self._write_lock():
            staged = self._load_staged() if payload is None else _targets_from_payload(payload)
            if staged is None:
                raise TufSetupError("nothing is staged: call stage_target first")
            current = self._targets.signed.version
            if staged.signed.version != current + 1:
                raise TufSetupError(
                    f"the targets to commit are v{staged.signed.version} but published targets "
                    f"is v{current}: they are stale, sign again"
                )
            problems = target_differences(self._targets.signed, staged.signed)
            if problems:
                raise VerificationError(
                    "refusing targets that change published bundles (published bundles are "
                    f"immutable): {'; '.join(problems)}",
                    reason="immutable",
                )
            if staged.signed.is_expired(_dt.datetime.fromtimestamp(self._clock(), tz=_dt.UTC)):
                raise TufSetupError(
                    f"the targets to commit expired at {staged.signed.expires.isoformat()}: "
                    "stage and sign again"
                )
            expected = ", ".join(k[:16] for k in self._root.signed.roles["targets"].keyids)
            try:
                self._root.signed.verify_delegate("targets", staged.signed_bytes, {sig.keyid: sig})
            except UnsignedMetadataError as exc:
                raise VerificationError(
                    f"refusing targets v{staged.signed.version}: the signature (keyid "
                    f"{sig.keyid[:16]}) does not verify with the targets key in root "
                    f"({expected}): wrong key, or signed over other bytes ({exc})",
                    reason="signature",
                ) from None
            staged.signatures = {sig.keyid: sig}
            self._publish_targets(staged)
            with contextlib.suppress(FileNotFoundError):
                (self.metadata_dir / STAGED_DIR / "targets.json").unlink()

    def copy_metadata(self, dest: Path) -> list[str]:
        """Copy every metadata file (all versions, ``staged/`` included) into the new folder
        ``dest``, under the write lock, so the copy is one published state; return the names
        copied. Not made durable: the caller (a backup) does that where the copy ends up."""
        copied = []
        with self._write_lock():
            for src in sorted(self.metadata_dir.rglob("*")):
                rel = src.relative_to(self.metadata_dir)
                # The lock file and atomic_write's temporaries are no part of any state.
                if src.name == _LOCK_FILE or src.name.startswith("."):
                    continue
                if src.is_symlink() or not src.is_file():
                    continue
                out = dest / rel
                out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                # A plain write, no fsync: the copy is a staging area and the lock is held.
                with open(out, "xb") as fh:
                    fh.write(src.read_bytes())
                copied.append(rel.as_posix())
        return copied

    def advance_versions(self, gap: int, now: float | None = None) -> dict[str, tuple[int, int]]:
        """Re-sign the online roles with versions ``gap`` above the current ones.

        For a hub restored from a backup: the lost hub may have signed newer versions after
        the backup was taken, and agents that saw them refuse anything not newer as a rollback
        (an equal version they keep as it is). Targets moves too when its key is online;
        snapshot and timestamp always. Returns role -> (old version, new version).
        """
        if gap < 1:
            raise InvalidRequestError(f"version gap must be positive, got {gap}")
        with self._write_lock():
            before = {
                "targets": self._targets.signed.version,
                "snapshot": self._snapshot.signed.version,
                "timestamp": self._timestamp.signed.version,
            }
            if self._targets_signer is not None:
                new = Metadata(self._next_targets(self._targets.signed, None, now))
                new.signed.version = self._targets.signed.version + gap
                new.sign(self._targets_signer)
                self._publish_targets(new, now, step=gap)
            else:
                self._publish_snapshot(dict(self._snapshot.signed.meta), now, step=gap)
            after = {
                "targets": self._targets.signed.version,
                "snapshot": self._snapshot.signed.version,
                "timestamp": self._timestamp.signed.version,
            }
        return {role: (before[role], after[role]) for role in before}

    def refresh_online(self, now: float | None = None) -> bool:
        """Re-sign online roles that have less than half of their lifetime left.

        Timestamp is re-signed when half-expired; snapshot likewise (which also means a new
        timestamp). Targets is re-signed too when its key is online; when it is offline, a
        warning is logged so the operator renews it in time. Returns whether anything was
        written. Call it periodically (more often than a quarter of the timestamp lifetime).
        """
        with self._write_lock():
            t = self._clock() if now is None else now
            wrote = False
            if self._half_expired(self._targets.signed, "targets", t):
                if self._targets_signer is not None:
                    new = Metadata(self._next_targets(self._targets.signed, None, t))
                    new.sign(self._targets_signer)
                    self._publish_targets(new, t)
                    return True
                logger.warning(
                    "targets metadata expires at %s and its key is offline: stage and sign a "
                    "renewal",
                    self._targets.signed.expires.isoformat(),
                )
            if self._half_expired(self._snapshot.signed, "snapshot", t):
                self._publish_snapshot(dict(self._snapshot.signed.meta), t)
                wrote = True
            elif self._half_expired(self._timestamp.signed, "timestamp", t):
                snapshot_bytes = self._files[f"{self._snapshot.signed.version}.snapshot.json"]
                self._publish_timestamp(self._snapshot.signed.version, snapshot_bytes, t)
                wrote = True
            return wrote

    def rotate_key(
        self, role: str, new_signer: Signer, root_signer: Signer, now: float | None = None
    ) -> int:
        """Give ``role`` the key of ``new_signer``; return the new root version.

        TUF's rule: root N+1 lists the new key and is signed by a root key of root N (and, when
        root's own key changes, by the new root key too), so agents walk from the root they
        trust to the new one. Then what the new key covers is re-signed with higher versions
        (targets for a targets key), and snapshot and timestamp always. Handing the key that
        ``role`` already has renews: only root's version and expiry change (``root`` before it
        expires). The hub must not be running: it keeps its online signers in memory.
        """
        if role not in ROLES:
            raise InvalidRequestError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        with self._write_lock():
            current = self._root.signed
            if root_signer.public_key.keyid not in current.roles["root"].keyids:
                raise TufSetupError(
                    f"the root key given (keyid {root_signer.public_key.keyid[:16]}...) is not a "
                    f"root key of root v{current.version}: it cannot sign the next root"
                )
            root: Metadata[Root] = Metadata.from_bytes(self._root.to_bytes())
            new_keyid = new_signer.public_key.keyid
            if new_keyid not in root.signed.roles[role].keyids:
                for keyid in list(root.signed.roles[role].keyids):
                    root.signed.revoke_key(keyid, role)
                root.signed.add_key(new_signer.public_key, role)
            root.signed.version += 1
            root.signed.expires = self._expires_at("root", now)
            root.sign(root_signer)
            if role == "root" and new_keyid != root_signer.public_key.keyid:
                root.sign(new_signer, append=True)
            data = root.to_bytes()
            self._state_key = None
            # N.root.json first: agents find the chain by version; root.json marks the latest.
            _atomic_write(self.metadata_dir / f"{root.signed.version}.root.json", data)
            _atomic_write(self.metadata_dir / "root.json", data)
            self._root = root
            self._files[f"{root.signed.version}.root.json"] = data
            self._files["root.json"] = data
            if role == "snapshot":
                self._snapshot_signer = new_signer
            elif role == "timestamp":
                self._timestamp_signer = new_signer
            if role == "targets":
                with contextlib.suppress(FileNotFoundError):
                    (self.metadata_dir / STAGED_DIR / "targets.json").unlink()
                    logger.warning("discarded the staged targets: they were for the old key")
                targets: Metadata[Targets] = Metadata.from_bytes(self._targets.to_bytes())
                targets.signed.version += 1
                targets.signed.expires = self._expires_at("targets", now)
                targets.sign(new_signer)
                if self._targets_signer is not None:
                    self._targets_signer = new_signer
                self._publish_targets(targets, now)
            else:
                self._publish_snapshot(dict(self._snapshot.signed.meta), now)
            return root.signed.version

    # -- internals ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        with self._lock, _flock(self.metadata_dir):
            self._sync()
            yield

    def _read_file(self, name: str) -> bytes:
        try:
            return (self.metadata_dir / name).read_bytes()
        except FileNotFoundError:
            raise TufSetupError(
                f"{self.metadata_dir / name} is missing: the repository is damaged or not "
                "initialized (TufRepository.create)"
            ) from None

    def _stat_key(self) -> tuple[Any, ...]:
        key: list[Any] = []
        for name in ("timestamp.json", "root.json"):
            try:
                st = (self.metadata_dir / name).stat()
            except FileNotFoundError:
                raise TufSetupError(
                    f"{self.metadata_dir} has no {name}: not a TUF repository (create it first)"
                ) from None
            # os.replace gives every new version a new inode, so this changes on every write.
            key.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(key)

    def _sync(self) -> None:
        """Reload from disk when another writer (process) published since we last looked.

        What is on disk is not trusted: anyone who can write the metadata directory (or holds
        only the online keys) could plant files. So the state is adopted only if it verifies
        the way an agent would verify it (see :func:`verify_repository`) and keeps every
        target published before unchanged; otherwise ``RepositoryIntegrityError`` is raised,
        every read and write fails with it, and nothing is re-signed over the bad files.
        """
        key = self._stat_key()
        if key == self._state_key:
            return
        if key == self._refused and self._refused_error is not None:
            # The same files as last time: no need to verify (and log) again.
            raise RepositoryIntegrityError(str(self._refused_error))
        try:
            # Once a root is trusted, newer ones must chain from it; before, from the anchor.
            trusted = (
                self._files.get(f"{self._root.signed.version}.root.json")
                if (hasattr(self, "_root"))
                else None
            )
            v = verify_repository(
                self.metadata_dir, trusted_root=trusted, anchor_sha256=self._anchor
            )
            previous = getattr(self, "_targets", None)
            if previous is not None:
                _check_successor(previous.signed, v.targets.signed, "the targets on disk")
            for role in ("snapshot", "timestamp"):
                signer = getattr(self, f"_{role}_signer", None)
                if signer is not None and signer.public_key.keyid not in (
                    v.root.signed.roles[role].keyids
                ):
                    raise RepositoryIntegrityError(
                        f"root v{v.root.signed.version} on disk no longer names this hub's "
                        f"{role} key: the root was replaced (or rotated while the hub ran)"
                    )
        except RepositoryIntegrityError as exc:
            self._refused, self._refused_error = key, exc
            logger.error("REFUSING the TUF metadata in %s: %s", self.metadata_dir, exc)
            raise
        self._root, self._targets, self._snapshot, self._timestamp = (
            v.root,
            v.targets,
            v.snapshot,
            v.timestamp,
        )
        self._files = v.files
        self._state_key = key
        self._refused, self._refused_error = None, None

    def _remember(self, name: str, data: bytes, suffix: str) -> None:
        """Keep ``name`` as the verified current file of its kind (only the current one)."""
        for old in [n for n in self._files if n.endswith(suffix)]:
            del self._files[old]
        self._files[name] = data

    def _check_signer(self, signer: Signer, role: str) -> None:
        keyids = self._root.signed.roles[role].keyids
        if signer.public_key.keyid not in keyids:
            raise TufSetupError(
                f"the {role} key given (keyid {signer.public_key.keyid[:16]}) is not a {role} "
                f"key of root v{self._root.signed.version} "
                f"({', '.join(k[:16] for k in keyids)})"
            )

    def _expires_at(self, role: str, now: float | None = None) -> _dt.datetime:
        t = self._clock() if now is None else now
        return _dt.datetime.fromtimestamp(t + self._expiry.seconds(role), tz=_dt.UTC)

    def _half_expired(self, signed: Targets | Snapshot | Timestamp, role: str, now: float) -> bool:
        remaining = signed.expires.timestamp() - now
        return remaining < self._expiry.seconds(role) / 2

    @staticmethod
    def _unchanged(base: Targets, target: TargetFile) -> bool:
        """True if ``target`` is already published identically; raise if it would change."""
        existing = base.targets.get(target.path)
        if existing is None:
            return False
        if existing.length == target.length and existing.hashes == target.hashes:
            return True
        raise BundleExistsError(
            f"{target.path} is already signed with sha256 "
            f"{existing.hashes.get('sha256', '?')[:16]}... ({existing.length} bytes); published "
            "bundles are immutable, publish a new version instead"
        )

    def _next_targets(
        self, base: Targets, target: TargetFile | None, now: float | None = None
    ) -> Targets:
        targets = dict(base.targets)
        if target is not None:
            targets[target.path] = target
        return Targets(
            version=self._targets.signed.version + 1,
            expires=self._expires_at("targets", now),
            targets=targets,
        )

    def _load_staged(self) -> Metadata[Targets] | None:
        try:
            data = (self.metadata_dir / STAGED_DIR / "targets.json").read_bytes()
        except FileNotFoundError:
            return None
        return Metadata.from_bytes(data)

    def _publish_targets(
        self, targets_md: Metadata[Targets], now: float | None = None, step: int = 1
    ) -> None:
        # Until the new timestamp is written, what is on disk is the truth: a failure half-way
        # must make the next operation reload instead of trusting half-updated memory.
        self._state_key = None
        version = targets_md.signed.version
        data = targets_md.to_bytes()
        _atomic_write(self.metadata_dir / f"{version}.targets.json", data)
        self._targets = targets_md
        self._remember(f"{version}.targets.json", data, ".targets.json")
        meta = dict(self._snapshot.signed.meta)
        meta["targets.json"] = _meta_for(version, data)
        self._publish_snapshot(meta, now, step)

    def _publish_snapshot(
        self, meta: dict[str, MetaFile], now: float | None = None, step: int = 1
    ) -> None:
        self._state_key = None
        snapshot = Metadata(
            Snapshot(
                version=self._snapshot.signed.version + step,
                expires=self._expires_at("snapshot", now),
                meta=meta,
            )
        )
        snapshot.sign(self._snapshot_signer)
        data = snapshot.to_bytes()
        _atomic_write(self.metadata_dir / f"{snapshot.signed.version}.snapshot.json", data)
        self._snapshot = snapshot
        self._remember(f"{snapshot.signed.version}.snapshot.json", data, ".snapshot.json")
        self._publish_timestamp(snapshot.signed.version, data, now, step)

    def _publish_timestamp(
        self, snapshot_version: int, snapshot_bytes: bytes, now: float | None = None, step: int = 1
    ) -> None:
        timestamp = Metadata(
            Timestamp(
                version=self._timestamp.signed.version + step,
                expires=self._expires_at("timestamp", now),
                snapshot_meta=_meta_for(snapshot_version, snapshot_bytes),
            )
        )
        self._state_key = None
        timestamp.sign(self._timestamp_signer)
        data = timestamp.to_bytes()
        _atomic_write(self.metadata_dir / "timestamp.json", data)
        self._timestamp = timestamp
        self._files["timestamp.json"] = data
        # Memory now matches disk again (we hold the flock, nobody else wrote meanwhile).
        self._state_key = self._stat_key()


def _load_anchor(keys_dir: Path) -> str | None:
    path = Path(keys_dir) / ROOT_ANCHOR_FILE
    try:
        return str(json.loads(path.read_bytes())["1.root.json"]["sha256"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TufSetupError(f"cannot read {path}: {exc}; restore it from a backup") from None


@contextlib.contextmanager
def _flock(metadata_dir: Path) -> Iterator[None]:
    metadata_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(metadata_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
