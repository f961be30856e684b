"""TUF end to end: a real hub repository on disk, a real ngclient on the agent side.

The agent talks to the hub through an in-memory Transport that serves the repository's own
``read()`` and a dict of blobs by sha256, so every test exercises the real signing, the real
metadata files and ngclient's real checks; attacks are simulated by changing what is served.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from agent.fleet.verify import (
    BundleVerifier,
    InMemoryTransport,
    TransportUnavailableError,
    bundle_target_path,
)
from hub.signing import (
    AlreadyInitializedError,
    ExpiryPolicy,
    TargetsKeyRequiredError,
    TufRepository,
    init_keys,
    load_signer,
    sign_staged,
)
from protos.errors import (
    BundleExistsError,
    InvalidRequestError,
    ModelNotFoundError,
    ResourceExhaustedError,
    Status,
    VerificationError,
)


class FakeHub(InMemoryTransport):
    """Serves a TufRepository; tests override files, corrupt blobs and cut connections."""

    def __init__(self, repo: TufRepository, chunk_size: int = 1000) -> None:
        self.blobs: dict[str, bytes] = {}
        super().__init__(self._read, self.blobs, chunk_size=chunk_size)
        self.repo = repo
        self.overrides: dict[str, bytes] = {}
        self.target_calls: list[tuple[str, int]] = []
        self.fail_after: int | None = None  # next fetch_target breaks after this many bytes

    def _read(self, filename: str) -> bytes:
        if filename in self.overrides:
            return self.overrides[filename]
        return self.repo.read(filename)

    def fetch_target(self, path: str, offset: int) -> Iterator[bytes]:
        self.target_calls.append((path, offset))
        fail_after, self.fail_after = self.fail_after, None
        sent = 0
        for chunk in super().fetch_target(path, offset):
            if fail_after is not None and sent + len(chunk) > fail_after:
                yield chunk[: fail_after - sent]
                raise OSError("connection reset by peer")
            sent += len(chunk)
            yield chunk

    def publish(self, name: str, version: int, data: bytes | None = None) -> bytes:
        data = os.urandom(5000 + 997 * version) if data is None else data
        sha = hashlib.sha256(data).hexdigest()
        custom = {"name": name, "version": version, "manifest_sha256": "ab" * 32}
        self.repo.add_target(bundle_target_path(name, version), len(data), sha, custom)
        self.blobs[sha] = data
        return data


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    init_keys(tmp_path / "keys")
    return tmp_path / "keys"


@pytest.fixture
def repo(tmp_path: Path, keys: Path) -> TufRepository:
    return TufRepository.create(tmp_path / "metadata", keys)


@pytest.fixture
def hub(repo: TufRepository) -> FakeHub:
    return FakeHub(repo)


def make_verifier(tmp_path: Path, hub: FakeHub, **kwargs: object) -> BundleVerifier:
    return BundleVerifier(
        tmp_path / "agent" / "tuf",
        tmp_path / "agent" / "downloads",
        hub,
        trusted_root=hub.repo.root_bytes(),
        **kwargs,  # type: ignore[arg-type]
    )


def part_file(verifier: BundleVerifier, data: bytes) -> Path:
    return verifier.fetcher.partial_dir / f"{hashlib.sha256(data).hexdigest()}.part"


def hashed_name(name: str, version: int, data: bytes) -> str:
    return f"{name}/{version}/{hashlib.sha256(data).hexdigest()}.bundle.tar"


# ---------------------------------------------------------------------------------------------
# The happy path


def test_fetch_two_bundles_and_reuse_verified_copies(tmp_path: Path, hub: FakeHub) -> None:
    first = hub.publish("mlp", 1)
    second = hub.publish("resnet", 3)
    verifier = make_verifier(tmp_path, hub)

    path1 = verifier.fetch_bundle("mlp", 1)
    path2 = verifier.fetch_bundle("resnet", 3)
    assert path1.read_bytes() == first
    assert path2.read_bytes() == second
    assert path1 == tmp_path / "agent" / "downloads" / "mlp" / "1" / "bundle.tar"
    # consistent snapshot: ngclient asked for the hash-prefixed name
    assert [p for p, _ in hub.target_calls] == [
        hashed_name("mlp", 1, first),
        hashed_name("resnet", 3, second),
    ]
    assert not part_file(verifier, first).exists()  # partials go once verified

    # A verified copy on disk is reused (metadata is still refreshed).
    assert verifier.fetch_bundle("mlp", 1) == path1
    assert len(hub.target_calls) == 2

    signed = verifier.signed_targets()
    assert signed["resnet/3/bundle.tar"].custom["version"] == 3


# ---------------------------------------------------------------------------------------------
# Resumable downloads


def test_interrupted_download_resumes_at_the_offset_reached(tmp_path: Path, hub: FakeHub) -> None:
    data = hub.publish("mlp", 1, os.urandom(10_000))
    verifier = make_verifier(tmp_path, hub)
    hub.fail_after = 3500

    with pytest.raises(TransportUnavailableError) as info:
        verifier.fetch_bundle("mlp", 1)
    assert info.value.status is Status.UNAVAILABLE
    assert part_file(verifier, data).stat().st_size == 3500

    # A new verifier, as after a restart (kill -9): the part file is all that survived.
    restarted = make_verifier(tmp_path, hub)
    path = restarted.fetch_bundle("mlp", 1)
    assert path.read_bytes() == data
    assert hub.target_calls[-1] == (hashed_name("mlp", 1, data), 3500)
    assert not part_file(restarted, data).exists()


# ---------------------------------------------------------------------------------------------
# Integrity attacks on the bundle


def test_tampered_bundle_is_refused_and_its_partial_discarded(tmp_path: Path, hub: FakeHub) -> None:
    data = hub.publish("mlp", 3)
    sha = hashlib.sha256(data).hexdigest()
    hub.blobs[sha] = bytes([data[0] ^ 0xFF]) + data[1:]
    verifier = make_verifier(tmp_path, hub)

    with pytest.raises(VerificationError) as info:
        verifier.fetch_bundle("mlp", 3)
    assert "hash mismatch for mlp/3" in str(info.value)
    assert info.value.reason == "hash"
    assert not part_file(verifier, data).exists()
    assert not (tmp_path / "agent" / "downloads" / "mlp" / "3" / "bundle.tar").exists()

    # The next attempt starts clean (offset 0) and succeeds once the right bytes are served.
    hub.blobs[sha] = data
    assert verifier.fetch_bundle("mlp", 3).read_bytes() == data
    assert hub.target_calls[-1][1] == 0


@pytest.mark.parametrize("change", ["longer", "shorter"])
def test_bundle_with_wrong_length_is_refused(tmp_path: Path, hub: FakeHub, change: str) -> None:
    data = hub.publish("mlp", 2)
    sha = hashlib.sha256(data).hexdigest()
    hub.blobs[sha] = data + b"\0" * 100 if change == "longer" else data[:-100]
    verifier = make_verifier(tmp_path, hub)

    with pytest.raises(VerificationError) as info:
        verifier.fetch_bundle("mlp", 2)
    assert "length mismatch for mlp/2" in str(info.value)
    assert not part_file(verifier, data).exists()


def test_unsigned_model_is_refused_without_download(tmp_path: Path, hub: FakeHub) -> None:
    hub.publish("mlp", 1)
    verifier = make_verifier(tmp_path, hub)
    with pytest.raises(VerificationError) as info:
        verifier.fetch_bundle("mlp", 99)
    assert "model mlp version 99 is not signed by the hub's targets key" in str(info.value)
    assert hub.target_calls == []


# ---------------------------------------------------------------------------------------------
# Metadata attacks


def test_rollback_of_timestamp_is_refused(tmp_path: Path, hub: FakeHub) -> None:
    hub.publish("mlp", 1)  # timestamp v2
    old_timestamp = hub.repo.read("timestamp.json")
    hub.publish("mlp", 2)  # timestamp v3
    verifier = make_verifier(tmp_path, hub)
    verifier.fetch_bundle("mlp", 1)  # the agent has now seen timestamp v3

    hub.overrides["timestamp.json"] = old_timestamp
    with pytest.raises(VerificationError) as info:
        verifier.fetch_bundle("mlp", 2)
    message = str(info.value)
    assert "rollback attack: timestamp version 2 is lower than trusted 3" in message
    assert "must be >= 3" in message  # ngclient's own words are kept


def test_expired_timestamp_is_refused(tmp_path: Path, keys: Path) -> None:
    # The hub's clock is an hour behind: everything it signs with a 60 s lifetime is already
    # stale in real time, as if an attacker kept serving an old, correctly signed timestamp.
    repo = TufRepository.create(
        tmp_path / "metadata",
        keys,
        clock=lambda: time.time() - 3600,
        expiry=ExpiryPolicy(timestamp=60),
    )
    hub = FakeHub(repo)
    hub.publish("mlp", 1)
    verifier = make_verifier(tmp_path, hub)
    with pytest.raises(VerificationError) as info:
        verifier.fetch_bundle("mlp", 1)
    message = str(info.value)
    assert message.startswith("metadata expired (freeze attack?): timestamp expired at ")
    assert repo.expires()["timestamp"].isoformat() in message
    assert info.value.reason == "expired"


def test_frozen_timestamp_expires_on_the_agent(tmp_path: Path, keys: Path) -> None:
    # Real time this once: ngclient checks expiry against the wall clock.
    repo = TufRepository.create(tmp_path / "metadata", keys, expiry=ExpiryPolicy(timestamp=3))
    hub = FakeHub(repo)
    hub.publish("mlp", 1)
    verifier = make_verifier(tmp_path, hub)
    verifier.fetch_bundle("mlp", 1)

    time.sleep(max(0.0, repo.expires()["timestamp"].timestamp() - time.time()) + 0.1)
    with pytest.raises(VerificationError, match=r"expired \(freeze attack\?\): timestamp"):
        verifier.fetch_bundle("mlp", 1)


def test_timestamp_signed_by_another_key_is_refused(tmp_path: Path, hub: FakeHub) -> None:
    hub.publish("mlp", 1)
    verifier = make_verifier(tmp_path, hub)
    forged: Metadata = Metadata.from_bytes(hub.repo.read("timestamp.json"))
    forged.signed.version += 1
    forged.sign(CryptoSigner.generate_ed25519())
    hub.overrides["timestamp.json"] = forged.to_bytes()

    with pytest.raises(VerificationError) as info:
        verifier.fetch_bundle("mlp", 1)
    assert "bad signature on timestamp" in str(info.value)
    assert info.value.reason == "signature"


def test_missing_trust_anchor(tmp_path: Path, hub: FakeHub) -> None:
    with pytest.raises(VerificationError, match="enroll"):
        BundleVerifier(tmp_path / "tuf", tmp_path / "dl", hub)


# ---------------------------------------------------------------------------------------------
# Disk space


def test_disk_space_is_checked_before_downloading(
    tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.publish("mlp", 3)
    verifier = make_verifier(tmp_path, hub, reserve_bytes=64 << 20)
    real = __import__("shutil").disk_usage

    def tiny(path: object) -> object:
        usage = real(path)
        return type(usage)(usage.total, usage.used, 10 << 20)

    monkeypatch.setattr("shutil.disk_usage", tiny)
    with pytest.raises(ResourceExhaustedError) as info:
        verifier.fetch_bundle("mlp", 3)
    assert "not enough disk space to download mlp v3: need 64.0 MB, 10.0 MB free" in str(info.value)
    assert hub.target_calls == []


# ---------------------------------------------------------------------------------------------
# Hub side: keys, offline targets key, online re-signing, serving


def test_key_files_are_private_and_never_overwritten(tmp_path: Path) -> None:
    ids = init_keys(tmp_path / "keys")
    assert set(ids) == {"root", "targets", "snapshot", "timestamp"}
    for role in ids:
        mode = stat.S_IMODE((tmp_path / "keys" / f"{role}.pem").stat().st_mode)
        assert mode == 0o600, role
    with pytest.raises(AlreadyInitializedError):
        init_keys(tmp_path / "keys")
    TufRepository.create(tmp_path / "metadata", tmp_path / "keys")
    with pytest.raises(AlreadyInitializedError):
        TufRepository.create(tmp_path / "metadata", tmp_path / "keys")


def test_offline_targets_key_flow(tmp_path: Path) -> None:
    keys, offline = tmp_path / "keys", tmp_path / "offline"
    init_keys(keys, offline)
    online = sorted(p.name for p in keys.iterdir())
    assert online == ["public.json", "snapshot.pem", "timestamp.pem"]
    assert sorted(p.name for p in offline.iterdir()) == ["root.pem", "targets.pem"]
    repo = TufRepository.create(
        tmp_path / "metadata",
        keys,
        root_signer=load_signer(offline / "root.pem"),
        targets_signer=load_signer(offline / "targets.pem"),
    )
    hub = FakeHub(repo)
    with pytest.raises(TargetsKeyRequiredError) as info:
        hub.publish("mlp", 1)
    assert info.value.status is Status.FAILED_PRECONDITION

    data = os.urandom(4000)
    sha = hashlib.sha256(data).hexdigest()
    hub.blobs[sha] = data
    path = bundle_target_path("mlp", 1)
    payload = repo.stage_target(path, len(data), sha, {"name": "mlp", "version": 1})
    assert repo.target(path) is None  # staged is not published

    # A signature by any other key is refused and nothing is published.
    init_keys(tmp_path / "other")
    with pytest.raises(VerificationError, match="does not verify with the targets key"):
        repo.commit_staged_targets(sign_staged(payload, tmp_path / "other" / "targets.pem"))
    assert repo.target(path) is None
    assert repo.versions()["targets"] == 1

    repo.commit_staged_targets(sign_staged(payload, offline / "targets.pem"))
    assert repo.target(path) is not None
    assert repo.versions() == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 2}
    assert repo.staged_payload() is None
    assert make_verifier(tmp_path, hub).fetch_bundle("mlp", 1).read_bytes() == data


def test_refresh_online_resigns_only_when_half_expired(tmp_path: Path, keys: Path) -> None:
    now = [1_800_000_000.0]
    repo = TufRepository.create(
        tmp_path / "metadata",
        keys,
        clock=lambda: now[0],
        expiry=ExpiryPolicy(timestamp=100, snapshot=1000),
    )
    assert not repo.refresh_online()
    now[0] += 40
    assert not repo.refresh_online()
    assert repo.versions()["timestamp"] == 1
    now[0] += 20  # 40 s of 100 left: less than half
    assert repo.refresh_online()
    assert repo.versions() == {"root": 1, "targets": 1, "snapshot": 1, "timestamp": 2}
    assert repo.expires()["timestamp"].timestamp() == now[0] + 100
    assert not repo.refresh_online()  # just re-signed
    # The snapshot is re-signed when it is half-expired too (and a new timestamp names it).
    assert repo.refresh_online(now=now[0] + 600)
    assert repo.versions() == {"root": 1, "targets": 1, "snapshot": 2, "timestamp": 3}


def test_published_bundles_are_immutable(hub: FakeHub) -> None:
    data = hub.publish("mlp", 1)
    hub.publish("mlp", 1, data)  # the same bytes again: a no-op
    assert hub.repo.versions()["targets"] == 2
    with pytest.raises(BundleExistsError):
        hub.publish("mlp", 1, data + b"!")


def test_read_serves_only_metadata_names(tmp_path: Path, hub: FakeHub, keys: Path) -> None:
    hub.publish("mlp", 1)
    repo = hub.repo
    for name in ("root.json", "1.root.json", "timestamp.json", "2.snapshot.json", "2.targets.json"):
        assert repo.read(name).startswith(b"{")
    assert repo.read("root.json") == repo.root_bytes() == repo.read("1.root.json")
    for bad in ("../keys/timestamp.pem", "staged/targets.json", "..root.json"):
        with pytest.raises(InvalidRequestError):
            repo.read(bad)
    for unknown in ("3.targets.json", "snapshot.json", "timestamp.pem", ".lock"):
        with pytest.raises(ModelNotFoundError):
            repo.read(unknown)
    # A second handle (another process) sees what the first one published.
    other = TufRepository.open(tmp_path / "metadata", keys)
    hub.publish("mlp", 2)
    assert other.target("mlp/2/bundle.tar") is not None
