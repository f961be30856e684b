"""TUF end to end: a real hub repository on disk, a real ngclient on the agent side.

The agent talks to the hub through an in-memory Transport that serves the repository's own
``read()`` and a dict of blobs by sha256, so every test exercises the real signing, the real
metadata files and ngclient's real checks; attacks are simulated by changing what is served.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from modelfleet.agent.fleet.verify import (
    BundleVerifier,
    InMemoryTransport,
    TransportUnavailableError,
)
from modelfleet.hub.signing import (
    AlreadyInitializedError,
    ExpiryPolicy,
    TargetsKeyRequiredError,
    TufRepository,
    init_keys,
    load_signer,
    sign_staged,
)
from modelfleet.kernel.bundle import bundle_target_path, create_bundle, load_bundle, pack_bundle
from modelfleet.kernel.errors import (
    BundleError,
    BundleExistsError,
    InvalidRequestError,
    ModelNotFoundError,
    ResourceExhaustedError,
    Status,
    VerificationError,
)
from tests import models
from tests.conftest import mlp_samples

_ARCHIVES: dict[tuple[str, int], bytes] = {}


def bundle_archive(name: str, version: int, tmp: Path) -> bytes:
    """A real bundle archive (pack_bundle of a small MLP bundle), built once per test session."""
    if (name, version) not in _ARCHIVES:
        model = models.mlp(tmp / f"{name}-{version}.onnx", hidden=40 + version, seed=version)
        bundle = create_bundle(
            model, name=name, version=version, samples=mlp_samples(), out_dir=tmp / "bundles"
        )
        pack_bundle(bundle.path, tmp / f"{name}-{version}.tar")
        _ARCHIVES[name, version] = (tmp / f"{name}-{version}.tar").read_bytes()
    return _ARCHIVES[name, version]


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
        if data is None:
            data = bundle_archive(name, version, self.repo.metadata_dir.parent / "archives")
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


def partial(verifier: BundleVerifier, data: bytes) -> Path:
    """Where a download in progress is unpacked (content-addressed by the archive's sha256)."""
    return verifier.partial_dir / hashlib.sha256(data).hexdigest()


def model_bytes(archive: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = tar.extractfile("model.onnx")
        assert member is not None
        return member.read()


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
    # Unpacked as it arrived: the bundle directory itself, every file checked against its hash.
    assert path1 == tmp_path / "agent" / "downloads" / "mlp" / "1"
    assert (load_bundle(path1).name, load_bundle(path2).version) == ("mlp", 3)
    assert (path1 / "model.onnx").read_bytes() == model_bytes(first)
    assert (path2 / "model.onnx").read_bytes() == model_bytes(second)
    # consistent snapshot: the hash-prefixed name was asked for
    assert [p for p, _ in hub.target_calls] == [
        hashed_name("mlp", 1, first),
        hashed_name("resnet", 3, second),
    ]
    assert not partial(verifier, first).exists()  # partials go once verified

    # A verified copy on disk is reused (metadata is still refreshed).
    assert verifier.fetch_bundle("mlp", 1) == path1
    assert len(hub.target_calls) == 2

    signed = verifier.signed_targets()
    assert signed["resnet/3/bundle.tar"].custom["version"] == 3


# ---------------------------------------------------------------------------------------------
# Resumable downloads


def _regions(archive: bytes) -> dict[str, int]:
    """An offset inside each kind of region of the archive: header, content, padding, end."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        members = tar.getmembers()
    model = next(m for m in members if m.name == "model.onnx")
    last = members[-1]
    end_of_data = last.offset_data + last.size
    # The cuts below must land where their names say: padding after the model, end blocks.
    assert 0 < model.size % 512 < 509 and (end_of_data + 511) // 512 * 512 + 700 < len(archive)
    return {
        "in a header": model.offset + 100,
        "at a header's end": model.offset_data,
        "inside content": model.offset_data + model.size // 2,
        "inside padding": model.offset_data + model.size + 3,
        "in the end blocks": (end_of_data + 511) // 512 * 512 + 700,
    }


@pytest.mark.parametrize(
    "where",
    ["in a header", "at a header's end", "inside content", "inside padding", "in the end blocks"],
)
def test_interrupted_download_resumes_at_the_offset_reached(
    tmp_path: Path, hub: FakeHub, where: str
) -> None:
    data = hub.publish("mlp", 1)
    cut = _regions(data)[where]
    verifier = make_verifier(tmp_path, hub)
    hub.fail_after = cut

    with pytest.raises(TransportUnavailableError) as info:
        verifier.fetch_bundle("mlp", 1)
    assert info.value.status is Status.UNAVAILABLE
    assert partial(verifier, data).is_dir()

    # A new verifier, as after a restart (kill -9): the unpacked pieces are all that survived.
    restarted = make_verifier(tmp_path, hub)
    path = restarted.fetch_bundle("mlp", 1)
    assert (path / "model.onnx").read_bytes() == model_bytes(data)
    load_bundle(path)
    assert hub.target_calls[-1] == (hashed_name("mlp", 1, data), cut)
    assert not partial(restarted, data).exists()


def test_torn_tail_after_a_crash_is_fetched_again(tmp_path: Path, hub: FakeHub) -> None:
    """A power cut can lose the last writes of a file: resume from what really is there."""
    data = hub.publish("mlp", 1)
    cut = _regions(data)["inside content"]
    verifier = make_verifier(tmp_path, hub)
    hub.fail_after = cut
    with pytest.raises(TransportUnavailableError):
        verifier.fetch_bundle("mlp", 1)
    model = partial(verifier, data) / "files" / "model.onnx"
    size = model.stat().st_size
    with open(model, "r+b") as fh:
        fh.truncate(size - 300)

    path = make_verifier(tmp_path, hub).fetch_bundle("mlp", 1)
    assert hub.target_calls[-1][1] == cut - 300
    assert (path / "model.onnx").read_bytes() == model_bytes(data)


# ---------------------------------------------------------------------------------------------
# Integrity attacks on the bundle


@pytest.mark.parametrize("where", ["first byte", "model weights", "last byte"])
def test_tampered_bundle_is_refused_and_its_partial_discarded(
    tmp_path: Path, hub: FakeHub, where: str
) -> None:
    data = hub.publish("mlp", 3)
    sha = hashlib.sha256(data).hexdigest()
    at = {"first byte": 0, "model weights": _regions(data)["inside content"], "last byte": -1}
    tampered = bytearray(data)
    tampered[at[where]] ^= 0xFF
    hub.blobs[sha] = bytes(tampered)
    verifier = make_verifier(tmp_path, hub)

    with pytest.raises(VerificationError) as info:
        verifier.fetch_bundle("mlp", 3)
    # A broken header is noticed at once, but the stream is hashed to its end all the same:
    # the report says what happened (not what the hub signed), not just "malformed".
    assert "hash mismatch for mlp/3" in str(info.value)
    assert info.value.reason == "hash"
    assert not partial(verifier, data).exists()
    assert not (tmp_path / "agent" / "downloads" / "mlp" / "3").exists()

    # The next attempt starts clean (offset 0) and succeeds once the right bytes are served.
    hub.blobs[sha] = data
    load_bundle(verifier.fetch_bundle("mlp", 3))
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
    assert info.value.reason == "length"
    assert not partial(verifier, data).exists()


def test_signed_archive_that_is_not_a_bundle_is_refused(tmp_path: Path, hub: FakeHub) -> None:
    """Correctly signed bytes that are no bundle (a broken publisher): refused, named, dropped."""
    junk = hub.publish("mlp", 5, os.urandom(5000))
    renamed = hub.publish("other", 6, bundle_archive("mlp", 1, tmp_path))
    verifier = make_verifier(tmp_path, hub)
    with pytest.raises(BundleError, match="bundle mlp/5: not a bundle archive"):
        verifier.fetch_bundle("mlp", 5)
    with pytest.raises(BundleError, match="manifest says 'mlp' version 1, expected 'other' ver"):
        verifier.fetch_bundle("other", 6)
    for data in (junk, renamed):
        assert not partial(verifier, data).exists()
    assert not (tmp_path / "agent" / "downloads" / "other" / "6").exists()


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

    data = bundle_archive("mlp", 1, tmp_path)
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
    fetched = make_verifier(tmp_path, hub).fetch_bundle("mlp", 1)
    assert (fetched / "model.onnx").read_bytes() == model_bytes(data)


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


# ---------------------------------------------------------------------------------------------
# What a hostile hub or a damaged staging directory can do to a download (review findings)


def _retar(archive: bytes, drop: str = "", size_of: str = "", size: bytes = b"") -> bytes:
    """The archive rebuilt without ``drop``, or with ``size_of``'s size field set to ``size``."""
    buf = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(archive)) as src,
        tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as out,
    ):
        for m in src.getmembers():
            if m.name != drop:
                out.addfile(m, src.extractfile(m))
    data = bytearray(buf.getvalue())
    if size_of:
        with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
            at = tar.getmember(size_of).offset
        data[at + 124 : at + 136] = size.ljust(11, b" ") + b"\0"
        data[at + 148 : at + 156] = b" " * 8
        data[at + 148 : at + 155] = f"{sum(data[at : at + 512]):06o}\0".encode()
    return bytes(data)


def test_a_negative_member_size_is_refused_not_looped_on(tmp_path: Path, hub: FakeHub) -> None:
    """int('-1', 8) is valid Python: a size field must be octal digits only."""
    evil = _retar(bundle_archive("mlp", 1, tmp_path), size_of="model.onnx", size=b"-1")
    hub.publish("mlp", 7, evil)
    verifier = make_verifier(tmp_path, hub)
    started = time.monotonic()
    with pytest.raises(BundleError, match="bad size field"):
        verifier.fetch_bundle("mlp", 7)
    assert time.monotonic() - started < 10
    assert not partial(verifier, evil).exists()


def test_a_signed_incomplete_archive_is_refused_and_dropped(tmp_path: Path, hub: FakeHub) -> None:
    data = hub.publish("mlp", 5, _retar(bundle_archive("mlp", 1, tmp_path), drop="health.npz"))
    verifier = make_verifier(tmp_path, hub)
    for _ in range(2):  # the same clear error each time, from a clean start
        with pytest.raises(BundleError, match=r"the archive lacks health\.npz"):
            verifier.fetch_bundle("mlp", 5)
        assert not partial(verifier, data).exists()
    assert [offset for _, offset in hub.target_calls] == [0, 0]


def _interrupted(tmp_path: Path, hub: FakeHub, data: bytes, cut: int) -> Path:
    verifier = make_verifier(tmp_path, hub)
    hub.fail_after = cut
    with pytest.raises(TransportUnavailableError):
        verifier.fetch_bundle("mlp", 1)
    return partial(verifier, data)


def test_damaged_staging_directories_are_started_over(tmp_path: Path, hub: FakeHub) -> None:
    """A power cut that zeroes a header, a stray directory, bytes appended to a finished
    file: each is noticed while resuming, and the download still completes at once."""
    data = hub.publish("mlp", 1)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        health = tar.getmember("health.npz")
        model = tar.getmember("model.onnx")

    staging = _interrupted(tmp_path, hub, data, health.offset_data + 10)
    headers = staging / "headers"
    torn = bytearray(headers.read_bytes())
    torn[-512:] = bytes(512)  # the last header's block came back as zeros
    headers.write_bytes(bytes(torn))
    path = make_verifier(tmp_path, hub).fetch_bundle("mlp", 1)
    assert load_bundle(path).name == "mlp"
    assert hub.target_calls[-1][1] == 0  # not routed into the headers file: started over
    shutil.rmtree(path)

    staging = _interrupted(tmp_path, hub, data, health.offset_data + 10)
    (staging / "files" / "stray").mkdir()
    load_bundle(make_verifier(tmp_path, hub).fetch_bundle("mlp", 1))
    shutil.rmtree(path)

    staging = _interrupted(tmp_path, hub, data, health.offset_data + 10)
    with open(staging / "files" / "model.onnx", "ab") as fh:
        fh.write(b"not part of the archive")
    load_bundle(make_verifier(tmp_path, hub).fetch_bundle("mlp", 1))
    assert hub.target_calls[-1][1] == health.offset_data + 10
    assert (path / "model.onnx").stat().st_size == model.size


def test_a_symlink_planted_in_staging_is_not_followed(tmp_path: Path, hub: FakeHub) -> None:
    data = hub.publish("mlp", 1)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        model = tar.getmember("model.onnx")
    staging = _interrupted(tmp_path, hub, data, model.offset_data + 100)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = staging / "files" / "model.onnx"
    target.unlink()
    target.symlink_to(victim)
    load_bundle(make_verifier(tmp_path, hub).fetch_bundle("mlp", 1))
    assert victim.read_bytes() == b"precious"


# ---------------------------------------------------------------------------------------------
# Key rotation (TufRepository.rotate_key): agents follow the chain of roots


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets", "root"])
def test_agents_follow_a_key_rotation_and_refuse_the_old_key(
    tmp_path: Path, hub: FakeHub, keys: Path, role: str
) -> None:
    hub.publish("mlp", 1)
    verifier = make_verifier(tmp_path, hub)
    verifier.fetch_bundle("mlp", 1)  # the agent trusts root v1
    old = load_signer(keys / f"{role}.pem")
    new = CryptoSigner.generate_ed25519()

    assert hub.repo.rotate_key(role, new, load_signer(keys / "root.pem")) == 2
    assert hub.repo.read("2.root.json") == hub.repo.root_bytes()
    if role == "targets":
        (keys / "targets.pem").write_bytes(new.private_bytes)  # where publishing finds it
        hub.repo = TufRepository.open(tmp_path / "metadata", keys)
    hub.publish("mlp", 2)
    load_bundle(verifier.fetch_bundle("mlp", 2))  # walked root v1 -> v2 and verified v2
    trusted = Metadata.from_bytes((tmp_path / "agent" / "tuf" / "root.json").read_bytes())
    assert trusted.signed.version == 2
    assert trusted.signed.roles[role].keyids == [new.public_key.keyid]

    if role == "timestamp":
        # A timestamp the old key signs (a thief of the old key) is refused from now on.
        forged: Metadata = Metadata.from_bytes(hub.repo.read("timestamp.json"))
        forged.signed.version += 1
        forged.sign(old)
        hub.overrides["timestamp.json"] = forged.to_bytes()
        with pytest.raises(VerificationError, match="bad signature on timestamp"):
            verifier.fetch_bundle("mlp", 2)


def test_root_renewal_and_a_wrong_root_key(tmp_path: Path, hub: FakeHub, keys: Path) -> None:
    hub.publish("mlp", 1)
    verifier = make_verifier(tmp_path, hub)
    verifier.fetch_bundle("mlp", 1)
    before = hub.repo.expires()["root"]
    with pytest.raises(Exception, match="is not a root key of root v1"):
        hub.repo.rotate_key(
            "timestamp", CryptoSigner.generate_ed25519(), load_signer(keys / "timestamp.pem")
        )
    assert hub.repo.versions()["root"] == 1  # nothing written
    root_key = load_signer(keys / "root.pem")
    time.sleep(1.1)  # expiries have second resolution
    assert hub.repo.rotate_key("root", root_key, root_key) == 2  # same key: a renewal
    assert hub.repo.expires()["root"] > before
    verifier.fetch_bundle("mlp", 1)
    trusted = Metadata.from_bytes((tmp_path / "agent" / "tuf" / "root.json").read_bytes())
    assert trusted.signed.version == 2
